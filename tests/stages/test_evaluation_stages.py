"""The knn, fewshot and linear stages on a small feature tree (stages/knn.py, fewshot.py, linear.py)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.core.config import params_from_dict
from pipeline.core.files import rounded
from pipeline.evaluation.feature_files import save_features
from tests.evaluation.test_knn import blobs


# -------------------------------------------------------------------------- stages


def write_variant(root: Path, variant: str, classes: int, per_class: int, spread: float, dim: int = 8) -> None:
    for split, seed, count in (("train", 0, per_class), ("val", 1, 5)):
        data = blobs(classes=classes, per_class=count, dim=dim, seed=seed, spread=spread)
        save_features(root / "data" / "features" / variant / f"{split}.npz", data)


@pytest.fixture()
def feature_tree(tmp_path, monkeypatch):
    # 12 train images per class: k = 100/200 clamp, 20-shot is skipped
    write_variant(tmp_path, "pretrained", classes=3, per_class=12, spread=0.3)
    write_variant(tmp_path, "random_init", classes=3, per_class=12, spread=3.0)
    write_variant(tmp_path, "pixels", classes=3, per_class=12, spread=3.0, dim=20)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def default_params():
    return params_from_dict({})


def test_knn_stage_writes_every_variant(feature_tree, default_params, capsys):
    from stages import knn

    result = knn.main(default_params)
    written = json.loads((feature_tree / "reports" / "eval" / "knn.json").read_text())
    assert set(written) == {"pretrained", "random_init", "pixels"}
    assert set(written["pretrained"]["top1"]) == {"10", "20", "100", "200"}
    assert written["pretrained"]["top1"]["10"] == 100.0
    assert written["pretrained"]["clamped"] == {"100": 36, "200": 36}
    assert written == rounded(result)  # the JSON is the returned result, rounded to 4 decimals
    assert "pretrained" in capsys.readouterr().out
    before = (feature_tree / "reports" / "eval" / "knn.json").read_bytes()
    knn.main(default_params)
    assert (feature_tree / "reports" / "eval" / "knn.json").read_bytes() == before


def test_knn_stage_needs_pretrained_features(tmp_path, monkeypatch, default_params):
    from stages import knn

    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="pretrained/train.npz"):
        knn.main(default_params)


def test_fewshot_stage_writes_json_with_skipped_shots(feature_tree, default_params):
    from stages import fewshot

    with pytest.warns(UserWarning, match="few-shot 20"):
        fewshot.main(default_params)
    written = json.loads((feature_tree / "reports" / "eval" / "fewshot.json").read_text())
    assert set(written) == {"pretrained", "random_init"}
    assert set(written["pretrained"]) == {"1", "5", "10", "skipped"}
    assert written["pretrained"]["skipped"] == {"20": "needs 20 train images per class; class 0 has 12, 3 of 3 classes have fewer"}
    assert len(written["pretrained"]["1"]["runs"]) == default_params.fewshot.draws
    assert written["pretrained"]["10"]["mean"] == 100.0


def test_linear_stage_writes_json(feature_tree, default_params):
    from stages import linear

    linear.main(default_params)
    written = json.loads((feature_tree / "reports" / "eval" / "linear.json").read_text())
    assert set(written) == {"pretrained", "random_init"}
    assert written["pretrained"]["top1"] == 100.0
    grid = default_params.linear.c_values
    assert set(written["pretrained"]["cv"]) == {f"{c:g}" for c in grid} and len(grid) == 4  # one CV entry per C
    assert written["pretrained"]["C"] in grid


def test_knn_device_is_a_param_both_stages_use(feature_tree, monkeypatch):
    """knn.device: auto computes on CUDA when torch sees a GPU; cuda without one is a params error."""
    import torch

    from pipeline.core.config import ParamsError
    from pipeline.evaluation import knn as knn_library
    from stages import fewshot, knn

    seen = []
    original = knn_library.weighted_knn

    def spy(*args, device="cpu", **kwargs):
        seen.append(torch.device(device))
        return original(*args, device=device, **kwargs)

    monkeypatch.setattr(knn, "weighted_knn", spy)
    monkeypatch.setattr(knn_library, "weighted_knn", spy)  # fewshot_knn calls it inside the library
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    knn.main(params_from_dict({"knn": {"device": "auto"}}))
    with pytest.warns(UserWarning, match="skipped"):  # the tiny tree has 12 images per class: 20-shot is skipped
        fewshot.main(params_from_dict({"knn": {"device": "cpu"}}))
    assert seen and set(seen) == {torch.device("cpu")}
    with pytest.raises(ParamsError) as error:
        knn.main(params_from_dict({"knn": {"device": "cuda"}}))
    assert error.value.key == "knn.device"


def test_fewshot_stage_slices_by_the_shards_paths(feature_tree, tiny_shards):
    """fewshot.draw: slices reads each train image's path from the shards (row i = train sample i)."""
    import shutil

    from pipeline.data.shard_reader import open_split
    from pipeline.evaluation.feature_files import load_variant
    from pipeline.evaluation.knn import fewshot_knn
    from stages import fewshot

    shutil.copytree(tiny_shards, feature_tree / "data" / "shards")
    params = params_from_dict({"fewshot": {"shots": [1, 2], "draws": 3, "draw": "slices"}})
    result = fewshot.main(params)
    split = open_split(feature_tree / "data" / "shards", "train")
    paths = [split.metadata(i)["path"] for i in range(len(split))]
    assert fewshot.train_paths(params) == paths and len(set(paths)) == 36
    # random_init's features are noisy enough that which images are drawn shows in every run's accuracy
    train, val = load_variant(feature_tree / "data" / "features", "random_init")
    slices = fewshot_knn(train, val, [1, 2], 3, 20, 0.07, seed=0, paths=paths)
    seeded = fewshot_knn(train, val, [1, 2], 3, 20, 0.07, seed=0)
    assert slices != seeded
    assert result["random_init"] == slices


def test_fewshot_slices_refuse_features_of_other_shards(feature_tree, tiny_shards, tmp_path_factory):
    import shutil

    from pipeline.core.errors import UserError
    from stages import fewshot

    write_variant(feature_tree, "pretrained", classes=3, per_class=10, spread=0.3)  # 30 rows, the shards hold 36
    shutil.copytree(tiny_shards, feature_tree / "data" / "shards")
    with pytest.raises(UserError, match="30 train features for 36 train images in data/shards; rerun the extract stage"):
        fewshot.main(params_from_dict({"fewshot": {"shots": [1], "draws": 2, "draw": "slices"}}))

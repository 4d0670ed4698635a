"""Feature extraction: layout, order, determinism, the loaded export, DDP, failure handling."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.core.config import params_from_dict
from pipeline.core.seeding import derive_seed
from pipeline.data.augment import eval_transform
from pipeline.data.shard_reader import open_split
from pipeline.evaluation.extract import extract_features, vit_features
from pipeline.evaluation.feature_files import VARIANTS, FeatureSet, load_features, save_features
from pipeline.method.backbone_export import BackboneNotFoundError, load_backbone, random_backbone
from pipeline.method.backbone_export import save_backbone_safetensors
from pipeline.method.model import backbone_state_dict, build_network
from tests.conftest import REPO, tiny_params_dict

CPU = torch.device("cpu")


def make_params(tiny_folder: Path, **extract):
    return params_from_dict(tiny_params_dict(tiny_folder, extract={"batch_size": 8, "num_workers": 0, **extract}))


def make_teacher(params, seed: int = 3):
    torch.manual_seed(seed)
    teacher = build_network(params.model, drop_path_rate=0.0)
    with torch.no_grad():  # move off timm's init so "pretrained" differs from "random_init"
        for parameter in teacher.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    return teacher.eval()


@pytest.fixture(scope="module")
def exported(tiny_folder, tmp_path_factory):
    """(params, teacher, path of its backbone export)."""
    params = make_params(tiny_folder)
    teacher = make_teacher(params)
    path = tmp_path_factory.mktemp("export") / "backbone.safetensors"
    save_backbone_safetensors(backbone_state_dict(teacher), path)
    return params, teacher, path


@pytest.fixture(scope="module")
def extracted(exported, tiny_shards, tmp_path_factory):
    params, _, backbone = exported
    out = tmp_path_factory.mktemp("features")
    summary = extract_features(params, tiny_shards, backbone, out, CPU, progress_bar=False)
    return out, summary


def shard_keys(shard_dir: Path, split: str) -> list[str]:
    """Sample keys in split order, read with tarfile (independent of our reader)."""
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    keys = []
    for entry in manifest["shards"]:
        if entry["split"] == split:
            with tarfile.open(shard_dir / entry["name"]) as tar:
                for member in tar.getmembers():
                    key, _, ext = member.name.partition(".")
                    if ext == "cls":
                        keys.append(key)
    return keys


def test_files_shapes_dtypes_and_summary(extracted, tiny_shards):
    out, summary = extracted
    sizes = {split: len(open_split(tiny_shards, split)) for split in ("train", "val")}
    dims = {"pretrained": 32, "random_init": 32, "pixels": 3 * 16 * 16}
    for variant in VARIANTS:
        for split in ("train", "val"):
            path = out / variant / f"{split}.npz"
            with np.load(path, allow_pickle=False) as data:  # plain arrays, no pickles
                assert sorted(data.files) == ["features", "keys", "labels"]
                assert data["features"].dtype == np.float32
                assert data["features"].shape == (sizes[split], dims[variant])
                assert data["labels"].dtype == np.int64
                assert data["keys"].dtype.kind == "U"
                assert np.isfinite(data["features"]).all()
        assert summary["variants"][variant] == {"dim": dims[variant], **sizes}
    assert summary["num_classes"] == 3
    assert not list(out.rglob("*.tmp"))


def test_rows_follow_the_split_order_with_the_shard_labels_and_keys(extracted, exported, tiny_shards):
    out, _ = extracted
    params, _, backbone = exported
    vit = load_backbone(params.model, backbone).eval()
    transform = eval_transform(params.extract_image_size())
    for split_name in ("train", "val"):
        split = open_split(tiny_shards, split_name)
        pixels = load_features(out / "pixels" / f"{split_name}.npz")
        pretrained = load_features(out / "pretrained" / f"{split_name}.npz")
        assert np.array_equal(pixels.labels, split.labels)
        assert np.array_equal(pretrained.labels, split.labels)
        assert pixels.keys.tolist() == shard_keys(tiny_shards, split_name)
        assert pretrained.keys.tolist() == pixels.keys.tolist()
        images = torch.stack([transform(split.image(i)) for i in range(len(split))])
        assert np.array_equal(pixels.features, images.flatten(1).numpy())
        with torch.no_grad():
            expected = vit_features(vit, images).numpy()  # one batch vs batches of 8: rounding may differ
        np.testing.assert_allclose(pretrained.features, expected, rtol=1e-5, atol=1e-5)


def test_two_extractions_are_byte_identical(extracted, exported, tiny_shards, tmp_path):
    out, _ = extracted
    params, _, backbone = exported
    extract_features(params, tiny_shards, backbone, tmp_path, CPU, progress_bar=False)
    for variant in VARIANTS:
        for split in ("train", "val"):
            assert (tmp_path / variant / f"{split}.npz").read_bytes() == (out / variant / f"{split}.npz").read_bytes()


def test_features_of_the_export_equal_the_in_memory_teacher(exported, tiny_shards):
    params, teacher, backbone = exported
    split = open_split(tiny_shards, "val")
    transform = eval_transform(params.extract_image_size())
    images = torch.stack([transform(split.image(i)) for i in range(8)])
    vit = load_backbone(params.model, backbone).eval()
    with torch.no_grad():
        from_export = vit_features(vit, images)
        in_memory = teacher.backbone(images)[:, 0]  # [CLS] after the final norm
        assert torch.equal(from_export, in_memory)
        assert torch.equal(from_export, vit.forward_features(images)[:, 0])


def test_n_last_blocks_and_avgpool_change_the_dimension(exported, tiny_shards, tmp_path):
    params, teacher, backbone = exported
    params = make_params(Path(params.data.root), n_last_blocks=2, avgpool=True)
    summary = extract_features(params, tiny_shards, backbone, tmp_path, CPU, variants=("pretrained",),
                               progress_bar=False)
    assert summary["variants"]["pretrained"]["dim"] == 32 * 3
    features = load_features(tmp_path / "pretrained" / "val.npz").features
    split = open_split(tiny_shards, "val")
    transform = eval_transform(params.extract_image_size())
    images = torch.stack([transform(split.image(i)) for i in range(len(split))])
    with torch.no_grad():
        tokens = teacher.backbone(images)  # (B, 1 + P, D) after the final norm
    # layout [cls(block -2), cls(block -1), mean of the last block's patch tokens]
    np.testing.assert_allclose(features[:, 32:64], tokens[:, 0].numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(features[:, 64:], tokens[:, 1:].mean(1).numpy(), rtol=1e-5, atol=1e-5)
    assert not np.allclose(features[:, :32], features[:, 32:64])


def test_random_init_is_seeded_and_differs_from_pretrained(extracted, exported):
    out, _ = extracted
    params, _, _ = exported
    a, b = random_backbone(params.model, params.seed), random_backbone(params.model, params.seed)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    torch.manual_seed(derive_seed(params.seed, "random_init"))
    from pipeline.method.backbone_export import create_backbone

    c = create_backbone(params.model)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values()))
    other = random_backbone(params.model, params.seed + 1)
    assert not torch.equal(a.state_dict()["cls_token"], other.state_dict()["cls_token"])
    random_val = load_features(out / "random_init" / "val.npz").features
    pretrained_val = load_features(out / "pretrained" / "val.npz").features
    assert not np.allclose(random_val, pretrained_val)


def test_missing_backbone_raises_naming_the_file(tiny_folder, tiny_shards, tmp_path):
    params = make_params(tiny_folder)
    missing = tmp_path / "models" / "backbone.safetensors"
    with pytest.raises(BackboneNotFoundError, match=str(missing)):
        extract_features(params, tiny_shards, missing, tmp_path / "features", CPU, progress_bar=False)
    assert not (tmp_path / "features").exists()


def test_backbone_of_another_shape_is_refused(exported, tiny_folder, tmp_path):
    _, _, backbone = exported
    params = params_from_dict(tiny_params_dict(tiny_folder, model={"embed_dim": 64, "num_heads": 2}))
    with pytest.raises(RuntimeError, match="does not match model"):
        load_backbone(params.model, backbone)


def test_a_failed_write_leaves_the_previous_file_and_no_partial_one(tmp_path, monkeypatch):
    path = tmp_path / "val.npz"
    good = FeatureSet(np.ones((3, 2), np.float32), np.arange(3), np.array(["a", "b", "c"]))
    save_features(path, good)
    before = path.read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np.lib.format, "write_array", broken)
    with pytest.raises(OSError, match="disk full"):
        save_features(path, FeatureSet(np.zeros((5, 2), np.float32), np.arange(5), np.array(list("abcde"))))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["val.npz"]
    monkeypatch.undo()
    with pytest.raises(OSError, match="disk full"):
        monkeypatch.setattr(np.lib.format, "write_array", broken)
        save_features(tmp_path / "new.npz", good)
    assert not (tmp_path / "new.npz").exists()


# ----------------------------------------------------------- the stage command
def stage_workdir(tmp_path: Path, tiny_folder: Path, tiny_shards: Path, backbone: Path, **sections) -> Path:
    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    shutil.copytree(tiny_shards, work / "data" / "shards")
    (work / "models" / "pretrain").mkdir(parents=True)
    shutil.copy(backbone, work / "models" / "pretrain" / "backbone.safetensors")
    (work / "params.yaml").write_text(yaml.safe_dump(tiny_params_dict(tiny_folder, **sections)))
    return work


def run_stage(work: Path, *prefix: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1",
               ATTMASK_RUNS_DIR=str(work / "runs"))
    env.pop("WORLD_SIZE", None)
    command = [*prefix] if prefix else [sys.executable]
    return subprocess.run([*command, "-m", "stages.extract"], cwd=work, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_stage_with_two_ddp_processes_writes_what_one_process_writes(exported, tiny_folder, tiny_shards, tmp_path):
    _, _, backbone = exported
    # batch 4 per rank: both ranks get several batches and the last one is partial
    sections = {"extract": {"batch_size": 4, "num_workers": 0, "device": "cpu"}}
    single = stage_workdir(tmp_path / "single", tiny_folder, tiny_shards, backbone, **sections)
    done = run_stage(single)
    assert done.returncode == 0, done.stderr[-3000:]
    ddp = stage_workdir(tmp_path / "ddp", tiny_folder, tiny_shards, backbone, **sections)
    done = run_stage(ddp, sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    assert done.returncode == 0, done.stderr[-3000:]
    for variant in VARIANTS:
        for split in ("train", "val"):
            name = Path("data/features") / variant / f"{split}.npz"
            assert (single / name).read_bytes() == (ddp / name).read_bytes(), name
    report = Path("reports/eval/extract.json")
    assert (single / report).read_bytes() == (ddp / report).read_bytes()
    assert json.loads((single / report).read_text())["variants"]["pixels"]["dim"] == 768


def test_stage_without_backbone_fails_naming_it(tiny_folder, tiny_shards, tmp_path, exported, monkeypatch):
    from stages import extract

    _, _, backbone = exported
    work = stage_workdir(tmp_path, tiny_folder, tiny_shards, backbone)
    (work / "models" / "pretrain" / "backbone.safetensors").unlink()
    monkeypatch.chdir(work)
    with pytest.raises(BackboneNotFoundError, match="models/pretrain/backbone.safetensors"):
        extract.main(make_params(tiny_folder), progress_bar=False)
    assert not (work / "data" / "features").exists()
    assert not (work / "reports").exists()


def test_the_pixel_baseline_is_left_out_when_its_features_would_not_fit(tiny_folder, tiny_shards, tmp_path, exported,
                                                                        monkeypatch, capsys):
    """At the paper's 224 px the raw-pixel baseline of the 20% ImageNet train split alone is 157 GB of float32,
    gathered in memory before it is written: the stage leaves it out, says why in one line and in extract.json,
    removes an earlier run's pixel features, and the embedded sizes keep it (and their extract.json unchanged)."""
    from stages import extract

    paper = params_from_dict({"model": {"arch": "vit_small_patch16_224", "patch_size": 16, "img_size": 224,
                                        "depth": None, "embed_dim": None, "num_heads": None}, "augment": {
                                            "global_size": 224, "local_size": 96}})
    variants, left_out = extract.feature_variants(paper, {"train": 260_000, "val": 50_000})
    assert variants == ("pretrained", "random_init") and set(left_out) == {"pixels"}
    assert left_out["pixels"].startswith("310,000 images x 3 x 224 x 224 float32 = 173.8 GiB of raw-pixel features")
    assert extract.feature_variants(params_from_dict({}), {"train": 5000, "val": 500}) == (VARIANTS, {})

    params, _, backbone = exported
    work = stage_workdir(tmp_path, tiny_folder, tiny_shards, backbone)
    (work / "data" / "features" / "pixels").mkdir(parents=True)
    (work / "data" / "features" / "pixels" / "train.npz").write_bytes(b"an earlier run's")
    monkeypatch.chdir(work)
    monkeypatch.setattr(extract, "PIXELS_MAX_BYTES", 1000)  # the tiny split's 48 images x 768 floats do not fit
    summary = extract.main(make_params(tiny_folder), progress_bar=False)
    assert set(summary["variants"]) == {"pretrained", "random_init"} and "pixels" in summary["left_out"]
    assert not (work / "data" / "features" / "pixels").exists()
    assert json.loads((work / "reports" / "eval" / "extract.json").read_text())["left_out"] == summary["left_out"]
    assert "extract: pixels left out: 48 images x 3 x 16 x 16 float32" in capsys.readouterr().out
    monkeypatch.setattr(extract, "PIXELS_MAX_BYTES", 2 * 2**30)
    summary = extract.main(make_params(tiny_folder), progress_bar=False)
    assert set(summary["variants"]) == set(VARIANTS) and "left_out" not in summary

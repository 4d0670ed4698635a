"""The embedded dataset generator (pipeline/data/synthetic.py) and its DVC stage (stages/generate.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.core.config import SyntheticConfig, params_from_dict
from pipeline.data.synthetic import (CLASSES, PALETTE, class_names, generate_dataset, image_identity, palette_index,
                                     render, scene)

SMALL = SyntheticConfig(num_classes=3, train_per_class=4, val_per_class=2, image_size=32)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("gen") / "synthetic"
    return root, generate_dataset(root, SMALL, seed=0, progress=False)


def test_layout_and_exact_counts(small_dataset: tuple[Path, dict]) -> None:
    root, summary = small_dataset
    assert sorted(p.name for p in root.iterdir()) == ["train", "val"]
    for split, per_class in (("train", 4), ("val", 2)):
        folders = sorted(p.name for p in (root / split).iterdir())
        assert folders == class_names(3)
        for folder in folders:
            assert len(list((root / split / folder).glob("*.png"))) == per_class
    assert summary["counts"] == {"train": 12, "val": 6}
    assert summary["classes"] == class_names(3)
    # The temporary sibling is gone after the rename.
    assert sorted(p.name for p in root.parent.iterdir()) == ["synthetic"]


def test_class_folders_sort_in_class_order() -> None:
    names = class_names(len(CLASSES))
    assert names == sorted(names)
    assert len(set(names)) == len(CLASSES) == 26
    assert names[0].startswith("c00_") and names[-1].startswith("c25_")


def test_images_are_rgb_png_of_the_configured_size(small_dataset: tuple[Path, dict]) -> None:
    root, _ = small_dataset
    for path in root.rglob("*.png"):
        with Image.open(path) as image:
            assert image.format == "PNG"
            assert image.mode == "RGB"
            assert image.size == (32, 32)
            assert not image.info.get("dpi") and "exif" not in image.info


def test_same_seed_is_byte_identical(tmp_path: Path, small_dataset: tuple[Path, dict]) -> None:
    root, _ = small_dataset
    again = tmp_path / "again"
    generate_dataset(again, SMALL, seed=0, progress=False)
    assert _files(again) == _files(root)


def test_different_seed_gives_different_images(tmp_path: Path, small_dataset: tuple[Path, dict]) -> None:
    root, _ = small_dataset
    other = tmp_path / "other"
    generate_dataset(other, SMALL, seed=1, progress=False)
    first, second = _files(root), _files(other)
    assert first.keys() == second.keys()
    assert all(first[name] != second[name] for name in first)


def test_images_within_a_class_differ() -> None:
    images = [render(0, "train", 0, i, 32) for i in range(4)]
    assert len({image.tobytes() for image in images}) == 4
    assert render(0, "train", 0, 0, 32).tobytes() != render(0, "val", 0, 0, 32).tobytes()


def test_regeneration_replaces_existing_root(tmp_path: Path) -> None:
    root = tmp_path / "synthetic"
    generate_dataset(root, SyntheticConfig(num_classes=4, train_per_class=3, val_per_class=1, image_size=16), 0,
                     progress=False)
    (root / "stale.txt").write_text("left over")
    generate_dataset(root, SMALL, seed=0, progress=False)
    assert not (root / "stale.txt").exists()
    assert sorted(p.name for p in (root / "train").iterdir()) == class_names(3)
    assert len(list(root.rglob("*.png"))) == 3 * (4 + 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synthetic"]


def test_failure_leaves_previous_dataset_untouched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.data.synthetic as synthetic

    root = tmp_path / "synthetic"
    generate_dataset(root, SMALL, seed=0, progress=False)
    before = _files(root)
    calls = {"n": 0}

    def failing_render(*args: object) -> np.ndarray:
        calls["n"] += 1
        if calls["n"] > 5:
            raise RuntimeError("simulated crash")
        return render(*args)

    monkeypatch.setattr(synthetic, "render", failing_render)
    with pytest.raises(RuntimeError, match="simulated crash"):
        generate_dataset(root, SMALL, seed=1, progress=False)
    assert _files(root) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synthetic"]


def test_colour_carries_no_class_information() -> None:
    # Mean image colour per class: the spread between class means should be
    # no larger than sampling noise of the per-image means.
    num_classes, per_class = 10, 40
    means = np.array([[render(7, "train", c, i, 32).reshape(-1, 3).mean(0) for i in range(per_class)]
                      for c in range(num_classes)])  # (classes, images, 3)
    class_means = means.mean(1)
    standard_error = means.std(1).mean(0) / np.sqrt(per_class)
    # Between-class std of the means vs its expectation under "no class effect".
    assert np.all(class_means.std(0) < 2.0 * standard_error)


def test_scene_records_the_draws_without_changing_the_image() -> None:
    # Star (class 0): its centre is always inside the silhouette, so the pixel
    # there shows the recorded object colour (up to pixel noise and rounding).
    hits = 0
    for i in range(8):
        image = render(3, "val", 0, i, 48)
        drawn = scene(3, "val", 0, i, 48)
        assert np.array_equal(render(3, "val", 0, i, 48), image)  # recording is side-effect free
        x, y = np.clip((drawn["centre"] * 48).astype(int), 0, 47)
        hits += np.abs(image[y, x] / 255.0 - drawn["object_colour"]).max() < 0.12
        assert 0.45 - 1e-9 <= drawn["extent"] <= 0.8 + 1e-9
    assert hits >= 7


def test_palette_index_names_the_nearest_palette_colour() -> None:
    for k, colour in enumerate(PALETTE):
        assert palette_index(np.asarray(colour) + 0.03) == k


def test_image_identity_inverts_the_layout(small_dataset: tuple[Path, dict]) -> None:
    root, _ = small_dataset
    for path in sorted(root.rglob("*.png")):
        split, class_index, image_index = image_identity(str(path.relative_to(root)))
        assert path.relative_to(root) == Path(split, class_names(3)[class_index],
                                              f"{class_names(3)[class_index]}_{image_index:05d}.png")
    for bad in ("train/c00_star.png", "test/c00_star/c00_star_00001.png", "val/star/star_00001.png",
                "val/c00_star/c01_cross_00001.png", "val/c00_star/c00_star_x.png", "val/x00_star/x00_star_00001.png"):
        with pytest.raises(ValueError, match="not a generated image path"):
            image_identity(bad)


@pytest.mark.parametrize("num_classes", [2, 26])
def test_every_class_renders(num_classes: int) -> None:
    for c in range(num_classes):
        image = render(3, "val", c, 0, 48)
        assert image.shape == (48, 48, 3) and image.dtype == np.uint8


def _params(source: str, root: str) -> object:
    return params_from_dict({
        "seed": 5,
        "data": {"source": source, "root": root,
                 "synthetic": {"num_classes": 2, "train_per_class": 2, "val_per_class": 1, "image_size": 16}},
    })


def test_stage_generates_synthetic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from stages.generate import main

    monkeypatch.chdir(tmp_path)
    summary = main(_params("synthetic", "data/synthetic"), progress=False)
    assert summary["counts"] == {"train": 4, "val": 2}
    assert len(list((tmp_path / "data/synthetic/train").rglob("*.png"))) == 4
    assert "generate:" in capsys.readouterr().out


def test_stage_writes_not_used_for_imagefolder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from stages.generate import main

    monkeypatch.chdir(tmp_path)
    main(_params("synthetic", "data/synthetic"), progress=False)  # a stale generation to be replaced
    summary = main(_params("imagefolder", "my_images"), progress=False)
    out = tmp_path / "data/synthetic"
    assert [p.name for p in out.iterdir()] == ["NOT_USED.txt"]
    assert "my_images" in (out / "NOT_USED.txt").read_text()
    assert summary["source"] == "imagefolder"


def test_stage_refuses_imagefolder_pointing_at_its_own_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.core.config import ParamsError
    from stages.generate import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ParamsError, match="data.root"):
        main(_params("imagefolder", "data/synthetic"), progress=False)


def test_worker_processes_give_the_same_bytes(tmp_path: Path, small_dataset: tuple[Path, dict]) -> None:
    root, _ = small_dataset
    parallel = tmp_path / "parallel"
    generate_dataset(parallel, SMALL, seed=0, progress=False, workers=2)
    assert _files(parallel) == _files(root)

"""The real-data bench's folder writer and IDX reader (bench/real_data.py), on a handful of images."""
from __future__ import annotations

import gzip

import numpy as np
import pytest
from PIL import Image

from bench.real_data import read_idx, write_imagefolder


def write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def test_idx_files_read_back_with_their_shape(tmp_path):
    images = np.arange(3 * 28 * 28, dtype=np.uint64).reshape(3, 28, 28).astype(np.uint8)
    write_idx(tmp_path / "images.gz", images)
    assert np.array_equal(read_idx(tmp_path / "images.gz"), images)
    (tmp_path / "bad").write_bytes(b"\x00\x00\x0d\x01\x00\x00\x00\x01")
    with pytest.raises(ValueError, match="not an IDX file of unsigned bytes"):
        read_idx(tmp_path / "bad")


def test_the_folder_holds_the_first_images_of_each_class_as_rgb_pngs(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 2], dtype=np.uint8)
    images = rng.integers(0, 255, (len(labels), 28, 28), dtype=np.uint8)
    names = ("shirt", "bag", "boot")
    counts = write_imagefolder(tmp_path, {"train": (images, labels), "val": (images, labels)}, {"train": 3, "val": 1},
                               class_names=names, size=48)
    assert counts == {"train": 9, "val": 3}
    assert sorted(p.name for p in (tmp_path / "train" / "boot").iterdir()) == ["00002.png", "00005.png", "00008.png"]
    assert sorted(p.name for p in (tmp_path / "val" / "shirt").iterdir()) == ["00000.png"]
    image = Image.open(tmp_path / "train" / "bag" / "00001.png")
    assert image.mode == "RGB" and image.size == (48, 48)
    with pytest.raises(ValueError, match=r"classes \[0, 1\] have fewer than 4 images"):
        write_imagefolder(tmp_path / "more", {"train": (images, labels)}, {"train": 4}, class_names=names)


def test_bench_md_renders_both_folder_sizes_with_the_reports_verdicts():
    from bench.render import real_data_section, seeds_section

    def row(knn, random_knn, verdict):
        return {"train_images": 1400, "steps": 150, "knn": {"pretrained": knn, "random_init": random_knn, "pixels": 98.0},
                "linear": {"pretrained": 81.6, "random_init": 86.1}, "finetune": {"pretrained": 30.2, "random_init": 37.3},
                "fewshot": {"shots": 20, "pretrained": 34.6, "random_init": 38.9}, "final_loss_cls": 4.17,
                "uniform_loss": 4.159, "minutes": 5.0, "seed": 0,
                "margins": {"knn": {"verdict": verdict}, "linear": {"verdict": "no measurable gain"}}}

    result = {"dataset": "Fashion-MNIST", "image_size": 48, "val_per_class": 50,
              "rows": [row(49.6, 59.7, "below random init"), row(65.0, 56.8, "gain")]}
    lines = real_data_section({"real_data": result})
    assert ("| 1400 (150) | 49.6 / 59.7 / 98.0 | 81.6 / 86.1 | 30.2 / 37.3 | 34.6 / 38.9 | 4.17 (4.16) | "
            "knn: below random init; linear: no measurable gain | 5.0 min |") in lines
    assert any(line.startswith("- mean ± sd over 2 seeds: k-NN") for line in seeds_section({"seeds": result}))
    assert "Not measured yet" in real_data_section({})[2]

"""Throughput of the data path: shard writing and the shard loader with decoding.

Run: ``.venv/bin/python -m bench.bench_data``; writes ``reports/bench/data.json``.
Builds a small ImageNet-layout folder (JPEG, 96x96 px: the cost is per-image
overhead plus decoding) in a temp dir, then times

- writing: :func:`pipeline.data.write_shards` (full decode check + tar writing),
  with the check in-process and in a 2-process pool;
- opening: :func:`pipeline.shards.open_split` (SHA-256 verification + tar index);
- loading: a DataLoader over :class:`pipeline.shards.ShardDataset` (read, decode,
  RGB, to tensor) with ``num_workers`` 0 and 2.
"""
from __future__ import annotations

import io
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from pipeline.data import write_shards
from pipeline.shards import ShardDataset, open_split

CLASSES = 10
TRAIN_PER_CLASS = 150
VAL_PER_CLASS = 10
IMAGE_SIZE = 96
SHARD_SIZE = 250
BATCH = 32
EPOCHS = 2  # loader epochs timed per worker count (after one warm-up epoch)
OUTPUT = Path("reports/bench/data.json")


def build_folder(root: Path) -> int:
    """Smooth random images (so JPEG sizes are realistic, not noise); returns the file count."""
    rng = np.random.default_rng(0)
    count = 0
    for split, per_class in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        for c in range(CLASSES):
            folder = root / split / f"class_{c:02d}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                small = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
                image = Image.fromarray(small).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)
                buffer = io.BytesIO()
                image.save(buffer, "JPEG", quality=90)
                (folder / f"{i:04d}.JPEG").write_bytes(buffer.getvalue())
                count += 1
    return count


def to_tensor(image: Image.Image) -> torch.Tensor:
    """(3, H, W) float32 in [0, 1]: decoding plus the minimum every transform does."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255)


def time_writing(root: Path, out: Path, files: int, workers: int) -> dict[str, float]:
    start = time.perf_counter()
    write_shards(root, out, seed=0, shard_size=SHARD_SIZE, workers=workers, progress=False)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "images_per_second": files / seconds}


def time_loading(out: Path, num_workers: int) -> dict[str, float]:
    split = open_split(out, "train")
    seen, seconds = 0, 0.0
    for epoch in range(EPOCHS + 1):
        dataset = ShardDataset(split, batch_size=BATCH, transform=to_tensor, seed=0, epoch=epoch, drop_last=False)
        loader = DataLoader(dataset, batch_size=BATCH, num_workers=num_workers)
        start = time.perf_counter()
        count = sum(images.shape[0] for images, _labels, _indices in loader)
        if epoch > 0:  # epoch 0 warms the page cache and imports
            seen, seconds = seen + count, seconds + time.perf_counter() - start
    return {"seconds_per_epoch": seconds / EPOCHS, "images_per_second": seen / seconds}


def main() -> dict[str, Any]:
    """Run the benchmark, print a summary and write ``reports/bench/data.json``."""
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        root, out = Path(tmp) / "images", Path(tmp) / "shards"
        files = build_folder(root)
        writing = {f"check_workers_{w}": time_writing(root, out, files, w) for w in (0, 2)}
        start = time.perf_counter()
        split = open_split(out, "train")
        open_seconds = time.perf_counter() - start
        shard_bytes = sum(p.stat().st_size for p in out.glob("*.tar"))
        loading = {f"num_workers_{w}": time_loading(out, w) for w in (0, 2)}
    report = {
        "images": {"train": CLASSES * TRAIN_PER_CLASS, "val": CLASSES * VAL_PER_CLASS, "size": IMAGE_SIZE,
                   "format": "JPEG q90", "shard_bytes": shard_bytes},
        "write_shards": writing,
        "open_split": {"seconds": open_seconds, "samples": len(split)},
        "loader": {"batch_size": BATCH, "epochs_timed": EPOCHS, **loading},
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "python": platform.python_version(),
    }
    print(f"data bench: {files} JPEGs {IMAGE_SIZE}px, {os.cpu_count()} CPUs")
    for name, t in writing.items():
        print(f"  write_shards ({name}): {t['images_per_second']:8.0f} images/s")
    print(f"  open_split (verify + index {len(split)} samples): {open_seconds * 1e3:.1f} ms")
    for name, t in loading.items():
        print(f"  loader ({name}, decode + to tensor): {t['images_per_second']:8.0f} images/s")
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()

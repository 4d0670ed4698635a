"""Throughput of the data path: shard writing and the shard loader with decoding.

Run: ``.venv/bin/python -m bench.bench_data``; writes ``reports/bench/data.json``.
Builds a small ImageNet-layout folder (JPEG, 96x96 px: the cost is per-image
overhead plus decoding) in a temp dir, then times

- writing: :func:`pipeline.data.shard_writer.write_shards` (full decode check + tar writing),
  with the check in-process and in a 2-process pool;
- opening: :func:`pipeline.data.shard_reader.open_split` at both ``data.verify`` levels
  (``index``: sizes, tar headers, labels; ``full``: also SHA-256 of every byte), the
  shards dropped from the page cache before each open, and each level scaled to
  ImageNet's train split (per sample for ``index``, per byte for ``full``);
- loading: a DataLoader over :class:`pipeline.data.shard_reader.ShardDataset` (read, decode,
  RGB, to tensor) with ``num_workers`` 0 and 2;
- the training data path, per worker process: shard read + decode + DINO
  multi-crop augmentation at the paper's sizes (500x375 px JPEGs, the typical
  ImageNet photo, to 2 x 224 + 10 x 96 px crops) and at the embedded ones
  (48 px PNGs to 2 x 32 + 2 x 16 px), each with ``augment.photometric``
  ``per_image`` (everything in the worker: the before) and ``batched`` (the
  worker crops to uint8; the colour ops' cost per batch on the device is timed
  separately, on the CPU here and on CUDA when there is one).
  Rates are steady state: timed from the first batch to the last, so worker
  start-up is left out; ``images/s / workers`` is the per-worker figure.
  ``--workers 1 2 4 8 16`` to choose the counts (the GPU harness uses up to 16).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from bench.machine import machine_info
from pipeline.core.config import AugmentConfig
from pipeline.data.augment import build_multicrop
from pipeline.data.shard_reader import VERIFY_LEVELS, ShardDataset, open_split
from pipeline.data.shard_writer import write_shards
from bench.stats import summarize

CLASSES = 10
TRAIN_PER_CLASS = 150
VAL_PER_CLASS = 10
IMAGE_SIZE = 96
SHARD_SIZE = 250
BATCH = 32
EPOCHS = 2  # loader epochs timed per worker count (after one warm-up epoch)
OUTPUT = Path("reports/bench/data.json")
# (image format and size, crops): the paper's multi-crop on ImageNet-sized photos, and the embedded default,
# each with the colour ops per image in the worker (per_image) and batch-wise on the device (batched)
PAPER_CROPS = AugmentConfig(global_size=224, local_size=96, local_number=10, blur="absolute")
MULTICROP_CASES = {
    "paper": {"image": ("JPEG", 500, 375), "augment": PAPER_CROPS},
    "paper_batched": {"image": ("JPEG", 500, 375), "augment": replace(PAPER_CROPS, photometric="batched")},
    "embedded": {"image": ("PNG", 48, 48), "augment": AugmentConfig()},
    "embedded_batched": {"image": ("PNG", 48, 48), "augment": AugmentConfig(photometric="batched")},
}
DEVICE_REPEATS = 5  # timings of the device-side colour ops per batch
MULTICROP_IMAGES = 256  # 31 timed batches of 8 per epoch: the rate's noise stays under the before/after gap
MULTICROP_BATCH = 8


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


IMAGENET_TRAIN = {"images": 1_281_167, "shard_bytes": 140e9}  # the ILSVRC-2012 train split as shards


def drop_from_page_cache(shard_dir: Path) -> bool:
    """Ask the kernel to forget the shards' cached pages, so the next open reads the disk (False: not possible here)."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for path in shard_dir.glob("*.tar"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def time_open(shards: Path, repeats: int = 3) -> dict[str, Any]:
    """Seconds to open the train split at each verify level, and the same scaled to ImageNet's train split."""
    from bench.stats import summarize

    result: dict[str, Any] = {"levels": {}}
    for level in VERIFY_LEVELS:
        seconds = []
        for _ in range(repeats):
            result["cold"] = drop_from_page_cache(shards)
            start = time.perf_counter()
            split = open_split(shards, "train", verify=level)
            seconds.append(time.perf_counter() - start)
        result["levels"][level] = summarize(seconds)
    samples, size = len(split), sum(entry.size for entry in split.entries)
    result.update(samples=samples, shard_bytes=size)
    # index costs per sample (headers and labels), full per byte (every byte read and hashed)
    result["imagenet_seconds"] = {
        "index": result["levels"]["index"]["median"] / samples * IMAGENET_TRAIN["images"],
        "full": result["levels"]["full"]["median"] / size * IMAGENET_TRAIN["shard_bytes"]}
    return result


def smooth_photo(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A smooth random RGB image: 24x32 random pixels upscaled (bicubic) to ``width`` x ``height``."""
    small = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)


def build_photo_folder(root: Path, count: int, kind: str, width: int, height: int) -> None:
    """``count`` smooth random images (2 classes, 1 val each) of the given format and size."""
    rng = np.random.default_rng(1)
    for split, per_class in (("train", -(-count // 2)), ("val", 1)):
        for c in range(2):
            folder = root / split / f"c{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                image = smooth_photo(rng, width, height)
                suffix = ".JPEG" if kind == "JPEG" else ".png"
                image.save(folder / f"{i:04d}{suffix}", kind, **({"quality": 90} if kind == "JPEG" else {}))


def time_multicrop(shards: Path, augment: AugmentConfig, num_workers: int, epochs: int = 2) -> dict[str, Any]:
    """Steady-state images/s of read + decode + multi-crop through a DataLoader, per epoch, summarised.

    With ``augment.photometric: batched`` this is the worker's share (uint8 crops
    and drawn parameters); :func:`time_device_ops` times the rest.
    """
    split = open_split(shards, "train")
    transform = build_multicrop(augment)
    rates = []
    for epoch in range(epochs):
        dataset = ShardDataset(split, batch_size=MULTICROP_BATCH, transform=transform, seed=0, epoch=epoch, drop_last=True)
        loader = DataLoader(dataset, batch_size=MULTICROP_BATCH, num_workers=num_workers)
        first_at, images = None, 0
        for _batch, labels, _indices in loader:
            if first_at is None:  # worker start-up and the first batch are excluded
                first_at = time.perf_counter()
            else:
                images += labels.shape[0]
        rates.append(images / (time.perf_counter() - first_at))
    summary = summarize(rates)
    return {"images_per_second": summary, "per_worker_images_per_second": summary["median"] / max(1, num_workers),
            "num_workers": num_workers}


def time_device_ops(shards: Path, augment: AugmentConfig, device: torch.device,
                    repeats: int = DEVICE_REPEATS) -> dict[str, Any]:
    """Milliseconds per batch of the batched colour ops (``on_device``) on ``device``, summarised."""
    transform = build_multicrop(augment)
    dataset = ShardDataset(open_split(shards, "train"), batch_size=MULTICROP_BATCH, transform=transform, seed=0)
    batch, _labels, _indices = next(iter(DataLoader(dataset, batch_size=MULTICROP_BATCH)))
    transform.on_device(batch, device)  # warm-up: kernels, allocator
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        transform.on_device(batch, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    summary = summarize(times)
    return {"device": str(device), "batch_size": MULTICROP_BATCH, "ms_per_batch": summary,
            "ms_per_image": summary["median"] / MULTICROP_BATCH, "torch_threads": torch.get_num_threads()}


def multicrop(workers: tuple[int, ...], images: int = MULTICROP_IMAGES, epochs: int = 2) -> dict[str, Any]:
    """The training data path for each case and worker count."""
    result: dict[str, Any] = {}
    for name, case in MULTICROP_CASES.items():
        kind, width, height = case["image"]
        with tempfile.TemporaryDirectory(prefix="bench_multicrop_") as tmp:
            root, out = Path(tmp) / "images", Path(tmp) / "shards"
            count = max(images, 4 * MULTICROP_BATCH * max(workers))  # >= 4 batches per worker
            build_photo_folder(root, count, kind, width, height)
            write_shards(root, out, seed=0, shard_size=SHARD_SIZE, workers=0, progress=False)
            augment = case["augment"]
            result[name] = {
                "image": f"{kind} {width}x{height}", "images": count, "batch_size": MULTICROP_BATCH,
                "crops": f"2 x {augment.global_size} + {augment.local_number} x {augment.local_size} px",
                "photometric": augment.photometric,
                "workers": {str(w): time_multicrop(out, augment, w, epochs) for w in workers},
            }
            if augment.photometric == "batched":
                devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
                result[name]["device_ops"] = {d.type: time_device_ops(out, augment, d) for d in devices}
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print a summary and write ``reports/bench/data.json``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--multicrop-only", action="store_true", help="skip shard writing and plain loading")
    parser.add_argument("--out", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    if args.multicrop_only:
        report = {"multicrop": multicrop(tuple(args.workers)), "cpu_count": os.cpu_count(), "machine": machine_info()}
        _print_multicrop(report["multicrop"])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        return report
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        root, out = Path(tmp) / "images", Path(tmp) / "shards"
        files = build_folder(root)
        writing = {f"check_workers_{w}": time_writing(root, out, files, w) for w in (0, 2)}
        opening = time_open(out)
        shard_bytes = sum(p.stat().st_size for p in out.glob("*.tar"))
        loading = {f"num_workers_{w}": time_loading(out, w) for w in (0, 2)}
    report = {
        "images": {"train": CLASSES * TRAIN_PER_CLASS, "val": CLASSES * VAL_PER_CLASS, "size": IMAGE_SIZE,
                   "format": "JPEG q90", "shard_bytes": shard_bytes},
        "write_shards": writing,
        "open_split": opening,
        "loader": {"batch_size": BATCH, "epochs_timed": EPOCHS, **loading},
        "multicrop": multicrop(tuple(args.workers)),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "machine": machine_info(),
        "python": platform.python_version(),
    }
    print(f"data bench: {files} JPEGs {IMAGE_SIZE}px, {os.cpu_count()} CPUs")
    for name, t in writing.items():
        print(f"  write_shards ({name}): {t['images_per_second']:8.0f} images/s")
    for level, seconds in opening["levels"].items():
        print(f"  open_split (verify={level}, {opening['samples']} samples): {seconds['median'] * 1e3:.1f} ms; "
              f"ImageNet train: {opening['imagenet_seconds'][level] / 60:.1f} min per rank and stage start")
    for name, t in loading.items():
        print(f"  loader ({name}, decode + to tensor): {t['images_per_second']:8.0f} images/s")
    _print_multicrop(report["multicrop"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


def _print_multicrop(result: dict[str, Any]) -> None:
    for name, case in result.items():
        for workers, timing in case["workers"].items():
            print(f"  multi-crop {name} ({case['image']} -> {case['crops']}, colour ops {case['photometric']}), "
                  f"{workers} workers: {timing['images_per_second']['median']:7.1f} images/s, "
                  f"{timing['per_worker_images_per_second']:6.1f} per worker")
        for device, ops in case.get("device_ops", {}).items():
            print(f"    batched colour ops on {device}: {ops['ms_per_batch']['median']:.1f} ms per batch of "
                  f"{ops['batch_size']} ({ops['ms_per_image']:.2f} ms per image)")


if __name__ == "__main__":
    main()

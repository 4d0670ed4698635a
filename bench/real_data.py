"""The default pipeline on real photos: Fashion-MNIST at two folder sizes (``make bench-real``).

Run: ``.venv/bin/python -m bench.real_data [--per-class 140 500]``; writes
``reports/bench/real_data.json`` (rendered into ``reports/bench.md``). For each
size it writes an ImageNet-layout folder (10 clothing classes, ``per_class``
train images and :data:`VAL_PER_CLASS` val images each, the 28 px grey photos
upsampled to :data:`IMAGE_SIZE` px RGB), then runs every stage from ``shard`` to
``metrics`` in a scratch copy of the workspace, with ``params.yaml`` changed only
in ``data.source`` and ``data.root``, as a user pointing the pipeline at their
own folder would. Not part of ``make test``: ~6 minutes a size on 2 cores.

The images come from Debian's ``dataset-fashion-mnist`` package (70,000 images,
its four IDX files under :data:`DATASET_DIR`); the bench installs it with
apt-get where it may, and otherwise says in one line how to.
"""
from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

from bench.learning_curve import run_stages
from bench.machine import machine_info

OUTPUT = Path("reports/bench/real_data.json")
DATASET_DIR = Path("/usr/share/datasets/fashion-mnist")
PACKAGE = "dataset-fashion-mnist"
CLASSES = ("t-shirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot")
VAL_PER_CLASS = 50
IMAGE_SIZE = 48  # the 28 px photos upsampled, so the default 32 px global crops take a real crop of them
SIZES = (140, 500)
STAGES = ("shard", "pretrain", "extract", "knn", "fewshot", "linear", "linear_sgd", "finetune", "metrics")
IDX_DTYPES = {0x08: np.uint8}


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzip or not) as an array: ``(N, 28, 28)`` uint8 images or ``(N,)`` uint8 labels."""
    raw = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    if len(raw) < 4 or raw[0] or raw[1] or raw[2] not in IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file of unsigned bytes")
    dims = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    data = np.frombuffer(raw, dtype=IDX_DTYPES[raw[2]], offset=4 + 4 * dims)
    if data.size != math.prod(shape):
        raise ValueError(f"{path}: header says {shape}, holds {data.size} values")
    return data.reshape(shape)


def ensure_dataset(directory: Path = DATASET_DIR) -> Path:
    """``directory`` holding the four Fashion-MNIST IDX files, installing the Debian package if it may."""
    names = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
    if all((directory / n).is_file() for n in names):
        return directory
    if directory == DATASET_DIR and shutil.which("apt-get") and os.geteuid() == 0:
        print(f"real_data: installing {PACKAGE} with apt-get", flush=True)
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", PACKAGE], check=False,
                       stdout=subprocess.DEVNULL)
        if all((directory / n).is_file() for n in names):
            return directory
    raise SystemExit(f"real_data: Fashion-MNIST is not in {directory}; install it with "
                     f"`sudo apt-get install {PACKAGE}` or pass --dataset DIR holding {', '.join(names)}")


def first_per_class(labels: np.ndarray, per_class: int, classes: int) -> np.ndarray:
    """Indices of the first ``per_class`` images of each class, in file order: ``(classes * per_class,)``."""
    picked = [np.flatnonzero(labels == c)[:per_class] for c in range(classes)]
    short = [c for c, p in enumerate(picked) if len(p) < per_class]
    if short:
        raise ValueError(f"classes {short} have fewer than {per_class} images")
    return np.concatenate(picked)


def write_imagefolder(root: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]], per_class: dict[str, int],
                      class_names: tuple[str, ...] = CLASSES, size: int = IMAGE_SIZE) -> dict[str, int]:
    """``root/<split>/<class>/<index>.png`` from grey ``(N, H, W)`` uint8 images and ``(N,)`` labels.

    Takes the first ``per_class[split]`` images of each class, upsamples them
    (bicubic) to ``size`` px and stores RGB PNGs; returns the count per split.
    """
    counts = {}
    for split, (images, labels) in splits.items():
        chosen = first_per_class(labels, per_class[split], len(class_names))
        for index in chosen:
            folder = root / split / class_names[int(labels[index])]
            folder.mkdir(parents=True, exist_ok=True)
            image = Image.fromarray(images[index], mode="L").resize((size, size), Image.BICUBIC).convert("RGB")
            image.save(folder / f"{int(index):05d}.png")
        counts[split] = len(chosen)
    return counts


def run_size(per_class: int, dataset: Path, params: dict[str, Any], scratch: Path) -> dict[str, Any]:
    """Write the folder, run the pipeline under ``params`` in ``scratch``; the row of the results table."""
    folder = scratch / "images"
    counts = write_imagefolder(folder, {
        "train": (read_idx(dataset / "train-images-idx3-ubyte.gz"), read_idx(dataset / "train-labels-idx1-ubyte.gz")),
        "val": (read_idx(dataset / "t10k-images-idx3-ubyte.gz"), read_idx(dataset / "t10k-labels-idx1-ubyte.gz")),
    }, {"train": per_class, "val": VAL_PER_CLASS})
    params = json.loads(json.dumps(params))
    params["data"]["source"], params["data"]["root"] = "imagefolder", str(folder)
    start = time.perf_counter()
    run_stages(params, Path(), scratch / "work", stages=STAGES)
    minutes = (time.perf_counter() - start) / 60
    return {"per_class": per_class, "train_images": counts["train"], "val_images": counts["val"],
            **headline_row(scratch / "work", params), "minutes": minutes}


def headline_row(work: Path, params: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers of a finished pipeline in ``work``: each measure pre-trained / random init (/ pixels)."""
    metrics = json.loads((work / "reports" / "metrics.json").read_text())
    training = json.loads((work / "reports" / "pretrain" / "metrics.json").read_text())
    random_init, pixels = metrics["baselines"]["random_init"], metrics["baselines"]["pixels"]
    shot = str(max(int(s) for s in metrics["fewshot"]))
    return {
        "steps": training["steps"], "epochs": training["epochs"],
        "knn": {"pretrained": metrics["knn"]["20"], "random_init": random_init["knn"]["20"], "pixels": pixels["knn"]["20"]},
        "linear": {"pretrained": metrics["linear"]["top1"], "random_init": random_init["linear"]["top1"]},
        "finetune": {"pretrained": metrics["finetune"]["top1"], "random_init": random_init["finetune"]["top1"]},
        "fewshot": {"shots": int(shot), "pretrained": metrics["fewshot"][shot], "random_init": random_init["fewshot"][shot]},
        "final_loss_cls": training["final_loss_cls"], "uniform_loss": math.log(params["model"]["out_dim"]),
        "margins": metrics["margins"],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--dataset", type=Path, default=DATASET_DIR)
    parser.add_argument("--out", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    dataset = ensure_dataset(args.dataset)
    params = yaml.safe_load(Path("params.yaml").read_text())
    rows = []
    for per_class in args.per_class:
        with tempfile.TemporaryDirectory(prefix=f"real_data_{per_class}_", ignore_cleanup_errors=True) as scratch:
            row = run_size(per_class, dataset, params, Path(scratch))
        rows.append(row)
        print(f"  {per_class} per class ({row['train_images']} images, {row['steps']} steps, {row['minutes']:.1f} min): "
              f"k-NN {row['knn']['pretrained']:.1f} / random init {row['knn']['random_init']:.1f} / "
              f"pixels {row['knn']['pixels']:.1f}", flush=True)
    report = {"machine": machine_info(), "dataset": "Fashion-MNIST (Debian dataset-fashion-mnist)", "image_size": IMAGE_SIZE,
              "val_per_class": VAL_PER_CLASS, "seed": params["seed"], "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()

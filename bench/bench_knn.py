"""Weighted k-NN at ImageNet scale: time and peak memory of :func:`pipeline.evaluation.knn.weighted_knn`.

Run: ``.venv/bin/python -m bench.bench_knn [--quick] [--device cuda]``; writes
``reports/bench/knn.json`` (``knn_cuda.json`` on CUDA, ``--out`` to change).

Synthetic features shaped like ViT-S/16 [CLS] features on ImageNet-1k: 1.28M x 384
float32 train rows (~2 GB), 1000 classes, Gaussian clusters so neighbours are not
uniform noise. Scoring all 50k val rows would take tens of minutes on a laptop
CPU, so each case scores a val subset and the 50k figure is a linear
extrapolation (the cost is per val row: one chunk of similarities, one top-k).
``--quick`` uses 100k train rows and 100 classes.

Peak memory is the growth of the resident set over its level before the call,
measured by resetting the kernel's high-water mark (``/proc/self/clear_refs``);
the features themselves are allocated before and not counted. On CUDA the
features are moved to the GPU first (the copy is not timed), all 50k val rows
are scored (no extrapolation), and memory is the caching allocator's peak.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from bench.machine import machine_info
from pipeline.core.seeding import make_generator
from pipeline.evaluation.knn import weighted_knn
from bench.memory import PeakMemory

OUTPUT = Path("reports/bench/knn.json")
DIM = 384
FULL_VAL = 50_000
SIZES = {
    "full": {"train": 1_281_167, "classes": 1000},
    "quick": {"train": 100_000, "classes": 100},
}
# (name, ks, chunk_size, val rows): the pipeline's default call (all ks at once, chunk
# 1024), then k=20 and k=200 alone at chunk 256 to show what top-k and the chunk cost
CASES = {
    "full": [("k20+k200 chunk1024", (20, 200), 1024, 2048), ("k20 chunk256", (20,), 256, 512), ("k200 chunk256", (200,), 256, 512)],
    "quick": [("k20+k200 chunk1024", (20, 200), 1024, 2048), ("k20 chunk256", (20,), 256, 1024), ("k200 chunk256", (200,), 256, 1024)],
    "cuda": [("k20+k200 chunk1024", (20, 200), 1024, FULL_VAL), ("k20 chunk256", (20,), 256, FULL_VAL)],
}


def synthetic_features(rows: int, classes: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, DIM) float32 Gaussian clusters and their (rows,) labels, seeded by ``name``."""
    centres = torch.randn(classes, DIM, generator=make_generator("bench_knn", "centres"))
    labels = torch.randint(0, classes, (rows,), generator=make_generator("bench_knn", name, "labels"))
    features = torch.empty(rows, DIM)
    noise = make_generator("bench_knn", name, "noise")
    step = 65_536  # filled in slices: no second full-size temporary
    for start in range(0, rows, step):
        block = features[start : start + step]
        block.normal_(generator=noise).mul_(1.5).add_(centres[labels[start : start + step]])
    return features, labels


def time_case(train: torch.Tensor, train_labels: torch.Tensor, val: torch.Tensor, val_labels: torch.Tensor,
              ks: tuple[int, ...], chunk_size: int) -> dict[str, Any]:
    """Seconds, seconds per val row and peak extra memory of one ``weighted_knn`` call (on the features' device)."""
    device = train.device
    with PeakMemory(device) as memory:
        start = time.perf_counter()
        result = weighted_knn(train, train_labels, val, val_labels, ks, chunk_size=chunk_size, device=device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    peak = memory.result()
    return {
        "seconds": seconds,
        "ms_per_val_row": 1000 * seconds / len(val),
        "extrapolated_50k_val_seconds": seconds * FULL_VAL / len(val),
        "peak_extra_mib": peak["growth_mib"],
        "peak_measure": peak["method"],
        "similarity_chunk_mib": chunk_size * len(train) * 4 / 2**20,
        "top1": result["top1"],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Benchmark the cases of the chosen size; print a table and write the JSON report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100k train rows instead of 1.28M")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_known_args(argv)[0]
    device = torch.device(args.device)
    size = "quick" if args.quick else "full"
    config = SIZES[size]
    case_list = CASES["cuda"] if device.type == "cuda" and not args.quick else CASES[size]
    output = args.out or (OUTPUT if device.type == "cpu" else OUTPUT.with_name("knn_cuda.json"))
    start = time.perf_counter()
    train, train_labels = synthetic_features(config["train"], config["classes"], "train")
    max_val = max(case[3] for case in case_list)
    val, val_labels = synthetic_features(max_val, config["classes"], "val")
    train, train_labels, val, val_labels = (t.to(device) for t in (train, train_labels, val, val_labels))
    setup_seconds = time.perf_counter() - start
    cases = {}
    for name, ks, chunk_size, rows in case_list:
        cases[name] = {"ks": list(ks), "chunk_size": chunk_size, "val_rows": rows,
                       **time_case(train, train_labels, val[:rows], val_labels[:rows], ks, chunk_size)}
    report = {
        "size": size,
        "train_rows": config["train"],
        "dim": DIM,
        "classes": config["classes"],
        "train_mib": train.numel() * 4 / 2**20,
        "extrapolated_to_val_rows": FULL_VAL,
        "setup_seconds": setup_seconds,
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": machine_info(),
        "processor": platform.processor(),
        "cases": cases,
    }
    print(f"weighted k-NN, {config['train']} x {DIM} train ({report['train_mib']:.0f} MiB), "
          f"{config['classes']} classes, {device}, {torch.get_num_threads()} threads")
    for name, case in cases.items():
        print(f"  {name:<20} {case['val_rows']:>5} val rows {case['seconds']:7.1f} s  "
              f"{case['ms_per_val_row']:6.2f} ms/row  -> {FULL_VAL} rows {case['extrapolated_50k_val_seconds'] / 60:6.1f} min  "
              f"peak +{case['peak_extra_mib']:.0f} MiB (similarity chunk {case['similarity_chunk_mib']:.0f} MiB)")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()

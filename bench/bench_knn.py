"""Weighted k-NN at ImageNet scale on CPU: time and peak memory of :func:`pipeline.evaluation.weighted_knn`.

Run: ``.venv/bin/python -m bench.bench_knn [--quick]``; writes ``reports/bench/knn.json``.

Synthetic features shaped like ViT-S/16 [CLS] features on ImageNet-1k: 1.28M x 384
float32 train rows (~2 GB), 1000 classes, Gaussian clusters so neighbours are not
uniform noise. Scoring all 50k val rows would take tens of minutes on a laptop
CPU, so each case scores a val subset and the 50k figure is a linear
extrapolation (the cost is per val row: one chunk of similarities, one top-k).
``--quick`` uses 100k train rows and 100 classes.

Peak memory is the growth of the resident set over its level before the call,
measured by resetting the kernel's high-water mark (``/proc/self/clear_refs``);
the features themselves are allocated before and not counted.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path
from typing import Any

import torch

from pipeline.evaluation import weighted_knn
from pipeline.seeding import make_generator

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


def _memory_kib() -> tuple[int, int]:
    """(current RSS, peak RSS since the last reset) in KiB, from /proc/self/status."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS", "VmHWM")):
            key, value = line.split(":")
            fields[key] = int(value.split()[0])
    return fields["VmRSS"], fields["VmHWM"]


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := VmRSS
        return True
    except OSError:
        return False


def time_case(train: torch.Tensor, train_labels: torch.Tensor, val: torch.Tensor, val_labels: torch.Tensor,
              ks: tuple[int, ...], chunk_size: int) -> dict[str, Any]:
    """Seconds, seconds per val row and peak extra memory of one ``weighted_knn`` call."""
    exact = _reset_peak()
    before_rss, _ = _memory_kib()
    before_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    result = weighted_knn(train, train_labels, val, val_labels, ks, chunk_size=chunk_size)
    seconds = time.perf_counter() - start
    _, peak = _memory_kib()
    extra_kib = peak - before_rss if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before_maxrss
    return {
        "seconds": seconds,
        "ms_per_val_row": 1000 * seconds / len(val),
        "extrapolated_50k_val_seconds": seconds * FULL_VAL / len(val),
        "peak_extra_mib": extra_kib / 1024,
        "peak_measure": "VmHWM reset" if exact else "ru_maxrss delta (a lower bound)",
        "similarity_chunk_mib": chunk_size * len(train) * 4 / 2**20,
        "top1": result["top1"],
    }


def main() -> dict[str, Any]:
    """Benchmark the cases of the chosen size; print a table and write the JSON report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100k train rows instead of 1.28M")
    size = "quick" if parser.parse_known_args()[0].quick else "full"
    config = SIZES[size]
    start = time.perf_counter()
    train, train_labels = synthetic_features(config["train"], config["classes"], "train")
    max_val = max(case[3] for case in CASES[size])
    val, val_labels = synthetic_features(max_val, config["classes"], "val")
    setup_seconds = time.perf_counter() - start
    cases = {}
    for name, ks, chunk_size, rows in CASES[size]:
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
        "device": "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cases": cases,
    }
    print(f"weighted k-NN, {config['train']} x {DIM} train ({report['train_mib']:.0f} MiB), "
          f"{config['classes']} classes, cpu, {torch.get_num_threads()} threads")
    for name, case in cases.items():
        print(f"  {name:<20} {case['val_rows']:>5} val rows {case['seconds']:7.1f} s  "
              f"{case['ms_per_val_row']:6.2f} ms/row  -> {FULL_VAL} rows {case['extrapolated_50k_val_seconds'] / 60:6.1f} min  "
              f"peak +{case['peak_extra_mib']:.0f} MiB (similarity chunk {case['similarity_chunk_mib']:.0f} MiB)")
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()

"""Time per call of each masking strategy (batch 64 on 8x8 and 14x14 grids).

Run: ``.venv/bin/python -m bench.bench_masking``; writes ``reports/bench/masking.json``.
AttMask must cost (almost) nothing over random masking (docs/method.md, "Masks"), so
the report also gives each strategy's overhead over ``random`` in microseconds.
"""
from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import torch

from bench.machine import machine_info
from pipeline.core.config import MaskingConfig
from pipeline.core.seeding import make_generator
from pipeline.core.strategies import MASKING_STRATEGIES
from pipeline.method.masking import generate_masks

BATCH = 64
GRIDS = ((8, 8), (14, 14))
REPEATS = 200
WARMUP = 20
OUTPUT = Path("reports/bench/masking.json")


def time_strategy(strategy: str, grid: tuple[int, int], device: torch.device) -> dict[str, float]:
    """Median / p10 / p90 seconds per ``generate_masks`` call (default config: ratio 0.3 +- 0.2, prob 0.5)."""
    config = MaskingConfig(strategy=strategy)
    num_patches = grid[0] * grid[1]
    attention = torch.rand(BATCH, num_patches, generator=make_generator("bench", "attention")).softmax(dim=1)
    attention = attention.to(device) if strategy.startswith("attmask") else None
    times = []
    for i in range(WARMUP + REPEATS):
        generator = make_generator("bench", i)  # a fresh generator per call, as in training
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        masks = generate_masks(config, BATCH, grid, generator, attention)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= WARMUP:
            times.append(time.perf_counter() - start)
        del masks
    deciles = statistics.quantiles(times, n=10)
    return {"median_s": statistics.median(times), "p10_s": deciles[0], "p90_s": deciles[-1]}


def main() -> dict:
    """Benchmark every strategy on every grid; print a table and write the JSON report."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results: dict[str, dict[str, dict[str, float]]] = {}
    for height, width in GRIDS:
        key = f"{height}x{width}"
        results[key] = {s: time_strategy(s, (height, width), device) for s in MASKING_STRATEGIES}
        base = results[key]["random"]["median_s"]
        for timing in results[key].values():
            timing["over_random_us"] = (timing["median_s"] - base) * 1e6
    report = {
        "batch_size": BATCH,
        "repeats": REPEATS,
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": machine_info(),
        "processor": platform.processor(),
        "config": "ratio 0.3 +- 0.2, prob 0.5, show_max 0.1 (MaskingConfig defaults)",
        "per_call": results,
    }
    print(f"masking, batch {BATCH}, {device}, {torch.get_num_threads()} threads: median us per call (p10-p90)")
    for grid, timings in results.items():
        for strategy, t in timings.items():
            print(
                f"  {grid:>6} {strategy:<13} {t['median_s'] * 1e6:9.1f}  "
                f"({t['p10_s'] * 1e6:.1f}-{t['p90_s'] * 1e6:.1f})  over random {t['over_random_us']:+8.1f}"
            )
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()

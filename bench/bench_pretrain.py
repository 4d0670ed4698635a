"""Pre-training step time per masking strategy, as ratios to `random` measured in one run.

    .venv/bin/python -m bench.bench_pretrain [--rounds 15] [--batch 64]

Builds one :class:`pipeline.training.Pretrainer` per strategy on the embedded
configuration (params.yaml's model, crops and batch), feeds every one the same
fixed batch of crops, and times `train_step` in interleaved rounds (strategy
order rotated each round) so machine noise hits all strategies alike. The
AttMask overhead is the ratio of its median step time to random's.
Writes ``reports/bench/pretrain_step.json``.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from pipeline.config import MASKING_STRATEGIES, load_params, params_from_dict, params_to_dict
from pipeline.data import build_shards
from pipeline.distributed import DistContext
from pipeline.training import Pretrainer, PretrainPaths, configure_determinism

REPORT = Path("reports/bench/pretrain_step.json")


def make_trainers(batch: int, workdir: Path) -> dict[str, Pretrainer]:
    base = params_to_dict(load_params("params.yaml"))
    base["pretrain"]["batch_size"] = batch
    base["data"]["synthetic"]["train_per_class"] = max(2, -(-batch // base["data"]["synthetic"]["num_classes"]))
    base["data"]["synthetic"]["val_per_class"] = 1
    from pipeline.synthetic import generate_dataset

    params = params_from_dict(base)
    folder = workdir / "images"
    generate_dataset(folder, params.data.synthetic, params.seed, progress=False)
    base["data"].update(source="imagefolder", root=str(folder))
    params = params_from_dict(base)
    build_shards(params.data, params.seed, workdir / "shards", progress=False)
    trainers = {}
    for strategy in MASKING_STRATEGIES:
        base["masking"]["strategy"] = strategy
        paths = PretrainPaths.under(workdir / "shards", workdir / strategy, workdir / strategy)
        trainers[strategy] = Pretrainer(params_from_dict(base), paths, torch.device("cpu"), DistContext(), progress_bar=False)
    return trainers


def fixed_crops(trainer: Pretrainer) -> list[torch.Tensor]:
    config = trainer.params.augment
    generator = torch.Generator().manual_seed(0)
    batch = trainer.local_batch
    crops = [torch.randn(batch, 3, config.global_size, config.global_size, generator=generator) for _ in range(2)]
    crops += [torch.randn(batch, 3, config.local_size, config.local_size, generator=generator) for _ in range(config.local_number)]
    return crops


def measure(trainers: dict[str, Pretrainer], rounds: int, warmup: int = 2) -> dict[str, list[float]]:
    crops = fixed_crops(next(iter(trainers.values())))
    times: dict[str, list[float]] = {s: [] for s in trainers}
    names = list(trainers)
    for round_index in range(warmup + rounds):
        order = names[round_index % len(names):] + names[: round_index % len(names)]
        for strategy in order:
            start = time.perf_counter()
            trainers[strategy].train_step(crops, epoch=0, step=0)  # same step: identical work each round
            elapsed = time.perf_counter() - start
            if round_index >= warmup:
                times[strategy].append(elapsed)
    return times


def main(rounds: int = 15, batch: int | None = None) -> dict[str, Any]:
    configure_determinism()
    batch = batch or load_params("params.yaml").pretrain.batch_size
    with tempfile.TemporaryDirectory() as tmp:
        trainers = make_trainers(batch, Path(tmp))
        times = measure(trainers, rounds)
    median = {s: statistics.median(t) for s, t in times.items()}
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__},
        "config": {"batch_size": batch, "rounds": rounds},
        "median_step_seconds": median,
        "images_per_second": {s: batch / m for s, m in median.items()},
        "ratio_to_random": {s: m / median["random"] for s, m in median.items()},
        "attmask_overhead_percent": {
            s: 100.0 * (median[s] / median["random"] - 1.0) for s in median if s.startswith("attmask")
        },
    }
    print(f"pretrain step, batch {batch}, {rounds} interleaved rounds, {torch.get_num_threads()} threads")
    for strategy in median:
        print(f"  {strategy:13s} {median[strategy] * 1000:8.1f} ms  {batch / median[strategy]:7.1f} img/s  "
              f"x{result['ratio_to_random'][strategy]:.3f} of random")
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--batch", type=int, default=None)
    arguments = parser.parse_args()
    main(arguments.rounds, arguments.batch)

"""Pre-training step per masking strategy: images/s, peak memory, FLOPs and MFU, AttMask's overhead.

    .venv/bin/python -m bench.bench_pretrain [--cases embedded vit_s16_multicrop] [--rounds 10] [--batch-vit 4]

Two cases: ``embedded`` (params.yaml as it is: the CPU default) and
``vit_s16_multicrop``, the paper's setting (ViT-S/16 at 224 px, 2 global + 10
local 96 px crops, iBOT head with 8192 prototypes). Per case one
:class:`pipeline.method.training.Pretrainer` per strategy is fed the same fixed
random crops, and ``train_step`` is timed in interleaved rounds (strategy order
rotated each round) so machine noise hits all strategies alike; AttMask's
overhead is the per-round ratio of its step time to ``random``'s, summarised
over rounds. Each strategy's first warm-up step runs under torch's FLOP
counter (see :mod:`bench.flops`); MFU is counted FLOPs per step over the median
step time, divided by the device peak: the datasheet bf16 figure on a known
GPU (:func:`bench.machine.device_peak`), on CPU a float32 matmul timed once in
every round of the same interleaved run, so that it sees the same load.

Memory: on CUDA the caching allocator's peak during a step on top of what was
allocated before, plus the trainer's own tensors (weights, gradients, AdamW
state). On CPU one fresh process trains one strategy for two steps and reports
its peak resident set (VmHWM), which is what a real run needs.

Writes ``reports/bench/pretrain_step.json`` (``--out`` to change).
"""
from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipeline.core.config import load_params, params_from_dict, params_to_dict
from pipeline.core.distributed import DistContext
from pipeline.core.seeding import configure_determinism
from pipeline.core.strategies import MASKING_STRATEGIES
from pipeline.data.shard_writer import build_shards
from pipeline.method.training import Pretrainer, PretrainPaths
from bench.flops import NetworkDims, analytic_step_flops, count_train_step, mfu
from bench.machine import MatmulProbe, device_peak, machine_info, measure_matmul_tflops
from bench.memory import PeakMemory, rss_kib, reset_rss_peak, tensor_mib
from bench.stats import summarize

REPORT = Path("reports/bench/pretrain_step.json")
VIT_S16 = {"arch": "vit_small_patch16_224", "patch_size": 16, "img_size": 224, "depth": 12, "embed_dim": 384,
           "num_heads": 6, "out_dim": 8192, "head_hidden_dim": 2048, "head_bottleneck_dim": 256}
CASES: dict[str, dict[str, dict[str, Any]]] = {
    "embedded": {},
    "vit_s16_multicrop": {"model": VIT_S16, "augment": {"global_size": 224, "local_size": 96, "local_number": 10}},
}
CPU_BATCH = {"embedded": None, "vit_s16_multicrop": 4}  # None: params.yaml's pretrain.batch_size


def case_params(case: str, batch: int | None = None, params_file: str = "params.yaml", **pretrain: Any) -> dict[str, Any]:
    """params.yaml as a dict with the case's overrides, the batch and extra ``pretrain`` keys applied."""
    raw = params_to_dict(load_params(params_file))
    for section, values in CASES[case].items():
        raw[section].update(copy.deepcopy(values))
    if batch is not None:
        raw["pretrain"]["batch_size"] = batch
    raw["pretrain"].update(pretrain)
    return raw


def write_noise_shards(raw: dict[str, Any], workdir: Path, images: int) -> dict[str, Any]:
    """Shards of ``images`` tiny noise PNGs (the step bench feeds fixed crops; it only needs the split's size)."""
    rng = np.random.default_rng(0)
    root = workdir / "images"
    per_class = -(-images // 2)
    for split, count in (("train", per_class), ("val", 1)):
        for c in range(2):
            folder = root / split / f"c{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")
    raw = copy.deepcopy(raw)
    raw["data"].update(source="imagefolder", root=str(root), per_class=None, percent=None)
    params = params_from_dict(raw)
    build_shards(params.data, params.seed, workdir / "shards", progress=False)
    return raw


def build_trainers(raw: dict[str, Any], strategies: list[str], workdir: Path, device: torch.device) -> dict[str, Pretrainer]:
    """One Pretrainer per strategy, identical apart from ``masking.strategy`` (same seed: same initial weights)."""
    raw = write_noise_shards(raw, workdir, raw["pretrain"]["batch_size"])
    trainers = {}
    for strategy in strategies:
        variant = copy.deepcopy(raw)
        variant["masking"]["strategy"] = strategy
        paths = PretrainPaths.under(workdir / "shards", workdir / strategy, workdir / strategy)
        trainers[strategy] = Pretrainer(params_from_dict(variant), paths, device, DistContext(), progress_bar=False)
    return trainers


def fixed_crops(trainer: Pretrainer, device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """2 global + ``local_number`` local crops of random pixels, already on ``device`` (the step alone is timed)."""
    config = trainer.params.augment
    generator = torch.Generator().manual_seed(0)
    batch = trainer.local_batch
    sizes = [config.global_size] * 2 + [config.local_size] * config.local_number
    return [torch.randn(batch, 3, s, s, generator=generator).to(device) for s in sizes]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(trainers: dict[str, Pretrainer], crops: list[torch.Tensor], rounds: int, warmup: int,
                     steps_per_sample: int, device: torch.device, count_flops: bool = True,
                     probe: MatmulProbe | None = None) -> dict[str, Any]:
    """Seconds per step per strategy (one sample = ``steps_per_sample`` steps between syncs), FLOPs, memory.

    With a ``probe``, one matmul sample is taken in every round too, so the peak
    that MFU divides by is measured under the same load as the steps.
    """
    names = list(trainers)
    times: dict[str, list[float]] = {s: [] for s in names}
    peak_samples: list[float] = []
    flops: dict[str, dict[str, Any]] = {}
    growth: dict[str, float] = dict.fromkeys(names, 0.0)
    for s in names:  # the first warm-up step of each strategy is the counted one (the counter slows it)
        if count_flops:
            flops[s] = count_train_step(trainers[s], crops)
    for round_index in range(warmup + rounds):
        shift = round_index % len(names)
        for strategy in names[shift:] + names[:shift]:
            trainer = trainers[strategy]
            with PeakMemory(device) as peak:
                _sync(device)
                start = time.perf_counter()
                for _ in range(steps_per_sample):
                    trainer.train_step(crops, epoch=0, step=0)  # same step every time: identical work
                _sync(device)
                elapsed = (time.perf_counter() - start) / steps_per_sample
            if round_index >= warmup:
                times[strategy].append(elapsed)
                growth[strategy] = max(growth[strategy], peak.result()["growth_mib"])
        if probe is not None and round_index >= warmup:
            peak_samples.append(probe())
    return {"times": times, "flops": flops, "growth_mib": growth, "peak_samples": peak_samples}


def ratios_to(times: dict[str, list[float]], reference: str) -> dict[str, dict[str, float]]:
    """Per-round ratio of each strategy's step time to ``reference``'s, summarised."""
    base = times[reference]
    return {s: summarize([a / b for a, b in zip(t, base)]) for s, t in times.items()}


def run_case(case: str, batch: int | None, rounds: int, device: torch.device, strategies: list[str] | None = None,
             warmup: int = 1, steps_per_sample: int = 1, peak: dict[str, Any] | None = None,
             memory_probe: bool = True, **pretrain: Any) -> dict[str, Any]:
    """Everything bench.md reports for one case on one device."""
    configure_determinism()
    strategies = strategies or list(MASKING_STRATEGIES)
    raw = case_params(case, batch, **pretrain)
    batch = raw["pretrain"]["batch_size"]
    # CPU: no datasheet peak means anything on a shared VM; a matmul timed in every round is the practical peak
    probe = MatmulProbe(device) if device.type == "cpu" and peak is None else None
    if device.type == "cuda" and peak is None:
        peak = device_peak(device, measure_matmul_tflops(device, torch.bfloat16, size=8192))
    with tempfile.TemporaryDirectory(prefix="bench_pretrain_") as tmp:
        trainers = build_trainers(raw, strategies, Path(tmp), device)
        crops = fixed_crops(next(iter(trainers.values())), device)
        measured = time_interleaved(trainers, crops, rounds, warmup, steps_per_sample, device, probe=probe)
        if probe is not None:
            matmul = probe.describe(measured["peak_samples"])
            peak = {"tflops": matmul["tflops"]["median"], "dtype": "float32", "matmul": matmul,
                    "source": f"float32 {probe.size}^3 matmul timed in every round of this run, median, "
                              f"{matmul['threads']} threads"}
        first = next(iter(trainers.values()))
        dims = NetworkDims.of(first.student_module)
        state = {s: tensor_mib(t.student_module, t.teacher, t.optimizer, t.loss) for s, t in trainers.items()}
        augment = first.params.augment
        del trainers, first
    result: dict[str, Any] = {
        "config": {"batch_size": batch, "rounds": rounds, "warmup_rounds": warmup, "steps_per_sample": steps_per_sample,
                   "device": str(device), "autocast": "bfloat16" if device.type == "cuda" else "none (float32)",
                   "model": raw["model"], "global_size": augment.global_size, "local_size": augment.local_size,
                   "local_number": augment.local_number, "strategies": strategies,
                   "compile": raw["pretrain"].get("compile", False), "fused_adamw": raw["pretrain"].get("fused_adamw"),
                   "deterministic_algorithms": True},
        "peak": peak,
        "strategies": {},
    }
    for s in strategies:
        step = summarize(measured["times"][s])
        analytic = analytic_step_flops(dims, batch, augment.global_size, augment.local_size, augment.local_number,
                                       cls_attention=s.startswith("attmask"))
        counted = measured["flops"].get(s, {}).get("total")
        flops = counted or analytic["total"]
        entry = {
            "step_seconds": step,
            "images_per_second": batch / step["median"],
            "flops_per_step": counted,
            "flops_by_op": measured["flops"].get(s, {}).get("by_op"),
            "analytic_flops_per_step": analytic,
            "counted_over_analytic": counted / analytic["total"] if counted else None,
            "achieved_tflops": flops / step["median"] / 1e12,
            "mfu": mfu(flops, step["median"], peak["tflops"]),
            "state_mib": state[s],
        }
        if device.type == "cuda":
            entry["memory"] = {"step_growth_mib": measured["growth_mib"][s],
                               "training_peak_mib": state[s] + measured["growth_mib"][s],
                               "method": "torch.cuda.max_memory_allocated during a step + this trainer's tensors"}
        result["strategies"][s] = entry
    if "random" in strategies:
        ratios = ratios_to(measured["times"], "random")
        result["ratio_to_random"] = ratios
        result["attmask_overhead_percent"] = {s: 100.0 * (r["median"] - 1.0) for s, r in ratios.items() if s.startswith("attmask")}
    if memory_probe and device.type == "cpu":
        result["memory"] = probe_in_fresh_process(case, batch, "attmask_high" if "attmask_high" in strategies else strategies[0])
    return result


def _probe(case: str, batch: int, strategy: str) -> dict[str, Any]:
    """In a fresh process: build one trainer, take two steps, report RSS before and at the peak."""
    configure_determinism()
    with tempfile.TemporaryDirectory(prefix="bench_memory_") as tmp:
        trainers = build_trainers(case_params(case, batch), [strategy], Path(tmp), torch.device("cpu"))
        trainer = trainers[strategy]
        crops = fixed_crops(trainer)
        exact = reset_rss_peak()
        before = rss_kib()[0] / 1024
        for _ in range(2):
            trainer.train_step(crops, epoch=0, step=0)
        peak = rss_kib()[1] / 1024
        state = tensor_mib(trainer.student_module, trainer.teacher, trainer.optimizer, trainer.loss)
    return {"strategy": strategy, "rss_before_steps_mib": before, "peak_rss_mib": peak, "step_growth_mib": peak - before,
            "state_mib": state, "method": "VmHWM of a fresh process training one strategy for two steps"
            + ("" if exact else " (VmHWM could not be reset: includes setup)")}


def probe_in_fresh_process(case: str, batch: int, strategy: str) -> dict[str, Any]:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_probe, (case, batch, strategy))


def print_case(case: str, result: dict[str, Any]) -> None:
    config = result["config"]
    print(f"pretrain step, {case}, batch {config['batch_size']}, {config['device']}, {config['rounds']} rounds; "
          f"peak {result['peak']['tflops']:.2f} TFLOP/s ({result['peak']['source']})")
    for s, entry in result["strategies"].items():
        ratio = result.get("ratio_to_random", {}).get(s, {}).get("median", float("nan"))
        print(f"  {s:13s} {entry['step_seconds']['median'] * 1000:9.1f} ms  {entry['images_per_second']:8.1f} img/s  "
              f"{entry['achieved_tflops']:7.3f} TFLOP/s  MFU {100 * entry['mfu']:5.1f}%  x{ratio:.3f} of random")
    if "memory" in result:
        print(f"  memory: peak RSS {result['memory']['peak_rss_mib']:.0f} MiB ({result['memory']['method']})")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 10 embedded, 3 ViT-S on CPU)")
    parser.add_argument("--batch-embedded", type=int, default=CPU_BATCH["embedded"])
    parser.add_argument("--batch-vit", type=int, default=CPU_BATCH["vit_s16_multicrop"])
    parser.add_argument("--strategies", nargs="+", default=list(MASKING_STRATEGIES), choices=list(MASKING_STRATEGIES))
    parser.add_argument("--out", type=Path, default=REPORT)
    args = parser.parse_args(argv)
    device = torch.device("cpu")
    report: dict[str, Any] = {"machine": machine_info(), "cases": {}}
    for case in args.cases:
        batch = args.batch_embedded if case == "embedded" else args.batch_vit
        rounds = args.rounds or (10 if case == "embedded" else 3)
        report["cases"][case] = run_case(case, batch, rounds, device, args.strategies)
        print_case(case, report["cases"][case])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    return report


if __name__ == "__main__":
    main()

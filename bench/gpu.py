"""The GPU harness: the CUDA determinism alerts, every GPU figure of reports/bench.md and the bf16 check, in one command.

    bash bench/gpu.sh [part ...]              # on a CUDA machine: the first call, <= 8 min (sizes below)
    BENCH_GPU_WALL_S=0 bash bench/gpu.sh --full   # no time limit: the full repeat counts (12-15 min)
    .venv/bin/python -m bench.gpu --dry-run   # here, on CPU, tiny sizes: exercises every part before GPU time is spent

On your own CUDA machine: ``make install`` (or any Python >= 3.11 with torch,
timm, webdataset), then ``bash bench/gpu.sh`` from the repository root. It
prints a summary table last and writes, to ``$OUT`` if set, else ``reports/bench/``:
``gpu_alerts.json``, ``gpu_correctness.json``, ``gpu_step.json``, ``gpu_batch.json``,
``gpu_data.json``, ``knn_cuda.json``, ``gpu_compile.json`` and ``gpu.log`` (the
whole output): 8 files. A part that failed writes its file too, holding
``{"error": ...}``.

On a GPU machine with its own Python and torch and no network (e.g. Python
3.12, torch 2.11): run ``make bench-gpu-deps`` where the lock is installed
(build/gpu_site: the pure-Python packages such an image lacks or may hold at
another version), copy the working tree with build/gpu_site there, run
``OUT=<folder> bash bench/gpu.sh`` with a 9-minute limit, and copy ``<folder>``
back into ``reports/bench/``.

Parts, in order (each writes ``<out>/<file>`` as soon as it ends, so a run cut
short keeps what it finished; a part that raises is recorded and the next one
runs; a part that would overrun ``--budget-s`` is skipped and named, run it
again by name; SIGTERM, as bench/gpu.sh's time limit sends it, ends the part
in flight, records it and skips the rest):

* ``alerts`` (gpu_alerts.json): one step of every torch stage
  (:mod:`bench.stage_steps`: pre-training per masking strategy with local
  crops, plus Sinkhorn/KoLeo/batched colour ops; fine-tuning; feature
  extraction; the SGD linear probe; k-NN and few-shot k-NN) under
  ``torch.use_deterministic_algorithms(True, warn_only=True)``, in one pass
  over all stages, every non-determinism alert recorded. Format:
  ``{"alerts": {stage: [message, ...]}, "where": {stage: {message: ["file.py:line"]}},
  "errors": {stage: "Type: message"}, "other_warnings": {stage: [...]},
  "stage_seconds": {stage: s}, "stages": [...], "clean": bool, ...}``; every
  stage is a key of ``alerts``, an empty list when no alert fired (always on CPU).
  ViT-S/16 multi-crop dims at batch 8 on CUDA (the attention kernels the real
  run picks), params.yaml's model on the dry run.
* ``correctness`` (gpu_correctness.json): one ViT-S/16 multi-crop step on the
  same batch and weights, float32 on the CPU vs bf16 autocast on the GPU;
  losses must agree within ``TOLERANCE`` (relative). Drop-path is off (its
  draws differ between CPU and CUDA generators); ``random`` masks are drawn on
  the CPU, so they are identical; AttMask ranks bf16-computed attention, so its
  masks may differ slightly and its line is informative.
* ``step`` (gpu_step.json): the interleaved per-strategy step benchmark of
  :mod:`bench.bench_pretrain` on ViT-S/16 multi-crop at the paper's 64 images
  per GPU, images/s, MFU, memory; then host syncs per step counted with
  ``torch.cuda.set_sync_debug_mode("warn")`` (must be 0) over whole steps, as
  the training loop runs them: the next batch from the loader with
  ``augment.photometric: batched`` (colour ops and the copies to the GPU) and
  the loader-drawn masks, then ``train_step`` (:class:`WholeSteps`).
* ``batch`` (gpu_batch.json): the largest batch that fits: doubling from 64
  until out of memory, then one step between the last fit and the first OOM.
* ``data`` (gpu_data.json): the multi-crop data path with 4 and 16 (``--full``:
  1-16) worker processes on that machine's CPUs (does the loader keep up with the step?).
* ``knn`` (knn_cuda.json): weighted k-NN, 1.28M x 384 train vs all 50k val rows.
* ``compile`` (gpu_compile.json): ``pretrain.compile`` true vs false,
  compile time and steady-state speed-up.

Time budget of the first call on one H200 (:data:`PART_SECONDS`; expected time,
then the allowance a part needs left to start). From bench/flops.py a ViT-S/16
multi-crop step (2 x 224 + 10 x 96 px) is 9.4 TFLOP at batch 64 (1.2 at 8, 150
at 1024, 600 at 4096); the H200's dense bf16 peak is 989 TFLOP/s
(bench/machine.py; ~790 measured on a matmul), so at 25-35 % MFU a batch-64
step takes 35-50 ms:

=========== ======== ========= ======================================================================
part        expected allowance  what dominates
=========== ======== ========= ======================================================================
alerts        ~25 s     60 s   CUDA start and 9 ViT-S/16 set-ups; the batch-8 steps (1.2 TFLOP) take ms
correctness   ~30 s     60 s   the float32 CPU side: 2 strategies x 4 steps of 1.2 TFLOP on 16 cores
step          ~35 s     60 s   5 strategies x 7 rounds x 3 steps (~5 s) + 4 x 7 loader-fed steps + set-ups
batch         ~40 s     75 s   5 steps per batch 64..4096: 127 x 64 images x 5 steps ~ 30 s, or an OOM sooner
data          ~45 s     75 s   4 cases x 512 images x 2 epochs at 4 and 16 workers; 500x375 JPEG decode
knn           ~20 s     45 s   1.33M x 384 synthetic features on the CPU; 2 x 49 TFLOP float32 + top-k
compile      ~120 s    150 s   inductor's first compile of student + teacher (cold cache), 2 x 15 steps
total        ~315 s            budget 440 s (parts skipped past it), bench/gpu.sh's hard wall 460 s
=========== ======== ========= ======================================================================

``--full`` restores the full repeat counts (10 rounds of 5 steps, 5 steps per
batch trial, 1-16 workers; 12-15 min, a 900 s budget).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import signal
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import torch

from pipeline.core.config import params_from_dict
from pipeline.core.distributed import DistContext
from pipeline.core.seeding import configure_determinism
from pipeline.method.training import Pretrainer, PretrainPaths
from bench import bench_data, bench_knn
from bench.bench_pretrain import case_params, fixed_crops, run_case, write_noise_shards
from bench.flops import NetworkDims, analytic_step_flops
from bench.machine import device_peak, machine_info, measure_matmul_tflops
from bench.memory import PeakMemory, tensor_mib
from bench.stage_steps import STAGES, alert_pass
from bench.stats import summarize

PARTS = ("alerts", "correctness", "step", "batch", "data", "knn", "compile")
OUTPUTS = {"alerts": "gpu_alerts.json", "correctness": "gpu_correctness.json", "step": "gpu_step.json",
           "batch": "gpu_batch.json", "data": "gpu_data.json", "knn": "knn_cuda.json", "compile": "gpu_compile.json"}
# seconds a part needs left to start (skipped when fewer remain), on one H200: the first call's sizes (the table of
# the docstring: about 1.5-2x the expected time), and --full's (the former H100 figures, generous)
PART_SECONDS = {"alerts": 60, "correctness": 60, "step": 60, "batch": 75, "data": 75, "knn": 45, "compile": 150}
PART_SECONDS_FULL = {"alerts": 60, "correctness": 60, "step": 90, "batch": 150, "data": 120, "knn": 90, "compile": 300}
BUDGET_S, BUDGET_S_FULL = 440.0, 900.0
ALERT_BATCH, ALERT_IMAGES = 8, 16  # the alert pass: one step of each stage, on 16 noise images
TOLERANCE = 1e-2  # relative loss difference, bf16 autocast vs float32 (bf16 rounding: 1e-3 to 1e-2)
CASE = "vit_s16_multicrop"


class Settings:
    """Sizes for a real GPU run (the first call's, or ``full``), or tiny ones for the CPU dry run."""

    def __init__(self, dry_run: bool, full: bool = False):
        self.dry_run, self.full = dry_run, full and not dry_run
        self.device = torch.device("cpu" if dry_run else "cuda")
        self.case = "embedded" if dry_run else CASE
        self.step_batch = 8 if dry_run else 64
        self.correctness_batch = 4 if dry_run else 8
        self.rounds = 2 if dry_run else (10 if self.full else 5)
        self.steps_per_sample = 1 if dry_run else (5 if self.full else 3)
        self.batch_start, self.batch_cap = (8, 32) if dry_run else (64, 4096)
        self.batch_steps = 1 if dry_run else (5 if self.full else 1)  # steps per timed sample in the batch search
        self.workers = (1, 2) if dry_run else ((1, 2, 4, 8, 16) if self.full else (4, 16))
        self.compile_backend = "aot_eager" if dry_run else "inductor"  # inductor on CPU takes minutes
        self.part_seconds = PART_SECONDS_FULL if self.full else PART_SECONDS


def _params(settings: Settings, batch: int, **pretrain: Any) -> dict[str, Any]:
    return case_params(settings.case, batch, **pretrain)


def _trainer(raw: dict[str, Any], shards: Path, workdir: Path, strategy: str, device: torch.device) -> Pretrainer:
    raw = json.loads(json.dumps(raw))
    raw["masking"]["strategy"] = strategy
    paths = PretrainPaths.under(shards, workdir / strategy, workdir / strategy)
    return Pretrainer(params_from_dict(raw), paths, device, DistContext(), progress_bar=False)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------ parts
def alerts(settings: Settings) -> dict[str, Any]:
    """:func:`bench.stage_steps.alert_pass` over every stage on the device: ViT-S/16 multi-crop dims on CUDA."""
    device = settings.device
    with tempfile.TemporaryDirectory() as tmp:
        raw = _params(settings, ALERT_BATCH, num_workers=0, eval_every=0, min_steps=0)
        raw = write_noise_shards(raw, Path(tmp), ALERT_IMAGES)
        result = alert_pass(raw, Path(tmp) / "shards", Path(tmp) / "stages", device)
    result["stage_seconds"] = result.pop("seconds")
    return {"machine": machine_info(), "device": str(device), "case": settings.case, "batch": ALERT_BATCH,
            "mode": "torch.use_deterministic_algorithms(True, warn_only=True)", "stages": list(STAGES),
            "clean": not any(result["alerts"].values()) and not result["errors"], **result,
            "note": "an alert torch raises once per process (TORCH_WARN_ONCE) is listed under the first stage only"}


def correctness(settings: Settings) -> dict[str, Any]:
    """float32 CPU vs bf16 GPU: teacher outputs and the loss of the first steps, same weights and batch.

    At initialisation the loss is close to ln(out_dim) whatever the input, so the
    binding checks are the teacher's outputs (``|a - b| / |a|`` over all logits)
    and the first step's loss; the loss after three steps shows how far the two
    runs drift apart once bf16 updates the weights (informative).
    """
    raw = _params(settings, settings.correctness_batch)
    raw["model"]["drop_path_rate"] = 0.0
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        raw = write_noise_shards(raw, Path(tmp), settings.correctness_batch)
        shards = Path(tmp) / "shards"
        for strategy in ("random", "attmask_high"):
            losses, outputs = {}, {}
            for label, device in (("cpu_float32", torch.device("cpu")), ("device", settings.device)):
                trainer = _trainer(raw, shards, Path(tmp) / label, strategy, device)
                crops = fixed_crops(trainer, device)
                with torch.no_grad(), trainer.autocast:
                    target = trainer.teacher(torch.cat(crops[:2]))
                outputs[label] = {k: target[k].float().cpu() for k in ("cls", "patch")}
                steps = [trainer.train_step(crops, epoch=0, step=i) for i in range(3)]
                losses[label] = {**{k: float(v) for k, v in steps[0].items()},
                                 "loss_total_after_3_steps": float(steps[-1]["loss_total"])}
                del trainer, crops, target, steps
            relative = {k: abs(losses["device"][k] - losses["cpu_float32"][k]) / max(abs(losses["cpu_float32"][k]), 1e-12)
                        for k in ("loss_total", "loss_cls", "loss_patch", "loss_total_after_3_steps")}
            for k in ("cls", "patch"):
                reference = outputs["cpu_float32"][k]
                relative[f"teacher_{k}_logits"] = float((outputs["device"][k] - reference).norm() / reference.norm())
            finite = all(math.isfinite(v) for v in losses["device"].values())
            binding = ("loss_total", "teacher_cls_logits", "teacher_patch_logits")
            results[strategy] = {"losses": losses, "relative_difference": relative, "finite": finite,
                                 "passed": finite and all(relative[k] <= TOLERANCE for k in binding),
                                 "binding": strategy == "random"}
    return {"tolerance": TOLERANCE, "batch": settings.correctness_batch, "case": settings.case,
            "passed": all(r["passed"] for r in results.values() if r["binding"]), "strategies": results,
            "checked": "first-step loss and teacher logits (relative); loss after 3 steps informative",
            "note": "binding check: random (identical masks); attmask_high masks come from bf16 attention and may differ"}


class WholeSteps:
    """Each call runs one iteration of :meth:`Pretrainer.fit`'s loop: the next batch, then ``train_step``.

    The batch comes from :meth:`Pretrainer.batches`, so the call covers what the
    main process does per step in training: the colour ops of ``augment.photometric:
    batched``, the loader-drawn masks and every copy to the device. Epochs are
    taken in turn (cycling back to 0 after the last) when one runs out.
    """

    def __init__(self, trainer: Pretrainer):
        self.trainer = trainer
        self.epoch, self.step = 0, 0
        self._batches = trainer.batches(0, 0)

    def __call__(self) -> dict[str, torch.Tensor]:
        batch = next(self._batches, None)
        if batch is None:
            self.close()
            self.epoch, self.step = (self.epoch + 1) % self.trainer.config.epochs, 0
            self._batches = self.trainer.batches(self.epoch, 0)
            batch = next(self._batches)
        scalars = self.trainer.train_step(batch, self.epoch, self.step)
        self.step += 1
        return scalars

    def close(self) -> None:
        """Stop the loader (its worker processes)."""
        self._batches.close()


def count_syncs(run_step: Callable[[], Any], steps: int,
                set_mode: Callable[[int | str], None] = torch.cuda.set_sync_debug_mode) -> dict[str, Any]:
    """Synchronising CUDA calls per call of ``run_step``, caught by torch's sync debug mode.

    In mode "warn" torch warns "called a synchronizing CUDA operation" at each
    sync; warnings from every thread (the loader's pin-memory thread too) are
    recorded, with the Python line that caused them.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        set_mode("warn")
        try:
            for _ in range(steps):
                run_step()
        finally:
            set_mode(0)
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    where = Counter(f"{Path(w.filename).name}:{w.lineno}" for w in syncs)
    return {"syncs_per_step": len(syncs) / steps, "steps": steps, "where": dict(where.most_common(10)),
            "counted": "whole steps: next batch (batched colour ops, loader-drawn masks, copies) + train_step"}


def count_host_syncs(trainer: Pretrainer, run_step: Callable[[], Any], steps: int) -> dict[str, Any]:
    """:func:`count_syncs` of ``run_step`` on CUDA (warm trainer); elsewhere the steps only run (a dry run's check)."""
    if trainer.device.type != "cuda":
        for _ in range(steps):
            run_step()
        return {"syncs_per_step": None, "note": "CUDA only", "steps": steps}
    return count_syncs(run_step, steps)


def step(settings: Settings) -> dict[str, Any]:
    device = settings.device
    matmul = measure_matmul_tflops(device, torch.bfloat16 if device.type == "cuda" else torch.float32,
                                   size=8192 if device.type == "cuda" else 1024, repeats=5, per_sample=10)
    peak = device_peak(device, matmul) if device.type == "cuda" else None  # CPU dry run: bench_pretrain's own probe
    result = run_case(settings.case, settings.step_batch, settings.rounds, device, warmup=2,
                      steps_per_sample=settings.steps_per_sample, peak=peak, memory_probe=False)
    raw = _params(settings, settings.step_batch)
    raw["augment"]["photometric"] = "batched"  # the GPU path (presets/imagenet-20pct.yaml): colour ops on the device
    warm, counted = 2, 5
    with tempfile.TemporaryDirectory() as tmp:
        # one epoch holds every warm and counted step, so no loader restarts inside the count
        raw = write_noise_shards(raw, Path(tmp), settings.step_batch * (warm + counted))
        syncs = {}
        for strategy in ("random", "attmask_high", "attmask_hint", "block"):
            trainer = _trainer(raw, Path(tmp) / "shards", Path(tmp), strategy, device)
            run_step = WholeSteps(trainer)
            for _ in range(warm):  # optimiser state, kernels, the colour ops' cached constants
                run_step()
            syncs[strategy] = count_host_syncs(trainer, run_step, steps=counted)
            run_step.close()
            del trainer, run_step
    result["host_syncs"] = syncs
    result["matmul"] = matmul
    return {"machine": machine_info(), "cases": {settings.case: result}}


def largest_batch(settings: Settings, strategy: str = "attmask_high") -> dict[str, Any]:
    """Double the batch until a step runs out of memory; then try halfway between the last fit and the OOM."""
    device = settings.device
    trials: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        raw = write_noise_shards(_params(settings, settings.batch_start), Path(tmp), settings.batch_cap)
        shards = Path(tmp) / "shards"

        def attempt(batch: int) -> bool:
            trial = try_batch(raw, shards, Path(tmp), strategy, batch, device, settings.batch_steps)
            trials.append(trial)
            print(f"  batch {batch:5d}: " + (f"{trial['images_per_second']:8.1f} img/s, peak {trial['peak_mib']:.0f} MiB"
                                             if trial["ok"] else f"failed ({trial['error'][:80]})"), flush=True)
            return trial["ok"]

        batch, last_ok = settings.batch_start, None
        while batch <= settings.batch_cap and attempt(batch):
            last_ok, batch = batch, batch * 2
        if last_ok is not None and batch <= settings.batch_cap:
            middle = (last_ok + batch) // 2
            if attempt(middle):
                last_ok = middle
    return {"machine": machine_info(), "strategy": strategy, "case": settings.case, "trials": trials,
            "largest": last_ok, "cap": settings.batch_cap}


def try_batch(raw: dict[str, Any], shards: Path, workdir: Path, strategy: str, batch: int, device: torch.device,
              steps: int = 5) -> dict[str, Any]:
    """Images/s, peak memory and MFU of one strategy at ``batch``; ``ok`` False on out-of-memory."""
    raw = json.loads(json.dumps(raw))
    raw["pretrain"]["batch_size"] = batch
    trainer = crops = None
    try:
        trainer = _trainer(raw, shards, workdir / f"b{batch}", strategy, device)
        crops = fixed_crops(trainer, device)
        with PeakMemory(device) as memory:
            for _ in range(2):
                trainer.train_step(crops, epoch=0, step=0)
            samples = []
            for _ in range(3):
                _sync(device)
                start = time.perf_counter()
                for _ in range(steps):
                    trainer.train_step(crops, epoch=0, step=0)
                _sync(device)
                samples.append((time.perf_counter() - start) / steps)
        augment = trainer.params.augment
        flops = analytic_step_flops(NetworkDims.of(trainer.student_module), batch, augment.global_size,
                                    augment.local_size, augment.local_number, strategy.startswith("attmask"))["total"]
        seconds = summarize(samples)
        return {"batch": batch, "ok": True, "step_seconds": seconds, "images_per_second": batch / seconds["median"],
                "achieved_tflops": flops / seconds["median"] / 1e12, "peak_mib": memory.result()["peak_mib"],
                "state_mib": tensor_mib(trainer.student_module, trainer.teacher, trainer.optimizer, trainer.loss),
                "flops": "analytic (bench.flops), equal to the counter's on this model"}
    except (torch.OutOfMemoryError, RuntimeError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        # cuBLAS and cuDNN report exhausted memory as plain RuntimeErrors
        if not isinstance(error, torch.OutOfMemoryError) and not any(
                m in message for m in ("out of memory", "ALLOC_FAILED", "CUBLAS_STATUS_NOT_INITIALIZED")):
            raise
        return {"batch": batch, "ok": False, "error": f"out of memory: {message}"}
    finally:
        del trainer, crops
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def data(settings: Settings) -> dict[str, Any]:
    images = 32 if settings.dry_run else 512
    return {"machine": machine_info(), "multicrop": bench_data.multicrop(settings.workers, images=images, epochs=2)}


def knn(settings: Settings, out: Path) -> dict[str, Any]:
    args = ["--quick", "--device", "cpu"] if settings.dry_run else ["--device", "cuda"]
    return bench_knn.main(args + ["--out", str(out / OUTPUTS["knn"])])


def compile_speedup(settings: Settings, strategy: str = "attmask_high") -> dict[str, Any]:
    """Eager vs ``pretrain.compile: true``: first-steps (compile) time and interleaved steady-state step time."""
    import pipeline.method.training as training

    device = settings.device
    previous = training.COMPILE_BACKEND
    training.COMPILE_BACKEND = settings.compile_backend
    try:
        with tempfile.TemporaryDirectory() as tmp:
            raw = write_noise_shards(_params(settings, settings.step_batch), Path(tmp), settings.step_batch)
            trainers, first_steps = {}, {}
            for label, flag in (("eager", False), ("compiled", True)):
                variant = json.loads(json.dumps(raw))
                variant["pretrain"]["compile"] = flag
                trainers[label] = _trainer(variant, Path(tmp) / "shards", Path(tmp) / label, strategy, device)
                crops = fixed_crops(trainers[label], device)
                _sync(device)
                start = time.perf_counter()
                for _ in range(3):
                    scalars = trainers[label].train_step(crops, epoch=0, step=0)
                _sync(device)
                first_steps[label] = {"seconds": time.perf_counter() - start, "loss": float(scalars["loss_total"])}
            times: dict[str, list[float]] = {"eager": [], "compiled": []}
            for round_index in range(settings.rounds):
                for label in (("eager", "compiled") if round_index % 2 == 0 else ("compiled", "eager")):
                    _sync(device)
                    start = time.perf_counter()
                    for _ in range(settings.steps_per_sample):
                        trainers[label].train_step(crops, epoch=0, step=0)
                    _sync(device)
                    times[label].append((time.perf_counter() - start) / settings.steps_per_sample)
    finally:
        training.COMPILE_BACKEND = previous
    eager, compiled = summarize(times["eager"]), summarize(times["compiled"])
    batch = settings.step_batch
    return {"machine": machine_info(), "strategy": strategy, "batch": batch, "backend": settings.compile_backend,
            "first_three_steps": first_steps,
            "compile_seconds": first_steps["compiled"]["seconds"] - first_steps["eager"]["seconds"],
            "eager": {"step_seconds": eager, "images_per_second": batch / eager["median"]},
            "compiled": {"step_seconds": compiled, "images_per_second": batch / compiled["median"]},
            "speedup": eager["median"] / compiled["median"],
            "break_even_steps": _break_even(first_steps, eager["median"], compiled["median"])}


def _break_even(first: dict[str, Any], eager: float, compiled: float) -> float | None:
    """Steps after which compiling has paid for itself (None if it never does)."""
    saved = eager - compiled
    return (first["compiled"]["seconds"] - first["eager"]["seconds"]) / saved if saved > 0 else None


# ------------------------------------------------------------------ driver
class Stopped(BaseException):
    """SIGTERM (bench/gpu.sh's time limit): not an Exception, so no part or stage swallows it."""


def _stop(signum: int, _frame: Any) -> None:
    raise Stopped(f"stopped by signal {signum} (the command's time limit)")


def run_parts(parts: list[str], settings: Settings, out: Path, budget_s: float) -> dict[str, str]:
    configure_determinism()
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    status: dict[str, str] = {}
    actions: dict[str, Callable[[], dict[str, Any] | None]] = {
        "alerts": lambda: alerts(settings),
        "correctness": lambda: correctness(settings), "step": lambda: step(settings),
        "batch": lambda: largest_batch(settings), "data": lambda: data(settings),
        "knn": lambda: knn(settings, out), "compile": lambda: compile_speedup(settings),
    }
    stopped: str | None = None
    for part in parts:
        left = budget_s - (time.perf_counter() - start)
        needs = settings.part_seconds[part]
        if stopped or (not settings.dry_run and left < needs):
            status[part] = f"skipped: {stopped}" if stopped else \
                f"skipped: {left:.0f} s of the {budget_s:.0f} s budget left, needs ~{needs} s"
            print(f"== {part}: {status[part]}", flush=True)
            continue
        print(f"== {part}", flush=True)
        part_start = time.perf_counter()
        try:
            result = actions[part]()
            if part != "knn":  # bench_knn writes its own file
                result = {**result, "seconds": time.perf_counter() - part_start}
                (out / OUTPUTS[part]).write_text(json.dumps(result, indent=2, sort_keys=True, default=str) + "\n")
            status[part] = f"ok ({time.perf_counter() - part_start:.0f} s)"
            _summary(part, result)
        except (Exception, Stopped) as error:  # keep going: later parts are independent (not after a stop)
            traceback.print_exc()
            status[part] = f"failed: {type(error).__name__}: {error}"
            if isinstance(error, Stopped):
                stopped = str(error)
            (out / OUTPUTS[part]).write_text(json.dumps({"error": status[part], "machine": machine_info(),
                                                         "seconds": time.perf_counter() - part_start}, indent=2) + "\n")
        gc.collect()
        if settings.device.type == "cuda":
            torch.cuda.empty_cache()
        # determinism as the pipeline runs (a part may have changed it): strict, not warn-only
        configure_determinism()
    print(f"== summary ({time.perf_counter() - start:.0f} s)")
    for part, line in status.items():
        print(f"  {part:12s} {line}")
    print("copy the JSON files into reports/bench/, then: .venv/bin/python -m bench.render (writes reports/bench.md)")
    return status


def versions_line() -> str:
    """Python, torch, timm, webdataset and CUDA as this process imports them (and from where)."""
    import timm
    import webdataset

    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    return (f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
            f"timm {timm.__version__} ({Path(timm.__file__).parent.parent}), "
            f"webdataset {getattr(webdataset, '__version__', '?')}; {cuda}")


def _summary(part: str, result: dict[str, Any]) -> None:
    if part == "alerts":
        fired = {stage: len(messages) for stage, messages in result["alerts"].items() if messages}
        print(f"  {len(result['alerts'])} stages, non-determinism alerts: {fired or 'none'}; "
              f"failed stages: {sorted(result['errors']) or 'none'}")
        for message in dict.fromkeys(m for messages in result["alerts"].values() for m in messages):
            print(f"    {message[:160]}")
    elif part == "correctness":
        for s, r in result["strategies"].items():
            d = r["relative_difference"]
            print(f"  {s}: relative difference loss {d['loss_total']:.2e}, teacher logits {d['teacher_cls_logits']:.2e} / "
                  f"{d['teacher_patch_logits']:.2e}, loss after 3 steps {d['loss_total_after_3_steps']:.2e} "
                  f"({'pass' if r['passed'] else 'FAIL'}, tolerance {result['tolerance']})")
    elif part == "step":
        case = next(iter(result["cases"].values()))
        for s, e in case["strategies"].items():
            syncs = case["host_syncs"].get(s, {}).get("syncs_per_step")
            print(f"  {s:13s} {e['images_per_second']:9.1f} img/s  MFU {100 * e['mfu']:5.1f}%  host syncs/step {syncs}")
    elif part == "batch":
        print(f"  largest batch that fits: {result['largest']}")
    elif part == "compile":
        print(f"  speed-up x{result['speedup']:.3f}, compile {result['compile_seconds']:.0f} s, "
              f"break-even after {result['break_even_steps']} steps")


def main(argv: list[str] | None = None) -> dict[str, str]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("parts", nargs="*", default=list(PARTS), help=f"any of {PARTS} (default: all)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "reports/bench"))
    parser.add_argument("--budget-s", type=float, default=None,
                        help=f"skip parts that would not end within this (default {BUDGET_S:.0f}, --full {BUDGET_S_FULL:.0f})")
    parser.add_argument("--full", action="store_true", help="the full repeat counts (no 8-minute limit)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: check the harness itself")
    args = parser.parse_args(argv)
    unknown = [p for p in args.parts if p not in PARTS]
    if unknown:
        parser.error(f"unknown parts {unknown}; choose from {PARTS}")
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("bench.gpu: no CUDA device here; use --dry-run to check the harness on CPU")
    configure_determinism()  # CUBLAS_WORKSPACE_CONFIG before anything touches CUDA
    print(versions_line(), flush=True)
    budget = args.budget_s if args.budget_s is not None else (BUDGET_S_FULL if args.full else BUDGET_S)
    main_thread = threading.current_thread() is threading.main_thread()  # signal handlers: main thread only
    previous = signal.signal(signal.SIGTERM, _stop) if main_thread else None
    try:
        return run_parts(args.parts, Settings(args.dry_run, args.full), args.out, budget)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    main()

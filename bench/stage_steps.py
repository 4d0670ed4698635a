"""One step of each torch stage, on any device: the one home of the per-stage steps.

Two users, one set of builders:

* ``tests/test_cuda_determinism.py`` records the aten ops of each step on the CPU
  (a ``TorchDispatchMode``) and fails on an op that raises on CUDA in
  deterministic mode;
* ``bench.gpu``'s ``alerts`` part runs each step on CUDA under
  ``torch.use_deterministic_algorithms(True, warn_only=True)`` and collects every
  non-determinism alert torch raises (:func:`alert_pass`).

A builder takes a full params dict (``raw``, as :func:`pipeline.core.config.params_from_dict`
reads it), the shards of a small image folder and a device, does the set-up
(models, optimisers, the first batch) and returns the step: a no-argument
callable that runs it. :func:`stage_builders` lists every stage: pre-training
for each masking strategy (local crops on, so every local crop resizes
``pos_embed``) plus one case with Sinkhorn centring, KoLeo and batched colour
ops, one fine-tuning step (train + evaluate, on eval crops one patch larger
than the model so it differentiates through the resize), feature extraction,
the SGD linear probe (one epoch + evaluate) and k-NN with few-shot k-NN.
"""
from __future__ import annotations

import copy
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from pipeline.core.config import params_from_dict
from pipeline.core.distributed import DistContext
from pipeline.core.strategies import MASKING_STRATEGIES
from pipeline.data.shard_reader import open_split
from pipeline.evaluation.extract import _vit_extractor, extract_split
from pipeline.evaluation.feature_files import FeatureSet
from pipeline.evaluation.finetune import Finetuner
from pipeline.evaluation.knn import fewshot_knn, weighted_knn
from pipeline.evaluation.linear_sgd import LinearSgdProbe
from pipeline.method.backbone_export import random_backbone, random_backbone_state
from pipeline.method.training import Pretrainer, PretrainPaths

CPU = torch.device("cpu")
Step = Callable[[], Any]

# With the tests' tiny config (16 px globals, 8 px locals, patch 4) every local crop resizes pos_embed (4x4 -> 2x2)
PRETRAIN_CASES: dict[str, dict[str, dict[str, Any]]] = {
    strategy: {"masking": {"strategy": strategy, "prob": 1.0}} for strategy in MASKING_STRATEGIES}
PRETRAIN_CASES["random_sinkhorn_koleo_batched"] = {
    "masking": {"strategy": "random", "prob": 1.0},
    "pretrain": {"centering": "sinkhorn", "koleo_weight": 0.1},
    "augment": {"photometric": "batched"},  # the colour ops then run on the training device
}
FINETUNE = {"batch_size": 8, "num_workers": 0}
LINEAR_SGD = {"enabled": True, "epochs": 1, "batch_size": 12, "n_last_blocks": 2, "num_workers": 0}
EVAL_BATCH = 8


def with_sections(raw: dict[str, Any], **sections: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of ``raw`` with each section's keys updated."""
    raw = copy.deepcopy(raw)
    for section, values in sections.items():
        raw.setdefault(section, {}).update(copy.deepcopy(values))
    return raw


def eval_size(raw: dict[str, Any]) -> int:
    """Eval crops one patch larger than the model's image (20 px on the tests' 16 px, patch-4 model: 5x5 vs 4x4)."""
    return raw["model"]["img_size"] + raw["model"]["patch_size"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- builders
def pretrain_step(raw: dict[str, Any], shards: Path, out: Path, device: torch.device = CPU) -> Step:
    """One ``Pretrainer.train_step`` on the loader's first batch (local crops required)."""
    trainer = Pretrainer(params_from_dict(raw), PretrainPaths.under(shards, out / "models", out / "reports"), device,
                         DistContext(), progress_bar=False)
    assert trainer.params.augment.local_number > 0

    def step() -> Any:
        batches = trainer.batches(0, 0)
        try:
            return trainer.train_step(next(batches), 0, 0)
        finally:
            batches.close()  # stop the loader (and its workers, if any) now

    return step


def finetune_step(raw: dict[str, Any], shards: Path, device: torch.device = CPU) -> Step:
    """One fine-tuning step on eval-size crops, then the evaluation over val."""
    size = eval_size(raw)
    params = params_from_dict(with_sections(raw, finetune=FINETUNE, extract={"image_size": size}))
    tuner = Finetuner(params, "random_init", random_backbone_state(params.model, params.seed),
                      open_split(shards, "train"), open_split(shards, "val"), device, progress_bar=False)
    images, labels = next(tuner.train_batches(0))
    assert images.shape[-1] == size
    return lambda: (tuner.train_step(images, labels, 0, 0), tuner.evaluate())


def extract_step(raw: dict[str, Any], shards: Path, device: torch.device = CPU) -> Step:
    """Features of the val split from a random-init ViT at eval size (forward only)."""
    size = eval_size(raw)
    params = params_from_dict(with_sections(raw, extract={"image_size": size}))
    extractor = _vit_extractor(random_backbone(params.model, params.seed), 2, True, device)
    split = open_split(shards, "val")
    return lambda: extract_split(split, {"random_init": extractor}, image_size=size, batch_size=EVAL_BATCH,
                                 device=device, progress_bar=False)


def linear_sgd_step(raw: dict[str, Any], shards: Path, out: Path, device: torch.device = CPU) -> Step:
    """One epoch of the SGD linear probe on a frozen random-init backbone, then its evaluation."""
    params = params_from_dict(with_sections(raw, linear_sgd=LINEAR_SGD, extract={"image_size": eval_size(raw)}))
    probe = LinearSgdProbe(params, "random_init", random_backbone_state(params.model, params.seed),
                           open_split(shards, "train"), open_split(shards, "val"), device,
                           out / "probe.pt", progress_bar=False)
    return lambda: (probe.train_epoch(0, None), probe.evaluate())


def knn_step(device: torch.device = CPU) -> Step:
    """Weighted k-NN (several k, a chunk size that splits the train rows) and few-shot k-NN on 3-class features."""
    rng = np.random.default_rng(0)
    features = rng.normal(size=(60, 16)).astype(np.float32)
    labels = np.repeat(np.arange(3), 20)
    train = FeatureSet(features[::2].copy(), labels[::2].copy(), np.array([f"t{i}" for i in range(30)]))
    val = FeatureSet(features[1::2].copy(), labels[1::2].copy(), np.array([f"v{i}" for i in range(30)]))

    def step() -> None:
        weighted_knn(train.features, train.labels, val.features, val.labels, [1, 5, 20], chunk_size=7, device=device)
        fewshot_knn(train, val, shots=[1, 2], draws=2, k=3, temperature=0.07, seed=0, device=device)

    return step


def stage_builders(raw: dict[str, Any], shards: Path, out: Path,
                   device: torch.device = CPU) -> dict[str, Callable[[], Step]]:
    """Every torch stage, name -> a builder of its step (``raw``: the base params, e.g. the tests' tiny config).

    Builders are lazy, so a caller can build, run and free one stage at a time
    (and a failing set-up counts against its stage alone).
    """
    builders: dict[str, Callable[[], Step]] = {}
    for case, sections in PRETRAIN_CASES.items():
        builders[f"pretrain/{case}"] = (lambda s=sections, c=case: pretrain_step(
            with_sections(raw, **s), shards, out / "pretrain" / c, device))
    builders["finetune"] = lambda: finetune_step(raw, shards, device)
    builders["extract"] = lambda: extract_step(raw, shards, device)
    builders["linear_sgd"] = lambda: linear_sgd_step(raw, shards, out / "linear_sgd", device)
    builders["knn"] = lambda: knn_step(device)
    return builders


STAGES = tuple(f"pretrain/{case}" for case in PRETRAIN_CASES) + ("finetune", "extract", "linear_sgd", "knn")


# --------------------------------------------------------------------------- the CUDA alert pass
def is_alert(message: str) -> bool:
    """A non-determinism alert of ``torch.use_deterministic_algorithms(True, warn_only=True)``.

    torch's alerts read "<op> does not have a deterministic implementation, but
    you set 'torch.use_deterministic_algorithms(True, warn_only=True)'..."; the
    cuBLAS one (CUBLAS_WORKSPACE_CONFIG unset) and the fused-attention ones
    ("... defaults to a non-deterministic algorithm") name determinism too.
    """
    text = message.lower()
    return "deterministic" in text and ("use_deterministic_algorithms" in text or "non-deterministic" in text
                                        or "nondeterministic" in text)


def alert_pass(raw: dict[str, Any], shards: Path, out: Path, device: torch.device,
               stages: dict[str, Callable[[], Step]] | None = None) -> dict[str, Any]:
    """One step of every stage under ``use_deterministic_algorithms(True, warn_only=True)``, every alert recorded.

    All stages run, whatever one of them raises or warns. Returns
    ``{"alerts": {stage: [message, ...]}, "where": {stage: {message: ["file.py:line", ...]}},
    "errors": {stage: "Type: message"}, "other_warnings": {stage: [...]}, "seconds": {stage: s}}``:
    every stage is a key of ``alerts``, its list empty when no alert fired; a
    message appears once per stage however often it fired. Determinism is left
    as it was found (the pipeline's strict mode, normally).

    An alert that torch raises with TORCH_WARN_ONCE (one per process, e.g. a
    fused-attention backward's) is listed under the first stage that hits it only.
    """
    stages = stages if stages is not None else stage_builders(raw, shards, out, device)
    was_on = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    result: dict[str, Any] = {"alerts": {}, "where": {}, "errors": {}, "other_warnings": {}, "seconds": {}}
    for stage, build in stages.items():
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.use_deterministic_algorithms(True, warn_only=True)
            try:
                step = build()
                step()
                _sync(device)
                del step
            except Exception as error:  # noqa: BLE001 - the pass goes on: one stage's failure is its own line
                result["errors"][stage] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            finally:
                torch.use_deterministic_algorithms(was_on, warn_only=was_warn_only)
        alerts: dict[str, list[str]] = {}
        others: list[str] = []
        for w in caught:
            message = str(w.message)
            if is_alert(message):
                alerts.setdefault(message, [])
                where = f"{Path(w.filename).name}:{w.lineno}"
                if where not in alerts[message] and len(alerts[message]) < 5:
                    alerts[message].append(where)
            elif message not in others and len(others) < 20:
                others.append(message)
        result["alerts"][stage] = list(alerts)
        result["where"][stage] = alerts
        result["other_warnings"][stage] = others
        result["seconds"][stage] = time.perf_counter() - start
        print(f"  {stage:40s} {len(alerts)} alert(s)" + (f", FAILED: {result['errors'][stage]}"
                                                        if stage in result["errors"] else ""), flush=True)
        for message, where in alerts.items():  # in the log as they come: a run cut short keeps them there
            print(f"    {message.splitlines()[0][:200]}  ({', '.join(where)})", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result

"""Assemble the stages' metrics files into ``reports/metrics.json`` (the `metrics` stage).

``knn``      top-1 per k of the pre-trained backbone (and ``knn_top5``)
``fewshot``  mean top-1 per shot count (``fewshot_std`` the spread over draws)
``linear``   ``{"top1": ...}`` of the logistic-regression probe
``linear_sgd`` ``{"top1", "best_top1"}`` of the official SGD probe (only when ``linear_sgd.enabled``;
             ``best_top1`` is the number the official script reports)
``finetune`` ``{"top1": ...}`` of end-to-end fine-tuning
``pretrain`` final losses and masked share, plus images/s and wall seconds copied from
             ``reports/timing/pretrain.json`` (clock readings: that is why ``reports/metrics.json``
             is a top-level DVC metric, not a stage output, so reruns keep identical dvc.lock hashes)
``baselines`` the same evaluations of the random-init backbone and raw pixels
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.core.files import write_json


def read_optional(path: Path) -> dict[str, Any] | None:
    """A JSON file's content, or None when it does not exist."""
    return json.loads(path.read_text()) if path.is_file() else None


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; run the stage that writes it (dvc repro)")
    return json.loads(path.read_text())


def collect_metrics(eval_dir: Path, pretrain_dir: Path, variant: str = "pretrained",
                    timing: dict[str, Any] | None = None) -> dict[str, Any]:
    """One flat-ish dict of the headline numbers, readable by ``dvc metrics show``."""
    knn = _read(eval_dir / "knn.json")
    fewshot = _read(eval_dir / "fewshot.json")
    linear = _read(eval_dir / "linear.json")
    linear_sgd = read_optional(eval_dir / "linear_sgd.json") or {}
    finetune = _read(eval_dir / "finetune.json")
    pretrain = _read(pretrain_dir / "metrics.json")

    def fewshot_means(entry: dict[str, Any]) -> dict[str, float]:
        return {shots: run["mean"] for shots, run in entry.items() if shots != "skipped"}

    def evaluations(name: str) -> dict[str, Any]:
        result: dict[str, Any] = {}
        if name in knn:
            result["knn"] = knn[name]["top1"]
        if name in fewshot:
            result["fewshot"] = fewshot_means(fewshot[name])
        if name in linear:
            result["linear"] = {"top1": linear[name]["top1"]}
        if name in linear_sgd:
            result["linear_sgd"] = {"top1": linear_sgd[name]["top1"], "best_top1": linear_sgd[name]["best_top1"]}
        if name in finetune:
            result["finetune"] = {"top1": finetune[name]["top1"]}
        return result

    metrics = evaluations(variant)
    metrics["knn_top5"] = knn[variant]["top5"]
    metrics["fewshot_std"] = {s: run["std"] for s, run in fewshot[variant].items() if s != "skipped"}
    metrics["pretrain"] = {
        "final_loss": pretrain["final_loss"],
        "final_loss_cls": pretrain["final_loss_cls"],
        "final_loss_patch": pretrain["final_loss_patch"],
        "masked_share": pretrain["masked_share"],
    }
    if timing is not None:  # the public keys, README "The pipeline"; absent when pretrain ran without a record
        metrics["pretrain"]["images_per_second"] = timing.get("images_per_second")
        metrics["pretrain"]["wall_seconds"] = timing.get("wall_seconds")
    metrics["baselines"] = {name: evaluations(name) for name in ("random_init", "pixels") if evaluations(name)}
    return metrics


def write_metrics(metrics: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(metrics, path)


def read_timings(timing_dir: Path, stages: list[str]) -> dict[str, dict[str, Any] | None]:
    """``reports/timing/<stage>.json`` per stage (written by pipeline.core.tracking), None where absent."""
    return {stage: read_optional(timing_dir / f"{stage}.json") for stage in stages}

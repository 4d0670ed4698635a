"""Assemble the stages' metrics files into ``reports/metrics.json`` (the `metrics` stage).

``knn``      top-1 per k of the pre-trained backbone (and ``knn_top5``)
``fewshot``  mean top-1 per shot count (``fewshot_std`` the spread over draws)
``linear``   ``{"top1": ...}`` of the logistic-regression probe
``linear_sgd`` ``{"top1", "best_top1"}`` of the official SGD probe (only when ``linear_sgd.enabled``;
             ``best_top1`` is the number the official script reports)
``finetune`` ``{"top1": ...}`` of end-to-end fine-tuning
``pretrain`` final losses, masked share and steps (clock readings stay in ``reports/timing/``)
``baselines`` the same evaluations of the random-init backbone and raw pixels
``margins``  pre-trained minus random init (and raw pixels, k-NN) per headline measure, the
             noise band and a verdict (:func:`gain_margins`), for ``dvc exp show``
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pipeline.core.files import write_json

HEADLINE_K = "20"  # the k of the report's headline k-NN (the DINO protocol's)


def read_optional(path: Path) -> dict[str, Any] | None:
    """A JSON file's content, or None when it does not exist."""
    return json.loads(path.read_text()) if path.is_file() else None


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; run the stage that writes it (dvc repro)")
    return json.loads(path.read_text())


GAIN, NO_GAIN, WORSE = "gain", "no measurable gain", "below random init"
NOISE_SE = 2.0  # a margin within 2 standard errors of zero cannot be told from it


def noise_band(a: float, b: float, n: int) -> float:
    """``NOISE_SE`` standard errors of the difference of two top-1 accuracies (%) on ``n`` images each.

    The binomial spread of each accuracy on the val split: a floor under the
    spread over seeds (which adds the training's own noise), so a margin inside
    it is never called a gain.
    """
    return NOISE_SE * math.sqrt((a * (100 - a) + b * (100 - b)) / max(n, 1))


def gain_margins(table: dict[str, dict[str, float | None]], num_val: int) -> dict[str, dict[str, Any]]:
    """Per headline measure (knn, linear, finetune): pre-trained minus random init, its noise band and verdict.

    ``table``: variant (pretrained, random_init, pixels) -> measure -> top-1 (%).
    The verdict is :data:`GAIN`, :data:`NO_GAIN` (within the band either way) or
    :data:`WORSE` (below by more than the band). k-NN also gets ``over_pixels``.
    """
    ours, random_init, pixels = (table.get(v) or {} for v in ("pretrained", "random_init", "pixels"))
    margins: dict[str, dict[str, Any]] = {}
    for measure in ("knn", "linear", "finetune"):
        a, b = ours.get(measure), random_init.get(measure)
        if a is None or b is None:
            continue
        margin, band = a - b, noise_band(a, b, num_val)
        verdict = GAIN if margin > band else WORSE if margin < -band else NO_GAIN
        margins[measure] = {"over_random_init": round(margin, 4), "noise": round(band, 4), "verdict": verdict}
        if measure == "knn" and pixels.get("knn") is not None:
            margins[measure]["over_pixels"] = round(a - pixels["knn"], 4)
    return margins


def collect_metrics(eval_dir: Path, pretrain_dir: Path, variant: str = "pretrained") -> dict[str, Any]:
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
        "steps": pretrain["steps"],
        "epochs": pretrain["epochs"],
    }
    metrics["baselines"] = {name: evaluations(name) for name in ("random_init", "pixels") if evaluations(name)}
    k = HEADLINE_K if HEADLINE_K in metrics["knn"] else next(iter(metrics["knn"]))
    table = {name: {"knn": (entry.get("knn") or {}).get(k), "linear": (entry.get("linear") or {}).get("top1"),
                    "finetune": (entry.get("finetune") or {}).get("top1")}
             for name, entry in {variant: metrics, **metrics["baselines"]}.items()}
    metrics["margins"] = gain_margins({("pretrained" if n == variant else n): row for n, row in table.items()},
                                      knn[variant]["num_val"])
    return metrics


def write_metrics(metrics: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(metrics, path)


def read_timings(timing_dir: Path, stages: list[str]) -> dict[str, dict[str, Any] | None]:
    """``reports/timing/<stage>.json`` per stage (written by pipeline.core.tracking), None where absent."""
    return {stage: read_optional(timing_dir / f"{stage}.json") for stage in stages}

"""DVC stage `linear`: logistic-regression probe on frozen features -> reports/eval/linear.json.

    python -m stages.linear

Variants: ``pretrained`` (required) and ``random_init`` (if extracted). C is
chosen by cross-validation on train features only; val is scored once.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.config import Params
from pipeline.evaluation import linear_probe, load_variant, write_json
from pipeline.tracking import RunRecord
from stages import run_stage
from stages.knn import FEATURES, required_variants

OUTPUT = Path("reports/eval/linear.json")
VARIANTS = ("pretrained", "random_init")


def main(params: Params, record: RunRecord | None = None) -> dict[str, Any]:
    """Write ``reports/eval/linear.json``: ``{variant: linear_probe result}``; returns the same."""
    config = params.linear
    results = {}
    for variant in required_variants(FEATURES, VARIANTS):
        train, val = load_variant(FEATURES, variant)
        results[variant] = linear_probe(train, val, config.c_values, config.cv_folds, config.max_iter, params.seed)
        if record is not None:
            record.log_scalar(f"{variant}.top1", results[variant]["top1"])
            record.log_scalar(f"{variant}.C", results[variant]["C"])
    write_json(results, OUTPUT)
    for variant, result in results.items():
        note = f", {result['convergence_warnings']} fits did not converge" if result["convergence_warnings"] else ""
        print(f"linear probe {variant:<14} top-1 {result['top1']:6.2f}  C={result['C']:g}{note}")
    return results


if __name__ == "__main__":
    run_stage("linear", main)

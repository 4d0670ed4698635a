"""DVC stage `linear`: logistic-regression probe on frozen features -> reports/eval/linear.json.

    python -m stages.linear

Variants: ``pretrained`` (required) and ``random_init`` (if extracted). C is
chosen by cross-validation on train features only; val is scored once.
"""
from __future__ import annotations

from typing import Any

from pipeline.core.config import Params
from pipeline.core.files import write_json
from pipeline.core.tracking import RunRecord
from pipeline.evaluation.feature_files import load_variant, required_variants
from pipeline.evaluation.linear_probe import linear_probe
from stages import run_stage
from stages.paths import EVAL_REPORTS, FEATURES

OUTPUT = EVAL_REPORTS / "linear.json"
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
    write_json(results, OUTPUT, decimals=4)
    for variant, result in results.items():
        note = f", {result['convergence_warnings']} fits did not converge" if result["convergence_warnings"] else ""
        print(f"linear probe {variant:<14} top-1 {result['top1']:6.2f}  C={result['C']:g}{note}")
    return results


if __name__ == "__main__":
    run_stage("linear", main)

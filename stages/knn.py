"""DVC stage `knn`: weighted k-NN (DINO protocol) on frozen features -> reports/eval/knn.json.

    python -m stages.knn

Evaluates every variant present under ``data/features/``: ``pretrained`` (required),
``random_init`` and ``pixels`` (the floors the pre-training must beat).
"""
from __future__ import annotations

from typing import Any

from pipeline.core.config import Params
from pipeline.core.distributed import resolve_device
from pipeline.core.files import write_json
from pipeline.core.tracking import RunRecord
from pipeline.evaluation.feature_files import VARIANTS, load_variant, required_variants
from pipeline.evaluation.knn import weighted_knn
from stages import run_stage
from stages.paths import EVAL_REPORTS, FEATURES

OUTPUT = EVAL_REPORTS / "knn.json"


def main(params: Params, record: RunRecord | None = None) -> dict[str, Any]:
    """Write ``reports/eval/knn.json``: ``{variant: weighted_knn result}``; returns the same."""
    variants = required_variants(FEATURES, VARIANTS)
    device = resolve_device(params.knn.device, key="knn.device")
    results = {}
    for variant in variants:
        train, val = load_variant(FEATURES, variant)
        results[variant] = weighted_knn(
            train.features, train.labels, val.features, val.labels, params.knn.k,
            temperature=params.knn.temperature, chunk_size=params.knn.chunk_size, device=device,
        )
        if record is not None:
            for metric in ("top1", "top5"):
                for k, value in results[variant][metric].items():
                    record.log_scalar(f"{variant}.{metric}.k{k}", value)
    write_json(results, OUTPUT, decimals=4)
    print(format_table(results))
    return results


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """Top-1 / top-5 per k, one row per variant and metric."""
    ks = list(next(iter(results.values()))["top1"])
    temperature = next(iter(results.values()))["temperature"]
    lines = [f"weighted k-NN (T={temperature:g})".ljust(24) + "".join(f"{'k=' + k:>9}" for k in ks)]
    for variant, result in results.items():
        for metric in ("top1", "top5"):
            label = metric if metric == "top1" or result["top5_n"] == 5 else f"top{result['top5_n']}"
            row = f"  {variant:<14}{label:<8}" + "".join(f"{result[metric][k]:9.2f}" for k in ks)
            lines.append(row)
        if result["clamped"]:
            lines.append(f"  {'':<14}(k clamped to the {result['num_train']} train images: {sorted(result['clamped'], key=int)})")
    return "\n".join(lines)


if __name__ == "__main__":
    run_stage("knn", main)

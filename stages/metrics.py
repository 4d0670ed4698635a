"""DVC stage `metrics`: reports/eval/*.json + reports/pretrain/*.json (+ timing) -> reports/metrics.json.

    python -m stages.metrics
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.report import collect_metrics, read_timings, write_metrics

EVAL = Path("reports/eval")
PRETRAIN = Path("reports/pretrain")
METRICS = Path("reports/metrics.json")
TIMING = Path("reports/timing")


def main() -> dict[str, Any]:
    metrics = collect_metrics(EVAL, PRETRAIN, timing=read_timings(TIMING, ["pretrain"])["pretrain"])
    write_metrics(metrics, METRICS)
    knn = ", ".join(f"k={k}: {v:.1f}" for k, v in metrics["knn"].items())
    print(f"metrics: k-NN top-1 {knn}; linear {metrics['linear']['top1']:.1f}; "
          f"fine-tune {metrics['finetune']['top1']:.1f} -> {METRICS}")
    return metrics


if __name__ == "__main__":
    main()

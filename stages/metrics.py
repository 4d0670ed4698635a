"""DVC stage `metrics`: reports/eval/*.json + reports/pretrain/metrics.json -> reports/metrics.json.

    python -m stages.metrics
"""
from __future__ import annotations

from typing import Any

from pipeline.reporting.metrics import collect_metrics, write_metrics
from stages.paths import EVAL_REPORTS, METRICS, PRETRAIN_REPORTS



def main() -> dict[str, Any]:
    metrics = collect_metrics(EVAL_REPORTS, PRETRAIN_REPORTS)
    write_metrics(metrics, METRICS)
    knn = ", ".join(f"k={k}: {v:.1f}" for k, v in metrics["knn"].items())
    print(f"metrics: k-NN top-1 {knn}; linear {metrics['linear']['top1']:.1f}; "
          f"fine-tune {metrics['finetune']['top1']:.1f} -> {METRICS}")
    return metrics


if __name__ == "__main__":
    main()

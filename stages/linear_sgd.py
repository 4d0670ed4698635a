"""DVC stage `linear_sgd`: the official linear probe (DINO's eval_linear.py) -> reports/eval/linear_sgd.json.

    python -m stages.linear_sgd                       # CPU or one GPU
    torchrun --nproc_per_node=8 -m stages.linear_sgd  # DDP, the global batch split across ranks

Off in the embedded default (``linear_sgd.enabled: false``: the stage writes
``{"enabled": false}`` and nothing else); the ImageNet presets turn it on.
Checkpoints after every epoch go to ``models/linear_sgd/<variant>.pt`` (kept
across reruns: an interrupted probe resumes).
"""
from __future__ import annotations

from typing import Any

from pipeline.core.config import Params
from pipeline.core.distributed import join_job, launched_as_main_rank, shutdown
from pipeline.core.files import write_json
from pipeline.core.tracking import RunRecord
from pipeline.evaluation.linear_sgd import run_linear_sgd
from stages import run_stage
from stages.paths import BACKBONE, EVAL_REPORTS, LINEAR_SGD_MODELS, SHARDS

OUTPUT = EVAL_REPORTS / "linear_sgd.json"


def main(params: Params, record: RunRecord | None = None, progress_bar: bool = True) -> dict[str, Any]:
    """Probe every variant; rank 0 writes ``reports/eval/linear_sgd.json``: ``{"enabled", variant: summary}``."""
    LINEAR_SGD_MODELS.mkdir(parents=True, exist_ok=True)  # a DVC output even when off
    if not params.linear_sgd.enabled:
        if launched_as_main_rank():
            write_json({"enabled": False}, OUTPUT)
            print("linear_sgd: off (linear_sgd.enabled: false); the logistic-regression probe is the `linear` stage")
        return {"enabled": False}
    device, context = join_job(params.linear_sgd.device, key="linear_sgd.device")
    try:
        results: dict[str, Any] = {"enabled": True, **run_linear_sgd(
            params, SHARDS, BACKBONE, LINEAR_SGD_MODELS, device, context, record=record, progress_bar=progress_bar)}
        if context.is_main:
            write_json(results, OUTPUT, decimals=4)
            for variant, result in results.items():
                if variant != "enabled":
                    print(f"linear_sgd {variant:<12} top-1 {result['top1']:6.2f} (best {result['best_top1']:.2f} at "
                          f"epoch {result['best_epoch']}), {result['epochs']} epochs, D={result['feature_dim']}")
        return results
    finally:
        shutdown(context)


if __name__ == "__main__":
    run_stage("linear_sgd", main, enabled=launched_as_main_rank())

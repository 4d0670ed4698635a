"""DVC stage `finetune`: end-to-end fine-tuning from the pre-trained backbone and from random init.

    python -m stages.finetune                       # CPU or one GPU
    torchrun --nproc_per_node=8 -m stages.finetune  # DDP, the global batch split across ranks

Data: ``data/shards`` (train = the labelled subset, val), or ``finetune.data_root``
(an ImageNet-layout folder, sharded into ``data/finetune_shards`` first).
Writes ``models/finetune/<variant>.safetensors``, ``reports/eval/finetune.json``
and ``reports/eval/finetune_curve.csv``.
"""
from __future__ import annotations

from typing import Any

from pipeline.core.config import Params
from pipeline.core.distributed import join_job, launched_as_main_rank, shutdown
from pipeline.core.tracking import RunRecord
from pipeline.evaluation.finetune import FINETUNE_VARIANTS, backbone_for_variant, run_finetune, write_finetune_reports
from stages import run_stage
from stages.paths import BACKBONE, EVAL_REPORTS, FINETUNE_MODELS, FINETUNE_SHARDS, SHARDS



def main(params: Params, record: RunRecord | None = None, progress_bar: bool = True) -> dict[str, Any]:
    """Fine-tune both variants; returns their metrics, wall times and the run's set-up."""
    backbone_for_variant(params, "pretrained", BACKBONE)  # a missing export fails before any heavy work
    device, context = join_job(params.finetune.device, key="finetune.device")
    try:
        summary = run_finetune(params, SHARDS, BACKBONE, FINETUNE_MODELS, device, context, variants=FINETUNE_VARIANTS,
                               finetune_shards=FINETUNE_SHARDS, record=record, progress_bar=progress_bar)
        if context.is_main:
            write_finetune_reports(summary["metrics"], EVAL_REPORTS)
            if record is not None:  # clock readings: reports/timing, not DVC outputs
                record.add_timing(seconds_per_variant=summary["wall_seconds"])
            for variant, metrics in summary["metrics"].items():
                print(
                    f"finetune {variant}: top-1 {metrics['top1']:.2f} (best {metrics['best_top1']:.2f} at epoch "
                    f"{metrics['best_epoch']}), top-{metrics['topk']} {metrics['top5']:.2f}, "
                    f"{summary['wall_seconds'][variant]:.0f} s"
                )
        return summary
    finally:
        shutdown(context)


if __name__ == "__main__":
    run_stage("finetune", main, enabled=launched_as_main_rank())

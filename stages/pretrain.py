"""DVC stage `pretrain`: iBOT + the masking strategy in params.yaml.

    python -m stages.pretrain                       # CPU or one GPU
    torchrun --nproc_per_node=8 -m stages.pretrain  # many GPUs (or CPU processes, gloo)
"""
from __future__ import annotations

from typing import Any

from pipeline.core.config import Params
from pipeline.core.distributed import join_job, launched_as_main_rank, shutdown
from pipeline.core.seeding import configure_determinism
from pipeline.core.tracking import RunRecord
from pipeline.method.training import PretrainPaths, pretrain, write_training_records
from stages import run_stage
from stages.paths import PRETRAIN_MODELS, PRETRAIN_REPORTS, SHARDS



def main(params: Params, record: RunRecord | None = None, progress_bar: bool = True) -> dict[str, Any]:
    configure_determinism()
    device, context = join_job(params.pretrain.device, key="pretrain.device")
    try:
        paths = PretrainPaths.under(SHARDS, PRETRAIN_MODELS, PRETRAIN_REPORTS)
        summary = pretrain(params, paths, device, context, record=record, progress_bar=progress_bar)
        if context.is_main:
            from pipeline.method.checkpoint import load_checkpoint

            history = load_checkpoint(paths.checkpoint)["history"].tolist()
            write_training_records(summary, history, paths.reports)
            if record is not None:  # clock readings: reports/timing, not DVC outputs
                record.add_timing(images_per_second=summary["images_per_second"], loop_seconds=summary["wall_seconds"],
                                  resumed=summary["resumed"])
                record.add_timing_table("throughput", ("step", "images_per_second"), summary["throughput"])
            rate = summary["images_per_second"]
            print(
                f"pretrain: {summary['epochs']} epochs, {summary['steps']} steps, loss "
                f"{summary['first_epoch_loss']:.4f} -> {summary['final_loss']:.4f}, "
                + (f"{rate:.1f} images/s, {summary['wall_seconds']:.0f} s" if rate else "nothing left to train")
            )
        return {k: v for k, v in summary.items() if k != "throughput"}
    finally:
        shutdown(context)


if __name__ == "__main__":
    run_stage("pretrain", main, enabled=launched_as_main_rank())

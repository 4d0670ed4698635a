"""DVC stage `extract`: frozen features (pretrained / random_init / pixels) for train and val.

    python -m stages.extract                       # CPU or one GPU
    torchrun --nproc_per_node=8 -m stages.extract  # each rank extracts its share, rank 0 writes

Writes ``data/features/<variant>/{train,val}.npz`` and ``reports/eval/extract.json``.
"""
from __future__ import annotations

from typing import Any

from pipeline.core.config import Params
from pipeline.core.distributed import join_job, launched_as_main_rank, shutdown
from pipeline.core.files import write_json
from pipeline.core.seeding import configure_determinism
from pipeline.core.tracking import RunRecord
from pipeline.evaluation.extract import extract_features
from pipeline.method.backbone_export import load_backbone_state
from stages import run_stage
from stages.paths import BACKBONE, EVAL_REPORTS, FEATURES, SHARDS

REPORT = EVAL_REPORTS / "extract.json"


def main(params: Params, record: RunRecord | None = None, progress_bar: bool = True) -> dict[str, Any]:
    """Extract every variant; returns the summary written to ``reports/eval/extract.json``."""
    configure_determinism()
    load_backbone_state(BACKBONE)  # a missing export fails here, before any process group or image
    device, context = join_job(params.extract.device, key="extract.device")
    try:
        summary = extract_features(params, SHARDS, BACKBONE, FEATURES, device, context, progress_bar=progress_bar)
        if context.is_main:
            write_json(summary, REPORT)
            if record is not None:
                record.add_artifact(REPORT, name="extract.json")
            dims = ", ".join(f"{v} {s['dim']}" for v, s in summary["variants"].items())
            counts = next(iter(summary["variants"].values()))
            print(f"extract: train {counts['train']} / val {counts['val']} images; dims {dims} -> {FEATURES}")
        return summary
    finally:
        shutdown(context)


if __name__ == "__main__":
    run_stage("extract", main, enabled=launched_as_main_rank())

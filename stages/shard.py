"""DVC stage `shard`: the image folder in params.yaml -> data/shards (webdataset + manifest).

    python -m stages.shard
"""
from __future__ import annotations

import os
from typing import Any

from pipeline.core.config import Params
from pipeline.core.tracking import RunRecord
from pipeline.data.shard_writer import build_shards
from stages import run_stage
from stages.paths import SHARDS



def main(params: Params, record: RunRecord | None = None, progress_bar: bool = True) -> dict[str, Any]:
    """Write ``data/shards``; returns totals per split, shard count and images/s."""
    # the image check pool: the result does not depend on the worker count
    result = build_shards(params.data, params.seed, SHARDS, workers=os.cpu_count() or 1, progress=progress_bar)
    summary = result.summary()
    if record is not None:
        record.add_artifact(SHARDS / "manifest.json", name="manifest.json")
        record.add_timing(images_per_second=summary["images_per_second"])
        for split, totals in summary["totals"].items():
            for key, value in totals.items():
                record.log_scalar(f"{split}.{key}", value)
    return summary


if __name__ == "__main__":
    run_stage("shard", main)

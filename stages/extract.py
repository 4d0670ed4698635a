"""DVC stage `extract`: frozen features (pretrained / random_init / pixels) for train and val.

    python -m stages.extract                       # CPU or one GPU
    torchrun --nproc_per_node=8 -m stages.extract  # each rank extracts its share, rank 0 writes

Writes ``data/features/<variant>/{train,val}.npz`` and ``reports/eval/extract.json``.

The raw-pixel baseline (``pixels``: every image flattened, 3 x S x S floats) is
left out when its features would exceed :data:`PIXELS_MAX_BYTES` (a one-line
note, and ``left_out`` in extract.json): at the paper's 224 px its 260,000 train
images alone are 157 GB, held in memory before they are written. The pixel
floor is the embedded run's sanity check (32 px: 3,072 floats an image); the
k-NN, few-shot and linear stages and the report take whichever variants exist.
"""
from __future__ import annotations

import shutil
from typing import Any

from pipeline.core.config import Params
from pipeline.core.distributed import join_job, launched_as_main_rank, shutdown
from pipeline.core.files import write_json
from pipeline.core.seeding import configure_determinism
from pipeline.core.tracking import RunRecord
from pipeline.data.shard_reader import open_split
from pipeline.evaluation.extract import extract_features
from pipeline.evaluation.feature_files import SPLITS, VARIANTS
from pipeline.method.backbone_export import load_backbone_state
from stages import run_stage
from stages.paths import BACKBONE, EVAL_REPORTS, FEATURES, SHARDS

REPORT = EVAL_REPORTS / "extract.json"
PIXELS_MAX_BYTES = 2 * 2**30  # 2 GiB of float32 pixel features (train + val): ~175,000 images at 32 px, 3,500 at 224


def feature_variants(params: Params, image_counts: dict[str, int], max_pixel_bytes: int | None = None,
                     ) -> tuple[tuple[str, ...], dict[str, str]]:
    """The variants to extract and ``{variant: why}`` for those left out (the pixel baseline when too large).

    A function of the params and the split sizes only, so every rank and every rerun agrees.
    ``max_pixel_bytes``: default :data:`PIXELS_MAX_BYTES`.
    """
    max_pixel_bytes = PIXELS_MAX_BYTES if max_pixel_bytes is None else max_pixel_bytes
    size = params.extract_image_size()
    images = sum(image_counts.values())
    pixel_bytes = images * 3 * size * size * 4
    if pixel_bytes <= max_pixel_bytes:
        return VARIANTS, {}
    reason = (f"{images:,} images x 3 x {size} x {size} float32 = {pixel_bytes / 2**30:.1f} GiB of raw-pixel "
              f"features, over the {max_pixel_bytes / 2**30:g} GiB limit of the pixel baseline")
    return tuple(v for v in VARIANTS if v != "pixels"), {"pixels": reason}


def split_sizes(params: Params) -> dict[str, int]:
    """Images per split of the shards (index-verified, as the extraction opens them)."""
    sizes = {}
    for name in SPLITS:
        split = open_split(SHARDS, name, verify=params.data.verify)
        sizes[name] = len(split)
        split.close()
    return sizes


def main(params: Params, record: RunRecord | None = None, progress_bar: bool = True) -> dict[str, Any]:
    """Extract every variant; returns the summary written to ``reports/eval/extract.json``."""
    configure_determinism()
    load_backbone_state(BACKBONE)  # a missing export fails here, before any process group or image
    variants, left_out = feature_variants(params, split_sizes(params))
    device, context = join_job(params.extract.device, key="extract.device")
    try:
        summary = extract_features(params, SHARDS, BACKBONE, FEATURES, device, context, variants=variants,
                                   progress_bar=progress_bar)
        if left_out:  # only then: the embedded run's extract.json stays byte-identical
            summary["left_out"] = left_out
        if context.is_main:
            for variant, reason in left_out.items():
                shutil.rmtree(FEATURES / variant, ignore_errors=True)  # an earlier run's, not these shards'
                print(f"extract: {variant} left out: {reason}")
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

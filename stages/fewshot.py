"""DVC stage `fewshot`: k-NN with 1/5/10/20 labelled images per class -> reports/eval/fewshot.json.

    python -m stages.fewshot

Variants: ``pretrained`` (required) and ``random_init`` (if extracted). With
``fewshot.draw: slices`` the train images' source paths come from the shards'
metadata (feature row i is train sample i).
"""
from __future__ import annotations

from typing import Any

from pipeline.core.config import Params
from pipeline.core.distributed import resolve_device
from pipeline.core.errors import UserError
from pipeline.core.files import write_json
from pipeline.core.tracking import RunRecord
from pipeline.data.shard_reader import open_split
from pipeline.evaluation.feature_files import load_variant, required_variants
from pipeline.evaluation.knn import fewshot_knn
from stages import run_stage
from stages.paths import EVAL_REPORTS, FEATURES, SHARDS

OUTPUT = EVAL_REPORTS / "fewshot.json"
VARIANTS = ("pretrained", "random_init")


def main(params: Params, record: RunRecord | None = None) -> dict[str, Any]:
    """Write ``reports/eval/fewshot.json``: ``{variant: fewshot_knn result}``; returns the same."""
    config = params.fewshot
    device = resolve_device(params.knn.device, key="knn.device")
    paths = train_paths(params) if config.draw == "slices" else None
    results = {}
    for variant in required_variants(FEATURES, VARIANTS):
        train, val = load_variant(FEATURES, variant)
        if paths is not None and len(paths) != len(train):
            raise UserError(f"{FEATURES}/{variant}: {len(train)} train features for {len(paths)} train images in "
                             f"{SHARDS}; rerun the extract stage")
        results[variant] = fewshot_knn(
            train, val, config.shots, config.draws, config.k, config.temperature, seed=params.seed,
            chunk_size=params.knn.chunk_size, device=device, paths=paths,
        )
        if record is not None:
            for shots, value in results[variant].items():
                if shots != "skipped":
                    record.log_scalar(f"{variant}.top1.shots{shots}", value["mean"])
    write_json(results, OUTPUT, decimals=4)
    print(format_table(results, config.draws))
    return results


def train_paths(params: Params) -> list[str]:
    """Each train image's source path, in the shards' (and so the feature files') row order."""
    split = open_split(SHARDS, "train", verify=params.data.verify)
    return [split.metadata(i)["path"] for i in range(len(split))]


def format_table(results: dict[str, dict[str, Any]], draws: int) -> str:
    """Mean +- std top-1 per shot count, one row per variant; skipped shot counts with their reason."""
    lines = [f"few-shot k-NN top-1, mean +- std over {draws} draws"]
    for variant, result in results.items():
        cells = [f"{s}-shot {r['mean']:.2f} +- {r['std']:.2f}" for s, r in result.items() if s != "skipped"]
        lines.append(f"  {variant:<14}" + "   ".join(cells))
        for shots, reason in result["skipped"].items():
            lines.append(f"  {'':<14}{shots}-shot skipped: {reason}")
    return "\n".join(lines)


if __name__ == "__main__":
    run_stage("fewshot", main)

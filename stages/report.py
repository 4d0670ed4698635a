"""DVC stage `report`: figures, reports/report.json and reports/README.md.

    python -m stages.report

Declared (deterministic) outputs: ``reports/figures/`` and ``reports/report.json``.
``reports/README.md`` also names the commit, sacred runs, machines and wall
times, which change on every run, so it is written but not declared (dvc.yaml).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import yaml

from pipeline.core.config import Params
from pipeline.core.files import atomic_write_text
from pipeline.data.augment import eval_transform
from pipeline.method.backbone_export import load_backbone
from pipeline.reporting.figures import (
    mask_examples, pick_examples, plot_finetune_curve, plot_losses, plot_mask_figure, plot_masked_share,
    read_csv_columns, save_png,
)
from pipeline.core.tracking import RunRecord
from pipeline.data.shard_reader import open_split
from pipeline.reporting.metrics import read_timings
from pipeline.reporting.readme import collect_report, describe_machine, git_commit, render_readme, summarize_markdown, write_report_json
from stages import run_stage
from stages.paths import BACKBONE, REPORTS, SHARDS

EVAL = REPORTS / "eval"
PRETRAIN = REPORTS / "pretrain"
TIMING = REPORTS / "timing"
FIGURES = REPORTS / "figures"
REPORT_JSON = REPORTS / "report.json"
README = REPORTS / "README.md"
OTHER_REPORTS = ("comparison.md", "reliability.md", "bench.md")  # linked when present
EXAMPLES = 6  # val images in the qualitative figure


def make_figures(params: Params) -> dict[str, str]:
    """Write the PNGs under ``reports/figures``; returns name -> path relative to ``reports/``."""
    written = {}

    def save(name: str, figure: Any) -> None:
        save_png(figure, FIGURES / f"{name}.png")
        written[name] = f"figures/{name}.png"

    split = open_split(SHARDS, "val", verify=params.data.verify)
    try:
        indices = pick_examples(split.labels, EXAMPLES, params.seed)
        size = params.augment.global_size  # the teacher ranks patches on global crops of this size
        transform = eval_transform(size)
        images = torch.stack([transform(split.image(i)) for i in indices])
        names = [f"val_{i:06d}\n{split.classes[split.label(i)]}" for i in indices]
    finally:
        split.close()
    vit = load_backbone(params.model, BACKBONE)
    examples = mask_examples(vit, images, names, params.patch_size(), params.masking.ratio,
                             params.masking.show_max, params.seed)
    save("masks", plot_mask_figure(examples))

    steps = read_csv_columns(PRETRAIN / "steps.csv")
    save("losses", plot_losses(steps, uniform_loss=math.log(params.model.out_dim)))
    save("masked_share", plot_masked_share(steps, expected=params.masking.prob * params.masking.ratio))
    if (EVAL / "finetune_curve.csv").is_file():
        save("finetune", plot_finetune_curve(read_csv_columns(EVAL / "finetune_curve.csv")))
    return written


def main(params: Params, record: RunRecord | None = None) -> dict[str, Any]:
    """Write the figures, ``report.json`` and ``README.md``; returns the report dict."""
    torch.use_deterministic_algorithms(True)
    figures = make_figures(params)
    report = collect_report(EVAL, PRETRAIN, SHARDS / "manifest.json", params, figures)
    write_report_json(report, REPORT_JSON)

    stages = [s for s in yaml.safe_load(Path("dvc.yaml").read_text())["stages"] if s != "report"]
    others = {name: summarize_markdown(REPORTS / name) for name in OTHER_REPORTS}
    readme = render_readme(report, git_commit(), describe_machine(), read_timings(TIMING, stages), others)
    atomic_write_text(README, readme)
    if record is not None:
        record.add_artifact(REPORT_JSON, name="report.json")
        record.add_artifact(README, name="README.md")
    print(f"report: {len(figures)} figures -> {FIGURES}, {REPORT_JSON}, {README}")
    return report


if __name__ == "__main__":
    run_stage("report", main)

"""DVC stage `report`: figures, reports/report.json and reports/README.md.

    python -m stages.report

Declared (deterministic) outputs: ``reports/figures/`` and ``reports/report.json``.
``reports/README.md`` also names the commit whose pipeline inputs these are, the
machines and whether the companion reports are current: written, git-tracked, but
not declared (dvc.yaml). The stages' clock readings go to the terminal and the
machine-local ``reports/timing/summary.md``.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import yaml

from pipeline.core.config import Params
from pipeline.core.files import atomic_write_text
from pipeline.core.lock_machine import RECORD_NAME as LOCK_RECORD, build_record, write_record
from pipeline.core.tracking import RunRecord, machine_info
from pipeline.data.augment import eval_transform
from pipeline.data.shard_reader import open_split
from pipeline.method.backbone_export import load_backbone
from pipeline.reporting import provenance
from pipeline.reporting.figures import (
    mask_examples, mask_figure_data, pick_examples, plot_finetune_curve, plot_losses, plot_mask_figure,
    plot_masked_share, read_csv_columns, save_png,
)
from pipeline.reporting.metrics import read_timings
from pipeline.reporting.readme import collect_report, companion_statuses, render_readme, write_report_json
from pipeline.reporting.timing import render_summary
from stages import run_stage
from stages.paths import BACKBONE, REPORTS, SHARDS, TIMING

EVAL = REPORTS / "eval"
PRETRAIN = REPORTS / "pretrain"
FIGURES = REPORTS / "figures"
REPORT_JSON = REPORTS / "report.json"
README = REPORTS / "README.md"
TIMING_SUMMARY = TIMING / "summary.md"
STAGE = "report"
EXAMPLES = 6  # val images in the qualitative figure


def make_figures(params: Params) -> tuple[dict[str, str], dict[str, Any]]:
    """Write the PNGs under ``reports/figures``; returns (name -> path relative to ``reports/``,
    name -> what the figure shows as numbers, for ``report.json``)."""
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
    data = {"masks": mask_figure_data(examples)}

    steps = read_csv_columns(PRETRAIN / "steps.csv")
    save("losses", plot_losses(steps, uniform_loss=math.log(params.model.out_dim)))
    save("masked_share", plot_masked_share(steps, expected=params.masking.prob * params.masking.ratio))
    if (EVAL / "finetune_curve.csv").is_file():
        save("finetune", plot_finetune_curve(read_csv_columns(EVAL / "finetune_curve.csv")))
    return written, data


def main(params: Params, record: RunRecord | None = None) -> dict[str, Any]:
    """Write the figures, ``report.json``, ``README.md`` and the timing summary; returns the report dict."""
    torch.use_deterministic_algorithms(True)
    figures, figure_data = make_figures(params)
    report = collect_report(EVAL, PRETRAIN, SHARDS / "manifest.json", params, figures, figure_data)
    write_report_json(report, REPORT_JSON)

    stages = list(yaml.safe_load(Path("dvc.yaml").read_text())["stages"])
    timings = read_timings(TIMING, stages)
    timings[STAGE] = None  # this run's record is written when the stage ends; an older one is not this run's
    origin = provenance.record(params_sha=report["params_sha256"], threads=torch.get_num_threads())
    companions = companion_statuses(REPORTS, params_sha=report["params_sha256"])
    readme = render_readme(report, origin, timings, companions, this_stage=STAGE, this_machine=machine_info())
    atomic_write_text(README, readme)
    # beside dvc.lock: which CPUs computed its outputs, for CI's check that a fresh clone reproduces it
    machines = {**timings, STAGE: {"machine": machine_info()}}
    write_record(build_record(machines, params.numerics), Path(LOCK_RECORD))
    summary = render_summary(timings, pending=STAGE)
    atomic_write_text(TIMING_SUMMARY, summary)
    if record is not None:
        record.add_artifact(REPORT_JSON, name="report.json")
        record.add_artifact(README, name="README.md")
    print(summary)
    print(f"report: {len(figures)} figures -> {FIGURES}, {REPORT_JSON}, {README}, {TIMING_SUMMARY}")
    return report


if __name__ == "__main__":
    run_stage("report", main)

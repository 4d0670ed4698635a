"""The report renderer: report.json and README.md (pipeline/reporting/readme.py)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


from pipeline.core.config import Params, params_from_dict
from pipeline.reporting.readme import (
    collect_report, format_machine, ratio_label, render_readme, summarize_markdown,
)

# ------------------------------------------------------------------ fabricated inputs
KNN = {
    "pretrained": {"top1": {"10": 60.0, "20": 61.2}, "top5": {"10": 90.0, "20": 91.0}, "temperature": 0.07},
    "random_init": {"top1": {"10": 20.0, "20": 21.5}, "top5": {"10": 50.0, "20": 51.0}, "temperature": 0.07},
    "pixels": {"top1": {"10": 15.0, "20": 14.4}, "top5": {"10": 45.0, "20": 44.0}, "temperature": 0.07},
}
FEWSHOT = {
    variant: {"1": {"k": 10, "mean": mean, "std": 1.5, "runs": [mean] * 5},
              "5": {"k": 20, "mean": mean + 10, "std": 0.25, "runs": [mean + 10] * 5}, "skipped": {}}
    for variant, mean in (("pretrained", 12.3), ("random_init", 8.0))
}
LINEAR = {"pretrained": {"top1": 70.3}, "random_init": {"top1": 25.0}}
FINETUNE = {"pretrained": {"top1": 80.4}, "random_init": {"top1": 40.0}}
PRETRAIN = {"epochs": 2, "steps": 10, "final_loss": 5.0, "final_loss_cls": 3.0, "final_loss_patch": 2.0,
            "first_epoch_loss": 6.0, "masked_share": 0.15}
MANIFEST = {"source": "synthetic", "classes": ["a", "b"], "totals": {"train": {"selected": 20}, "val": {"selected": 6}},
            "rejected": []}


def write_inputs(root: Path, skip: tuple[str, ...] = ()) -> tuple[Path, Path, Path]:
    """reports/eval/*.json, reports/pretrain/metrics.json and a manifest under ``root``."""
    files = {"eval/knn.json": KNN, "eval/fewshot.json": FEWSHOT, "eval/linear.json": LINEAR,
             "eval/finetune.json": FINETUNE, "pretrain/metrics.json": PRETRAIN, "shards/manifest.json": MANIFEST}
    for name, content in files.items():
        if Path(name).stem not in skip:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text(json.dumps(content))
    return root / "eval", root / "pretrain", root / "shards" / "manifest.json"


def params(**sections: dict[str, Any]) -> Params:
    raw: dict[str, Any] = {"data": {"synthetic": {"train_per_class": 200}}}
    raw.update(sections)
    return params_from_dict(raw)


COMMIT = {"sha": "0123456789abcdef0123456789abcdef01234567", "dirty": []}
MACHINE = {"device": "cpu", "cpu": "Test CPU", "threads": 2}


def render(tmp_path: Path, skip: tuple[str, ...] = (), timings: dict[str, Any] | None = None,
           others: dict[str, str | None] | None = None, p: Params | None = None) -> tuple[dict[str, Any], str]:
    eval_dir, pretrain_dir, manifest = write_inputs(tmp_path, skip)
    report = collect_report(eval_dir, pretrain_dir, manifest, p or params(), {"masks": "figures/masks.png"})
    timings = timings if timings is not None else {"pretrain": None}
    return report, render_readme(report, COMMIT, MACHINE, timings, others or {})


# --------------------------------------------------------------------------- renderer
def test_results_table_in_the_papers_format(tmp_path: Path) -> None:
    report, text = render(tmp_path)
    assert "| masking | ratio | k-NN | linear | fine-tuning |" in text
    assert "| **AttMask-High** (this run) | 10-50% | 61.2 | 70.3 | 80.4 |" in text
    assert "| random init (baseline) | - | 21.5 | 25.0 | 40.0 |" in text
    assert "| raw pixels (baseline) | - | 14.4 | - | - |" in text
    assert "| supervised reference: same ViT, labels, from random init | - | | | 40.0 |" in text  # random-init fine-tuning
    assert "so the reference is no upper bound here" in text
    assert "reach k-NN 153% and linear probe 176% of it" in text
    assert report["supervised_reference"]["knn_share"] == 153.0
    assert "*49.7*" in text and "theirs" in text  # the paper's row, labelled as theirs
    assert "Pre-trained minus random init, in points: knn +39.7, linear +45.3, finetune +40.4." in text
    assert report["knn_k"] == 20 and report["table"]["pretrained"] == {"knn": 61.2, "linear": 70.3, "finetune": 80.4}


def test_the_official_sgd_probe_is_reported_only_when_it_ran(tmp_path: Path) -> None:
    report, text = render(tmp_path / "off")
    assert report["linear_sgd"] is None and "Official linear probe" not in text
    (tmp_path / "on" / "eval").mkdir(parents=True)
    entry = {"top1": 61.0, "best_top1": 62.5, "best_epoch": 97, "epochs": 100, "curve": [[97, 62.5], [99, 61.0]]}
    (tmp_path / "on" / "eval" / "linear_sgd.json").write_text(json.dumps({"enabled": True, "pretrained": entry}))
    report, text = render(tmp_path / "on")
    assert report["linear_sgd"] == {"pretrained": {"top1": 61.0, "best_top1": 62.5, "best_epoch": 97, "epochs": 100}}
    assert ("100 epochs), top-1 after the last epoch: pre-trained (this run) 61.0 (best 62.5 at epoch 97, the number "
            "the official script reports).") in text


def test_fewshot_and_knn_tables(tmp_path: Path) -> None:
    _, text = render(tmp_path)
    assert "| pre-trained (this run) | 12.3 ± 1.5 | 22.3 ± 0.2 |" in text
    assert "| random init | 8.0 ± 1.5 | 18.0 ± 0.2 |" in text
    assert "mean ± std over 5 seeded draws" in text
    assert "| pre-trained (this run) | 60.0 / 90.0 | 61.2 / 91.0 |" in text


def test_header_names_commit_params_data_and_stages(tmp_path: Path) -> None:
    timing = {"stage": "pretrain", "sacred_run": {"stage": "pretrain", "id": 3, "dir": "runs/sacred/pretrain/3"},
              "wall_seconds": 603.2, "machine": {"device": "cpu", "cpu": "AMD EPYC", "threads": 2},
              "images_per_second": 26.31}
    report, text = render(tmp_path, timings={"pretrain": timing, "knn": None})
    assert COMMIT["sha"] in text
    assert report["params_sha256"] in text and len(report["params_sha256"]) == 64
    assert report["data"]["manifest_sha256"] in text and "20 train / 6 val images" in text
    assert "| pretrain | `runs/sacred/pretrain/3` | 10 min 03 s | cpu (AMD EPYC), 2 threads | images per second 26.3 |" in text
    assert "| knn | not recorded | not recorded | not recorded | |" in text
    assert "| machine (this report) | cpu (Test CPU), 2 threads |" in text


def test_missing_optional_inputs_render(tmp_path: Path) -> None:
    report, text = render(tmp_path, skip=("finetune", "fewshot"), timings={"pretrain": None, "knn": None})
    assert "| **AttMask-High** (this run) | 10-50% | 61.2 | 70.3 | - |" in text
    assert "Not run yet" in text and "finetune.json" in text
    assert "### Few-shot k-NN\n\nnot run" in text
    assert "machine (stages) | not recorded" in text
    assert "Other reports" not in text  # no reliability.md / bench.md
    assert "| supervised reference: same ViT" not in text and "No supervised reference: the fine-tuning stage has not run." in text


def test_other_reports_are_linked_with_a_summary(tmp_path: Path) -> None:
    (tmp_path / "reliability.md").write_text("# Reliability\n\nSeed spread is 1.2 points.\nSecond line.\n\n## More\n")
    summary = summarize_markdown(tmp_path / "reliability.md")
    assert summary == "Reliability: Seed spread is 1.2 points. Second line."
    assert summarize_markdown(tmp_path / "bench.md") is None
    _, text = render(tmp_path, others={"reliability.md": summary, "bench.md": None})
    assert "- [`reliability.md`](reliability.md): Reliability: Seed spread is 1.2 points." in text
    assert "bench.md" not in text


def test_report_json_holds_nothing_volatile(tmp_path: Path) -> None:
    report, _ = render(tmp_path)
    again, _ = render(tmp_path)
    assert json.dumps(report, sort_keys=True) == json.dumps(again, sort_keys=True)
    text = json.dumps(report)
    assert COMMIT["sha"] not in text and "Test CPU" not in text and "wall" not in text


def test_ratio_label_and_machine() -> None:
    assert ratio_label(params().masking) == "10-50%"
    assert ratio_label(params(masking={"strategy": "random", "ratio": 0.75, "ratio_var": 0.0}).masking) == "75%"
    assert format_machine({"device": "cuda", "gpu": "H100", "gpu_count": 8, "threads": 16}) == "cuda (H100) x8, 16 threads"
    assert format_machine(None) == "not recorded"

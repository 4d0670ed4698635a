"""The report renderer: report.json and README.md (pipeline/reporting/readme.py, timing.py)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


from pipeline.core.config import Params, params_from_dict
from pipeline.reporting import provenance
from pipeline.reporting.readme import (
    FLAT_MAX_OVER_MIN, collect_report, companion_statuses, format_machine, ratio_label, render_readme,
)

# ------------------------------------------------------------------ fabricated inputs
KNN = {
    "pretrained": {"top1": {"10": 60.0, "20": 61.2}, "top5": {"10": 90.0, "20": 91.0}, "temperature": 0.07, "num_val": 500},
    "random_init": {"top1": {"10": 20.0, "20": 21.5}, "top5": {"10": 50.0, "20": 51.0}, "temperature": 0.07, "num_val": 500},
    "pixels": {"top1": {"10": 15.0, "20": 14.4}, "top5": {"10": 45.0, "20": 44.0}, "temperature": 0.07, "num_val": 500},
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


PROVENANCE = {"format": 1, "commit": {"state": "clean", "commit": "0123456789abcdef0123456789abcdef01234567",
                                     "head": "89abcdef0123456789abcdef0123456789abcdef"},
              "params_sha256": None, "date": "2026-01-02", "input_paths": [], "inputs": {},
              "machine": {"cpu_vendor": "GenuineIntel", "cpu": "Test CPU", "threads": 2,
                          "numerics": {"mode": "portable"}, "environment": {"python": "3.11.7"}}}
MACHINE = {"device": "cpu", "cpu": "Test CPU", "threads": 2}
MASKS_DATA = {"patches": 16, "ratio": 0.3, "count": 4, "attention_max_over_min": [1.7, 4.0, 18.0],
              "attention_entropy": [0.99, 0.9, 0.7], "hint_revealed": [0, 0, 0]}


def render(tmp_path: Path, skip: tuple[str, ...] = (), timings: dict[str, Any] | None = None,
           companions: list[dict[str, Any]] | None = None, p: Params | None = None,
           figure_data: dict[str, Any] | None = None) -> tuple[dict[str, Any], str]:
    eval_dir, pretrain_dir, manifest = write_inputs(tmp_path, skip)
    report = collect_report(eval_dir, pretrain_dir, manifest, p or params(), {"masks": "figures/masks.png"},
                            {"masks": MASKS_DATA} if figure_data is None else figure_data)
    timings = timings if timings is not None else {"pretrain": None}
    return report, render_readme(report, PROVENANCE, timings, companions or [], this_machine=MACHINE)


# --------------------------------------------------------------------------- renderer
def test_results_table_in_the_papers_format(tmp_path: Path) -> None:
    report, text = render(tmp_path)
    assert "| masking | ratio | k-NN | linear | fine-tuning |" in text
    assert "| **AttMask-High** (this run) | 10-50% | 61.2 | 70.3 | 80.4 |" in text
    assert "| raw pixels (baseline) | - | 14.4 | - | - |" in text
    assert "*49.7*" in text and "theirs" in text  # the paper's row, labelled as theirs
    assert "Pre-trained minus random init, in points: knn +39.7, linear +45.3, finetune +40.4." in text
    assert report["knn_k"] == 20 and report["table"]["pretrained"] == {"knn": 61.2, "linear": 70.3, "finetune": 80.4}


def test_the_supervised_reference_is_the_random_init_finetune_run_listed_once_and_compared_like_with_like(
        tmp_path: Path) -> None:
    report, text = render(tmp_path)
    assert "| random init (baseline); its fine-tuning is the supervised reference | - | 21.5 | 25.0 | 40.0 |" in text
    assert text.count("| 40.0 |") == 1  # no second row repeating the same run
    assert "the same run as the random-init fine-tuning cell (40.0), listed once" in text
    assert "fine-tuning the pre-trained backbone instead gives 80.4 (+40.4 points)" in text
    assert "%" not in text.split("The supervised reference")[1].split(".")[0]  # no k-NN / fine-tune share
    assert report["supervised_reference"] == {"model": report["supervised_reference"]["model"],
                                              "variant": "random_init", "top1": 40.0}


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
    # 2 classes and 6 val images: chance 50% +- 2 x 20.4 (binomial SE), so every cell is within noise of chance
    assert "| pre-trained (this run) | 12.3 ± 1.5 (chance) | 22.3 ± 0.2 (chance) |" in text
    assert "mean ± std over 5 seeded draws" in text
    assert "| pre-trained (this run) | 60.0 / 90.0 | 61.2 / 91.0 |" in text


def test_fewshot_cells_within_noise_of_chance_are_marked_and_the_rule_stated(tmp_path: Path) -> None:
    fewshot = {"pretrained": {"1": {"mean": 9.9, "std": 1.0, "runs": [9.9] * 5},
                              "5": {"mean": 12.6, "std": 0.8, "runs": [12.6] * 5}},
               "random_init": {"1": {"mean": 10.4, "std": 1.3, "runs": [10.4] * 5},
                               "5": {"mean": 11.9, "std": 0.8, "runs": [11.9] * 5}}}
    manifest = {**MANIFEST, "classes": [f"c{i}" for i in range(10)], "totals": {"val": {"selected": 5000}}}
    eval_dir, pretrain_dir, manifest_path = write_inputs(tmp_path)
    (eval_dir / "fewshot.json").write_text(json.dumps(fewshot))
    manifest_path.write_text(json.dumps(manifest))
    report = collect_report(eval_dir, pretrain_dir, manifest_path, params(), {})
    text = render_readme(report, PROVENANCE, {}, [])
    # chance 10%; binomial SE on 5000 val images 0.42, so the draws' std rules: 2 x 1.0, 2 x 0.8, 2 x 1.3, 2 x 0.8
    assert "| pre-trained (this run) | 9.9 ± 1.0 (chance) | 12.6 ± 0.8 |" in text  # 2.6 > 1.6: a difference
    assert "| random init | 10.4 ± 1.3 (chance) | 11.9 ± 0.8 |" in text  # 1.9 > 1.6
    assert "within noise of chance (10.0%, 10 classes), i.e. |mean - chance| < 2 x the larger of the draws' std" in text
    assert "binomial standard error of one draw on the 5000 val images: 2 cell(s)" in text


def test_header_names_the_commit_of_the_inputs_params_data_and_machine_and_no_date(tmp_path: Path) -> None:
    report, text = render(tmp_path)
    header = text.split("## Results")[0]
    assert ("| commit | `0123456789abcdef0123456789abcdef01234567`, the commit whose pipeline inputs these are"
            in header)
    assert report["params_sha256"] in header and len(report["params_sha256"]) == 64
    assert report["data"]["manifest_sha256"] in header and "20 train / 6 val images" in header
    assert "| machine | GenuineIntel Test CPU, 2 threads, numerics portable |" in header
    assert "2026-01-02" not in text and "| date |" not in text  # a date would change on a rerun


def test_stage_table_has_machines_but_no_clock_readings_or_run_ids(tmp_path: Path) -> None:
    timing = {"stage": "pretrain", "sacred_run": {"stage": "pretrain", "id": 3, "dir": "runs/sacred/pretrain/3"},
              "wall_seconds": 603.2, "machine": {"device": "cpu", "cpu": "AMD EPYC", "threads": 2},
              "images_per_second": 26.31, "process_cpu_seconds": 1200.5}
    _, text = render(tmp_path, timings={"pretrain": timing, "knn": None, "metrics": None, "report": None})
    assert "| pretrain | cpu (AMD EPYC), 2 threads | `reports/timing/pretrain.json` |" in text
    assert "| knn | - | none on this machine (no `reports/timing/knn.json`) |" in text
    assert "| metrics | - | none kept: the stage only merges JSON files" in text
    assert "| report | cpu (Test CPU), 2 threads | this stage: written after this file" in text
    for volatile in ("603", "10 min", "26.3", "1200", "runs/sacred/pretrain/3"):
        assert volatile not in text
    assert "`reports/timing/summary.md`" in text


def test_the_timing_summary_holds_the_clock_readings() -> None:
    from pipeline.reporting.timing import render_summary

    timing = {"sacred_run": {"stage": "pretrain", "id": 3}, "wall_seconds": 603.2, "images_per_second": 26.31,
              "process_cpu_seconds": 1200.5, "machine": {"device": "cpu"}}
    text = render_summary({"pretrain": timing, "report": None}, pending="report")
    assert "| pretrain | `runs/sacred/pretrain/3` | 10 min 03 s | 1200.5 | images per second 26.3 |" in text
    assert "| report | not recorded | not recorded | | running now: recorded when it ends |" in text
    assert "| **total** | | 10 min 03 s | | 1 of 2 stages recorded |" in text


def test_missing_optional_inputs_render(tmp_path: Path) -> None:
    report, text = render(tmp_path, skip=("finetune", "fewshot"), timings={"pretrain": None, "knn": None})
    assert "| **AttMask-High** (this run) | 10-50% | 61.2 | 70.3 | - |" in text
    assert "Not run yet" in text and "finetune.json" in text
    assert "### Few-shot k-NN\n\nnot run" in text
    assert "supervised reference |" not in text and "No supervised reference: the fine-tuning stage has not run." in text


def test_flatness_is_judged_from_the_attention_not_the_cls_loss(tmp_path: Path) -> None:
    # final [CLS] loss within 5% of ln(64) = 4.159: the loss alone would have called the maps flat
    pretrain = {**PRETRAIN, "final_loss_cls": 4.0}
    (tmp_path / "pretrain").mkdir(parents=True)
    (tmp_path / "pretrain" / "metrics.json").write_text(json.dumps(pretrain))
    p = params(model={"out_dim": 64})
    eval_dir, pretrain_dir, manifest = write_inputs(tmp_path, skip=("metrics",))
    peaked = collect_report(eval_dir, pretrain_dir, manifest, p, {}, {"masks": MASKS_DATA})
    text = render_readme(peaked, PROVENANCE, {}, [])
    assert "within 5% of ln(out_dim) = 4.159" in text
    assert "nearly flat:" not in text
    assert "The teacher's attention is not flat: max/min attention over patches 1.7-18.0 (median 4.0)" in text
    assert "1 of them nearly flat (below 2)" in text
    flat = collect_report(eval_dir, pretrain_dir, manifest, p, {},
                          {"masks": {**MASKS_DATA, "attention_max_over_min": [1.1, 1.3, 1.05]}})
    assert "The teacher's attention maps below are nearly flat" in render_readme(flat, PROVENANCE, {}, [])
    assert max(flat["figure_data"]["masks"]["attention_max_over_min"]) < FLAT_MAX_OVER_MIN


def test_the_masks_caption_says_when_hint_reveals_nothing(tmp_path: Path) -> None:
    _, text = render(tmp_path)
    caption = text.split("**masks.**")[1].split("![masks]")[0]
    assert "On this 16-patch grid Hint reveals 0 patches (floor(show_max x r x P) = floor(0.1 x 0.3 x 16) = 0" in caption
    assert "so its masks equal High's" in caption and "cyan" not in caption
    _, text = render(tmp_path, figure_data={"masks": {**MASKS_DATA, "patches": 196, "hint_revealed": [5, 5, 4]}})
    assert "Here Hint reveals 4-5 patch(es) per image (cyan outline)." in text


def test_companion_reports_are_current_stale_or_missing(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "pipeline").mkdir(parents=True)
    (repo / "pipeline" / "a.py").write_text("a = 1\n")
    (repo / "pipeline" / "b.py").write_text("b = 1\n")
    reports = repo / "reports"
    (reports / "bench").mkdir(parents=True)
    fresh = provenance.record(repo, inputs=("pipeline",), params_sha="p1")
    (reports / "comparison.md").write_text("# c\n")
    (reports / "comparison.json").write_text(json.dumps({"provenance": fresh}))
    (reports / "bench.md").write_text("# b\n")
    (reports / "bench" / "provenance.json").write_text(json.dumps(
        {"provenance": {"sources": {"data.json": None, "pretrain_step.json": fresh}}}))
    statuses = {s["name"]: s for s in companion_statuses(reports, repo, params_sha="p1")}
    assert statuses["comparison.md"]["state"] == "current"
    assert statuses["bench.md"]["state"] == "stale"
    assert statuses["bench.md"]["why"] == "`data.json`: its inputs are unknown (before provenance was recorded)"
    assert statuses["reliability.md"]["state"] == "missing"

    (repo / "pipeline" / "b.py").write_text("b = 2\n")
    statuses = companion_statuses(reports, repo, params_sha="p1")
    assert statuses[0]["why"] == "`pipeline/b.py` changed since it was produced"
    assert companion_statuses(reports, repo, params_sha="p2")[0]["why"].endswith("; the params changed too")

    _, text = render(tmp_path / "r", companions=companion_statuses(reports, repo, params_sha="p1"))
    section = text.split("## Companion reports")[1].split("## How")[0]
    assert ("- [`comparison.md`](comparison.md) (`make compare`): **stale**: `pipeline/b.py` changed since it was "
            "produced.") in section
    assert "- `reliability.md` (`pytest tests/reliability`): not generated." in section


def test_report_json_holds_nothing_volatile(tmp_path: Path) -> None:
    report, _ = render(tmp_path)
    again, _ = render(tmp_path)
    assert json.dumps(report, sort_keys=True) == json.dumps(again, sort_keys=True)
    text = json.dumps(report)
    assert PROVENANCE["commit"]["commit"] not in text and "Test CPU" not in text and "wall" not in text


def test_the_readme_repeats_byte_for_byte_for_the_same_inputs(tmp_path: Path) -> None:
    timing = {"pretrain": {"wall_seconds": 1.0, "sacred_run": 1, "machine": MACHINE}, "report": None}
    _, first = render(tmp_path, timings=timing)
    timing["pretrain"].update(wall_seconds=99.0, sacred_run=2)  # another run on the same kind of machine
    _, second = render(tmp_path, timings=timing)
    assert first == second


def test_ratio_label_and_machine() -> None:
    assert ratio_label(params().masking) == "10-50%"
    assert ratio_label(params(masking={"strategy": "random", "ratio": 0.75, "ratio_var": 0.0}).masking) == "75%"
    assert format_machine({"device": "cuda", "gpu": "H100", "gpu_count": 8, "threads": 16}) == "cuda (H100) x8, 16 threads"
    assert format_machine(None) == "not recorded"


def test_a_run_below_random_init_says_so_in_its_first_lines(tmp_path):
    """The small-folder case: pre-trained k-NN 10 points under random init, the probe within noise."""
    import copy

    report, text = render(tmp_path / "good")
    assert report["margins"]["knn"]["verdict"] == "gain" and "random init" not in "\n".join(text.splitlines()[:3])

    worse = copy.deepcopy(report)
    worse["table"]["pretrained"].update(knn=49.6, linear=81.6)
    worse["table"]["random_init"].update(knn=59.7, linear=86.1)
    from pipeline.reporting.metrics import gain_margins

    worse["margins"] = gain_margins(worse["table"], 500)
    first = render_readme(worse, PROVENANCE, {"pretrain": None}, [], this_machine=MACHINE).splitlines()[2]
    assert first.startswith("**Pre-training made these features worse than random init.**")
    assert "k-NN -10.1 points (49.6 against 59.7, noise ±6.3)" in first
    assert "the linear probe -4.5 points" in first and "fine-tuning" not in first
    assert "steps" in first and "ln(out_dim)" in first and "`pretrain.min_steps`" in first


def test_few_shot_counts_the_data_cannot_serve_are_named_not_dropped(tmp_path):
    report, _ = render(tmp_path)
    report["fewshot_skipped"] = {"pretrained": {"20": "needs 100 train images per class; class 0 has 5"}}
    text = render_readme(report, PROVENANCE, {}, [])
    assert "- 20 / class: skipped, needs 100 train images per class; class 0 has 5." in text
    report["fewshot"] = {"pretrained": {}, "random_init": {}}
    text = render_readme(report, PROVENANCE, {}, [])
    assert "Every shot count was skipped" in text and "20 / class: skipped" in text

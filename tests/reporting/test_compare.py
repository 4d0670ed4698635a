"""The strategy comparison: plan, params validation, and rendering from a fabricated `dvc exp show --json`.

The document has the shape DVC 3 writes (checked against a real queue run):
a list of baselines, each with ``experiments[].revs[].data`` holding
``params["params.yaml"]["data"]`` and ``metrics[<file>]["data"]``.
"""
from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.core.config import CompareConfig, ParamsError, params_from_dict, set_dotted
from pipeline.reporting import compare as compare_module
from pipeline.reporting.compare import Experiment, Found, match, plan, render, rerender, wall_time_statement
from stages import compare as compare_stage
from tests.conftest import REPO

RAW = yaml.safe_load((REPO / "params.yaml").read_text())
# k-NN per (strategy row, seed): attmask_high clearly above block; the rest overlap
KNN = {"block": (20.0, 21.0), "random": (21.0, 24.0), "random_75": (21.0, 24.0), "attmask_low": (19.0, 23.0),
       "attmask_hint": (24.0, 27.0), "attmask_high": (30.0, 32.0)}


def config(**changes: Any) -> CompareConfig:
    raw = copy.deepcopy(RAW)
    raw.setdefault("compare", {}).update(changes)
    return params_from_dict(raw).compare


def dvc_params(experiment: Experiment) -> dict[str, Any]:
    """params.yaml as DVC writes it for ``-S`` overrides (the compare section stays in the file)."""
    params = copy.deepcopy(RAW)
    for entry in experiment.overrides:
        dotted, _, text = entry.partition("=")
        set_dotted(params, dotted, yaml.safe_load(text))
    return params


def fabricated_metrics(experiment: Experiment) -> dict[str, Any]:
    knn = KNN[experiment.row.name][experiment.seed] - (10.0 if experiment.percent == 25 else 0.0)
    return {
        "knn": {"10": knn - 1, "20": knn, "100": knn - 2, "200": knn - 3},
        "linear": {"top1": 40.0 + experiment.seed},  # the same for every strategy: no difference
        "finetune": {"top1": 50.0 + (5.0 if experiment.row.name == "block" else 0.0) + experiment.seed * 0.5},
        "baselines": {"random_init": {"knn": {"20": 11.0 + experiment.seed}, "linear": {"top1": 12.0},
                                      "finetune": {"top1": 30.0 + experiment.seed}}},
    }


def exp_show(experiments: list[Experiment], metrics=fabricated_metrics, timestamp: str = "2025-01-01T10:00:00") -> list:
    revs = []
    for i, e in enumerate(experiments):
        data = {"rev": f"{i:040x}", "timestamp": timestamp,
                "params": {"params.yaml": {"data": dvc_params(e)}},
                "metrics": {"reports/metrics.json": {"data": metrics(e)},
                            "reports/eval/extract.json": {"data": {"num_classes": 10}}},
                "deps": {}, "outs": {}, "meta": {}}
        revs.append({"executor": None, "name": e.name,
                     "revs": [{"rev": f"{i:040x}", "name": e.name, "data": data, "error": None, "experiments": None}]})
    workspace = {"rev": "workspace", "name": None, "error": None, "experiments": None,
                 "data": {"rev": "workspace", "timestamp": None, "params": {"params.yaml": {"data": RAW}}, "metrics": {}}}
    baseline = {"rev": "f" * 40, "name": "main", "error": None, "experiments": revs,
                "data": {"rev": "f" * 40, "timestamp": "2025-01-01T09:00:00", "params": {"params.yaml": {"data": RAW}},
                         "metrics": {}}}
    return [workspace, baseline]


@pytest.fixture(scope="module")
def two_seeds() -> tuple[CompareConfig, list[Experiment]]:
    cfg = config(seeds=[0, 1], data_shares=[25, 100])
    return cfg, plan(RAW, cfg)


def test_plan_is_the_papers_table_plus_the_data_shares(two_seeds):
    cfg, experiments = two_seeds
    assert len(experiments) == 6 * 2 + 2 * 2  # 100% reuses the strategy runs
    assert len({e.name for e in experiments}) == len(experiments)
    mae = next(e for e in experiments if e.row.name == "random_75")
    assert {"masking.strategy=random", "masking.ratio=0.75", "masking.ratio_var=0"} <= set(mae.overrides)
    for e in experiments:
        assert e.overrides[: len(cfg.budget)] == cfg.budget
        assert ("data.percent=25" in e.overrides) == (e.percent == 25)


def test_an_experiment_with_invalid_params_fails_before_queueing():
    cfg = config(budget=["pretrain.warmup_epochs=5", "pretrain.epochs=1"])
    with pytest.raises(ParamsError, match=r"compare: experiment .*pretrain.warmup_epochs"):
        plan(RAW, cfg)


def test_knn_k_outside_knn_k_fails_the_plan_not_the_pipeline():
    cfg = config(knn_k=7)  # the pipeline's stages still load these params
    with pytest.raises(ParamsError) as error:
        plan(RAW, cfg)
    assert error.value.key == "compare.knn_k"


@pytest.mark.parametrize("changes, key", [
    ({"budget": ["pretrain.epoch=1"]}, "compare.budget[0]"),
    ({"budget": ["pretrain.epochs=many"]}, "compare.budget[0]"),
    ({"budget": ["masking.ratio=0.5"]}, "compare.budget[0]"),
    ({"budget": ["pretrain.epochs"]}, "compare.budget[0]"),
    ({"seeds": []}, "compare.seeds"),
    ({"seeds": [0, 0]}, "compare.seeds"),
    ({"data_shares": [0]}, "compare.data_shares[0]"),
    ({"data_share_strategies": ["high"]}, "compare.data_share_strategies[0]"),
    ({"strategies": [{"name": "x", "strategy": "bloc"}]}, "compare.strategies[0].strategy"),
    ({"strategies": [{"name": "X y", "strategy": "block"}]}, "compare.strategies[0].name"),
    ({"strategies": [{"name": "x", "strategy": "random", "ratio": 0.9}]}, "compare.strategies[0].ratio_var"),
    ({"knn_k": 0}, "compare.knn_k"),
])
def test_bad_compare_params_name_their_key(changes, key):
    with pytest.raises(ParamsError) as error:
        config(**changes)
    assert error.value.key == key


def test_comparison_table_spread_statement_and_data_share(two_seeds, tmp_path):
    cfg, experiments = two_seeds
    summary = render(cfg, experiments, exp_show(experiments), tmp_path)
    text = (tmp_path / "comparison.md").read_text()
    assert summary["missing"] == []
    assert f"Code: the experiments ran on commit `{'f' * 40}`." in text

    table = text.split("### Which differences exceed the seed spread")[0]
    rows = {line.split(" | ")[0]: line for line in table.splitlines() if line.startswith("| ")}
    high = next(line for label, line in rows.items() if "(`attmask_high`)" in label)
    assert "| 10-50% | 31.0 ± 1.4 | 40.5 ± 0.7 | 50.2 ± 0.4 |" in high
    assert "*49.7* | *57.9* | *98.2 / 86.6*" in high  # the paper's, beside ours, in italics
    mae = next(line for label, line in rows.items() if "(`random_75`)" in label)
    assert "| 75% | 22.5 ± 2.1 |" in mae and "*47.3*" in mae
    assert any("random init" in label and "11.5 ± 0.7" in line for label, line in rows.items())
    assert "the paper's numbers, not ours" in text

    statement = text.split("### Which differences exceed the seed spread")[1].split("## ")[0]
    knn_line = next(line for line in statement.splitlines() if line.startswith("- **k-NN**"))
    assert "`attmask_high` > `block` by 10.5" in knn_line
    assert "`attmask_high` > `attmask_hint`" in knn_line
    assert "`random` > `block`" not in knn_line  # 22.5 +- 2.1 vs 20.5 +- 0.7 overlap
    assert "- **linear**: no difference between strategies exceeds the seed spread." in statement
    assert "`block` > `attmask_high` by 5.0" in statement  # fine-tune: block ahead
    assert "Above the random-init floor beyond the spread:" in statement

    share = text.split("## k-NN vs share of the train set")[1]
    assert "| strategy | 25% | 100% |" in share
    assert "| 10.5 ± 0.7 | 20.5 ± 0.7 |" in next(line for line in share.splitlines() if "(`block`)" in line)
    assert "| 21.0 ± 1.4 | 31.0 ± 1.4 |" in next(line for line in share.splitlines() if "(`attmask_high`)" in line)
    assert "differ by more than the seed spread: 25%, 100%" in share
    assert "*15.7* | *31.9* | *46.7* | *71.5*" in share  # the paper's data-share row for block

    numbers = json.loads((tmp_path / "comparison.json").read_text())
    assert numbers["table"]["attmask_high"]["knn"]["values"] == [30.0, 32.0]
    assert (tmp_path / "comparison.png").stat().st_size > 0


def test_ordering_is_checked_against_the_papers_pair_by_pair(two_seeds, tmp_path):
    cfg, experiments = two_seeds
    render(cfg, experiments, exp_show(experiments), tmp_path)
    section = (tmp_path / "comparison.md").read_text().split("### Against the paper's ordering")[1].split("## ")[0]
    lines = {line.split(":")[0]: line for line in section.splitlines() if line.startswith("- ")}
    # fabricated k-NN means: high 31.0, hint 25.5, random 22.5, block 20.5, low 21.0
    assert lines["- `attmask_high` vs `attmask_hint`"].endswith(
        "31.0 vs 25.5, +5.5 (paper: +0.2): agrees, beyond the seed spread.")
    assert "+3.0 (paper: +1.7): agrees, within the seed spread" in lines["- `attmask_hint` vs `random`"]
    assert "-0.5 (paper: +2.7): disagrees, within the seed spread" in lines["- `block` vs `attmask_low`"]
    assert "+10.0 (paper: +5.7): agrees, beyond the seed spread" in lines["- `attmask_high` vs `attmask_low`"]
    assert "4 of 5 compared pairs point the paper's way in the mean (1 the other way)." in section


def test_wall_time_comes_from_the_experiments_finish_times():
    stamps = ["2025-01-01T10:00:00", "2025-01-01T10:03:00", "2025-01-01T10:06:30", "2025-01-01T10:09:30"]
    runs = {i: Found(f"e{i}", f"{i:040x}", s, {}, 10) for i, s in enumerate(stamps)}
    assert wall_time_statement(runs) == ("Wall time: 12 min for 4 experiments run one at a time, about 3.0 min each "
                                         "(from the experiments' finish times in `dvc exp show`).")
    later = {**runs, 9: Found("e9", "9" * 40, "2025-01-02T10:00:00", {}, 10)}  # a second sitting the next day
    assert wall_time_statement(later).startswith("Wall time: 16 min for 5 experiments")  # the pause is not counted
    assert "1 pause(s) in the queue" in wall_time_statement(later)
    assert wall_time_statement(dict(list(runs.items())[:2])) == ""  # too few to tell


def test_one_seed_says_no_spread_is_measured(tmp_path):
    cfg = config(seeds=[0], data_shares=[100])
    experiments = plan(RAW, cfg)
    render(cfg, experiments, exp_show(experiments), tmp_path)
    text = (tmp_path / "comparison.md").read_text()
    assert "Only one seed per strategy" in text
    assert "| 10-50% | 30.0 | 40.0 | 50.0 |" in text


def test_only_experiments_with_the_planned_params_count_newest_first(two_seeds, tmp_path):
    cfg, experiments = two_seeds
    stale = exp_show(experiments, metrics=lambda e: {**fabricated_metrics(e), "knn": {"20": 99.0}},
                     timestamp="2024-12-31T00:00:00")
    fresh = exp_show(experiments[1:])
    other_budget = exp_show(plan(RAW, config(seeds=[0, 1], data_shares=[25, 100], budget=["pretrain.epochs=3"])),
                            metrics=lambda e: {**fabricated_metrics(e), "knn": {"20": 77.0}})
    failed = copy.deepcopy(exp_show(experiments[:1]))
    failed[1]["experiments"][0]["revs"][0]["error"] = {"type": "failed"}
    show = [stale[0], {**stale[1], "experiments": stale[1]["experiments"] + fresh[1]["experiments"]
                       + other_budget[1]["experiments"] + failed[1]["experiments"]}]

    found = match(show, experiments)
    assert set(found) == set(experiments)
    assert found[experiments[0]].metrics["knn"]["20"] == 99.0  # only the old run exists for it
    assert found[experiments[1]].metrics["knn"]["20"] == KNN["block"][1]  # the newer run wins
    assert all(f.metrics["knn"]["20"] != 77.0 for f in found.values())  # another budget is another experiment


def test_missing_experiments_are_reported(two_seeds, tmp_path):
    cfg, experiments = two_seeds
    summary = render(cfg, experiments, exp_show(experiments[2:]), tmp_path)
    assert [e.name for e in summary["missing"]] == [e.name for e in experiments[:2]]
    text = (tmp_path / "comparison.md").read_text()
    assert "**2 experiment(s) missing**" in text
    assert "| n/a | n/a | n/a |" in next(line for line in text.splitlines() if "(`block`)" in line)


def test_rendering_is_deterministic(two_seeds, tmp_path):
    cfg, experiments = two_seeds
    show = exp_show(experiments)
    render(cfg, experiments, show, tmp_path / "a")
    render(cfg, experiments, show, tmp_path / "b")
    for name in ("comparison.md", "comparison.png", "comparison.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_command_renders_from_a_saved_document(two_seeds, tmp_path, monkeypatch):
    cfg, experiments = two_seeds
    raw = copy.deepcopy(RAW)
    raw["compare"].update(seeds=[0, 1], data_shares=[25, 100])
    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    Path("exps.json").write_text(json.dumps(exp_show(experiments)))
    assert compare_stage.main(["--render", "--show-json", "exps.json"]) == 0
    assert "AttMask-High" in Path("reports/comparison.md").read_text()
    Path("exps.json").write_text(json.dumps(exp_show(experiments[1:])))
    assert compare_stage.main(["--render", "--show-json", "exps.json"]) == 1  # one missing


def test_results_are_read_from_the_commit_the_queue_ran_on(two_seeds, tmp_path, monkeypatch, capsys):
    """Committing while `make compare` runs must not hide its experiments (exp show defaults to HEAD)."""
    cfg, experiments = two_seeds
    raw = copy.deepcopy(RAW)
    raw["compare"].update(seeds=[0, 1], data_shares=[25, 100])
    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    heads = iter(["a" * 40, "b" * 40])
    asked = []
    monkeypatch.setattr(compare_stage, "git_head", lambda: next(heads))
    monkeypatch.setattr(compare_stage, "dvc", lambda *args, **kwargs: "")

    def exp_show_of(rev):
        asked.append(rev)
        return exp_show(experiments) if len(asked) > 1 else exp_show([])

    monkeypatch.setattr(compare_stage, "exp_show", exp_show_of)
    assert compare_stage.main([]) == 0
    assert asked == ["a" * 40, "a" * 40]
    assert "HEAD moved from aaaaaaa to bbbbbbb during the run" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("ATTMASK_COMPARE_E2E"),
                    reason="real dvc exp queue, ~3 min per tiny experiment on 2 cores: set ATTMASK_COMPARE_E2E=1")
def test_real_queue_end_to_end(tmp_path):
    """`python -m stages.compare` on a tiny copy: queue, `dvc exp run --run-all`, render; then nothing reruns."""
    from tests.test_reproducibility import copy_repository, run

    compare = {"strategies": [{"name": "attmask_high", "strategy": "attmask_high"}], "seeds": [0],
               "data_shares": [100], "data_share_strategies": ["attmask_high"], "knn_k": 2}
    repo = copy_repository(tmp_path / "repo", compare=compare)
    run(repo, sys.executable, "-m", "stages.compare")
    text = (repo / "reports/comparison.md").read_text()
    assert "1 of 1 planned DVC experiments found" in text
    row = next(line for line in text.splitlines() if line.startswith("| AttMask-High (`attmask_high`) | 10-50% |"))
    assert "n/a" not in row.split("| *")[0]
    assert "1 already finished" in run(repo, sys.executable, "-m", "stages.compare")


STATUS = """Task     Name                   Created    Status
97fb203  cmp-block-s1-65b080    06:54 PM   Success
50d0a29  cmp-block-s2-373e76    06:54 PM   Running
8f6e9b1  cmp-random-s0-ae2eb9   06:54 PM   Queued
b003254  cmp-random-s1-7b36c0   06:55 PM   Queued
c5a1c90  seed2                  05:40 PM   Failed

Worker status: 1 active, 0 idle
"""


def test_queue_status_is_parsed():
    state = compare_stage.queue_state(STATUS)
    assert (state.queued, state.running, state.finished, state.workers) == (2, 1, 2, 1)
    assert compare_stage.queue_state("Worker status: 0 active, 2 idle\n").workers == 2


def test_a_worker_that_leaves_experiments_queued_is_started_again(monkeypatch, capsys):
    """`dvc exp run --run-all` hung here: its worker ran one experiment and exited with 23 queued."""
    statuses = iter([
        "a  x  1 PM  Queued\nb  y  1 PM  Success\n\nWorker status: 0 active, 0 idle\n",   # the worker left early
        "a  x  1 PM  Running\nb  y  1 PM  Success\n\nWorker status: 1 active, 0 idle\n",
        "a  x  1 PM  Success\nb  y  1 PM  Success\n\nWorker status: 0 active, 0 idle\n",
    ])
    calls = []

    def fake_dvc(*args, capture=False, **kwargs):
        calls.append(args)
        return next(statuses) if args[:2] == ("queue", "status") else ""

    monkeypatch.setattr(compare_stage, "dvc", fake_dvc)
    monkeypatch.setattr(compare_stage.time, "sleep", lambda seconds: None)
    compare_stage.run_queue(jobs=1)
    starts = [c for c in calls if c[:2] == ("queue", "start")]
    assert starts == [("queue", "start", "--jobs", "1")] * 2
    assert "starting one again" in capsys.readouterr().err


def test_without_data_shares_the_section_says_how_to_get_them(tmp_path):
    cfg = config(seeds=[0, 1], data_shares=[100])
    experiments = plan(RAW, cfg)
    assert all(e.percent is None for e in experiments)
    render(cfg, experiments, exp_show(experiments), tmp_path)
    share = (tmp_path / "comparison.md").read_text().split("## k-NN vs share of the train set")[1]
    assert "Not run: `compare.data_shares` is `[100]`" in share


def test_render_rev_plans_from_that_commits_params(two_seeds, tmp_path, monkeypatch):
    """Experiments of an older commit match its params.yaml, even where today's schema moved on."""
    raw = copy.deepcopy(RAW)
    raw["compare"].update(seeds=[0, 1], data_shares=[100])
    old = copy.deepcopy(raw)
    old.pop("threads", None)
    old["pretrain"]["resume"] = False  # a value today's schema refuses
    cfg = config(seeds=[0, 1], data_shares=[100])
    from pipeline.reporting.compare import plan as plan_experiments

    experiments = plan_experiments(old, cfg, validate=False)
    show = exp_show([])
    for i, e in enumerate(experiments):  # DVC's record of each: the old params with the overrides
        data = {"rev": f"{i:040x}", "timestamp": "2025-01-01T10:00:00", "params": {"params.yaml": {"data": e.expected}},
                "metrics": {"reports/metrics.json": {"data": fabricated_metrics(e)}}}
        show[1]["experiments"].append({"name": e.name, "revs": [{"rev": f"{i:040x}", "name": e.name, "data": data}]})
    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    Path("exps.json").write_text(json.dumps(show))
    monkeypatch.setattr(compare_stage, "git_show", lambda rev, path: yaml.safe_dump(old))
    assert compare_stage.main(["--render", "--rev", "abc1234", "--show-json", "exps.json"]) == 0
    assert f"{len(experiments)} of {len(experiments)} planned DVC experiments found" in Path("reports/comparison.md").read_text()
    with pytest.raises(SystemExit):
        compare_stage.main(["--rev", "abc1234"])


def test_a_running_experiment_is_not_a_result(two_seeds, tmp_path):
    """While it runs, `dvc exp show` lists it with the baseline's metrics.json: that must not count."""
    cfg, experiments = two_seeds
    show = exp_show(experiments)
    show[1]["experiments"][0]["executor"] = {"state": "running", "name": "dvc-task"}
    show[1]["experiments"][1]["executor"] = {"state": "success", "name": "dvc-task"}
    found = match(show, experiments)
    assert experiments[0] not in found and experiments[1] in found


def test_queued_experiments_keep_their_sacred_records_and_the_report_links_them(two_seeds, tmp_path, monkeypatch):
    from pipeline.core import tracking

    monkeypatch.delenv("ATTMASK_RUNS_DIR", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "repo"))  # what `dvc exp run` sets in a queued experiment
    assert tracking.default_runs_dir() == tmp_path / "repo" / "runs" / "sacred"
    cfg, experiments = two_seeds
    runs = tmp_path / "runs"
    (runs / "pretrain" / "3").mkdir(parents=True)
    (runs / "pretrain" / "3" / "run.json").write_text(json.dumps({"info": {"dvc_experiment": experiments[0].name}}))
    render(cfg, experiments, exp_show(experiments), tmp_path / "out", runs_dir=runs)
    row = next(line for line in (tmp_path / "out" / "comparison.md").read_text().splitlines()
               if line.startswith(f"| `{experiments[0].name}`"))
    assert row.endswith("| `pretrain/3` |")


def test_the_report_says_when_hint_cannot_reveal_anything():
    from pipeline.reporting.compare import hint_note

    row = next(r for r in config().strategies if r.strategy == "attmask_hint")
    tiny = {"augment": {"global_size": 32}, "model": {"patch_size": 8}, "masking": {"show_max": 0.1}}
    assert "reveals floor(0.1 x r x 16) = 0 patches" in hint_note(row, tiny)  # the embedded default: Hint = High
    paper = {"augment": {"global_size": 224}, "model": {"patch_size": 16}, "masking": {"show_max": 0.1}}
    assert hint_note(row, paper) == "On this 196-patch grid AttMask-Hint reveals up to 9 of the masked patches again."


def identical_hint_metrics(experiment: Experiment) -> dict[str, Any]:
    """As on the embedded 16-patch grid: Hint reveals nothing, so its runs are High's, value for value."""
    row = "attmask_high" if experiment.row.name == "attmask_hint" else experiment.row.name
    same = Experiment(next(r for r in config().strategies if r.name == row), experiment.seed, experiment.percent,
                      experiment.overrides, experiment.expected)
    metrics = fabricated_metrics(same)
    if row in ("attmask_high", "attmask_low"):  # High and Low tie at +0.0 in the mean
        metrics["knn"]["20"] = 25.0 + experiment.seed
    return metrics


def test_a_tie_points_no_way_and_hint_equal_to_high_by_construction_is_named_once(tmp_path):
    cfg = config(seeds=[0, 1], data_shares=[100])
    experiments = plan(RAW, cfg)
    render(cfg, experiments, exp_show(experiments, metrics=identical_hint_metrics), tmp_path)
    text = (tmp_path / "comparison.md").read_text()
    hint_row = next(line for line in text.splitlines() if line.startswith("| AttMask-Hint (`attmask_hint`)"))
    assert "| = AttMask-High | = AttMask-High | = AttMask-High | *49.5* |" in hint_row
    assert "reveals floor(0.1 x r x 16) = 0 patches" in text and "not a second finding" in text
    statement = text.split("### Which differences exceed the seed spread")[1].split("### ")[0]
    assert "`attmask_hint` >" not in statement and "> `attmask_hint`" not in statement
    assert "`attmask_high` (= `attmask_hint`)" in statement
    assert "- `attmask_hint` (= `attmask_high`) vs `random`: 25.5 vs 22.5, +3.0" in text
    order = text.split("### Against the paper's ordering")[1].split("## ")[0]
    assert "- `attmask_high` vs `attmask_hint`: identical by construction on this grid (above), not a measured tie" in order
    assert "- `attmask_high` (= `attmask_hint`) vs `attmask_low`: 25.5 vs 25.5, +0.0 (paper: +5.7): ties" in order
    # High vs Hint is not compared; Hint > random and random > block agree, block < Low disagrees, High = Low ties
    assert "2 of 4 compared pairs point the paper's way in the mean (1 tie, pointing no way; 1 the other way)." in order


def test_the_chart_uses_display_names_merges_identical_rows_and_draws_the_floor(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(compare_module, "plot_comparison", lambda summary, labels, *args: seen.update(
        labels=labels, floor=summary["random_init"]))
    cfg = config(seeds=[0, 1], data_shares=[100])
    experiments = plan(RAW, cfg)
    render(cfg, experiments, exp_show(experiments, metrics=identical_hint_metrics), tmp_path)
    assert seen["labels"]["random_75"] == "random (MAE-style)"
    assert seen["labels"]["attmask_high"] == "AttMask-High (= AttMask-Hint)" and "attmask_hint" not in seen["labels"]
    assert seen["floor"]["knn"].mean == 11.5  # the random-init floor the chart draws


def test_the_report_renders_again_from_its_json_keeping_the_recorded_provenance(two_seeds, tmp_path):
    from pipeline.reporting.provenance import UNKNOWN, unknown_record

    cfg, experiments = two_seeds
    origin = {**unknown_record(), "date": "2025-01-01", "params_sha256": "ab" * 32}
    render(cfg, experiments, exp_show(experiments), tmp_path, provenance=origin)
    first = (tmp_path / "comparison.md").read_text()
    assert "| date | 2025-01-01 |" in first and f"| commit | {UNKNOWN} |" in first
    assert json.loads((tmp_path / "comparison.json").read_text())["provenance"] == origin
    (tmp_path / "comparison.md").unlink()
    rerender(tmp_path / "comparison.json")
    assert (tmp_path / "comparison.md").read_text() == first  # no DVC, no experiments: the JSON alone

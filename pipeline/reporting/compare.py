"""Masking strategies compared as DVC experiments (``make compare``).

The plan comes from the ``compare`` section of ``params.yaml``: one experiment
per strategy row and seed (the paper's Table 1), plus k-NN of the
``data_share_strategies`` on a share of the train set (``data.percent``), every
one with the same ``budget`` overrides. Experiments are queued with
``dvc exp run --queue -S ...`` and run by DVC; the results are read back from
``dvc exp show --json`` and rendered into ``reports/comparison.md`` (+ a bar
chart and the numbers as JSON).

An experiment is recognised by its params, not its name: the one whose
``params.yaml`` equals this workspace's with the plan's overrides applied (the
``compare`` section aside). So a finished experiment is never rerun, and a
change of budget or base params starts afresh. ``dvc exp show`` lists the
experiments of the current commit only, so a code change (committed) does too.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import math
import statistics
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml

from pipeline.core.config import CompareConfig, CompareStrategy, MaskingConfig, ParamsError, params_from_dict, set_dotted
from pipeline.core.files import atomic_write_text, write_json
from pipeline.core.strategies import strategy_label
from pipeline.reporting.figures import plot_comparison
from pipeline.reporting.paper import PAPER_DATA_SHARE, PAPER_DATA_SHARE_SOURCE, PAPER_KNN_ORDER, PAPER_SOURCE, PAPER_TABLE
from pipeline.reporting.readme import ratio_label

METRICS_FILE = "reports/metrics.json"
EXTRACT_FILE = "reports/eval/extract.json"
NAME_PREFIX = "cmp"
TARGET_STAGE = "metrics"  # the experiments stop at reports/metrics.json (the report stage is not needed)
COLUMNS = ("knn", "linear", "finetune")
COLUMN_LABELS = {"knn": "k-NN", "linear": "linear", "finetune": "fine-tune"}

# --------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class Experiment:
    """One planned DVC experiment."""

    row: CompareStrategy
    seed: int
    percent: float | None  # None: the whole train set the pipeline is configured with
    overrides: tuple[str, ...]  # `dvc exp run -S` values, budget first
    expected: dict[str, Any] = field(hash=False, compare=False)  # its params.yaml, compare section aside

    @property
    def name(self) -> str:
        # the hash keeps names unique across budgets and base params (DVC refuses a name twice)
        digest = hashlib.sha1(params_key(self.expected).encode()).hexdigest()[:6]
        share = "" if self.percent is None else f"-p{self.percent:g}"
        return f"{NAME_PREFIX}-{self.row.name.replace('_', '-')}-s{self.seed}{share}-{digest}"


def plan(raw_params: dict[str, Any], config: CompareConfig, validate: bool = True) -> list[Experiment]:
    """Every experiment the comparison needs, each validated as a whole params file.

    ``validate=False`` plans from another commit's params (``--rev``): that
    commit's code validated them when its experiments ran, and this code's
    schema may have moved on since.

    Raises:
        ParamsError: naming the experiment and the key, before anything is queued.
    """
    rows = {row.name: row for row in config.strategies}
    wanted: list[tuple[CompareStrategy, int, float | None]] = [
        (row, seed, None) for row in config.strategies for seed in config.seeds
    ]
    for share in config.data_shares:
        if share != 100:  # 100%: the strategy runs themselves
            wanted += [(rows[name], seed, share) for name in config.data_share_strategies for seed in config.seeds]
    experiments = []
    for row, seed, percent in wanted:
        overrides = tuple(config.budget) + row.masking_overrides() + (f"seed={seed}",)
        if percent is not None:
            overrides += (f"data.percent={percent:g}",)
        expected = apply_overrides(raw_params, overrides)
        if not validate:
            experiments.append(Experiment(row, seed, percent, overrides, expected))
            continue
        try:
            params = params_from_dict({**expected, "compare": raw_params.get("compare", {})})
        except ParamsError as error:
            raise ParamsError("compare", f"experiment {' '.join(overrides)}: {error}") from None
        if config.knn_k not in params.knn.k:  # here, not in config.py: knn.k may change without touching compare
            raise ParamsError("compare.knn_k", f"{config.knn_k} is not one of knn.k = {list(params.knn.k)}")
        experiments.append(Experiment(row, seed, percent, overrides, expected))
    return experiments


def apply_overrides(raw_params: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """``raw_params`` without its ``compare`` section, with ``key=value`` overrides (YAML values, as DVC's -S)."""
    result = json.loads(json.dumps({k: v for k, v in raw_params.items() if k != "compare"}))
    for entry in overrides:
        dotted, _, text = entry.partition("=")
        set_dotted(result, dotted, yaml.safe_load(text))
    return result


# ----------------------------------------------------------------- dvc commands
def dvc(*args: str, cwd: Path = Path("."), capture: bool = False) -> str:
    """Run ``dvc``; raises ``CalledProcessError`` on failure. Output streams through unless captured."""
    done = subprocess.run(["dvc", *args], cwd=cwd, check=True, text=True, capture_output=capture)
    return done.stdout if capture else ""


def queue_command(experiment: Experiment) -> list[str]:
    """The ``dvc exp run --queue`` arguments of one experiment."""
    command = ["exp", "run", "--queue", "--name", experiment.name]
    for override in experiment.overrides:
        command += ["--set-param", override]
    return command + [TARGET_STAGE]


# ---------------------------------------------------------------- read results
@dataclass(frozen=True)
class Found:
    """A finished experiment of the plan, as ``dvc exp show --json`` reports it."""

    name: str
    rev: str
    timestamp: str
    metrics: dict[str, Any]
    num_classes: int | None
    baseline: str = ""  # the commit the experiment ran on ("workspace" when not committed)


def experiments_in(show: list[dict[str, Any]]) -> Iterable[dict[str, Any]]:
    """Every successful experiment revision's ``data`` in a ``dvc exp show --json`` document."""
    for baseline in show:
        for experiment in baseline.get("experiments") or []:
            # a running (or queued) experiment shows the baseline's metrics files: not a result yet
            if ((experiment.get("executor") or {}).get("state")) in ("running", "queued", "failed"):
                continue
            for rev in experiment.get("revs") or []:
                data = rev.get("data")
                if rev.get("error") or not data:
                    continue
                yield {"name": rev.get("name") or experiment.get("name"), "rev": rev.get("rev"),
                       "baseline": baseline.get("rev") or "", **data}


def params_key(params: dict[str, Any]) -> str:
    """Canonical text of a params dict, ``compare`` aside; 2 and 2.0 are the same number (YAML and -S may differ)."""
    def canonical(value: Any) -> Any:
        if isinstance(value, dict):
            return {str(k): canonical(v) for k, v in value.items()}
        if isinstance(value, list):
            return [canonical(v) for v in value]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        return value

    return json.dumps(canonical({k: v for k, v in params.items() if k != "compare"}), sort_keys=True)


def match(show: list[dict[str, Any]], experiments: Sequence[Experiment]) -> dict[Experiment, Found]:
    """The newest finished experiment for each planned one whose params are exactly the plan's."""
    keyed = {params_key(e.expected): e for e in experiments}
    found: dict[Experiment, Found] = {}
    for data in experiments_in(show):
        params = ((data.get("params") or {}).get("params.yaml") or {}).get("data") or {}
        metrics = ((data.get("metrics") or {}).get(METRICS_FILE) or {}).get("data")
        planned = keyed.get(params_key(params))
        if planned is None or not metrics:
            continue
        if planned in found and found[planned].timestamp >= (data.get("timestamp") or ""):
            continue
        extract = ((data.get("metrics") or {}).get(EXTRACT_FILE) or {}).get("data") or {}
        found[planned] = Found(str(data.get("name")), str(data.get("rev")), str(data.get("timestamp") or ""),
                               metrics, extract.get("num_classes"), str(data.get("baseline") or ""))
    return found


# ------------------------------------------------------------------ summarise
@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation over seeds (``sd`` None with one seed)."""

    values: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def sd(self) -> float | None:
        return statistics.stdev(self.values) if self.n > 1 else None

    def text(self) -> str:
        return f"{self.mean:.1f} ± {self.sd:.1f}" if self.sd is not None else f"{self.mean:.1f}"


def headline(metrics: dict[str, Any], column: str, knn_k: int) -> float | None:
    """k-NN at ``knn_k``, linear or fine-tune top-1 of one ``reports/metrics.json``."""
    if column == "knn":
        return (metrics.get("knn") or {}).get(str(knn_k))
    return (metrics.get(column) or {}).get("top1")


def _stat(values: Iterable[float | None]) -> Stat | None:
    kept = tuple(float(v) for v in values if v is not None)
    return Stat(kept) if kept else None


def summarise(config: CompareConfig, experiments: Sequence[Experiment], found: dict[Experiment, Found]) -> dict[str, Any]:
    """Per-row and per-share statistics, the random-init floor, and what is missing."""
    def runs(row: str, percent: float | None) -> list[Found]:
        return [found[e] for e in experiments if e.row.name == row and e.percent == percent and e in found]

    table = {row.name: {c: _stat(headline(f.metrics, c, config.knn_k) for f in runs(row.name, None)) for c in COLUMNS}
             for row in config.strategies}
    # the random-init baseline depends on the seed only: one value per seed
    per_seed: dict[int, Found] = {}
    for e in experiments:
        if e.percent is None and e in found:
            per_seed.setdefault(e.seed, found[e])
    floor = {c: _stat(headline((f.metrics.get("baselines") or {}).get("random_init") or {}, c, config.knn_k)
                      for f in per_seed.values()) for c in COLUMNS}
    shares = {name: {share: _stat(headline(f.metrics, "knn", config.knn_k)
                                  for f in runs(name, None if share == 100 else share))
                     for share in config.data_shares}
              for name in config.data_share_strategies}
    classes = {f.num_classes for f in found.values() if f.num_classes}
    return {"table": table, "random_init": floor, "data_share": shares,
            "num_classes": classes.pop() if len(classes) == 1 else None,
            "missing": [e for e in experiments if e not in found]}


def exceeds_spread(a: Stat, b: Stat) -> bool:
    """Means further apart than the two seed spreads together (mean ± sd intervals do not overlap)."""
    return a.sd is not None and b.sd is not None and abs(a.mean - b.mean) > a.sd + b.sd


def separated_pairs(stats: dict[str, Stat | None]) -> list[tuple[str, str, Stat, Stat]]:
    """(better, worse, stat, stat) for every pair whose difference exceeds the seed spread, largest first."""
    names = [n for n, s in stats.items() if s is not None]
    pairs = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            sa, sb = stats[a], stats[b]
            if exceeds_spread(sa, sb):
                pairs.append((a, b, sa, sb) if sa.mean > sb.mean else (b, a, sb, sa))
    return sorted(pairs, key=lambda p: (-(p[2].mean - p[3].mean), p[0], p[1]))


# --------------------------------------------------------------------- render
def _row_label(row: CompareStrategy) -> str:
    mae = row.strategy == "random" and row.ratio_var == 0  # one fixed ratio, as MAE
    return strategy_label(row.strategy) + (" (MAE-style)" if mae else "")


def _ratio(row: CompareStrategy) -> str:
    return ratio_label(MaskingConfig(row.strategy, row.ratio, row.ratio_var))


def _paper_row(row: CompareStrategy) -> dict[str, float] | None:
    return PAPER_TABLE.get((row.strategy, round(row.ratio, 6), round(row.ratio_var, 6)))


def _cell(stat: Stat | None) -> str:
    return "n/a" if stat is None else stat.text()


def code_commits(found: dict[Experiment, Found]) -> str:
    """The baseline commits of the found experiments, for the report (``"none found"`` if none)."""
    commits = sorted({f.baseline for f in found.values() if f.baseline})
    return ", ".join(f"`{c}`" for c in commits) if commits else "(none found)"


def render_markdown(config: CompareConfig, summary: dict[str, Any], experiments: Sequence[Experiment],
                    found: dict[Experiment, Found], records: dict[str, list[str]] | None = None) -> str:
    """``reports/comparison.md``: the strategy table, the spread statement and the data-share table."""
    seeds = ", ".join(str(s) for s in config.seeds)
    n = len(config.seeds)
    chance = f" Chance is {100 / summary['num_classes']:.1f}% ({summary['num_classes']} classes)." if summary["num_classes"] else ""
    lines = [
        "# Masking strategies compared",
        "",
        f"Generated by `make compare` (`python -m stages.compare`) from `dvc exp show --json`: "
        f"{len(found)} of {len(experiments)} planned DVC experiments found. Every experiment is the pipeline "
        f"with the same budget (`{' '.join(config.budget) or 'none'}`) and "
        + (f"one of the seeds {seeds}; cells are the mean ± sample standard deviation over the {n} seeds "
           "(`seed` also redraws the embedded dataset and the train subset)." if n > 1
           else f"seed {seeds}; cells are single runs.") + chance,
        "",
        f"Code: the experiments ran on commit {code_commits(found)}. {wall_time_statement(found)}",
        "",
        "## Strategies (the paper's Table 1)",
        "",
        f"Top-1 (%) on the val split. k-NN: weighted, k = {config.knn_k}, frozen teacher [CLS] features; linear: "
        "logistic-regression probe; fine-tune: end-to-end on the same labelled data. The columns marked "
        "*paper* are **the paper's numbers, not ours**: " + PAPER_SOURCE + " (fine-tuning there is on CIFAR10 / "
        "CIFAR100). They show the shape to look for, not a target for this budget.",
        "",
        "| strategy | ratio | k-NN | linear | fine-tune | *paper k-NN* | *paper linear* | *paper fine-tune C10 / C100* |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in config.strategies:
        stats = summary["table"][row.name]
        paper = _paper_row(row)
        theirs = (f"*{paper['knn']:.1f}* | *{paper['linear']:.1f}* | *{paper['finetune_cifar10']:.1f} / "
                  f"{paper['finetune_cifar100']:.1f}*") if paper else " | | "
        lines.append(f"| {_row_label(row)} (`{row.name}`) | {_ratio(row)} | "
                     + " | ".join(_cell(stats[c]) for c in COLUMNS) + f" | {theirs} |")
    floor = summary["random_init"]
    if any(floor.values()):
        lines.append("| random init, no pre-training (floor) | - | " + " | ".join(_cell(floor[c]) for c in COLUMNS)
                     + " | | | |")
    lines += ["", "### Which differences exceed the seed spread", ""]
    lines += _spread_statement({c: {r.name: summary["table"][r.name][c] for r in config.strategies} for c in COLUMNS},
                               n, floor)
    lines += _paper_order_section(config, summary, experiments)
    lines += _data_share_section(config, summary)
    lines += _chart_and_experiments(experiments, found, summary["missing"], records or {})
    return "\n".join(lines) + "\n"


def _spread_statement(stats: dict[str, dict[str, Stat | None]], n: int, floor: dict[str, Stat | None]) -> list[str]:
    if n < 2:
        return ["Only one seed per strategy (`compare.seeds`): no spread is measured, so no difference in this "
                "table can be told from noise. Set `compare.seeds` to several seeds to measure it.", ""]
    lines = [f"A difference counts when the two means are further apart than their two standard deviations "
             f"together (the mean ± sd intervals over {n} seeds do not overlap). With so few seeds this is a "
             "rough screen, not a significance test.", ""]
    for column in COLUMNS:
        pairs = separated_pairs(stats[column])
        label = COLUMN_LABELS[column]
        if not pairs:
            lines.append(f"- **{label}**: no difference between strategies exceeds the seed spread.")
        else:
            shown = "; ".join(f"`{a}` > `{b}` by {sa.mean - sb.mean:.1f} (sd {sa.sd:.1f}, {sb.sd:.1f})"
                              for a, b, sa, sb in pairs)
            lines.append(f"- **{label}**: {shown}.")
        base = floor.get(column)
        if base is not None and base.sd is not None:
            above = [name for name, s in stats[column].items() if s is not None and exceeds_spread(s, base) and s.mean > base.mean]
            lines.append(f"  Above the random-init floor beyond the spread: {', '.join(f'`{a}`' for a in above) or 'none'}.")
    return lines + [""]


def _paper_order_section(config: CompareConfig, summary: dict[str, Any],
                         experiments: Sequence[Experiment] = ()) -> list[str]:
    """Where our k-NN ordering agrees with the paper's (High >= Hint > random > block > Low), pair by pair."""
    rows = {row.strategy: row.name for row in config.strategies if (row.ratio, row.ratio_var) == (0.3, 0.2)}
    chain = [s for s in PAPER_KNN_ORDER if s in rows]
    lines = ["### Against the paper's ordering", "",
             "The paper's k-NN ordering is AttMask-High ≥ AttMask-Hint > random > block-wise > AttMask-Low "
             "(Table 1, ratios 10-50%). Ours, for each neighbouring pair of that chain and for High vs Low "
             "(the paper's largest gap, 5.7 points):", ""]
    pairs = list(zip(chain, chain[1:]))
    if {"attmask_high", "attmask_low"} <= set(chain):
        pairs.append(("attmask_high", "attmask_low"))
    if not pairs:
        return []
    agree = 0
    for better, worse in pairs:
        a, b = summary["table"][rows[better]]["knn"], summary["table"][rows[worse]]["knn"]
        if a is None or b is None:
            lines.append(f"- `{better}` vs `{worse}`: not measured.")
            continue
        diff = a.mean - b.mean
        agree += diff > 0 or (diff == 0 and better == "attmask_high" and worse == "attmask_hint")
        verdict = ("agrees" if diff > 0 else "disagrees" if diff < 0 else "ties") + (
            ", beyond the seed spread" if exceeds_spread(a, b) else
            ", within the seed spread (not a measured difference)" if a.sd is not None else ", one seed (no spread)")
        paper = PAPER_TABLE.get((better, 0.3, 0.2), {}).get("knn"), PAPER_TABLE.get((worse, 0.3, 0.2), {}).get("knn")
        theirs = f" (paper: {paper[0] - paper[1]:+.1f})" if None not in paper else ""
        lines.append(f"- `{better}` vs `{worse}`: {a.mean:.1f} vs {b.mean:.1f}, {diff:+.1f}{theirs}: {verdict}.")
    lines += ["", f"{agree} of {len(pairs)} pairs point the paper's way in the mean."]
    hint = next((row for row in config.strategies if row.strategy == "attmask_hint"), None)
    if hint is not None and experiments:
        lines += ["", hint_note(hint, experiments[0].expected)]
    return lines + [""]


def hint_note(row: CompareStrategy, params: dict[str, Any]) -> str:
    """What AttMask-Hint reveals on this patch grid: at most floor(show_max * (ratio + ratio_var) * P) patches."""
    augment, model = params.get("augment") or {}, params.get("model") or {}
    patch = model.get("patch_size") or 16
    patches = (int(augment.get("global_size", 224)) // int(patch)) ** 2
    show_max = float((params.get("masking") or {}).get("show_max", 0.1))
    most = math.floor(show_max * (row.ratio + row.ratio_var) * patches)
    if most == 0:
        return (f"On this {patches}-patch grid AttMask-Hint reveals floor({show_max:g} x r x {patches}) = 0 patches for "
                f"every ratio r up to {row.ratio + row.ratio_var:g}: it masks exactly what AttMask-High masks, so its "
                "row equals AttMask-High's by construction, not by chance (a larger grid separates them).")
    return f"On this {patches}-patch grid AttMask-Hint reveals up to {most} of the masked patches again."


def wall_time_statement(found: dict[Experiment, Found]) -> str:
    """How long the experiments took, from their finish times (DVC records one per experiment).

    The queue runs one experiment at a time, so consecutive finish times are
    durations; the first experiment's is taken as the median of the others, and
    a gap over 3 times the median (the queue was stopped, or restarted later)
    counts as one median experiment, not as the pause.
    """
    times = sorted(datetime.datetime.fromisoformat(f.timestamp) for f in found.values() if f.timestamp)
    if len(times) < 3:
        return ""
    gaps = [(b - a).total_seconds() / 60 for a, b in zip(times, times[1:])]
    typical = statistics.median(gaps)
    if typical <= 0:
        return ""
    pauses = sum(g > 3 * typical for g in gaps)
    total = sum(typical if g > 3 * typical else g for g in gaps) + typical
    note = f"; {pauses} pause(s) in the queue counted as one typical experiment each" if pauses else ""
    return (f"Wall time: {total:.0f} min for {len(times)} experiments run one at a time, about {typical:.1f} min "
            f"each (from the experiments' finish times in `dvc exp show`{note}).")


def _data_share_section(config: CompareConfig, summary: dict[str, Any]) -> list[str]:
    shares = list(config.data_shares)
    if shares == [100]:
        return ["## k-NN vs share of the train set", "",
                "Not run: `compare.data_shares` is `[100]`. Set it to e.g. `[25, 100]` (6 more experiments) for "
                "k-NN vs the share of the train set, beside the paper's.", ""]
    lines = ["## k-NN vs share of the train set", "",
             f"k-NN top-1 (k = {config.knn_k}) when pre-training (and evaluating) on a seeded share of each train "
             "class (`data.percent`); 100% is the strategy table's run.", "",
             "| strategy | " + " | ".join(f"{s:g}%" for s in shares) + " |",
             "|---|" + "---|" * len(shares)]
    rows = {row.name: row for row in config.strategies}
    for name in config.data_share_strategies:
        cells = [_cell(summary["data_share"][name][s]) for s in shares]
        lines.append(f"| {_row_label(rows[name])} (`{name}`) | " + " | ".join(cells) + " |")
    if len(config.data_share_strategies) == 2 and len(config.seeds) > 1:
        a, b = config.data_share_strategies
        beyond = [f"{s:g}%" for s in shares
                  if summary["data_share"][a][s] and summary["data_share"][b][s]
                  and exceeds_spread(summary["data_share"][a][s], summary["data_share"][b][s])]
        lines += ["", f"Shares where `{a}` and `{b}` differ by more than the seed spread: {', '.join(beyond) or 'none'}."]
    paper = {n: PAPER_DATA_SHARE[rows[n].strategy] for n in config.data_share_strategies
             if rows[n].strategy in PAPER_DATA_SHARE and (rows[n].ratio, rows[n].ratio_var) == (0.3, 0.2)}
    if paper:
        cols = list(next(iter(paper.values())))
        lines += ["", f"*The paper's numbers, not ours* ({PAPER_DATA_SHARE_SOURCE}; shares of ImageNet-1k):", "",
                  "| *strategy (paper)* | " + " | ".join(f"*{c}%*" for c in cols) + " |",
                  "|---|" + "---|" * len(cols)]
        for name, values in paper.items():
            lines.append(f"| *{_row_label(rows[name])}* | " + " | ".join(f"*{values[c]:.1f}*" for c in cols) + " |")
    return lines + [""]


def sacred_records(runs_dir: Path) -> dict[str, list[str]]:
    """``{experiment name: ["pretrain/12", ...]}`` from the sacred records that name a DVC experiment."""
    records: dict[str, list[str]] = {}
    for run in sorted(Path(runs_dir).glob("*/*/run.json")):
        try:
            name = (json.loads(run.read_text()).get("info") or {}).get("dvc_experiment")
        except (OSError, ValueError):
            continue
        if name:
            records.setdefault(name, []).append(f"{run.parent.parent.name}/{run.parent.name}")
    return records


def _chart_and_experiments(experiments: Sequence[Experiment], found: dict[Experiment, Found],
                           missing: Sequence[Experiment], records: dict[str, list[str]]) -> list[str]:
    lines = ["## Chart", "", "![strategies compared](comparison.png)", "",
             "## The experiments", "",
             "Inspect them with `dvc exp show`, compare two with `dvc metrics diff <a> <b>` and "
             "`dvc params diff <a> <b>`, bring one into the workspace with `dvc exp apply <name>`.", "",
             "Each experiment's sacred records (one per stage, under `runs/sacred/<stage>/<id>`) name it "
             "(`info.dvc_experiment`); experiments queued before records were kept show none.", "",
             "| experiment | overrides | rev | sacred records |", "|---|---|---|---|"]
    for e in experiments:
        f = found.get(e)
        kept = ", ".join(f"`{r}`" for r in records.get(e.name, [])) or "none"
        lines.append(f"| `{e.name}` | `{' '.join(e.overrides)}` | " + (f"`{f.rev[:7]}`" if f else "**missing**")
                     + f" | {kept} |")
    if missing:
        lines += ["", f"**{len(missing)} experiment(s) missing** (not run, failed, or run with other params): "
                      "`dvc queue status` and `dvc queue logs <name>` say why; `make compare` runs what is missing."]
    return lines


def summary_json(config: CompareConfig, summary: dict[str, Any], found: dict[Experiment, Found]) -> dict[str, Any]:
    """The rendered numbers, for other tools (the report links the comparison)."""
    def stat(s: Stat | None) -> dict[str, Any] | None:
        return None if s is None else {"mean": s.mean, "sd": s.sd, "values": list(s.values)}

    return {
        "budget": list(config.budget), "seeds": list(config.seeds), "knn_k": config.knn_k,
        "table": {r: {c: stat(s) for c, s in cols.items()} for r, cols in summary["table"].items()},
        "random_init": {c: stat(s) for c, s in summary["random_init"].items()},
        "data_share": {n: {f"{k:g}": stat(s) for k, s in v.items()} for n, v in summary["data_share"].items()},
        "experiments": {f.name: f.rev for f in found.values()},
        "missing": [e.name for e in summary["missing"]],
    }


def render(config: CompareConfig, experiments: Sequence[Experiment], show: list[dict[str, Any]], out_dir: Path,
           runs_dir: Path = Path("runs/sacred")) -> dict[str, Any]:
    """Write ``comparison.md``, ``comparison.png`` and ``comparison.json`` under ``out_dir``; returns the summary."""
    found = match(show, experiments)
    summary = summarise(config, experiments, found)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = sacred_records(runs_dir)
    atomic_write_text(out_dir / "comparison.md", render_markdown(config, summary, experiments, found, records))
    plot_comparison(summary, [row.name for row in config.strategies], COLUMN_LABELS, len(config.seeds),
                    config.data_share_strategies, config.knn_k, out_dir / "comparison.png")
    write_json(summary_json(config, summary, found), out_dir / "comparison.json")
    return summary

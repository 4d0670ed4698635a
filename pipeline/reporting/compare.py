"""Masking strategies compared as DVC experiments (``make compare``).

The plan comes from the ``compare`` section of ``params.yaml``: one experiment
per strategy row and seed (the paper's Table 1), plus k-NN of the
``data_share_strategies`` on a share of the train set (``data.percent``), every
one with the same ``budget`` overrides. Experiments are queued with
``dvc exp run --queue -S ...`` and run by DVC; the results are read back from
``dvc exp show --json`` into ``reports/comparison.json`` (the numbers and their
provenance), from which ``reports/comparison.md`` and a bar chart are rendered.

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

from pipeline.core.config import (CompareConfig, CompareStrategy, MaskingConfig, ParamsError, params_from_dict, parse_yaml,
                                  set_dotted)
from pipeline.core.files import atomic_write_text, write_json
from pipeline.core.strategies import strategy_label
from pipeline.reporting.figures import plot_comparison
from pipeline.reporting.paper import PAPER_DATA_SHARE, PAPER_DATA_SHARE_SOURCE, PAPER_KNN_ORDER, PAPER_SOURCE, PAPER_TABLE
from pipeline.reporting.provenance import header_lines
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
        set_dotted(result, dotted, parse_yaml(text))
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


# ------------------------------------------------------------------- document
# comparison.json is the one source of comparison.md and comparison.png: `render` builds it from
# `dvc exp show`, `rerender` renders it again (e.g. after a text fix) without DVC or the experiments.
DOCUMENT_FORMAT = 2


def _stat_json(stat: Stat | None) -> dict[str, Any] | None:
    return None if stat is None else {"mean": stat.mean, "sd": stat.sd, "values": list(stat.values)}


def _stat_of(entry: dict[str, Any] | None) -> Stat | None:
    return None if not entry or not entry.get("values") else Stat(tuple(entry["values"]))


def grid_of(params: dict[str, Any]) -> dict[str, Any]:
    """The params that decide how many patches AttMask-Hint reveals (see :func:`hint_note`)."""
    augment, model, masking = (params.get(key) or {} for key in ("augment", "model", "masking"))
    return {"augment": {"global_size": augment.get("global_size", 224)}, "model": {"patch_size": model.get("patch_size")},
            "masking": {"show_max": masking.get("show_max", 0.1)}}


def wall_time(found: dict[Experiment, Found]) -> dict[str, Any] | None:
    """How long the experiments took, from their finish times (DVC records one per experiment).

    The queue runs one experiment at a time, so consecutive finish times are
    durations; the first experiment's is taken as the median of the others, and
    a gap over 3 times the median (the queue was stopped, or restarted later)
    counts as one median experiment, not as the pause.
    """
    times = sorted(datetime.datetime.fromisoformat(f.timestamp) for f in found.values() if f.timestamp)
    if len(times) < 3:
        return None
    gaps = [(b - a).total_seconds() / 60 for a, b in zip(times, times[1:])]
    typical = statistics.median(gaps)
    if typical <= 0:
        return None
    pauses = sum(g > 3 * typical for g in gaps)
    total = sum(typical if g > 3 * typical else g for g in gaps) + typical
    return {"total_minutes": total, "typical_minutes": typical, "experiments": len(times), "pauses": pauses}


def _wall_time_text(wall: dict[str, Any] | None) -> str:
    if not wall:
        return ""
    note = f"; {wall['pauses']} pause(s) in the queue counted as one typical experiment each" if wall["pauses"] else ""
    return (f"Wall time: {wall['total_minutes']:.0f} min for {wall['experiments']} experiments run one at a time, about "
            f"{wall['typical_minutes']:.1f} min each (from the experiments' finish times in `dvc exp show`{note}).")


def wall_time_statement(found: dict[Experiment, Found]) -> str:
    """:func:`wall_time` as the report's sentence (empty when there are too few experiments to tell)."""
    return _wall_time_text(wall_time(found))


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


def document(config: CompareConfig, experiments: Sequence[Experiment], found: dict[Experiment, Found],
             records: dict[str, list[str]] | None = None, provenance: dict[str, Any] | None = None) -> dict[str, Any]:
    """``comparison.json``: everything the report shows, with where it came from (``provenance``)."""
    summary = summarise(config, experiments, found)
    records = records or {}
    return {
        "format": DOCUMENT_FORMAT,
        "provenance": provenance,
        "budget": list(config.budget), "seeds": list(config.seeds), "knn_k": config.knn_k,
        "strategies": [{"name": r.name, "strategy": r.strategy, "ratio": r.ratio, "ratio_var": r.ratio_var}
                       for r in config.strategies],
        "data_shares": list(config.data_shares), "data_share_strategies": list(config.data_share_strategies),
        "grid": grid_of(experiments[0].expected) if experiments else None,
        "num_classes": summary["num_classes"],
        "table": {r: {c: _stat_json(s) for c, s in cols.items()} for r, cols in summary["table"].items()},
        "random_init": {c: _stat_json(s) for c, s in summary["random_init"].items()},
        "data_share": {n: {f"{k:g}": _stat_json(s) for k, s in v.items()} for n, v in summary["data_share"].items()},
        "experiments": [{"name": e.name, "overrides": list(e.overrides), "rev": found[e].rev if e in found else None,
                         "baseline": found[e].baseline if e in found else None, "records": records.get(e.name, [])}
                        for e in experiments],
        "missing": [e.name for e in summary["missing"]],
        "wall_time": wall_time(found),
    }


@dataclass(frozen=True)
class _View:
    """A comparison document, with its statistics as :class:`Stat` again, for rendering."""

    doc: dict[str, Any]
    rows: tuple[CompareStrategy, ...]
    table: dict[str, dict[str, Stat | None]]
    floor: dict[str, Stat | None]
    shares: dict[str, dict[float, Stat | None]]
    same: dict[str, str]  # row -> the row it equals by construction (Hint -> High where Hint reveals nothing)

    @classmethod
    def of(cls, doc: dict[str, Any]) -> "_View":
        rows = tuple(CompareStrategy(r["name"], r["strategy"], r["ratio"], r["ratio_var"]) for r in doc["strategies"])
        table = {r: {c: _stat_of(s) for c, s in cols.items()} for r, cols in doc["table"].items()}
        return cls(doc, rows, table, {c: _stat_of(s) for c, s in doc["random_init"].items()},
                   {n: {float(k): _stat_of(s) for k, s in v.items()} for n, v in doc["data_share"].items()},
                   identical_rows(rows, table, doc.get("grid")))

    def label(self, name: str) -> str:
        """`name`, with the rows identical to it by construction: ``attmask_high`` (= ``attmask_hint``)."""
        twins = [other for other, target in self.same.items() if target == name] + (
            [self.same[name]] if name in self.same else [])
        return f"`{name}`" + "".join(f" (= `{t}`)" for t in twins)


def hint_reveals(row: CompareStrategy, params: dict[str, Any]) -> tuple[int, int, float]:
    """(most patches AttMask-Hint reveals, patches, show_max): floor(show_max * (ratio + ratio_var) * P)."""
    augment, model = params.get("augment") or {}, params.get("model") or {}
    patches = (int(augment.get("global_size", 224)) // int(model.get("patch_size") or 16)) ** 2
    show_max = float((params.get("masking") or {}).get("show_max", 0.1))
    return math.floor(show_max * (row.ratio + row.ratio_var) * patches), patches, show_max


def hint_note(row: CompareStrategy, params: dict[str, Any]) -> str:
    """What AttMask-Hint reveals on this patch grid: at most floor(show_max * (ratio + ratio_var) * P) patches."""
    most, patches, show_max = hint_reveals(row, params)
    if most == 0:
        return (f"On this {patches}-patch grid AttMask-Hint reveals floor({show_max:g} x r x {patches}) = 0 patches for "
                f"every ratio r up to {row.ratio + row.ratio_var:g}: it masks exactly what AttMask-High masks, so its "
                "row equals AttMask-High's by construction, not by chance (a larger grid separates them).")
    return f"On this {patches}-patch grid AttMask-Hint reveals up to {most} of the masked patches again."


def identical_rows(rows: Sequence[CompareStrategy], table: dict[str, dict[str, Stat | None]],
                   grid: dict[str, Any] | None) -> dict[str, str]:
    """Hint rows that reveal nothing on this grid -> the High row they equal (same ratios, same numbers)."""
    same = {}
    for hint in (r for r in rows if r.strategy == "attmask_hint"):
        high = next((r for r in rows if r.strategy == "attmask_high"
                     and (r.ratio, r.ratio_var) == (hint.ratio, hint.ratio_var)), None)
        if high is None or grid is None or hint_reveals(hint, grid)[0] != 0:
            continue
        a, b = table.get(hint.name, {}), table.get(high.name, {})
        if any(a.get(c) is not None for c in COLUMNS) and all(
                (a.get(c) and a[c].values) == (b.get(c) and b[c].values) for c in COLUMNS):
            same[hint.name] = high.name
    return same


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


def code_commits(doc: dict[str, Any]) -> str:
    """The baseline commits of the found experiments, for the report (``"(none found)"`` if none)."""
    commits = sorted({e["baseline"] for e in doc["experiments"] if e.get("baseline")})
    return ", ".join(f"`{c}`" for c in commits) if commits else "(none found)"


def render_markdown(doc: dict[str, Any]) -> str:
    """``reports/comparison.md`` from a comparison document (:func:`document`)."""
    view = _View.of(doc)
    seeds = ", ".join(str(s) for s in doc["seeds"])
    n = len(doc["seeds"])
    found = [e for e in doc["experiments"] if e.get("rev")]
    classes = doc.get("num_classes")
    chance = f" Chance is {100 / classes:.1f}% ({classes} classes)." if classes else ""
    lines = [
        "# Masking strategies compared",
        "",
        f"Generated by `make compare` (`python -m stages.compare`) from `dvc exp show --json`: "
        f"{len(found)} of {len(doc['experiments'])} planned DVC experiments found. Every experiment is the pipeline "
        f"with the same budget (`{' '.join(doc['budget']) or 'none'}`) and "
        + (f"one of the seeds {seeds}; cells are the mean ± sample standard deviation over the {n} seeds "
           "(`seed` also redraws the embedded dataset and the train subset)." if n > 1
           else f"seed {seeds}; cells are single runs.") + chance,
        "",
        *header_lines(doc.get("provenance")),
        f"Code: the experiments ran on commit {code_commits(doc)}. {_wall_time_text(doc.get('wall_time'))}".rstrip(),
        "",
        "## Strategies (the paper's Table 1)",
        "",
        f"Top-1 (%) on the val split. k-NN: weighted, k = {doc['knn_k']}, frozen teacher [CLS] features; linear: "
        "logistic-regression probe; fine-tune: end-to-end on the same labelled data. The columns marked "
        "*paper* are **the paper's numbers, not ours**: " + PAPER_SOURCE + " (fine-tuning there is on CIFAR10 / "
        "CIFAR100). They show the shape to look for, not a target for this budget.",
        "",
        "| strategy | ratio | k-NN | linear | fine-tune | *paper k-NN* | *paper linear* | *paper fine-tune C10 / C100* |",
        "|---|---|---|---|---|---|---|---|",
    ]
    labels = {row.name: _row_label(row) for row in view.rows}
    for row in view.rows:
        stats = view.table[row.name]
        paper = _paper_row(row)
        theirs = (f"*{paper['knn']:.1f}* | *{paper['linear']:.1f}* | *{paper['finetune_cifar10']:.1f} / "
                  f"{paper['finetune_cifar100']:.1f}*") if paper else " | | "
        if row.name in view.same:  # one run's numbers, shown once: under the row it equals
            ours = " | ".join([f"= {labels[view.same[row.name]]}"] * len(COLUMNS))
        else:
            ours = " | ".join(_cell(stats[c]) for c in COLUMNS)
        lines.append(f"| {labels[row.name]} (`{row.name}`) | {_ratio(row)} | {ours} | {theirs} |")
    if any(view.floor.values()):
        lines.append("| random init, no pre-training (floor) | - | " + " | ".join(_cell(view.floor[c]) for c in COLUMNS)
                     + " | | | |")
    lines.append("")
    hint = next((row for row in view.rows if row.strategy == "attmask_hint"), None)
    if hint is not None and doc.get("grid"):
        lines += [hint_note(hint, doc["grid"]) + (
            " Its row is therefore not a second finding: the statements below name it once, beside AttMask-High."
            if hint.name in view.same else ""), ""]
    lines += ["### Which differences exceed the seed spread", ""]
    distinct = [r.name for r in view.rows if r.name not in view.same]
    lines += _spread_statement(view, {c: {r: view.table[r][c] for r in distinct} for c in COLUMNS}, n)
    lines += _paper_order_section(view)
    lines += _data_share_section(view)
    lines += _chart_and_experiments(doc)
    return "\n".join(lines) + "\n"


def _spread_statement(view: _View, stats: dict[str, dict[str, Stat | None]], n: int) -> list[str]:
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
            shown = "; ".join(f"{view.label(a)} > {view.label(b)} by {sa.mean - sb.mean:.1f} (sd {sa.sd:.1f}, {sb.sd:.1f})"
                              for a, b, sa, sb in pairs)
            lines.append(f"- **{label}**: {shown}.")
        base = view.floor.get(column)
        if base is not None and base.sd is not None:
            above = [name for name, s in stats[column].items() if s is not None and exceeds_spread(s, base) and s.mean > base.mean]
            lines.append(f"  Above the random-init floor beyond the spread: {', '.join(view.label(a) for a in above) or 'none'}.")
    return lines + [""]


def _paper_order_section(view: _View) -> list[str]:
    """Where our k-NN ordering agrees with the paper's (High >= Hint > random > block > Low), pair by pair.

    A tie does not point the paper's way; a pair identical by construction is no finding and is not counted.
    """
    rows = {row.strategy: row.name for row in view.rows if (row.ratio, row.ratio_var) == (0.3, 0.2)}
    chain = [s for s in PAPER_KNN_ORDER if s in rows]
    pairs = list(zip(chain, chain[1:]))
    if {"attmask_high", "attmask_low"} <= set(chain):
        pairs.append(("attmask_high", "attmask_low"))
    if not pairs:
        return []
    lines = ["### Against the paper's ordering", "",
             "The paper's k-NN ordering is AttMask-High ≥ AttMask-Hint > random > block-wise > AttMask-Low "
             "(Table 1, ratios 10-50%). Ours, for each neighbouring pair of that chain and for High vs Low "
             "(the paper's largest gap, 5.7 points):", ""]
    counts = {"agrees": 0, "ties": 0, "disagrees": 0}
    for better, worse in pairs:
        a_name, b_name = rows[better], rows[worse]
        if view.same.get(a_name) == b_name or view.same.get(b_name) == a_name:
            lines.append(f"- `{a_name}` vs `{b_name}`: identical by construction on this grid (above), not a measured "
                         "tie; not counted.")
            continue
        a, b = view.table[a_name]["knn"], view.table[b_name]["knn"]
        if a is None or b is None:
            lines.append(f"- `{a_name}` vs `{b_name}`: not measured.")
            continue
        diff = round(a.mean - b.mean, 1)  # judged as printed: a +0.0 is a tie, whatever the third decimal
        verdict = "agrees" if diff > 0 else "disagrees" if diff < 0 else "ties"
        counts[verdict] += 1
        spread = (", beyond the seed spread" if exceeds_spread(a, b) else
                  ", within the seed spread (not a measured difference)" if a.sd is not None else ", one seed (no spread)")
        paper = PAPER_TABLE.get((better, 0.3, 0.2), {}).get("knn"), PAPER_TABLE.get((worse, 0.3, 0.2), {}).get("knn")
        theirs = f" (paper: {paper[0] - paper[1]:+.1f})" if None not in paper else ""
        lines.append(f"- {view.label(a_name)} vs {view.label(b_name)}: {a.mean:.1f} vs {b.mean:.1f}, {diff:+.1f}"
                     f"{theirs}: {verdict}{spread}.")
    compared = sum(counts.values())
    others = [f"{counts['ties']} tie{'s' if counts['ties'] != 1 else ''}, pointing no way" if counts["ties"] else "",
              f"{counts['disagrees']} the other way" if counts["disagrees"] else ""]
    rest = "; ".join(o for o in others if o)
    lines += ["", f"{counts['agrees']} of {compared} compared pairs point the paper's way in the mean"
              + (f" ({rest})" if rest else "") + "."]
    return lines + [""]


def _data_share_section(view: _View) -> list[str]:
    doc = view.doc
    shares = [float(s) for s in doc["data_shares"]]
    knn_k = doc["knn_k"]
    if shares == [100]:
        return ["## k-NN vs share of the train set", "",
                "Not run: `compare.data_shares` is `[100]`. Set it to e.g. `[25, 100]` (6 more experiments) for "
                "k-NN vs the share of the train set, beside the paper's.", ""]
    lines = ["## k-NN vs share of the train set", "",
             f"k-NN top-1 (k = {knn_k}) when pre-training (and evaluating) on a seeded share of each train "
             "class (`data.percent`); 100% is the strategy table's run.", "",
             "| strategy | " + " | ".join(f"{s:g}%" for s in shares) + " |",
             "|---|" + "---|" * len(shares)]
    rows = {row.name: row for row in view.rows}
    names = doc["data_share_strategies"]
    for name in names:
        cells = [_cell(view.shares[name][s]) for s in shares]
        lines.append(f"| {_row_label(rows[name])} (`{name}`) | " + " | ".join(cells) + " |")
    if len(names) == 2 and len(doc["seeds"]) > 1:
        a, b = names
        beyond = [f"{s:g}%" for s in shares
                  if view.shares[a][s] and view.shares[b][s] and exceeds_spread(view.shares[a][s], view.shares[b][s])]
        lines += ["", f"Shares where `{a}` and `{b}` differ by more than the seed spread: {', '.join(beyond) or 'none'}."]
    paper = {n: PAPER_DATA_SHARE[rows[n].strategy] for n in names
             if rows[n].strategy in PAPER_DATA_SHARE and (rows[n].ratio, rows[n].ratio_var) == (0.3, 0.2)}
    if paper:
        cols = list(next(iter(paper.values())))
        lines += ["", f"*The paper's numbers, not ours* ({PAPER_DATA_SHARE_SOURCE}; shares of ImageNet-1k):", "",
                  "| *strategy (paper)* | " + " | ".join(f"*{c}%*" for c in cols) + " |",
                  "|---|" + "---|" * len(cols)]
        for name, values in paper.items():
            lines.append(f"| *{_row_label(rows[name])}* | " + " | ".join(f"*{values[c]:.1f}*" for c in cols) + " |")
    return lines + [""]


def _chart_and_experiments(doc: dict[str, Any]) -> list[str]:
    lines = ["## Chart", "", "![strategies compared](comparison.png)", "",
             "Bars: mean with the seed sd; dotted lines: each metric's random-init floor, in its colour; dashed: "
             "chance.", "",
             "## The experiments", "",
             "Inspect them with `dvc exp show`, compare two with `dvc metrics diff <a> <b>` and "
             "`dvc params diff <a> <b>`, bring one into the workspace with `dvc exp apply <name>`.", "",
             "Each experiment's sacred records (one per stage, under `runs/sacred/<stage>/<id>`) name it "
             "(`info.dvc_experiment`); experiments queued before records were kept show none.", "",
             "| experiment | overrides | rev | sacred records |", "|---|---|---|---|"]
    for e in doc["experiments"]:
        kept = ", ".join(f"`{r}`" for r in e.get("records") or []) or "none"
        lines.append(f"| `{e['name']}` | `{' '.join(e['overrides'])}` | "
                     + (f"`{e['rev'][:7]}`" if e.get("rev") else "**missing**") + f" | {kept} |")
    if doc["missing"]:
        lines += ["", f"**{len(doc['missing'])} experiment(s) missing** (not run, failed, or run with other params): "
                      "`dvc queue status` and `dvc queue logs <name>` say why; `make compare` runs what is missing."]
    return lines


def write_files(doc: dict[str, Any], out_dir: Path) -> None:
    """``comparison.md``, ``comparison.png`` and ``comparison.json`` of a document, under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "comparison.md", render_markdown(doc))
    view = _View.of(doc)
    labels = {row.name: _row_label(row) + "".join(f" (= {_row_label(r)})" for r in view.rows
                                                   if view.same.get(r.name) == row.name)
              for row in view.rows if row.name not in view.same}
    summary = {"table": view.table, "random_init": view.floor, "data_share": view.shares,
               "num_classes": doc.get("num_classes")}
    plot_comparison(summary, labels, COLUMN_LABELS, len(doc["seeds"]), doc["data_share_strategies"], doc["knn_k"],
                    out_dir / "comparison.png")
    write_json(doc, out_dir / "comparison.json")


def render(config: CompareConfig, experiments: Sequence[Experiment], show: list[dict[str, Any]], out_dir: Path,
           runs_dir: Path = Path("runs/sacred"), provenance: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``comparison.md``, ``comparison.png`` and ``comparison.json`` under ``out_dir``; returns the summary.

    ``provenance``: :func:`pipeline.reporting.provenance.record` of the experiments (None: not recorded).
    """
    found = match(show, experiments)
    write_files(document(config, experiments, found, sacred_records(runs_dir), provenance), out_dir)
    return summarise(config, experiments, found)


def rerender(path: Path, out_dir: Path | None = None) -> dict[str, Any]:
    """Render ``comparison.md`` and ``.png`` again from a ``comparison.json`` (its provenance kept as recorded)."""
    doc = json.loads(Path(path).read_text())
    if doc.get("format") != DOCUMENT_FORMAT:
        raise ValueError(f"{path}: comparison document format {doc.get('format')}, this code renders {DOCUMENT_FORMAT}")
    write_files(doc, out_dir or Path(path).parent)
    return doc

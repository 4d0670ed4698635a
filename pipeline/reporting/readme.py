"""The human-readable report (the `report` stage).

:func:`collect_report` gathers every number into ``reports/report.json``
(deterministic, a DVC output), and :func:`render_readme` writes
``reports/README.md`` from it plus its provenance (:mod:`pipeline.reporting.provenance`),
the stages' machines and the companion reports' freshness. README.md holds no
clock reading, run counter or date, so a rerun of the same commit on the same
kind of machine writes the same bytes; the clock readings go to
``reports/timing/summary.md`` (:mod:`pipeline.reporting.timing`).
"""
from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any, Mapping

from pipeline.core.config import MaskingConfig, Params
from pipeline.core.files import sha256_file, write_json
from pipeline.core.strategies import strategy_label
from pipeline.reporting.metrics import GAIN, HEADLINE_K, WORSE, gain_margins, read_optional
from pipeline.reporting.paper import PAPER_FEWSHOT, PAPER_SOURCE, PAPER_TABLE
# format_environment lives in provenance; imported here too because older callers read it from this module
from pipeline.reporting.provenance import format_environment, header_lines, judge, params_sha256  # noqa: F401

REPORT_FORMAT = 2
REPORT_VARIANTS = ("pretrained", "random_init", "pixels")
VARIANT_LABELS = {"pretrained": "pre-trained (this run)", "random_init": "random init", "pixels": "raw pixels"}
EVAL_FILES = ("knn", "fewshot", "linear", "finetune")

# The supervised reference: the same ViT, trained with labels from random init on the
# same train split and budget. It *is* the finetune stage's random_init run, so it is
# the random-init row's fine-tuning cell, not a row of its own.
SUPERVISED_MODEL = "the same ViT trained with labels from random init (fine-tuning stage, same budget)"

# An attention map counts as nearly flat when its most attended patch gets less than
# twice the attention of its least attended one (the max/min the figure prints).
FLAT_MAX_OVER_MIN = 2.0
# A few-shot mean is within noise of chance when |mean - chance| < NOISE_SE x the larger of the
# draws' standard deviation and the binomial standard error of one draw on the val images.
NOISE_SE = 2.0

# Stages that keep no run record, so reports/timing/ never has their file, and why.
NO_RUN_RECORD = {"metrics": "none kept: the stage only merges JSON files and runs without a run record"}

# The companion reports: file, its JSON (whose "provenance" says what it depends on), how to make it.
COMPANIONS = (("comparison.md", "comparison.json", "`make compare`"),
              ("bench.md", "bench/provenance.json", "`make bench`"),
              ("reliability.md", "reliability.json", "`pytest tests/reliability`"))


def ratio_label(masking: MaskingConfig) -> str:
    """The paper's ratio column: ``10-50%`` for 0.3 +- 0.2, ``75%`` without variation."""
    low, high = masking.ratio - masking.ratio_var, masking.ratio + masking.ratio_var
    if masking.ratio_var == 0:
        return f"{masking.ratio * 100:g}%"
    return f"{round(low * 100, 6):g}-{round(high * 100, 6):g}%"


def supervised_reference(finetune: dict[str, Any]) -> dict[str, Any] | None:
    """The supervised reference (the finetune stage's ``random_init`` run), None when it has not run."""
    run = finetune.get("random_init")
    if not run or not run.get("top1"):
        return None
    return {"model": SUPERVISED_MODEL, "variant": "random_init", "top1": run["top1"]}


def collect_report(
    eval_dir: Path, pretrain_dir: Path, manifest_path: Path, params: Params, figures: dict[str, str],
    figure_data: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Every number of the report, deterministic (no times, hosts or run ids): ``reports/report.json``.

    Missing evaluation files are listed under ``missing`` and their cells left
    ``None`` (the renderer writes "not run"), so a partial pipeline still renders.
    ``figure_data``: figure name -> what it shows as numbers (e.g.
    :func:`pipeline.reporting.figures.mask_figure_data`), which the text judges by.
    """
    evals = {name: read_optional(eval_dir / f"{name}.json") for name in EVAL_FILES}
    manifest = read_optional(manifest_path)
    knn, fewshot, linear, finetune = (evals[n] or {} for n in EVAL_FILES)
    headline_k = HEADLINE_K
    if knn and HEADLINE_K not in next(iter(knn.values()))["top1"]:
        headline_k = next(iter(next(iter(knn.values()))["top1"]))

    table = {}
    for variant in REPORT_VARIANTS:
        row = {
            "knn": knn[variant]["top1"][headline_k] if variant in knn else None,
            "linear": linear[variant]["top1"] if variant in linear else None,
            "finetune": finetune[variant]["top1"] if variant in finetune else None,
        }
        if any(v is not None for v in row.values()):
            table[variant] = row
    masking = params.masking
    key = (masking.strategy, round(masking.ratio, 6), round(masking.ratio_var, 6))
    data: dict[str, Any] = {"manifest": str(manifest_path), "manifest_sha256": None}
    if manifest is not None:
        data.update(
            manifest_sha256=sha256_file(manifest_path),
            source=manifest.get("source"),
            num_classes=len(manifest.get("classes", [])),
            images={split: t.get("selected") for split, t in manifest.get("totals", {}).items()},
            rejected=len(manifest.get("rejected", [])),
        )
    return {
        "format": REPORT_FORMAT,
        "strategy": masking.strategy,
        "strategy_name": strategy_label(masking.strategy),
        "masking": {"ratio": masking.ratio, "ratio_var": masking.ratio_var, "prob": masking.prob,
                    "show_max": masking.show_max, "ratio_label": ratio_label(masking)},
        "params_sha256": params_sha256(params),
        "data": data,
        "knn_k": int(headline_k),
        "table": table,
        "margins": gain_margins(table, next(iter(knn.values()))["num_val"]) if knn else {},
        "knn": {v: {"top1": r["top1"], "top5": r["top5"], "temperature": r["temperature"]} for v, r in knn.items()},
        "fewshot": {
            v: {s: {"mean": r["mean"], "std": r["std"], "draws": len(r["runs"])} for s, r in per_shot.items() if s != "skipped"}
            for v, per_shot in fewshot.items()
        },
        # shot counts the data could not serve (too few train images per class), with the reason
        "fewshot_skipped": {v: dict(per_shot.get("skipped") or {}) for v, per_shot in fewshot.items()},
        "fewshot_draw": params.fewshot.draw,
        "pretrain": read_optional(pretrain_dir / "metrics.json"),
        "uniform_cls_loss": math.log(params.model.out_dim),
        "expected_masked_share": masking.prob * masking.ratio,
        "supervised_reference": supervised_reference(finetune),
        "linear_sgd": _linear_sgd(read_optional(eval_dir / "linear_sgd.json")),
        "paper": {"source": PAPER_SOURCE, "table": PAPER_TABLE.get(key), "fewshot": PAPER_FEWSHOT.get(masking.strategy)
                  if key in PAPER_TABLE else None},
        "figures": dict(figures),
        "figure_data": dict(figure_data or {}),
        "missing": [f"{eval_dir / name}.json" for name in EVAL_FILES if evals[name] is None],
    }


def write_report_json(report: dict[str, Any], path: Path) -> None:
    write_json(report, path)


# ------------------------------------------------------------------ companions
def companion_statuses(reports_dir: Path, repo: Path = Path("."), params_sha: str | None = None) -> list[dict[str, Any]]:
    """Each companion report: ``{"name", "how", "state": current | stale | missing, "why"}``."""
    statuses = []
    for name, record_file, how in COMPANIONS:
        if not (reports_dir / name).is_file():
            statuses.append({"name": name, "how": how, "state": "missing", "why": ""})
            continue
        try:
            record = (read_optional(reports_dir / record_file) or {}).get("provenance")
        except (OSError, ValueError):
            record = None  # unreadable: judged as unknown, like a missing record
        current, why = judge(record, repo, params_sha)
        statuses.append({"name": name, "how": how, "state": "current" if current else "stale", "why": why})
    return statuses


def _companions(statuses: list[dict[str, Any]]) -> list[str]:
    lines = ["## Companion reports", "",
             "Current: every file it depends on (SHA-256 in its JSON's `provenance`) and the params equal this "
             "tree's; stale: one changed since it was produced, or it recorded none.", ""]
    for status in statuses:
        name = status["name"]
        if status["state"] == "missing":
            lines.append(f"- `{name}` ({status['how']}): not generated.")
        else:
            lines.append(f"- [`{name}`]({name}) ({status['how']}): **{status['state']}**: {status['why']}.")
    return lines + [""]


# ---------------------------------------------------------------------- rendering
def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def format_machine(machine: dict[str, Any] | None) -> str:
    """``cpu (AMD EPYC), 2 threads`` / ``cuda (NVIDIA H100) x8, 16 threads`` (a stage's ``machine_info``)."""
    if not machine:
        return "not recorded"
    device = str(machine.get("device", "?"))
    detail = machine.get("gpu") if device.startswith("cuda") else machine.get("cpu")
    text = device + (f" ({detail})" if detail else "")
    if machine.get("gpu_count", 1) and int(machine.get("gpu_count", 1)) > 1 and device.startswith("cuda"):
        text += f" x{machine['gpu_count']}"
    if machine.get("world_size") and int(machine["world_size"]) > 1:
        text += f", {machine['world_size']} processes"
    if machine.get("threads") is not None:
        text += f", {machine['threads']} threads"
    return text


def _header(report: dict[str, Any], provenance: Mapping[str, Any] | None) -> list[str]:
    data = report["data"]
    if data.get("manifest_sha256"):
        images = data.get("images", {})
        data_text = (f"sha256 `{data['manifest_sha256']}` (`{data['manifest']}`: {data.get('source')}, "
                     f"{data.get('num_classes')} classes, {images.get('train')} train / {images.get('val')} val images, "
                     f"{data.get('rejected', 0)} rejected)")
    else:
        data_text = f"not available (`{data['manifest']}` missing)"
    return [
        f"# AttMask report: {report['strategy_name']}, masking ratio {report['masking']['ratio_label']}",
        "",
        "Generated by `python -m stages.report` (the DVC `report` stage) from the pipeline's outputs; "
        "do not edit by hand. Every number below is also in [`report.json`](report.json).",
        "",
        # the params hash is the report's own (report.json), so header and report.json cannot disagree
        *header_lines({**(provenance or {}), "params_sha256": report["params_sha256"]},
                      extra=[("data manifest", data_text)], date=False),
    ]


MEASURE_NAMES = {"knn": "k-NN", "linear": "the linear probe", "finetune": "fine-tuning"}


def _verdict(report: dict[str, Any]) -> list[str]:
    """A loud warning when pre-training did not beat random init beyond noise; nothing when it did everywhere."""
    margins = report.get("margins") or {}
    weak = {m: v for m, v in margins.items() if v["verdict"] != GAIN}
    if not weak:
        return []
    worse = [m for m, v in weak.items() if v["verdict"] == WORSE]
    table = report["table"]

    def phrase(measure: str) -> str:
        entry = margins[measure]
        ours, theirs = table["pretrained"][measure], table["random_init"][measure]
        return (f"{MEASURE_NAMES[measure]} {entry['over_random_init']:+.1f} points ({ours:.1f} against {theirs:.1f}, "
                f"noise ±{entry['noise']:.1f})")

    title = ("**Pre-training made these features worse than random init.**" if worse
             else "**No measurable gain from pre-training.**")
    pretrain = report.get("pretrain") or {}
    causes = []
    if pretrain.get("steps") is not None:
        causes.append(f"the budget: {pretrain['steps']} steps (`pretrain.epochs`, `pretrain.min_steps`; the embedded "
                      "data's k-NN curve needs about 80 to plateau)")
    curve = pretrain.get("knn_during_training") or {}
    if curve:
        causes.append("the k-NN curve while training (`reports/pretrain/knn.csv`): "
                      + ", ".join(f"epoch {e}: {v:.1f}" for e, v in sorted(curve.items(), key=lambda kv: int(kv[0]))))
    if pretrain.get("final_loss_cls") is not None:
        causes.append(f"the [CLS] loss: {pretrain['final_loss_cls']:.3f} at the end against "
                      f"ln(out_dim) = {report['uniform_cls_loss']:.3f} for a uniform teacher (close: little learned)")
    return ["", f"{title} Pre-trained minus random init: " + "; ".join(phrase(m) for m in weak) + ". "
            "Noise: 2 binomial standard errors of the difference on the val images, a floor under the seed "
            "spread. Likely causes to check: " + "; ".join(causes) + ". To try: more steps (raise "
            "`pretrain.min_steps` or `pretrain.epochs`), more images, or the comparison of strategies "
            "(`make compare`) to see whether the recipe learns on this data at all."]


def _stages(timings: Mapping[str, dict[str, Any] | None], this_stage: str, this_machine: dict[str, Any] | None) -> list[str]:
    """Where each stage ran; no clock readings or run ids (they change on every run)."""
    lines = ["| stage | machine | timing record |", "|---|---|---|"]
    for stage, timing in timings.items():
        if stage == this_stage:
            lines.append(f"| {stage} | {format_machine(this_machine)} | this stage: written after this file, "
                         f"`reports/timing/{stage}.json` |")
        elif timing is not None:
            lines.append(f"| {stage} | {format_machine(timing.get('machine'))} | `reports/timing/{stage}.json` |")
        else:
            why = NO_RUN_RECORD.get(stage, f"none on this machine (no `reports/timing/{stage}.json`)")
            lines.append(f"| {stage} | - | {why} |")
    return lines + ["", "Wall times, images/s, CPU seconds and sacred run ids change on every run, so they are not "
                        "in this file: the report stage prints them and writes `reports/timing/summary.md` "
                        "(machine-local, not tracked by git).", ""]


def _linear_sgd(result: dict[str, Any] | None) -> dict[str, Any] | None:
    """The official SGD probe's numbers per variant, or None when the stage was off or has not run."""
    if not result or not result.get("enabled"):
        return None
    return {variant: {key: entry[key] for key in ("top1", "best_top1", "best_epoch", "epochs")}
            for variant, entry in result.items() if variant != "enabled"}


def _results(report: dict[str, Any]) -> list[str]:
    k = report["knn_k"]
    table = report["table"]
    masking = report["masking"]
    reference = report.get("supervised_reference")
    lines = [
        "## Results",
        "",
        f"Top-1 (%) on the val split, in the paper's format. k-NN: weighted, k = {k}, on frozen teacher [CLS] "
        "features; linear: logistic-regression probe; fine-tuning: end to end on the same train split.",
        "",
        "| masking | ratio | k-NN | linear | fine-tuning |",
        "|---|---|---|---|---|",
    ]
    for variant, row in table.items():
        if variant == "pretrained":
            name, ratio = f"**{report['strategy_name']}** (this run)", masking["ratio_label"]
        else:
            name, ratio = f"{VARIANT_LABELS[variant]} (baseline)", "-"
        if reference and variant == reference["variant"]:
            name += "; its fine-tuning is the supervised reference"
        lines.append(f"| {name} | {ratio} | {_pct(row['knn'])} | {_pct(row['linear'])} | {_pct(row['finetune'])} |")
    paper = report["paper"]["table"]
    if paper:
        lines.append(f"| *paper, ImageNet (theirs)*: {report['strategy_name']} | {masking['ratio_label']} "
                     f"| *{paper['knn']:.1f}* | *{paper['linear']:.1f}* "
                     f"| *{paper['finetune_cifar10']:.1f} / {paper['finetune_cifar100']:.1f}* (CIFAR10 / 100) |")
    lines.append("")
    notes = []
    mine = table.get("pretrained") or {}
    if reference:
        # like with like: the supervised reference is a fine-tuning number, so only fine-tuning is held against it
        against = (f"; fine-tuning the pre-trained backbone instead gives {mine['finetune']:.1f} "
                   f"({mine['finetune'] - reference['top1']:+.1f} points)" if mine.get("finetune") is not None else "")
        notes.append(f"The supervised reference is {reference['model']}: the same run as the random-init "
                     f"fine-tuning cell ({reference['top1']:.1f}), listed once{against}.")
    else:
        notes.append("No supervised reference: the fine-tuning stage has not run.")
    if paper:
        notes.append(f"The italic row is the paper's ({report['paper']['source']}), for the shape of the "
                     "comparison only: different data, model size and budget.")
    floor = table.get("random_init")
    if mine and floor:
        deltas = [f"{col} {mine[col] - floor[col]:+.1f}" for col in ("knn", "linear", "finetune")
                  if mine[col] is not None and floor[col] is not None]
        if deltas:
            notes.append(f"Pre-trained minus random init, in points: {', '.join(deltas)}.")
    sgd = report.get("linear_sgd")
    if sgd:
        parts = [f"{VARIANT_LABELS.get(variant, variant)} {entry['top1']:.1f} (best {entry['best_top1']:.1f} at epoch "
                 f"{entry['best_epoch']}, the number the official script reports)" for variant, entry in sgd.items()]
        epochs = next(iter(sgd.values()))["epochs"]
        notes.append(f"Official linear probe (`linear_sgd`: SGD head on the last blocks' [CLS], augmented, {epochs} "
                     f"epochs), top-1 after the last epoch: {'; '.join(parts)}.")
    if report["missing"]:
        notes.append("Not run yet (cells left -): " + ", ".join(f"`{m}`" for m in report["missing"]) + ".")
    return lines + [" ".join(notes), ""]


def _knn_all(report: dict[str, Any]) -> list[str]:
    knn = report["knn"]
    if not knn:
        return []
    ks = sorted(next(iter(knn.values()))["top1"], key=int)
    temperature = next(iter(knn.values()))["temperature"]
    lines = [f"### k-NN per k (T = {temperature:g}), top-1 / top-5", "",
             "| features | " + " | ".join(f"k = {k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
    for variant, result in knn.items():
        cells = " | ".join(f"{result['top1'][k]:.1f} / {result['top5'][k]:.1f}" for k in ks)
        lines.append(f"| {VARIANT_LABELS.get(variant, variant)} | {cells} |")
    return lines + [""]


def chance_noise(report: dict[str, Any], std: float) -> float | None:
    """The few-shot noise band around chance (points): :data:`NOISE_SE` x max(draw std, binomial SE on val)."""
    classes, val = report["data"].get("num_classes"), (report["data"].get("images") or {}).get("val")
    if not classes:
        return None
    chance = 100.0 / classes
    binomial = math.sqrt(chance * (100.0 - chance) / val) if val else 0.0
    return NOISE_SE * max(std, binomial)


def _fewshot(report: dict[str, Any]) -> list[str]:
    fewshot = report["fewshot"]
    lines = ["### Few-shot k-NN", ""]
    if not fewshot:
        return lines + ["not run", ""]
    skipped = {s: why for per in (report.get("fewshot_skipped") or {}).values() for s, why in per.items()}
    skipped_lines = [f"- {s} / class: skipped, {why}." for s, why in sorted(skipped.items(), key=lambda kv: int(kv[0]))]
    shots = sorted({s for per in fewshot.values() for s in per}, key=int)
    if not shots:
        return lines + ["Every shot count was skipped: the train split has too few images per class.", "",
                        *skipped_lines, ""]
    draws = max(r["draws"] for per in fewshot.values() for r in per.values())
    classes = report["data"].get("num_classes")
    chance = 100.0 / classes if classes else None
    marked = 0

    def cell(result: dict[str, Any]) -> str:
        nonlocal marked
        text = f"{result['mean']:.1f} ± {result['std']:.1f}"
        band = chance_noise(report, result["std"])
        if chance is not None and band is not None and abs(result["mean"] - chance) < band:
            marked += 1
            return text + " (chance)"
        return text

    lines += [f"Top-1 (%) with {'/'.join(shots)} labelled train images per class: mean ± std over {draws} "
              f"{'contiguous slices' if report.get('fewshot_draw') == 'slices' else 'seeded draws'}.", "",
              "| features | " + " | ".join(f"{s} / class" for s in shots) + " |", "|---|" + "---|" * len(shots)]
    for variant, per in fewshot.items():
        cells = " | ".join(cell(per[s]) if s in per else "-" for s in shots)
        lines.append(f"| {VARIANT_LABELS.get(variant, variant)} | {cells} |")
    paper = report["paper"]["fewshot"]
    if paper:
        cells = " | ".join(f"*{paper[s]:.1f}*" if s in paper else "" for s in shots)
        lines.append(f"| *paper, ImageNet (theirs)*: {report['strategy_name']} | {cells} |")
    if chance is not None:
        val = (report["data"].get("images") or {}).get("val")
        se = f" and the binomial standard error of one draw on the {val} val images" if val else ""
        lines += ["", f"*(chance)*: within noise of chance ({chance:.1f}%, {classes} classes), i.e. |mean - chance| "
                      f"< {NOISE_SE:g} x the larger of the draws' std{se}: {marked} cell(s). Such a cell, above or "
                      "below chance or the other row, measures no learned difference."]
    if skipped_lines:
        lines += ["", *skipped_lines]
    return lines + [""]


def _pretraining(report: dict[str, Any]) -> list[str]:
    pretrain = report["pretrain"]
    if not pretrain:
        return ["### Pre-training", "", "not run", ""]
    uniform = report["uniform_cls_loss"]
    lines = [
        "### Pre-training",
        "",
        f"{pretrain['epochs']} epochs, {pretrain['steps']} steps. Final epoch loss {pretrain['final_loss']:.3f} "
        f"([CLS] {pretrain['final_loss_cls']:.3f}, patch {pretrain['final_loss_patch']:.3f}; first epoch "
        f"{pretrain['first_epoch_loss']:.3f}). Masked share {pretrain['masked_share']:.3f} of global-crop patch "
        f"tokens (prob x ratio = {report['expected_masked_share']:.3f}).",
    ]
    curve = pretrain.get("knn_during_training") or {}
    if curve:
        points = ", ".join(f"epoch {epoch}: {top1:.1f}" for epoch, top1 in sorted(curve.items(), key=lambda kv: int(kv[0])))
        lines.append(f"Teacher k-NN top-1 on val while training (`pretrain.eval_every`, "
                     f"`reports/pretrain/knn.csv`): {points}.")
    if abs(pretrain["final_loss_cls"] - uniform) < 0.05 * uniform:
        lines.append(f"The [CLS] loss ends within 5% of ln(out_dim) = {uniform:.3f}, the loss against a uniform "
                     "teacher; that alone does not make the attention flat (judged from the attention itself below).")
    lines += _attention_statement(report)
    return lines + [""]


def _attention_statement(report: dict[str, Any]) -> list[str]:
    """Whether the figure's attention maps are flat, from their max/min (not from the loss)."""
    ratios = (report.get("figure_data") or {}).get("masks", {}).get("attention_max_over_min") or []
    if not ratios:
        return []
    flat = sum(r < FLAT_MAX_OVER_MIN for r in ratios)
    spread = f"max/min attention over patches {min(ratios):.1f}-{max(ratios):.1f} (median {statistics.median(ratios):.1f})"
    if flat == len(ratios):
        return [f"The teacher's attention maps below are nearly flat: {spread} in all {len(ratios)} figure images, "
                f"below {FLAT_MAX_OVER_MIN:g} (the most attended patch gets less than {FLAT_MAX_OVER_MIN:g}x the "
                "least attended one), so attention-guided masks are close to arbitrary here."]
    return [f"The teacher's attention is not flat: {spread} in the {len(ratios)} figure images"
            + (f"; {flat} of them nearly flat (below {FLAT_MAX_OVER_MIN:g})" if flat else "") + "."]


MASKS_CAPTION = ("The qualitative figure: for seeded val images, the image (the eval crop the teacher sees), the "
                 "exported teacher's last-block [CLS] attention (mean over heads, min-max scaled per image; max/min "
                 "below it), and the mask each strategy draws at the same ratio (grey = masked). High masks the most "
                 "attended patches, Low the least, Hint as High but with some of the top patches revealed again.")
FIGURE_CAPTIONS = {
    "losses": "Pre-training losses per step (`reports/pretrain/steps.csv`).",
    "masked_share": "Share of masked patch tokens per step.",
    "finetune": "Fine-tuning val top-1 per epoch, pre-trained vs random init (`reports/eval/finetune_curve.csv`).",
}


def masks_caption(report: dict[str, Any]) -> str:
    """The mask figure's caption; it says when Hint reveals nothing (floor(show_max * r * P) = 0)."""
    data = (report.get("figure_data") or {}).get("masks") or {}
    revealed = data.get("hint_revealed")
    if not revealed:
        return MASKS_CAPTION
    masking = report["masking"]
    if not any(revealed):
        return MASKS_CAPTION + (f" On this {data['patches']}-patch grid Hint reveals 0 patches (floor(show_max x r x P)"
                                f" = floor({masking['show_max']:g} x {data['ratio']:g} x {data['patches']}) = 0, "
                                "`pipeline/method/masking.py`), so its masks equal High's.")
    return MASKS_CAPTION + f" Here Hint reveals {min(revealed)}-{max(revealed)} patch(es) per image (cyan outline)."


def _figures(report: dict[str, Any]) -> list[str]:
    lines = ["## Figures", ""]
    for name, path in report["figures"].items():
        caption = masks_caption(report) if name == "masks" else FIGURE_CAPTIONS.get(name, "")
        lines += [f"**{name.replace('_', ' ')}.** {caption}", "", f"![{name}]({path})", ""]
    return lines


HOW_MADE = """## How this file is made

`python -m stages.report` (run by `dvc repro` as the last stage, or by hand at any time) reads
`reports/eval/*.json`, `reports/pretrain/{metrics.json,steps.csv}`, `data/shards/manifest.json`,
the exported teacher `models/pretrain/backbone.safetensors`, the val shards, the stages' machines
(`reports/timing/*.json`) and the companion reports' JSON, and writes:

- `reports/report.json` and `reports/figures/*.png`: DVC outputs, byte-identical on every rerun
  with the same params, data and commit (same machine kind and thread count);
- this file, which also names the commit whose pipeline inputs these are, the machines and
  whether the companion reports are current. Those depend on git and on files outside the
  stage's deps, so this file is *not* a DVC output; it is tracked by git instead. It holds no
  date, clock reading or run id: a rerun of the same commit on the same kind of machine
  writes the same bytes;
- `reports/timing/summary.md`: the clock readings (machine-local, not tracked).
"""


def render_readme(
    report: dict[str, Any],
    provenance: Mapping[str, Any] | None,
    timings: Mapping[str, dict[str, Any] | None],
    companions: list[dict[str, Any]],
    this_stage: str = "report",
    this_machine: dict[str, Any] | None = None,
) -> str:
    """``reports/README.md``: provenance header, stages, result tables, figures, companion reports' freshness.

    Args:
        provenance: :func:`pipeline.reporting.provenance.record` of this run (its date is not shown).
        timings: stage -> its ``reports/timing/<stage>.json`` (None where absent); only machines are shown.
        companions: :func:`companion_statuses`.
        this_machine: :func:`pipeline.core.tracking.machine_info` of this process (the ``this_stage`` row).
    """
    lines = _header(report, provenance)
    lines[1:1] = _verdict(report)  # right under the title: the first thing a reader sees
    lines += _stages(timings, this_stage, this_machine)
    lines += _results(report) + _fewshot(report) + _knn_all(report) + _pretraining(report)
    lines += _figures(report) + _companions(companions)
    return "\n".join(lines) + "\n" + HOW_MADE

"""The human-readable report (the `report` stage).

:func:`collect_report` gathers every number into ``reports/report.json``
(deterministic, a DVC output), and :func:`render_readme` writes
``reports/README.md`` from it plus the volatile provenance (commit, sacred runs,
machines, wall times), which is why README.md is not a DVC output.
"""
from __future__ import annotations

import hashlib
import json
import math
import subprocess
from pathlib import Path
from typing import Any

from pipeline.core.config import MaskingConfig, Params, params_to_dict
from pipeline.core.files import sha256_file, write_json
from pipeline.core.strategies import strategy_label
from pipeline.core.tracking import environment, machine_info
from pipeline.reporting.metrics import read_optional
from pipeline.reporting.paper import PAPER_FEWSHOT, PAPER_SOURCE, PAPER_TABLE


# ===================================================================== the report
# `reports/report.json` (deterministic, a DVC output) holds every number of the
# report; `reports/README.md` renders it together with provenance that changes
# from run to run (commit, sacred run ids, machine, wall times), which is why
# README.md is not a DVC output (see dvc.yaml, stage `report`).

REPORT_FORMAT = 1
REPORT_VARIANTS = ("pretrained", "random_init", "pixels")
VARIANT_LABELS = {"pretrained": "pre-trained (this run)", "random_init": "random init", "pixels": "raw pixels"}
EVAL_FILES = ("knn", "fewshot", "linear", "finetune")
HEADLINE_K = "20"  # DINO/iBOT report k-NN at k = 20

# The supervised reference: the same ViT, trained with labels from random init on the
# same train split and budget (the finetune stage's random_init run). Frozen-feature
# probes of a self-supervised backbone are judged against it.
SUPERVISED_MODEL = "the same ViT trained with labels from random init (fine-tuning stage, same budget)"


def params_sha256(params: Params) -> str:
    """SHA-256 of the validated params as canonical JSON (YAML comments and layout do not count)."""
    text = json.dumps(params_to_dict(params), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def ratio_label(masking: MaskingConfig) -> str:
    """The paper's ratio column: ``10-50%`` for 0.3 +- 0.2, ``75%`` without variation."""
    low, high = masking.ratio - masking.ratio_var, masking.ratio + masking.ratio_var
    if masking.ratio_var == 0:
        return f"{masking.ratio * 100:g}%"
    return f"{round(low * 100, 6):g}-{round(high * 100, 6):g}%"


def supervised_reference(finetune: dict[str, Any], knn: float | None, linear: float | None) -> dict[str, Any] | None:
    """The supervised upper bound and the share of it that the frozen pre-trained features reach.

    Args:
        finetune: ``reports/eval/finetune.json``; its ``random_init`` run is the supervised reference.
        knn, linear: the pre-trained backbone's k-NN and linear-probe top-1 (percent).
    """
    run = finetune.get("random_init")
    if not run or not run.get("top1"):
        return None
    top1 = run["top1"]
    return {
        "model": SUPERVISED_MODEL,
        "top1": top1,
        "knn_share": None if knn is None else round(100.0 * knn / top1, 1),
        "linear_share": None if linear is None else round(100.0 * linear / top1, 1),
    }


def collect_report(
    eval_dir: Path, pretrain_dir: Path, manifest_path: Path, params: Params, figures: dict[str, str]
) -> dict[str, Any]:
    """Every number of the report, deterministic (no times, hosts or run ids): ``reports/report.json``.

    Missing evaluation files are listed under ``missing`` and their cells left
    ``None`` (the renderer writes "not run"), so a partial pipeline still renders.
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
    pretrained = table.get("pretrained") or {}
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
        "knn": {v: {"top1": r["top1"], "top5": r["top5"], "temperature": r["temperature"]} for v, r in knn.items()},
        "fewshot": {
            v: {s: {"mean": r["mean"], "std": r["std"], "draws": len(r["runs"])} for s, r in per_shot.items() if s != "skipped"}
            for v, per_shot in fewshot.items()
        },
        "pretrain": read_optional(pretrain_dir / "metrics.json"),
        "uniform_cls_loss": math.log(params.model.out_dim),
        "expected_masked_share": masking.prob * masking.ratio,
        "supervised_reference": supervised_reference(finetune, pretrained.get("knn"), pretrained.get("linear")),
        "linear_sgd": _linear_sgd(read_optional(eval_dir / "linear_sgd.json")),
        "paper": {"source": PAPER_SOURCE, "table": PAPER_TABLE.get(key), "fewshot": PAPER_FEWSHOT.get(masking.strategy)
                  if key in PAPER_TABLE else None},
        "figures": dict(figures),
        "missing": [f"{eval_dir / name}.json" for name in EVAL_FILES if evals[name] is None],
    }


# ------------------------------------------------------------- volatile provenance
def git_commit(repo: Path = Path(".")) -> dict[str, Any]:
    """``{"sha": ..., "dirty": [tracked files with uncommitted changes]}``; sha None outside git."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout if done.returncode == 0 else None

    sha = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") or ""
    return {"sha": sha.strip() if sha else None, "dirty": [line[3:] for line in status.splitlines() if line.strip()]}


def describe_machine() -> dict[str, Any]:
    """This process's machine (:func:`pipeline.core.tracking.machine_info`) and its environment."""
    return {**machine_info(), "environment": environment()}


def format_environment(env: dict[str, Any] | None) -> str:
    """``Python 3.11.7, requirements.lock 1a2b3c4d5e6f, CPU family 25 model 17, ISA avx2 fma avx512f, numerics ...``."""
    if not env:
        return "not recorded"
    lock = env.get("lock_sha256")
    parts = [f"Python {env.get('python')}", f"requirements.lock {lock[:12]}" if lock else "no requirements.lock"]
    if env.get("cpu_family") is not None:
        parts.append(f"CPU family {env['cpu_family']} model {env.get('cpu_model_number')}")
    parts.append("ISA " + (" ".join(env.get("isa") or []) or "not recorded"))
    if env.get("numerics"):
        parts.append(format_numerics(env["numerics"]))
    return ", ".join(parts)


def format_numerics(numerics: dict[str, Any]) -> str:
    """``numerics portable (torch AVX2, MKL AVX2 strict, oneDNN off)`` from :func:`describe_numerics`'s record."""
    details = []
    if numerics.get("torch_cpu_capability"):
        details.append(f"torch {numerics['torch_cpu_capability']}")
    if numerics.get("mkl"):
        details.append(f"MKL {numerics['mkl']['branch']}" + (" strict" if numerics["mkl"].get("strict") else ""))
    if "onednn" in numerics:
        details.append("oneDNN " + ("on" if numerics["onednn"] else "off"))
    return f"numerics {numerics.get('mode')}" + (f" ({', '.join(details)})" if details else "")


def summarize_markdown(path: Path, limit: int = 300) -> str | None:
    """The first heading and paragraph of a markdown file (None if it does not exist)."""
    if not path.is_file():
        return None
    heading, paragraph = "", []
    for line in path.read_text().splitlines():
        text = line.strip()
        if text.startswith("#") and not heading and not paragraph:
            heading = text.lstrip("#").strip()
        elif text and not text.startswith(("#", "|", "```", "!")):
            paragraph.append(text)
        elif paragraph:
            break
    summary = " ".join(paragraph)
    summary = summary if len(summary) <= limit else summary[: limit - 3].rstrip() + "..."
    return f"{heading}: {summary}" if heading and summary else heading or summary


# ---------------------------------------------------------------------- rendering
def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _seconds(value: float | None) -> str:
    if value is None:
        return "not recorded"
    minutes, seconds = divmod(float(value), 60)
    return f"{seconds:.1f} s" if minutes == 0 else f"{int(minutes)} min {seconds:02.0f} s"


def format_machine(machine: dict[str, Any] | None) -> str:
    """``cpu (AMD EPYC), 2 threads`` / ``cuda (NVIDIA H100) x8, 16 threads``."""
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


def _sacred_run(stage: str, value: Any) -> str:
    if isinstance(value, dict):
        value = value.get("id")
    if value is None:
        return "not recorded"
    text = str(value)
    return f"`runs/sacred/{text}`" if "/" in text else f"`runs/sacred/{stage}/{text}`"


_TIMING_KEYS = {"stage", "sacred_run", "wall_seconds", "machine"}


def _extras(timing: dict[str, Any]) -> str:
    """Stage-specific timing figures (e.g. images_per_second), compactly."""
    parts = []
    for key, value in sorted(timing.items()):
        if key in _TIMING_KEYS or isinstance(value, (dict, list)) or isinstance(value, bool):
            continue
        shown = f"{value:.1f}" if isinstance(value, float) else str(value)
        parts.append(f"{key.replace('_', ' ')} {shown}")
    return "; ".join(parts)


def _header(report: dict[str, Any], commit: dict[str, Any], machine: dict[str, Any],
            timings: dict[str, dict[str, Any] | None]) -> list[str]:
    sha = commit.get("sha")
    commit_text = f"`{sha}`" if sha else "unknown (not a git checkout)"
    if commit.get("dirty"):
        shown = ", ".join(f"`{p}`" for p in commit["dirty"][:5]) + (" ..." if len(commit["dirty"]) > 5 else "")
        commit_text += f" plus uncommitted changes in {shown}"
    data = report["data"]
    if data.get("manifest_sha256"):
        images = data.get("images", {})
        data_text = (f"`{data['manifest_sha256']}` (`{data['manifest']}`: {data.get('source')}, "
                     f"{data.get('num_classes')} classes, {images.get('train')} train / {images.get('val')} val images, "
                     f"{data.get('rejected', 0)} rejected)")
    else:
        data_text = f"not available (`{data['manifest']}` missing)"
    stage_machines = sorted({format_machine(t.get("machine")) for t in timings.values() if t and t.get("machine")})
    lines = [
        f"# AttMask report: {report['strategy_name']}, masking ratio {report['masking']['ratio_label']}",
        "",
        "Generated by `python -m stages.report` (the DVC `report` stage) from the pipeline's outputs; "
        "do not edit by hand. Every number below is also in [`report.json`](report.json).",
        "",
        "| produced by | |",
        "|---|---|",
        f"| commit | {commit_text} |",
        f"| params | sha256 `{report['params_sha256']}` (`params.yaml`, validated, as canonical JSON) |",
        f"| data manifest | sha256 {data_text} |",
        f"| machine (stages) | {'; '.join(stage_machines) if stage_machines else 'not recorded'} |",
        f"| machine (this report) | {format_machine(machine)} |",
        f"| environment (this report) | {format_environment(machine.get('environment'))} |",
        "",
        "| stage | sacred run | wall time | machine | notes |",
        "|---|---|---|---|---|",
    ]
    for stage, timing in timings.items():
        if timing is None:
            lines.append(f"| {stage} | not recorded | not recorded | not recorded | |")
            continue
        lines.append(f"| {stage} | {_sacred_run(stage, timing.get('sacred_run'))} | {_seconds(timing.get('wall_seconds'))} "
                     f"| {format_machine(timing.get('machine'))} | {_extras(timing)} |")
    recorded = [t["wall_seconds"] for t in timings.values() if t and t.get("wall_seconds") is not None]
    if recorded:
        lines.append(f"| **total** | | {_seconds(sum(recorded))} | | {len(recorded)} of {len(timings)} stages recorded |")
    lines += ["", "Sacred records live under `runs/sacred/<stage>/<id>/` (config, host, packages, metrics); "
              "wall times and machines come from `reports/timing/<stage>.json`.", ""]
    return lines


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
        lines.append(f"| {name} | {ratio} | {_pct(row['knn'])} | {_pct(row['linear'])} | {_pct(row['finetune'])} |")
    reference = report.get("supervised_reference")
    if reference:
        lines.append(f"| supervised reference: same ViT, labels, from random init | - | | | {reference['top1']:.1f} |")
    paper = report["paper"]["table"]
    if paper:
        lines.append(f"| *paper, ImageNet (theirs)*: {report['strategy_name']} | {masking['ratio_label']} "
                     f"| *{paper['knn']:.1f}* | *{paper['linear']:.1f}* "
                     f"| *{paper['finetune_cifar10']:.1f} / {paper['finetune_cifar100']:.1f}* (CIFAR10 / 100) |")
    lines.append("")
    notes = []
    if reference:
        shares = [f"{name} {reference[key]:.0f}%" for name, key in (("k-NN", "knn_share"), ("linear probe", "linear_share"))
                  if reference[key] is not None]
        notes.append(f"The supervised reference is {reference['model']}; the frozen self-supervised features reach "
                     f"{' and '.join(shares)} of it.")
        if any(reference[key] is not None and reference[key] > 100 for key in ("knn_share", "linear_share")):
            notes.append("Above 100%: at this budget, labels from scratch do not yet beat the frozen "
                         "self-supervised features, so the reference is no upper bound here.")
    else:
        notes.append("No supervised reference: the fine-tuning stage has not run.")
    if paper:
        notes.append(f"The italic row is the paper's ({report['paper']['source']}), for the shape of the "
                     "comparison only: different data, model size and budget.")
    mine, floor = table.get("pretrained"), table.get("random_init")
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


def _fewshot(report: dict[str, Any]) -> list[str]:
    fewshot = report["fewshot"]
    lines = ["### Few-shot k-NN", ""]
    if not fewshot:
        return lines + ["not run", ""]
    shots = sorted({s for per in fewshot.values() for s in per}, key=int)
    draws = max(r["draws"] for per in fewshot.values() for r in per.values())
    lines += [f"Top-1 (%) with 1/5/10/20 labelled train images per class: mean ± std over {draws} seeded draws.", "",
              "| features | " + " | ".join(f"{s} / class" for s in shots) + " |", "|---|" + "---|" * len(shots)]
    for variant, per in fewshot.items():
        cells = " | ".join(f"{per[s]['mean']:.1f} ± {per[s]['std']:.1f}" if s in per else "-" for s in shots)
        lines.append(f"| {VARIANT_LABELS.get(variant, variant)} | {cells} |")
    paper = report["paper"]["fewshot"]
    if paper:
        cells = " | ".join(f"*{paper[s]:.1f}*" if s in paper else "" for s in shots)
        lines.append(f"| *paper, ImageNet (theirs)*: {report['strategy_name']} | {cells} |")
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
        lines.append(f"The [CLS] loss ends within 5% of ln(out_dim) = {uniform:.3f}, the loss of a uniform "
                     "teacher: this run has not learned much yet, so the attention maps below are nearly flat.")
    return lines + [""]


FIGURE_CAPTIONS = {
    "masks": "The qualitative figure: for seeded val images, the image (the eval crop the teacher sees), the "
             "exported teacher's last-block [CLS] attention (mean over heads, min-max scaled per image; max/min "
             "below it), and the mask each strategy draws at the same ratio (grey = masked). High masks the most "
             "attended patches, Low the least, Hint as High with a few top patches revealed.",
    "losses": "Pre-training losses per step (`reports/pretrain/steps.csv`).",
    "masked_share": "Share of masked patch tokens per step.",
    "finetune": "Fine-tuning val top-1 per epoch, pre-trained vs random init (`reports/eval/finetune_curve.csv`).",
}


def _figures(report: dict[str, Any]) -> list[str]:
    lines = ["## Figures", ""]
    for name, path in report["figures"].items():
        lines += [f"**{name.replace('_', ' ')}.** {FIGURE_CAPTIONS.get(name, '')}", "", f"![{name}]({path})", ""]
    return lines


def _other_reports(others: dict[str, str | None]) -> list[str]:
    present = {name: summary for name, summary in others.items() if summary is not None}
    if not present:
        return []
    lines = ["## Other reports", ""]
    lines += [f"- [`{name}`]({name}): {summary}" for name, summary in present.items()]
    return lines + [""]


HOW_MADE = """## How this file is made

`python -m stages.report` (run by `dvc repro` as the last stage, or by hand at any time) reads
`reports/eval/*.json`, `reports/pretrain/{metrics.json,steps.csv}`, `data/shards/manifest.json`,
the exported teacher `models/pretrain/backbone.safetensors` and the val shards, and writes:

- `reports/report.json` and `reports/figures/*.png`: DVC outputs, byte-identical on every rerun
  with the same params, data and commit (same machine kind and thread count);
- this file, which also names the commit, sacred runs, machines and wall times. Those change
  on every run, so this file is *not* a DVC output (that would break the rule that
  `dvc repro --force` twice gives the same `dvc.lock`); it is tracked by git instead.
"""


def render_readme(
    report: dict[str, Any],
    commit: dict[str, Any],
    machine: dict[str, Any],
    timings: dict[str, dict[str, Any] | None],
    others: dict[str, str | None],
) -> str:
    """``reports/README.md``: provenance header, result tables, figures, links to other reports."""
    lines = _header(report, commit, machine, timings)
    lines += _results(report) + _fewshot(report) + _knn_all(report) + _pretraining(report)
    lines += _figures(report) + _other_reports(others)
    return "\n".join(lines) + "\n" + HOW_MADE


def write_report_json(report: dict[str, Any], path: Path) -> None:
    write_json(report, path)

"""Render reports/bench.md from the JSON the benchmarks wrote (reports/bench/*.json, reports/timing/*.json).

    .venv/bin/python -m bench.render     # re-render only (make bench runs the benchmarks first)

Every figure is read from a JSON file and printed with the machine it came
from; a figure no benchmark has produced yet is printed as owed, never guessed.
Each data file's provenance (recorded when its benchmark ran, :func:`bench.machine.machine_info`)
is listed first and collected into reports/bench/provenance.json, from which
reports/README.md judges bench.md current or stale; re-rendering records nothing.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench import estimate
from bench.learning_curve import crossing
from bench.stats import format_summary
from pipeline.core.files import write_json
from pipeline.reporting import provenance
from pipeline.reporting.compare import Stat

BENCH_DIR = Path("reports/bench")
TIMING_DIR = Path("reports/timing")
OUTPUT = Path("reports/bench.md")
PROVENANCE = BENCH_DIR / "provenance.json"
FILES = ("run", "pretrain_step", "data", "knn", "linear_sgd", "learning_curve", "learning_curve_long", "strategy_budget", "feature_attributes", "seeds", "real_data", "masking", "numerics", "gpu_correctness", "gpu_step", "gpu_batch", "gpu_data", "knn_cuda",
         "gpu_compile")
# make repro's stages, in pipeline order (a stage without a timing file is listed as not measured yet)
STAGES = ("generate", "shard", "pretrain", "extract", "knn", "fewshot", "linear", "linear_sgd", "finetune", "metrics",
          "report")
ORDER = ("random", "block", "attmask_high", "attmask_hint", "attmask_low")  # random first: the reference
OWED = "*owed: needs a GPU run of `bash bench/gpu.sh` (docs/benchmarks.md)*"


def load_results(bench_dir: Path = BENCH_DIR, timing_dir: Path = TIMING_DIR) -> dict[str, Any]:
    """Every known JSON file (None where missing) plus ``timing``: stage -> that stage's timing JSON."""
    results: dict[str, Any] = {}
    for name in FILES:
        path = bench_dir / f"{name}.json"
        results[name] = json.loads(path.read_text()) if path.is_file() else None
    results["timing"] = {}
    if timing_dir.is_dir():
        for path in sorted(timing_dir.glob("*.json")):
            try:
                results["timing"][path.stem] = json.loads(path.read_text())
            except json.JSONDecodeError:
                continue  # being written by a running stage
    return results


# --------------------------------------------------------------- provenance
def source_record(result: dict[str, Any]) -> dict[str, Any] | None:
    """The provenance a data file recorded when its benchmark ran (None: before provenance was recorded)."""
    machine = result.get("machine")
    return result.get("provenance") or (machine.get("provenance") if isinstance(machine, dict) else None)


def provenance_document(results: dict[str, Any]) -> dict[str, Any]:
    """``reports/bench/provenance.json``: each rendered data file's record (run.json holds no figures)."""
    sources = {f"{name}.json": source_record(results[name]) for name in FILES
               if name != "run" and results.get(name) is not None}
    return {"provenance": {"format": provenance.RECORD_FORMAT, "sources": sources}}


def _machine_cell(result: dict[str, Any], record: dict[str, Any] | None) -> str:
    if record is not None:
        return provenance.describe(record)["machine"]
    machine = result.get("machine")
    if isinstance(machine, dict):  # bench.machine.machine_info before it carried provenance
        gpu = f", GPU {machine['gpu']['name']}" if machine.get("gpu") else ""
        return f"{machine.get('cpu')}, {machine.get('torch_threads')} torch threads{gpu}"
    return f"{machine} (CPU model not recorded)" if machine else provenance.UNKNOWN


def provenance_section(results: dict[str, Any]) -> list[str]:
    """Where each data file's numbers came from: commit, machine, date (recorded when its benchmark ran)."""
    lines = ["## Where these numbers come from", "",
             "Each data file under `reports/bench/` records its provenance when its benchmark runs (collected in "
             "`reports/bench/provenance.json`; `reports/README.md` says whether they are still current). Files "
             "written before that say unknown. Stage wall times (last section) are this checkout's "
             "machine-local `reports/timing/`.", "",
             "| data file | commit | machine | date |", "|---|---|---|---|"]
    for name, record in provenance_document(results)["provenance"]["sources"].items():
        cells = provenance.describe(record)
        lines.append(f"| `{name}` | {cells['commit'] if record else provenance.UNKNOWN} | "
                     f"{_machine_cell(results[name.removesuffix('.json')], record)} | "
                     f"{cells['date'] if record else provenance.UNKNOWN} |")
    return lines + [""]


# ----------------------------------------------------------------- sections
def machine_section(results: dict[str, Any]) -> list[str]:
    lines = ["## Machines", ""]
    seen = []
    for name in ("pretrain_step", "gpu_step", "gpu_correctness", "gpu_batch", "gpu_compile", "gpu_data"):
        machine = (results.get(name) or {}).get("machine")
        if machine and machine not in seen:
            seen.append(machine)
    if not seen:
        return lines + ["No benchmark has run yet: `make bench`.", ""]
    for machine in seen:
        gpu = machine.get("gpu")
        where = f"GPU: {gpu['name']} x{gpu['count']}, {gpu['memory_gib']:.0f} GiB" if gpu else "no GPU"
        packages = ", ".join(f"{k} {v}" for k, v in machine.get("packages", {}).items())
        memory = f", {machine['memory_gib']:.0f} GiB RAM" if machine.get("memory_gib") else ""
        lines.append(f"- **{where}**; CPU: {machine['cpu']}, {machine['usable_cpus']} usable of {machine['cpu_count']} "
                     f"logical CPUs, {machine['torch_threads']} torch threads{memory}. {packages}.")
    return lines + [""]


def step_table(case: dict[str, Any]) -> list[str]:
    """One row per strategy: step time, images/s, TFLOP/s, MFU, ratio to random, memory."""
    cuda = case["config"]["device"].startswith("cuda")
    mfu = "MFU (of timed matmul)" if _timed_peak(case["peak"]) else "MFU"
    head = f"| strategy | step (median, min-max, n) | images/s | TFLOP/s | {mfu} | x random (per-round ratio) |"
    head += " peak memory |" if cuda else ""
    lines = [head, "|" + "---|" * (7 if cuda else 6)]
    for strategy, entry in _ordered(case["strategies"]):
        ratio = case.get("ratio_to_random", {}).get(strategy)
        ratio_text = format_summary(ratio, digits=3) if ratio else "-"
        if strategy != "random" and within_range(ratio):
            ratio_text += " noise"
        row = (f"| {strategy} | {format_summary(entry['step_seconds'], 1000, 1, ' ms')} | {entry['images_per_second']:.1f} | "
               f"{entry['achieved_tflops']:.3f} | {100 * entry['mfu']:.1f}% | {ratio_text} |")
        if cuda:
            row += f" {entry['memory']['training_peak_mib'] / 1024:.1f} GiB |"
        lines.append(row)
    return lines


def _timed_peak(peak: dict[str, Any]) -> bool:
    """Whether MFU's denominator is a matmul timed on the spot (CPU, or a GPU without a datasheet figure)."""
    return "datasheet" not in str(peak.get("source", ""))


def within_range(ratio: dict[str, Any] | None) -> bool:
    """A per-round ratio to random whose own range (min-max) includes 1: no difference beyond the noise."""
    return bool(ratio) and ratio["min"] <= 1.0 <= ratio["max"]


def _ordered(entries: dict[str, Any]) -> list[tuple[str, Any]]:
    return sorted(entries.items(), key=lambda item: ORDER.index(item[0]) if item[0] in ORDER else len(ORDER))


def step_notes(case: dict[str, Any]) -> list[str]:
    config, peak = case["config"], case["peak"]
    first = next(iter(case["strategies"].values()))
    counted, analytic = first.get("flops_per_step"), first["analytic_flops_per_step"]["total"]
    by_op = first.get("flops_by_op") or {}
    conv = sum(v for k, v in by_op.items() if "convolution" in k)
    lines = [
        f"Batch {config['batch_size']} ({config['global_size']} px x2 + {config['local_size']} px x{config['local_number']} crops), "
        f"{config['device']}, autocast {config['autocast']}, compile {config['compile']}, {config['rounds']} interleaved "
        f"rounds after {config['warmup_rounds']} warm-up, {config['steps_per_sample']} step(s) per sample.",
        f"FLOPs per step ({first and list(case['strategies'])[0]}): "
        + (f"{counted / 1e9:.1f} GFLOP counted by `torch.utils.flop_counter.FlopCounterMode` (matmuls, convolution, "
           f"attention; forward and backward of the student, forward of the teacher, heads included), "
           f"x{counted / analytic:.4f} of the analytic count {analytic / 1e9:.1f} GFLOP." if counted else
           f"{analytic / 1e9:.1f} GFLOP analytic."),
        (f"MFU = FLOPs per step / median step time / the rate of a timed matmul, {peak['tflops']:.3g} TFLOP/s "
         f"({peak['source']}" + (f", range {format_summary(peak['matmul']['tflops'], digits=3)}" if "matmul" in peak else "")
         + "): the share of what a large matrix product achieves on these cores, not of the hardware's peak."
         if _timed_peak(peak) else
         f"MFU = FLOPs per step / median step time / peak; peak {peak['tflops']:.3g} TFLOP/s ({peak['source']})."),
    ]
    matmul = case.get("matmul")
    if matmul and case["strategies"]:
        best = max(e["achieved_tflops"] for e in case["strategies"].values())
        lines.append(f"Measured {matmul['dtype']} {matmul['size']}^3 matmul on this device: "
                     f"{matmul['tflops']['median']:.0f} TFLOP/s; the best strategy reaches {100 * best / matmul['tflops']['median']:.0f}% of it.")
    if conv and counted:
        lines.append(f"Channels-last: the patch embedding is the only convolution, {100 * conv / counted:.1f}% of the "
                     "step's FLOPs, so a memory-format change cannot buy more than that; not offered as an option.")
    if "attmask_overhead_percent" in case:
        ratios = case.get("ratio_to_random") or {}
        overhead = ", ".join(f"{s} {v:+.1f}%" + (" (noise)" if within_range(ratios.get(s)) else "")
                             for s, v in case["attmask_overhead_percent"].items())
        lines.append(f"AttMask overhead over random (median of per-round ratios): {overhead}. *(noise)*: the "
                     "per-round ratio's own range (min-max, last table column) includes 1.000, so the sign is not "
                     "measured.")
    memory = case.get("memory")
    if memory:
        lines.append(f"Memory: peak RSS {memory['peak_rss_mib']:.0f} MiB for one process training {memory['strategy']} "
                     f"(model, teacher and AdamW state {memory['state_mib']:.0f} MiB; a step adds "
                     f"{memory['step_growth_mib']:.0f} MiB); {memory['method']}.")
    syncs = case.get("host_syncs")
    if syncs:
        counts = ", ".join(f"{s} {v['syncs_per_step']:g}" for s, v in syncs.items() if v.get("syncs_per_step") is not None)
        where = {k: n for v in syncs.values() for k, n in (v.get("where") or {}).items()}
        if counts:
            lines.append(f"Host syncs per step (`torch.cuda.set_sync_debug_mode`): {counts}" + (f"; at {where}" if where else "") + ".")
    return [f"- {line}" for line in lines]


def pretrain_section(results: dict[str, Any]) -> list[str]:
    lines = ["## Pre-training step per masking strategy", ""]
    cpu = results.get("pretrain_step")
    if not cpu or "cases" not in cpu:
        lines += ["CPU: not measured with this version yet (`make bench`).", ""]
    else:
        for name, case in cpu["cases"].items():
            lines += [f"### CPU, {_case_title(name)}", ""] + step_table(case) + [""] + step_notes(case) + [""]
    gpu = results.get("gpu_step")
    if gpu and "cases" in gpu:
        for name, case in gpu["cases"].items():
            lines += [f"### {_gpu_name(gpu)}, {_case_title(name)}", ""] + step_table(case) + [""]
            lines += step_notes(case) + [""]
    else:
        lines += ["### GPU, ViT-S/16 multi-crop", "", _owed_or_error(gpu), ""]
    return lines


def _gpu_name(result: dict[str, Any]) -> str:
    gpu = result.get("machine", {}).get("gpu")
    return f"GPU ({gpu['name']})" if gpu else "GPU harness dry run on CPU (not GPU figures)"


def _case_title(name: str) -> str:
    return {"embedded": "embedded config (params.yaml)",
            "vit_s16_multicrop": "ViT-S/16, 2 x 224 + 10 x 96 px crops (the paper's setting)"}.get(name, name)


def _dry(result: dict[str, Any]) -> str:
    return "" if (result.get("machine") or {}).get("gpu") else "*Dry run of the GPU harness on CPU, not GPU figures:* "


def _owed_or_error(result: dict[str, Any] | None) -> str:
    if result and "error" in result:
        return f"The GPU run failed: `{result['error']}`."
    return OWED


def gpu_checks_section(results: dict[str, Any]) -> list[str]:
    lines = ["## GPU: correctness, largest batch, torch.compile", ""]
    check = results.get("gpu_correctness")
    if check and "strategies" in check:
        lines.append(f"{_dry(check)}**bf16 vs float32 loss** (one step, batch {check['batch']}, same weights and crops, drop-path off; "
                     f"tolerance {check['tolerance']:g} relative): {'PASSED' if check['passed'] else 'FAILED'}.")
        lines.append("")
        lines += ["| strategy | CPU float32 loss | GPU bf16 loss | relative difference | teacher logits [CLS] / patch "
                  "| loss after 3 steps | binding |", "|---|---|---|---|---|---|---|"]
        for s, r in _ordered(check["strategies"]):
            d = r["relative_difference"]
            lines.append(f"| {s} | {r['losses']['cpu_float32']['loss_total']:.6f} | {r['losses']['device']['loss_total']:.6f} | "
                         f"{d['loss_total']:.2e} | {d.get('teacher_cls_logits', float('nan')):.2e} / "
                         f"{d.get('teacher_patch_logits', float('nan')):.2e} | {d.get('loss_total_after_3_steps', float('nan')):.2e} | "
                         f"{'yes' if r['binding'] else 'no (masks from bf16 attention)'} |")
        lines += ["", "At initialisation the loss is near ln(out_dim) for any input, hence the teacher-logit check."]
    else:
        lines.append(f"**bf16 vs float32 loss**: {_owed_or_error(check)}")
    lines.append("")
    batch = results.get("gpu_batch")
    if batch and "trials" in batch:
        lines += [f"{_dry(batch)}**Largest batch** ({batch['strategy']}): {batch['largest']} images per GPU.", "",
                  "| batch | images/s | TFLOP/s | peak memory |", "|---|---|---|---|"]
        for t in batch["trials"]:
            lines.append(f"| {t['batch']} | {t['images_per_second']:.3g} | {t['achieved_tflops']:.3g} | {t['peak_mib'] / 1024:.1f} GiB |"
                         if t["ok"] else f"| {t['batch']} | {t['error'][:60]} | | |")
    else:
        lines.append(f"**Largest batch**: {_owed_or_error(batch)}")
    lines.append("")
    compiled = results.get("gpu_compile")
    if compiled and "speedup" in compiled:
        even = compiled["break_even_steps"]
        lines.append(f"{_dry(compiled)}**torch.compile** ({compiled['strategy']}, batch {compiled['batch']}, backend {compiled['backend']}): "
                     f"eager {compiled['eager']['images_per_second']:.3g} images/s, compiled "
                     f"{compiled['compiled']['images_per_second']:.3g} images/s (x{compiled['speedup']:.3f}); compiling "
                     f"costs {compiled['compile_seconds']:.0f} s, "
                     + (f"repaid after {even:.0f} steps." if even is not None else "never repaid."))
    else:
        lines.append(f"**torch.compile** (`pretrain.compile: true`): {_owed_or_error(compiled)} On CPU inductor takes "
                     "minutes to compile the step and is not benchmarked.")
    return lines + [""]


def data_section(results: dict[str, Any]) -> list[str]:
    lines = ["## Data path: shard read + decode + multi-crop, per worker process", ""]
    rate = estimate.gpu_rate(results.get("gpu_step"), results.get("gpu_batch"))
    needed = rate["tflops"] * 1e12 / estimate.flops_per_image(10)
    label = "measured" if rate["measured"] else "estimated, no GPU measured yet"
    for name in ("data", "gpu_data"):
        result = results.get(name)
        if not result or "multicrop" not in result:
            if name == "gpu_data":
                lines += [f"On the GPU machine's CPUs (1-16 workers): {_owed_or_error(result)}", ""]
            continue
        where = "this machine" if name == "data" else f"the GPU machine ({result['machine']['cpu']})"
        lines += [f"On {where}:", "", "| crops | colour ops (`augment.photometric`) | workers | images/s (median, min-max, n) "
                  "| per worker |", "|---|---|---|---|---|"]
        for case in result["multicrop"].values():
            for workers, t in case["workers"].items():
                lines.append(f"| {case['image']} -> {case['crops']} | {case.get('photometric', 'per_image')} | {workers} | "
                             f"{format_summary(t['images_per_second'], digits=1)} | {t['per_worker_images_per_second']:.1f} |")
        lines.append("")
        for case in result["multicrop"].values():
            for device, ops in (case.get("device_ops") or {}).items():
                lines.append(f"- `batched` colour ops for {case['crops']} on {device} ({ops['torch_threads']} threads): "
                             f"{format_summary(ops['ms_per_batch'], digits=1)} ms per batch of {ops['batch_size']} "
                             f"({ops['ms_per_image']:.2f} ms per image)")
        lines.append("")
        for case_name, title in (("paper", "per image in the worker"), ("paper_batched", "batched on the device")):
            paper = result["multicrop"].get(case_name)
            if not paper:
                continue
            best = max(t["per_worker_images_per_second"] for t in paper["workers"].values())
            verdict = ("enough" if best * 16 >= needed
                       else f"{needed / 16 / best:.1f}x short: the loader, not the GPU, would set the pace")
            lines.append(f"- To keep up with one GPU's ViT-S/16 step ({needed:,.0f} images/s, {label}) with 16 workers, each "
                         f"worker must deliver {needed / 16:,.0f} images/s; colour ops {title}, the best measured here is "
                         f"{best:.1f} ({verdict}).")
        lines.append("")
    plain = results.get("data")
    if plain and "loader" in plain:
        loader, write = plain["loader"], plain["write_shards"]
        writing = ", ".join(f"{k}: {v['images_per_second']:.0f}" for k, v in write.items())
        reading = ", ".join(f"{k}: {v['images_per_second']:.0f}" for k, v in loader.items() if k.startswith("num_workers"))
        lines.append(f"Shard writing {writing} images/s; loader with decoding only {reading} images/s "
                     f"({plain['images']['size']} px JPEG).")
        lines.append("")
        opening = plain.get("open_split") or {}
        if "levels" in opening:
            lines += [f"Opening the train split ({opening['samples']:,} samples, {opening['shard_bytes'] / 1e6:.1f} MB; "
                      + ("shards dropped from the page cache first" if opening.get("cold") else "page cache warm")
                      + "), per `data.verify` level, and scaled to ImageNet's train split (1.28M images, 140 GB; "
                      "`index` per sample, `full` per byte):", "",
                      "| `data.verify` | what it checks | open | ImageNet, per rank and stage start |", "|---|---|---|---|"]
            checks = {"index": "sizes, tar headers, labels", "full": "also SHA-256 of every byte"}
            for level, seconds in opening["levels"].items():
                lines.append(f"| {level} | {checks.get(level, '')} | {format_summary(seconds, 1000, 1, ' ms')} | "
                             f"{opening['imagenet_seconds'][level] / 60:.1f} min |")
            lines.append("")
    return lines


def knn_section(results: dict[str, Any]) -> list[str]:
    lines = ["## k-NN at ImageNet scale (synthetic features)", ""]
    for name in ("knn", "knn_cuda"):
        result = results.get(name)
        if not result or "cases" not in result:
            if name == "knn_cuda":
                lines += [f"CUDA: {_owed_or_error(result)}", ""]
            continue
        lines += [f"{result['device']}, {result['train_rows']:,} x {result['dim']} train, {result['classes']} classes, "
                  f"{result['threads']} threads:", "",
                  "| case | val rows timed | ms per val row | 50k val rows | peak extra memory |", "|---|---|---|---|---|"]
        for case_name, case in result["cases"].items():
            measured = "measured" if case["val_rows"] >= result["extrapolated_to_val_rows"] else "extrapolated"
            lines.append(f"| {case_name} | {case['val_rows']:,} | {case['ms_per_val_row']:.3f} | "
                         f"{case['extrapolated_50k_val_seconds'] / 60:.1f} min ({measured}) | {case['peak_extra_mib']:,.0f} MiB |")
        lines.append("")
    return lines


def learning_curve_section(results: dict[str, Any]) -> list[str]:
    result = results.get("learning_curve")
    lines = ["## Embedded default: k-NN gap against pre-training budget", ""]
    if not result:
        return lines + ["Not measured yet: `python -m bench.learning_curve` (~45 min).", ""]
    # a later, longer budget (`--out reports/bench/learning_curve_long.json`) joins the curve
    extra = [p for p in (results.get("learning_curve_long") or {}).get("points", [])
             if p["epochs"] not in {q["epochs"] for q in result["points"]}]
    points = sorted(result["points"] + extra, key=lambda p: p["minutes"])
    if extra:
        result = {**result, "crosses_at_minutes": {base: crossing(points, base, result["target"])
                                                   for base in result["crosses_at_minutes"]}}
    lines += [f"Seed {result['seed']}, `params.yaml` with only `pretrain.epochs` changed; k-NN@{result['k']} top-1 (%) of "
              "the pre-trained teacher and its margin over the two baselines:", "",
              "| pretrain.epochs | pre-training wall time | k-NN pre-trained | over random init | over raw pixels |",
              "|---|---|---|---|---|"]
    for p in points:
        lines.append(f"| {p['epochs']} | {p['minutes']:.1f} min | {p['knn']['pretrained']:.1f} | "
                     f"{p['gap']['random_init']:+.1f} | {p['gap']['pixels']:+.1f} |")
    lines.append("")
    for base, label in (("random_init", "random init"), ("pixels", "raw pixels")):
        minutes = result["crosses_at_minutes"][base]
        if minutes is None:
            where = f"not within the measured budgets (up to {points[-1]['minutes']:.1f} min)"
        elif minutes == points[0]["minutes"]:
            where = f"already at the smallest budget measured ({minutes:.1f} min)"
        else:
            where = f"at about {minutes:.1f} min of pre-training (log-linear between the measured budgets)"
        lines.append(f"- margin over {label} reaches +{result['target']:.0f}: {where}")
    return lines + [""]


def _headline_cells(row: dict[str, Any]) -> str:
    knn, linear, finetune, fewshot = row["knn"], row["linear"], row["finetune"], row["fewshot"]
    return (f"{knn['pretrained']:.1f} / {knn['random_init']:.1f} / {knn['pixels']:.1f} | "
            f"{linear['pretrained']:.1f} / {linear['random_init']:.1f} | "
            f"{finetune['pretrained']:.1f} / {finetune['random_init']:.1f} | "
            f"{fewshot['pretrained']:.1f} / {fewshot['random_init']:.1f}")


def _verdicts(row: dict[str, Any]) -> str:
    """The measures that did not gain beyond noise (``reports/metrics.json`` margins), or ``gain``."""
    weak = [f"{m}: {v['verdict']}" for m, v in (row.get("margins") or {}).items() if v["verdict"] != "gain"]
    return "; ".join(weak) or "gain on k-NN, probe and fine-tune"


HEADLINE_COLUMNS = ("k-NN@20 pre-trained / random init / raw pixels | linear probe | fine-tune | few-shot 20/class")


def seeds_section(results: dict[str, Any]) -> list[str]:
    result = results.get("seeds")
    lines = ["## Embedded default at three seeds", ""]
    if not result:
        return lines + ["Not measured yet: `python -m bench.seeds` after `make repro` (~15 min).", ""]
    rows = result["rows"]
    lines += ["`params.yaml` with only `seed` changed (the seed changes the generated images, the initialisation and "
              "every random draw); top-1 (%) on the 500 val images, chance 10%. Pre-trained / random init "
              "(/ raw pixels for k-NN).", "",
              f"| seed | steps | {HEADLINE_COLUMNS} | below the margin floor |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['seed']} | {row['steps']} | {_headline_cells(row)} | {_verdicts(row)} |")
    mean = {m: Stat(tuple(r[m]["pretrained"] for r in rows)) for m in ("knn", "linear", "finetune")}
    over = Stat(tuple(r["knn"]["pretrained"] - r["knn"]["random_init"] for r in rows))
    over_pixels = Stat(tuple(r["knn"]["pretrained"] - r["knn"]["pixels"] for r in rows))
    return lines + ["", f"- mean ± sd over {len(rows)} seeds: k-NN {mean['knn'].text()}, linear {mean['linear'].text()}, "
                        f"fine-tune {mean['finetune'].text()}; k-NN over random init {over.text()}, over raw pixels "
                        f"{over_pixels.text()}.", ""]


def real_data_section(results: dict[str, Any]) -> list[str]:
    result = results.get("real_data")
    lines = ["## The default pipeline on real photos (Fashion-MNIST)", ""]
    if not result:
        return lines + ["Not measured yet: `make bench-real` (~12 min; installs Debian's `dataset-fashion-mnist`).", ""]
    lines += [f"{result['dataset']}: ImageNet-layout folders of 10 clothing classes, the 28 px grey photos upsampled to "
              f"{result['image_size']} px RGB, {result['val_per_class']} val images per class; `params.yaml` changed only "
              "in `data.source` and `data.root`. Top-1 (%), pre-trained / random init (/ raw pixels for k-NN); the "
              "verdicts are the report's (margin against 2 binomial standard errors on the val images).", "",
              f"| train images (steps) | {HEADLINE_COLUMNS} | [CLS] loss (uniform) | verdict | wall time |",
              "|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        lines.append(f"| {row['train_images']} ({row['steps']}) | {_headline_cells(row)} | "
                     f"{row['final_loss_cls']:.2f} ({row['uniform_loss']:.2f}) | {_verdicts(row)} | "
                     f"{row['minutes']:.1f} min |")
    return lines + [""]


def strategy_budget_section(results: dict[str, Any]) -> list[str]:
    result = results.get("strategy_budget")
    lines = ["## AttMask-High against AttMask-Low by pre-training budget", ""]
    if not result:
        return lines + ["Not measured yet: `python -m bench.strategy_budget` (~50 min).", ""]
    lines += [f"k-NN@{result['k']} top-1 (%) of the pre-trained teacher, mean ± sd over the seeds (each seed its "
              "own generated images), `params.yaml` with only `seed`, `pretrain.epochs` and `masking.strategy` "
              "changed. A difference counts when it exceeds the two seed spreads together, the rule of "
              f"`reports/comparison.md`; the paper's gap is +{result['paper_gap']:.1f}.", "",
              "| pretrain.epochs | seeds | pre-training per run | AttMask-High | AttMask-Low | High - Low | "
              "beyond the seed spread |",
              "|---|---|---|---|---|---|---|"]
    for row in result["budgets"]:
        runs = {s: [r for r in result["runs"] if r["epochs"] == row["epochs"] and r["strategy"] == s]
                for s in ("attmask_high", "attmask_low")}
        cells = [Stat(tuple(r["knn"]["pretrained"] for r in runs[s])).text() for s in runs]
        seeds = ", ".join(str(r["seed"]) for r in runs["attmask_high"])
        lines.append(f"| {row['epochs']} | {seeds} | {row['minutes']:.1f} min | {cells[0]} | {cells[1]} | "
                     f"{row['high_minus_low']:+.1f} | {'yes' if row['separated'] else 'no'} |")
    separated = [str(row["epochs"]) for row in result["budgets"] if row["separated"]]
    measured = ", ".join(str(row["epochs"]) for row in result["budgets"])
    where = f"at {', '.join(separated)} epochs" if separated else "at none"
    return lines + ["", f"- High and Low separate {where} of the budgets measured ({measured} epochs).", ""]


def feature_attributes_section(results: dict[str, Any]) -> list[str]:
    result = results.get("feature_attributes")
    lines = ["## Embedded default: what the features encode", ""]
    if not result:
        return lines + ["Not measured yet: `python -m bench.feature_attributes` (after `make repro`, ~20 s).", ""]
    names = {"class": "class", "object_colour": "object colour", "background_colour": "background colour"}
    labels = {"pretrained": "pre-trained", "random_init": "random init", "pixels": "raw pixels"}
    lines += [f"Seed {result['seed']}'s `make repro` outputs. The pipeline's weighted k-NN@{result['k']} on the "
              "`extract` features, asked for each val image's class and for the two palette colours the generator "
              "drew independently of the class; top-1 (%):", "",
              "| features | " + " | ".join(names.values()) + " |", "|---|" + "---|" * len(names)]
    for variant, label in labels.items():
        row = result["knn"][variant]
        lines.append(f"| {label} | " + " | ".join(f"{row[a]:.1f}" for a in names) + " |")
    lines.append("| always the most frequent value | " + " | ".join(f"{result['majority'][a]:.1f}" for a in names) + " |")
    lines += ["", f"The [CLS] prototype (argmax of {result['out_dim']}) each network assigns to the "
              f"{result['num_train']:,} train images: normalised mutual information with each attribute, and what a "
              "random relabelling with the same cluster sizes gets (chance):", "",
              "| network | prototypes used | " + " | ".join(names.values()) + " | colour pair |",
              "|---|---|" + "---|" * (len(names) + 1)]
    for network in ("pretrained_teacher", "random_init"):
        row = result["clusters"][network]
        cells = [f"{row['nmi'][a]:.2f} (chance {row['chance_nmi'][a]:.2f})" for a in (*names, "colour_pair")]
        lines.append(f"| {network.replace('_', ' ')} | {row['used']} | " + " | ".join(cells) + " |")
    return lines + [""]


def linear_sgd_section(results: dict[str, Any]) -> list[str]:
    result = results.get("linear_sgd")
    lines = ["## Official linear probe (`linear_sgd`) at the paper's 20% scale", ""]
    if not result:
        return lines + ["Not measured yet: `python -m bench.bench_linear`.", ""]
    case, cpu, gpu = result["case"], result["cpu_seconds_per_epoch"], result["gpu_seconds_per_epoch"]
    lines += [f"{case['classes']:,} classes x {case['train_images']:,} images, features {case['n_last_blocks']} x "
              f"{case['embed_dim']} = {case['n_last_blocks'] * case['embed_dim']}, global batch {case['batch_size']}, "
              f"{case['epochs']} epochs:", "",
              "| part | measured | per epoch, this CPU | per epoch, one GPU |", "|---|---|---|---|",
              f"| linear head (SGD step) | {format_summary(result['head_step_seconds'], digits=1, scale=1e3)} ms per "
              f"batch of {result['head_batch']} ({result['threads']} threads) | {cpu['head'] / 60:.1f} min | negligible |",
              f"| frozen ViT-S/16 forward | {format_summary(result['backbone_batch_seconds'], digits=2)} s per batch of "
              f"{result['backbone_batch']} | {cpu['backbone_forward'] / 3600:.1f} h | {gpu['backbone_forward']:.0f} s "
              f"({result['backbone_forward_gflop_per_image']:.2f} GFLOP/image at {gpu['rate_source']}) |",
              f"| loader (decode + RandomResizedCrop + flip) | {result['loader_images_per_second_per_worker']:.0f} "
              f"images/s per worker | (one worker) | {gpu['loader_16_workers']:.0f} s with {case['gpu_workers']} workers |",
              "",
              f"100 epochs: {result['epochs_total_hours']['cpu']:.0f} h on this CPU (not a CPU job), "
              f"{result['epochs_total_hours']['gpu']:.1f} h on one GPU ({gpu['bound_by']}-bound; estimated, not measured).",
              ""]
    return lines


def masking_section(results: dict[str, Any]) -> list[str]:
    result = results.get("masking")
    if not result:
        return []
    lines = ["## Masking alone", "", f"`generate_masks`, batch {result['batch_size']}, {result['device']}, median of "
             f"{result['repeats']} calls (microseconds; over random in brackets):", ""]
    grids = list(result["per_call"])
    lines += ["| strategy | " + " | ".join(grids) + " |", "|---|" + "---|" * len(grids)]
    for strategy in result["per_call"][grids[0]]:
        cells = [f"{result['per_call'][g][strategy]['median_s'] * 1e6:.0f} ({result['per_call'][g][strategy]['over_random_us']:+.0f})"
                 for g in grids]
        lines.append(f"| {strategy} | " + " | ".join(cells) + " |")
    return lines + [""]


def numerics_section(results: dict[str, Any]) -> list[str]:
    """What each dispatch control changes on this CPU, and what ``numerics: portable`` costs."""
    result = results.get("numerics")
    if not result:
        return []
    config = result["config"]
    lines = ["## Portable CPU numerics (`numerics` in params.yaml)", "",
             f"One fresh process per setting trains the embedded model for {config['steps']} steps (attmask_high, "
             "fixed crops), fits a logistic regression on fixed features and takes NumPy's float64 sin, cos, exp and "
             "log; the hashes are of the final weights, the coefficients and NumPy's results. A control whose removal "
             "changes the bits here changes them between CPU generations.", "",
             "| setting | ms per step | weights | classifier | NumPy | differs from portable in |", "|---|---|---|---|---|---|"]
    modes = ("native", "portable", "compatible")  # the three modes first, then the variants of portable
    rank = {name: i for i, name in enumerate(modes)}
    for name, entry in sorted(result["settings"].items(), key=lambda item: rank.get(item[0], len(modes))):
        run = entry["runs"][0]
        steps = sorted(r["step_seconds"] * 1000 for r in entry["runs"])
        differ = ", ".join(entry["differ_from_portable"]) or "-"
        lines.append(f"| {name} | {steps[len(steps) // 2]:.0f} (n={len(steps)}) | `{run['weights']}` | `{run['probe']}` | "
                     f"`{run['numpy']}` | {differ} |")
    ratio = result["portable_over_native_step_time"]
    compatible = result["compatible_over_native_step_time"]
    same = all(e["same_bits_every_run"] for e in result["settings"].values())
    lines += ["", f"portable / native step time: x{format_summary(ratio, digits=3)}; compatible / native: "
              f"x{compatible:.2f} (one round). Every setting gave the same bits in every round: "
              + ("yes." if same else "**no**."), ""]
    return lines


def timing_section(results: dict[str, Any]) -> list[str]:
    lines = ["## Embedded `make repro`: wall time per stage", ""]
    timing = results.get("timing") or {}
    if not timing:
        return lines + ["Not measured yet: no `reports/timing/<stage>.json` on this checkout (machine-local, written by "
                        "each stage's run record during `make repro`; the report stage summarises them in "
                        "`reports/timing/summary.md`).", ""]
    lines += ["| stage | wall time | device | sacred run |", "|---|---|---|---|"]
    total = 0.0
    stages = [s for s in STAGES if s in timing] + sorted(s for s in timing if s not in STAGES and "wall_seconds" in timing[s])
    for stage in stages:
        record = timing[stage]
        total += record["wall_seconds"]
        device = (record.get("machine") or {}).get("device", "?")
        run = record.get("sacred_run")
        run = relative(run.get("dir", "-")) if isinstance(run, dict) else (run if run is not None else "-")
        lines.append(f"| {stage} | {record['wall_seconds']:.1f} s | {device} | {run} |")
    # `metrics` only merges JSON files and keeps no run record (docs/reproducibility.md)
    missing = [s for s in STAGES if s not in timing and s != "metrics"]
    lines.append(f"| **total** | **{total / 60:.1f} min** | | |")
    machine = next(iter(timing.values())).get("machine") or {}
    lines.append("")
    lines.append(f"On {machine.get('cpu', '?')}, {machine.get('cpus', '?')} CPUs, {machine.get('threads', '?')} torch threads."
                 " The total is the stages' own wall time; `make repro` adds DVC's checks and"
                 " one interpreter start per stage."
                 + (f" Not measured yet: {', '.join(missing)}." if missing else ""))
    return lines + [""]


def relative(path: str) -> str:
    """A repository-relative path: a machine's absolute prefix (``/work/main/runs/...``) says nothing elsewhere."""
    candidate = Path(path)
    if not candidate.is_absolute():
        return path
    try:
        return candidate.relative_to(Path.cwd()).as_posix()
    except ValueError:
        parts = candidate.parts
        return Path(*parts[parts.index("runs"):]).as_posix() if "runs" in parts else candidate.name


def estimate_section(results: dict[str, Any]) -> list[str]:
    rate = estimate.gpu_rate(results.get("gpu_step"), results.get("gpu_batch"))
    return ["## Estimated time of the paper's 100-epoch runs", "", estimate.markdown(estimate.estimate_rows(rate), rate), ""]


def options_section() -> list[str]:
    return ["## Performance options (`pretrain` in params.yaml)", "",
            "- `fused_adamw: true`: one fused AdamW kernel on CUDA; the CPU keeps the foreach implementation, so CPU "
            "results do not change.",
            "- `compile: false`: `torch.compile` (inductor) of student and teacher, in place, static shapes; GPU "
            "speed-up above when measured.",
            "- bf16 autocast and fused attention (SDPA) are always on CUDA; the step has no host syncs (masks and "
            "counts go to the GPU with non-blocking copies; scalars are flushed every `log_every` steps).",
            "- channels-last: not offered (a ViT's only convolution is the patch embedding; its share is given above).", ""]


def render(results: dict[str, Any]) -> str:
    lines = ["# Benchmarks", "",
             "Generated by `make bench` (`python -m bench`; `python -m bench.render` re-renders) from "
             "`reports/bench/*.json` and `reports/timing/*.json`. Each figure is the median of repeats with the full "
             "range (min-max) and the number of repeats n. CPU figures on a shared machine are noisy.", ""]
    run = results.get("run") or {}
    if run.get("quick"):
        lines += ["**Smoke run (`python -m bench --quick`): small sizes and few repeats; these CPU figures are not for "
                  "quoting. `make bench` on a quiet machine replaces them.**", ""]
    for section in (provenance_section, machine_section, seeds_section, real_data_section, learning_curve_section, strategy_budget_section, feature_attributes_section,
                    pretrain_section, gpu_checks_section, data_section,
                    knn_section, linear_sgd_section, masking_section,
                    numerics_section, timing_section, estimate_section):
        lines += section(results)
    lines += options_section()
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    results = load_results()
    text = render(results)
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(text)
    write_json(provenance_document(results), PROVENANCE)
    print(f"wrote {OUTPUT}, {PROVENANCE}")
    return text


if __name__ == "__main__":
    main()

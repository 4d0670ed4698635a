"""Estimated wall time of the paper's 100-epoch ViT-S/16 pre-training runs, from a measured (or assumed) GPU rate.

    .venv/bin/python -m bench.estimate            # print the table (reports/bench.md renders it too)

Time = epochs x images x FLOPs per image / (achieved FLOP/s per GPU x GPUs).
FLOPs per image are analytic (:mod:`bench.flops`, AttMask step with its crops: 6
local crops on 20% ImageNet, 10 on 100%, as the paper). The achieved FLOP/s
come from ``reports/bench/gpu_step.json`` / ``gpu_batch.json`` when the GPU
harness has run; until then from an assumed MFU on an H100 SXM, and every figure
says which. Scaling over GPUs is assumed linear: the gradient all-reduce of the
~30M student parameters is a few ms against a step of 100+ ms at 64 images per
GPU; that is not measured here.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench.flops import NetworkDims, analytic_step_flops

VIT_S16_DIMS = NetworkDims(patch_size=16, embed_dim=384, depth=12, mlp_hidden=1536, prefix_tokens=1, head_hidden=2048,
                           head_bottleneck=256, out_dim=8192)
EPOCHS = 100
GPUS = (1, 8, 32)
# (label, train images, local crops): the paper's 20% subset is 260 images per class
SUBSETS = (("20% ImageNet-1k (260 per class)", 260_000, 6), ("100% ImageNet-1k", 1_281_167, 10))
ASSUMED_MFU = 0.40  # the MFU the prepared GPU run aims at on one H100/H200 (dense bf16 peak)
H100_SXM_BF16_TFLOPS = 989.4


def flops_per_image(local_number: int) -> int:
    return analytic_step_flops(VIT_S16_DIMS, 1, 224, 96, local_number, cls_attention=True)["total"]


def gpu_rate(gpu_step: dict[str, Any] | None, gpu_batch: dict[str, Any] | None) -> dict[str, Any]:
    """Achieved TFLOP/s per GPU: the best measured ViT-S/16 multi-crop AttMask step, else the assumption."""
    candidates = []
    case = (gpu_step or {}).get("cases", {}).get("vit_s16_multicrop")
    if case and case["config"]["device"].startswith("cuda"):  # a CPU dry run of the harness is no GPU rate
        for name in ("attmask_high", "attmask_hint", "random"):
            entry = case["strategies"].get(name)
            if entry:
                candidates.append((entry["achieved_tflops"], f"measured: {name}, batch {case['config']['batch_size']}, "
                                   f"{gpu_step['machine']['gpu']['name']}"))
                break
    batch_on_gpu = (gpu_batch or {}).get("case") == "vit_s16_multicrop" and (gpu_batch or {}).get("machine", {}).get("gpu")
    for trial in (gpu_batch or {}).get("trials", []) if batch_on_gpu else []:
        if trial.get("ok") and trial.get("achieved_tflops"):
            candidates.append((trial["achieved_tflops"], f"measured: {gpu_batch.get('strategy')}, batch {trial['batch']}, "
                               f"{gpu_batch['machine']['gpu']['name']}"))
    if candidates:
        tflops, source = max(candidates)
        return {"tflops": tflops, "source": source, "measured": True}
    return {"tflops": ASSUMED_MFU * H100_SXM_BF16_TFLOPS, "measured": False,
            "source": f"ESTIMATE, not measured: {ASSUMED_MFU:.0%} MFU on an H100 SXM ({H100_SXM_BF16_TFLOPS} TFLOP/s bf16)"}


def estimate_rows(rate: dict[str, Any], epochs: int = EPOCHS, gpus: tuple[int, ...] = GPUS) -> list[dict[str, Any]]:
    rows = []
    for label, images, locals_ in SUBSETS:
        per_image = flops_per_image(locals_)
        images_per_second = rate["tflops"] * 1e12 / per_image
        hours = {g: epochs * images / (images_per_second * g) / 3600 for g in gpus}
        rows.append({"subset": label, "images": images, "local_crops": locals_, "gflops_per_image": per_image / 1e9,
                     "images_per_second_per_gpu": images_per_second, "hours": hours})
    return rows


def markdown(rows: list[dict[str, Any]], rate: dict[str, Any], epochs: int = EPOCHS) -> str:
    gpus = list(rows[0]["hours"])
    head = "| run | crops | GFLOP/image | images/s/GPU | " + " | ".join(f"{g} GPU{'s' if g > 1 else ''}" for g in gpus) + " |"
    lines = [head, "|" + "---|" * (4 + len(gpus))]
    for row in rows:
        times = " | ".join(_duration(row["hours"][g]) for g in gpus)
        lines.append(f"| {row['subset']}, {epochs} epochs | 2x224 + {row['local_crops']}x96 | {row['gflops_per_image']:.0f} | "
                     f"{row['images_per_second_per_gpu']:,.0f} | {times} |")
    label = "Measured rate" if rate["measured"] else "**Not measured on a GPU yet**"
    lines.append("")
    lines.append(f"{label}: {rate['tflops']:.0f} TFLOP/s per GPU ({rate['source']}); linear scaling over GPUs assumed.")
    return "\n".join(lines)


def _duration(hours: float) -> str:
    if hours < 1:
        return f"{hours * 60:.0f} min"
    return f"{hours:.1f} h" if hours < 48 else f"{hours / 24:.1f} days"


def load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def table_from_reports(bench_dir: Path = Path("reports/bench")) -> str:
    rate = gpu_rate(load(bench_dir / "gpu_step.json"), load(bench_dir / "gpu_batch.json"))
    return markdown(estimate_rows(rate), rate)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    table = table_from_reports()
    print(table)
    return table


if __name__ == "__main__":
    main()

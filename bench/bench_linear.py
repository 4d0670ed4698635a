"""Epoch time of the official linear probe (`linear_sgd`) at the paper's 20% scale.

Run: ``.venv/bin/python -m bench.bench_linear``; writes ``reports/bench/linear_sgd.json``.
The case: 1,000 classes, 260k train images (the 20% subset), features the
[CLS] of ViT-S/16's last 4 blocks (4 x 384 = 1536), global batch 1024. One
epoch is three costs, each measured here or estimated:

- the head: forward + backward + SGD step of ``Linear(1536, 1000)`` on a
  batch of features (measured on this CPU; tiny on a GPU);
- the frozen backbone's forward on every augmented image (measured per image
  on this CPU; on a GPU estimated from the analytic FLOPs at the bench's GPU
  rate, or the assumed 40% MFU until a GPU was measured);
- the loader: read + decode + RandomResizedCrop + flip per image, per worker
  (measured on this CPU with 500x375 JPEGs; 16 workers assumed on a GPU node).
"""
from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from bench import estimate
from bench.bench_data import smooth_photo
from bench.flops import backbone_forward_flops
from bench.machine import machine_info
from bench.stats import summarize
from pipeline.core.config import ModelConfig
from pipeline.evaluation.extract import vit_features
from pipeline.evaluation.linear_sgd import LinearClassifier, MOMENTUM, probe_train_transform
from pipeline.method.backbone_export import create_backbone

BENCH_DIR = Path("reports/bench")
OUTPUT = BENCH_DIR / "linear_sgd.json"
CASE = {"classes": 1000, "train_images": 260_000, "n_last_blocks": 4, "embed_dim": 384, "batch_size": 1024,
        "image_size": 224, "epochs": 100, "gpu_workers": 16}
VIT_S16 = ModelConfig(arch="vit_small_patch16_224", patch_size=16, img_size=224, depth=None, embed_dim=None,
                      num_heads=None)


def _timed(function, repeats: int) -> dict[str, Any]:
    function()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return summarize(times)


def time_head(repeats: int, batch: int) -> dict[str, Any]:
    """Seconds per SGD step of the linear head on random features."""
    dim = CASE["n_last_blocks"] * CASE["embed_dim"]
    head = LinearClassifier(dim, CASE["classes"], torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD(head.parameters(), lr=0.01, momentum=MOMENTUM)
    features = torch.randn(batch, dim)
    labels = torch.randint(0, CASE["classes"], (batch,))

    def step() -> None:
        loss = torch.nn.functional.cross_entropy(head(features), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return _timed(step, repeats)


@torch.no_grad()
def time_backbone(repeats: int, batch: int) -> dict[str, Any]:
    """Seconds per forward of ViT-S/16 (last-4-blocks features) on a batch of 224 px images."""
    vit = create_backbone(VIT_S16).eval()
    images = torch.randn(batch, 3, CASE["image_size"], CASE["image_size"])
    return _timed(lambda: vit_features(vit, images, CASE["n_last_blocks"]), repeats)


def time_loader_transform(repeats: int, images: int = 32) -> dict[str, Any]:
    """Seconds to decode and augment ``images`` 500x375 JPEGs (one worker's work)."""
    buffer = io.BytesIO()
    smooth_photo(np.random.default_rng(0), 500, 375).save(buffer, "JPEG", quality=90)
    data = buffer.getvalue()
    transform = probe_train_transform(CASE["image_size"])

    def work() -> None:
        for _ in range(images):
            with Image.open(io.BytesIO(data)) as image:
                transform(image.convert("RGB"))
    return {"seconds": _timed(work, repeats), "images": images}


def project(head: dict[str, Any], backbone: dict[str, Any], loader: dict[str, Any], head_batch: int,
            backbone_batch: int, gpu_tflops: float, gpu_source: str) -> dict[str, Any]:
    """Per-epoch seconds of each part on this CPU and on one GPU, and the 100-epoch totals."""
    images, steps = CASE["train_images"], CASE["train_images"] // CASE["batch_size"]
    head_cpu = head["median"] / head_batch * CASE["batch_size"] * steps
    backbone_cpu = backbone["median"] / backbone_batch * images
    per_worker = loader["images"] / loader["seconds"]["median"]
    forward_flops = sum(v for k, v in backbone_forward_flops(estimate.VIT_S16_DIMS, CASE["image_size"]).items()
                        if k != "tokens")
    backbone_gpu = forward_flops * images / (gpu_tflops * 1e12)
    loader_gpu = images / (per_worker * CASE["gpu_workers"])
    cpu_epoch = head_cpu + backbone_cpu + images / per_worker / 2  # 2 cores: one loader worker beside the model
    gpu_epoch = max(backbone_gpu, loader_gpu)  # the loader runs beside the GPU; the head is negligible there
    return {
        "cpu_seconds_per_epoch": {"head": head_cpu, "backbone_forward": backbone_cpu, "total": cpu_epoch},
        "gpu_seconds_per_epoch": {"backbone_forward": backbone_gpu, "loader_16_workers": loader_gpu, "total": gpu_epoch,
                                  "rate_source": gpu_source, "bound_by": "loader" if loader_gpu > backbone_gpu else "GPU"},
        "loader_images_per_second_per_worker": per_worker,
        "backbone_forward_gflop_per_image": forward_flops / 1e9,
        "epochs_total_hours": {"cpu": cpu_epoch * CASE["epochs"] / 3600, "gpu": gpu_epoch * CASE["epochs"] / 3600},
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--head-batch", type=int, default=CASE["batch_size"])
    parser.add_argument("--backbone-batch", type=int, default=8)
    parser.add_argument("--out", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    head = time_head(args.repeats, args.head_batch)
    backbone = time_backbone(max(2, args.repeats // 2), args.backbone_batch)
    loader = time_loader_transform(args.repeats)
    # a measured GPU rate when the GPU harness has run, else the labelled assumption
    rate = estimate.gpu_rate(estimate.load(BENCH_DIR / "gpu_step.json"), estimate.load(BENCH_DIR / "gpu_batch.json"))
    report = {"machine": machine_info(), "case": CASE, "threads": torch.get_num_threads(), "head_step_seconds": head, "head_batch": args.head_batch,
              "backbone_batch_seconds": backbone, "backbone_batch": args.backbone_batch, "loader": loader,
              **project(head, backbone, loader, args.head_batch, args.backbone_batch, rate["tflops"], rate["source"])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    cpu, gpu = report["cpu_seconds_per_epoch"], report["gpu_seconds_per_epoch"]
    print(f"linear_sgd bench ({CASE['classes']} classes x {CASE['train_images']:,} images x "
          f"{CASE['n_last_blocks']} x {CASE['embed_dim']} features, batch {CASE['batch_size']}):")
    print(f"  head step (CPU, {report['threads']} threads): {head['median'] * 1e3:.1f} ms per batch of {args.head_batch}; "
          f"{cpu['head'] / 60:.1f} min per epoch")
    print(f"  backbone forward (CPU): {cpu['backbone_forward'] / 3600:.1f} h per epoch; loader "
          f"{report['loader_images_per_second_per_worker']:.0f} images/s per worker")
    print(f"  one GPU ({gpu['rate_source']}): backbone {gpu['backbone_forward']:.0f} s, loader with 16 workers "
          f"{gpu['loader_16_workers']:.0f} s per epoch -> {report['epochs_total_hours']['gpu']:.1f} h for "
          f"{CASE['epochs']} epochs ({gpu['bound_by']}-bound)")
    return report


if __name__ == "__main__":
    main()

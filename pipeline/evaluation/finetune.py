"""End-to-end fine-tuning of the pre-trained backbone (the `finetune` stage; docs/method.md, "Evaluation").

The same code path runs twice: from the exported teacher backbone
(``pretrained``) and from the ``random_init`` baseline weights of
:func:`pipeline.evaluation.features.random_backbone_state` (the same weights the
``extract`` stage uses). Only the backbone weights differ: the new linear head,
the data order, the augmentations and the drop-path draws are identical.

* **Model.** ``timm.create_model(arch, num_classes=C, drop_path_rate=...,
  **shape)`` (any crop size divisible by the patch), the backbone loaded with
  every key checked: exactly the head's keys may be missing, nothing may be
  unexpected. The head is re-initialised ``trunc_normal(std=HEAD_INIT_STD)``,
  bias zero, from its own seed. Its position embedding is
  :func:`pipeline.method.pos_embed.pos_embed` (timm's forward bytes, a
  backward that is deterministic on CUDA too).
* **Optimisation.** AdamW with timm's layer-wise lr decay
  (``timm.optim.create_optimizer_v2(..., layer_decay=...)``: lr scale
  ``layer_decay ** (depth + 1 - layer)`` with the embeddings layer 0, block i
  layer i + 1 (timm puts the final norm with the last block) and the head
  scale 1; no weight decay on biases, norms, ``cls_token`` and ``pos_embed``); lr ``finetune.lr * batch_size / 256``,
  linear warm-up then cosine to ``min_lr``, set every step; cross-entropy with
  label smoothing.
* **Data.** Train: RandomResizedCrop(scale ``TRAIN_SCALE``), flip, light colour
  jitter; val: the centre crop of :func:`pipeline.data.augment.eval_transform`. Crop
  size ``params.extract_image_size()``. Order and augmentations are a function
  of (seed, epoch) (:class:`pipeline.data.shard_reader.ShardDataset`).
* **Metrics.** Val top-1 and top-k (k = min(5, C)), in percent, after every
  epoch: the final epoch's values, the best top-1 and the curve. The saved
  weights are the final ones (picking the best epoch on val would be
  selecting on the test set).
* **Determinism.** Deterministic kernels; torch's global generator (drop path)
  is reseeded every step from ``derive_seed(seed, "finetune", variant, epoch,
  step, rank)``. Two CPU runs give identical metrics and weights.
* **Scale.** CPU, one GPU (bf16 autocast) or DDP under torchrun: the global
  batch ``finetune.batch_size`` is split evenly across ranks, so N ranks take
  the same optimisation steps one process would.
"""
from __future__ import annotations

import csv
import io
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import timm
import timm.optim
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torchvision.transforms import v2
from tqdm import tqdm

from pipeline.core.config import FinetuneConfig, ModelConfig, Params, ParamsError
from pipeline.core.distributed import DistContext, all_reduce_sum, barrier
from pipeline.core.errors import UserError
from pipeline.core.files import atomic_write_text, write_json
from pipeline.core.seeding import derive_seed
from pipeline.core.tracking import RunRecord
from pipeline.data.augment import IMAGENET_MEAN, IMAGENET_STD, eval_transform
from pipeline.data.shard_reader import ShardDataset, ShardSplit, open_split
from pipeline.data.shard_writer import write_shards
from pipeline.method.backbone_export import load_backbone_state, random_backbone_state, save_backbone_safetensors
from pipeline.method.pos_embed import use_deterministic_pos_embed
from pipeline.method.schedules import cosine_schedule

__all__ = [
    "FINETUNE_VARIANTS",
    "TRAIN_SCALE",
    "HEAD_INIT_STD",
    "BackboneLoadError",
    "train_transform",
    "head_keys",
    "load_backbone_into",
    "build_finetune_model",
    "build_optimizer",
    "Finetuner",
    "prepare_finetune_shards",
    "backbone_for_variant",
    "run_finetune",
    "write_finetune_reports",
]

FINETUNE_VARIANTS = ("pretrained", "random_init")
# RandomResizedCrop area range: ImageNet recipes use (0.08, 1) on 224 px; on
# 32-48 px images a crop of 8% would keep a few pixels of the object.
TRAIN_SCALE = (0.5, 1.0)
COLOR_JITTER = (0.2, 0.2, 0.2, 0.0)  # brightness, contrast, saturation, hue: "light"
HEAD_INIT_STD = 0.02


class BackboneLoadError(UserError, RuntimeError):
    """The backbone weights do not fit the fine-tuning model; the message lists the keys."""


# ------------------------------------------------------------------- model
def train_transform(size: int) -> v2.Transform:
    """Fine-tuning augmentation: random resized crop, flip, light colour jitter, normalise."""
    return v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=TRAIN_SCALE, interpolation=v2.InterpolationMode.BICUBIC),
            v2.RandomHorizontalFlip(p=0.5),
            v2.ColorJitter(*COLOR_JITTER),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def head_keys(model: VisionTransformer) -> set[str]:
    """State-dict keys of the classifier (``model.head``)."""
    return {f"head.{name}" for name in model.get_classifier().state_dict()}


def load_backbone_into(model: VisionTransformer, state: dict[str, Tensor]) -> None:
    """Load backbone weights into a classifier; every key but the head's must match.

    Raises:
        BackboneLoadError: a backbone key is missing, a key is unexpected, or a
            shape differs.
    """
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shape mismatch
        raise BackboneLoadError(f"backbone weights do not fit the model: {error}") from error
    expected = head_keys(model)
    if set(missing) != expected or unexpected:
        raise BackboneLoadError(
            f"backbone weights do not fit the model: missing {sorted(set(missing) - expected)}, "
            f"unexpected {sorted(unexpected)}; only the new head {sorted(expected)} may be absent"
        )


def build_finetune_model(
    model_config: ModelConfig,
    num_classes: int,
    backbone_state: dict[str, Tensor],
    *,
    drop_path_rate: float,
    seed: int,
) -> VisionTransformer:
    """The timm classifier with the backbone loaded, a fresh seeded linear head and the deterministic pos embed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "finetune", "model"))
        model = timm.create_model(
            model_config.arch,
            pretrained=False,
            num_classes=num_classes,
            drop_path_rate=drop_path_rate,
            dynamic_img_size=True,
            **model_config.timm_shape(),
        )
        load_backbone_into(model, backbone_state)
        # crops whose grid differs from img_size's resize pos_embed: timm's resize has no deterministic CUDA backward
        use_deterministic_pos_embed(model)
        torch.manual_seed(derive_seed(seed, "finetune", "head"))
        head = model.get_classifier()
        nn.init.trunc_normal_(head.weight, std=HEAD_INIT_STD)
        nn.init.zeros_(head.bias)
    return model


def build_optimizer(model: nn.Module, config: FinetuneConfig, base_lr: float) -> torch.optim.Optimizer:
    """timm's AdamW with layer-wise lr decay; each group has ``lr_scale`` (1 for the head)."""
    optimizer = timm.optim.create_optimizer_v2(
        model, opt="adamw", lr=base_lr, weight_decay=config.weight_decay, layer_decay=config.layer_decay,
    )
    for group in optimizer.param_groups:
        group.setdefault("lr_scale", 1.0)
    return optimizer


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]


# -------------------------------------------------------------------- data
def prepare_finetune_shards(
    data_root: str | Path, out_dir: str | Path, *, seed: int, shard_size: int,
    context: DistContext | None = None, progress: bool = True,
) -> Path:
    """Shard an ImageNet-layout folder (whole train split) with :func:`pipeline.data.shard_writer.write_shards`.

    Rank 0 writes, the others wait; the reader then verifies the hashes.
    """
    context = context or DistContext()
    if context.is_main:
        # the image checks run in a process pool; the shards do not depend on the worker count
        write_shards(data_root, out_dir, seed=seed, shard_size=shard_size, source="imagefolder",
                     workers=os.cpu_count() or 1, progress=progress)
    barrier(context)
    return Path(out_dir)


def backbone_for_variant(params: Params, variant: str, backbone_path: str | Path) -> dict[str, Tensor]:
    """The starting backbone weights of a variant."""
    if variant == "pretrained":
        return load_backbone_state(backbone_path)
    if variant == "random_init":
        return random_backbone_state(params.model, params.seed)
    raise ValueError(f"unknown fine-tuning variant {variant!r}; expected one of {list(FINETUNE_VARIANTS)}")


# ------------------------------------------------------------------ training
@dataclass
class EpochLog:
    epoch: int
    train_loss: float
    top1: float
    top5: float
    val_loss: float


@dataclass
class FinetuneResult:
    variant: str
    history: list[EpochLog] = field(default_factory=list)
    topk: int = 5
    train_images: int = 0
    val_images: int = 0
    steps_per_epoch: int = 0
    wall_seconds: float = 0.0

    def metrics(self) -> dict[str, Any]:
        """The deterministic summary written to ``finetune.json``."""
        curve = [log.top1 for log in self.history]
        best = max(range(len(curve)), key=lambda i: (curve[i], -i))
        last = self.history[-1]
        return {
            "top1": last.top1,
            "top5": last.top5,
            "topk": self.topk,
            "best_top1": curve[best],
            "best_epoch": self.history[best].epoch,
            "epochs": len(self.history),
            "curve": curve,
            "train_loss": [log.train_loss for log in self.history],
            "val_loss": last.val_loss,
            "train_images": self.train_images,
            "val_images": self.val_images,
            "steps_per_epoch": self.steps_per_epoch,
        }


class Finetuner:
    """One fine-tuning run (one variant) on one rank.

    Args:
        params: the whole params (``finetune``, ``model``, ``seed``, eval size).
        variant: ``pretrained`` or ``random_init`` (names the seeds and the output).
        backbone_state: the starting backbone weights.
        train, val: verified splits (labels in ``[0, train.num_classes)``).
    """

    def __init__(self, params: Params, variant: str, backbone_state: dict[str, Tensor], train: ShardSplit,
                 val: ShardSplit, device: torch.device, context: DistContext | None = None,
                 record: RunRecord | None = None, progress_bar: bool = True):
        self.params = params
        self.config = params.finetune
        self.variant = variant
        self.device = device
        self.context = context or DistContext()
        self.record = record or RunRecord(None, None)
        self.progress_bar = progress_bar and self.context.is_main
        self.train_split, self.val_split = train, val
        if val.classes != train.classes:
            raise ValueError(f"val classes {val.classes} differ from train classes {train.classes}")
        batch = self.config.batch_size
        if batch < self.context.world_size or batch % self.context.world_size:
            raise ParamsError(
                "finetune.batch_size",
                f"the global batch {batch} must be a positive multiple of the number of ranks ({self.context.world_size})",
            )
        self.local_batch = batch // self.context.world_size
        self.steps_per_epoch = len(train) // batch
        if self.steps_per_epoch < 1:
            raise ParamsError("finetune.batch_size", f"{batch} is larger than the train split ({len(train)} images)")
        self.num_classes = train.num_classes
        self.topk = min(5, self.num_classes)
        self.image_size = params.extract_image_size()
        self.train_transform = train_transform(self.image_size)
        self.eval_transform = eval_transform(self.image_size)

        self.model = build_finetune_model(
            params.model, self.num_classes, backbone_state,
            drop_path_rate=self.config.drop_path_rate, seed=params.seed,
        ).to(device)
        self.module = self.model
        self.optimizer = build_optimizer(self.module, self.config, self.base_lr)
        if self.context.enabled:
            device_ids = [device.index] if device.type == "cuda" else None
            self.model = DistributedDataParallel(self.module, device_ids=device_ids)
        self.lr = cosine_schedule(self.base_lr, self.config.min_lr, self.config.epochs, self.steps_per_epoch,
                                  self.config.warmup_epochs, 0.0)
        self.lr.setflags(write=False)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=self.config.label_smoothing)
        self.autocast = (
            (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else nullcontext
        )

    @property
    def base_lr(self) -> float:
        return self.config.lr * self.config.batch_size / 256.0

    # -------------------------------------------------------------- data
    def train_batches(self, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        dataset = ShardDataset(
            self.train_split, batch_size=self.local_batch, transform=self.train_transform, seed=self.params.seed,
            epoch=epoch, rank=self.context.rank, world_size=self.context.world_size, shuffle=True,
            drop_last=True, global_batch_size=self.config.batch_size,
        )
        loader = torch.utils.data.DataLoader(dataset, batch_size=self.local_batch,
                                             num_workers=self.config.num_workers,
                                             pin_memory=self.device.type == "cuda")
        for images, labels, _index in loader:
            yield images, labels

    # -------------------------------------------------------------- steps
    def train_step(self, images: Tensor, labels: Tensor, epoch: int, step: int) -> Tensor:
        """One optimisation step; returns the detached loss (no host sync)."""
        set_learning_rate(self.optimizer, float(self.lr[epoch * self.steps_per_epoch + step]))
        # drop path draws from torch's global generator: make it a function of the step
        torch.manual_seed(derive_seed(self.params.seed, "finetune", self.variant, epoch, step, self.context.rank))
        self.model.train()
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        with self.autocast():
            logits = self.model(images)
        loss = self.criterion(logits.float(), labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def train_epoch(self, epoch: int, bar: tqdm | None = None) -> float:
        """Mean training loss of the epoch over all ranks."""
        losses = []
        for step, (images, labels) in enumerate(self.train_batches(epoch)):
            losses.append(self.train_step(images, labels, epoch, step))
            if bar is not None:
                bar.update(1)
        total = all_reduce_sum(torch.stack(losses).float().mean().reshape(1), self.context)
        loss = float(total.item()) / self.context.world_size
        if not math.isfinite(loss):
            raise FloatingPointError(f"fine-tuning {self.variant}: training loss is {loss} in epoch {epoch}")
        return loss

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float, float]:
        """(top-1 %, top-k %, mean loss) on the whole val split (each rank its share)."""
        self.module.eval()
        dataset = ShardDataset(
            self.val_split, batch_size=self.local_batch, transform=self.eval_transform, seed=self.params.seed,
            rank=self.context.rank, world_size=self.context.world_size, shuffle=False, drop_last=False,
        )
        loader = torch.utils.data.DataLoader(dataset, batch_size=self.local_batch,
                                             num_workers=self.config.num_workers,
                                             pin_memory=self.device.type == "cuda")
        # counts as float64 sums: exact for any realistic val size
        totals = torch.zeros(4, dtype=torch.float64, device=self.device)  # top1, topk, loss sum, count
        for images, labels, _index in loader:
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            with self.autocast():
                logits = self.module(images)
            logits = logits.float()
            top = logits.topk(self.topk, dim=1).indices
            hits = top == labels[:, None]
            totals[0] += hits[:, 0].sum()
            totals[1] += hits.any(dim=1).sum()
            totals[2] += nn.functional.cross_entropy(logits, labels, reduction="sum").double()
            totals[3] += labels.numel()
        totals = all_reduce_sum(totals, self.context).cpu().tolist()
        count = max(totals[3], 1.0)
        return 100.0 * totals[0] / count, 100.0 * totals[1] / count, totals[2] / count

    # --------------------------------------------------------------- loop
    def fit(self) -> FinetuneResult:
        start = time.perf_counter()
        result = FinetuneResult(self.variant, topk=self.topk, train_images=len(self.train_split),
                                val_images=len(self.val_split), steps_per_epoch=self.steps_per_epoch)
        bar = tqdm(total=self.config.epochs * self.steps_per_epoch, desc=f"finetune {self.variant}", unit="step",
                   disable=not self.progress_bar, dynamic_ncols=True)
        try:
            for epoch in range(self.config.epochs):
                train_loss = self.train_epoch(epoch, bar)
                top1, topk, val_loss = self.evaluate()
                result.history.append(EpochLog(epoch, train_loss, top1, topk, val_loss))
                bar.set_postfix(loss=f"{train_loss:.3f}", top1=f"{top1:.1f}")
                for name, value in (("train_loss", train_loss), ("top1", top1), (f"top{self.topk}", topk)):
                    self.record.log_scalar(f"{self.variant}.{name}", value, epoch)
        finally:
            bar.close()
        result.wall_seconds = time.perf_counter() - start
        return result

    def state_dict(self) -> dict[str, Tensor]:
        """The fine-tuned classifier's weights (timm names, head included), detached copies."""
        return {k: v.detach().clone() for k, v in self.module.state_dict().items()}


# --------------------------------------------------------------- the stage
def run_finetune(
    params: Params,
    shards: str | Path,
    backbone_path: str | Path,
    models_dir: str | Path,
    device: torch.device,
    context: DistContext | None = None,
    *,
    variants: tuple[str, ...] = FINETUNE_VARIANTS,
    finetune_shards: str | Path = "data/finetune_shards",
    record: RunRecord | None = None,
    progress_bar: bool = True,
) -> dict[str, Any]:
    """Fine-tune every variant; rank 0 writes ``<models_dir>/<variant>.safetensors``.

    Data: ``shards`` (train and val splits), or, with ``finetune.data_root``
    set, that folder sharded into ``finetune_shards`` first.

    Returns:
        ``{"metrics": {variant: metrics}, "wall_seconds": {variant: s}, ...}``
        (metrics deterministic, the rest not).
    """
    from pipeline.core.seeding import configure_determinism

    configure_determinism()
    context = context or DistContext()
    states = {variant: backbone_for_variant(params, variant, backbone_path) for variant in variants}  # fail early
    if params.finetune.data_root is not None:
        shards = prepare_finetune_shards(
            params.finetune.data_root, finetune_shards, seed=params.seed, shard_size=params.data.shard_size,
            context=context, progress=progress_bar and context.is_main,
        )
    train, val = (open_split(shards, name, verify=params.data.verify) for name in ("train", "val"))
    metrics: dict[str, Any] = {}
    wall: dict[str, float] = {}
    for variant in variants:
        finetuner = Finetuner(params, variant, states.pop(variant), train, val, device, context,
                              record=record, progress_bar=progress_bar)
        result = finetuner.fit()
        metrics[variant] = result.metrics()
        wall[variant] = result.wall_seconds
        if context.is_main:
            # no metadata: safetensors writes a metadata map in a random order (not byte-stable)
            save_backbone_safetensors(finetuner.state_dict(), Path(models_dir) / f"{variant}.safetensors")
        del finetuner
    barrier(context)
    return {
        "metrics": metrics,
        "wall_seconds": wall,
        "shards": str(shards),
        "num_classes": train.num_classes,
        "device": str(device),
        "world_size": context.world_size,
        "threads": torch.get_num_threads(),
    }


def write_finetune_reports(metrics: dict[str, dict[str, Any]], reports_dir: str | Path) -> None:
    """``finetune.json`` (per-variant metrics) and ``finetune_curve.csv`` (epoch, one top-1 column per variant)."""
    reports_dir = Path(reports_dir)
    write_json(metrics, reports_dir / "finetune.json")
    variants = list(metrics)
    epochs = max(len(m["curve"]) for m in metrics.values())
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["epoch", *variants])
    for epoch in range(epochs):
        writer.writerow([epoch, *(_fmt(metrics[v]["curve"][epoch]) if epoch < len(metrics[v]["curve"]) else ""
                                  for v in variants)])
    atomic_write_text(reports_dir / "finetune_curve.csv", buffer.getvalue())


def _fmt(value: float) -> str:
    return repr(float(value))


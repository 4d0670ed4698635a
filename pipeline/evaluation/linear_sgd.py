"""The official linear-probing protocol: DINO's ``eval_linear.py``, as AttMask reports it.

A linear layer trained with SGD on the frozen backbone's features, recomputed
for every augmented batch:

* features: the [CLS] tokens of the last ``n_last_blocks`` blocks, each through
  the final norm, concatenated (plus the mean patch token with ``avgpool``);
  :func:`pipeline.evaluation.extract.vit_features`, D = embed_dim x n;
* train views: RandomResizedCrop(size, scale (0.08, 1), bilinear) + flip,
  normalised (torchvision's defaults, as the official code); val: the
  resize-to-size/0.875 + centre crop of :func:`pipeline.data.augment.eval_transform`;
* head: ``nn.Linear(D, classes)``, weights N(0, 0.01), bias 0;
* SGD, momentum 0.9, no weight decay, lr = ``lr x global batch / 256``,
  cosine-annealed to 0 over the epochs, stepped once per epoch
  (``CosineAnnealingLR``);
* val top-1 after every ``val_every`` epochs and the last one; the official
  script reports the best of these (``best_top1``), we also keep the last
  (``top1``).

Differences: the loader drops the last incomplete global batch (equal batches
on every rank; the official ``DistributedSampler`` pads instead), and the
order and augmentations come from (seed, epoch, sample) so any rank or worker
count gives the same batches. The run checkpoints the head, optimizer and
history after every epoch and resumes from there.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torchvision.transforms import v2
from tqdm import tqdm

from pipeline.core.config import NOT_OUTPUT_KEYS, LinearSgdConfig, ParamsError, Params
from pipeline.core.distributed import DistContext, all_reduce_sum, barrier
from pipeline.core.seeding import derive_seed
from pipeline.core.tracking import RunRecord
from pipeline.data.augment import IMAGENET_MEAN, IMAGENET_STD, eval_transform
from pipeline.data.shard_reader import ShardDataset, ShardSplit, open_split
from pipeline.evaluation.extract import vit_features
from pipeline.evaluation.finetune import backbone_for_variant
from pipeline.method.backbone_export import create_backbone
from pipeline.method.checkpoint import load_checkpoint, save_checkpoint

HEAD_INIT_STD = 0.01
MOMENTUM = 0.9


def probe_train_transform(size: int) -> v2.Transform:
    """The official train views: RandomResizedCrop(size) with torchvision's defaults, flip, normalise."""
    return v2.Compose([
        v2.RandomResizedCrop(size),
        v2.RandomHorizontalFlip(p=0.5),
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


class LinearClassifier(nn.Module):
    """(B, D) features -> (B, classes) logits; weights N(0, 0.01), bias 0, drawn from ``generator``."""

    def __init__(self, dim: int, num_classes: int, generator: torch.Generator):
        super().__init__()
        self.linear = nn.Linear(dim, num_classes)
        with torch.no_grad():
            self.linear.weight.copy_(torch.randn(num_classes, dim, generator=generator) * HEAD_INIT_STD)
            self.linear.bias.zero_()

    def forward(self, features: Tensor) -> Tensor:
        return self.linear(features)


def cosine_lr(base_lr: float, epochs: int, epoch: int) -> float:
    """``CosineAnnealingLR(T_max=epochs, eta_min=0)`` in closed form: the lr of ``epoch``."""
    return base_lr * (1 + math.cos(math.pi * epoch / epochs)) / 2


class LinearSgdProbe:
    """One probe (one variant) on one rank: a frozen timm ViT and a linear head trained with SGD.

    Args:
        config: ``params.linear_sgd``.
        backbone_state: the frozen backbone's weights (timm names).
        train, val: verified splits with the same classes.
        checkpoint: where the head, optimizer and history go after every epoch
            (rank 0 writes); an existing one of the same run is resumed.
    """

    def __init__(self, params: Params, variant: str, backbone_state: dict[str, Tensor], train: ShardSplit,
                 val: ShardSplit, device: torch.device, checkpoint: Path, context: DistContext | None = None,
                 record: RunRecord | None = None, progress_bar: bool = True):
        self.config: LinearSgdConfig = params.linear_sgd
        self.params, self.variant, self.device, self.checkpoint = params, variant, device, Path(checkpoint)
        self.context = context or DistContext()
        self.record = record or RunRecord(None, None)
        self.progress_bar = progress_bar and self.context.is_main
        if val.classes != train.classes:
            raise ValueError(f"val classes {val.classes} differ from train classes {train.classes}")
        self.train_split, self.val_split = train, val
        batch, world = self.config.batch_size, self.context.world_size
        if batch % world:
            raise ParamsError("linear_sgd.batch_size", f"the global batch {batch} must be a multiple of the ranks ({world})")
        self.local_batch = batch // world
        self.steps_per_epoch = len(train) // batch
        if self.steps_per_epoch < 1:
            raise ParamsError("linear_sgd.batch_size", f"{batch} is larger than the train split ({len(train)} images)")
        self.image_size = params.extract_image_size()
        self.backbone = create_backbone(params.model)
        self.backbone.load_state_dict(backbone_state, strict=True)
        self.backbone.to(device).eval().requires_grad_(False)
        self.dim = self.backbone.embed_dim * (self.config.n_last_blocks + int(self.config.avgpool))
        generator = torch.Generator().manual_seed(derive_seed(params.seed, "linear_sgd", variant, "head"))
        self.head = LinearClassifier(self.dim, train.num_classes, generator).to(device)
        self.model: nn.Module = self.head
        if self.context.enabled:
            self.model = DistributedDataParallel(self.head, device_ids=[device.index] if device.type == "cuda" else None)
        self.base_lr = self.config.lr * batch / 256.0
        self.optimizer = torch.optim.SGD(self.head.parameters(), lr=self.base_lr, momentum=MOMENTUM, weight_decay=0.0)
        self.history: list[dict[str, Any]] = []
        self.epoch = 0
        self.identity = self._identity(backbone_state)

    # ------------------------------------------------------------- identity
    def _identity(self, backbone_state: dict[str, Tensor]) -> str:
        """What makes a checkpoint this run's: config, variant, seed, backbone weights, data, world size."""
        digest = hashlib.sha256()
        for name in sorted(backbone_state):
            digest.update(name.encode())
            digest.update(backbone_state[name].detach().cpu().contiguous().numpy().tobytes())
        config = {k: v for k, v in asdict(self.config).items() if k not in NOT_OUTPUT_KEYS["linear_sgd"]}
        return json.dumps({"config": config, "variant": self.variant, "seed": self.params.seed,
                           "backbone": digest.hexdigest(), "image_size": self.image_size, "train": len(self.train_split),
                           "val": len(self.val_split), "world_size": self.context.world_size}, sort_keys=True)

    def state_dict(self) -> dict[str, Any]:
        return {"identity": self.identity, "epoch": self.epoch, "head": self.head.state_dict(),
                "optimizer": self.optimizer.state_dict(), "history": json.dumps(self.history)}

    def try_resume(self) -> bool:
        """Load this run's checkpoint if there is one; a checkpoint of another run is ignored (and overwritten)."""
        if not self.checkpoint.is_file():
            return False
        state = load_checkpoint(self.checkpoint, map_location=self.device)
        if state.get("identity") != self.identity:
            if self.context.is_main:
                tqdm.write(f"linear_sgd {self.variant}: {self.checkpoint} is from another run; starting from scratch")
            return False
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.history = json.loads(state["history"])
        self.epoch = int(state["epoch"])
        if self.context.is_main:
            tqdm.write(f"linear_sgd {self.variant}: resuming from {self.checkpoint} at epoch {self.epoch}")
        return True

    # ----------------------------------------------------------------- data
    def _loader(self, split: ShardSplit, transform: v2.Transform, epoch: int, train: bool) -> Iterator[tuple[Tensor, Tensor]]:
        dataset = ShardDataset(
            split, batch_size=self.local_batch, transform=transform, seed=derive_seed(self.params.seed, "linear_sgd"),
            epoch=epoch, rank=self.context.rank, world_size=self.context.world_size, shuffle=train, drop_last=train,
            global_batch_size=self.config.batch_size if train else None,
        )
        loader = torch.utils.data.DataLoader(dataset, batch_size=self.local_batch, num_workers=self.config.num_workers,
                                             pin_memory=self.device.type == "cuda")
        for images, labels, _index in loader:
            yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        """(B, D) float32 frozen features (bf16 autocast on CUDA)."""
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")
        with autocast:
            return vit_features(self.backbone, images, self.config.n_last_blocks, self.config.avgpool).float()

    # ----------------------------------------------------------------- loop
    def train_epoch(self, epoch: int, bar: tqdm | None) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = cosine_lr(self.base_lr, self.config.epochs, epoch)
        self.head.train()
        loss_sum, batches = torch.zeros((), dtype=torch.float64, device=self.device), 0  # summed on the device: no sync
        for images, labels in self._loader(self.train_split, probe_train_transform(self.image_size), epoch, True):
            loss = nn.functional.cross_entropy(self.model(self.features(images)), labels)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            loss_sum += loss.detach()
            batches += 1
            if bar is not None:
                bar.update(1)
        total = torch.stack([loss_sum, torch.tensor(float(batches), dtype=torch.float64, device=self.device)])
        total = all_reduce_sum(total, self.context).cpu().tolist()
        loss = total[0] / max(total[1], 1.0)
        if not math.isfinite(loss):
            raise FloatingPointError(f"linear_sgd {self.variant}: training loss is {loss} in epoch {epoch}")
        return loss

    @torch.no_grad()
    def evaluate(self) -> float:
        """Val top-1 (%) over the whole split, each rank its share."""
        self.head.eval()
        hits, count = torch.zeros((), dtype=torch.float64, device=self.device), 0
        for images, labels in self._loader(self.val_split, eval_transform(self.image_size), 0, False):
            hits += (self.head(self.features(images)).argmax(dim=1) == labels).sum()
            count += labels.numel()
        totals = torch.stack([hits, torch.tensor(float(count), dtype=torch.float64, device=self.device)])
        totals = all_reduce_sum(totals, self.context).cpu().tolist()
        return 100.0 * totals[0] / max(totals[1], 1.0)

    def fit(self) -> dict[str, Any]:
        """Train to ``epochs`` (resuming if possible); returns the deterministic summary."""
        self.try_resume()
        bar = tqdm(total=(self.config.epochs - self.epoch) * self.steps_per_epoch, unit="step", dynamic_ncols=True,
                   desc=f"linear_sgd {self.variant}", disable=not self.progress_bar)
        try:
            while self.epoch < self.config.epochs:
                epoch = self.epoch
                entry: dict[str, Any] = {"epoch": epoch, "lr": cosine_lr(self.base_lr, self.config.epochs, epoch),
                                         "train_loss": self.train_epoch(epoch, bar)}
                if (epoch + 1) % self.config.val_every == 0 or epoch + 1 == self.config.epochs:
                    entry["top1"] = self.evaluate()
                    bar.set_postfix(loss=f"{entry['train_loss']:.3f}", top1=f"{entry['top1']:.1f}")
                self.history.append(entry)
                for name in ("train_loss", "top1"):
                    if name in entry:
                        self.record.log_scalar(f"linear_sgd.{self.variant}.{name}", entry[name], epoch)
                self.epoch = epoch + 1
                if self.context.is_main:
                    save_checkpoint(self.state_dict(), self.checkpoint)
                barrier(self.context)
        finally:
            bar.close()
        return self.summary()

    def summary(self) -> dict[str, Any]:
        evaluated = [(entry["top1"], entry["epoch"]) for entry in self.history if "top1" in entry]
        best_top1, best_epoch = max(evaluated, key=lambda pair: (pair[0], -pair[1]))
        return {
            "top1": evaluated[-1][0], "best_top1": best_top1, "best_epoch": best_epoch,
            "curve": [[epoch, top1] for top1, epoch in evaluated],
            "train_loss": [entry["train_loss"] for entry in self.history],
            "epochs": self.config.epochs, "batch_size": self.config.batch_size, "lr": self.base_lr,
            "feature_dim": self.dim, "steps_per_epoch": self.steps_per_epoch,
            "train_images": len(self.train_split), "val_images": len(self.val_split),
        }


def run_linear_sgd(params: Params, shards: str | Path, backbone_path: str | Path, models_dir: str | Path,
                   device: torch.device, context: DistContext | None = None, record: RunRecord | None = None,
                   progress_bar: bool = True) -> dict[str, Any]:
    """Probe every ``linear_sgd.variants``; returns ``{variant: summary}`` (the same on every rank)."""
    from pipeline.core.seeding import configure_determinism

    configure_determinism()
    context = context or DistContext()
    train, val = (open_split(shards, name, verify=params.data.verify) for name in ("train", "val"))
    results: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    for variant in params.linear_sgd.variants:
        start = time.perf_counter()
        probe = LinearSgdProbe(params, variant, backbone_for_variant(params, variant, backbone_path), train, val,
                               device, Path(models_dir) / f"{variant}.pt", context, record, progress_bar)
        results[variant] = probe.fit()
        seconds[variant] = time.perf_counter() - start
        del probe
    if record is not None:  # clock readings: reports/timing, not DVC outputs
        record.add_timing(seconds_per_variant=seconds)
    return results

"""iBOT pre-training with a masking strategy (docs/method.md).

One training step::

    teacher(unmasked globals)  -> [CLS]/patch targets + [CLS] attention (free by-product)
    masks = strategy(attention or random draws)          (B, h, w) per global crop
    student(masked globals, locals) -> predictions
    loss = lambda1 * cls + lambda2 * patch ; AdamW step ; EMA teacher ; centres

Everything random is seeded from (seed, epoch, step): the data order and the
augmentations by the shard reader, drop-path by reseeding torch's generator
per step, and the masks by an explicit generator. A resumed run therefore
replays exactly what an uninterrupted one does.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from pipeline.core.config import NOT_OUTPUT_KEYS, Params, ParamsError, params_to_dict
from pipeline.core.distributed import DistContext, all_reduce_sum, barrier, gather_rows
from pipeline.core.errors import UserError
from pipeline.core.files import atomic_write_text, sha256_file, write_json
from pipeline.core.seeding import configure_determinism, derive_seed
from pipeline.core.sources import code_files, fingerprint
from pipeline.core.strategies import BY_NAME
from pipeline.core.tracking import RunRecord
from pipeline.data.augment import build_multicrop
from pipeline.data.shard_reader import ShardDataset, ShardSplit, open_split
from pipeline.data.shard_writer import MANIFEST_NAME
from pipeline.method.backbone_export import save_backbone_safetensors, save_timm_folder
from pipeline.method.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from pipeline.method.loss import IBOTLoss, koleo_loss
from pipeline.method.masking import StepMasks, generate_masks, step_generator
from pipeline.method.model import IBOTNetwork, backbone_state_dict, build_network
from pipeline.method.schedules import TrainingSchedules, stretch_to_min_steps

CHECKPOINT_FORMAT = 3  # 2: the run identity (auto resume) is stored; 3: and the k-NN curve
# the stage whose deps the run identity's code fingerprint covers (pipeline.core.sources)
PRETRAIN_MODULE = "stages.pretrain"
# pretrain keys that never change what the stage writes (config.NOT_OUTPUT_KEYS): left out of a
# checkpoint's run identity, so changing one does not block a resume.
NOT_COMPUTATION_KEYS = NOT_OUTPUT_KEYS["pretrain"]
# k-NN while training (pretrain.eval_every): the DINO protocol's temperature, as the knn stage's default
EVAL_TEMPERATURE = 0.07
KNN_COLUMNS = ("epoch", "step", "knn_top1")
# torch.compile backend for pretrain.compile; tests swap in "aot_eager" (inductor takes minutes on CPU)
COMPILE_BACKEND = "inductor"
# params sections that shape pre-training; evaluation sections may change freely
# the params a checkpoint's numbers depend on: threads and numerics change the rounding, so they count too
PRETRAIN_SECTIONS = ("seed", "threads", "numerics", "data", "model", "masking", "augment", "pretrain")
LOGGED_SCALARS = ("loss_total", "loss_cls", "loss_patch", "masked_share")
STEP_COLUMNS = ("step", "epoch", "loss_total", "loss_cls", "loss_patch", "lr", "weight_decay", "momentum", "teacher_temp", "masked_share")


class NonFiniteLossError(UserError, RuntimeError):
    """The loss became NaN or inf; the last good checkpoint is left untouched."""


class Interrupted(RuntimeError):
    """SIGTERM/SIGINT arrived; a checkpoint of the current step was written."""


@dataclass
class PretrainPaths:
    """Where pre-training reads and writes."""

    shards: Path
    checkpoint: Path
    backbone_pth: Path
    backbone_safetensors: Path
    timm_folder: Path  # config.json + model.safetensors: timm.create_model("local-dir:<folder>", pretrained=True)
    reports: Path

    @classmethod
    def under(cls, shards: Path, models: Path, reports: Path) -> "PretrainPaths":
        return cls(
            shards=Path(shards),
            checkpoint=Path(models) / "checkpoint.pt",
            backbone_pth=Path(models) / "backbone.pth",
            backbone_safetensors=Path(models) / "backbone.safetensors",
            timm_folder=Path(models) / "timm",
            reports=Path(reports),
        )


@dataclass
class Progress:
    """Position in training; ``step`` counts steps done in ``epoch``."""

    epoch: int = 0
    step: int = 0
    history: list[list[float]] = field(default_factory=list)


@dataclass
class StepBatch:
    """What :meth:`Pretrainer.batches` yields: one step's crops on the training device, with the masks if drawn.

    ``crops``: 2 global (B, 3, S, S) then ``local_number`` local (B, 3, s, s)
    normalised crops. ``masks``: (2B, h, w) bool, crop-major (crop 0's B rows,
    then crop 1's), drawn by the loader for the strategies that need no
    attention; None when the step draws them (AttMask).
    """

    crops: list[torch.Tensor]
    masks: torch.Tensor | None = None


def validate_for_world(params: Params, context: DistContext) -> None:
    """Checks that need the world size; run before any heavy work."""
    batch = params.pretrain.batch_size
    if batch < context.world_size or batch % context.world_size:
        raise ParamsError(
            "pretrain.batch_size",
            f"the global batch {batch} must be a positive multiple of the number of ranks ({context.world_size})",
        )


def check_compile_support(device: torch.device) -> None:
    """Fail before any work if ``pretrain.compile`` cannot work here (inductor needs a compiler)."""
    if COMPILE_BACKEND != "inductor":
        return
    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        raise ParamsError("pretrain.compile", "torch.compile on CUDA needs triton, which is not installed; set it to false")
    if device.type == "cpu" and not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "clang++", "c++")):
        raise ParamsError("pretrain.compile", "torch.compile on CPU needs a C++ compiler (g++ or clang++); none found, set it to false")


def parameter_groups(module: nn.Module) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on weight matrices only, not on biases and norms (DINO)."""
    decay, no_decay = [], []
    for name, parameter in module.named_parameters():
        if not parameter.requires_grad:
            continue
        (no_decay if name.endswith(".bias") or parameter.ndim <= 1 else decay).append(parameter)
    return [{"params": decay, "apply_wd": True}, {"params": no_decay, "apply_wd": False, "weight_decay": 0.0}]


def clip_gradients(module: nn.Module, max_norm: float) -> None:
    """Clip each parameter's gradient norm to ``max_norm`` (as the official DINO/iBOT code).

    Per parameter, ``grad *= max_norm / (norm + 1e-6)`` where that is below 1;
    a handful of foreach ops (a few kernels on CUDA) instead of several per
    parameter, no host sync. The scale is computed as the official code's
    ``clip / (norm + 1e-6)`` is (``Tensor.__rtruediv__``: reciprocal, then
    times ``clip``) and a factor of exactly 1 leaves a gradient unchanged, so
    the gradients are bit for bit the official ones wherever the norms are
    (CPU: yes; CUDA's fused ``_foreach_norm`` sums in another order).
    """
    if max_norm <= 0:
        return
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return
    scales = torch._foreach_add(torch._foreach_norm(grads), 1e-6)
    torch._foreach_reciprocal_(scales)
    torch._foreach_mul_(scales, max_norm)
    torch._foreach_clamp_max_(scales, 1.0)
    torch._foreach_mul_(grads, scales)


def cancel_last_layer_gradients(module: nn.Module) -> None:
    """Freeze the head's last layer during the first epoch(s): it stabilises early training."""
    for name, parameter in module.named_parameters():
        if "last_layer" in name:
            parameter.grad = None


@torch.no_grad()
def update_teacher(student: nn.Module, teacher: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter."""
    student_params = [p.detach() for _, p in sorted(student.named_parameters())]
    teacher_params = [p for _, p in sorted(teacher.named_parameters())]
    torch._foreach_mul_(teacher_params, momentum)
    torch._foreach_add_(teacher_params, student_params, alpha=1.0 - momentum)


class Pretrainer:
    """Owns the networks, optimiser, loss and data of one pre-training run."""

    def __init__(self, params: Params, paths: PretrainPaths, device: torch.device, context: DistContext,
                 record: RunRecord | None = None, progress_bar: bool = True):
        validate_for_world(params, context)
        self.params = params
        self.paths = paths
        self.device = device
        self.context = context
        self.record = record or RunRecord(None, None)
        self.progress_bar = progress_bar and context.is_main
        self.config = params.pretrain
        self.identity = run_identity(params, paths.shards)
        self.local_batch = self.config.batch_size // context.world_size
        self.split = open_split(paths.shards, "train", verify=params.data.verify)
        self.steps_per_epoch = len(self.split) // self.config.batch_size
        if self.steps_per_epoch < 1:
            raise ParamsError(
                "pretrain.batch_size",
                f"{self.config.batch_size} is larger than the train split ({len(self.split)} images)",
            )
        self.config = stretch_to_min_steps(params.pretrain, self.steps_per_epoch)
        if self.config.epochs != params.pretrain.epochs and context.is_main:
            tqdm.write(f"pretrain: {len(self.split)} train images give {self.steps_per_epoch} steps per epoch; "
                       f"{params.pretrain.epochs} epochs raised to {self.config.epochs} to reach pretrain.min_steps="
                       f"{self.config.min_steps} (warm-ups and freeze_last_layer stretched alike)")
        self.augmentation = build_multicrop(params.augment)
        self.patch_size = params.patch_size()
        self.uses_attention = BY_NAME[params.masking.strategy].needs_attention

        torch.manual_seed(derive_seed(params.seed, "init"))
        self.student: nn.Module = build_network(params.model, drop_path_rate=params.model.drop_path_rate).to(device)
        self.teacher: IBOTNetwork = build_network(params.model, drop_path_rate=0.0).to(device)
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        self.student_module = self.student
        if self.config.compile:
            check_compile_support(device)
            # in place (nn.Module.compile), so state_dict keys and checkpoints stay those of eager;
            # static shapes: one graph per crop size instead of a slower dynamic-shape one
            self.student.compile(backend=COMPILE_BACKEND, dynamic=False)
            self.teacher.compile(backend=COMPILE_BACKEND, dynamic=False)
        if context.enabled:
            device_ids = [device.index] if device.type == "cuda" else None
            self.student = DistributedDataParallel(self.student, device_ids=device_ids)
        # fused: one kernel for all parameters on CUDA; the CPU keeps foreach, so CPU results are unchanged
        fused = {"fused": True} if self.config.fused_adamw and device.type == "cuda" else {}
        self.optimizer = torch.optim.AdamW(parameter_groups(self.student_module), **fused)
        self.schedules = TrainingSchedules.from_config(self.config, self.steps_per_epoch, self.config.batch_size)
        self.loss = IBOTLoss(
            out_dim=params.model.out_dim,
            num_global_crops=2,
            num_local_crops=params.augment.local_number,
            student_temp=self.config.student_temp,
            teacher_temps=self.schedules.teacher_temp,
            center_momentum=self.config.center_momentum,
            lambda1=self.config.lambda1,
            lambda2=self.config.lambda2,
            centering=self.config.centering,
        ).to(device)
        self.progress = Progress()
        self.autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
        )
        self._stop_signal: int | None = None
        self.knn_history: list[list[float]] = []  # [epoch, step, top1] of pretrain.eval_every
        self.val_split: ShardSplit | None = None  # read only by evaluate_knn

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "identity": self.identity,
            "epoch": self.progress.epoch,
            "step": self.progress.step,
            "student": self.student_module.state_dict(),
            "teacher": self.teacher.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "loss": self.loss.state_dict(),
            "history": torch.tensor(self.progress.history, dtype=torch.float64).reshape(-1, len(STEP_COLUMNS)),
            # in the checkpoint, so every resume (a crash, `dvc repro --force`) keeps the curve of the epochs done
            "knn": torch.tensor(self.knn_history, dtype=torch.float64).reshape(-1, len(KNN_COLUMNS)),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ParamsError("pretrain.resume", f"{self.paths.checkpoint}: unknown checkpoint format {state.get('format')!r}")
        try:
            self.student_module.load_state_dict(state["student"])
            self.teacher.load_state_dict(state["teacher"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.loss.load_state_dict(state["loss"])
        except (KeyError, RuntimeError, ValueError) as error:
            # matching params but other tensors: a hand-edited or foreign file; torch's message names no file
            raise CheckpointError(f"{self.paths.checkpoint}: does not fit this model ({error})") from error
        self.progress = Progress(int(state["epoch"]), int(state["step"]), state["history"].tolist())
        self.knn_history = [[int(epoch), int(step), float(top1)] for epoch, step, top1 in state["knn"].tolist()]

    # ------------------------------------------------------------ evaluation
    def evaluate_knn(self) -> float | None:
        """Teacher [CLS] k-NN top-1 (percent) of val against train, centre crops; None off rank 0.

        Draws nothing from the training's randomness: the eval transform is
        deterministic and torch's generator state is restored afterwards, so the
        weights and checkpoints are the same with or without it.

        Extraction runs on the training device with ``pretrain.num_workers``
        loader processes: it is this stage's own CPU budget for decoding (the
        training loader's workers have ended with the epoch, so they compete
        with nothing), and the pretrain stage does not read the ``extract``
        section (nor should a k-NN probe of training depend on it).
        """
        from pipeline.evaluation.extract import extract_split, vit_features
        from pipeline.evaluation.knn import weighted_knn

        vit = self.teacher.backbone.vit
        if self.val_split is None:  # opened (and verified) once, on the first evaluation
            self.val_split = open_split(self.paths.shards, "val", verify=self.params.data.verify)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []), torch.no_grad():
            train, val = (
                extract_split(split, {"teacher": lambda images: vit_features(vit, images)},
                              image_size=self.params.augment.global_size, batch_size=256, device=self.device,
                              context=self.context, num_workers=self.config.num_workers, progress_bar=False)
                for split in (self.split, self.val_split)
            )
        if train is None or val is None:
            return None
        train, val = train["teacher"], val["teacher"]
        knn = weighted_knn(train.features, train.labels, val.features, val.labels, [self.config.eval_k],
                           temperature=EVAL_TEMPERATURE)
        return float(knn["top1"][str(self.config.eval_k)])

    def _maybe_evaluate(self, epoch_done: int) -> None:
        every = self.config.eval_every
        if not every or (epoch_done % every and epoch_done != self.config.epochs):
            return
        top1 = self.evaluate_knn()
        if top1 is None:
            return
        step = epoch_done * self.steps_per_epoch
        self.knn_history = [row for row in self.knn_history if row[0] != epoch_done] + [[epoch_done, step, top1]]
        _write_csv(self.paths.reports / "knn.csv", KNN_COLUMNS, self.knn_history)
        self.record.log_scalar(f"knn_top1_k{self.config.eval_k}", top1, step)
        tqdm.write(f"pretrain: epoch {epoch_done}: teacher k-NN@{self.config.eval_k} on val {top1:.1f}%")

    def save(self) -> None:
        if self.context.is_main:
            save_checkpoint(self.state_dict(), self.paths.checkpoint)

    def maybe_resume(self) -> bool:
        """Continue from ``checkpoint.pt`` when it comes from this same run (``pretrain.resume: auto``).

        The same run means the same :func:`run_identity`: output-affecting params,
        code, data and torch. A checkpoint of another run is never resumed: it is
        renamed ``checkpoint.pt.set-aside`` (one notice names the first difference)
        and training starts fresh. ``never`` always starts fresh.
        """
        path = self.paths.checkpoint
        if self.config.resume == "never" or not path.is_file():
            return False
        state = load_checkpoint(path, map_location=self.device)
        difference = first_difference(state.get("identity"), self.identity)
        if self.context.enabled:
            barrier(self.context)  # every rank has read it before rank 0 moves it
        if difference is not None:
            if self.context.is_main:
                os.replace(path, path.with_name(path.name + ".set-aside"))
                tqdm.write(f"pretrain: {path} is from another run ({difference}); moved to {path.name}.set-aside, "
                           "starting from scratch")
            return False
        self.load_state_dict(state)
        if self.context.is_main:
            tqdm.write(f"pretrain: resuming this run from {path} (epoch {self.progress.epoch}, step {self.progress.step})")
        return True

    # ------------------------------------------------------------------ data
    def step_masks(self, epoch: int) -> StepMasks | None:
        """The loader's mask drawer for ``epoch``; None for AttMask, whose masks need the teacher's attention."""
        if self.uses_attention:
            return None
        side = self.params.augment.global_size // self.patch_size
        return StepMasks(self.params.masking, self.params.seed, epoch, self.config.batch_size, (side, side))

    def batches(self, epoch: int, start_step: int) -> Iterator[StepBatch]:
        """This rank's steps of ``epoch`` from ``start_step``, on the training device (see :class:`StepBatch`)."""
        dataset = ShardDataset(
            self.split,
            transform=self.augmentation,
            seed=self.params.seed,
            epoch=epoch,
            batch_size=self.local_batch,
            rank=self.context.rank,
            world_size=self.context.world_size,
            start_step=start_step,
            shuffle=True,
            drop_last=True,
            global_batch_size=self.config.batch_size,
            per_step=self.step_masks(epoch),
        )
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=self.local_batch,
            num_workers=self.config.num_workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
        )
        for batch, _labels, _indices, *masks in loader:
            # augment.photometric: batched runs the colour ops here, batch-wise on the training device
            crops = self.augmentation.on_device(batch, self.device)
            if not masks:
                yield StepBatch(crops)
                continue
            # (B, 2, h, w) rows of the collated samples to crop-major (2B, h, w), as the crops are concatenated;
            # pinned by the loader on CUDA, so non_blocking is a real asynchronous copy
            rows = masks[0].to(self.device, non_blocking=True)
            yield StepBatch(crops, rows.transpose(0, 1).reshape(-1, *rows.shape[2:]))

    # ------------------------------------------------------------------ step
    def masks_for(self, crop: int, epoch: int, step: int, attention: torch.Tensor | None, grid: tuple[int, int]) -> torch.Tensor:
        """(local_batch, h, w) masks for one global crop.

        Drawn for the whole global batch from one generator and sliced to this
        rank's rows, so N ranks mask exactly what one process would.
        """
        generator = step_generator(self.params.seed, epoch, step, crop)
        if attention is not None:
            attention = gather_rows(attention.float(), self.context)
        masks = generate_masks(self.params.masking, self.config.batch_size, grid, generator, attention)
        rows = slice(self.context.rank * self.local_batch, (self.context.rank + 1) * self.local_batch)
        # non_blocking: a blocking host-to-device copy would wait for the teacher forward (a host sync)
        return masks[rows].to(self.device, non_blocking=True)

    def train_step(self, crops: list[torch.Tensor] | StepBatch, epoch: int, step: int) -> dict[str, torch.Tensor]:
        """One optimisation step on a :class:`StepBatch` or its crops alone; returns detached scalars (no host sync).

        Without loader-drawn masks (a list of crops, or AttMask) the step draws
        them with :meth:`masks_for`, from the same generators as the loader.
        """
        loaded_masks = crops.masks if isinstance(crops, StepBatch) else None
        if isinstance(crops, StepBatch):
            crops = crops.crops
        iteration = epoch * self.steps_per_epoch + step
        for group in self.optimizer.param_groups:
            group["lr"] = float(self.schedules.lr[iteration])
            if group["apply_wd"]:
                group["weight_decay"] = float(self.schedules.weight_decay[iteration])
        # drop-path draws from torch's global generator: make it a function of the step
        torch.manual_seed(derive_seed(self.params.seed, "step", epoch, step, self.context.rank))

        crops = [c.to(self.device, non_blocking=True) for c in crops]
        global_crops = torch.cat(crops[:2])
        local_crops = torch.cat(crops[2:]) if len(crops) > 2 else None
        grid = (global_crops.shape[-2] // self.patch_size, global_crops.shape[-1] // self.patch_size)

        with self.autocast:
            with torch.no_grad():
                target = self.teacher(global_crops, return_cls_attention=self.uses_attention)
            attention = target.get("cls_attention")
            masks = loaded_masks if loaded_masks is not None else torch.cat(
                [
                    self.masks_for(c, epoch, step, None if attention is None else attention.chunk(2)[c], grid)
                    for c in range(2)
                ]
            )
            prediction = self.student(global_crops, masks=masks, local_crops=local_crops)
            losses = self.loss(prediction["cls"], prediction["patch"], target["cls"], target["patch"], masks, epoch)
            if self.config.koleo_weight > 0:
                # per global crop, as DINOv2: neighbours are other images of the same view
                koleo = sum(koleo_loss(f) for f in prediction["cls_features"].chunk(2)) / 2
                losses["total"] = losses["total"] + self.config.koleo_weight * koleo

        self.optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        clip_gradients(self.student_module, self.config.clip_grad)
        if epoch < self.config.freeze_last_layer:
            cancel_last_layer_gradients(self.student_module)
        self.optimizer.step()
        update_teacher(self.student_module, self.teacher, float(self.schedules.momentum[iteration]))
        self.loss.update_center(target["cls"], target["patch"])

        return {
            "loss_total": losses["total"].detach(),
            "loss_cls": losses["cls"].detach(),
            "loss_patch": losses["patch"].detach(),
            "masked_share": masks.float().mean().detach(),
        }

    # ------------------------------------------------------------------ loop
    def fit(self) -> dict[str, Any]:
        """Train to ``pretrain.epochs``, writing checkpoints, exports and records."""
        resumed = self.maybe_resume()
        if self.config.eval_every and self.context.is_main:
            self.paths.reports.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        images_seen = 0
        throughput: list[tuple[int, float]] = []
        self._install_signal_handlers()
        total_steps = self.config.epochs * self.steps_per_epoch
        bar = tqdm(total=total_steps, initial=self.progress.epoch * self.steps_per_epoch + self.progress.step,
                   desc="pretrain", unit="step", disable=not self.progress_bar, dynamic_ncols=True)
        pending: list[tuple[int, int, dict[str, torch.Tensor]]] = []
        try:
            while self.progress.epoch < self.config.epochs:
                epoch = self.progress.epoch
                step_start = time.perf_counter()
                for step, crops in enumerate(self.batches(epoch, self.progress.step), start=self.progress.step):
                    scalars = self.train_step(crops, epoch, step)
                    pending.append((epoch, step, scalars))
                    self.progress.step = step + 1
                    images_seen += self.config.batch_size
                    bar.update(1)
                    last = self.progress.step == self.steps_per_epoch
                    due_checkpoint = (
                        self.config.checkpoint_every_steps
                        and (epoch * self.steps_per_epoch + self.progress.step) % self.config.checkpoint_every_steps == 0
                    )
                    if len(pending) >= self.config.log_every or last or due_checkpoint or self._stop_signal:
                        self._flush(pending, bar)
                        now = time.perf_counter()
                        rate = len(pending) * self.config.batch_size / max(now - step_start, 1e-9)
                        throughput.append((epoch * self.steps_per_epoch + self.progress.step, rate))
                        bar.set_postfix(loss=f"{self.progress.history[-1][2]:.3f}", img_s=f"{rate:.1f}")
                        pending.clear()
                        step_start = now
                    if due_checkpoint and not last:
                        self.save()
                    if self._stop_signal:
                        self.save()
                        raise Interrupted(f"signal {self._stop_signal} at epoch {epoch} step {self.progress.step}; checkpoint written")
                self.progress.epoch += 1
                self.progress.step = 0
                done = self.progress.epoch
                self._log_epoch(epoch)
                # before the save, so the checkpoint of an epoch holds that epoch's k-NN point
                self._maybe_evaluate(done)
                if done % self.config.checkpoint_every == 0 or done == self.config.epochs:
                    self.save()
        finally:
            bar.close()
            self._restore_signal_handlers()
            if self.val_split is not None:
                self.val_split.close()
                self.val_split = None
        wall = time.perf_counter() - start
        self.export()
        return self.summary(wall, images_seen, throughput, resumed)

    def _flush(self, pending: list[tuple[int, int, dict[str, torch.Tensor]]], bar: tqdm) -> None:
        """Move logged scalars to the host in one sync; stop on a non-finite loss."""
        values = torch.stack([torch.stack([s[k].float() for k in LOGGED_SCALARS]) for _, _, s in pending])
        # each rank's loss is over its share of the global batch: log the global mean
        values = (all_reduce_sum(values, self.context) / self.context.world_size).cpu()
        for (epoch, step, _), row in zip(pending, values.tolist()):
            total, cls_loss, patch_loss, masked = row
            if not all(math.isfinite(v) for v in (total, cls_loss, patch_loss)):
                raise NonFiniteLossError(
                    f"loss is {total} at epoch {epoch} step {step} (global step {epoch * self.steps_per_epoch + step}); "
                    f"the last good checkpoint {self.paths.checkpoint} is kept"
                )
            iteration = epoch * self.steps_per_epoch + step
            self.progress.history.append([
                float(iteration), float(epoch), total, cls_loss, patch_loss,
                float(self.schedules.lr[iteration]), float(self.schedules.weight_decay[iteration]),
                float(self.schedules.momentum[iteration]), float(self.schedules.teacher_temp[epoch]), masked,
            ])
            self.record.log_scalar("loss_total", total, iteration)

    def _log_epoch(self, epoch: int) -> None:
        rows = [r for r in self.progress.history if int(r[1]) == epoch]
        mean = {c: sum(r[i] for r in rows) / len(rows) for i, c in enumerate(STEP_COLUMNS) if i >= 2}
        for key in ("loss_total", "loss_cls", "loss_patch"):
            self.record.log_scalar(f"epoch_{key}", mean[key], epoch)

    # --------------------------------------------------------------- outputs
    def export(self) -> None:
        """Teacher backbone in timm format (.pth and .safetensors), loads with strict=True."""
        if not self.context.is_main:
            return
        state = backbone_state_dict(self.teacher)
        save_checkpoint(state, self.paths.backbone_pth)
        save_backbone_safetensors(state, self.paths.backbone_safetensors)
        save_timm_folder(state, self.params.model, self.params.augment.global_size, self.paths.timm_folder)

    def summary(self, wall: float, images_seen: int, throughput: list[tuple[int, float]], resumed: bool) -> dict[str, Any]:
        history = self.progress.history
        last_epoch = [r for r in history if int(r[1]) == self.config.epochs - 1]
        final = {c: sum(r[i] for r in last_epoch) / len(last_epoch) for i, c in enumerate(STEP_COLUMNS) if i >= 2} if last_epoch else {}
        return {
            "final_loss": final.get("loss_total"),
            "final_loss_cls": final.get("loss_cls"),
            "final_loss_patch": final.get("loss_patch"),
            "first_epoch_loss": _epoch_mean(history, 0, 2),
            "masked_share": final.get("masked_share"),
            "steps": len(history),
            "epochs": self.config.epochs,
            "images_per_second": images_seen / wall if wall > 0 and images_seen else None,
            "wall_seconds": wall,
            "resumed": resumed,
            "throughput": throughput,
            "device": str(self.device),
            "world_size": self.context.world_size,
            "threads": torch.get_num_threads(),
            "knn_during_training": [list(row) for row in self.knn_history],
        }

    # --------------------------------------------------------------- signals
    def _install_signal_handlers(self) -> None:
        self._previous_handlers = {}
        try:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous_handlers[sig] = signal.signal(sig, self._on_signal)
        except ValueError:  # not the main thread (e.g. a notebook worker): no handlers
            self._previous_handlers = {}

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self._stop_signal = signum

    def _restore_signal_handlers(self) -> None:
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)


def run_identity(params: Params, shards: Path) -> dict[str, str]:
    """What a checkpoint must share with this run to be resumed automatically.

    ``params``: every params key the stage's outputs depend on (dvc.yaml lists
    the same keys), as canonical JSON; ``code``: :func:`code_fingerprint`;
    ``data``: SHA-256 of the shard manifest (which holds every shard's hash);
    ``torch``: its version (pinned by requirements.lock).
    """
    values = {k: v for k, v in params_to_dict(params).items() if k in PRETRAIN_SECTIONS}
    # eval_every / eval_k stay in: the checkpoint holds the k-NN curve they shape (the weights do not depend on them)
    values["pretrain"] = {k: v for k, v in values["pretrain"].items() if k not in NOT_COMPUTATION_KEYS}
    values["data"] = {k: v for k, v in values["data"].items() if k not in NOT_OUTPUT_KEYS["data"]}
    manifest = Path(shards) / MANIFEST_NAME
    return {
        "params": json.dumps(values, sort_keys=True),
        "code": code_fingerprint(),
        "data": sha256_file(manifest) if manifest.is_file() else "",
        "torch": str(torch.__version__),
    }


def code_fingerprint() -> str:
    """SHA-256 over exactly the code the pretrain stage runs: the files that are its dvc.yaml code deps.

    A wider hash (say, every ``pipeline/**/*.py``) would change the checkpoint's
    bytes on an edit DVC does not see, and the committed dvc.lock would no longer
    reproduce; ``tests/test_dvc_deps.py`` checks this same list against dvc.yaml.
    """
    return fingerprint(code_files(PRETRAIN_MODULE))


def first_difference(saved: dict[str, str] | None, current: dict[str, str]) -> str | None:
    """A one-line description of the first way ``saved`` differs from ``current``; None when they agree."""
    if not isinstance(saved, dict):
        return "it records no run identity (an older checkpoint format)"
    if saved.get("params") != current["params"]:
        old, new = json.loads(saved.get("params") or "{}"), json.loads(current["params"])
        key, was, now = _first_changed_key(old, new)
        return f"{key}: {was!r} there, {now!r} here"
    if saved.get("code") != current["code"]:
        return "the pipeline's code changed"
    if saved.get("data") != current["data"]:
        return "the shards changed (their manifest differs)"
    if saved.get("torch") != current["torch"]:
        return f"torch {saved.get('torch')} there, {current['torch']} here"
    return None


def _first_changed_key(old: Any, new: Any, prefix: str = "") -> tuple[str, Any, Any]:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                return _first_changed_key(old.get(key), new.get(key), f"{prefix}{key}.")
    return prefix.rstrip("."), old, new


def _epoch_mean(history: list[list[float]], epoch: int, column: int) -> float | None:
    rows = [r[column] for r in history if int(r[1]) == epoch]
    return sum(rows) / len(rows) if rows else None


def write_training_records(summary: dict[str, Any], history: list[list[float]], reports: Path) -> None:
    """DVC plots and metrics files under ``reports``, all deterministic.

    Clock readings (images/s, wall time, throughput per step) go to ``reports/timing``
    through the run record instead (:mod:`pipeline.core.tracking`).
    """
    reports.mkdir(parents=True, exist_ok=True)
    _write_csv(reports / "steps.csv", STEP_COLUMNS, history)
    epochs = sorted({int(r[1]) for r in history})
    epoch_rows = [[e] + [_epoch_mean(history, e, i) for i in range(2, len(STEP_COLUMNS))] for e in epochs]
    _write_csv(reports / "epochs.csv", ("epoch",) + STEP_COLUMNS[2:], epoch_rows)
    # the official code's log.txt: one JSON object per epoch (epoch means, train_ prefix), for grep
    names = {"loss_total": "loss", "loss_cls": "cls", "loss_patch": "patch", "lr": "lr", "weight_decay": "wd"}
    lines = []
    for row in epoch_rows:
        values = dict(zip(STEP_COLUMNS[2:], row[1:]))
        entry = {f"train_{short}": values[column] for column, short in names.items()}
        lines.append(json.dumps({**entry, "epoch": row[0]}))
    atomic_write_text(reports / "log.txt", "".join(line + "\n" for line in lines))
    # always written (header only when pretrain.eval_every is 0), so DVC can declare it
    knn_rows = summary.get("knn_during_training") or []
    _write_csv(reports / "knn.csv", KNN_COLUMNS, knn_rows)
    deterministic = {k: summary[k] for k in ("final_loss", "final_loss_cls", "final_loss_patch", "first_epoch_loss",
                                             "masked_share", "steps", "epochs")}
    deterministic["knn_during_training"] = {str(int(epoch)): top1 for epoch, _step, top1 in knn_rows}
    write_json(deterministic, reports / "metrics.json")


def _write_csv(path: Path, columns: tuple[str, ...], rows: list[Any]) -> None:
    lines = [",".join(columns)]
    for row in rows:
        lines.append(",".join(_format_number(v) for v in row))
    atomic_write_text(path, "\n".join(lines) + "\n")


def _format_number(value: Any) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(value) if isinstance(value, float) else str(value)


def pretrain(params: Params, paths: PretrainPaths, device: torch.device, context: DistContext,
             record: RunRecord | None = None, progress_bar: bool = True) -> dict[str, Any]:
    """Build a :class:`Pretrainer` and run it; returns the summary metrics."""
    configure_determinism()
    trainer = Pretrainer(params, paths, device, context, record=record, progress_bar=progress_bar)
    return trainer.fit()

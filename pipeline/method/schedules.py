"""Per-step and per-epoch training schedules (docs/method.md, "Optimisation" and "Loss").

All schedules are plain float64 numpy arrays computed once up front, so a
value is a pure function of (config, step) and a resumed run reads exactly the
values an uninterrupted one would.

Endpoints of :func:`cosine_schedule`, with ``W = warmup_epochs * steps_per_epoch``
warm-up steps and ``N = epochs * steps_per_epoch - W`` cosine steps:

* step ``0`` is ``warmup_start``; warm-up step ``i < W`` is
  ``warmup_start + (base - warmup_start) * i / W`` (``base`` itself is *not* part of
  the warm-up, so unlike DINO's ``np.linspace`` it is never repeated);
* step ``W`` is ``base``; step ``W + j`` is
  ``final + (base - final) * (1 + cos(pi * j / (N - 1))) / 2``;
* the last step is exactly ``final`` (DINO's ``j / N`` never reaches it, which would
  leave the teacher momentum just short of 1). With ``N == 1`` the single cosine
  step is ``base``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from pipeline.core.config import PretrainConfig


def cosine_schedule(
    base: float,
    final: float,
    epochs: int,
    steps_per_epoch: int,
    warmup_epochs: int = 0,
    warmup_start: float = 0.0,
) -> np.ndarray:
    """Linear warm-up then half-cosine decay, one value per step.

    Returns:
        float64 array of shape ``(epochs * steps_per_epoch,)``; see the module
        docstring for the exact endpoints.
    """
    if epochs < 1 or steps_per_epoch < 1:
        raise ValueError(f"need epochs >= 1 and steps_per_epoch >= 1, got {epochs} and {steps_per_epoch}")
    if not 0 <= warmup_epochs <= epochs:
        raise ValueError(f"warmup_epochs must lie in [0, epochs={epochs}], got {warmup_epochs}")
    total = epochs * steps_per_epoch
    warmup_steps = warmup_epochs * steps_per_epoch
    warmup = warmup_start + (base - warmup_start) * np.arange(warmup_steps, dtype=np.float64) / max(warmup_steps, 1)
    cosine_steps = total - warmup_steps
    if cosine_steps == 1:
        cosine = np.array([base], dtype=np.float64)
    else:
        phase = np.arange(cosine_steps, dtype=np.float64) / max(cosine_steps - 1, 1)
        cosine = final + 0.5 * (base - final) * (1.0 + np.cos(np.pi * phase))
        if cosine_steps:
            # the formula hits base and final only up to rounding; pin both ends exactly
            cosine[0], cosine[-1] = base, final
    schedule = np.concatenate([warmup, cosine]).astype(np.float64)
    assert schedule.shape == (total,)
    return schedule


def teacher_temperature_schedule(warmup_temp: float, temp: float, warmup_epochs: int, epochs: int) -> np.ndarray:
    """Teacher softmax temperature per epoch, as DINO/iBOT.

    ``np.linspace(warmup_temp, temp, warmup_epochs)`` (both ends included, so epoch 0
    is ``warmup_temp`` and epoch ``warmup_epochs - 1`` is already ``temp``), then ``temp``.
    A warm-up longer than the run is cut at ``epochs``.

    Returns:
        float64 array of shape ``(epochs,)``.
    """
    if epochs < 1 or warmup_epochs < 0:
        raise ValueError(f"need epochs >= 1 and warmup_epochs >= 0, got {epochs} and {warmup_epochs}")
    warmup = np.linspace(warmup_temp, temp, warmup_epochs, dtype=np.float64)
    constant = np.full(max(epochs - warmup_epochs, 0), temp, dtype=np.float64)
    return np.concatenate([warmup, constant])[:epochs]


def stretch_to_min_steps(config: PretrainConfig, steps_per_epoch: int) -> PretrainConfig:
    """``config`` with enough epochs for ``config.min_steps`` steps; unchanged when ``epochs`` already gives them.

    A small folder has few steps per epoch, so the same ``epochs`` would train
    too briefly to learn (a 1,400-image folder at batch 128: 44 steps in 4
    epochs). The epoch-valued schedules (``warmup_epochs``,
    ``warmup_teacher_temp_epochs``, ``freeze_last_layer``) scale by the same
    factor, rounded half up, so the run keeps its shape: 4 -> 15 epochs turns
    a 1-epoch warm-up into 4. Checkpoint and k-NN cadences stay in epochs.
    """
    needed = -(-config.min_steps // steps_per_epoch)
    if needed <= config.epochs:
        return config
    factor = needed / config.epochs

    def scaled(epochs: int) -> int:
        return min(needed, math.floor(epochs * factor + 0.5))

    return replace(config, epochs=needed, warmup_epochs=scaled(config.warmup_epochs),
                   warmup_teacher_temp_epochs=scaled(config.warmup_teacher_temp_epochs),
                   freeze_last_layer=scaled(config.freeze_last_layer))


@dataclass(frozen=True, eq=False)
class TrainingSchedules:
    """Every scheduled value of one pre-training run; index by global step or epoch.

    Attributes:
        lr: ``(epochs * steps_per_epoch,)`` AdamW learning rate. Base
            ``config.lr * batch_size_total / 256`` (linear scaling rule on the
            global batch), linear warm-up from 0 over ``config.warmup_epochs``,
            cosine to ``config.min_lr``.
        weight_decay: ``(epochs * steps_per_epoch,)`` cosine from
            ``config.weight_decay`` to ``config.weight_decay_end``, no warm-up
            (applied only to parameter groups that take weight decay).
        momentum: ``(epochs * steps_per_epoch,)`` teacher EMA momentum, cosine from
            ``config.momentum_teacher`` to exactly 1.0 at the last step.
        teacher_temp: ``(epochs,)`` teacher temperature per epoch
            (:func:`teacher_temperature_schedule`).
        base_lr: the scaled peak learning rate.
    """

    lr: np.ndarray
    weight_decay: np.ndarray
    momentum: np.ndarray
    teacher_temp: np.ndarray
    base_lr: float
    epochs: int
    steps_per_epoch: int

    @classmethod
    def from_config(cls, config: PretrainConfig, steps_per_epoch: int, batch_size_total: int) -> TrainingSchedules:
        """Build the schedules; ``batch_size_total`` is the global batch summed over ranks."""
        if batch_size_total < 1:
            raise ValueError(f"batch_size_total must be >= 1, got {batch_size_total}")
        epochs = config.epochs
        base_lr = config.lr * batch_size_total / 256.0
        schedules = cls(
            lr=cosine_schedule(base_lr, config.min_lr, epochs, steps_per_epoch, config.warmup_epochs, 0.0),
            weight_decay=cosine_schedule(config.weight_decay, config.weight_decay_end, epochs, steps_per_epoch),
            momentum=cosine_schedule(config.momentum_teacher, 1.0, epochs, steps_per_epoch),
            teacher_temp=teacher_temperature_schedule(
                config.warmup_teacher_temp, config.teacher_temp, config.warmup_teacher_temp_epochs, epochs
            ),
            base_lr=base_lr,
            epochs=epochs,
            steps_per_epoch=steps_per_epoch,
        )
        for array in (schedules.lr, schedules.weight_decay, schedules.momentum, schedules.teacher_temp):
            array.setflags(write=False)  # shared by the optimiser loop and the loss: nobody may edit them
        return schedules

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

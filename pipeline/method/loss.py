"""The iBOT self-distillation loss (docs/method.md, "Loss"), as the official iBOT code.

Notation: ``G`` global crops, ``L`` local crops, ``B`` images per crop on this
rank, ``K`` output dimension, ``P = h * w`` patch tokens of a global crop. Rows
are crop-major: row ``c * B + b`` is crop ``c`` of image ``b``, globals first.

Differences from the official ``iBOTLoss`` (none changes the optimised value):

* ``forward`` returns the *unweighted* ``cls`` and ``patch`` terms; ``total`` is
  ``lambda1 * cls + lambda2 * patch`` (the official code returns the terms
  already multiplied by their lambda).
* The centres are not updated inside ``forward``: the training loop calls
  :meth:`IBOTLoss.update_center` explicitly after the loss, with the same
  teacher outputs. Keeping it explicit means evaluating the loss (e.g. in a
  test, or twice for debugging) never changes state.
* One temperature (``teacher_temps[epoch]``) and one centre momentum serve both
  the [CLS] and the patch terms, as in the paper's runs.

Options beside the paper's recipe (docs/embedded-benchmark.md):

* ``centering="sinkhorn"`` replaces the EMA centre by Sinkhorn-Knopp
  normalisation of the teacher outputs over the batch (SwAV, DINOv2): each
  prototype receives an equal share of the batch, so the teacher cannot drift to
  one prototype or to uniform at a small batch. The EMA centres are still
  updated (they are state), but not used.
* :func:`koleo_loss` (DINOv2's KoLeo spreading term) is computed by the
  training loop on the student's [CLS] backbone features.

Precision: everything here computes in float32 with autocast off (inputs cast
with ``.float()``), whatever the caller's autocast: softmax at temperature 0.04,
the centres, the Sinkhorn-Knopp sums and KoLeo's nearest-neighbour matrix
product would lose most of their mantissa in bf16. Without autocast no bit changes.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

CENTERINGS = ("ema", "sinkhorn")


def _autocast_off(tensor: Tensor) -> torch.autocast:
    """Autocast disabled on ``tensor``'s device: what runs inside stays float32."""
    return torch.autocast(device_type=tensor.device.type, enabled=False)


class IBOTLoss(nn.Module):
    """[CLS] cross-view distillation + masked patch-token distillation.

    Buffers (saved in the state dict, so a resumed run continues the centres):
        center: ``(1, K)`` EMA of the teacher's [CLS] outputs.
        center_patch: ``(1, 1, K)`` EMA of the teacher's patch outputs.
    """

    center: Tensor
    center_patch: Tensor

    def __init__(
        self,
        out_dim: int,
        num_global_crops: int,
        num_local_crops: int,
        student_temp: float,
        teacher_temps: Sequence[float],
        center_momentum: float = 0.9,
        lambda1: float = 1.0,
        lambda2: float = 1.0,
        centering: str = "ema",
        sinkhorn_iterations: int = 3,
    ) -> None:
        """
        Args:
            teacher_temps: teacher temperature per epoch (``TrainingSchedules.teacher_temp``).
            center_momentum: EMA momentum of both centres.
            centering: ``"ema"`` (the paper's centre) or ``"sinkhorn"`` (Sinkhorn-Knopp over the batch).
            sinkhorn_iterations: Sinkhorn-Knopp iterations (DINOv2: 3).
        """
        super().__init__()
        if num_global_crops < 1 or num_local_crops < 0:
            raise ValueError(f"need >= 1 global and >= 0 local crops, got {num_global_crops} and {num_local_crops}")
        self.num_global_crops = num_global_crops
        self.num_local_crops = num_local_crops
        self.num_crops = num_global_crops + num_local_crops
        self.num_cls_pairs = num_global_crops * (self.num_crops - 1)
        if self.num_cls_pairs == 0:
            raise ValueError("the [CLS] term needs at least two crops (one global plus one more)")
        self.out_dim = out_dim
        self.student_temp = float(student_temp)
        # Python floats, not a buffer: the schedule is derived from the config, not state to checkpoint
        self.teacher_temps = tuple(float(t) for t in teacher_temps)
        self.center_momentum = float(center_momentum)
        self.lambda1 = float(lambda1)
        self.lambda2 = float(lambda2)
        if centering not in CENTERINGS:
            raise ValueError(f"centering must be one of {CENTERINGS}, got {centering!r}")
        self.centering = centering
        self.sinkhorn_iterations = int(sinkhorn_iterations)
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.register_buffer("center_patch", torch.zeros(1, 1, out_dim))

    def teacher_temp(self, epoch: int) -> float:
        """The teacher temperature used at ``epoch``."""
        if not 0 <= epoch < len(self.teacher_temps):
            last = len(self.teacher_temps) - 1
            raise IndexError(f"epoch {epoch} is outside the teacher temperature schedule (0..{last})")
        return self.teacher_temps[epoch]

    def forward(
        self,
        student_cls: Tensor,
        student_patch: Tensor,
        teacher_cls: Tensor,
        teacher_patch: Tensor,
        student_masks: Tensor,
        epoch: int,
    ) -> dict[str, Tensor]:
        """
        Args:
            student_cls: ``((G + L) * B, K)`` student [CLS] logits, globals then locals.
            student_patch: ``(G * B, P, K)`` student patch logits on the *masked* global crops.
            teacher_cls: ``(G * B, K)`` teacher [CLS] logits on the unmasked global crops.
            teacher_patch: ``(G * B, P, K)`` teacher patch logits on the unmasked global crops.
            student_masks: ``(G * B, h, w)`` bool, True where the student saw the mask token.
            epoch: selects the teacher temperature.

        Returns:
            ``{"cls", "patch", "total"}`` float32 scalars; ``cls`` and ``patch`` are unweighted.
        """
        n_global, n_crops = self.num_global_crops, self.num_crops
        batch = teacher_cls.shape[0] // n_global
        self._check_shapes(student_cls, student_patch, teacher_cls, teacher_patch, student_masks, batch)
        temp = self.teacher_temp(epoch)

        # float32 throughout, autocast off: softmax of bf16 logits at temperature 0.04 loses most of its mantissa
        with _autocast_off(student_cls):
            with torch.no_grad():
                t_cls, t_patch = self.teacher_targets(teacher_cls, teacher_patch, temp)
            s_cls = F.log_softmax(student_cls.float() / self.student_temp, dim=-1)
            s_patch = F.log_softmax(student_patch.float() / self.student_temp, dim=-1)

            # [CLS]: every teacher global q against every student crop v != q. Element-wise
            # products (not einsum) so autocast cannot push the contraction into bf16.
            s_cls = s_cls.view(n_crops, batch, -1)
            t_cls = t_cls.view(n_global, batch, -1)
            cls_loss = s_cls.new_zeros(())
            for q in range(n_global):
                per_view = -(t_cls[q].unsqueeze(0) * s_cls).sum(dim=-1).mean(dim=1)  # (n_crops,)
                cls_loss = cls_loss + torch.cat([per_view[:q], per_view[q + 1 :]]).sum()
            cls_loss = cls_loss / self.num_cls_pairs

            # patches: v == q only; mean cross-entropy over the masked tokens of each image
            per_token = -(t_patch * s_patch).sum(dim=-1)  # (G * B, P)
            mask = student_masks.flatten(1).to(per_token.dtype)
            per_image = (per_token * mask).sum(dim=-1) / mask.sum(dim=-1).clamp(min=1.0)
            patch_loss = per_image.view(n_global, batch).mean(dim=1).sum() / n_global

            total = self.lambda1 * cls_loss + self.lambda2 * patch_loss
            return {"cls": cls_loss, "patch": patch_loss, "total": total}

    @torch.no_grad()
    def teacher_targets(self, teacher_cls: Tensor, teacher_patch: Tensor, temp: float) -> tuple[Tensor, Tensor]:
        """Teacher probabilities: ``(G * B, K)`` for [CLS] and ``(G * B, P, K)`` for patches."""
        with _autocast_off(teacher_cls):
            teacher_cls, teacher_patch = teacher_cls.detach().float(), teacher_patch.detach().float()
            if self.centering == "sinkhorn":
                t_cls = sinkhorn_knopp(teacher_cls, temp, self.sinkhorn_iterations)
                t_patch = sinkhorn_knopp(teacher_patch.flatten(0, 1), temp, self.sinkhorn_iterations)
                return t_cls, t_patch.view_as(teacher_patch)
            t_cls = F.softmax((teacher_cls - self.center) / temp, dim=-1)
            t_patch = F.softmax((teacher_patch - self.center_patch) / temp, dim=-1)
            return t_cls, t_patch

    @torch.no_grad()
    def update_center(self, teacher_cls: Tensor, teacher_patch: Tensor) -> None:
        """EMA update of both centres from this step's teacher outputs (all ranks).

        Args:
            teacher_cls: ``(G * B, K)``; teacher_patch: ``(G * B, P, K)``, as given to ``forward``.

        Under torch.distributed the per-rank sums are all-reduced (one collective)
        and divided by ``rows * world_size``, so every rank holds the same centre.
        """
        with _autocast_off(teacher_cls):
            cls_sum = teacher_cls.detach().float().sum(dim=0)  # (K,)
            patch_sum = teacher_patch.detach().float().mean(dim=1).sum(dim=0)  # (K,)
            sums = torch.stack([cls_sum, patch_sum])  # (2, K)
        rows = teacher_cls.shape[0]
        world_size = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums)
            world_size = dist.get_world_size()
        batch_center = sums / (rows * world_size)
        m = self.center_momentum
        self.center.copy_(self.center * m + batch_center[0].view(1, -1) * (1 - m))
        self.center_patch.copy_(self.center_patch * m + batch_center[1].view(1, 1, -1) * (1 - m))

    def _check_shapes(
        self, student_cls: Tensor, student_patch: Tensor, teacher_cls: Tensor, teacher_patch: Tensor,
        student_masks: Tensor, batch: int,
    ) -> None:
        # Shapes only (no device sync): a crop-order mix-up would otherwise train silently wrong.
        n_global, n_crops, k = self.num_global_crops, self.num_crops, self.out_dim
        rows = n_global * batch
        patches = teacher_patch.shape[1] if teacher_patch.dim() == 3 else -1
        expected = {
            "teacher_cls": (teacher_cls, (rows, k)),
            "student_cls": (student_cls, (n_crops * batch, k)),
            "teacher_patch": (teacher_patch, (rows, patches, k)),
            "student_patch": (student_patch, (rows, patches, k)),
        }
        if teacher_cls.shape[0] != rows or batch == 0:
            raise ValueError(
                f"teacher_cls has {teacher_cls.shape[0]} rows, not a positive multiple of {n_global} global crops"
            )
        for name, (tensor, shape) in expected.items():
            if tuple(tensor.shape) != shape:
                raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {shape} (B={batch}, K={k})")
        m = student_masks.shape
        if len(m) != 3 or m[0] != rows or m[1] * m[2] != patches:
            raise ValueError(f"student_masks has shape {tuple(m)}, expected ({rows}, h, w) with h*w={patches}")


@torch.no_grad()
def sinkhorn_knopp(logits: Tensor, temp: float, iterations: int = 3) -> Tensor:
    """Balanced soft assignment of ``(N, K)`` teacher logits to ``K`` prototypes (SwAV, DINOv2).

    Alternately normalises prototype columns (each gets mass ``1/K``) and sample
    rows (each gets mass ``1/N``); the result's rows sum to 1. Under
    torch.distributed the column sums are all-reduced, so the balance holds over
    the global batch. Returns ``(N, K)`` float32.
    """
    with _autocast_off(logits):
        distributed = dist.is_available() and dist.is_initialized()
        world = dist.get_world_size() if distributed else 1
        # shift by the global max before exp: identical maths, no overflow at temperature 0.04
        logits = logits.float()
        shift = logits.max()
        if distributed:
            dist.all_reduce(shift, op=dist.ReduceOp.MAX)
        q = torch.exp((logits - shift) / temp).t()  # (K, N)
        rows, columns = q.shape[0], q.shape[1] * world
        total = q.sum()
        if distributed:
            dist.all_reduce(total)
        q = q / total
        for _ in range(iterations):
            per_prototype = q.sum(dim=1, keepdim=True)
            if distributed:
                dist.all_reduce(per_prototype)
            q = q / per_prototype / rows
            q = q / q.sum(dim=0, keepdim=True) / columns
        return (q * columns).t()


def koleo_loss(features: Tensor, eps: float = 1e-8) -> Tensor:
    """Kozachenko-Leonenko spreading term (DINOv2): ``-mean log(distance to nearest neighbour)``.

    Args:
        features: ``(B, D)``; L2-normalised here. Rows are compared within this batch only.

    Returns:
        a float32 scalar; lower when the rows spread over the sphere.
    """
    with _autocast_off(features):
        x = F.normalize(features.float(), dim=-1, eps=eps)
        with torch.no_grad():
            similarity = x @ x.t()
            similarity.fill_diagonal_(-2.0)  # never one's own neighbour
            nearest = similarity.argmax(dim=1)
        distance = F.pairwise_distance(x, x[nearest], p=2, eps=eps)
        return -torch.log(distance + eps).mean()

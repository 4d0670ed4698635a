"""FLOPs of one pre-training step: counted by torch's FlopCounterMode, cross-checked analytically.

Counted: matrix products only (linear layers, the patch-embedding convolution,
attention), forward and backward, as torch.utils.flop_counter does; elementwise
work (norms, GELU, softmax in the loss, the optimiser) is not, which is the
usual convention for model FLOPs utilisation (MFU). Conventions that follow
from the counter and that :func:`analytic_step_flops` reproduces:

* a linear layer's backward is 2x its forward (input and weight gradients);
* the patch embedding's backward is 1x (the images need no gradient);
* attention's backward is 2.5x its forward (the counter, like flash attention,
  recomputes the scores).

torch's counter knows the CUDA attention kernels but not the CPU one
(``_scaled_dot_product_flash_attention_for_cpu``); :func:`flop_counter` adds it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count


def _cpu_attention(query_shape: Any, key_shape: Any, value_shape: Any, *_: Any, **__: Any) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_attention_backward(grad_shape: Any, query_shape: Any, key_shape: Any, value_shape: Any, *_: Any, **__: Any) -> int:
    return sdpa_backward_flop_count(grad_shape, query_shape, key_shape, value_shape)


_aten = torch.ops.aten
CPU_ATTENTION = {  # same formulas as torch's for the CUDA kernels
    _aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention,
    _aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward,
}


def flop_counter() -> FlopCounterMode:
    """A silent FlopCounterMode that also counts CPU fused attention."""
    return FlopCounterMode(display=False, custom_mapping=dict(CPU_ATTENTION))


def counted_by_op(counter: FlopCounterMode) -> dict[str, int]:
    return {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}


@dataclass(frozen=True)
class NetworkDims:
    """What the FLOPs of an iBOT network depend on."""

    patch_size: int
    embed_dim: int
    depth: int
    mlp_hidden: int
    prefix_tokens: int
    head_hidden: int
    head_bottleneck: int
    out_dim: int

    @classmethod
    def of(cls, network: torch.nn.Module) -> "NetworkDims":
        """Read the dims off a built :class:`pipeline.method.model.IBOTNetwork` (timm fills what params leave unset)."""
        vit, head = network.backbone.vit, network.head
        return cls(patch_size=vit.patch_embed.patch_size[0], embed_dim=vit.embed_dim, depth=len(vit.blocks),
                   mlp_hidden=vit.blocks[0].mlp.fc1.out_features, prefix_tokens=vit.num_prefix_tokens,
                   head_hidden=head.mlp[0].out_features, head_bottleneck=head.mlp[-1].out_features,
                   out_dim=head.last_layer.out_features)


def backbone_forward_flops(dims: NetworkDims, image_size: int) -> dict[str, int]:
    """Forward FLOPs of the ViT for one square image: patch embedding, linear layers, attention."""
    patches = (image_size // dims.patch_size) ** 2
    tokens = patches + dims.prefix_tokens
    d = dims.embed_dim
    embed = 2 * patches * (3 * dims.patch_size**2) * d
    linear = dims.depth * 2 * tokens * (3 * d * d + d * d + 2 * d * dims.mlp_hidden)  # qkv, proj, fc1 + fc2
    attention = dims.depth * 2 * (2 * tokens * tokens * d)  # q @ k^T and scores @ v, all heads
    return {"embed": embed, "linear": linear, "attention": attention, "tokens": tokens}


def head_forward_flops(dims: NetworkDims, tokens: int) -> int:
    """Forward FLOPs of the iBOT head (3-layer MLP + last layer) on ``tokens`` tokens."""
    per_token = dims.embed_dim * dims.head_hidden + dims.head_hidden**2 + dims.head_hidden * dims.head_bottleneck
    per_token += dims.head_bottleneck * dims.out_dim
    return 2 * tokens * per_token


def analytic_step_flops(dims: NetworkDims, batch: int, global_size: int, local_size: int, local_number: int,
                        cls_attention: bool) -> dict[str, int]:
    """FLOPs of one :meth:`Pretrainer.train_step` on ``batch`` images (2 global + ``local_number`` local crops).

    Student: forward + backward on the masked globals (head on every token) and
    the locals (head on [CLS] only). Teacher: forward on the globals (head on
    every token), plus the [CLS]-attention row rebuilt for AttMask.
    """
    g = backbone_forward_flops(dims, global_size)
    l = backbone_forward_flops(dims, local_size)
    globals_, locals_ = 2 * batch, local_number * batch
    backbone_g = g["embed"] + g["linear"] + g["attention"]
    backbone_l = l["embed"] + l["linear"] + l["attention"]
    head_g = head_forward_flops(dims, g["tokens"] - dims.prefix_tokens + 1)  # [CLS] + patches (registers skipped)
    head_l = head_forward_flops(dims, 1)
    student_forward = globals_ * (backbone_g + head_g) + locals_ * (backbone_l + head_l)
    student_backward = globals_ * (g["embed"] + 2 * g["linear"] + 2.5 * g["attention"] + 2 * head_g)
    student_backward += locals_ * (l["embed"] + 2 * l["linear"] + 2.5 * l["attention"] + 2 * head_l)
    teacher = globals_ * (backbone_g + head_g)
    if cls_attention:
        teacher += globals_ * 2 * g["tokens"] * dims.embed_dim  # one query row against every key, all heads
    total = student_forward + student_backward + teacher
    return {"student_forward": int(student_forward), "student_backward": int(student_backward),
            "teacher_forward": int(teacher), "total": int(total)}


def mfu(flops_per_step: float, step_seconds: float, peak_tflops: float) -> float:
    """Model FLOPs utilisation: achieved FLOP/s over the device's peak FLOP/s (a fraction, not percent)."""
    if step_seconds <= 0 or peak_tflops <= 0:
        raise ValueError(f"need positive step time and peak, got {step_seconds} s and {peak_tflops} TFLOP/s")
    return flops_per_step / step_seconds / (peak_tflops * 1e12)


def count_train_step(trainer: Any, crops: list[torch.Tensor], epoch: int = 0, step: int = 0) -> dict[str, Any]:
    """Run one ``train_step`` under the counter; returns total FLOPs and the split by op."""
    with flop_counter() as counter:
        trainer.train_step(crops, epoch=epoch, step=step)
    return {"total": int(counter.get_total_flops()), "by_op": counted_by_op(counter)}

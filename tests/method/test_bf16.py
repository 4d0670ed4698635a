"""bf16 autocast: the head's prototype layer and everything from the logits to the loss stay float32.

CUDA runs pre-train under ``torch.autocast("cuda", dtype=torch.bfloat16)``; CPU
autocast has the same lower-precision list for what matters here (linear,
matmul), so ``torch.autocast("cpu", dtype=torch.bfloat16)`` exercises the same
casts without a GPU.
"""
from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from pipeline.core.config import ModelConfig
from pipeline.method.loss import IBOTLoss, koleo_loss, sinkhorn_knopp
from pipeline.method.model import build_network

CFG = ModelConfig(arch="vit_tiny_patch16_224", patch_size=4, img_size=16, depth=2, embed_dim=32, num_heads=2,
                  out_dim=64, head_hidden_dim=64, head_bottleneck_dim=32)
# bf16 keeps 8 significant bits (relative rounding up to 2^-8 = 0.4%) in every matmul of the backbone and the
# head's MLP; the loss averages many cross-entropies, so its error stays below that: at most 0.19% (cls),
# 0.09% (patch) and 0.13% (KoLeo) over 10 seeds and both centrings. 1% leaves a 5x margin on the worst one;
# what must be float32 is asserted op by op, not through this bound.
BF16_RTOL = 1e-2


def _bf16() -> torch.autocast:
    return torch.autocast("cpu", dtype=torch.bfloat16)


def _networks(seed: int = 0):
    torch.manual_seed(seed)
    student, teacher = build_network(CFG, 0.0), build_network(CFG, 0.0)
    with torch.no_grad():  # a teacher a little away from the student, as after some EMA steps
        for t, s in zip(teacher.parameters(), student.parameters()):
            t.copy_(s + 0.02 * torch.randn_like(s))
    return student, teacher


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(8, 3, 16, 16, generator=g), torch.randn(8, 3, 8, 8, generator=g),
            torch.rand(8, 4, 4, generator=g) < 0.4)  # 2 globals x 4 images, 2 locals x 4, masks


def _losses(student, teacher, batch, centering: str) -> dict[str, torch.Tensor]:
    """One training-like forward, as Pretrainer.train_step: teacher, student, iBOT loss, KoLeo."""
    globals_, locals_, masks = batch
    loss = IBOTLoss(CFG.out_dim, 2, 2, 0.1, [0.04], centering=centering)
    with torch.no_grad():
        target = teacher(globals_, return_cls_attention=True)
    prediction = student(globals_, masks, locals_)
    out = loss(prediction["cls"], prediction["patch"], target["cls"], target["patch"], masks, 0)
    out["koleo"] = sum(koleo_loss(f) for f in prediction["cls_features"].chunk(2)) / 2
    return out


class _FloatDtypes(TorchDispatchMode):
    """(op, dtype) of every floating tensor an op reads or writes."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[tuple[str, torch.dtype]] = set()

    def __torch_dispatch__(self, func: torch._ops.OpOverload, types: tuple[type, ...], args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves((args, kwargs, out)):
            if isinstance(leaf, torch.Tensor) and leaf.is_floating_point():
                self.seen.add((func.overloadpacket.__name__, leaf.dtype))
        return out


def _not_float32(seen: set[tuple[str, torch.dtype]]) -> set[tuple[str, torch.dtype]]:
    # the .float() casts themselves read bf16: every other op must see float32 only
    return {(op, dtype) for op, dtype in seen if dtype != torch.float32 and op != "_to_copy"}


@pytest.mark.parametrize("centering", ["ema", "sinkhorn"])
def test_head_last_layer_and_loss_compute_in_float32_under_autocast(centering):
    student, teacher = _networks()
    globals_, locals_, masks = _batch()
    layer_dtypes: list[torch.dtype] = []
    mlp_dtypes: list[torch.dtype] = []
    for network in (student, teacher):
        network.head.last_layer.register_forward_hook(
            lambda _m, args, out: layer_dtypes.extend([args[0].dtype, out.dtype]))
        network.head.mlp.register_forward_hook(lambda _m, _args, out: mlp_dtypes.append(out.dtype))
    loss = IBOTLoss(CFG.out_dim, 2, 2, 0.1, [0.04], centering=centering)
    loss_inputs: list[torch.dtype] = []
    loss.register_forward_pre_hook(lambda _m, args: loss_inputs.extend(a.dtype for a in args[:4]))

    with _bf16():
        with torch.no_grad():
            target = teacher(globals_, return_cls_attention=True)
        prediction = student(globals_, masks, locals_)
        with _FloatDtypes() as recorder:
            out = loss(prediction["cls"], prediction["patch"], target["cls"], target["patch"], masks, 0)
            koleo = koleo_loss(prediction["cls_features"])
        # (the backward of these ops runs in their forward dtypes; the backbone's backward is bf16 by design)
        (out["total"] + koleo).backward()
        with _FloatDtypes() as update:
            loss.update_center(target["cls"], target["patch"])

    assert set(mlp_dtypes) == {torch.bfloat16}  # autocast is on up to the head's MLP...
    assert layer_dtypes and set(layer_dtypes) == {torch.float32}  # ...and off from its L2 norm on
    assert loss_inputs == [torch.float32] * 4
    assert all(v.dtype == torch.float32 for v in (*out.values(), koleo, loss.center, loss.center_patch))
    assert not _not_float32(recorder.seen), sorted(map(str, _not_float32(recorder.seen)))
    assert ("mm", torch.float32) in recorder.seen  # KoLeo's similarity matrix product, float32
    assert not _not_float32(update.seen)


def test_loss_koleo_and_sinkhorn_ignore_autocast():
    g = torch.Generator().manual_seed(3)
    student_cls, teacher_cls = torch.randn(16, 64, generator=g), torch.randn(8, 64, generator=g)
    student_patch, teacher_patch = torch.randn(8, 16, 64, generator=g), torch.randn(8, 16, 64, generator=g)
    masks = torch.rand(8, 4, 4, generator=g) < 0.4
    features = torch.randn(8, 32, generator=g)
    loss = IBOTLoss(64, 2, 2, 0.1, [0.04], centering="sinkhorn")

    def run() -> list[torch.Tensor]:
        out = loss(student_cls, student_patch, teacher_cls, teacher_patch, masks, 0)
        return [*out.values(), koleo_loss(features), sinkhorn_knopp(teacher_cls, 0.04)]

    plain = run()
    with _bf16(), _FloatDtypes() as recorder:
        autocast = run()
    assert not _not_float32(recorder.seen), sorted(map(str, _not_float32(recorder.seen)))  # e.g. KoLeo's matmul
    for a, b in zip(plain, autocast):
        assert b.dtype == torch.float32 and torch.equal(a, b)


def test_float32_head_is_the_plain_computation():
    """No autocast (every CPU run): the autocast-off block changes no bit."""
    student, _ = _networks()
    tokens = torch.randn(3, 1 + 16, CFG.embed_dim, generator=torch.Generator().manual_seed(5))
    head = student.head
    cls_out, patch_out = head(tokens)
    z = F.normalize(head.mlp(tokens), dim=-1)
    assert torch.equal(cls_out, head.last_layer(z[:, 0])) and torch.equal(patch_out, head.last_layer(z[:, 1:]))


@pytest.mark.parametrize("centering", ["ema", "sinkhorn"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bf16_loss_agrees_with_float32(centering, seed):
    student, teacher = _networks(seed)
    batch = _batch(seed)
    reference = _losses(student, teacher, batch, centering)
    with _bf16():
        low = _losses(student, teacher, batch, centering)
    for name in ("cls", "patch", "total", "koleo"):
        assert low[name].dtype == torch.float32
        torch.testing.assert_close(low[name], reference[name], rtol=BF16_RTOL, atol=0.0, msg=name)

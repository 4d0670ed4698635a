"""torch.compile (pretrain.compile) compiles the networks once per crop shape, without graph breaks.

As :class:`pipeline.method.training.Pretrainer` does: ``nn.Module.compile(backend=..., dynamic=False)``
on the student and the teacher. The ``eager`` backend keeps this fast: Dynamo's
tracing, guards and graph breaks are the same whatever the backend.
"""
from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from pipeline.core.config import ModelConfig
from pipeline.method.loss import IBOTLoss, koleo_loss
from pipeline.method.model import IBOTNetwork, build_network

CFG = ModelConfig(arch="vit_tiny_patch16_224", patch_size=4, img_size=16, depth=2, embed_dim=32, num_heads=2,
                  out_dim=64, head_hidden_dim=48, head_bottleneck_dim=16)
# (global, local) crop sizes of the three steps: the first shape twice, then a second one
STEP_SIZES = [(16, 8), (16, 8), (20, 12)]


@pytest.fixture
def fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
    counters.clear()


def _networks() -> tuple[IBOTNetwork, IBOTNetwork]:
    torch.manual_seed(0)
    student, teacher = build_network(CFG, drop_path_rate=0.0), build_network(CFG, drop_path_rate=0.0)
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False).eval()
    return student, teacher


def _step(student: IBOTNetwork, teacher: IBOTNetwork, sizes: tuple[int, int], seed: int) -> torch.Tensor:
    """Teacher attention -> masks -> student on masked globals + locals -> iBOT loss + KoLeo -> backward."""
    g = torch.Generator().manual_seed(seed)
    global_size, local_size = sizes
    globals_ = torch.randn(4, 3, global_size, global_size, generator=g)
    locals_ = torch.randn(4, 3, local_size, local_size, generator=g)
    grid = global_size // 4
    with torch.no_grad():
        target = teacher(globals_, return_cls_attention=True)
    # AttMask-High-like: the most attended third of the patches (the attention reaches the masks)
    order = target["cls_attention"].argsort(dim=1, descending=True, stable=True)
    masks = torch.zeros_like(target["cls_attention"], dtype=torch.bool)
    masks.scatter_(1, order[:, : grid * grid // 3], True)
    masks = masks.view(-1, grid, grid)
    prediction = student(globals_, masks=masks, local_crops=locals_)
    loss = IBOTLoss(CFG.out_dim, 2, 2, 0.1, [0.04])
    out = loss(prediction["cls"], prediction["patch"], target["cls"], target["patch"], masks, 0)
    total = out["total"] + 0.1 * koleo_loss(prediction["cls_features"])
    student.zero_grad(set_to_none=True)
    total.backward()
    return total.detach()


def test_compiles_once_per_crop_shape_without_graph_breaks(fresh_dynamo):
    eager_student, eager_teacher = _networks()
    student, teacher = _networks()
    student.compile(backend="eager", dynamic=False)
    teacher.compile(backend="eager", dynamic=False)

    for seed, sizes in enumerate(STEP_SIZES):
        compiled = _step(student, teacher, sizes, seed)
        reference = _step(eager_student, eager_teacher, sizes, seed)
        assert torch.equal(compiled, reference), f"step {seed}: compiled loss differs from eager"
        for (name, p), q in zip(student.named_parameters(), eager_student.parameters()):
            assert (p.grad is None) == (q.grad is None) and (p.grad is None or torch.equal(p.grad, q.grad)), name

    shapes = len(set(STEP_SIZES))
    assert dict(counters["graph_break"]) == {}, dict(counters["graph_break"])
    # one compiled frame per network and crop shape: no recompiles from hooks or other per-call state
    assert counters["frames"]["ok"] == counters["frames"]["total"] == 2 * shapes, dict(counters["frames"])
    assert counters["stats"]["unique_graphs"] == 2 * shapes, dict(counters["stats"])

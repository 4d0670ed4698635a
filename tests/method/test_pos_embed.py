"""pipeline.method.pos_embed: timm's _pos_embed, bit for bit forward, with a deterministic resize backward."""
from __future__ import annotations

import copy
from typing import Any

import pytest
import timm
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from pipeline.method import pos_embed as pe

TINY = dict(patch_size=4, img_size=32, depth=1, embed_dim=32, num_heads=2)  # an 8 x 8 grid
GRIDS = [(8, 8), (4, 4), (2, 2), (6, 3), (3, 5), (12, 10)]  # the model's, smaller, non-square, larger
GRID_IDS = ["equal", "smaller", "tiny", "non_square", "non_square_odd", "larger"]
VARIANTS = [{}, {"reg_tokens": 2}, {"no_embed_class": True}, {"no_embed_class": True, "reg_tokens": 2},
            {"class_token": False, "global_pool": "avg"}]
VARIANT_IDS = ["cls", "registers", "no_embed_class", "no_embed_class_registers", "no_prefix"]


def _vit(dynamic: bool = True, **kwargs) -> timm.models.VisionTransformer:
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, dynamic_img_size=dynamic,
                            **{**TINY, **kwargs})
    with torch.no_grad():
        vit.pos_embed.normal_()  # timm's init is std 0.02: make every position count
    return vit.eval()


def _patches(grid: tuple[int, int], batch: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, *grid, 32, generator=torch.Generator().manual_seed(seed))  # NHWC


def _pos_embed_grad(fn, vit, x: torch.Tensor, seed: int = 2) -> torch.Tensor:
    out = fn(x)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    return torch.autograd.grad(out, vit.pos_embed, upstream)[0]


class _Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func: torch._ops.OpOverload, types: tuple[type, ...], args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kwargs", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("grid", GRIDS, ids=GRID_IDS)
def test_forward_equals_timm_bit_for_bit(kwargs, grid):
    vit = _vit(**kwargs)
    x = _patches(grid)
    with torch.no_grad():
        ours, theirs = pe.pos_embed(vit, x), vit._pos_embed(x)
    assert ours.shape == (3, vit.num_prefix_tokens + grid[0] * grid[1], 32)
    assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)


def test_forward_equals_timm_under_bf16_autocast_and_without_dynamic_size():
    vit = _vit()
    x = _patches((4, 6))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(pe.pos_embed(vit, x.bfloat16()), vit._pos_embed(x.bfloat16()))
    static = _vit(dynamic=False)
    flat = _patches((8, 8)).flatten(1, 2)  # (B, P, D): patch_embed's output without dynamic_img_size
    with torch.no_grad():
        assert torch.equal(pe.pos_embed(static, flat), static._pos_embed(flat))


def test_pos_drop_draws_as_timm():
    vit = _vit(pos_drop_rate=0.5).train()
    x = _patches((4, 4))
    torch.manual_seed(3)
    ours = pe.pos_embed(vit, x)
    torch.manual_seed(3)
    assert torch.equal(ours, vit._pos_embed(x))
    assert (ours == 0).any()


def test_equal_grid_is_not_resized(monkeypatch):
    vit = _vit()
    monkeypatch.setattr(pe._PosEmbedResize, "apply", lambda *a: pytest.fail("resized at the model's own grid"))
    with torch.no_grad():
        pe.pos_embed(vit, _patches((8, 8)))
    assert pe.resample_pos_embed(vit.pos_embed, (8, 8), (8, 8), 1) is vit.pos_embed


@pytest.mark.parametrize("kwargs", VARIANTS[:3], ids=VARIANT_IDS[:3])
@pytest.mark.parametrize("grid", GRIDS[1:], ids=GRID_IDS[1:])
def test_gradient_equals_timm_autograd_and_repeats_bit_for_bit(kwargs, grid):
    vit = _vit(**kwargs)
    x = _patches(grid)
    theirs = _pos_embed_grad(vit._pos_embed, vit, x)
    ours = _pos_embed_grad(lambda t: pe.pos_embed(vit, t), vit, x)
    again = _pos_embed_grad(lambda t: pe.pos_embed(vit, t), vit, x)
    # both sum the same products; only the order may differ: float32 rounding, ~1e-7 relative
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6 * theirs.abs().max().item())
    assert torch.equal(ours, again)
    prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
    # the prefix rows are not resized: their gradient is the plain sum over the batch, as timm's
    assert torch.equal(ours[:, :prefix], theirs[:, :prefix])


def test_backward_is_one_matrix_product_not_the_antialiased_kernel():
    vit = _vit()
    x = _patches((3, 5))
    out = pe.pos_embed(vit, x)
    with _Ops() as ops:
        out.sum().backward()
    assert "_upsample_bicubic2d_aa_backward" not in ops.names
    assert ops.names & {"mm", "bmm"}

    with _Ops() as timm_ops:
        vit._pos_embed(x).sum().backward()
    assert "_upsample_bicubic2d_aa_backward" in timm_ops.names  # what the custom backward replaces


def test_resize_matrix_is_the_interpolation_and_is_cached():
    grid = torch.randn(1, 8 * 8, 5, dtype=torch.float64)
    transposed = pe.resize_matrix((8, 8), (3, 5), torch.float64, torch.device("cpu"))
    assert transposed.shape == (64, 15)
    image = grid.reshape(1, 8, 8, 5).permute(0, 3, 1, 2)
    expected = F.interpolate(image, size=(3, 5), mode="bicubic", antialias=True).permute(0, 2, 3, 1).reshape(1, 15, 5)
    torch.testing.assert_close(transposed.t() @ grid[0], expected[0], rtol=1e-12, atol=1e-12)
    assert pe.resize_matrix((8, 8), (3, 5), torch.float64, torch.device("cpu")) is transposed


@pytest.mark.parametrize("new_size", [(2, 3), (5, 7)], ids=["down", "up"])
def test_gradcheck_float64(new_size):
    grid = torch.randn(1, 3 * 4, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: pe._PosEmbedResize.apply(t, (3, 4), new_size), (grid,))


def test_use_deterministic_pos_embed_on_a_timm_classifier():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, dynamic_img_size=True, **TINY)
    images = torch.randn(2, 3, 24, 20, generator=torch.Generator().manual_seed(4))  # a 6 x 5 grid
    plain_out = model(images)
    plain_grad = torch.autograd.grad(plain_out.square().sum(), model.pos_embed)[0]
    keys = list(model.state_dict())

    assert pe.use_deterministic_pos_embed(model) is model
    out = model(images)
    assert torch.equal(out, plain_out)
    grad = torch.autograd.grad(out.square().sum(), model.pos_embed)[0]
    torch.testing.assert_close(grad, plain_grad, rtol=1e-5, atol=1e-7)
    assert list(model.state_dict()) == keys

    copied = copy.deepcopy(model)  # the installed function follows the copy, not the original
    with torch.no_grad():
        copied.pos_embed.add_(1.0)
        assert not torch.equal(copied(images), plain_out)
        assert torch.equal(model(images), plain_out)
    with pytest.raises(TypeError, match="VisionTransformer"):
        pe.use_deterministic_pos_embed(torch.nn.Linear(2, 2))

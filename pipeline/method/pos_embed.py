"""timm's ViT position embedding with a resize whose backward is deterministic on every device.

With ``dynamic_img_size=True`` timm's ``VisionTransformer._pos_embed`` resamples
``pos_embed`` to each crop's patch grid with ``resample_abs_pos_embed``, i.e.
``F.interpolate(mode="bicubic", antialias=True)``. Its CUDA backward
(``_upsample_bicubic2d_aa_backward``) accumulates with atomicAdd and raises under
``torch.use_deterministic_algorithms(True)``: every local crop of pre-training
and every fine-tuning crop whose grid differs from the model's would fail.

:func:`pos_embed` does what ``_pos_embed`` does (same prefix tokens, same
``no_embed_class`` order, same early-out when the grid is the model's, then
``pos_drop``), with the resize as :class:`_PosEmbedResize`: the forward is
timm's very ``F.interpolate`` call (same bytes); the backward is ``Mᵀ · grad``,
one matrix product, where ``M`` is the linear map of that interpolation from
the old grid to the new one, obtained by interpolating an identity basis. One
code path on CPU and CUDA.

:func:`use_deterministic_pos_embed` installs it on a plain timm model (the
fine-tuning classifier) whose own ``forward`` should keep running.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

__all__ = ["pos_embed", "resample_pos_embed", "resize_matrix", "use_deterministic_pos_embed"]

# timm's resample_abs_pos_embed defaults, the ones _pos_embed uses
_MODE = "bicubic"
_ANTIALIAS = True

# (old grid, new grid, dtype, device) -> Mᵀ (old P, new P). A handful of entries per run:
# one per distinct crop grid (ViT-S/16 at 224: at most 196 x 196 floats each).
_MATRICES: dict[tuple[tuple[int, int], tuple[int, int], torch.dtype, torch.device], Tensor] = {}


def _interpolate(grid: Tensor, old_size: tuple[int, int], new_size: tuple[int, int]) -> Tensor:
    """``(N, oh * ow, C)`` tokens in raster order -> ``(N, nh * nw, C)``, as timm resamples them."""
    n, _, channels = grid.shape
    image = grid.reshape(n, old_size[0], old_size[1], channels).permute(0, 3, 1, 2)
    image = F.interpolate(image, size=new_size, mode=_MODE, align_corners=None, antialias=_ANTIALIAS)
    return image.permute(0, 2, 3, 1).reshape(n, -1, channels)


def _build_matrix(old_size: tuple[int, int], new_size: tuple[int, int], dtype: torch.dtype,
                  device: torch.device) -> Tensor:
    old_tokens = old_size[0] * old_size[1]
    with torch.no_grad(), torch.autocast(device_type=device.type, enabled=False):
        # column k of the identity is a one-hot "image" at old position k: its resize is M's column k
        basis = torch.eye(old_tokens, dtype=dtype, device=device).unsqueeze(0)  # (1, P_old, C=P_old)
        return _interpolate(basis, old_size, new_size)[0].t().contiguous()  # (P_old, P_new)


def resize_matrix(old_size: tuple[int, int], new_size: tuple[int, int], dtype: torch.dtype,
                  device: torch.device) -> Tensor:
    """``Mᵀ`` ``(oh * ow, nh * nw)``: the transpose of timm's resize as a linear map on raster-order tokens."""
    if torch.compiler.is_compiling():
        # traced into the graph instead: a Python cache would hold tracing (fake) tensors
        return _build_matrix(old_size, new_size, dtype, device)
    key = (tuple(old_size), tuple(new_size), dtype, device)
    matrix = _MATRICES.get(key)
    if matrix is None:
        matrix = _MATRICES[key] = _build_matrix(old_size, new_size, dtype, device)
    return matrix


class _PosEmbedResize(torch.autograd.Function):
    """``(1, oh * ow, C)`` -> ``(1, nh * nw, C)``: timm's bicubic antialiased resize, backward ``Mᵀ · grad``."""

    @staticmethod
    def forward(ctx, grid: Tensor, old_size: tuple[int, int], new_size: tuple[int, int]) -> Tensor:
        ctx.sizes = (old_size, new_size)
        return _interpolate(grid, old_size, new_size)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        old_size, new_size = ctx.sizes
        transposed = resize_matrix(old_size, new_size, grad.dtype, grad.device)
        # autocast off: a gradient of float32 parameters must not be rounded to bf16
        with torch.autocast(device_type=grad.device.type, enabled=False):
            return torch.matmul(transposed, grad), None, None  # (P_old, P_new) @ (1, P_new, C)


def resample_pos_embed(posemb: Tensor, new_size: tuple[int, int], old_size: tuple[int, int],
                       num_prefix_tokens: int) -> Tensor:
    """timm's ``resample_abs_pos_embed`` (bicubic, antialiased) with :class:`_PosEmbedResize`.

    Args:
        posemb: ``(1, prefix + oh * ow, D)``; the first ``num_prefix_tokens`` rows are not resized.
        new_size, old_size: ``(h, w)`` patch grids.

    Returns:
        ``(1, prefix + nh * nw, D)`` in ``posemb``'s dtype (resized in float32, as timm);
        ``posemb`` itself when the grid is unchanged.
    """
    new_tokens = new_size[0] * new_size[1] + num_prefix_tokens
    if new_tokens == posemb.shape[1] and tuple(old_size) == tuple(new_size):
        return posemb
    prefix, grid = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
    resized = _PosEmbedResize.apply(grid.float(), tuple(old_size), tuple(new_size)).to(posemb.dtype)
    return torch.cat([prefix, resized], dim=1) if num_prefix_tokens else resized


def pos_embed(vit: VisionTransformer, x: Tensor) -> Tensor:
    """``vit._pos_embed(x)`` with the deterministic resize: prefix tokens + position embedding, then ``pos_drop``.

    Args:
        vit: a timm ``VisionTransformer``.
        x: patch embeddings ``(B, h, w, D)`` (NHWC, ``dynamic_img_size=True``) or ``(B, P, D)``.

    Returns:
        ``(B, prefix + h * w, D)``: [CLS], then register tokens, then the patches in raster order.
    """
    to_cat = []
    if vit.cls_token is not None:
        to_cat.append(vit.cls_token.expand(x.shape[0], -1, -1))
    if vit.reg_token is not None:
        to_cat.append(vit.reg_token.expand(x.shape[0], -1, -1))
    if vit.pos_embed is None:
        return torch.cat(to_cat + [x.view(x.shape[0], -1, x.shape[-1])], dim=1)  # timm skips pos_drop here too

    if vit.dynamic_img_size:
        batch, h, w, channels = x.shape
        embedding = resample_pos_embed(
            vit.pos_embed, new_size=(h, w), old_size=tuple(vit.patch_embed.grid_size),
            num_prefix_tokens=0 if vit.no_embed_class else vit.num_prefix_tokens,
        )
        x = x.view(batch, -1, channels)
    else:
        embedding = vit.pos_embed

    if vit.no_embed_class:
        # the embedding covers the patches only: add, then prepend the prefix tokens (DeiT-3)
        x = x + embedding
        if to_cat:
            x = torch.cat(to_cat + [x], dim=1)
    else:
        if to_cat:
            x = torch.cat(to_cat + [x], dim=1)
        x = x + embedding
    return vit.pos_drop(x)


def use_deterministic_pos_embed(vit: VisionTransformer) -> VisionTransformer:
    """Make ``vit``'s own forward (``forward_features``, ``forward_intermediates``) use :func:`pos_embed`.

    Only this instance changes (its ``_pos_embed``); the state dict, timm's
    optimiser grouping and ``forward`` are untouched. Returns ``vit``.
    """
    if not isinstance(vit, VisionTransformer):
        raise TypeError(f"expected a timm VisionTransformer, got {type(vit).__name__}")
    # a partial, not a closure: deepcopy and pickle rebind it to the copy
    vit._pos_embed = functools.partial(pos_embed, vit)
    return vit

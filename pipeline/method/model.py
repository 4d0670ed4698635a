"""The networks: a timm ViT with a mask token, the iBOT head, and the backbone export.

Everything is built by composition around timm's ``VisionTransformer``: we call
its own submodules (``patch_embed``, ``patch_drop``, ``norm_pre``, ``blocks``,
``norm``) in the order ``forward_features`` does, with timm's ``_pos_embed``
replaced by :func:`pipeline.method.pos_embed.pos_embed` (same forward bytes, a
backward that is deterministic on CUDA), and insert only the two things
iBOT/AttMask need:

* masked patch embeddings are replaced by a learnable mask token *before* the
  position embedding is added (so the student still knows where the hole is);
* the teacher's [CLS] -> patch attention of the last block, for AttMask.

timm attributes relied on (checked at construction, see ``_check_vit``):

* ``vit.patch_embed`` returns NHWC ``(B, h, w, D)`` when the model was created
  with ``dynamic_img_size=True`` (``(B, P, D)`` otherwise);
  ``vit.patch_embed.patch_size``.
* what ``vit._pos_embed`` reads (see :mod:`pipeline.method.pos_embed`):
  ``cls_token``, ``reg_token``, ``pos_embed``, ``no_embed_class``,
  ``dynamic_img_size``, ``patch_embed.grid_size``, ``pos_drop``.
* ``vit.num_prefix_tokens``, ``vit.grad_checkpointing``.
* last block's ``attn`` is timm's ``Attention``: ``qkv`` (Linear D -> 3*heads*head_dim,
  output laid out as ``(3, heads, head_dim)``), ``num_heads``, ``head_dim``,
  ``scale``, ``q_norm``, ``k_norm``, ``fused_attn``.
"""
from __future__ import annotations


import timm
import torch
import torch.nn.functional as F
from timm.models import checkpoint_seq
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from pipeline.core.config import ModelConfig
from pipeline.method.pos_embed import pos_embed

__all__ = [
    "build_vit",
    "MaskedViT",
    "IBOTHead",
    "IBOTNetwork",
    "build_network",
    "backbone_state_dict",
]


def build_vit(config: ModelConfig, drop_path_rate: float = 0.0) -> VisionTransformer:
    """A randomly initialised timm ViT (no classifier) that accepts any crop size
    divisible by the patch size. Never downloads anything."""
    vit = timm.create_model(
        config.arch,
        pretrained=False,
        num_classes=0,
        dynamic_img_size=True,
        drop_path_rate=drop_path_rate,
        **config.timm_shape(),
    )
    _check_vit(vit, config.arch)
    return vit


def _check_vit(vit: nn.Module, name: str = "model") -> None:
    """Fail early, with a readable message, on timm models we cannot wrap."""
    if not isinstance(vit, VisionTransformer):
        raise TypeError(f"{name}: expected a timm VisionTransformer, got {type(vit).__name__}")
    if vit.cls_token is None:
        raise ValueError(f"{name}: iBOT/AttMask need a [CLS] token; this model has class_token=False")
    if not isinstance(vit.patch_drop, nn.Identity):
        # PatchDropout drops and reorders patch tokens, so token i would no
        # longer be patch i: masked-token targets and attention would be wrong.
        raise ValueError(f"{name}: patch_drop_rate must be 0 (iBOT needs every patch token in order)")
    attn = vit.blocks[-1].attn
    needed = ("qkv", "num_heads", "head_dim", "scale", "q_norm", "k_norm")
    missing = [a for a in needed if not hasattr(attn, a)]
    if missing or not isinstance(attn.qkv, nn.Linear):
        raise TypeError(
            f"{name}: the last block's attention ({type(attn).__name__}) is not timm's Attention "
            f"(missing {missing or ['qkv Linear']}); cannot read the [CLS] attention"
        )


class MaskedViT(nn.Module):
    """A timm ViT whose patch embeddings can be replaced by a learnable mask token.

    Args:
        vit: a timm ``VisionTransformer`` with a [CLS] token (see :func:`build_vit`).
    """

    def __init__(self, vit: VisionTransformer):
        super().__init__()
        _check_vit(vit)
        self.vit = vit
        # Zeros, as iBOT's `masked_embed`; shape (1, 1, D) broadcasts over NHWC and NLC.
        self.mask_token = nn.Parameter(torch.zeros(1, 1, vit.embed_dim))
        # One hook for the module's lifetime, live only while `_capture_qkv` is True: registering one per
        # call is a torch.compile graph break (Dynamo cannot build the RemovableHandle) on every attention forward.
        self._capture_qkv = False
        self._captured_qkv: Tensor | None = None
        # a bound method, not a closure: deepcopy (a teacher copied from a student) rebinds it to the copy
        vit.blocks[-1].attn.qkv.register_forward_hook(self._qkv_hook)

    @property
    def num_prefix_tokens(self) -> int:
        """[CLS] + register tokens, which come first in the token sequence."""
        return self.vit.num_prefix_tokens

    @property
    def patch_size(self) -> int:
        return self.vit.patch_embed.patch_size[0]

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """The patch grid ``(h, w)`` of a ``height x width`` crop."""
        ph, pw = self.vit.patch_embed.patch_size
        if height % ph or width % pw:
            raise ValueError(f"crop size {height}x{width} is not divisible by the patch size {ph}x{pw}")
        return height // ph, width // pw

    def forward(
        self,
        images: Tensor,
        mask: Tensor | None = None,
        return_cls_attention: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Tokens after the final norm, optionally with the last block's [CLS] attention.

        Args:
            images: ``(B, 3, H, W)``, H and W divisible by the patch size.
            mask: ``(B, h, w)`` bool, True = replace that patch by the mask token.
            return_cls_attention: also return the [CLS] -> patch attention.

        Returns:
            tokens ``(B, prefix + P, D)`` with prefix tokens ([CLS] first) before
            the ``P = h * w`` patch tokens in raster order; and if asked
            ``cls_attention`` ``(B, P)``: softmax attention of [CLS] over all
            tokens in the last block, patch columns only, mean over heads
            (so each row is non-negative and sums to <= 1).
        """
        vit = self.vit
        h, w = self.grid_size(images.shape[-2], images.shape[-1])
        x = vit.patch_embed(images)  # (B, h, w, D) with dynamic_img_size, else (B, P, D)
        if mask is not None:
            x = self._apply_mask(x, mask, h, w)
        x = pos_embed(vit, x)  # timm's prefix-token concat + resampled pos embed, deterministic backward
        x = vit.patch_drop(x)
        x = vit.norm_pre(x)

        if not return_cls_attention:
            x = self._blocks(x)
            return vit.norm(x)

        # The fused SDPA kernel never materialises attention weights, so capture
        # the last block's qkv projection (computed anyway) and rebuild only the
        # [CLS] row: (B, heads, 1, N) instead of (B, heads, N, N).
        self._capture_qkv = True
        try:
            x = self._blocks(x)
        finally:
            # off before backward: grad checkpointing's recomputation must not overwrite the capture
            self._capture_qkv = False
        qkv, self._captured_qkv = self._captured_qkv, None  # no reference kept past this forward
        if qkv is None:
            raise RuntimeError("the last block's qkv projection did not run; cannot read the [CLS] attention")
        x = vit.norm(x)
        attention = self._cls_attention(qkv)
        return x, attention

    def _qkv_hook(self, _module: nn.Module, _inputs: tuple[Tensor, ...], output: Tensor) -> None:
        """Forward hook of the last block's ``attn.qkv``: keeps ``(B, N, 3 * heads * head_dim)`` when asked."""
        if self._capture_qkv:
            self._captured_qkv = output

    def _apply_mask(self, x: Tensor, mask: Tensor, h: int, w: int) -> Tensor:
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
        if tuple(mask.shape) != (x.shape[0], h, w):
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match (batch, h, w) = {(x.shape[0], h, w)}")
        mask = mask.reshape(x.shape[:-1]).unsqueeze(-1)  # NHWC or NLC, plus a channel axis
        return torch.where(mask, self.mask_token.to(x.dtype), x)

    def _blocks(self, x: Tensor) -> Tensor:
        # Same as VisionTransformer.forward_features, so grad checkpointing is honoured.
        if self.vit.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.vit.blocks, x)
        return self.vit.blocks(x)

    def _cls_attention(self, qkv: Tensor) -> Tensor:
        """``qkv`` ``(B, N, 3 * heads * head_dim)`` -> [CLS] attention ``(B, P)``."""
        attn = self.vit.blocks[-1].attn
        B, N, _ = qkv.shape
        # Same layout as timm's Attention.forward: (3, B, heads, N, head_dim).
        q, k, _v = qkv.reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q = attn.q_norm(q[:, :, :1])  # [CLS] is token 0; q_norm is per token, so slice first
        k = attn.k_norm(k)
        # float32 with autocast off: AttMask ranks patches by these values, and
        # bf16/fp16 rounding would create ties and flip the order of close ones.
        with torch.autocast(device_type=qkv.device.type, enabled=False):
            scores = (q.float() * attn.scale) @ k.float().transpose(-2, -1)  # (B, heads, 1, N)
            weights = scores.softmax(dim=-1)[:, :, 0, self.num_prefix_tokens:]  # (B, heads, P)
            return weights.mean(dim=1)


class IBOTHead(nn.Module):
    """iBOT projection head: 3-layer MLP -> L2 norm -> weight-normalised linear.

    Args:
        in_dim: backbone width ``D``.
        out_dim: number of prototypes.
        hidden_dim, bottleneck_dim: MLP widths.
        norm_last_layer: fix the weight-norm magnitude ``g`` to 1 (not trained).
        shared_head: one last layer for [CLS] and patch tokens; else a separate
            ``last_layer_patch`` (the MLP is shared either way, as in iBOT).
        num_prefix_tokens: [CLS] + register tokens at the front of the input;
            patch tokens are everything after them.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        norm_last_layer: bool = True,
        shared_head: bool = True,
        num_prefix_tokens: int = 1,
    ):
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, bottleneck_dim),
        )
        # DINO initialises the MLP only; the last layer keeps nn.Linear's default.
        self.mlp.apply(_init_linear)
        self.last_layer = _weight_normed_linear(bottleneck_dim, out_dim, norm_last_layer)
        self.last_layer_patch = None if shared_head else _weight_normed_linear(bottleneck_dim, out_dim, norm_last_layer)

    def forward(self, tokens: Tensor, with_patches: bool = True) -> tuple[Tensor, Tensor | None]:
        """Project backbone tokens.

        Args:
            tokens: ``(B, T, D)`` with [CLS] at index 0 and the ``P = T - prefix``
                patch tokens last; ``(B, D)`` is read as [CLS] alone.
            with_patches: also project the patch tokens.

        Returns:
            ``cls_out`` ``(B, out_dim)`` and ``patch_out`` ``(B, P, out_dim)``
            (None when ``with_patches`` is False), float32 even under autocast.
        """
        if tokens.dim() == 2:
            tokens = tokens.unsqueeze(1)
            with_patches = False
        if with_patches:
            # Register tokens get no loss, so skip them in the MLP.
            if self.num_prefix_tokens > 1:
                tokens = torch.cat([tokens[:, :1], tokens[:, self.num_prefix_tokens:]], dim=1)
        else:
            tokens = tokens[:, :1]
        z = self.mlp(tokens)
        # float32 from the L2 norm on, autocast off: these logits are divided by temperatures of
        # 0.04-0.1 and softmaxed, and bf16's 8-bit mantissa would blur the targets. No-op without autocast.
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = F.normalize(z.float(), dim=-1)
            cls_out = self.last_layer(z[:, 0])
            if not with_patches:
                return cls_out, None
            patch_layer = self.last_layer if self.last_layer_patch is None else self.last_layer_patch
            return cls_out, patch_layer(z[:, 1:])


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def _weight_normed_linear(in_dim: int, out_dim: int, freeze_norm: bool) -> nn.Linear:
    """``Linear(in, out, bias=False)`` with weight norm; ``g`` (``original0``) filled with 1."""
    layer = nn.utils.parametrizations.weight_norm(nn.Linear(in_dim, out_dim, bias=False))
    g = layer.parametrizations.weight.original0  # (out_dim, 1) magnitude; original1 is the direction
    with torch.no_grad():
        g.fill_(1.0)
    g.requires_grad_(not freeze_norm)
    return layer


class IBOTNetwork(nn.Module):
    """Backbone (:class:`MaskedViT`) + :class:`IBOTHead`: one student or teacher."""

    def __init__(self, backbone: MaskedViT, head: IBOTHead):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(
        self,
        global_crops: Tensor,
        masks: Tensor | None = None,
        local_crops: Tensor | None = None,
        return_cls_attention: bool = False,
    ) -> dict[str, Tensor]:
        """Run all views of a batch.

        Args:
            global_crops: ``(n_g * B, 3, Hg, Wg)``, views stacked view-major.
            masks: ``(n_g * B, hg, wg)`` bool for the global crops, or None.
            local_crops: ``(n_l * B, 3, Hl, Wl)`` or None (never masked).
            return_cls_attention: also return the globals' last-block [CLS] attention.

        Returns:
            ``cls`` ``(n_g * B + n_l * B, out_dim)``, globals first then locals;
            ``patch`` ``(n_g * B, P, out_dim)`` for the global crops;
            ``cls_attention`` ``(n_g * B, P)`` when asked;
            ``cls_features`` ``(n_g * B, D)``: the globals' backbone [CLS] tokens (after the final norm).
        """
        out = self.backbone(global_crops, masks, return_cls_attention=return_cls_attention)
        tokens, attention = out if return_cls_attention else (out, None)
        cls_out, patch_out = self.head(tokens, with_patches=True)
        if local_crops is not None and local_crops.shape[0] > 0:
            local_tokens = self.backbone(local_crops)
            local_cls, _ = self.head(local_tokens[:, 0], with_patches=False)
            cls_out = torch.cat([cls_out, local_cls], dim=0)
        result = {"cls": cls_out, "patch": patch_out, "cls_features": tokens[:, 0]}
        if attention is not None:
            result["cls_attention"] = attention
        return result


def build_network(config: ModelConfig, drop_path_rate: float) -> IBOTNetwork:
    """Student (``drop_path_rate=config.drop_path_rate``) or teacher (0.0) network."""
    vit = build_vit(config, drop_path_rate=drop_path_rate)
    head = IBOTHead(
        in_dim=vit.embed_dim,
        out_dim=config.out_dim,
        hidden_dim=config.head_hidden_dim,
        bottleneck_dim=config.head_bottleneck_dim,
        norm_last_layer=config.norm_last_layer,
        shared_head=config.shared_head,
        num_prefix_tokens=vit.num_prefix_tokens,
    )
    return IBOTNetwork(MaskedViT(vit), head)


def backbone_state_dict(network: nn.Module) -> dict[str, Tensor]:
    """The timm ViT's own weights (no mask token, no head), detached copies.

    Loads with ``strict=True`` into ``timm.create_model(arch, num_classes=0, **shape)``.
    Accepts an :class:`IBOTNetwork`, a :class:`MaskedViT`, or either wrapped in
    DDP (``.module``).
    """
    while hasattr(network, "module") and isinstance(network.module, nn.Module):
        network = network.module
    if isinstance(network, IBOTNetwork):
        network = network.backbone
    if isinstance(network, MaskedViT):
        network = network.vit
    if not isinstance(network, VisionTransformer):
        raise TypeError(f"expected an IBOTNetwork, MaskedViT or VisionTransformer, got {type(network).__name__}")
    return {k: v.detach().clone() for k, v in network.state_dict().items()}



"""Tests for pipeline.method.model on tiny ViTs (embed 32, depth 2, 2 heads, patch 4)."""
from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F

from pipeline.core.config import ModelConfig
from pipeline.method.backbone_export import load_backbone, save_backbone_safetensors
from pipeline.method.model import IBOTHead, IBOTNetwork, MaskedViT, backbone_state_dict, build_network, build_vit

CFG = ModelConfig(
    arch="vit_tiny_patch16_224",
    patch_size=4,
    img_size=32,
    depth=2,
    embed_dim=32,
    num_heads=2,
    out_dim=64,
    head_hidden_dim=48,
    head_bottleneck_dim=16,
)
TINY = dict(patch_size=4, img_size=32, depth=2, embed_dim=32, num_heads=2)


def _images(batch: int, size: int | tuple[int, int] = 32, seed: int = 0) -> torch.Tensor:
    h, w = (size, size) if isinstance(size, int) else size
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _masked_vit(**timm_kwargs) -> MaskedViT:
    torch.manual_seed(0)
    vit = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=0, dynamic_img_size=True, **{**TINY, **timm_kwargs}
    )
    return MaskedViT(vit).eval()


def _explicit_cls_attention(model: MaskedViT, images: torch.Tensor) -> torch.Tensor:
    """Reference: the full N x N softmax attention of the last block, [CLS] row, mean over heads."""
    block = model.vit.blocks[-1]
    inputs: list[torch.Tensor] = []
    handle = block.register_forward_pre_hook(lambda _m, args: inputs.append(args[0]))
    model(images)
    handle.remove()
    attn = block.attn
    x = block.norm1(inputs[0])
    B, N, _ = x.shape
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    full = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, heads, N, N)
    return full[:, :, 0, model.num_prefix_tokens:].mean(dim=1)


# --------------------------------------------------------------------------- attention


@pytest.mark.parametrize(
    "kwargs, size",
    [({}, 32), ({"qk_norm": True}, 32), ({"reg_tokens": 2}, 32), ({}, (32, 16))],
    ids=["plain", "qk_norm", "registers", "non_square"],
)
def test_cls_attention_equals_explicit_matrix_row(kwargs, size, monkeypatch):
    model = _masked_vit(**kwargs)
    images = _images(3, size)
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))

    with torch.no_grad():
        tokens, attention = model(images, return_cls_attention=True)
        reference = _explicit_cls_attention(model, images)
        plain = model.vit.forward_features(images)

    h, w = images.shape[-2] // 4, images.shape[-1] // 4
    assert attention.shape == (3, h * w)
    torch.testing.assert_close(attention, reference, rtol=1e-5, atol=1e-6)
    assert (attention >= 0).all()
    assert (attention.sum(dim=1) <= 1 + 1e-6).all()
    # Without a mask we are exactly timm's forward_features, attention or not.
    torch.testing.assert_close(tokens, plain, rtol=0, atol=0)
    # The fused kernel ran in every block (3 forwards of depth 2 above) and is still on.
    assert len(calls) == 3 * 2
    assert all(block.attn.fused_attn for block in model.vit.blocks)
    # one hook for the model's lifetime (registered at construction), holding nothing between forwards
    assert len(model.vit.blocks[-1].attn.qkv._forward_hooks) == 1
    assert model._captured_qkv is None and not model._capture_qkv


def test_cls_attention_of_a_deepcopy_is_its_own():
    model = _masked_vit()
    teacher = copy.deepcopy(model)  # as a teacher copied from the student
    with torch.no_grad():
        for parameter in teacher.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
        _, own = teacher(_images(2), return_cls_attention=True)
        reference = _explicit_cls_attention(teacher, _images(2))
        _, student = model(_images(2), return_cls_attention=True)
    torch.testing.assert_close(own, reference, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(own, student)
    assert model._captured_qkv is None and teacher._captured_qkv is None


def test_cls_attention_is_off_by_default():
    model = _masked_vit()
    out = model(_images(2))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 1 + 64, 32)


def test_cls_attention_is_float32_under_autocast():
    model = _masked_vit()
    images = _images(2)
    with torch.no_grad():
        _, expected = model(images, return_cls_attention=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, attention = model(images, return_cls_attention=True)
    assert attention.dtype == torch.float32
    torch.testing.assert_close(attention, expected, rtol=0.1, atol=0.01)


def test_cls_attention_with_grad_checkpointing():
    model = _masked_vit()
    images = _images(2)
    with torch.no_grad():
        _, expected = model(images, return_cls_attention=True)
    model.vit.set_grad_checkpointing(True)
    model.train()  # drop rates are 0, so train mode changes nothing numerically
    images.requires_grad_(True)
    tokens, attention = model(images, return_cls_attention=True)
    tokens.sum().backward()
    torch.testing.assert_close(attention.detach(), expected)


# --------------------------------------------------------------------------- masking


def _patch_mask(batch: int, h: int, w: int) -> torch.Tensor:
    mask = torch.zeros(batch, h, w, dtype=torch.bool)
    mask[:, 1:4, 2:6] = True
    mask[0, 7, 7] = True
    return mask


def _perturb_inside(images: torch.Tensor, mask: torch.Tensor, patch: int = 4) -> torch.Tensor:
    """Change pixels only inside the masked patches."""
    pixel_mask = mask.repeat_interleave(patch, 1).repeat_interleave(patch, 2).unsqueeze(1)
    return torch.where(pixel_mask, images + torch.randn_like(images), images)


def test_masked_patches_are_replaced_by_mask_token():
    model = _masked_vit()
    a = _images(2)
    mask = _patch_mask(2, 8, 8)
    b = _perturb_inside(a, mask)
    assert not torch.equal(a, b)
    with torch.no_grad():
        torch.testing.assert_close(model(a, mask), model(b, mask), rtol=0, atol=0)
        assert not torch.allclose(model(a), model(b))


def test_mask_token_changes_outputs_only_where_masked():
    model = _masked_vit()
    images = _images(2)
    mask = _patch_mask(2, 8, 8)
    none = torch.zeros_like(mask)
    with torch.no_grad():
        before = {"mask": model(images, mask), "empty": model(images, none), "None": model(images)}
        model.mask_token.normal_()
        after = {"mask": model(images, mask), "empty": model(images, none), "None": model(images)}
    assert not torch.allclose(before["mask"], after["mask"])
    torch.testing.assert_close(before["empty"], after["empty"], rtol=0, atol=0)
    torch.testing.assert_close(before["None"], after["None"], rtol=0, atol=0)
    torch.testing.assert_close(after["empty"], after["None"], rtol=0, atol=0)


def test_mask_validation():
    model = _masked_vit()
    with pytest.raises(ValueError, match="mask shape"):
        model(_images(2), torch.zeros(2, 4, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        model(_images(2), torch.zeros(2, 8, 8))
    with pytest.raises(ValueError, match="not divisible"):
        model(_images(2, 30))


def test_gradient_reaches_mask_token():
    net = build_network(CFG, drop_path_rate=0.1).train()
    images = _images(2)
    net(images)["patch"].sum().backward()
    unmasked_grad = net.backbone.mask_token.grad
    assert unmasked_grad is None or not unmasked_grad.any()

    net.zero_grad(set_to_none=True)
    out = net(images, _patch_mask(2, 8, 8))
    (out["cls"].sum() + out["patch"].sum()).backward()
    grad = net.backbone.mask_token.grad
    assert grad is not None and grad.abs().sum() > 0


# --------------------------------------------------------------------------- sizes


def test_local_crops_of_another_size():
    model = _masked_vit()
    with torch.no_grad():
        tokens = model(_images(3, 16))
        masked, attention = model(_images(3, 16), torch.ones(3, 4, 4, dtype=torch.bool), return_cls_attention=True)
    assert tokens.shape == (3, 1 + 16, 32)
    assert masked.shape == (3, 1 + 16, 32)
    assert attention.shape == (3, 16)


def test_paper_sizes_224_and_96_with_patch_16():
    cfg = ModelConfig(arch="vit_tiny_patch16_224", patch_size=16, img_size=224, depth=1, embed_dim=32, num_heads=2,
                      out_dim=8, head_hidden_dim=16, head_bottleneck_dim=8)
    net = build_network(cfg, drop_path_rate=0.0).eval()
    with torch.no_grad():
        out = net(_images(2, 224), torch.zeros(2, 14, 14, dtype=torch.bool), _images(4, 96), return_cls_attention=True)
    assert out["cls"].shape == (6, 8) and out["patch"].shape == (2, 196, 8) and out["cls_attention"].shape == (2, 196)


def test_register_tokens_come_first():
    model = _masked_vit(reg_tokens=3)
    assert model.num_prefix_tokens == 4
    assert model(_images(2)).shape == (2, 4 + 64, 32)


def test_model_without_cls_token_is_rejected():
    vit = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=0, class_token=False, global_pool="avg", **TINY
    )
    with pytest.raises(ValueError, match="CLS"):
        MaskedViT(vit)


def test_build_vit_never_downloads(monkeypatch):
    import timm.models._builder as builder

    def refuse(*args, **kwargs):
        raise AssertionError("tried to load pretrained weights")

    monkeypatch.setattr(builder, "load_pretrained", refuse)
    vit = build_vit(CFG, drop_path_rate=0.1)
    assert vit.embed_dim == 32 and len(vit.blocks) == 2 and vit.patch_embed.patch_size == (4, 4)
    assert vit.blocks[-1].drop_path2.drop_prob == pytest.approx(0.1)


# --------------------------------------------------------------------------- export


def test_backbone_export_loads_strict_and_matches(tmp_path):
    torch.manual_seed(0)
    net = build_network(CFG, drop_path_rate=0.1).eval()
    with torch.no_grad():
        net.backbone.mask_token.normal_()  # must not leak into the export
    state = backbone_state_dict(net)
    plain = timm.create_model(CFG.arch, num_classes=0, **CFG.timm_shape()).eval()
    assert set(state) == set(plain.state_dict())  # no mask token, no head
    plain.load_state_dict(state, strict=True)
    images = _images(4)
    with torch.no_grad():
        expected = net.backbone(images)[:, 0]
        torch.testing.assert_close(plain(images), expected, rtol=1e-5, atol=1e-6)

    path = tmp_path / "sub" / "backbone.safetensors"
    save_backbone_safetensors(state, path, metadata={"arch": CFG.arch})
    assert path.is_file() and not list(path.parent.glob("*.tmp"))
    loaded = load_backbone(CFG, path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), expected, rtol=1e-5, atol=1e-6)


def test_backbone_state_dict_is_a_copy():
    net = build_network(CFG, drop_path_rate=0.0)
    state = backbone_state_dict(net)
    with torch.no_grad():
        net.backbone.vit.cls_token.add_(1.0)
    assert not torch.equal(state["cls_token"], net.backbone.vit.cls_token)


# --------------------------------------------------------------------------- head


@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_head_shapes_and_last_layer(norm_last_layer):
    head = IBOTHead(32, 64, hidden_dim=48, bottleneck_dim=16, norm_last_layer=norm_last_layer)
    tokens = torch.randn(3, 1 + 16, 32)
    cls_out, patch_out = head(tokens)
    assert cls_out.shape == (3, 64) and patch_out.shape == (3, 16, 64)
    cls_only, none = head(tokens, with_patches=False)
    assert none is None
    torch.testing.assert_close(cls_only, cls_out)

    g = head.last_layer.parametrizations.weight.original0
    assert torch.equal(g, torch.ones_like(g))
    assert g.requires_grad is (not norm_last_layer)
    # Effective weight rows have norm g = 1.
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(64))
    names = [n for n, _ in head.named_parameters()]
    assert any("last_layer" in n for n in names)
    assert all(("last_layer" in n) == n.startswith("last_layer") for n in names)
    for linear in (m for m in head.mlp if isinstance(m, torch.nn.Linear)):
        assert not linear.bias.any()
        assert linear.weight.std() < 0.03


def test_head_shared_vs_separate_patch_layer():
    torch.manual_seed(0)
    shared = IBOTHead(32, 64, hidden_dim=48, bottleneck_dim=16, shared_head=True)
    torch.manual_seed(0)
    separate = IBOTHead(32, 64, hidden_dim=48, bottleneck_dim=16, shared_head=False)
    assert shared.last_layer_patch is None
    assert separate.last_layer_patch is not None
    assert any(n.startswith("last_layer_patch") for n, _ in separate.named_parameters())
    g2 = separate.last_layer_patch.parametrizations.weight.original0
    assert torch.equal(g2, torch.ones_like(g2)) and not g2.requires_grad

    tokens = torch.randn(2, 1 + 4, 32)
    cls_s, patch_s = shared(tokens)
    cls_p, patch_p = separate(tokens)
    torch.testing.assert_close(cls_s, cls_p)  # same MLP and [CLS] layer (same seed)
    torch.testing.assert_close(patch_s, shared.last_layer(F.normalize(shared.mlp(tokens[:, 1:]), dim=-1)))
    assert not torch.allclose(patch_s, patch_p)
    torch.testing.assert_close(patch_p, separate.last_layer_patch(F.normalize(separate.mlp(tokens[:, 1:]), dim=-1)))


def test_head_skips_register_tokens():
    head = IBOTHead(32, 64, hidden_dim=48, bottleneck_dim=16, num_prefix_tokens=3)
    tokens = torch.randn(2, 3 + 16, 32)
    cls_out, patch_out = head(tokens)
    assert patch_out.shape == (2, 16, 64)
    torch.testing.assert_close(patch_out, head.last_layer(F.normalize(head.mlp(tokens[:, 3:]), dim=-1)))


def test_head_deepcopies_for_the_teacher():
    head = IBOTHead(32, 64, hidden_dim=48, bottleneck_dim=16)
    teacher = copy.deepcopy(head)
    tokens = torch.randn(2, 5, 32)
    torch.testing.assert_close(teacher(tokens)[1], head(tokens)[1])
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.1)
    assert not torch.allclose(teacher(tokens)[1], head(tokens)[1])


# --------------------------------------------------------------------------- network


def test_network_outputs_and_ordering():
    torch.manual_seed(0)
    net = build_network(CFG, drop_path_rate=0.0).eval()
    n_g, n_l, B = 2, 3, 2
    globals_ = _images(n_g * B, 32, seed=1)
    locals_ = _images(n_l * B, 16, seed=2)
    masks = _patch_mask(n_g * B, 8, 8)
    with torch.no_grad():
        out = net(globals_, masks, locals_, return_cls_attention=True)
        only_globals = net(globals_, masks)
        local_cls, _ = net.head(net.backbone(locals_), with_patches=False)

    assert out["cls"].shape == (n_g * B + n_l * B, 64)
    assert out["patch"].shape == (n_g * B, 64, 64)
    assert out["cls_attention"].shape == (n_g * B, 64)
    assert "cls_attention" not in only_globals
    torch.testing.assert_close(out["cls"][: n_g * B], only_globals["cls"])
    torch.testing.assert_close(out["cls"][n_g * B :], local_cls)
    torch.testing.assert_close(out["patch"], only_globals["patch"])


def test_network_is_an_ibot_network_with_config_head():
    net = build_network(CFG, drop_path_rate=0.1)
    assert isinstance(net, IBOTNetwork) and isinstance(net.backbone, MaskedViT)
    assert net.head.last_layer.weight.shape == (64, 16)
    assert net.backbone.mask_token.shape == (1, 1, 32)
    assert not net.backbone.mask_token.any()

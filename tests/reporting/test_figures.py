"""Figures: masks follow the attention, PNGs byte-identical (pipeline/reporting/figures.py)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pipeline.core.config import Params, params_from_dict
from pipeline.core.strategies import MASKING_STRATEGIES
from pipeline.method.backbone_export import create_backbone, random_backbone_state
from pipeline.reporting.figures import (
    MaskExamples, figure_masks, mask_examples, mask_figure_data, pick_examples, plot_losses, plot_mask_figure, plot_masked_share, png_bytes,
    read_csv_columns, save_png, teacher_attention,
)
from pipeline.method.model import MaskedViT
from tests.conftest import tiny_params_dict

# ---------------------------------------------------------------------------- masks
def test_figure_masks_follow_the_attention() -> None:
    generator = torch.Generator().manual_seed(0)
    attention = torch.rand(3, 64, generator=generator).softmax(-1)  # distinct values: no ties
    masks = figure_masks(attention, (8, 8), ratio=0.3, show_max=0.1, seed=0)
    n = math.floor(0.3 * 64)
    assert set(masks) == set(MASKING_STRATEGIES)
    order = attention.argsort(dim=1, descending=True)
    for b in range(3):
        high = masks["attmask_high"][b].flatten()
        low = masks["attmask_low"][b].flatten()
        assert set(high.nonzero().flatten().tolist()) == set(order[b, :n].tolist())
        assert set(low.nonzero().flatten().tolist()) == set(order[b, -n:].tolist())
        hint = masks["attmask_hint"][b].flatten()
        assert not (hint & ~high).any() and int(hint.sum()) == n - math.floor(0.1 * 0.3 * 64)
        assert int(masks["random"][b].sum()) == n and 0 < int(masks["block"][b].sum()) <= n
    again = figure_masks(attention, (8, 8), ratio=0.3, show_max=0.1, seed=0)
    assert all(torch.equal(masks[s], again[s]) for s in masks)


def tiny_model_params() -> Params:
    return params_from_dict(tiny_params_dict(Path("unused"), model={"patch_size": 4}))


@pytest.fixture(scope="module")
def tiny_examples() -> Any:
    p = tiny_model_params()
    vit = create_backbone(p.model)
    vit.load_state_dict(random_backbone_state(p.model, 0))
    images = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    return vit, images, mask_examples(vit, images, ["a", "b", "c"], 4, ratio=0.3, show_max=0.1, seed=0)


def test_figure_uses_the_teachers_attention(tiny_examples: Any) -> None:
    vit, images, examples = tiny_examples
    with torch.no_grad():
        _, expected = MaskedViT(vit).eval()(images, return_cls_attention=True)
    assert torch.equal(teacher_attention(vit, images), expected)
    assert examples.attention.shape == (3, 4, 4) and examples.count == math.floor(0.3 * 16)
    for b in range(3):
        top = np.argsort(-examples.attention[b].flatten(), kind="stable")[: examples.count]
        assert set(np.flatnonzero(examples.masks["attmask_high"][b])) == set(top.tolist())
    assert examples.images.shape == (3, 16, 16, 3) and 0 <= examples.images.min() and examples.images.max() <= 1


def test_pngs_are_byte_identical_on_rerun(tiny_examples: Any, tmp_path: Path) -> None:
    _, _, examples = tiny_examples
    first = png_bytes(plot_mask_figure(examples))
    assert first == png_bytes(plot_mask_figure(examples))
    assert first.startswith(b"\x89PNG") and b"Software" not in first and b"matplotlib" not in first
    steps = {"step": np.arange(5.0), "loss_total": np.linspace(3, 2, 5), "loss_cls": np.ones(5),
             "loss_patch": np.ones(5), "masked_share": np.full(5, 0.15)}
    a = save_png(plot_losses(steps, uniform_loss=math.log(64)), tmp_path / "a.png").read_bytes()
    b = save_png(plot_losses(steps, uniform_loss=math.log(64)), tmp_path / "b.png").read_bytes()
    assert a == b
    assert png_bytes(plot_masked_share(steps, 0.15)) == png_bytes(plot_masked_share(steps, 0.15))


def test_pick_examples_is_seeded_and_prefers_distinct_classes() -> None:
    labels = [0, 0, 1, 1, 2, 2]
    chosen = pick_examples(labels, 3, seed=0)
    assert chosen == pick_examples(labels, 3, seed=0)
    assert sorted(labels[i] for i in chosen) == [0, 1, 2]
    assert sorted(pick_examples(labels, 6, seed=0)) == list(range(6))  # fewer classes than images: fill up
    assert len({tuple(pick_examples(list(range(50)), 3, seed=s)) for s in range(3)}) > 1


def test_read_csv_columns(tmp_path: Path) -> None:
    (tmp_path / "x.csv").write_text("step,loss\n0,1.5\n1,2.5\n")
    columns = read_csv_columns(tmp_path / "x.csv")
    assert list(columns) == ["step", "loss"] and columns["loss"].tolist() == [1.5, 2.5]


def test_mask_figure_data_and_legend_say_what_the_figure_shows(tiny_examples: Any) -> None:
    _, _, examples = tiny_examples
    data = mask_figure_data(examples)
    assert data["patches"] == 16 and data["hint_revealed"] == [0, 0, 0]  # floor(0.1 x 0.3 x 16) = 0
    assert all(r >= 1 for r in data["attention_max_over_min"]) and all(0 < e <= 1 for e in data["attention_entropy"])
    title = plot_mask_figure(examples)._suptitle.get_text()
    assert "AttMask-Hint reveals 0 patches here" in title and "cyan" not in title

    attention = torch.rand(2, 64, generator=torch.Generator().manual_seed(0)).softmax(-1)
    masks = {s: m.numpy() for s, m in figure_masks(attention, (8, 8), ratio=0.5, show_max=0.5, seed=0).items()}
    revealing = MaskExamples(images=np.zeros((2, 32, 32, 3)), attention=attention.view(2, 8, 8).numpy(), masks=masks,
                             names=["a", "b"], count=32, ratio=0.5)
    assert mask_figure_data(revealing)["hint_revealed"] == [16, 16]  # floor(0.5 x 0.5 x 64)
    assert "cyan outline = hint revealed" in plot_mask_figure(revealing)._suptitle.get_text()
    flat = MaskExamples(images=np.zeros((1, 32, 32, 3)), attention=np.full((1, 8, 8), 1 / 64, np.float32),
                        masks={}, names=["a"], count=32, ratio=0.5)
    assert mask_figure_data(flat)["attention_max_over_min"] == [1.0]
    assert mask_figure_data(flat)["attention_entropy"] == [1.0]

"""Multi-crop and evaluation transforms (pipeline/data/augment.py): shapes, normalisation, seeded draws."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.core.config import AugmentConfig
from pipeline.data.augment import IMAGENET_MEAN, IMAGENET_STD, MultiCropAugmentation, eval_transform


def image(size: int = 48) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def test_multicrop_gives_two_globals_then_the_locals():
    config = AugmentConfig(global_size=32, local_size=16, local_number=3)
    crops = MultiCropAugmentation(config)(image())
    assert MultiCropAugmentation(config).num_crops == 5
    assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
    assert all(c.dtype == torch.float32 for c in crops)


def test_the_same_global_seed_gives_the_same_crops():
    augment = MultiCropAugmentation(AugmentConfig(global_size=32, local_size=16, local_number=2))
    torch.manual_seed(3)
    first = augment(image())
    torch.manual_seed(3)
    again = augment(image())
    torch.manual_seed(4)
    other = augment(image())
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def test_eval_transform_centre_crops_and_normalises():
    grey = Image.new("RGB", (64, 40), (128, 128, 128))
    out = eval_transform(32)(grey)
    assert tuple(out.shape) == (3, 32, 32)
    expected = (128 / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(out.mean(dim=(1, 2)), expected, atol=1e-3)


def test_blur_is_the_official_radius_range_when_absolute():
    from pipeline.data.augment import blur_sigma

    assert blur_sigma(96, "absolute") == (0.1, 2.0)  # official: U(0.1, 2.0) px on every crop, 96 px locals too
    low, high = blur_sigma(96, "relative")
    assert (low, high) == pytest.approx((0.1 * 96 / 224, 2.0 * 96 / 224))  # the embedded default's scaling
    config = AugmentConfig(global_size=32, local_size=16, local_number=1, blur="absolute")
    blur = MultiCropAugmentation(config).local.transforms[2].transforms[0]
    assert tuple(blur.sigma) == (0.1, 2.0)

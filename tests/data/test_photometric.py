"""Batched colour augmentation (pipeline/data/photometric.py) and the batched multi-crop (augment.py).

The batched ops must be torchvision's tensor kernels with a factor per sample:
checked image by image against ``torchvision.transforms.v2.functional``. The
parameter draws must follow the per-image pipeline's distributions: checked
against the probabilities and ranges, and the crop boxes against
``RandomResizedCrop.get_params`` with a two-sample KS test.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import ks_2samp
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, default_collate
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from pipeline.core.config import AugmentConfig
import pipeline.data.augment as augment_module
from pipeline.data import photometric as P
from pipeline.data.augment import (
    BatchedMultiCropAugmentation, MultiCropAugmentation, build_multicrop, crop_policies, draw_crop_boxes,
)
from pipeline.data.shard_reader import ShardDataset, open_split

ATOL = 2e-6  # float32 rounding of the same formulas in another order


def images(n: int = 6, size: int = 20, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def factors(n: int, low: float, high: float, seed: int = 1) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("batched, reference, low, high", [
    (P.adjust_brightness, TF.adjust_brightness, 0.6, 1.4),
    (P.adjust_contrast, TF.adjust_contrast, 0.6, 1.4),
    (P.adjust_saturation, TF.adjust_saturation, 0.8, 1.2),
    (P.adjust_hue, TF.adjust_hue, -0.5, 0.5),
])
def test_each_jitter_op_is_torchvisions_kernel_with_a_factor_per_sample(batched, reference, low, high):
    x, f = images(), factors(6, low, high)
    expected = torch.stack([reference(x[i], float(f[i])) for i in range(6)])
    torch.testing.assert_close(batched(x, f), expected, atol=ATOL, rtol=0)


def test_hue_round_trip_and_grey_pixels():
    x = images(4, 16)
    torch.testing.assert_close(P.hsv_to_rgb(P.rgb_to_hsv(x)), x, atol=ATOL, rtol=0)
    grey = torch.full((1, 3, 4, 4), 0.3)
    assert torch.equal(P.adjust_hue(grey, torch.tensor([0.25])), grey)  # no hue to rotate


def test_grayscale_blur_and_solarize_are_torchvisions():
    x = images()
    torch.testing.assert_close(P.grayscale(x), TF.rgb_to_grayscale(x), atol=ATOL, rtol=0)
    sigma = factors(6, 0.1, 2.0)
    expected = torch.stack([TF.gaussian_blur(x[i], [13, 13], [float(s), float(s)]) for i, s in enumerate(sigma)])
    torch.testing.assert_close(P.gaussian_blur(x, sigma, 13), expected, atol=ATOL, rtol=0)


def reference_chain(image: torch.Tensor, row: torch.Tensor, policy: P.PhotometricPolicy) -> torch.Tensor:
    """One crop through torchvision's per-image kernels, in the order its parameters say."""
    x = TF.to_dtype(image, torch.float32, scale=True)
    c = P.COLUMN
    if row[c["jitter"]]:
        for position in range(4):
            op = int(row[c[f"order{position}"]])
            kernel, name = [(TF.adjust_brightness, "brightness"), (TF.adjust_contrast, "contrast"),
                            (TF.adjust_saturation, "saturation"), (TF.adjust_hue, "hue")][op]
            x = kernel(x, float(row[c[name]]))
    if row[c["grayscale"]]:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if row[c["blur"]]:
        sigma = float(row[c["sigma"]])
        x = TF.gaussian_blur(x, [policy.kernel_size] * 2, [sigma, sigma])
    if row[c["solarize"]]:
        x = TF.solarize(x, P.SOLARIZE_THRESHOLD)
    return TF.normalize(x, list(P.IMAGENET_MEAN), list(P.IMAGENET_STD))


def test_apply_photometric_is_the_per_image_chain_for_every_draw():
    policy = P.PhotometricPolicy(blur_p=0.5, solarize_p=0.5, sigma=(0.1, 2.0))
    torch.manual_seed(0)
    params = P.draw_photometric([policy] * 48)
    crops = (images(48, 24, seed=3) * 255).round().to(torch.uint8)
    got = P.apply_photometric(crops, params, policy)
    expected = torch.stack([reference_chain(crops[i], params[i], policy) for i in range(48)])
    # normalising divides by std ~0.225: the ops' rounding grows by ~4.4
    torch.testing.assert_close(got, expected, atol=5 * ATOL / 0.225, rtol=0)
    # every branch was exercised by these draws
    for name in ("jitter", "grayscale", "blur", "solarize"):
        assert 0 < params[:, P.COLUMN[name]].sum() < 48, name


def test_no_op_draws_leave_the_crop_exactly_normalised():
    crops = (images(3, 8) * 255).round().to(torch.uint8)
    params = torch.zeros(3, len(P.FIELDS))
    params[:, P.COLUMN["order0"]: P.COLUMN["order3"] + 1] = torch.arange(4.0)
    policy = P.PhotometricPolicy(blur_p=1.0, solarize_p=0.0, sigma=(0.1, 2.0))
    expected = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(P.IMAGENET_MEAN, P.IMAGENET_STD)])(crops)
    assert torch.equal(P.apply_photometric(crops, params, policy), expected)


def test_apply_photometric_rejects_bad_input():
    policy = P.PhotometricPolicy(blur_p=1.0, solarize_p=0.0, sigma=(0.1, 2.0))
    with pytest.raises(ValueError, match="uint8"):
        P.apply_photometric(torch.zeros(2, 3, 8, 8), torch.zeros(2, len(P.FIELDS)), policy)
    with pytest.raises(ValueError, match="parameters"):
        P.apply_photometric(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.zeros(3, len(P.FIELDS)), policy)


def test_drawn_parameters_follow_the_per_image_pipelines_distributions():
    policy = P.PhotometricPolicy(blur_p=0.1, solarize_p=0.2, sigma=(0.3, 1.5))
    torch.manual_seed(0)
    rows = P.draw_photometric([policy] * 20000)
    c, n = P.COLUMN, 20000
    tolerance = 4 * (0.25 / n) ** 0.5  # four standard errors of a frequency
    for name, p in (("jitter", P.JITTER_P), ("grayscale", P.GRAYSCALE_P), ("blur", 0.1), ("solarize", 0.2)):
        assert abs(rows[:, c[name]].mean().item() - p) < tolerance, name
    for name, (low, high) in (("brightness", P.BRIGHTNESS), ("contrast", P.CONTRAST), ("saturation", P.SATURATION),
                              ("hue", P.HUE), ("sigma", policy.sigma)):
        column = rows[:, c[name]]
        assert low <= column.min() and column.max() <= high, name
        assert abs(column.mean().item() - (low + high) / 2) < 4 * (high - low) / (12 * n) ** 0.5, name
    order = rows[:, c["order0"]: c["order3"] + 1].long()
    assert torch.equal(order.sort(dim=1).values, torch.arange(4).expand(n, 4))  # every row a permutation
    for position in range(4):
        share = torch.bincount(order[:, position], minlength=4).double() / n
        assert (share - 0.25).abs().max() < tolerance
    # the per-image pipeline uses the same ranges
    jitter = MultiCropAugmentation(AugmentConfig()).local.transforms[1].transforms[1].transforms[0]
    assert (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue) == (
        P.BRIGHTNESS, P.CONTRAST, P.SATURATION, P.HUE)


@pytest.mark.parametrize("height, width, scale", [(375, 500, (0.25, 1.0)), (375, 500, (0.05, 0.25)),
                                                  (40, 30, (0.25, 1.0)), (8, 200, (0.9, 1.0))])
def test_crop_boxes_follow_random_resized_crop(height, width, scale):
    n = 3000
    torch.manual_seed(0)
    ours = torch.cat([torch.from_numpy(draw_crop_boxes(height, width, [scale] * 100)[0]) for _ in range(n // 100)]).double()
    torch.manual_seed(1)
    image = Image.new("RGB", (width, height))
    theirs = torch.tensor([RandomResizedCrop.get_params(image, list(scale), [3 / 4, 4 / 3]) for _ in range(n)]).double()
    assert (ours[:, 2] >= 1).all() and (ours[:, 0] + ours[:, 2] <= height).all()
    assert (ours[:, 3] >= 1).all() and (ours[:, 1] + ours[:, 3] <= width).all()
    for column in range(4):  # top, left, height, width
        if torch.equal(ours[:, column].unique(), theirs[:, column].unique()) and ours[:, column].unique().numel() == 1:
            continue  # a constant (the centre-crop fallback): equal, nothing to test
        assert ks_2samp(ours[:, column].numpy(), theirs[:, column].numpy()).pvalue > 1e-3, column


def test_flips_are_fair():
    torch.manual_seed(0)
    flips = torch.cat([torch.from_numpy(draw_crop_boxes(10, 10, [(0.5, 1.0)] * 100)[1]) for _ in range(100)])
    assert abs(flips.double().mean().item() - 0.5) < 4 * (0.25 / 10000) ** 0.5


def photo(width: int = 60, height: int = 45) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_batched_multicrop_gives_uint8_crops_in_the_worker_and_normalised_crops_on_the_device():
    config = AugmentConfig(global_size=32, local_size=16, local_number=3, photometric="batched")
    augment = build_multicrop(config)
    assert isinstance(augment, BatchedMultiCropAugmentation) and augment.num_crops == 5
    torch.manual_seed(0)
    item = augment(photo())
    # stacked per crop size: three tensors to copy to the device whatever the number of local crops
    assert (tuple(item["global"].shape), tuple(item["local"].shape)) == ((2, 3, 32, 32), (3, 3, 16, 16))
    assert item["global"].dtype == item["local"].dtype == torch.uint8
    assert tuple(item["params"].shape) == (5, len(P.FIELDS))
    # DINO's per-crop policies: blur 1.0 / 0.1 / 0.5, solarize only on the second global crop
    assert [(p.blur_p, p.solarize_p) for _s, _c, p in crop_policies(config)] == [(1.0, 0.0), (0.1, 0.2)] + [(0.5, 0.0)] * 3
    views = augment.on_device(default_collate([item, item]), torch.device("cpu"))
    assert [tuple(v.shape) for v in views] == [(2, 3, 32, 32)] * 2 + [(2, 3, 16, 16)] * 3
    assert all(v.dtype == torch.float32 for v in views)
    assert torch.equal(views[0][0], views[0][1])  # same crop, same draws


def test_batched_crops_are_torchvisions_resized_crop_of_the_drawn_box():
    augment = BatchedMultiCropAugmentation(AugmentConfig(global_size=32, local_size=16, local_number=1))
    image = photo()
    torch.manual_seed(5)
    item = augment(image)
    torch.manual_seed(5)
    boxes, flips = draw_crop_boxes(45, 60, [(0.25, 1.0)] * 2 + [(0.05, 0.25)])
    pixels = TF.pil_to_tensor(image)
    for crop, box, flip, size in zip([*item["global"], *item["local"]], boxes.tolist(), flips.tolist(), (32, 32, 16)):
        expected = TF.resized_crop(pixels, *box, [size, size], interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
        assert torch.equal(crop, expected.flip(-1) if flip else expected)


def test_batched_loader_batches_do_not_depend_on_the_worker_count(tiny_shards):
    split = open_split(tiny_shards, "train")
    augment = BatchedMultiCropAugmentation(AugmentConfig(global_size=16, local_size=8, local_number=2))

    def batches(workers: int) -> list[list[torch.Tensor]]:
        dataset = ShardDataset(split, batch_size=4, transform=augment, seed=3, epoch=1)
        loader = DataLoader(dataset, batch_size=4, num_workers=workers)
        return [augment.on_device(batch, torch.device("cpu")) for batch, _labels, _indices in loader]

    inline, pooled = batches(0), batches(2)
    assert len(inline) == len(pooled) > 1
    for a, b in zip(inline, pooled):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_without_local_crops_the_batched_multicrop_gives_the_two_global_ones():
    augment = BatchedMultiCropAugmentation(AugmentConfig(global_size=16, local_size=8, local_number=0))
    torch.manual_seed(0)
    item = augment(photo())
    assert tuple(item["local"].shape) == (0, 3, 8, 8)
    assert [tuple(v.shape) for v in augment.on_device(default_collate([item] * 3), torch.device("cpu"))] == [(3, 3, 16, 16)] * 2


def test_on_device_colours_each_crop_size_in_one_call_byte_for_byte_as_one_call_per_crop(monkeypatch):
    """The batched call must not change a value: the ops are per image, whatever the batch holds."""
    config = AugmentConfig(global_size=24, local_size=12, local_number=5)
    augment = BatchedMultiCropAugmentation(config)
    torch.manual_seed(0)
    items = [augment(photo(60 + 3 * i, 45)) for i in range(7)]
    batch = default_collate(items)
    calls = []
    original = augment_module.apply_photometric
    monkeypatch.setattr(augment_module, "apply_photometric", lambda *a: calls.append(a[0].shape[0]) or original(*a))
    got = augment.on_device(batch, torch.device("cpu"))
    assert calls == [2 * 7, 5 * 7]  # one call per crop size, not one per crop
    crops = [*batch["global"].unbind(1), *batch["local"].unbind(1)]  # crop c: (B, 3, S, S)
    for c, (crop, (_size, _scale, policy)) in enumerate(zip(crops, crop_policies(config))):
        expected = original(crop.contiguous(), batch["params"][:, c], policy)
        assert got[c].shape == expected.shape and torch.equal(got[c], expected), c
    # the draws of this batch exercised every branch, in both groups
    for name in ("jitter", "grayscale", "blur"):
        assert 0 < batch["params"][:, 2:, P.COLUMN[name]].sum() < 7 * 5, name


class CountPythonData(TorchDispatchMode):
    """Counts tensors made from Python data (torch.tensor): on a GPU each is a blocking copy from pageable memory."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.overloadpacket.__name__ in ("lift_fresh", "lift_fresh_copy")
        return func(*args, **(kwargs or {}))


def test_the_colour_constants_are_made_once_per_device_and_dtype():
    policy = P.PhotometricPolicy(blur_p=0.5, solarize_p=0.5, sigma=(0.1, 2.0))
    torch.manual_seed(0)
    params = P.draw_photometric([policy] * 8)
    params[:, P.COLUMN["jitter"]] = 1.0  # hue (hsv_to_rgb's constant) at some position of the random order
    crops = (images(8, 12) * 255).round().to(torch.uint8)
    P._constants.cache_clear()
    counts = []
    for _ in range(3):
        with CountPythonData() as counter:
            result = P.apply_photometric(crops, params, policy)
        counts.append(counter.count)
        assert torch.equal(result, P.apply_photometric(crops, params, policy))
    assert counts == [3, 0, 0]  # mean, std and the HSV offsets, once
    assert P._constants.cache_info().currsize == 1

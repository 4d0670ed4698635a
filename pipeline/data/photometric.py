"""DINO's colour augmentations as per-sample parameters plus batched tensor ops.

``augment.photometric: batched`` splits the multi-crop augmentation in two
(:class:`pipeline.data.augment.BatchedMultiCropAugmentation`): a loader worker
decodes, crops, resizes and flips to uint8, and draws each crop's colour
parameters here (:func:`draw_photometric`) from the per-sample seeded
generator; the training device then applies them to whole batches
(:func:`apply_photometric`). The ops are those of torchvision's tensor kernels
(``v2.functional.adjust_brightness`` ... ``solarize``), with a factor per sample
instead of one per call; the tests check them against those kernels image by
image.

A parameter row (:data:`FIELDS`) holds, for one crop:
``jitter`` (0/1, p=0.8), the four jitter factors, ``order`` (ColorJitter's
random order of the four ops, 4 columns), ``grayscale`` (0/1), ``blur`` (0/1),
``sigma`` (px) and ``solarize`` (0/1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# DINO's ColorJitter(0.4, 0.4, 0.2, 0.1) applied with p=0.8, then RandomGrayscale(p=0.2)
JITTER_P = 0.8
BRIGHTNESS = (0.6, 1.4)
CONTRAST = (0.6, 1.4)
SATURATION = (0.8, 1.2)
HUE = (-0.1, 0.1)
GRAYSCALE_P = 0.2
SOLARIZE_THRESHOLD = 128 / 255  # RandomSolarize(threshold=128) on uint8 images
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale

FIELDS = ("jitter", "brightness", "contrast", "saturation", "hue",
          "order0", "order1", "order2", "order3", "grayscale", "blur", "sigma", "solarize")
COLUMN = {name: i for i, name in enumerate(FIELDS)}
# ColorJitter's op ids, as in torchvision: the order columns hold a permutation of these
BRIGHTNESS_OP, CONTRAST_OP, SATURATION_OP, HUE_OP = range(4)


@dataclass(frozen=True)
class PhotometricPolicy:
    """One crop kind's colour augmentation: blur and solarize probabilities, blur sigma range (px)."""

    blur_p: float
    solarize_p: float
    sigma: tuple[float, float]

    @property
    def kernel_size(self) -> int:
        """torchvision's kernel for the largest sigma: 2 * ceil(3 * sigma_max) + 1."""
        return 2 * math.ceil(3 * self.sigma[1]) + 1


def draw_photometric(policies: list[PhotometricPolicy]) -> Tensor:
    """(len(policies), len(FIELDS)) float32 parameters, one row per crop, from torch's global generator.

    The probabilities and ranges are those of the per-image pipeline
    (:class:`pipeline.data.augment.MultiCropAugmentation`): ColorJitter's
    factors uniform in their ranges and its op order a uniform random
    permutation. Factors of ops that are not applied are drawn anyway, so the
    draws do not depend on the outcome. One torch draw, the rest in NumPy: this
    runs per crop in the loader worker, where small torch ops cost microseconds each.
    """
    u = torch.rand(len(policies), 13, dtype=torch.float64).numpy()
    blur_p = np.array([p.blur_p for p in policies])
    solarize_p = np.array([p.solarize_p for p in policies])
    sigma = np.array([p.sigma for p in policies], dtype=np.float64).reshape(-1, 2)

    def uniform(column: int, low: float | np.ndarray, high: float | np.ndarray) -> np.ndarray:
        return low + (high - low) * u[:, column]

    columns = [
        u[:, 0] < JITTER_P,
        uniform(1, *BRIGHTNESS), uniform(2, *CONTRAST), uniform(3, *SATURATION), uniform(4, *HUE),
        *np.argsort(u[:, 9:13], axis=1).T,  # argsort of iid uniforms: a uniform random permutation
        u[:, 5] < GRAYSCALE_P,
        u[:, 6] < blur_p,
        uniform(7, sigma[:, 0], sigma[:, 1]),
        u[:, 8] < solarize_p,
    ]
    return torch.from_numpy(np.stack(columns, axis=1).astype(np.float32))


# ------------------------------------------------------------------ batched ops
@dataclass(frozen=True)
class _Constants:
    """The colour ops' fixed tensors on one device: (1, 3, 1, 1) each."""

    mean: Tensor
    std: Tensor
    hsv_shifts: Tensor  # hsv_to_rgb's channel offsets n' = 5, 3, 1


@lru_cache(maxsize=None)
def _constants(device: torch.device, dtype: torch.dtype) -> _Constants:
    """Built once per (device, dtype): each ``torch.tensor(..., device=cuda)`` is a blocking copy from pageable memory."""
    def channels(values: tuple[float, ...]) -> Tensor:
        return torch.tensor(values, dtype=dtype, device=device).view(1, 3, 1, 1)

    return _Constants(mean=channels(IMAGENET_MEAN), std=channels(IMAGENET_STD), hsv_shifts=channels((5.0, 3.0, 1.0)))


def _per_sample(factor: Tensor) -> Tensor:
    return factor.view(-1, 1, 1, 1)


def _blend(image: Tensor, other: Tensor, ratio: Tensor) -> Tensor:
    ratio = _per_sample(ratio)
    return (image * ratio + other * (1.0 - ratio)).clamp(0.0, 1.0)


def grayscale(image: Tensor) -> Tensor:
    """(N, 1, H, W) luma of (N, 3, H, W) RGB in [0, 1], torchvision's weights."""
    r, g, b = image.unbind(dim=1)
    return (r * GRAY_WEIGHTS[0] + g * GRAY_WEIGHTS[1] + b * GRAY_WEIGHTS[2]).unsqueeze(1)


def adjust_brightness(image: Tensor, factor: Tensor) -> Tensor:
    """(N, 3, H, W) in [0, 1] scaled by factor (N,), clamped; factor 1 is the identity."""
    return (image * _per_sample(factor)).clamp(0.0, 1.0)


def adjust_contrast(image: Tensor, factor: Tensor) -> Tensor:
    """Blend with each image's mean luma; factor (N,), 1 is the identity."""
    return _blend(image, grayscale(image).mean(dim=(1, 2, 3), keepdim=True), factor)


def adjust_saturation(image: Tensor, factor: Tensor) -> Tensor:
    """Blend with the image's own luma; factor (N,), 1 is the identity."""
    return _blend(image, grayscale(image), factor)


def rgb_to_hsv(image: Tensor) -> Tensor:
    """(N, 3, H, W) RGB in [0, 1] to HSV, all channels in [0, 1) / [0, 1]."""
    r, g, b = image.unbind(dim=1)
    value, _ = image.max(dim=1)
    chroma = value - image.min(dim=1).values
    grey = chroma == 0
    saturation = torch.where(grey, torch.zeros_like(value), chroma / torch.where(grey, torch.ones_like(value), value))
    safe = torch.where(grey, torch.ones_like(chroma), chroma)
    hue = torch.where(value == r, (g - b) / safe, torch.where(value == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    hue = torch.where(grey, torch.zeros_like(hue), hue)
    return torch.stack(((hue / 6.0).remainder(1.0), saturation, value), dim=1)


def hsv_to_rgb(image: Tensor) -> Tensor:
    """Inverse of :func:`rgb_to_hsv`: channel n of RGB is v - v*s*clamp(min(k, 4 - k), 0, 1), k = (n' + 6h) mod 6."""
    hue, saturation, value = (c.unsqueeze(1) for c in image.unbind(dim=1))
    k = (_constants(image.device, image.dtype).hsv_shifts + hue * 6.0).remainder(6.0)
    return value - value * saturation * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)


def adjust_hue(image: Tensor, factor: Tensor) -> Tensor:
    """Rotate the hue by factor (N,) turns, in [-0.5, 0.5]."""
    hsv = rgb_to_hsv(image)
    hue = (hsv[:, :1] + _per_sample(factor)).remainder(1.0)
    return hsv_to_rgb(torch.cat((hue, hsv[:, 1:]), dim=1))


def gaussian_blur(image: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    """(N, C, H, W) blurred with a separable Gaussian of per-sample sigma (N,), reflect padding.

    The kernel is torchvision's: ``kernel_size`` taps, weights
    exp(-x^2 / 2 sigma^2) normalised to sum 1.
    """
    n, c, h, w = image.shape
    half = kernel_size // 2
    offsets = torch.arange(kernel_size, device=image.device, dtype=image.dtype) - half
    weights = torch.softmax(-(offsets.view(1, -1) ** 2) / (2.0 * sigma.view(-1, 1).to(image.dtype) ** 2), dim=1)
    weights = weights.repeat_interleave(c, dim=0)  # (N*C, k): one filter per channel
    flat = F.pad(image.reshape(1, n * c, h, w), (half, half, half, half), mode="reflect")
    flat = F.conv2d(flat, weights.view(n * c, 1, kernel_size, 1), groups=n * c)
    flat = F.conv2d(flat, weights.view(n * c, 1, 1, kernel_size), groups=n * c)
    return flat.view(n, c, h, w)


def apply_photometric(images: Tensor, params: Tensor, policy: PhotometricPolicy) -> Tensor:
    """uint8 (N, 3, H, W) crops and their (N, len(FIELDS)) parameters to float32, ImageNet-normalised.

    Runs on ``images``' device with no host synchronisation (its constant
    tensors are made once per device): every op is computed for the whole
    batch and kept where the sample's draw says so (ops at an identity factor,
    or ``torch.where``), so the result does not depend on how the batch is
    split, and crops of several kinds but one kernel size can share a call.
    """
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 (N, 3, H, W) crops, got {images.dtype} {tuple(images.shape)}")
    if params.shape != (images.shape[0], len(FIELDS)):
        raise ValueError(f"expected ({images.shape[0]}, {len(FIELDS)}) parameters, got {tuple(params.shape)}")
    params = params.to(images.device, torch.float32)
    x = images.float() * (1.0 / 255)  # as torchvision's ToDtype(scale=True), so a no-op draw is exactly its crop
    jitter = params[:, COLUMN["jitter"]] > 0
    one = torch.ones_like(params[:, 0])
    for position in range(4):
        op = params[:, COLUMN[f"order{position}"]]
        for op_id, name, adjust in ((BRIGHTNESS_OP, "brightness", adjust_brightness),
                                    (CONTRAST_OP, "contrast", adjust_contrast),
                                    (SATURATION_OP, "saturation", adjust_saturation)):
            # a factor of exactly 1 leaves a sample unchanged, bit for bit
            x = adjust(x, torch.where(jitter & (op == op_id), params[:, COLUMN[name]], one))
        hue = jitter & (op == HUE_OP)
        x = torch.where(_per_sample(hue), adjust_hue(x, params[:, COLUMN["hue"]]), x)
    x = torch.where(_per_sample(params[:, COLUMN["grayscale"]] > 0), grayscale(x).expand_as(x), x)
    blurred = gaussian_blur(x, params[:, COLUMN["sigma"]], policy.kernel_size)
    x = torch.where(_per_sample(params[:, COLUMN["blur"]] > 0), blurred, x)
    solarize = _per_sample(params[:, COLUMN["solarize"]] > 0) & (x >= SOLARIZE_THRESHOLD)
    x = torch.where(solarize, 1.0 - x, x)
    constants = _constants(x.device, x.dtype)  # float32, as torch.tensor's default before the cache
    return (x - constants.mean) / constants.std

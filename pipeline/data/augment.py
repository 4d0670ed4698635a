"""Image transforms: DINO multi-crop for pre-training, centre crop for evaluation.

Randomness comes from torch's global generator, which the shard reader reseeds
per sample from (seed, epoch, index), so augmentations are identical for any
worker count and after a resume.

Two implementations of the same multi-crop, chosen by ``augment.photometric``:

- ``per_image`` (:class:`MultiCropAugmentation`): torchvision v2 on PIL
  images, everything in the loader worker;
- ``batched`` (:class:`BatchedMultiCropAugmentation`): the worker decodes,
  crops, resizes and flips to uint8 and draws the colour parameters; colour
  jitter, grayscale, blur, solarize and normalisation run on whole batches on
  the training device (:mod:`pipeline.data.photometric`).

Both have ``on_device(batch, device)``, which turns what the DataLoader
collated into the list of normalised crops the model takes.
"""
from __future__ import annotations

from typing import Any, Union

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F
from torchvision.transforms import v2

from pipeline.core.config import AugmentConfig
from pipeline.data.photometric import (
    BRIGHTNESS, CONTRAST, GRAYSCALE_P, HUE, IMAGENET_MEAN, IMAGENET_STD, JITTER_P, SATURATION, PhotometricPolicy,
    apply_photometric, draw_photometric,
)

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "MultiCropAugmentation", "BatchedMultiCropAugmentation",
           "build_multicrop", "blur_sigma", "eval_transform"]

# DINO blurs with sigma in (0.1, 2.0) px on every crop; augment.blur: relative keeps the blur the same
# relative to a 224 px crop, so a 32 px crop is not smeared into a few blobs (the embedded default).
REFERENCE_SIZE = 224
BLUR_SIGMA = (0.1, 2.0)
CROP_RATIO = (3 / 4, 4 / 3)


def _to_normalized_tensor() -> v2.Transform:
    return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def blur_sigma(size: int, mode: str) -> tuple[float, float]:
    """The blur's sigma range (px) on a ``size`` crop: DINO's (0.1, 2.0), scaled by size / 224 when ``relative``."""
    scale = size / REFERENCE_SIZE if mode == "relative" else 1.0
    return BLUR_SIGMA[0] * scale, BLUR_SIGMA[1] * scale


def crop_policies(config: AugmentConfig) -> list[tuple[int, tuple[float, float], PhotometricPolicy]]:
    """(size, scale, colour policy) of each crop: DINO's first global, second global, then the locals."""
    def policy(size: int, blur_p: float, solarize_p: float) -> PhotometricPolicy:
        return PhotometricPolicy(blur_p=blur_p, solarize_p=solarize_p, sigma=blur_sigma(size, config.blur))

    crops = [
        (config.global_size, config.global_scale, policy(config.global_size, 1.0, 0.0)),
        (config.global_size, config.global_scale, policy(config.global_size, 0.1, 0.2)),
    ]
    crops += [(config.local_size, config.local_scale, policy(config.local_size, 0.5, 0.0))] * config.local_number
    return crops


def _gaussian_blur(policy: PhotometricPolicy) -> v2.Transform:
    return v2.RandomApply([v2.GaussianBlur(kernel_size=policy.kernel_size, sigma=policy.sigma)], p=policy.blur_p)


def _flip_and_color_jitter() -> v2.Transform:
    jitter = v2.ColorJitter(brightness=BRIGHTNESS, contrast=CONTRAST, saturation=SATURATION, hue=HUE)
    return v2.Compose(
        [
            v2.RandomHorizontalFlip(p=0.5),
            v2.RandomApply([jitter], p=JITTER_P),
            v2.RandomGrayscale(p=GRAYSCALE_P),
        ]
    )


def _to_device(crops: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    return [c.to(device, non_blocking=True) for c in crops]


def draw_crop_boxes(height: int, width: int, scales: list[tuple[float, float]],
                    ratio: tuple[float, float] = CROP_RATIO, attempts: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """RandomResizedCrop's boxes for several crops of one image, drawn at once from torch's global generator.

    Returns ``(boxes, flips)``: (C, 4) int64 rows ``(top, left, height, width)``
    and (C,) bool horizontal flips (p=0.5). Per crop, as torchvision's
    ``RandomResizedCrop.get_params``: up to ``attempts`` draws of an area
    fraction U(scale) and a log-uniform aspect ratio; the first box that fits
    is placed uniformly; if none fits, the centre crop clamped to ``ratio``.
    One torch draw, the arithmetic in NumPy (see ``photometric.draw_photometric``).
    """
    n, area = len(scales), height * width
    u = torch.rand(n, 2 * attempts + 3, dtype=torch.float64).numpy()
    scale = np.asarray(scales, dtype=np.float64).reshape(n, 2)
    target = area * (scale[:, :1] + (scale[:, 1:] - scale[:, :1]) * u[:, :attempts])
    log_ratio = np.log(ratio)
    aspect = np.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[:, attempts: 2 * attempts])
    box_w = np.round(np.sqrt(target * aspect))  # half to even, as Python's round in torchvision
    box_h = np.round(np.sqrt(target / aspect))
    fits = (box_w > 0) & (box_w <= width) & (box_h > 0) & (box_h <= height)
    first = fits.argmax(axis=1)  # the first attempt that fits (0 when none does)
    rows = np.arange(n)
    box_w, box_h = box_w[rows, first], box_h[rows, first]
    top = np.floor(u[:, -3] * (height - box_h + 1))
    left = np.floor(u[:, -2] * (width - box_w + 1))
    boxes = np.stack([top, left, box_h, box_w], axis=1).astype(np.int64)

    in_ratio = width / height
    if in_ratio < min(ratio):
        centre_w, centre_h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        centre_w, centre_h = int(round(height * max(ratio))), height
    else:
        centre_w, centre_h = width, height
    boxes[~fits.any(axis=1)] = [(height - centre_h) // 2, (width - centre_w) // 2, centre_h, centre_w]
    return boxes, u[:, -1] < 0.5


def resized_crop(pixels: torch.Tensor, box: tuple[int, int, int, int], size: int) -> torch.Tensor:
    """uint8 (3, size, size) of the ``(top, left, height, width)`` box of uint8 (3, H, W) ``pixels``.

    torchvision's ``resized_crop`` (antialiased bicubic, within 2 levels of
    PIL's and about 3 times faster), called through ``interpolate`` on a
    channels-last copy of the box: the same values, in 2/3 of the time.
    """
    top, left, height, width = box
    crop = pixels[None, :, top: top + height, left: left + width].contiguous(memory_format=torch.channels_last)
    return F.interpolate(crop, size=(size, size), mode="bicubic", antialias=True, align_corners=False)[0]


class MultiCropAugmentation:
    """DINO multi-crop: 2 global crops and ``local_number`` local crops, per PIL image.

    Returns a list of tensors: two (3, global_size, global_size) then
    ``local_number`` of (3, local_size, local_size), ImageNet-normalised.
    """

    def __init__(self, config: AugmentConfig):
        self.config = config
        bicubic = v2.InterpolationMode.BICUBIC
        to_tensor = _to_normalized_tensor()

        def crop(size: int, scale: tuple[float, float], policy: PhotometricPolicy, solarize: bool) -> v2.Transform:
            steps = [v2.RandomResizedCrop(size, scale=scale, ratio=CROP_RATIO, interpolation=bicubic),
                     _flip_and_color_jitter(), _gaussian_blur(policy)]
            if solarize:  # the global crops draw for it even at p=0 (DINO's first crop): kept for the same stream
                steps.append(v2.RandomSolarize(threshold=128, p=policy.solarize_p))
            return v2.Compose([*steps, to_tensor])

        first, second, *locals_ = crop_policies(config)
        self.global_first = crop(*first, solarize=True)
        self.global_second = crop(*second, solarize=True)
        self.local = crop(*locals_[0], solarize=False) if locals_ else None

    @property
    def num_crops(self) -> int:
        return 2 + self.config.local_number

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        crops = [self.global_first(image), self.global_second(image)]
        crops.extend(self.local(image) for _ in range(self.config.local_number))
        return crops

    def on_device(self, batch: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        """The collated crops, moved to ``device``."""
        return _to_device(batch, device)


class BatchedMultiCropAugmentation:
    """The same multi-crop, split between the loader worker and the training device.

    ``__call__`` (in the worker) returns ``{"global": uint8 (2, 3, S, S),
    "local": uint8 (L, 3, s, s), "params": (2 + L, len(photometric.FIELDS))
    float32}``: each crop resized (bicubic, antialiased: PIL's resize of the
    crop box) and flipped, with its colour parameters drawn from the per-sample
    seeded generator. The crops of one size come stacked, so a batch is three
    tensors (three host-to-device copies) whatever ``local_number`` is.
    :meth:`on_device` applies the colour ops batch-wise on the device.
    """

    def __init__(self, config: AugmentConfig):
        self.config = config
        self.crops = crop_policies(config)
        # (batch key, first crop, policy): apply_photometric reads only the blur kernel's size from a policy, and
        # the crops of one size share it, so one call colours them all whatever their blur_p / solarize_p
        self.groups: list[tuple[str, int, PhotometricPolicy]] = [("global", 0, self.crops[0][2])]
        if config.local_number:
            self.groups.append(("local", 2, self.crops[2][2]))
        for key, first, policy in self.groups:
            last = 2 if key == "global" else len(self.crops)
            if any(p.kernel_size != policy.kernel_size for _s, _c, p in self.crops[first:last]):
                raise ValueError(f"the {key} crops' blur kernels differ: they cannot be coloured in one call")

    @property
    def num_crops(self) -> int:
        return len(self.crops)

    def __call__(self, image: Image.Image) -> dict[str, Any]:
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        pixels = torch.from_numpy(np.array(rgb)).permute(2, 0, 1)  # (3, H, W)
        boxes, flips = draw_crop_boxes(pixels.shape[1], pixels.shape[2], [scale for _size, scale, _policy in self.crops])
        crops = []
        for (size, _scale, _policy), box, flip in zip(self.crops, boxes.tolist(), flips.tolist()):
            crop = resized_crop(pixels, box, size)
            crops.append(crop.flip(-1) if flip else crop)
        local_size = self.config.local_size
        return {
            "global": torch.stack(crops[:2]),
            "local": torch.stack(crops[2:]) if crops[2:] else torch.empty(0, 3, local_size, local_size, dtype=torch.uint8),
            "params": draw_photometric([policy for _size, _scale, policy in self.crops]),
        }

    def on_device(self, batch: dict[str, Any], device: torch.device) -> list[torch.Tensor]:
        """Collated ``{"global": (B, 2, 3, S, S), "local": (B, L, 3, s, s), "params": (B, 2 + L, P)}``
        to ``2 + L`` normalised float32 (B, 3, size, size) crops on ``device``.

        One :func:`apply_photometric` call per crop size (two in all), on the
        crops in crop-major order (crop c's B images, then crop c+1's: the order
        the model concatenates them in); the crops returned are views of its
        result. The ops are per image, so the values are those of one call per crop.
        """
        params = batch["params"].to(device, non_blocking=True)
        crops: list[torch.Tensor] = []
        for key, first, policy in self.groups:
            images = batch[key].to(device, non_blocking=True)
            batch_size, count = images.shape[0], images.shape[1]
            # uint8 is the cheapest place for the transpose's copy (a quarter of float32's bytes)
            rows = images.transpose(0, 1).reshape(count * batch_size, *images.shape[2:])
            row_params = params[:, first:first + count].transpose(0, 1).reshape(count * batch_size, -1)
            crops.extend(apply_photometric(rows, row_params, policy).split(batch_size))
        return crops


MultiCrop = Union[MultiCropAugmentation, BatchedMultiCropAugmentation]


def build_multicrop(config: AugmentConfig) -> MultiCrop:
    """The multi-crop that ``augment.photometric`` names."""
    if config.photometric == "batched":
        return BatchedMultiCropAugmentation(config)
    return MultiCropAugmentation(config)


def eval_transform(size: int) -> v2.Transform:
    """Resize the short side to size / 0.875 and centre-crop ``size`` (the 256/224 protocol)."""
    return v2.Compose(
        [
            v2.Resize(int(round(size / 0.875)), interpolation=v2.InterpolationMode.BICUBIC),
            v2.CenterCrop(size),
            _to_normalized_tensor(),
        ]
    )

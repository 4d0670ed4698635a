"""Image transforms: DINO multi-crop for pre-training, centre crop for evaluation.

Randomness comes from torch's global generator, which the shard reader reseeds
per sample from (seed, epoch, index), so augmentations are identical for any
worker count and after a resume.
"""
from __future__ import annotations

import math

import torch
from PIL import Image
from torchvision.transforms import v2

from pipeline.core.config import AugmentConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# DINO blurs with sigma in (0.1, 2.0) px on every crop; augment.blur: relative keeps the blur the same
# relative to a 224 px crop, so a 32 px crop is not smeared into a few blobs (the embedded default).
REFERENCE_SIZE = 224
BLUR_SIGMA = (0.1, 2.0)


def _to_normalized_tensor() -> v2.Transform:
    return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def blur_sigma(size: int, mode: str) -> tuple[float, float]:
    """The blur's sigma range (px) on a ``size`` crop: DINO's (0.1, 2.0), scaled by size / 224 when ``relative``."""
    scale = size / REFERENCE_SIZE if mode == "relative" else 1.0
    return BLUR_SIGMA[0] * scale, BLUR_SIGMA[1] * scale


def _gaussian_blur(size: int, p: float, mode: str = "relative") -> v2.Transform:
    sigma = blur_sigma(size, mode)
    kernel = 2 * math.ceil(3 * sigma[1]) + 1
    return v2.RandomApply([v2.GaussianBlur(kernel_size=kernel, sigma=sigma)], p=p)


def _flip_and_color_jitter() -> v2.Transform:
    return v2.Compose(
        [
            v2.RandomHorizontalFlip(p=0.5),
            v2.RandomApply([v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
        ]
    )


class MultiCropAugmentation:
    """DINO multi-crop: 2 global crops and ``local_number`` local crops.

    Returns a list of tensors: two (3, global_size, global_size) then
    ``local_number`` of (3, local_size, local_size), ImageNet-normalised.
    """

    def __init__(self, config: AugmentConfig):
        self.config = config
        bicubic = v2.InterpolationMode.BICUBIC
        to_tensor = _to_normalized_tensor()

        def global_crop(blur_p: float, solarize_p: float) -> v2.Transform:
            return v2.Compose(
                [
                    v2.RandomResizedCrop(config.global_size, scale=config.global_scale, interpolation=bicubic),
                    _flip_and_color_jitter(),
                    _gaussian_blur(config.global_size, blur_p, config.blur),
                    v2.RandomSolarize(threshold=128, p=solarize_p),
                    to_tensor,
                ]
            )

        self.global_first = global_crop(blur_p=1.0, solarize_p=0.0)
        self.global_second = global_crop(blur_p=0.1, solarize_p=0.2)
        self.local = v2.Compose(
            [
                v2.RandomResizedCrop(config.local_size, scale=config.local_scale, interpolation=bicubic),
                _flip_and_color_jitter(),
                _gaussian_blur(config.local_size, 0.5, config.blur),
                to_tensor,
            ]
        )

    @property
    def num_crops(self) -> int:
        return 2 + self.config.local_number

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        crops = [self.global_first(image), self.global_second(image)]
        crops.extend(self.local(image) for _ in range(self.config.local_number))
        return crops


def eval_transform(size: int) -> v2.Transform:
    """Resize the short side to size / 0.875 and centre-crop ``size`` (the 256/224 protocol)."""
    return v2.Compose(
        [
            v2.Resize(int(round(size / 0.875)), interpolation=v2.InterpolationMode.BICUBIC),
            v2.CenterCrop(size),
            _to_normalized_tensor(),
        ]
    )

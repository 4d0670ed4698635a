"""Image folders shaped like the paper's datasets, with cheap synthetic content (tests/test_paper_rehearsal.py).

:func:`write_imagenet_folder`: ImageNet-1k's layout, ``train/<wnid>/<wnid>_<n>.JPEG`` and
``val/<wnid>/ILSVRC2012_val_<n>.JPEG``, every class a colour and a stripe pattern of its own;
:func:`write_cifar_folder`: a CIFAR10-like fine-tuning folder in the layout ``finetune.data_root``
reads (the shard stage's: ``train/<class>/*.png`` and ``val/<class>/*.png``, 32 px PNGs).
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from PIL import Image

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def wnid(index: int) -> str:
    """A WordNet-id-like class folder name (``n01440764``-style); sorted order is index order."""
    return f"n{1_000_000 + 7919 * index:08d}"


@functools.lru_cache(maxsize=None)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    return y, x


def class_image(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size, 3) uint8: a class colour on its complement in stripes of the class's angle and period, the
    stripes' phase and a little noise drawn per image."""
    colour = np.array([(label * 37) % 256, (label * 101 + 80) % 256, (label * 211 + 160) % 256], dtype=np.int16)
    angle = np.pi * (label % 12) / 12
    period = 6 + (label // 12) % 9
    y, x = _grid(size)
    stripes = np.sin((x * np.cos(angle) + y * np.sin(angle) + rng.uniform(0, period)) * (2 * np.pi / period)) > 0
    image = np.where(stripes[..., None], colour, 255 - colour) + rng.integers(-12, 13, (size, size, 3), dtype=np.int16)
    return np.clip(image, 0, 255).astype(np.uint8)


def write_imagenet_folder(root: Path, classes: int = 1000, train: int = 5, val: int = 1, size: int = 64,
                          seed: int = 0, quality: int = 75) -> Path:
    """An ImageNet-layout folder of JPEGs; returns ``root``."""
    rng = np.random.default_rng(seed)
    for label in range(classes):
        name = wnid(label)
        for split, count in (("train", train), ("val", val)):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                file = f"{name}_{i + 1}.JPEG" if split == "train" else f"ILSVRC2012_val_{label * val + i + 1:08d}.JPEG"
                Image.fromarray(class_image(label, size, rng)).save(folder / file, quality=quality)
    return root


def write_cifar_folder(root: Path, train: int = 10, val: int = 2, size: int = 32, seed: int = 1) -> Path:
    """A CIFAR10-like folder (10 classes of 32 px PNGs) in the ImageNet layout fine-tuning reads; returns ``root``."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(CIFAR10_CLASSES):
        for split, count in (("train", train), ("val", val)):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.fromarray(class_image(label * 97, size, rng)).save(folder / f"{i:05d}.png")
    return root

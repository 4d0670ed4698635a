"""The embedded default dataset: one foreground object per image on a cluttered background.

The object's shape (or, for two classes, its texture) is the only thing that
decides the class. Position, scale, rotation, aspect, colours, the background
(base colour, smooth noise, gradient, fine noise) and the distractors (thin
lines, dots, arcs, small irregular blobs) are drawn independently of the class,
so raw pixels and colour statistics carry (almost) no class information while a
model that learns shape does well (figures: ``bench/synthetic_reference.py``).

Every image is a pure function of ``(seed, split, class_index, image_index)``
through :func:`pipeline.core.seeding.derive_seed`, and PNGs are written with fixed
options and no metadata, so a generation is byte-identical across runs.

Layout written by :func:`generate_dataset`::

    root/train/c00_star/c00_star_00000.png ...
    root/val/c09_spiral/c09_spiral_00049.png
"""
from __future__ import annotations

import io
import math
import multiprocessing
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image, ImageDraw

from pipeline.core.config import SyntheticConfig
from pipeline.core.files import replace_dir
from pipeline.core.seeding import derive_seed

SPLITS = ("train", "val")

# Object extent (longest side before rotation) as a share of the image side.
SCALE_RANGE = (0.45, 0.8)
# Object centre lies in this share of the image: off-centre, sometimes clipped.
CENTRE_RANGE = (0.25, 0.75)
# Every colour (background, object, distractors) is one of these, jittered, for
# every class alike. Few colours on purpose: with a free colour per image, two
# crops of one image are matched by their colours alone, and self-supervision
# learns colour instead of shape (docs/embedded-benchmark.md).
PALETTE = ((0.9, 0.2, 0.2), (0.2, 0.8, 0.2), (0.2, 0.3, 0.9), (0.9, 0.9, 0.2), (0.9, 0.3, 0.9), (0.2, 0.9, 0.9))
PALETTE_JITTER = 0.04
# Minimum RGB distance (0..sqrt(3)) between object and background colour, so the
# object stays visible; the rule is the same for every class.
MIN_CONTRAST = 0.45
# Clutter: distractors behind and in front of the object (count ranges, high
# exclusive), and noise amplitudes (std, in [0, 1] colour units).
DISTRACTORS_BEHIND = (0, 3)
DISTRACTORS_FRONT = (0, 1)
SMOOTH_NOISE = (0.02, 0.06)
# Amplitude of the background's linear colour gradient.
GRADIENT = (0.0, 0.15)
FINE_NOISE = (0.0, 0.04)
PIXEL_NOISE = 8.0 / 255
PNG_COMPRESS_LEVEL = 6
# Below this many images, starting worker processes costs more than it saves.
PARALLEL_MIN_IMAGES = 1000

Ops = list[tuple]  # drawing ops in object units, see _draw_ops


@dataclass(frozen=True)
class Shape:
    """One sampled object: drawing ops in unit coordinates (extent about [-1, 1]^2)."""

    ops: Ops
    texture: tuple | None = None  # ("stripes", period) | ("checker", cells), in object units


# ---------------------------------------------------------------- class shapes
# Each maker takes the image's Generator and returns a Shape with small
# per-instance jitter, so no class is a single template a pixel matcher could hit.


def _circle(cx: float, cy: float, r: float, n: int = 48) -> np.ndarray:
    t = np.linspace(0.0, 2 * math.pi, n, endpoint=False)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)


def _star(rng: np.random.Generator) -> Shape:
    points = 5
    inner = rng.uniform(0.38, 0.5)
    t = np.arange(2 * points) * math.pi / points - math.pi / 2
    radius = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return Shape([("poly", np.stack([radius * np.cos(t), radius * np.sin(t)], 1), 1)])


def _cross(rng: np.random.Generator) -> Shape:
    w = rng.uniform(0.24, 0.34)
    bar_h = np.array([[-1, -w], [1, -w], [1, w], [-1, w]], float)
    return Shape([("poly", bar_h, 1), ("poly", bar_h[:, ::-1], 1)])


def _ring(rng: np.random.Generator) -> Shape:
    return Shape([("poly", _circle(0, 0, 1.0), 1), ("poly", _circle(0, 0, rng.uniform(0.5, 0.62)), 0)])


def _triangle(rng: np.random.Generator) -> Shape:
    t = np.array([-90, 30, 150], float) * math.pi / 180 + rng.uniform(-0.12, 0.12, 3)
    return Shape([("poly", np.stack([np.cos(t), np.sin(t)], 1), 1)])


def _crescent(rng: np.random.Generator) -> Shape:
    shift = rng.uniform(0.4, 0.55)
    return Shape([("poly", _circle(0, 0, 1.0), 1), ("poly", _circle(shift, 0, rng.uniform(0.8, 0.9)), 0)])


def _arrow(rng: np.random.Generator) -> Shape:
    w, head_w, head_l = rng.uniform(0.16, 0.24), rng.uniform(0.55, 0.7), rng.uniform(0.6, 0.8)
    x0 = 1.0 - head_l
    pts = [[-1, -w], [x0, -w], [x0, -head_w], [1, 0], [x0, head_w], [x0, w], [-1, w]]
    return Shape([("poly", np.array(pts, float), 1)])


def _heart(rng: np.random.Generator) -> Shape:
    t = np.linspace(0, 2 * math.pi, 64, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    pts = np.stack([x, y + 2.5], 1) / 17.0
    return Shape([("poly", pts * [rng.uniform(0.9, 1.1), 1.0], 1)])


def _stripes(rng: np.random.Generator) -> Shape:
    # Texture class: a plain disc silhouette; only the stripes tell it apart.
    return Shape([("poly", _circle(0, 0, 1.0), 1)], ("stripes", rng.uniform(0.4, 0.55)))


def _checker(rng: np.random.Generator) -> Shape:
    square = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float) * 0.8
    return Shape([("poly", square, 1)], ("checker", int(rng.integers(3, 5))))


def _spiral(rng: np.random.Generator) -> Shape:
    turns = rng.uniform(2.0, 2.5)
    t = np.linspace(0, turns * 2 * math.pi, 90)
    r = 0.12 + 0.88 * t / t[-1]
    return Shape([("line", np.stack([r * np.cos(t), r * np.sin(t)], 1), rng.uniform(0.14, 0.2), 1)])


def _hexagon(rng: np.random.Generator) -> Shape:
    t = np.arange(6) * math.pi / 3
    return Shape([("poly", np.stack([np.cos(t), np.sin(t)], 1), 1)])


def _frame(rng: np.random.Generator) -> Shape:
    inner = rng.uniform(0.5, 0.62)
    square = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float) * 0.85
    return Shape([("poly", square, 1), ("poly", square * inner, 0)])


def _ell(rng: np.random.Generator) -> Shape:
    w = rng.uniform(0.35, 0.45)
    pts = [[-1, -1], [-1 + 2 * w, -1], [-1 + 2 * w, 1 - 2 * w], [1, 1 - 2 * w], [1, 1], [-1, 1]]
    return Shape([("poly", np.array(pts, float) * 0.9, 1)])


def _tee(rng: np.random.Generator) -> Shape:
    w = rng.uniform(0.2, 0.28)
    top = np.array([[-1, -1], [1, -1], [1, -1 + 2 * w], [-1, -1 + 2 * w]], float)
    stem = np.array([[-w, -1], [w, -1], [w, 1], [-w, 1]], float)
    return Shape([("poly", top * 0.95, 1), ("poly", stem * 0.95, 1)])


def _bullseye(rng: np.random.Generator) -> Shape:
    return Shape([
        ("poly", _circle(0, 0, 1.0), 1),
        ("poly", _circle(0, 0, rng.uniform(0.62, 0.7)), 0),
        ("poly", _circle(0, 0, rng.uniform(0.3, 0.38)), 1),
    ])


def _half_disc(rng: np.random.Generator) -> Shape:
    t = np.linspace(0, math.pi, 33)
    return Shape([("poly", np.stack([np.cos(t), np.sin(t) * 1.6 - 0.6], 1), 1)])


def _asterisk(rng: np.random.Generator) -> Shape:
    spokes, w = int(rng.integers(6, 9)), rng.uniform(0.12, 0.17)
    ops: Ops = []
    for k in range(spokes // 2 if spokes % 2 == 0 else spokes):
        t = k * math.pi / (spokes // 2) if spokes % 2 == 0 else k * 2 * math.pi / spokes
        end = np.array([math.cos(t), math.sin(t)])
        start = -end if spokes % 2 == 0 else np.zeros(2)
        ops.append(("line", np.stack([start, end]), w, 1))
    return Shape(ops)


def _polka(rng: np.random.Generator) -> Shape:
    ops: Ops = [("poly", _circle(0, 0, 1.0), 1), ("poly", _circle(0, 0, 0.2), 0)]
    for k in range(6):
        t = k * math.pi / 3
        ops.append(("poly", _circle(0.62 * math.cos(t), 0.62 * math.sin(t), 0.17), 0))
    return Shape(ops)


def _diamond(rng: np.random.Generator) -> Shape:
    w = rng.uniform(0.4, 0.5)
    return Shape([("poly", np.array([[0, -1], [w, 0], [0, 1], [-w, 0]], float), 1)])


def _hourglass(rng: np.random.Generator) -> Shape:
    w = rng.uniform(0.1, 0.2)
    pts = [[-0.9, -1], [0.9, -1], [w, 0], [0.9, 1], [-0.9, 1], [-w, 0]]
    return Shape([("poly", np.array(pts, float), 1)])


def _zigzag(rng: np.random.Generator) -> Shape:
    x = np.linspace(-1, 1, 5)
    y = np.array([-1, 1, -1, 1, -1], float) * rng.uniform(0.45, 0.6)
    return Shape([("line", np.stack([x, y], 1), rng.uniform(0.2, 0.26), 1)])


def _gear(rng: np.random.Generator) -> Shape:
    teeth = int(rng.integers(7, 10))
    t = np.linspace(0, 2 * math.pi, teeth * 8, endpoint=False)
    r = np.where((t * teeth / (2 * math.pi)) % 1.0 < 0.5, 1.0, 0.75)
    return Shape([("poly", np.stack([r * np.cos(t), r * np.sin(t)], 1), 1), ("poly", _circle(0, 0, 0.3), 0)])


def _teardrop(rng: np.random.Generator) -> Shape:
    t = np.linspace(0, 2 * math.pi, 64, endpoint=False)
    x = np.sin(t) * np.sin(t / 2) ** rng.uniform(1.0, 1.4)
    return Shape([("poly", np.stack([x * 0.75, -np.cos(t)], 1), 1)])


def _horseshoe(rng: np.random.Generator) -> Shape:
    t = np.linspace(0, math.pi, 40)
    arc = np.stack([0.65 * np.cos(t), 0.65 * np.sin(t) - 0.2], 1)
    path = np.concatenate([[[0.65, -1.0]], arc, [[-0.65, -1.0]]])
    return Shape([("line", path, rng.uniform(0.26, 0.32), 1)])


def _bolt(rng: np.random.Generator) -> Shape:
    pts = [[-0.2, -1], [0.55, -1], [0.15, -0.15], [0.6, -0.15], [-0.35, 1], [-0.05, 0.1], [-0.5, 0.1]]
    return Shape([("poly", np.array(pts, float) * [rng.uniform(1.0, 1.25), 1.0], 1)])


def _trefoil(rng: np.random.Generator) -> Shape:
    r = rng.uniform(0.42, 0.48)
    ops: Ops = [("poly", _circle(0, 0, 0.35), 1)]
    for k in range(3):
        t = k * 2 * math.pi / 3 - math.pi / 2
        ops.append(("poly", _circle((1 - r) * math.cos(t), (1 - r) * math.sin(t), r), 1))
    return Shape(ops)


# Sorted names == class order (zero-padded index prefix). The first ten are the
# default set and the most distinct from each other.
CLASSES: tuple[tuple[str, Callable[[np.random.Generator], Shape]], ...] = (
    ("star", _star), ("cross", _cross), ("ring", _ring), ("triangle", _triangle),
    ("crescent", _crescent), ("arrow", _arrow), ("heart", _heart), ("stripes", _stripes),
    ("checker", _checker), ("spiral", _spiral), ("hexagon", _hexagon), ("frame", _frame),
    ("ell", _ell), ("tee", _tee), ("bullseye", _bullseye), ("halfdisc", _half_disc),
    ("asterisk", _asterisk), ("polka", _polka), ("diamond", _diamond), ("hourglass", _hourglass),
    ("zigzag", _zigzag), ("gear", _gear), ("teardrop", _teardrop), ("horseshoe", _horseshoe),
    ("bolt", _bolt), ("trefoil", _trefoil),
)
assert len(CLASSES) == 26


def class_names(num_classes: int) -> list[str]:
    """Folder names of the first ``num_classes`` classes, e.g. ``c00_star``; sorted == class order."""
    if not 1 <= num_classes <= len(CLASSES):
        raise ValueError(f"num_classes must be in [1, {len(CLASSES)}], got {num_classes}")
    return [f"c{i:02d}_{name}" for i, (name, _) in enumerate(CLASSES[:num_classes])]


# ---------------------------------------------------------------- rendering


def _supersample(size: int) -> int:
    # Shapes are drawn at a larger canvas and box-filtered down: anti-aliased
    # edges without PIL's (non-existent) polygon anti-aliasing.
    return max(1, min(4, 1024 // size))


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    """A palette colour, slightly jittered: every image draws from the same few colours."""
    base = np.asarray(PALETTE[int(rng.integers(len(PALETTE)))], dtype=np.float64)
    return np.clip(base + rng.normal(0.0, PALETTE_JITTER, 3), 0.0, 1.0)


def _contrasting_colour(rng: np.random.Generator, against: np.ndarray) -> np.ndarray:
    # Rejection sampling with a fixed number of tries keeps it deterministic and
    # class-independent; the fallback (farthest of the tries) is rarely used.
    best, best_d = against, -1.0
    for _ in range(20):
        colour = _random_colour(rng)
        d = float(np.linalg.norm(colour - against))
        if d >= MIN_CONTRAST:
            return colour
        if d > best_d:
            best, best_d = colour, d
    return best


def _to_rgb8(colour: np.ndarray) -> tuple[int, int, int]:
    c = np.clip(np.round(colour * 255), 0, 255).astype(int)
    return int(c[0]), int(c[1]), int(c[2])


def _background(rng: np.random.Generator, size: int, canvas: int) -> tuple[Image.Image, np.ndarray]:
    """Base colour + linear gradient + smooth and mid-frequency noise; returns (RGB canvas, mean colour)."""
    base = _random_colour(rng)
    grid = int(rng.integers(3, 7))
    yy, xx = np.mgrid[0:grid, 0:grid] / (grid - 1) - 0.5
    direction = rng.normal(size=2)
    gradient = (xx * direction[0] + yy * direction[1])[..., None] * rng.uniform(*GRADIENT) * rng.choice([-1, 1], 3)
    smooth = np.clip(base + gradient + rng.normal(0.0, rng.uniform(*SMOOTH_NOISE), (grid, grid, 3)), 0, 1)
    # Mid-frequency "texture" noise (blotches of a few pixels), same for all classes.
    fine_grid = int(rng.integers(8, 17))
    fine = np.clip(rng.normal(0.0, rng.uniform(*FINE_NOISE), (fine_grid, fine_grid, 3)) + 0.5, 0, 1)
    array = _upsample(smooth, size) + _upsample(fine, size) - 127.5
    image = Image.fromarray(np.clip(array, 0, 255).round().astype(np.uint8))
    # Built at the output size and blown up with NEAREST: the final BOX
    # downsample restores it exactly, at a fraction of the cost.
    if canvas != size:
        image = image.resize((canvas, canvas), Image.NEAREST)
    return image, smooth.reshape(-1, 3).mean(0)


def _upsample(values: np.ndarray, size: int) -> np.ndarray:
    """(g, g, 3) floats in [0, 1] -> (size, size, 3) float32 in [0, 255], bicubic."""
    small = Image.fromarray((values * 255).round().astype(np.uint8))
    return np.asarray(small.resize((size, size), Image.BICUBIC), dtype=np.float32)


def _transform(points: np.ndarray, centre: np.ndarray, radius: float, angle: float, aspect: float) -> list[tuple]:
    c, s = math.cos(angle), math.sin(angle)
    p = points * [radius * aspect, radius / aspect]
    p = p @ np.array([[c, s], [-s, c]]) + centre
    return [tuple(map(float, q)) for q in p]


def _draw_ops(draw: ImageDraw.ImageDraw, ops: Ops, centre: np.ndarray, radius: float, angle: float,
              aspect: float, fill_on: int | tuple, fill_off: int | tuple) -> None:
    for op in ops:
        if op[0] == "poly":
            _, pts, on = op
            draw.polygon(_transform(pts, centre, radius, angle, aspect), fill=fill_on if on else fill_off)
        else:  # "line": a polyline of width (object units), round joints
            _, pts, width, on = op
            draw.line(_transform(pts, centre, radius, angle, aspect), fill=fill_on if on else fill_off,
                      width=max(1, round(width * radius)), joint="curve")
            for end in (pts[0], pts[-1]):  # round caps so thick lines do not end in notches
                x, y = _transform(end[None], centre, radius, angle, aspect)[0]
                r = width * radius / 2
                draw.ellipse([x - r, y - r, x + r, y + r], fill=fill_on if on else fill_off)


def _texture_mask(texture: tuple, canvas: int, centre: np.ndarray, radius: float, angle: float,
                  aspect: float, phase: np.ndarray) -> Image.Image:
    """L image, 255 where the second texture colour shows; pattern follows the object's frame."""
    yy, xx = np.mgrid[0:canvas, 0:canvas].astype(np.float32) + 0.5
    c, s = math.cos(angle), math.sin(angle)
    dx, dy = xx - centre[0], yy - centre[1]
    # Inverse of _transform: back to object units, so stripes rotate and scale with the object.
    u = (dx * c + dy * s) / (radius * aspect)
    v = (-dx * s + dy * c) / (radius / aspect)
    if texture[0] == "stripes":
        on = np.floor(u / texture[1] + phase[0]) % 2 == 0
    else:  # checker: cells x cells over the 1.6-unit square
        cell = 1.6 / texture[1]
        on = (np.floor(u / cell + phase[0]) + np.floor(v / cell + phase[1])) % 2 == 0
    return Image.fromarray(np.where(on, 255, 0).astype(np.uint8))


def _distractors(rng: np.random.Generator, draw: ImageDraw.ImageDraw, canvas: int, ss: int, count: int,
                 kinds: tuple[str, ...]) -> None:
    """Small clutter of a different family than any class object: thin lines, dots, arcs, blobs."""
    for _ in range(count):
        kind = kinds[int(rng.integers(len(kinds)))]
        colour = _to_rgb8(_random_colour(rng))
        x, y = rng.uniform(0, canvas, 2)
        if kind == "line":
            length, t = rng.uniform(0.15, 0.6) * canvas, rng.uniform(0, 2 * math.pi)
            end = (x + length * math.cos(t), y + length * math.sin(t))
            draw.line([(x, y), end], fill=colour, width=max(1, round(rng.uniform(0.5, 1.5) * ss)))
        elif kind == "dot":
            r = rng.uniform(0.6, 1.6) * ss
            draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
        elif kind == "arc":
            r = rng.uniform(0.08, 0.2) * canvas
            start = rng.uniform(0, 360)
            draw.arc([x - r, y - r, x + r, y + r], start, start + rng.uniform(40, 140), fill=colour,
                     width=max(1, round(rng.uniform(0.6, 1.4) * ss)))
        else:  # blob: irregular 5-8-gon, small
            n = int(rng.integers(5, 9))
            t = np.sort(rng.uniform(0, 2 * math.pi, n))
            r = rng.uniform(0.03, 0.08) * canvas * rng.uniform(0.5, 1.0, n)
            draw.polygon([(float(x + a * math.cos(b)), float(y + a * math.sin(b))) for a, b in zip(r, t)], fill=colour)


def render_image(class_index: int, rng: np.random.Generator, size: int, record: dict | None = None) -> np.ndarray:
    """One image of class ``class_index`` drawn from ``rng``; returns (size, size, 3) uint8.

    ``record``, when given, receives the drawn scene (see :func:`scene`); it
    changes no draw, so the pixels are the same with or without it.
    """
    ss = _supersample(size)
    canvas = size * ss
    image, bg_mean = _background(rng, size, canvas)
    draw = ImageDraw.Draw(image)
    _distractors(rng, draw, canvas, ss, int(rng.integers(*DISTRACTORS_BEHIND)), ("line", "dot", "arc", "blob"))

    shape = CLASSES[class_index][1](rng)
    centre = rng.uniform(*CENTRE_RANGE, 2) * canvas
    radius = rng.uniform(*SCALE_RANGE) * canvas / 2
    angle = rng.uniform(0, 2 * math.pi)
    aspect = math.exp(rng.uniform(-0.15, 0.15))
    colour = _contrasting_colour(rng, bg_mean)
    second = _contrasting_colour(rng, colour)
    mask = Image.new("L", (canvas, canvas), 0)
    _draw_ops(ImageDraw.Draw(mask), shape.ops, centre, radius, angle, aspect, 255, 0)
    fill = Image.new("RGB", (canvas, canvas), _to_rgb8(colour))
    if shape.texture is not None:
        pattern = _texture_mask(shape.texture, canvas, centre, radius, angle, aspect, rng.uniform(0, 1, 2))
        fill.paste(_to_rgb8(second), mask=pattern)
    image.paste(fill, mask=mask)
    if record is not None:
        record.update(object_colour=colour, second_colour=second, background_colour=bg_mean,
                      centre=centre / canvas, extent=2 * radius / canvas, angle=angle)

    # A few thin lines/dots in front, so the silhouette is never perfectly clean.
    _distractors(rng, ImageDraw.Draw(image), canvas, ss, int(rng.integers(*DISTRACTORS_FRONT)), ("line", "dot"))
    if ss > 1:
        image = image.resize((size, size), Image.BOX)
    array = np.asarray(image, dtype=np.float32)
    array = array + rng.normal(0.0, rng.uniform(0.0, PIXEL_NOISE * 255), array.shape)
    return np.clip(array, 0, 255).round().astype(np.uint8)


def image_rng(seed: int, split: str, class_index: int, image_index: int) -> np.random.Generator:
    """The image's own Generator: a pure function of its identity, never global state."""
    return np.random.default_rng(derive_seed(seed, split, class_index, image_index))


def render(seed: int, split: str, class_index: int, image_index: int, size: int) -> np.ndarray:
    """The (size, size, 3) uint8 image stored at ``split/<class>/<class>_<image_index>.png``."""
    return render_image(class_index, image_rng(seed, split, class_index, image_index), size)


def scene(seed: int, split: str, class_index: int, image_index: int, size: int) -> dict:
    """The class-independent draws behind one stored image: what a model could match instead of the shape.

    Returns ``{"object_colour", "second_colour", "background_colour"}`` as RGB
    floats in [0, 1] (the background's is its mean over the smooth layer),
    ``"centre"`` (x, y) and ``"extent"`` as shares of the side, ``"angle"`` (rad).
    """
    record: dict = {}
    render_image(class_index, image_rng(seed, split, class_index, image_index), size, record)
    return record


def palette_index(colour: np.ndarray) -> int:
    """The :data:`PALETTE` entry nearest to an RGB colour in [0, 1]: which of the few colours it was drawn from."""
    return int(np.argmin(((np.asarray(PALETTE) - np.asarray(colour)) ** 2).sum(axis=1)))


def image_identity(relative_path: str) -> tuple[str, int, int]:
    """``(split, class_index, image_index)`` of a generated file, from its path relative to the dataset root.

    The inverse of the layout :func:`generate_dataset` writes, e.g.
    ``"val/c09_spiral/c09_spiral_00049.png"`` -> ``("val", 9, 49)``.

    Raises:
        ValueError: the path is not in that layout.
    """
    splits = "|".join(SPLITS)
    match = re.fullmatch(rf"(?P<split>{splits})/(?P<folder>c(?P<cls>\d{{2}})_[^/]+)/(?P=folder)_(?P<index>\d+)\.png",
                         relative_path)
    if match is None:
        raise ValueError(f"{relative_path!r} is not a generated image path (<split>/cNN_<name>/cNN_<name>_<index>.png)")
    return match["split"], int(match["cls"]), int(match["index"])


def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes with fixed options and no metadata (deterministic for a given zlib)."""
    buffer = io.BytesIO()
    Image.fromarray(array, mode="RGB").save(buffer, format="PNG", optimize=False, compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


# ---------------------------------------------------------------- dataset folder


def split_sizes(config: SyntheticConfig) -> dict[str, int]:
    """Images per class for each split."""
    return {"train": config.train_per_class, "val": config.val_per_class}


def generate_dataset(root: Path, config: SyntheticConfig, seed: int, progress: bool = True,
                     workers: int | None = None) -> dict:
    """Write ``root/{train,val}/<class>/*.png`` and return a summary.

    The folder is built in a temporary sibling and renamed into place at the
    end, so ``root`` is either the previous complete dataset or the new one,
    never half written. An existing ``root`` is replaced. ``workers`` processes
    render in parallel (default: in-process on <= 2 CPUs or small jobs, else
    up to 8); the bytes do not depend on it.

    Returns:
        {"root", "seed", "image_size", "classes": [names], "counts": {"train": n, "val": n},
         "per_class": {"train": n, "val": n}}
    """
    from tqdm import tqdm

    root = Path(root)
    names = class_names(config.num_classes)
    sizes = split_sizes(config)
    jobs = [(split, class_index, image_index)
            for split, per_class in sizes.items()
            for class_index in range(len(names))
            for image_index in range(per_class)]
    if workers is None:
        workers = _default_workers(len(jobs))
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        for split in sizes:
            for name in names:
                (tmp / split / name).mkdir(parents=True)
        render_one = partial(_render_png, seed, config.image_size)
        with _mapper(workers) as imap, tqdm(total=len(jobs), desc="generate", unit="img", disable=not progress) as bar:
            for (split, class_index, image_index), png in zip(jobs, imap(render_one, jobs)):
                name = names[class_index]
                (tmp / split / name / f"{name}_{image_index:05d}.png").write_bytes(png)
                bar.update(1)
        replace_dir(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {
        "root": str(root),
        "seed": seed,
        "image_size": config.image_size,
        "classes": names,
        "counts": {split: n * len(names) for split, n in sizes.items()},
        "per_class": dict(sizes),
    }


def _default_workers(images: int) -> int:
    # Spawned workers each import numpy/PIL/torch (~2 s): only worth it for big
    # jobs on machines with cores to spare (measured slower on 2 shared cores).
    cpus = os.cpu_count() or 1
    return min(8, cpus) if images >= PARALLEL_MIN_IMAGES and cpus > 2 else 1


def _render_png(seed: int, size: int, job: tuple[str, int, int]) -> bytes:
    split, class_index, image_index = job
    return encode_png(render(seed, split, class_index, image_index, size))


@contextmanager
def _mapper(workers: int) -> Iterator[Callable]:
    """An ordered ``imap``: in-process for one worker, else a process pool."""
    if workers <= 1:
        yield map
        return
    # spawn, not fork: the caller may hold torch threads, which fork can deadlock.
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield partial(pool.imap, chunksize=32)

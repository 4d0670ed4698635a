"""The five masking strategies (docs/method.md, "Masks").

A mask is a boolean tensor ``(B, H, W)`` over the patch grid, ``True`` = masked
(the student sees the mask token there). For every image:

1. with probability ``config.prob`` it is masked at all, else its mask is empty
   (``prob_scope: attention``: only for the AttMask strategies; random and
   block then mask every image, as the official AttMask code);
2. a ratio ``r ~ U(ratio - ratio_var, ratio + ratio_var)`` gives the target
   count ``N = floor(r * P)`` of the ``P = H * W`` patches (``ratio_per:
   batch``: one ``r`` for the whole batch, as the official AttMask code);
3. the strategy chooses which patches:

   - ``random``: exactly ``N`` patches, uniformly at random;
   - ``block``: BEiT/iBOT block-wise, a union of random rectangles covering
     **at most** ``N`` patches (it stops early when no rectangle fits);
   - ``attmask_high``: exactly the ``N`` most attended patches;
   - ``attmask_low``: exactly the ``N`` least attended patches;
   - ``attmask_hint``: as high, then ``K = floor(show_max * r * P)`` of the
     masked patches among the top ``S = floor(show_max * P)`` most attended are
     revealed again, so ``N - K`` stay masked.

Randomness. Everything comes from the ``torch.Generator`` passed in (a CPU
generator), consumed in this fixed order, whatever the outcome of earlier draws:

1. ``torch.rand(B, float64)``: image masked iff ``u < prob``;
2. ``torch.rand(B, float64)``: ``r = lo + (hi - lo) * u`` (drawn for every
   image, masked or not; with ``ratio_per: batch`` every image takes the
   first draw's ``r``, and ``attmask_hint`` then draws ``torch.rand(1,
   float64)`` for an independent reveal ratio);
3. strategy draws: ``random`` ``torch.rand(B, P)`` (sort keys); ``block``
   ``torch.randint(2**62, (B,))`` (one seed per image for a private
   :class:`random.Random` that places that image's rectangles: the block loop
   is sequential and Python's generator is >10x cheaper per scalar than
   torch's); ``attmask_hint`` ``torch.rand(B, S)`` (which hints to reveal);
   ``attmask_high`` / ``attmask_low`` draw nothing more.

Ties in attention are broken deterministically by a stable sort: among equal
values the lower patch index counts as more attended for ``high``/``hint`` and
as less attended for ``low`` (i.e. the lower index is masked first).

Everything except ``block`` is vectorised over the batch; ``block`` loops
over images in Python, which is cheap on the small grids it runs on. In
training, ``random`` and ``block`` masks are drawn in the loader workers
(:class:`StepMasks`), the AttMask ones in the step, from the teacher's attention.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.core.config import MaskingConfig
from pipeline.core.seeding import make_generator
from pipeline.core.strategies import ATTENTION_STRATEGIES, MASKING_STRATEGIES

BLOCK_MIN_ASPECT = 0.3  # BEiT/iBOT: aspect ratio log-uniform in (0.3, 1/0.3)
BLOCK_ATTEMPTS = 10  # tries per rectangle before giving up (BEiT/iBOT)

Rectangle = tuple[int, int, int, int]  # (top, left, height, width) in patches


@dataclass(frozen=True)
class MaskDraw:
    """One batch of masks plus what was drawn to make them.

    Attributes:
        masks: ``(B, H, W)`` bool, True = masked; on ``attention.device`` if
            attention was given, else CPU.
        masked: ``(B,)`` bool (CPU), whether the image is masked at all.
        ratios: ``(B,)`` float64 (CPU), the drawn ratio ``r`` (for every image).
        counts: ``(B,)`` int64 (CPU), target count ``floor(r * P)`` for masked
            images, 0 for the others. Exact for random/high/low; an upper
            bound for block; hint masks ``counts - revealed``.
        revealed: ``(B,)`` int64 (CPU), hints revealed (``attmask_hint`` only,
            else zeros).
        rectangles: for ``block``, per image the rectangles accepted, in order;
            ``None`` for the other strategies.
    """

    masks: torch.Tensor
    masked: torch.Tensor
    ratios: torch.Tensor
    counts: torch.Tensor
    revealed: torch.Tensor
    rectangles: list[list[Rectangle]] | None = None


def generate_masks(
    config: MaskingConfig,
    batch_size: int,
    grid: tuple[int, int],
    generator: torch.Generator,
    attention: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean masks ``(batch_size, H, W)``, True = masked.

    Args:
        config: strategy and ratio parameters.
        batch_size: B.
        grid: ``(H, W)`` patch grid.
        generator: CPU generator; the only source of randomness (see module doc).
        attention: ``(B, H*W)`` float teacher [CLS]->patch attention, row-major
            over the grid; required for ``attmask_*``.
    """
    return sample_masks(config, batch_size, grid, generator, attention).masks


def step_generator(seed: int, epoch: int, step: int, crop: int) -> torch.Generator:
    """The masks' only generator for global crop ``crop`` of (epoch, step): a pure function of them."""
    return make_generator(seed, "mask", epoch, step, crop)


@dataclass(frozen=True)
class StepMasks:
    """The masks of one epoch's steps, for the strategies that need no attention (``random``, ``block``).

    Called with a step, it draws what the training step would: for each of
    ``crops`` global crops, :func:`generate_masks` over the whole *global*
    batch from :func:`step_generator`. It runs in the loader worker
    (``ShardDataset(per_step=...)``), so the step neither loops over images in
    Python nor copies masks from pageable memory; picklable for spawned workers.
    """

    config: MaskingConfig
    seed: int
    epoch: int
    batch_size: int  # the global batch G; each rank takes its rows
    grid: tuple[int, int]
    crops: int = 2

    def __post_init__(self) -> None:
        if self.config.strategy in ATTENTION_STRATEGIES:
            raise ValueError(f"masking.strategy={self.config.strategy!r} needs the teacher's attention: "
                             "its masks are drawn in the training step")

    def __call__(self, step: int) -> torch.Tensor:
        """``(G, crops, H, W)`` bool, True = masked: row i holds image i's mask of every global crop."""
        return torch.stack([
            generate_masks(self.config, self.batch_size, self.grid, step_generator(self.seed, self.epoch, step, crop))
            for crop in range(self.crops)
        ], dim=1)


def sample_masks(
    config: MaskingConfig,
    batch_size: int,
    grid: tuple[int, int],
    generator: torch.Generator,
    attention: torch.Tensor | None = None,
) -> MaskDraw:
    """As :func:`generate_masks`, also returning the per-image draws (for tests and figures)."""
    height, width = _check_inputs(config, batch_size, grid, generator, attention)
    num_patches = height * width
    masked, ratios, counts = sample_mask_counts(config, batch_size, num_patches, generator)
    device = attention.device if attention is not None else torch.device("cpu")
    revealed = torch.zeros(batch_size, dtype=torch.int64)
    rectangles = None

    if config.strategy == "random":
        flat = random_masks(counts, num_patches, generator).to(device)
    elif config.strategy == "block":
        # official: iBOT's float budget r * P (zero where the image is not masked) and its strict fit
        budgets = torch.where(counts > 0, ratios * num_patches, 0.0) if config.block_rule == "official" else counts
        flat, rectangles = block_masks(budgets, (height, width), generator, strict=config.block_rule == "official")
        flat = flat.to(device)
    elif config.strategy == "attmask_high":
        flat = attention_masks(attention, counts, highest=True)
    elif config.strategy == "attmask_low":
        flat = attention_masks(attention, counts, highest=False)
    else:  # attmask_hint
        hint_ratios = ratios
        if config.ratio_per == "batch":  # the official code draws the reveal count's ratio separately
            low, high = config.ratio - config.ratio_var, config.ratio + config.ratio_var
            u = torch.rand(1, dtype=torch.float64, generator=generator)
            hint_ratios = (low + (high - low) * u).clamp_(0.0, 1.0).repeat(batch_size)
        revealed = hint_counts(hint_ratios, counts, num_patches, config.show_max)
        flat = hint_masks(attention, counts, revealed, config.show_max, generator)
    return MaskDraw(flat.view(batch_size, height, width), masked, ratios, counts, revealed, rectangles)


def sample_mask_counts(
    config: MaskingConfig, batch_size: int, num_patches: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Steps 1-2 of the module doc: who is masked, the ratios, the target counts.

    Returns:
        masked ``(B,)`` bool, ratios ``(B,)`` float64, counts ``(B,)`` int64
        (``floor(r * P)``, zeroed where not masked), all on CPU.
    """
    masked = torch.rand(batch_size, dtype=torch.float64, generator=generator) < config.prob
    if config.prob_scope == "attention" and config.strategy not in ATTENTION_STRATEGIES:
        masked = torch.ones(batch_size, dtype=torch.bool)
    low, high = config.ratio - config.ratio_var, config.ratio + config.ratio_var
    u = torch.rand(batch_size, dtype=torch.float64, generator=generator)
    if config.ratio_per == "batch" and batch_size:
        u = u[:1].repeat(batch_size)
    # lo + (hi - lo) * u is exactly `ratio` when ratio_var == 0 (MAE-style 0.75 stays 0.75)
    ratios = (low + (high - low) * u).clamp_(0.0, 1.0)
    counts = torch.floor(ratios * num_patches).to(torch.int64).clamp_(0, num_patches)
    return masked, ratios, torch.where(masked, counts, torch.zeros_like(counts))


def random_masks(counts: torch.Tensor, num_patches: int, generator: torch.Generator) -> torch.Tensor:
    """``(B, P)`` masks with exactly ``counts[b]`` patches chosen uniformly (MAE-style argsort of noise)."""
    noise = torch.rand(counts.shape[0], num_patches, generator=generator)
    order = torch.sort(noise, dim=1, stable=True).indices
    return _scatter_first(order, counts.to(order.device))


def attention_masks(attention: torch.Tensor, counts: torch.Tensor, highest: bool) -> torch.Tensor:
    """``(B, P)`` masks of the ``counts[b]`` highest (or lowest) attended patches, on ``attention.device``.

    Stable sort: among equal attention the lower patch index is taken first.
    """
    order = torch.sort(attention, dim=1, descending=highest, stable=True).indices
    # non_blocking: a blocking copy to the GPU waits for all queued work (a host sync every step)
    return _scatter_first(order, counts.to(attention.device, non_blocking=True))


def hint_counts(ratios: torch.Tensor, counts: torch.Tensor, num_patches: int, show_max: float) -> torch.Tensor:
    """``(B,)`` int64: hints to reveal, ``floor(show_max * r * P)``, 0 for unmasked images.

    Clipped to the masked tokens among the top ``floor(show_max * P)``,
    ``min(N, S)``. Mathematically ``K <= min(N, S)`` already (``r, show_max <=
    1``); the clip only guards against floating-point rounding.
    """
    top = math.floor(show_max * num_patches)
    wanted = torch.floor(show_max * ratios * num_patches).to(torch.int64)
    return torch.minimum(wanted, counts.clamp(max=top))


def hint_masks(
    attention: torch.Tensor,
    counts: torch.Tensor,
    revealed: torch.Tensor,
    show_max: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """``(B, P)`` AttMask-Hint masks on ``attention.device``.

    The top ``counts[b]`` patches are masked, then ``revealed[b]`` of them,
    drawn uniformly without replacement from the masked ones among the top
    ``S = floor(show_max * P)``, are un-masked. Draws ``torch.rand(B, S)``.
    """
    batch, num_patches = attention.shape
    device = attention.device
    top = math.floor(show_max * num_patches)
    order = torch.sort(attention, dim=1, descending=True, stable=True).indices
    ranks = torch.arange(num_patches, device=device)
    counts_d = counts.to(device, non_blocking=True)  # no host sync (see attention_masks)
    in_rank_order = ranks < counts_d[:, None]  # (B, P): position j of the descending order is masked
    if top > 0:
        keys = torch.rand(batch, top, generator=generator).to(device, non_blocking=True)
        eligible = ranks[:top] < counts_d.clamp(max=top)[:, None]
        # ineligible positions sort after every uniform key, so the first `revealed`
        # picks are a uniform sample of the eligible ones
        keys = torch.where(eligible, keys, torch.full_like(keys, 2.0))
        picks = torch.sort(keys, dim=1, stable=True).indices
        reveal = _scatter_first(picks, revealed.to(device, non_blocking=True))
        in_rank_order[:, :top] &= ~reveal
    return torch.zeros_like(in_rank_order).scatter_(1, order, in_rank_order)


def block_masks(
    counts: torch.Tensor, grid: tuple[int, int], generator: torch.Generator, strict: bool = False
) -> tuple[torch.Tensor, list[list[Rectangle]]]:
    """``(B, P)`` block-wise masks (CPU) and each image's rectangles.

    ``counts``: ``(B,)`` budgets, integer or (``masking.block_rule: official``)
    float. Draws one seed per image (``torch.randint(2**62, (B,))``), then runs
    :func:`block_mask` with a private :class:`random.Random` per image.
    """
    seeds = torch.randint(2**62, (counts.shape[0],), generator=generator).tolist()
    masks, rectangles = [], []
    for count, seed in zip(counts.tolist(), seeds):
        mask, rects = block_mask(count, grid, random.Random(seed), strict=strict)
        masks.append(mask.reshape(-1))
        rectangles.append(rects)
    if not masks:
        return torch.zeros(0, grid[0] * grid[1], dtype=torch.bool), rectangles
    return torch.from_numpy(np.stack(masks)), rectangles


def block_mask(count: float, grid: tuple[int, int], rng: random.Random,
               strict: bool = False) -> tuple[np.ndarray, list[Rectangle]]:
    """One BEiT/iBOT block-wise mask ``(H, W)`` covering at most ``count`` patches.

    Repeatedly: up to 10 tries of a rectangle with target area
    ``U((min(H, W) // 3) ** 2, count - covered)`` and aspect ratio log-uniform
    in (0.3, 1/0.3) at a uniform position; the first that fits in the grid and
    adds between 1 and ``count - covered`` new patches is accepted. Stops when
    ``count`` patches are covered or 10 tries add nothing.

    By default a rectangle "fits" when ``h <= H and w <= W``, so full-width or
    full-height blocks are allowed and 1-row grids can be masked. ``strict``
    is iBOT's ``MaskingGenerator`` rule, ``h < H and w < W``; with a float
    ``count`` (iBOT's ``r * P``) the area draws and the last rectangle's room
    follow the unrounded budget, as there (the covered count is the same).
    """
    height, width = grid
    mask = np.zeros((height, width), dtype=bool)
    rects: list[Rectangle] = []
    min_area = (min(height, width) // 3) ** 2
    log_aspect = (math.log(BLOCK_MIN_ASPECT), math.log(1 / BLOCK_MIN_ASPECT))
    covered = 0
    while covered < count:
        left_to_cover = count - covered
        added = 0
        for _ in range(BLOCK_ATTEMPTS):
            target_area = rng.uniform(min_area, left_to_cover)
            aspect = math.exp(rng.uniform(*log_aspect))
            h = int(round(math.sqrt(target_area * aspect)))
            w = int(round(math.sqrt(target_area / aspect)))
            # iBOT's test lets an empty (0-row) rectangle draw a position and add nothing: same random stream
            fits = h < height and w < width if strict else 1 <= h <= height and 1 <= w <= width
            if not fits:
                continue
            top = rng.randint(0, height - h)
            left = rng.randint(0, width - w)
            window = mask[top : top + h, left : left + w]
            new = h * w - int(np.count_nonzero(window))
            if 0 < new <= left_to_cover:
                window[...] = True
                rects.append((top, left, h, w))
                added = new
                break
        if added == 0:
            break
        covered += added
    return mask, rects


def _scatter_first(order: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``(B, L)`` bool: True at ``order[b, :counts[b]]``."""
    ranks = torch.arange(order.shape[1], device=order.device)
    return torch.zeros(order.shape, dtype=torch.bool, device=order.device).scatter_(
        1, order, ranks < counts[:, None]
    )


def _check_inputs(
    config: MaskingConfig,
    batch_size: int,
    grid: tuple[int, int],
    generator: torch.Generator,
    attention: torch.Tensor | None,
) -> tuple[int, int]:
    if config.strategy not in MASKING_STRATEGIES:
        raise ValueError(f"masking.strategy: unknown {config.strategy!r}; allowed values: {list(MASKING_STRATEGIES)}")
    if batch_size < 0:
        raise ValueError(f"batch_size must be >= 0, got {batch_size}")
    if len(grid) != 2 or any(int(g) != g or g < 1 for g in grid):
        raise ValueError(f"grid must be two positive integers (H, W), got {grid!r}")
    if generator.device.type != "cpu":
        raise ValueError(f"generator must be a CPU torch.Generator, got one on {generator.device}")
    height, width = int(grid[0]), int(grid[1])
    if config.strategy in ATTENTION_STRATEGIES and attention is None:
        raise ValueError(
            f"masking.strategy={config.strategy!r} needs the teacher's [CLS] attention: "
            f"pass attention of shape ({batch_size}, {height * width})"
        )
    if attention is not None:
        if tuple(attention.shape) != (batch_size, height * width):
            raise ValueError(
                f"attention must have shape (batch_size, H*W) = ({batch_size}, {height * width}) "
                f"for grid {height}x{width}, got {tuple(attention.shape)}"
            )
        if not attention.is_floating_point():
            raise ValueError(f"attention must be a floating-point tensor, got {attention.dtype}")
    return height, width

"""The five masking strategies (docs/method.md, "Masks"): counts, semantics, determinism, errors."""
from __future__ import annotations

import dataclasses
import math
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from pipeline.core.config import MaskingConfig
from pipeline.core.seeding import make_generator
from pipeline.core.strategies import MASKING_STRATEGIES
from pipeline.method.masking import StepMasks, block_mask, generate_masks, sample_mask_counts, sample_masks

GRIDS = [(1, 1), (1, 7), (2, 2), (4, 4), (8, 8), (14, 14), (6, 10)]
ATTMASK = ("attmask_high", "attmask_hint", "attmask_low")


def attention_for(batch: int, grid: tuple[int, int], seed: int = 123) -> torch.Tensor:
    """Distinct positive attention rows (B, H*W) summing to one, like a softmax."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, grid[0] * grid[1], generator=gen, dtype=torch.float64).softmax(dim=1)


def draw(strategy: str, batch: int, grid: tuple[int, int], seed: int = 0, **overrides):
    config = MaskingConfig(strategy=strategy, **overrides)
    attention = attention_for(batch, grid) if strategy in ATTMASK else None
    return config, attention, sample_masks(config, batch, grid, make_generator(seed, "test"), attention)


def expected_draws(config: MaskingConfig, batch: int, num_patches: int, seed: int):
    """Steps 1-2 of the documented consumption order, recomputed independently with Python floats."""
    gen = make_generator(seed, "test")
    u_prob = torch.rand(batch, dtype=torch.float64, generator=gen).tolist()
    u_ratio = torch.rand(batch, dtype=torch.float64, generator=gen).tolist()
    low, high = config.ratio - config.ratio_var, config.ratio + config.ratio_var
    ratios = [low + (high - low) * u for u in u_ratio]
    masked = [u < config.prob for u in u_prob]
    counts = [math.floor(r * num_patches) if m else 0 for r, m in zip(ratios, masked)]
    return masked, ratios, counts


# ----------------------------------------------------------------- counts
@pytest.mark.parametrize("strategy", MASKING_STRATEGIES)
@pytest.mark.parametrize("grid", GRIDS)
def test_masked_count_is_floor_r_times_p(strategy, grid):
    batch, seed = 64, 7
    config, _, result = draw(strategy, batch, grid, seed)
    num_patches = grid[0] * grid[1]
    masked, ratios, counts = expected_draws(config, batch, num_patches, seed)
    assert result.masks.shape == (batch, *grid) and result.masks.dtype == torch.bool
    assert result.masked.tolist() == masked
    assert result.counts.tolist() == counts
    got = result.masks.sum(dim=(1, 2)).tolist()
    for b in range(batch):
        if not masked[b]:
            assert got[b] == 0
        elif strategy == "block":
            assert got[b] <= counts[b]  # block may stop early when no rectangle fits
        elif strategy == "attmask_hint":
            revealed = math.floor(config.show_max * ratios[b] * num_patches)
            assert result.revealed[b] == revealed
            assert got[b] == counts[b] - revealed
        else:
            assert got[b] == counts[b]


def test_mae_style_random_masks_exactly_three_quarters():
    config = MaskingConfig(strategy="random", ratio=0.75, ratio_var=0.0, prob=1.0)
    for grid in [(14, 14), (8, 8), (6, 10), (7, 3)]:
        masks = generate_masks(config, 32, grid, make_generator(0, "mae"))
        assert masks.sum(dim=(1, 2)).tolist() == [math.floor(0.75 * grid[0] * grid[1])] * 32


@pytest.mark.parametrize("prob", [0.1, 0.5, 0.9])
def test_share_of_masked_images_matches_prob(prob):
    batch = 4000
    _, _, result = draw("random", batch, (8, 8), seed=3, prob=prob)
    nonempty = (result.masks.sum(dim=(1, 2)) > 0).float()
    # ratio 0.3 +- 0.2 on 64 patches gives N >= 6, so every masked image is non-empty
    assert torch.equal(nonempty.bool(), result.masked)
    sigma = math.sqrt(batch * prob * (1 - prob))
    assert abs(nonempty.sum().item() - batch * prob) < 3 * sigma


@pytest.mark.parametrize("prob, expected", [(0.0, 0), (1.0, 200)])
def test_prob_zero_and_one_are_exact(prob, expected):
    _, _, result = draw("attmask_high", 200, (8, 8), prob=prob)
    assert int((result.masks.sum(dim=(1, 2)) > 0).sum()) == expected


def test_ratio_is_uniform_over_its_range():
    _, _, result = draw("random", 4000, (14, 14), prob=1.0, ratio=0.3, ratio_var=0.2)
    r = result.ratios
    assert r.min() >= 0.1 and r.max() <= 0.5
    assert abs(r.mean().item() - 0.3) < 3 * 0.4 / math.sqrt(12 * 4000)
    assert abs(((r - 0.1) / 0.4 < 0.25).float().mean().item() - 0.25) < 0.03


# --------------------------------------------------------------- attention
@pytest.mark.parametrize("grid", [(4, 4), (8, 8), (14, 14), (6, 10)])
def test_high_masks_exactly_the_top_n(grid):
    _, attention, result = draw("attmask_high", 64, grid, prob=1.0)
    flat = result.masks.view(64, -1)
    for b in range(64):
        n = int(result.counts[b])
        top = set(torch.topk(attention[b], n).indices.tolist()) if n else set()
        assert set(torch.nonzero(flat[b]).flatten().tolist()) == top


@pytest.mark.parametrize("grid", [(4, 4), (8, 8), (14, 14), (6, 10)])
def test_low_masks_exactly_the_bottom_n(grid):
    _, attention, result = draw("attmask_low", 64, grid, prob=1.0)
    flat = result.masks.view(64, -1)
    for b in range(64):
        n = int(result.counts[b])
        bottom = set(torch.topk(attention[b], n, largest=False).indices.tolist()) if n else set()
        assert set(torch.nonzero(flat[b]).flatten().tolist()) == bottom


def test_attention_ties_mask_lower_indices_first():
    attention = torch.full((3, 16), 1 / 16)
    for strategy in ("attmask_high", "attmask_low"):
        config = MaskingConfig(strategy=strategy, ratio=0.25, ratio_var=0.0, prob=1.0)
        masks = generate_masks(config, 3, (4, 4), make_generator(0), attention).view(3, 16)
        assert masks[:, :4].all() and not masks[:, 4:].any()


@pytest.mark.parametrize(
    "ratio, ratio_var, show_max, grid",
    [(0.3, 0.2, 0.1, (14, 14)), (0.3, 0.2, 0.1, (8, 8)), (0.5, 0.0, 0.2, (8, 8)),
     (0.05, 0.0, 0.5, (14, 14)), (0.3, 0.2, 0.6, (6, 10)), (0.5, 0.5, 1.0, (4, 4))],
)
def test_hint_reveals_the_stated_number_only_from_the_top_set(ratio, ratio_var, show_max, grid):
    batch, num_patches = 64, grid[0] * grid[1]
    overrides = dict(ratio=ratio, ratio_var=ratio_var, show_max=show_max, prob=1.0)
    _, attention, hint = draw("attmask_hint", batch, grid, **overrides)
    _, _, high = draw("attmask_high", batch, grid, **overrides)  # same seed: same N per image
    assert torch.equal(hint.counts, high.counts)
    high_flat, hint_flat = high.masks.view(batch, -1), hint.masks.view(batch, -1)
    assert not (hint_flat & ~high_flat).any(), "hint may only un-mask, never mask more"
    revealed = high_flat & ~hint_flat
    top_size = math.floor(show_max * num_patches)
    for b in range(batch):
        wanted = math.floor(show_max * float(hint.ratios[b]) * num_patches)
        # K <= min(N, S) holds for r, show_max <= 1, so no clipping happens here
        assert int(revealed[b].sum()) == wanted == int(hint.revealed[b])
        top = set(torch.topk(attention[b], top_size).indices.tolist()) if top_size else set()
        assert set(torch.nonzero(revealed[b]).flatten().tolist()) <= top


def test_hint_reveals_uniformly_among_the_masked_top_set():
    # N = 32, S = 12, K = floor(0.2 * 0.5 * 64) = 6: each top-12 token revealed with p = 1/2
    batch = 2000
    config = MaskingConfig(strategy="attmask_hint", ratio=0.5, ratio_var=0.0, prob=1.0, show_max=0.2)
    attention = torch.linspace(1.0, 0.0, 64).expand(batch, 64)  # token i is the i-th most attended
    masks = generate_masks(config, batch, (8, 8), make_generator(0, "hint"), attention).view(batch, 64)
    shown = (~masks[:, :12]).float().mean(dim=0)
    assert (shown - 0.5).abs().max() < 4 * math.sqrt(0.25 / batch)
    assert masks[:, 12:32].all() and not masks[:, 32:].any()


# ------------------------------------------------------------------- block
def components(mask: np.ndarray) -> int:
    """Number of 4-connected components of True cells."""
    seen = np.zeros_like(mask)
    count = 0
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        count += 1
        stack = [start]
        seen[start] = True
        while stack:
            i, j = stack.pop()
            for ni, nj in ((i + 1, j), (i - 1, j), (i, j + 1), (i, j - 1)):
                if 0 <= ni < mask.shape[0] and 0 <= nj < mask.shape[1] and mask[ni, nj] and not seen[ni, nj]:
                    seen[ni, nj] = True
                    stack.append((ni, nj))
    return count


@pytest.mark.parametrize("grid", GRIDS)
def test_block_masks_are_unions_of_rectangles_within_the_grid(grid):
    height, width = grid
    _, _, result = draw("block", 64, grid, prob=1.0)
    for b in range(64):
        union = torch.zeros(grid, dtype=torch.bool)
        for top, left, h, w in result.rectangles[b]:
            assert h >= 1 and w >= 1 and 0 <= top <= height - h and 0 <= left <= width - w
            union[top : top + h, left : left + w] = True
        assert torch.equal(union, result.masks[b])
        assert int(result.masks[b].sum()) <= int(result.counts[b])


@pytest.mark.parametrize("grid", [(14, 14), (8, 8)])
def test_block_masks_are_blocky_not_scattered(grid):
    # a property that random masks of the same size fail: few connected pieces
    _, _, block = draw("block", 300, grid, prob=1.0)
    _, _, scattered = draw("random", 300, grid, prob=1.0)
    block_pieces = np.mean([components(m.numpy()) for m in block.masks])
    random_pieces = np.mean([components(m.numpy()) for m in scattered.masks])
    assert block_pieces < 2.5 < 6 < random_pieces
    # and it covers (nearly) the target: the early stop is rare on these grids
    coverage = block.masks.sum(dim=(1, 2)).double() / block.counts.double()
    assert coverage.mean() > 0.95


def test_block_mask_helper_respects_count_on_any_grid():
    rng = random.Random(0)
    for height in range(1, 9):
        for width in range(1, 9):
            for count in range(height * width + 1):
                mask, rects = block_mask(count, (height, width), rng)
                assert mask.shape == (height, width) and mask.sum() <= count
                union = np.zeros_like(mask)
                for top, left, h, w in rects:
                    union[top : top + h, left : left + w] = True
                assert np.array_equal(union, mask)
                if count == 0:
                    assert not rects


# ------------------------------------------------------------- determinism
@pytest.mark.parametrize("strategy", MASKING_STRATEGIES)
def test_same_seed_same_masks_other_seed_other_masks(strategy):
    a = draw(strategy, 32, (8, 8), seed=1)[2].masks
    b = draw(strategy, 32, (8, 8), seed=1)[2].masks
    c = draw(strategy, 32, (8, 8), seed=2)[2].masks
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("strategy", MASKING_STRATEGIES)
def test_generator_consumption_does_not_depend_on_outcome(strategy):
    states = []
    for prob in (0.0, 1.0):
        gen = make_generator(5)
        attention = attention_for(16, (8, 8)) if strategy in ATTMASK else None
        generate_masks(MaskingConfig(strategy=strategy, prob=prob), 16, (8, 8), gen, attention)
        states.append(gen.get_state())
    assert torch.equal(states[0], states[1])


def test_no_global_random_state_is_used_or_changed():
    torch_state, py_state, np_state = torch.get_rng_state(), random.getstate(), np.random.get_state()
    first = [draw(s, 16, (8, 8), seed=4)[2].masks for s in MASKING_STRATEGIES]
    torch.manual_seed(999), random.seed(999), np.random.seed(999)
    second = [draw(s, 16, (8, 8), seed=4)[2].masks for s in MASKING_STRATEGIES]
    assert all(torch.equal(x, y) for x, y in zip(first, second))
    torch.set_rng_state(torch_state), random.setstate(py_state), np.random.set_state(np_state)
    before = torch.get_rng_state()
    draw("block", 16, (8, 8))
    assert torch.equal(before, torch.get_rng_state())


def test_sample_mask_counts_is_the_prefix_of_every_strategy():
    config = MaskingConfig(strategy="random")
    masked, ratios, counts = sample_mask_counts(config, 50, 196, make_generator(0, "test"))
    result = draw("attmask_hint", 50, (14, 14))[2]
    assert torch.equal(masked, result.masked) and torch.equal(ratios, result.ratios)
    assert torch.equal(counts, result.counts)


# ----------------------------------------------------------------- errors
@pytest.mark.parametrize("strategy", ATTMASK)
def test_attmask_without_attention_is_a_clear_error(strategy):
    with pytest.raises(ValueError, match="attention"):
        generate_masks(MaskingConfig(strategy=strategy), 4, (8, 8), make_generator(0))


@pytest.mark.parametrize("shape", [(4, 63), (3, 64), (4, 8, 8), (64,)])
def test_misshaped_attention_is_a_clear_error(shape):
    with pytest.raises(ValueError, match=r"attention must have shape \(batch_size, H\*W\) = \(4, 64\)"):
        generate_masks(MaskingConfig(strategy="attmask_high"), 4, (8, 8), make_generator(0), torch.rand(shape))


def test_other_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="masking.strategy"):
        generate_masks(MaskingConfig(strategy="attmask_middle"), 4, (8, 8), make_generator(0))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="grid"):
        generate_masks(MaskingConfig(strategy="random"), 4, (0, 8), make_generator(0))
    with pytest.raises(ValueError, match="floating-point"):
        generate_masks(MaskingConfig(strategy="attmask_low"), 4, (2, 2), make_generator(0), torch.ones(4, 4, dtype=torch.long))


def test_output_device_follows_attention():
    assert generate_masks(MaskingConfig(strategy="random"), 2, (4, 4), make_generator(0)).device.type == "cpu"
    if torch.cuda.is_available():
        config = MaskingConfig(strategy="attmask_hint", prob=1.0)
        cpu_att = attention_for(8, (8, 8))
        on_gpu = generate_masks(config, 8, (8, 8), make_generator(0), cpu_att.cuda())
        assert on_gpu.device.type == "cuda"
        assert torch.equal(on_gpu.cpu(), generate_masks(config, 8, (8, 8), make_generator(0), cpu_att))


# ------------------------------------------------------------- properties
@settings(max_examples=80, deadline=None)
@given(
    strategy=st.sampled_from(MASKING_STRATEGIES),
    height=st.integers(1, 16),
    width=st.integers(1, 16),
    batch=st.integers(0, 9),
    ratio=st.floats(0.0, 1.0),
    spread=st.floats(0.0, 1.0),
    prob=st.floats(0.0, 1.0),
    show_max=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**32),
)
def test_invariants_hold_for_any_grid_and_config(strategy, height, width, batch, ratio, spread, prob, show_max, seed):
    ratio_var = spread * min(ratio, 1.0 - ratio)
    config = MaskingConfig(strategy=strategy, ratio=ratio, ratio_var=ratio_var, prob=prob, show_max=show_max)
    config.validate()
    num_patches = height * width
    attention = attention_for(batch, (height, width), seed) if strategy in ATTMASK else None
    result = sample_masks(config, batch, (height, width), make_generator(seed), attention)
    assert result.masks.shape == (batch, height, width)
    got = result.masks.reshape(batch, num_patches).sum(dim=1)
    assert torch.all(result.counts <= num_patches) and torch.all(result.counts >= 0)
    assert torch.all(result.counts[~result.masked] == 0) and torch.all(got[~result.masked] == 0)
    if strategy == "block":
        assert torch.all(got <= result.counts)
    else:
        assert torch.equal(got, result.counts - result.revealed)
    assert torch.all(result.revealed <= result.counts)
    again = generate_masks(config, batch, (height, width), make_generator(seed), attention)
    assert torch.equal(again, result.masks)


# ------------------------------------------------------- the official code's choices
def test_ratio_per_batch_is_one_ratio_and_hint_draws_its_own(monkeypatch):
    """Official AttMask: one ratio per batch; Hint's reveal count from a second, independent draw."""
    config = MaskingConfig("attmask_hint", ratio=0.3, ratio_var=0.2, prob=1.0, show_max=0.25, ratio_per="batch")
    attention = torch.rand(8, 64, generator=torch.Generator().manual_seed(1))
    draw = sample_masks(config, 8, (8, 8), torch.Generator().manual_seed(5), attention)
    assert torch.unique(draw.ratios).numel() == 1 and torch.unique(draw.counts).numel() == 1
    replay = torch.Generator().manual_seed(5)
    torch.rand(8, dtype=torch.float64, generator=replay)  # who is masked
    r = 0.1 + 0.4 * torch.rand(8, dtype=torch.float64, generator=replay)[0]
    r_hint = 0.1 + 0.4 * torch.rand(1, dtype=torch.float64, generator=replay)[0]
    assert draw.ratios[0] == r and int(draw.counts[0]) == math.floor(r * 64)
    assert int(draw.revealed[0]) == min(math.floor(0.25 * r_hint * 64), math.floor(r * 64), 16)
    assert (draw.masks.flatten(1).sum(1) == draw.counts - draw.revealed).all()
    per_image = sample_masks(dataclasses.replace(config, ratio_per="image"), 8, (8, 8),
                             torch.Generator().manual_seed(5), attention)
    assert torch.unique(per_image.ratios).numel() == 8


@pytest.mark.parametrize("strategy, everyone_masked", [("random", True), ("block", True), ("attmask_high", False)])
def test_prob_scope_attention_masks_every_image_for_random_and_block(strategy, everyone_masked):
    config = MaskingConfig(strategy, ratio=0.3, ratio_var=0.0, prob=0.0, prob_scope="attention")
    attention = torch.rand(16, 64, generator=torch.Generator().manual_seed(2))
    draw = sample_masks(config, 16, (8, 8), torch.Generator().manual_seed(0), attention)
    assert bool(draw.masked.all()) is everyone_masked and bool(draw.masked.any()) is everyone_masked
    default = sample_masks(dataclasses.replace(config, prob_scope="all"), 16, (8, 8), torch.Generator().manual_seed(0),
                           attention)
    assert not default.masked.any()  # iBOT's recipe: prob 0 masks nothing, whatever the strategy


# ------------------------------------------------------- block_rule: official (iBOT's MaskingGenerator)
def ibot_block_mask(high: float, height: int, width: int, rng: random.Random) -> np.ndarray:
    """Our transcription of iBOT's block loop (ImageFolderMask, pred_shape 'block'), for comparison only."""
    mask = np.zeros((height, width), dtype=bool)
    log_aspect = (math.log(0.3), math.log(1 / 0.3))
    count = 0
    while count < high:
        room, delta = high - count, 0
        for _ in range(10):
            area = rng.uniform((min(height, width) // 3) ** 2, room)
            aspect = math.exp(rng.uniform(*log_aspect))
            h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if w < width and h < height:
                top, left = rng.randint(0, height - h), rng.randint(0, width - w)
                new = h * w - int(mask[top:top + h, left:left + w].sum())
                if 0 < new <= room:
                    mask[top:top + h, left:left + w] = True
                    delta = new
            if delta > 0:
                break
        if delta == 0:
            break
        count += delta
    return mask


@pytest.mark.parametrize("grid", [(4, 4), (14, 14), (6, 9)])
def test_official_block_rule_is_ibots_loop_draw_for_draw(grid):
    """Same random.Random stream, same float budget r * P: the same mask, exactly."""
    gen = random.Random(0)
    for _ in range(300):
        ratio = gen.uniform(0.1, 0.5)
        seed = gen.randrange(2**62)
        budget = ratio * grid[0] * grid[1]
        ours, _ = block_mask(budget, grid, random.Random(seed), strict=True)
        assert np.array_equal(ours, ibot_block_mask(budget, *grid, random.Random(seed)))


def test_official_block_rule_never_spans_the_grid_and_inclusive_does():
    spans = {False: 0, True: 0}
    for strict in spans:
        for seed in range(400):
            _, rects = block_mask(12, (4, 4), random.Random(seed), strict=strict)
            spans[strict] += sum(h == 4 or w == 4 for _, _, h, w in rects)
    assert spans[True] == 0 and spans[False] > 0


def test_block_rule_reaches_the_masks_and_defaults_to_inclusive():
    assert MaskingConfig().block_rule == "inclusive"
    base = MaskingConfig(strategy="block", ratio=0.4, ratio_var=0.1, prob=1.0)
    draws = {rule: sample_masks(dataclasses.replace(base, block_rule=rule), 64, (4, 4), make_generator(0, "rule"))
             for rule in ("inclusive", "official")}
    # same counts drawn, official's rectangles never as wide or high as the grid
    assert torch.equal(draws["inclusive"].counts, draws["official"].counts)
    assert all(h < 4 and w < 4 for rects in draws["official"].rectangles for _, _, h, w in rects)
    assert any(h == 4 or w == 4 for rects in draws["inclusive"].rectangles for _, _, h, w in rects)
    assert (draws["official"].masks.flatten(1).sum(1) <= draws["official"].counts).all()


@pytest.mark.parametrize("strategy, rule", [("block", "official"), ("block", "inclusive"), ("random", "official")])
def test_step_masks_are_the_steps_own_draws_from_its_seeds(strategy, rule):
    """The loader draws what the step drew, from (seed, "mask", epoch, step, crop): masks and checkpoints unchanged."""
    import pickle

    config = MaskingConfig(strategy=strategy, block_rule=rule)
    draw_step = pickle.loads(pickle.dumps(StepMasks(config, seed=7, epoch=3, batch_size=6, grid=(4, 4))))  # spawned workers
    for step in (0, 5):
        masks = draw_step(step)
        assert masks.shape == (6, 2, 4, 4) and masks.dtype == torch.bool
        for crop in range(2):
            expected = generate_masks(config, 6, (4, 4), make_generator(7, "mask", 3, step, crop))
            assert torch.equal(masks[:, crop], expected), (step, crop)
    assert not torch.equal(draw_step(0), draw_step(1))


@pytest.mark.parametrize("strategy", ATTMASK)
def test_step_masks_refuse_the_strategies_that_need_attention(strategy):
    with pytest.raises(ValueError, match="attention"):
        StepMasks(MaskingConfig(strategy=strategy), seed=0, epoch=0, batch_size=2, grid=(2, 2))

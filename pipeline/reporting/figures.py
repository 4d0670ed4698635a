"""The report's figures: training curves and the paper's qualitative mask figure.

Two halves:

* **data** (no matplotlib): :func:`pick_examples` chooses val images,
  :func:`teacher_attention` runs the exported teacher backbone for its [CLS]
  attention, :func:`figure_masks` draws every strategy's mask from that
  attention at one fixed ratio, :func:`mask_examples` ties them together;
* **plots**: one function per figure returning a ``matplotlib.figure.Figure``,
  and :func:`save_png` to write it.

Byte-identical PNGs. Figures are built on matplotlib's ``Figure`` + Agg canvas
directly (no pyplot, so no global backend or figure state), under the
``default`` style plus :data:`RC` (a user's ``matplotlibrc`` changes nothing),
at a fixed size and dpi, and saved without the ``Software`` tag (PNG carries
no date). Same inputs and matplotlib version -> same bytes.
"""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path
from contextlib import AbstractContextManager
from typing import Any, Sequence

import matplotlib
import matplotlib.style
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import Tensor

from pipeline.core.config import MaskingConfig
from pipeline.core.files import atomic_write_bytes
from pipeline.core.seeding import make_generator
from pipeline.core.strategies import MASKING_STRATEGIES, strategy_label
from pipeline.data.augment import IMAGENET_MEAN, IMAGENET_STD
from pipeline.method.masking import sample_masks
from pipeline.method.model import MaskedViT

DPI = 100
RC = {"font.size": 9, "axes.titlesize": 9, "axes.grid": True, "grid.alpha": 0.3, "savefig.dpi": DPI}
# ----------------------------------------------------------------------- data
@dataclass(frozen=True)
class MaskExamples:
    """Everything the qualitative figure shows, for ``B`` images on an ``h x w`` patch grid.

    Attributes:
        images: ``(B, S, S, 3)`` float in [0, 1], the crop the teacher saw.
        attention: ``(B, h, w)`` float32, teacher [CLS] -> patch attention.
        masks: strategy -> ``(B, h, w)`` bool, True = masked.
        names: ``B`` captions (sample key and class).
        count: ``N = floor(ratio * h * w)``, the target masked count of every strategy.
        ratio: the ratio the masks were drawn at.
    """

    images: np.ndarray
    attention: np.ndarray
    masks: dict[str, np.ndarray]
    names: list[str]
    count: int
    ratio: float


def pick_examples(labels: Sequence[int], count: int, seed: int) -> list[int]:
    """``count`` indices from a seeded permutation, one per class first (so the figure shows variety)."""
    generator = make_generator(seed, "report", "examples")
    order = torch.randperm(len(labels), generator=generator).tolist()
    chosen: list[int] = []
    seen: set[int] = set()
    for i in order:
        if len(chosen) < count and int(labels[i]) not in seen:
            chosen.append(i)
            seen.add(int(labels[i]))
    # fewer classes than images wanted: fill up in permutation order
    chosen += [i for i in order if i not in chosen][: count - len(chosen)]
    return chosen


@torch.no_grad()
def teacher_attention(vit: torch.nn.Module, images: Tensor) -> Tensor:
    """``(B, P)`` float32 last-block [CLS] attention of a timm ViT on ``(B, 3, S, S)`` images.

    Uses :class:`pipeline.method.model.MaskedViT`, the code the training loop ranks patches with.
    """
    network = MaskedViT(vit).eval()
    _tokens, attention = network(images, return_cls_attention=True)
    return attention.float()


def figure_masks(
    attention: Tensor, grid: tuple[int, int], ratio: float, show_max: float, seed: int
) -> dict[str, Tensor]:
    """Every strategy's ``(B, h, w)`` mask at exactly ``ratio`` (``prob=1``, ``ratio_var=0``).

    Each strategy gets a generator seeded from ``(seed, "report", "masks")``,
    so block and random are reproducible and all strategies target the same
    ``N = floor(ratio * P)`` (block covers at most N, hint masks N minus its hints).
    """
    masks = {}
    for strategy in MASKING_STRATEGIES:
        config = MaskingConfig(strategy=strategy, ratio=ratio, ratio_var=0.0, prob=1.0, show_max=show_max)
        generator = make_generator(seed, "report", "masks")
        masks[strategy] = sample_masks(config, attention.shape[0], grid, generator, attention).masks
    return masks


def denormalize(images: Tensor) -> np.ndarray:
    """``(B, 3, S, S)`` ImageNet-normalised -> ``(B, S, S, 3)`` float in [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images.cpu() * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def mask_examples(
    vit: torch.nn.Module,
    images: Tensor,
    names: list[str],
    patch_size: int,
    ratio: float,
    show_max: float,
    seed: int,
) -> MaskExamples:
    """Attention and all five masks for ``(B, 3, S, S)`` eval-transformed images."""
    height, width = images.shape[-2] // patch_size, images.shape[-1] // patch_size
    attention = teacher_attention(vit, images)
    masks = figure_masks(attention, (height, width), ratio, show_max, seed)
    return MaskExamples(
        images=denormalize(images),
        attention=attention.view(-1, height, width).numpy(),
        masks={s: m.cpu().numpy() for s, m in masks.items()},
        names=names,
        count=math.floor(ratio * height * width),
        ratio=ratio,
    )


def attention_max_over_min(attention: np.ndarray) -> np.ndarray:
    """``(B,)`` max / min of each ``(B, h, w)`` attention map: 1 is flat, and how peaked the map is above that."""
    flat = attention.reshape(attention.shape[0], -1).astype(np.float64)
    return flat.max(axis=1) / np.maximum(flat.min(axis=1), 1e-12)


def hint_revealed(examples: MaskExamples) -> list[int]:
    """Patches AttMask-Hint reveals per image (masked by High, not by Hint); [] without both strategies."""
    masks = examples.masks
    if "attmask_hint" not in masks or "attmask_high" not in masks:
        return []
    return [int(n) for n in (masks["attmask_high"] & ~masks["attmask_hint"]).reshape(len(examples.names), -1).sum(1)]


def mask_figure_data(examples: MaskExamples) -> dict[str, Any]:
    """What the qualitative figure shows, as numbers for ``report.json`` (the README's text reads these).

    ``attention_max_over_min``: per image (1 = flat); ``attention_entropy``: per
    image, the entropy of the attention over the patches divided by ln(P)
    (1 = flat); ``hint_revealed``: per image.
    """
    flat = examples.attention.reshape(len(examples.names), -1).astype(np.float64)
    p = flat / flat.sum(axis=1, keepdims=True)
    entropy = -(p * np.log(np.maximum(p, 1e-300))).sum(axis=1) / math.log(flat.shape[1])
    return {"patches": int(flat.shape[1]), "ratio": examples.ratio, "count": examples.count,
            "attention_max_over_min": [round(float(v), 3) for v in attention_max_over_min(examples.attention)],
            "attention_entropy": [round(float(v), 4) for v in entropy],
            "hint_revealed": hint_revealed(examples)}


def read_csv_columns(path: str | Path) -> dict[str, np.ndarray]:
    """A numeric CSV with a header row -> column name -> float64 ``(rows,)``."""
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    if not rows:
        raise ValueError(f"{path}: empty CSV")
    header, body = rows[0], rows[1:]
    values = np.array([[float(v) for v in row] for row in body], dtype=np.float64).reshape(len(body), len(header))
    return {name: values[:, i] for i, name in enumerate(header)}


# ---------------------------------------------------------------------- plots
def _style() -> AbstractContextManager[None]:
    return matplotlib.style.context(["default", RC])


def new_figure(width: float, height: float) -> Figure:
    """A pyplot-free figure on the Agg canvas (inches)."""
    figure = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(figure)
    return figure


def png_bytes(figure: Figure) -> bytes:
    """The figure as PNG, no ``Software`` tag (and PNG stores no date): deterministic bytes."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()


def save_png(figure: Figure, path: str | Path) -> Path:
    """Write :func:`png_bytes` atomically to ``path``."""
    atomic_write_bytes(Path(path), png_bytes(figure))
    return Path(path)


def plot_losses(steps: dict[str, np.ndarray], uniform_loss: float | None = None) -> Figure:
    """Total, [CLS] and patch loss per step (``steps`` = columns of ``reports/pretrain/steps.csv``).

    ``uniform_loss`` (ln out_dim) marks the [CLS] loss of a uniform teacher, the
    level a run that learns nothing stays near.
    """
    with _style():
        figure = new_figure(8.0, 3.6)
        ax = figure.add_subplot()
        for column, label in (("loss_total", "total"), ("loss_cls", "[CLS]"), ("loss_patch", "patch (MIM)")):
            if column in steps:
                ax.plot(steps["step"], steps[column], label=label, linewidth=1.0)
        if uniform_loss is not None:
            ax.axhline(uniform_loss, color="grey", linestyle="--", linewidth=0.8, label=f"ln(out_dim) = {uniform_loss:.2f}")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title("Pre-training losses")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: the curves fill the axes
        figure.tight_layout()
    return figure


def plot_masked_share(steps: dict[str, np.ndarray], expected: float | None = None) -> Figure:
    """Share of masked global-crop patch tokens per step; ``expected`` = prob x ratio."""
    with _style():
        figure = new_figure(7.0, 3.0)
        ax = figure.add_subplot()
        ax.plot(steps["step"], steps["masked_share"], linewidth=1.0, label="masked share")
        if expected is not None:
            ax.axhline(expected, color="grey", linestyle="--", linewidth=0.8, label=f"prob x ratio = {expected:.3f}")
        ax.set_xlabel("step")
        ax.set_ylabel("share of patch tokens")
        ax.set_ylim(bottom=0)
        ax.set_title("Masked share per step")
        ax.legend(loc="best")
        figure.tight_layout()
    return figure


def plot_finetune_curve(curve: dict[str, np.ndarray]) -> Figure:
    """Fine-tuning val top-1 per epoch, one line per column other than ``epoch``."""
    with _style():
        figure = new_figure(7.0, 3.0)
        ax = figure.add_subplot()
        for column, values in curve.items():
            if column != "epoch":
                ax.plot(curve["epoch"], values, marker="o", markersize=3, linewidth=1.0, label=column)
        ax.set_xlabel("epoch")
        ax.set_ylabel("val top-1 (%)")
        ax.set_title("Fine-tuning")
        ax.legend(loc="best")
        figure.tight_layout()
    return figure


# masked patches: opaque-ish grey with the patch edges kept visible
_MASK_CMAP = ListedColormap([(0, 0, 0, 0), (0.55, 0.55, 0.55, 0.85)])


def _outline(ax: Any, cells: np.ndarray, patch: float) -> None:
    """Cyan squares around the ``True`` cells of an ``(h, w)`` grid (patch side in pixels)."""
    for row, col in zip(*np.nonzero(cells)):
        ax.add_patch(Rectangle((col * patch, row * patch), patch, patch, fill=False, edgecolor="cyan", linewidth=1.2))


def plot_mask_figure(examples: MaskExamples) -> Figure:
    """Rows = images; columns = image, teacher attention, one mask per strategy (overlaid).

    The attention column is min-max scaled per image; its label gives max/min
    so a nearly flat map is not mistaken for a confident one.
    """
    strategies = list(examples.masks)
    rows, cols = len(examples.names), 2 + len(strategies)
    spreads = attention_max_over_min(examples.attention)
    revealed = hint_revealed(examples)
    size = examples.images.shape[1]
    extent = (0, size, size, 0)  # patch grid stretched over the image, pixel-aligned
    with _style(), matplotlib.rc_context({"axes.grid": False}):
        figure = new_figure(1.35 * cols, 1.45 * rows + 0.5)
        axes = figure.subplots(rows, cols, squeeze=False)
        for r in range(rows):
            image = examples.images[r]
            attention = examples.attention[r]
            axes[r, 0].imshow(image, interpolation="nearest")
            axes[r, 0].set_ylabel(examples.names[r], fontsize=7)
            axes[r, 1].imshow(image, interpolation="nearest")
            axes[r, 1].imshow(attention, cmap="inferno", alpha=0.75, extent=extent, interpolation="nearest")
            axes[r, 1].set_xlabel(f"max/min {spreads[r]:.2f}", fontsize=7)
            for c, strategy in enumerate(strategies, start=2):
                mask = examples.masks[strategy][r]
                axes[r, c].imshow(image, interpolation="nearest")
                axes[r, c].imshow(mask.astype(np.uint8), cmap=_MASK_CMAP, vmin=0, vmax=1, extent=extent,
                                  interpolation="nearest")
                axes[r, c].set_xlabel(f"{int(mask.sum())} masked", fontsize=7)
                if strategy == "attmask_hint" and "attmask_high" in examples.masks:
                    _outline(axes[r, c], examples.masks["attmask_high"][r] & ~mask, size / mask.shape[0])
        titles = ["image", "[CLS] attention"] + [strategy_label(s, short=True) for s in strategies]
        for c, title in enumerate(titles):
            axes[0, c].set_title(title, fontsize=8)
        for ax in axes.flat:
            ax.set_xticks([])
            ax.set_yticks([])
        grid = examples.attention.shape[1:]
        # promise revealed patches only where the figure shows some (floor(show_max * r * P) is 0 on small grids)
        hint = ("cyan outline = hint revealed" if any(revealed) else
                "AttMask-Hint reveals 0 patches here (its masks equal AttMask-High's)" if revealed else "")
        figure.suptitle(
            f"Masks at ratio {examples.ratio:g} (N = {examples.count} of {grid[0] * grid[1]} patches); "
            "grey = masked" + (f", {hint}" if hint else ""),
            fontsize=8,
        )
        figure.tight_layout()
    return figure


def plot_comparison(summary: dict[str, Any], labels: dict[str, str], columns: dict[str, str], seeds: int,
                    data_share_strategies: Sequence[str], knn_k: int, path: Path) -> None:
    """``reports/comparison.png``: bars per strategy (``labels``: row name -> display name) and metric
    (``columns``: key -> label), mean with sd error bars over ``seeds``, each metric's random-init floor as a
    dotted line in its colour, beside k-NN vs data share; deterministic PNG (``make compare``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with plt.style.context("default"):
        with_shares = any(len(points) > 1 for points in summary["data_share"].values())  # 100% alone: no curve
        if with_shares:
            fig, (bars, shares) = plt.subplots(1, 2, figsize=(14, 4.2), dpi=100, gridspec_kw={"width_ratios": [2.2, 1]})
        else:
            fig, bars = plt.subplots(1, 1, figsize=(10, 4.2), dpi=100)
        names = list(labels)
        width = 0.8 / len(columns)
        for i, column in enumerate(columns):
            stats = [summary["table"][n][column] for n in names]
            xs = [j + (i - (len(columns) - 1) / 2) * width for j in range(len(names))]
            spread = [(s.sd or 0.0) if s else 0.0 for s in stats] if seeds > 1 else None
            drawn = bars.bar(xs, [s.mean if s else math.nan for s in stats], width, yerr=spread, capsize=3,
                             label=columns[column])
            floor = (summary.get("random_init") or {}).get(column)
            if floor is not None:
                bars.axhline(floor.mean, color=drawn.patches[0].get_facecolor(), linestyle=":", linewidth=1.2,
                             label=f"random init, {columns[column]}")
        if summary["num_classes"]:
            bars.axhline(100 / summary["num_classes"], color="grey", linestyle="--", linewidth=1, label="chance")
        bars.set_xticks(range(len(names)), [labels[n] for n in names], rotation=20, ha="right")
        bars.set_ylabel("top-1 (%)")
        bars.set_title(f"Strategies (mean ± sd over {seeds} seeds)" if seeds > 1 else "Strategies (one seed, no spread)")
        bars.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: the bars fill the axes
        for name in data_share_strategies if with_shares else ():
            points = [(s, st) for s, st in summary["data_share"][name].items() if st]
            if points:
                shares.errorbar([p[0] for p in points], [p[1].mean for p in points],
                                yerr=[p[1].sd or 0.0 for p in points], marker="o", capsize=3,
                                label=labels.get(name, name))
        if with_shares:
            shares.set_xlabel("share of the train set (%)")
            shares.set_ylabel(f"k-NN top-1, k = {knn_k} (%)")
            shares.set_title("k-NN vs data share")
            shares.legend(fontsize=8)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        # no Software/date metadata: the same numbers give the same bytes
        fig.savefig(path, format="png", metadata={"Software": None})
        plt.close(fig)

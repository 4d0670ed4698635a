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
    size = examples.images.shape[1]
    extent = (0, size, size, 0)  # patch grid stretched over the image, pixel-aligned
    with _style(), matplotlib.rc_context({"axes.grid": False}):
        figure = new_figure(1.35 * cols, 1.45 * rows + 0.5)
        axes = figure.subplots(rows, cols, squeeze=False)
        for r in range(rows):
            image = examples.images[r]
            attention = examples.attention[r]
            spread = float(attention.max() / max(attention.min(), 1e-12))
            axes[r, 0].imshow(image, interpolation="nearest")
            axes[r, 0].set_ylabel(examples.names[r], fontsize=7)
            axes[r, 1].imshow(image, interpolation="nearest")
            axes[r, 1].imshow(attention, cmap="inferno", alpha=0.75, extent=extent, interpolation="nearest")
            axes[r, 1].set_xlabel(f"max/min {spread:.2f}", fontsize=7)
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
        figure.suptitle(
            f"Masks at ratio {examples.ratio:g} (N = {examples.count} of {grid[0] * grid[1]} patches); "
            "grey = masked, cyan outline = hint revealed",
            fontsize=8,
        )
        figure.tight_layout()
    return figure


def plot_comparison(summary: dict[str, Any], names: Sequence[str], columns: dict[str, str], seeds: int,
                    data_share_strategies: Sequence[str], knn_k: int, path: Path) -> None:
    """``reports/comparison.png``: bars per strategy (rows ``names``) and metric (``columns``: key -> label),
    mean with sd error bars over ``seeds``, beside k-NN vs data share; deterministic PNG (``make compare``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with plt.style.context("default"):
        with_shares = any(len(points) > 1 for points in summary["data_share"].values())  # 100% alone: no curve
        if with_shares:
            fig, (bars, shares) = plt.subplots(1, 2, figsize=(12, 4.2), dpi=100, gridspec_kw={"width_ratios": [2.2, 1]})
        else:
            fig, bars = plt.subplots(1, 1, figsize=(8.5, 4.2), dpi=100)
        width = 0.8 / len(columns)
        for i, column in enumerate(columns):
            stats = [summary["table"][n][column] for n in names]
            xs = [j + (i - (len(columns) - 1) / 2) * width for j in range(len(names))]
            spread = [(s.sd or 0.0) if s else 0.0 for s in stats] if seeds > 1 else None
            bars.bar(xs, [s.mean if s else math.nan for s in stats], width, yerr=spread, capsize=3,
                     label=columns[column])
        if summary["num_classes"]:
            bars.axhline(100 / summary["num_classes"], color="grey", linestyle="--", linewidth=1, label="chance")
        bars.set_xticks(range(len(names)), names, rotation=20, ha="right")
        bars.set_ylabel("top-1 (%)")
        bars.set_title(f"Strategies (mean ± sd over {seeds} seeds)" if seeds > 1 else "Strategies (one seed, no spread)")
        bars.legend(fontsize=8)
        for name in data_share_strategies if with_shares else ():
            points = [(s, st) for s, st in summary["data_share"][name].items() if st]
            if points:
                shares.errorbar([p[0] for p in points], [p[1].mean for p in points],
                                yerr=[p[1].sd or 0.0 for p in points], marker="o", capsize=3, label=name)
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

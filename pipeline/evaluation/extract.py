"""Frozen features for evaluation (the `extract` stage; docs/method.md, "Evaluation").

For each split (train = the selected subset, val = complete) and each variant,
one pass over the split in its own order (no shuffle) with the centre-crop
:func:`pipeline.data.augment.eval_transform`, written to
``<out_dir>/<variant>/<split>.npz``:

* ``pretrained``: the exported teacher backbone (safetensors, loaded strictly);
* ``random_init``: the same architecture with weights drawn from
  ``torch.manual_seed(derive_seed(seed, "random_init"))`` (the baseline);
* ``pixels``: the eval-transformed (normalised) image, flattened.

ViT features are the [CLS] token after the final norm (DINO). With
``n_last_blocks = n`` the [CLS] tokens of the last ``n`` blocks, each passed
through the final norm, are concatenated (DINO's linear evaluation); with
``avgpool`` the mean of the last block's normed patch tokens is appended.
Layout: ``[cls(block -n), ..., cls(block -1), avgpool?]``, so
``D = embed_dim * (n + avgpool)``.

Each ``.npz`` holds ``features`` (N, D) float32, ``labels`` (N,) int64 and
``keys`` (N,) str (the shard sample keys, ``<split>_<index:06d>``, row i =
sample i of the split). Files are written without timestamps (the same
inputs give byte-identical files) to a temporary file that is renamed into
place, so a crash never leaves a partial file under the final name; a
variant's folder is swapped in once both splits are written, so it never
mixes a new ``train.npz`` with an old ``val.npz``.

Under torchrun each rank extracts its share of the split
(:class:`pipeline.data.shard_reader.ShardDataset` with ``drop_last=False``: every sample
exactly once in total) and rank 0 gathers the rows, puts them back in split
order and writes.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from tqdm import tqdm

from pipeline.core.config import Params
from pipeline.core.distributed import DistContext, barrier
from pipeline.core.files import remove_stale_temporaries, replace_dir, restore_moved_aside, write_error
from pipeline.data.augment import eval_transform
from pipeline.data.shard_reader import ShardDataset, ShardSplit, open_split
from pipeline.evaluation.feature_files import SPLITS, VARIANTS, FeatureSet, save_features
from pipeline.method.backbone_export import load_backbone, random_backbone


def vit_features(vit: torch.nn.Module, images: Tensor, n_last_blocks: int = 1, avgpool: bool = False) -> Tensor:
    """``(B, D * (n_last_blocks + avgpool))`` float32 features of a timm ViT (see module docstring).

    Through ``forward_intermediates``, which runs the same submodules in the same
    order as ``forward_features`` (so ``n_last_blocks=1`` gives exactly
    ``forward_features(images)[:, 0]``).
    """
    depth = len(vit.blocks)
    if not 1 <= n_last_blocks <= depth:
        raise ValueError(f"n_last_blocks must lie in [1, {depth}], got {n_last_blocks}")
    # timm's public API: the last n blocks' tokens, each through the final norm, as (patch, prefix) pairs
    normed = vit.forward_intermediates(images, indices=n_last_blocks, return_prefix_tokens=True, norm=True,
                                       stop_early=True, output_fmt="NLC", intermediates_only=True)
    parts = [prefix[:, 0] for _, prefix in normed]
    if avgpool:
        parts.append(normed[-1][0].mean(dim=1))
    return torch.cat(parts, dim=-1).float()


def sample_keys(split: ShardSplit, indices: np.ndarray | None = None) -> np.ndarray:
    """Shard sample keys of ``split`` (``<split>_<index:06d>``, as :mod:`pipeline.data.shard_writer` names them)."""
    if indices is None:
        indices = np.arange(len(split))
    return np.array([f"{split.split}_{int(i):06d}" for i in indices], dtype=str)


Extractor = Callable[[Tensor], Tensor]


@torch.no_grad()
def extract_split(
    split: ShardSplit,
    extractors: Mapping[str, Extractor],
    *,
    image_size: int,
    batch_size: int,
    device: torch.device,
    context: DistContext | None = None,
    num_workers: int = 0,
    progress_bar: bool = True,
    desc: str | None = None,
) -> dict[str, FeatureSet] | None:
    """Run every extractor over one split in one pass; rows in split order.

    Args:
        extractors: name -> function of a ``(B, 3, S, S)`` batch on ``device``
            returning ``(B, D)`` features (models already in eval mode).
        batch_size: per-rank batch size.

    Returns:
        name -> :class:`FeatureSet` on rank 0, ``None`` on the other ranks.
    """
    context = context or DistContext()
    dataset = ShardDataset(
        split, batch_size=batch_size, transform=eval_transform(image_size), seed=0, epoch=0,
        rank=context.rank, world_size=context.world_size, shuffle=False, drop_last=False,
    )
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, num_workers=num_workers, pin_memory=device.type == "cuda",
    )
    chunks: dict[str, list[np.ndarray]] = {name: [] for name in extractors}
    indices: list[np.ndarray] = []
    bar = tqdm(loader, total=dataset.num_steps, desc=desc or f"extract {split.split}", unit="batch",
               disable=not (progress_bar and context.is_main), dynamic_ncols=True)
    for images, _labels, index in bar:
        images = images.to(device, non_blocking=True)
        for name, extractor in extractors.items():
            chunks[name].append(extractor(images).float().cpu().numpy())
        indices.append(index.numpy().astype(np.int64))
    local_index = np.concatenate(indices) if indices else np.zeros(0, dtype=np.int64)
    local = {
        name: np.concatenate(parts) if parts else None
        for name, parts in chunks.items()
    }

    if context.enabled:
        gathered: list[Any] | None = [None] * context.world_size if context.is_main else None
        dist.gather_object((local_index, local), gathered, dst=0)
        if not context.is_main:
            return None
        assert gathered is not None
        parts_index = [g[0] for g in gathered]
        parts_feats = {name: [g[1][name] for g in gathered if g[1][name] is not None] for name in extractors}
        local_index = np.concatenate(parts_index)
        local = {name: np.concatenate(parts) if parts else None for name, parts in parts_feats.items()}

    order = np.argsort(local_index, kind="stable")
    if not np.array_equal(local_index[order], np.arange(len(split))):
        raise RuntimeError(
            f"extract {split.split}: got {len(local_index)} rows for {len(split)} samples; "
            "every sample must be extracted exactly once"
        )
    labels = split.labels.astype(np.int64)
    keys = sample_keys(split)
    result = {}
    for name, features in local.items():
        if features is None:  # an empty split cannot happen (the shard stage refuses it)
            raise RuntimeError(f"extract {split.split}: no samples")
        result[name] = FeatureSet(np.ascontiguousarray(features[order], dtype=np.float32), labels.copy(), keys)
    return result


def _vit_extractor(vit: torch.nn.Module, n_last_blocks: int, avgpool: bool, device: torch.device) -> Extractor:
    vit.eval().to(device)

    def run(images: Tensor) -> Tensor:
        # float32 on every device: features are compared across runs and machines
        return vit_features(vit, images, n_last_blocks, avgpool)

    return run


def _pixels(images: Tensor) -> Tensor:
    return images.flatten(1).float()


def extract_features(
    params: Params,
    shards: str | Path,
    backbone_path: str | Path,
    out_dir: str | Path,
    device: torch.device,
    context: DistContext | None = None,
    *,
    variants: tuple[str, ...] = VARIANTS,
    progress_bar: bool = True,
) -> dict[str, Any]:
    """Extract and write every variant for train and val; returns the ``extract.json`` summary.

    The backbone export is checked before any image is read. Rank 0 writes
    ``<out_dir>/<variant>/<split>.npz``, each variant's folder replaced as a
    whole once both splits are done; all ranks return the same summary.

    Raises:
        BackboneNotFoundError: ``backbone_path`` missing (with ``pretrained`` asked).
    """
    context = context or DistContext()
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown feature variants {unknown}; expected some of {list(VARIANTS)}")
    config = params.extract
    extractors: dict[str, Extractor] = {}
    for variant in variants:
        if variant == "pretrained":
            vit = load_backbone(params.model, backbone_path)
            extractors[variant] = _vit_extractor(vit, config.n_last_blocks, config.avgpool, device)
        elif variant == "random_init":
            vit = random_backbone(params.model, params.seed)
            extractors[variant] = _vit_extractor(vit, config.n_last_blocks, config.avgpool, device)
        else:
            extractors[variant] = _pixels
    image_size = params.extract_image_size()
    out_dir = Path(out_dir)
    summary: dict[str, Any] = {
        "image_size": image_size,
        "n_last_blocks": config.n_last_blocks,
        "avgpool": config.avgpool,
        "variants": {v: {} for v in variants},
    }
    # Each variant's train.npz and val.npz are written into a staging folder beside out_dir and
    # swapped in together at the end: a killed run never leaves a new train.npz next to an old val.npz.
    staged: dict[str, Path] = {}
    if context.is_main:
        for variant in variants:
            restore_moved_aside(out_dir / variant)
        remove_stale_temporaries(out_dir, ".*.tmp-*")
    try:
        for split_name in SPLITS:
            split = open_split(shards, split_name, verify=params.data.verify)
            summary["num_classes"] = split.num_classes
            sets = extract_split(
                split, extractors, image_size=image_size, batch_size=config.batch_size, device=device,
                context=context, num_workers=config.num_workers, progress_bar=progress_bar,
            )
            if sets is not None:
                for variant, feature_set in sets.items():
                    if variant not in staged:
                        out_dir.parent.mkdir(parents=True, exist_ok=True)
                        staged[variant] = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.{variant}.tmp-", dir=out_dir.parent))
                    try:
                        save_features(staged[variant] / f"{split_name}.npz", feature_set)
                    except OSError as error:  # e.g. disk full: name the folder the user knows, not the staging one
                        cause = error.__cause__ if isinstance(error.__cause__, OSError) else error
                        raise write_error(cause, out_dir, "feature folder") from error
                    summary["variants"][variant]["dim"] = feature_set.dim
                    summary["variants"][variant][split_name] = len(feature_set)
            split.close()
        if staged:
            out_dir.mkdir(parents=True, exist_ok=True)
        for variant, folder in staged.items():
            replace_dir(folder, out_dir / variant)
    except BaseException:
        for folder in staged.values():
            shutil.rmtree(folder, ignore_errors=True)
        raise
    barrier(context)
    if context.enabled:  # the counts and dims are known on rank 0 only
        box = [summary]
        dist.broadcast_object_list(box, src=0)
        summary = box[0]
    return summary



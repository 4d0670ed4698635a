"""k-NN on frozen features: weighted k-NN (the DINO/iBOT protocol) and few-shot k-NN.

Everything here is a pure function of its inputs and an explicit seed:

- :func:`weighted_knn`: cosine similarity, votes weighted by ``exp(sim / T)``,
  chunked over val rows so memory stays at ``chunk_size x N_train`` floats
  however large the val set is.
- :func:`fewshot_knn`: the same k-NN with only ``s`` seeded train images per class.

Result dicts are JSON-ready: ``k`` values and shot counts are string keys;
accuracies are percentages.
"""
from __future__ import annotations

import warnings
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.core.seeding import derive_seed
from pipeline.evaluation.feature_files import FeatureSet

ArrayLike = np.ndarray | torch.Tensor
_EPS = 1e-12  # as F.normalize: an all-zero feature row gets similarity 0, not NaN

# ---------------------------------------------------------------------------- k-NN


def weighted_knn(
    train_features: ArrayLike,
    train_labels: ArrayLike,
    val_features: ArrayLike,
    val_labels: ArrayLike,
    ks: Iterable[int],
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Weighted k-NN accuracy (DINO protocol) of val rows against train rows.

    Args:
        train_features: (N_train, D); train_labels: (N_train,) ints in [0, C).
        val_features: (N_val, D); val_labels: (N_val,).
        ks: neighbour counts; each k > N_train is clamped to N_train.
        num_classes: C; default max label + 1 over both splits.
        chunk_size: val rows scored at once; memory is ``chunk_size x N_train`` float32.

    Returns:
        ``top1`` / ``top5``: ``{str(k): percent}``; ``top5_n``: min(5, C), what
        "top-5" means here; ``clamped``: ``{str(k): N_train}`` for the clamped ks;
        ``num_train``, ``num_val``, ``num_classes``, ``temperature``.
    """
    requested = sorted({int(k) for k in ks})
    if not requested or requested[0] < 1:
        raise ValueError(f"ks must be a non-empty list of integers >= 1, got {list(ks)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    device = torch.device(device)
    train = _float_matrix(train_features, "train_features", device)
    val = _float_matrix(val_features, "val_features", device)
    if train.shape[1] != val.shape[1]:
        raise ValueError(f"train features have D={train.shape[1]} but val features D={val.shape[1]}")
    y_train = _label_vector(train_labels, len(train), "train_labels", device)
    y_val = _label_vector(val_labels, len(val), "val_labels", device)
    num_classes = _num_classes(num_classes, y_train, y_val)

    n_train = len(train)
    effective = {k: min(k, n_train) for k in requested}
    top_n = min(5, num_classes)
    # 1/||x|| per train row instead of a normalised copy: at ImageNet scale that copy
    # is another 2 GB, while rescaling each chunk's similarities costs ~1% of the matmul
    train_inv_norm = torch.linalg.vector_norm(train, dim=1).clamp_min(_EPS).reciprocal()
    correct1 = dict.fromkeys(requested, 0)
    correct5 = dict.fromkeys(requested, 0)
    for start in range(0, len(val), chunk_size):
        ranked = _ranked_classes(
            val[start : start + chunk_size], train, train_inv_norm, y_train, effective, temperature, num_classes
        )
        target = y_val[start : start + chunk_size, None]
        for k, classes in ranked.items():
            hits = classes[:, :top_n] == target
            correct1[k] += int(hits[:, 0].sum())
            correct5[k] += int(hits.any(dim=1).sum())
    n_val = len(val)
    return {
        "top1": {str(k): 100.0 * correct1[k] / n_val for k in requested},
        "top5": {str(k): 100.0 * correct5[k] / n_val for k in requested},
        "top5_n": top_n,
        "clamped": {str(k): effective[k] for k in requested if effective[k] != k},
        "num_train": n_train,
        "num_val": n_val,
        "num_classes": num_classes,
        "temperature": float(temperature),
    }


def _ranked_classes(
    val_chunk: torch.Tensor,
    train: torch.Tensor,
    train_inv_norm: torch.Tensor,
    y_train: torch.Tensor,
    effective: dict[int, int],
    temperature: float,
    num_classes: int,
) -> dict[int, torch.Tensor]:
    """For one chunk (B, D): ``{k: (B, C) class indices by descending vote}`` for every requested k."""
    query = F.normalize(val_chunk, dim=1, eps=_EPS)
    similarity = query @ train.T  # (B, N_train): the only large allocation
    similarity.mul_(train_inv_norm)
    k_max = max(effective.values())
    top_sim, top_index = similarity.topk(k_max, dim=1, largest=True, sorted=True)
    del similarity
    neighbour_labels = y_train[top_index]  # (B, k_max)
    # subtracting each row's best similarity rescales that row's votes by a constant:
    # the ranking is unchanged and exp() cannot overflow for small temperatures
    weights = (top_sim - top_sim[:, :1]).div_(temperature).exp_()
    votes = torch.zeros(len(query), num_classes, dtype=torch.float32, device=query.device)
    rows = torch.arange(len(query), device=query.device)
    by_size: dict[int, list[int]] = {}
    for k, k_eff in effective.items():
        by_size.setdefault(k_eff, []).append(k)
    ranked = {}
    # one neighbour column at a time: every (row, class) pair is unique within a column,
    # so the sum order is fixed (deterministic on CPU and CUDA alike, unlike scatter_add)
    # and the vote tables of all ks come out of one pass as prefixes
    for j in range(k_max):
        votes[rows, neighbour_labels[:, j]] += weights[:, j]
        for k in by_size.get(j + 1, ()):
            # stable sort: tied classes rank by class index, never by chance
            ranked[k] = torch.sort(votes, dim=1, descending=True, stable=True).indices
    return ranked


def _float_matrix(values: ArrayLike, name: str, device: torch.device) -> torch.Tensor:
    tensor = torch.as_tensor(values)
    if tensor.ndim != 2 or tensor.shape[0] == 0 or tensor.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty (N, D) matrix, got shape {tuple(tensor.shape)}")
    return tensor.to(device=device, dtype=torch.float32)


def _label_vector(values: ArrayLike, length: int, name: str, device: torch.device) -> torch.Tensor:
    tensor = torch.as_tensor(values)
    if tensor.shape != (length,):
        raise ValueError(f"{name} must have shape ({length},) to match the features, got {tuple(tensor.shape)}")
    if tensor.dtype.is_floating_point or tensor.dtype == torch.bool:
        raise ValueError(f"{name} must be integers, got {tensor.dtype}")
    return tensor.to(device=device, dtype=torch.int64)


def _num_classes(num_classes: int | None, *labels: torch.Tensor) -> int:
    low = min(int(y.min()) for y in labels)
    high = max(int(y.max()) for y in labels)
    if low < 0:
        raise ValueError(f"labels must be >= 0, got {low}")
    if num_classes is None:
        return high + 1
    if high >= num_classes:
        raise ValueError(f"label {high} is out of range for num_classes={num_classes}")
    return int(num_classes)


# ------------------------------------------------------------------------ few-shot


def draw_fewshot_indices(labels: np.ndarray, shots: int, seed: int, draw: int, classes: Sequence[int] | None = None) -> np.ndarray:
    """Sorted train indices: exactly ``shots`` per class, seeded by ``(seed, "fewshot", shots, draw)``.

    Args:
        labels: (N_train,) train labels; the draw sees nothing else.
        classes: the classes to draw from; default every class in ``labels``.

    Raises:
        ValueError: a class has fewer than ``shots`` images.
    """
    labels = np.asarray(labels)
    classes = np.unique(labels) if classes is None else np.asarray(sorted(classes))
    rng = np.random.default_rng(derive_seed(seed, "fewshot", shots, draw))
    picked = []
    for c in classes:
        members = np.flatnonzero(labels == c)
        if len(members) < shots:
            raise ValueError(f"class {int(c)} has {len(members)} train images, fewer than {shots} shots")
        picked.append(rng.permutation(members)[:shots])
    return np.sort(np.concatenate(picked))


def slice_fewshot_indices(labels: np.ndarray, paths: Sequence[str], shots: int, draw: int,
                          classes: Sequence[int] | None = None) -> np.ndarray:
    """Sorted train indices: images ``[draw * shots, (draw + 1) * shots)`` of each class in path order.

    The official low-shot protocol (``eval_knn_few.py --subset shots --subset_starts draw * shots``), where the
    class's images are in ImageFolder order, i.e. sorted by path.

    Args:
        labels: (N_train,) train labels.
        paths: (N_train,) each image's source path (the shard metadata's ``path``).

    Raises:
        ValueError: a class has fewer than ``(draw + 1) * shots`` images.
    """
    labels = np.asarray(labels)
    if len(paths) != len(labels):
        raise ValueError(f"{len(paths)} paths for {len(labels)} train labels")
    classes = np.unique(labels) if classes is None else np.asarray(sorted(classes))
    start, stop = draw * shots, (draw + 1) * shots
    picked = []
    for c in classes:
        members = sorted(np.flatnonzero(labels == c), key=lambda i: paths[i])
        if len(members) < stop:
            raise ValueError(f"class {int(c)} has {len(members)} train images, fewer than {stop} for slice {draw}")
        picked.append(np.asarray(members[start:stop], dtype=np.int64))
    return np.sort(np.concatenate(picked))


def shortfall(shots: int, needed: int, draws: int, slices: bool, counts: dict[int, int], short: Sequence[int]) -> str:
    """Why a shot count is skipped, in one line: what it needs per class, the smallest class, how many fall short.

    ``"needs 100 train images per class (5 draws x 20 shots, slices do not overlap); class 0 has 5,
    1000 of 1000 classes have fewer"``
    """
    worst = min(short, key=lambda c: (counts[c], c))
    images = f"{needed} train image{'s' if needed != 1 else ''} per class"
    need = f"{images} ({draws} draws x {shots} shots, slices do not overlap)" if slices else images
    others = f", {len(short)} of {len(counts)} classes have fewer" if len(short) > 1 else ""
    return f"needs {need}; class {worst} has {counts[worst]}{others}"


def fewshot_knn(
    train: FeatureSet,
    val: FeatureSet,
    shots: Iterable[int],
    draws: int,
    k: int,
    temperature: float,
    seed: int,
    chunk_size: int = 1024,
    device: str | torch.device = "cpu",
    paths: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Weighted k-NN top-1 with ``s`` labelled train images per class, over ``draws`` draws.

    Draws are seeded samples (:func:`draw_fewshot_indices`), or with the train
    images' ``paths`` (N_train,) contiguous slices in path order
    (:func:`slice_fewshot_indices`, the official protocol). Every class of train
    or val must offer ``s`` train images (``draws x s`` for slices); otherwise
    that shot count is skipped, never computed from fewer shots or draws than
    asked: a warning, and the reason under ``skipped`` (:func:`shortfall`), so
    the other shot counts still come out (a 5% share of ImageNet-1k has 36
    images in its smallest class: 10- and 20-shot slices cannot be cut there).
    k is clamped to the ``s x C`` picked images.

    Returns:
        ``{str(s): {"mean", "std", "runs": [top-1 per draw], "k": effective k}, ...,
        "skipped": {str(s): reason}}``; std is the population std over draws (0 for one draw).
    """
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    # classes seen only in val count too: "s images per class" must hold for every class scored
    classes = np.union1d(np.unique(train.labels), np.unique(val.labels))
    num_classes = int(classes.max()) + 1
    counts = {int(c): int((train.labels == c).sum()) for c in classes}
    result: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for s in sorted({int(s) for s in shots}):
        needed = s if paths is None else draws * s  # slices do not overlap
        short = [c for c, n in counts.items() if n < needed]
        if short:
            reason = shortfall(s, needed, draws, paths is not None, counts, short)
            warnings.warn(f"few-shot {s}: skipped, {reason}", stacklevel=2)
            skipped[str(s)] = reason
            continue
        runs = []
        for d in range(draws):
            picked = train.subset(draw_fewshot_indices(train.labels, s, seed, d, classes) if paths is None
                                  else slice_fewshot_indices(train.labels, paths, s, d, classes))
            k_eff = min(k, len(picked))
            knn = weighted_knn(
                picked.features, picked.labels, val.features, val.labels, [k_eff], temperature,
                num_classes=num_classes, chunk_size=chunk_size, device=device,
            )
            runs.append(knn["top1"][str(k_eff)])
        result[str(s)] = {"mean": float(np.mean(runs)), "std": float(np.std(runs)), "runs": runs, "k": k_eff}
    result["skipped"] = skipped
    return result

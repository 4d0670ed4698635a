"""Evaluation on frozen features: weighted k-NN, few-shot k-NN, linear probe.

Features come from the `extract` stage as ``data/features/<variant>/{train,val}.npz``
(``features`` float32 (N, D), ``labels`` int64 (N,), ``keys`` str (N,)). Everything
here is a pure function of its inputs and an explicit seed (DESIGN.md, "Evaluation"):

- :func:`weighted_knn`: the DINO/iBOT protocol (cosine similarity, votes weighted
  by ``exp(sim / T)``), chunked over val rows so memory stays at
  ``chunk_size x N_train`` floats however large the val set is.
- :func:`fewshot_knn`: the same k-NN with only ``s`` seeded train images per class.
- :func:`linear_probe`: scikit-learn logistic regression on L2-normalised
  features, ``C`` chosen by stratified cross-validation on train only.
- :func:`cluster_quality`: NMI / ARI of seeded k-means against the labels.

Result dicts are JSON-ready: ``k`` values, shot counts and ``C`` values are
string keys; accuracies are percentages.
"""
from __future__ import annotations

import json
import math
import os
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.errors import UserError
from pipeline.seeding import derive_seed

FEATURE_VARIANTS = ("pretrained", "random_init", "pixels")
SPLITS = ("train", "val")
_EPS = 1e-12  # as F.normalize: an all-zero feature row gets similarity 0, not NaN

ArrayLike = np.ndarray | torch.Tensor


class FeatureFileError(UserError, ValueError):
    """A features file that exists but does not hold what the extract stage promises."""


@dataclass(frozen=True)
class Features:
    """Frozen features of one split: ``features`` (N, D) float32, ``labels`` (N,) int64, ``keys`` (N,) str.

    Build with :meth:`from_arrays` (validates and converts) or :func:`load_features`.
    """

    features: np.ndarray
    labels: np.ndarray
    keys: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    def subset(self, indices: np.ndarray) -> Features:
        """The rows ``indices`` (int array), in that order."""
        return Features(self.features[indices], self.labels[indices], self.keys[indices])

    @classmethod
    def from_arrays(
        cls, features: np.ndarray, labels: np.ndarray, keys: np.ndarray | None = None, source: str = "arrays"
    ) -> Features:
        """Validate and convert; errors start with ``source`` (the file name when loading).

        ``keys`` defaults to the row numbers as strings.
        """
        features = np.asarray(features)
        labels = np.asarray(labels)
        if features.ndim != 2:
            raise FeatureFileError(f"{source}: 'features' must be 2-D (N, D), got shape {features.shape}")
        if not np.issubdtype(features.dtype, np.floating):
            raise FeatureFileError(f"{source}: 'features' must be floating point (float32), got {features.dtype}")
        if labels.ndim != 1:
            raise FeatureFileError(f"{source}: 'labels' must be 1-D (N,), got shape {labels.shape}")
        if not np.issubdtype(labels.dtype, np.integer):
            raise FeatureFileError(f"{source}: 'labels' must be integers (int64), got {labels.dtype}")
        if len(features) != len(labels):
            raise FeatureFileError(
                f"{source}: 'features' has {len(features)} rows but 'labels' has {len(labels)}"
            )
        if len(labels) == 0 or features.shape[1] == 0:
            raise FeatureFileError(f"{source}: empty features, shape {features.shape}")
        if labels.min() < 0:
            raise FeatureFileError(f"{source}: negative label {int(labels.min())}")
        keys = np.arange(len(labels)).astype(str) if keys is None else np.asarray(keys)
        if keys.shape != labels.shape:
            raise FeatureFileError(f"{source}: 'keys' has shape {keys.shape}, expected ({len(labels)},)")
        features = np.ascontiguousarray(features, dtype=np.float32)
        if not np.isfinite(features).all():
            bad = int(np.flatnonzero(~np.isfinite(features).all(axis=1))[0])
            raise FeatureFileError(f"{source}: non-finite feature values (first in row {bad}, key {keys[bad]!r})")
        return cls(features, labels.astype(np.int64, copy=False), keys.astype(str, copy=False))


def load_features(path: str | Path) -> Features:
    """Read one ``{train,val}.npz`` written by the extract stage; every error names the file.

    Raises:
        FileNotFoundError: the file does not exist.
        FeatureFileError: unreadable, an array missing, wrong dtype / ndim, mismatched lengths, empty.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: features file not found (written by the extract stage)")
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [name for name in ("features", "labels", "keys") if name not in data.files]
            if missing:
                raise FeatureFileError(f"{path}: missing array(s) {missing}; found {sorted(data.files)}")
            arrays = {name: data[name] for name in ("features", "labels", "keys")}
    except FeatureFileError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        # ValueError also covers object (pickled) arrays, which we never unpickle
        raise FeatureFileError(f"{path}: not a readable features .npz ({error})") from error
    return Features.from_arrays(arrays["features"], arrays["labels"], arrays["keys"], source=str(path))


def available_variants(root: str | Path, variants: Sequence[str] = FEATURE_VARIANTS) -> list[str]:
    """The ``variants`` with both ``train.npz`` and ``val.npz`` under ``root/<variant>/``, in order.

    Raises:
        FileNotFoundError: a variant has one split but not the other (a half-written extract).
    """
    root = Path(root)
    present = []
    for variant in variants:
        files = [root / variant / f"{split}.npz" for split in SPLITS]
        exists = [f.is_file() for f in files]
        if all(exists):
            present.append(variant)
        elif any(exists):
            missing = [str(f) for f, e in zip(files, exists) if not e]
            raise FileNotFoundError(f"{missing[0]}: missing, although the other split of {variant!r} exists")
    return present


def load_variant(root: str | Path, variant: str) -> tuple[Features, Features]:
    """``(train, val)`` features of one variant; checks that both have the same dimension."""
    train, val = (load_features(Path(root) / variant / f"{split}.npz") for split in SPLITS)
    if train.dim != val.dim:
        raise FeatureFileError(f"{Path(root) / variant}: train features have D={train.dim} but val D={val.dim}")
    return train, val


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


def fewshot_knn(
    train: Features,
    val: Features,
    shots: Iterable[int],
    draws: int,
    k: int,
    temperature: float,
    seed: int,
    chunk_size: int = 1024,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Weighted k-NN top-1 with ``s`` labelled train images per class, over ``draws`` seeded draws.

    Every class of train or val must offer ``s`` train images; otherwise that shot
    count is skipped with a warning (kept in the result) instead of failing. k is
    clamped to the ``s x C`` picked images.

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
        short = [c for c, n in counts.items() if n < s]
        if short:
            worst = min(short, key=lambda c: (counts[c], c))
            reason = f"class {worst} has {counts[worst]} train images"
            if len(short) > 1:
                reason += f" ({len(short)} classes have fewer than {s})"
            warnings.warn(f"few-shot {s}: skipped, {reason}", stacklevel=2)
            skipped[str(s)] = reason
            continue
        runs = []
        for d in range(draws):
            picked = train.subset(draw_fewshot_indices(train.labels, s, seed, d, classes))
            k_eff = min(k, len(picked))
            knn = weighted_knn(
                picked.features, picked.labels, val.features, val.labels, [k_eff], temperature,
                num_classes=num_classes, chunk_size=chunk_size, device=device,
            )
            runs.append(knn["top1"][str(k_eff)])
        result[str(s)] = {"mean": float(np.mean(runs)), "std": float(np.std(runs)), "runs": runs, "k": k_eff}
    result["skipped"] = skipped
    return result


# -------------------------------------------------------------------- linear probe


def l2_normalize(features: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (all-zero rows stay zero); (N, D) float32."""
    features = np.asarray(features, dtype=np.float32)
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.maximum(norms, _EPS)


def linear_probe(
    train: Features,
    val: Features,
    c_values: Sequence[float],
    cv_folds: int,
    max_iter: int,
    seed: int,
) -> dict[str, Any]:
    """Logistic regression on frozen, L2-normalised features; C picked on train only.

    L2 normalisation (not standardisation) because it is per row: no statistic is
    fitted, so nothing leaks between CV folds, and it is the geometry k-NN uses.
    C is chosen by stratified ``cv_folds``-fold CV on train (ties: the smallest C),
    then the model is refit on all of train and scored once on val. lbfgs is a
    deterministic solver and every fit runs in this process (``n_jobs=1``).

    Returns:
        ``top1`` (val, percent), ``C``, ``cv``: ``{C: {"mean", "std"}}`` (percent,
        over folds), ``cv_folds``, ``convergence_warnings``, ``num_train``, ``num_val``,
        ``preprocessing``.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold

    c_values = sorted({float(c) for c in c_values})
    if not c_values or c_values[0] <= 0:
        raise ValueError(f"c_values must be positive, got {c_values}")
    if train.dim != val.dim:
        raise ValueError(f"train features have D={train.dim} but val features D={val.dim}")
    classes, counts = np.unique(train.labels, return_counts=True)
    if len(classes) < 2:
        raise ValueError(f"the linear probe needs at least 2 train classes, got {len(classes)}")
    if counts.min() < cv_folds:
        worst = int(classes[np.argmin(counts)])
        raise ValueError(
            f"linear.cv_folds={cv_folds}: class {worst} has only {int(counts.min())} train images, "
            "too few for stratified cross-validation"
        )
    random_state = derive_seed(seed, "linear") % 2**32  # sklearn wants a 32-bit seed
    search = GridSearchCV(
        LogisticRegression(max_iter=max_iter, random_state=random_state),
        {"C": c_values},
        scoring="accuracy",
        cv=StratifiedKFold(n_splits=cv_folds, shuffle=True, random_state=random_state),
        n_jobs=1,
        refit=True,
        error_score="raise",
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        search.fit(l2_normalize(train.features), train.labels)
    convergence = sum(issubclass(w.category, ConvergenceWarning) for w in caught)
    predictions = search.predict(l2_normalize(val.features))
    cv = search.cv_results_
    return {
        "top1": 100.0 * float(np.mean(predictions == val.labels)),
        "C": float(search.best_params_["C"]),
        "cv": {
            _c_key(c): {"mean": 100.0 * float(mean), "std": 100.0 * float(std)}
            for c, mean, std in zip(cv["param_C"], cv["mean_test_score"], cv["std_test_score"])
        },
        "cv_folds": cv_folds,
        "convergence_warnings": convergence,
        "num_train": len(train),
        "num_val": len(val),
        "preprocessing": "l2",
    }


def _c_key(c: float) -> str:
    return f"{float(c):g}"


# ---------------------------------------------------------------------- clustering


def cluster_quality(features: np.ndarray, labels: np.ndarray, seed: int, n_init: int = 3) -> dict[str, float]:
    """NMI and ARI (percent) of k-means (k = number of classes, seeded) on L2-normalised (N, D) features."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    labels = np.asarray(labels)
    num_clusters = len(np.unique(labels))
    kmeans = KMeans(n_clusters=num_clusters, n_init=n_init, random_state=derive_seed(seed, "kmeans") % 2**32)
    assigned = kmeans.fit_predict(l2_normalize(features))
    return {
        "nmi": 100.0 * float(normalized_mutual_info_score(labels, assigned)),
        "ari": 100.0 * float(adjusted_rand_score(labels, assigned)),
        "num_clusters": num_clusters,
    }


# ------------------------------------------------------------------------- reports


def rounded(value: Any, decimals: int = 4) -> Any:
    """``value`` with every float rounded (recursively through dicts and lists)."""
    if isinstance(value, dict):
        return {k: rounded(v, decimals) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v, decimals) for v in value]
    if isinstance(value, float):
        return round(value, decimals) if math.isfinite(value) else value
    return value


def write_json(value: Any, path: str | Path, decimals: int = 4) -> None:
    """Deterministic JSON (sorted keys, rounded floats, trailing newline), written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(rounded(value, decimals), indent=2, sort_keys=True) + "\n"
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    temporary.write_text(text)
    temporary.replace(path)

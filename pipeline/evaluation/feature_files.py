"""Feature files: one type (:class:`FeatureSet`) and one format for frozen features.

The extract stage writes ``data/features/<variant>/{train,val}.npz``, one per
variant (``pretrained``, ``random_init``, ``pixels``) and split. Each holds
``features`` (N, D) float32, ``labels`` (N,) int64 and ``keys`` (N,) str (the
shard sample keys; row i is sample i of the split). Files carry no timestamps,
so the same inputs give byte-identical files, and are written atomically.
Loading checks everything the evaluation stages rely on and names the file in
every error; no pickles are ever read.
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from pipeline.core.errors import UserError
from pipeline.core.files import atomic_file

VARIANTS = ("pretrained", "random_init", "pixels")
SPLITS = ("train", "val")
# Fixed zip member timestamp (the earliest a zip can hold): np.savez stamps the wall clock.
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


class FeatureFileError(UserError, ValueError):
    """A features file that exists but does not hold what the extract stage promises."""


@dataclass(frozen=True)
class FeatureSet:
    """Frozen features of one split: ``features`` (N, D) float32, ``labels`` (N,) int64, ``keys`` (N,) str.

    Build with :meth:`from_arrays` (validates and converts) or :func:`load_features`.
    """

    features: np.ndarray
    labels: np.ndarray
    keys: np.ndarray

    def __post_init__(self) -> None:
        n = self.features.shape[0]
        if self.features.ndim != 2 or self.labels.shape != (n,) or self.keys.shape != (n,):
            raise ValueError(
                f"inconsistent feature set: features {self.features.shape}, labels {self.labels.shape}, "
                f"keys {self.keys.shape}"
            )

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    def subset(self, indices: np.ndarray) -> FeatureSet:
        """The rows ``indices`` (int array), in that order."""
        return FeatureSet(self.features[indices], self.labels[indices], self.keys[indices])

    @classmethod
    def from_arrays(
        cls, features: np.ndarray, labels: np.ndarray, keys: np.ndarray | None = None, source: str = "arrays"
    ) -> FeatureSet:
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


def write_npz(path: str | Path, arrays: Mapping[str, np.ndarray]) -> None:
    """An uncompressed ``.npz`` (what ``np.savez`` writes) without timestamps, written atomically.

    ``np.savez`` stamps every member with the wall clock, so two writes of the
    same arrays differ; here every member has a fixed date. The bytes go to a
    temporary file in the same folder, are flushed to disk and renamed over
    ``path``: a reader sees the old file or the new one, never a partial one.
    """
    with atomic_file(path) as handle:
        with zipfile.ZipFile(handle, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            for key, value in arrays.items():
                info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_DATE)
                info.compress_type = zipfile.ZIP_STORED
                info.external_attr = 0o644 << 16
                with archive.open(info, mode="w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asanyarray(value), allow_pickle=False)


def save_features(path: str | Path, feature_set: FeatureSet) -> None:
    """Write one split's features (keys ``features``, ``labels``, ``keys``) atomically."""
    write_npz(path, {
        "features": np.ascontiguousarray(feature_set.features, dtype=np.float32),
        "labels": np.ascontiguousarray(feature_set.labels, dtype=np.int64),
        "keys": np.ascontiguousarray(feature_set.keys).astype(str),
    })


def load_features(path: str | Path) -> FeatureSet:
    """Read one ``{train,val}.npz`` written by the extract stage; every error names the file.

    Raises:
        FileNotFoundError: the file does not exist.
        FeatureFileError: unreadable, an array missing, wrong dtype / ndim, mismatched lengths, empty.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: features not found; run `python -m stages.extract` first (it writes this file)")
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
    return FeatureSet.from_arrays(arrays["features"], arrays["labels"], arrays["keys"], source=str(path))


def available_variants(root: str | Path, variants: Sequence[str] = VARIANTS) -> list[str]:
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


def load_variant(root: str | Path, variant: str) -> tuple[FeatureSet, FeatureSet]:
    """``(train, val)`` features of one variant; checks that both have the same dimension."""
    train, val = (load_features(Path(root) / variant / f"{split}.npz") for split in SPLITS)
    if train.dim != val.dim:
        raise FeatureFileError(f"{Path(root) / variant}: train features have D={train.dim} but val D={val.dim}")
    return train, val


def required_variants(root: str | Path, variants: Sequence[str]) -> list[str]:
    """The variants present under ``root``; ``pretrained`` must be one of them."""
    present = available_variants(root, variants)
    if "pretrained" not in present:
        raise FileNotFoundError(f"{Path(root) / 'pretrained' / 'train.npz'}: not found; run the extract stage first")
    return present

"""Feature files: loading checks and error messages (pipeline/evaluation/feature_files.py)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.evaluation.feature_files import FeatureFileError, load_features


# ------------------------------------------------------------------------- loading


def save_npz(path: Path, features, labels, keys=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = np.array([f"k{i}" for i in range(len(labels))]) if keys is None else keys
    np.savez(path, features=features, labels=labels, keys=keys)
    return path


def test_load_features_roundtrip(tmp_path):
    path = save_npz(tmp_path / "train.npz", np.ones((3, 2), np.float32), np.array([0, 1, 1], np.int64))
    loaded = load_features(path)
    assert loaded.features.dtype == np.float32 and loaded.labels.dtype == np.int64
    assert loaded.keys.tolist() == ["k0", "k1", "k2"] and len(loaded) == 3 and loaded.dim == 2


@pytest.mark.parametrize(
    ("features", "labels", "message"),
    [
        (np.ones((3, 2), np.float32), np.array([0, 1]), "'features' has 3 rows but 'labels' has 2"),
        (np.ones(3, np.float32), np.array([0, 1, 1]), "must be 2-D"),
        (np.ones((3, 2), np.int64), np.array([0, 1, 1]), "must be floating point"),
        (np.ones((3, 2), np.float32), np.array([0.0, 1.0, 1.0]), "'labels' must be integers"),
        (np.ones((0, 2), np.float32), np.zeros(0, np.int64), "empty features"),
        (np.full((2, 2), np.nan, np.float32), np.array([0, 1]), "non-finite"),
    ],
)
def test_load_features_errors_name_the_file(tmp_path, features, labels, message):
    path = tmp_path / "features" / "bad.npz"
    save_npz(path, features, labels, keys=np.array([f"k{i}" for i in range(len(features))]))
    with pytest.raises(FeatureFileError, match=message) as error:
        load_features(path)
    assert str(path) in str(error.value)


def test_load_features_missing_file_and_arrays(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope.npz")):
        load_features(tmp_path / "nope.npz")
    np.savez(tmp_path / "partial.npz", features=np.ones((2, 2), np.float32))
    with pytest.raises(FeatureFileError, match=r"partial.npz: missing array\(s\) \['labels', 'keys'\]"):
        load_features(tmp_path / "partial.npz")
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(FeatureFileError, match="junk.npz: not a readable"):
        load_features(tmp_path / "junk.npz")



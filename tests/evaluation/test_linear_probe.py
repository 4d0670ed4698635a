"""The linear probe (pipeline/evaluation/linear_probe.py)."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.evaluation.feature_files import FeatureSet
from pipeline.evaluation.linear_probe import linear_probe
from tests.evaluation.test_knn import blobs


# -------------------------------------------------------------------- linear probe


def test_linear_probe_separable_features_reach_100():
    train = blobs(classes=4, per_class=30, dim=16, seed=0, spread=0.3)
    val = blobs(classes=4, per_class=10, dim=16, seed=1, spread=0.3)
    result = linear_probe(train, val, c_values=[0.1, 1.0, 10.0], cv_folds=3, max_iter=500, seed=0)
    assert result["top1"] == 100.0
    assert set(result["cv"]) == {"0.1", "1", "10"} and result["C"] in (0.1, 1.0, 10.0)
    assert result["cv"]["10"]["mean"] == 100.0
    assert result["preprocessing"] == "l2"


def test_linear_probe_random_labels_are_near_chance():
    rng = np.random.default_rng(0)
    train = FeatureSet.from_arrays(rng.normal(size=(200, 16)).astype(np.float32), rng.integers(0, 4, 200))
    val = FeatureSet.from_arrays(rng.normal(size=(400, 16)).astype(np.float32), rng.integers(0, 4, 400))
    result = linear_probe(train, val, c_values=[0.01, 1.0], cv_folds=3, max_iter=500, seed=0)
    assert 10.0 < result["top1"] < 40.0  # chance is 25%


def test_linear_probe_never_fits_on_val(monkeypatch):
    from sklearn.linear_model import LogisticRegression

    train = blobs(classes=3, per_class=20, dim=8, seed=0, spread=1.5)
    val = blobs(classes=3, per_class=10, dim=8, seed=1, spread=1.5)
    seen: list[np.ndarray] = []
    real_fit = LogisticRegression.fit

    def spy(self, X, y, *args, **kwargs):
        seen.append(np.array(X))
        return real_fit(self, X, y, *args, **kwargs)

    monkeypatch.setattr(LogisticRegression, "fit", spy)
    result = linear_probe(train, val, c_values=[0.01, 1.0, 100.0], cv_folds=3, max_iter=300, seed=0)
    assert len(seen) == 3 * 3 + 1  # folds x C values, then one refit on all of train
    assert len(seen[-1]) == len(train)
    val_rows = {row.tobytes() for row in (val.features / np.linalg.norm(val.features, axis=1, keepdims=True))}
    assert all(not ({row.tobytes() for row in X} & val_rows) for X in seen)
    # scrambled val labels change the val score only, never the choice of C
    scrambled = FeatureSet(val.features, np.roll(val.labels, 7), val.keys)
    other = linear_probe(train, scrambled, c_values=[0.01, 1.0, 100.0], cv_folds=3, max_iter=300, seed=0)
    assert other["C"] == result["C"] and other["cv"] == result["cv"]
    assert other["top1"] != result["top1"]


def test_linear_probe_is_deterministic_and_checks_folds():
    train = blobs(classes=3, per_class=10, dim=8, seed=0, spread=2.0)
    val = blobs(classes=3, per_class=5, dim=8, seed=1, spread=2.0)
    first = linear_probe(train, val, c_values=[0.1, 10.0], cv_folds=3, max_iter=200, seed=5)
    assert first == linear_probe(train, val, c_values=[0.1, 10.0], cv_folds=3, max_iter=200, seed=5)
    with pytest.raises(ValueError, match="linear.cv_folds: 20 stratified folds need 20 train images in every class; "
                                         "class 0 has only 10 "):
        linear_probe(train, val, c_values=[1.0], cv_folds=20, max_iter=100, seed=0)


def test_too_few_images_per_class_for_the_folds_is_one_params_line_not_a_traceback(tmp_path, monkeypatch, capsys):
    """1,000 classes with 2 train images each (a small subset of ImageNet-1k) and the default 3 folds: the
    probe refuses before any fit, naming linear.cv_folds, the smallest class, how many fall short and the fix;
    the stage prints that one line and exits 2. The folds are never lowered silently (C would come from
    another protocol)."""
    from pipeline.core.config import ParamsError, params_from_dict
    from pipeline.core.errors import UserError
    from pipeline.evaluation.feature_files import save_features
    from stages import linear as stage

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(1000), 2)
    train = FeatureSet.from_arrays(rng.normal(size=(2000, 8)).astype(np.float32), labels)
    val = FeatureSet.from_arrays(rng.normal(size=(1000, 8)).astype(np.float32), np.arange(1000))
    with pytest.raises(ParamsError) as error:
        linear_probe(train, val, c_values=[1.0], cv_folds=3, max_iter=10, seed=0)
    assert error.value.key == "linear.cv_folds" and isinstance(error.value, UserError)
    assert str(error.value) == ("linear.cv_folds: 3 stratified folds need 3 train images in every class; class 0 has "
                                "only 2 (1000 of 1000 classes have fewer than 3): set linear.cv_folds to at most 2 "
                                "or use more train images per class")
    one = FeatureSet.from_arrays(train.features[:1001], labels[:1001])  # class 500 keeps a single image
    with pytest.raises(ParamsError, match="class 500 has only 1: cross-validation needs at least 2 per class; use more"):
        linear_probe(one, val, c_values=[1.0], cv_folds=2, max_iter=10, seed=0)

    for split, data in (("train", train), ("val", val)):
        save_features(tmp_path / "data" / "features" / "pretrained" / f"{split}.npz", data)
    (tmp_path / "params.yaml").write_text("linear: {cv_folds: 3}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ATTMASK_TRACEBACK", raising=False)
    from stages import EXIT_USER_ERROR, run_stage

    with pytest.raises(SystemExit) as exited:
        run_stage("linear", stage.main, enabled=False)
    assert exited.value.code == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("linear: pipeline.core.config.ParamsError: linear.cv_folds: 3 "), err

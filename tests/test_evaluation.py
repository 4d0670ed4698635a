"""Evaluation on frozen features: weighted k-NN, few-shot, linear probe, loading, stages."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import params_from_dict
from pipeline.evaluation import (
    FeatureFileError,
    Features,
    cluster_quality,
    draw_fewshot_indices,
    fewshot_knn,
    linear_probe,
    load_features,
    rounded,
    weighted_knn,
    write_json,
)


def unit(angle_degrees: float) -> list[float]:
    angle = math.radians(angle_degrees)
    return [math.cos(angle), math.sin(angle)]


def blobs(classes: int, per_class: int, dim: int, seed: int, spread: float = 0.3, offset: int = 0) -> Features:
    """Gaussian blobs around one-hot-ish class centres (centres fixed by ``classes``, not ``seed``)."""
    centres = np.random.default_rng(1234).normal(size=(classes, dim)) * 2.0
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), per_class)
    features = centres[labels] + spread * rng.normal(size=(len(labels), dim))
    keys = np.array([f"img{offset + i:05d}" for i in range(len(labels))])
    return Features.from_arrays(features.astype(np.float32), labels, keys)


# ---------------------------------------------------------------------------- k-NN


def test_weighting_decides_against_the_majority():
    # val point at 0 degrees. k = 3 neighbours: one class-0 image at 0 degrees
    # (cos = 1.0) and two class-1 images at 60 degrees (cos = 0.5).
    train = np.array([unit(0), unit(60), unit(-60), unit(180)], dtype=np.float32)
    train_labels = np.array([0, 1, 1, 2])
    val = np.array([unit(0)], dtype=np.float32)
    # T = 0.07: class 0 gets exp(1/0.07) = 1.6e6, class 1 gets 2 exp(0.5/0.07) = 2.5e3 -> class 0,
    # although an unweighted majority vote (2 against 1) would say class 1.
    assert math.exp(1 / 0.07) > 2 * math.exp(0.5 / 0.07)
    result = weighted_knn(train, train_labels, val, np.array([0]), ks=[3], temperature=0.07)
    assert result["top1"] == {"3": 100.0}
    wrong = weighted_knn(train, train_labels, val, np.array([1]), ks=[3], temperature=0.07)
    assert wrong["top1"] == {"3": 0.0}
    # T = 10: exp(0.1) = 1.105 against 2 exp(0.05) = 2.103 -> nearly unweighted, class 1 wins
    assert math.exp(1 / 10) < 2 * math.exp(0.5 / 10)
    flat = weighted_knn(train, train_labels, val, np.array([1]), ks=[3], temperature=10.0)
    assert flat["top1"] == {"3": 100.0}
    # k = 1: only the nearest image votes
    assert weighted_knn(train, train_labels, val, np.array([0]), ks=[1], temperature=10.0)["top1"] == {"1": 100.0}


def test_known_answer_with_several_ks_and_unnormalised_inputs():
    # row lengths must not matter (cosine similarity): scale rows arbitrarily
    train = np.array([unit(0), unit(10), unit(90), unit(95), unit(100)], dtype=np.float32)
    train *= np.array([[1.0], [5.0], [0.2], [3.0], [7.0]], dtype=np.float32)
    train_labels = np.array([0, 0, 1, 1, 1])
    val = np.array([unit(5), unit(92), unit(48)], dtype=np.float32) * 4.0
    val_labels = np.array([0, 1, 0])
    # unit(5) and unit(92) are deep inside their classes for every k. unit(48) has cosines
    # 0.669 (0 deg), 0.788 (10 deg) to class 0 and 0.743 (90), 0.682 (95), 0.616 (100) to class 1:
    # k=1 -> 10 deg, class 0. k=5, T=0.07: class 0 e^(0.669/T) + e^(0.788/T) = 91.6e3 against class 1
    # e^(0.743/T) + e^(0.682/T) + e^(0.616/T) = 64.4e3 -> class 0 (right). T=1: 4.15 against 5.93 -> class 1.
    cold = weighted_knn(train, train_labels, val, val_labels, ks=[1, 2, 5], temperature=0.07)
    assert cold["top1"] == {"1": 100.0, "2": 100.0, "5": 100.0}
    warm = weighted_knn(train, train_labels, val, val_labels, ks=[1, 5], temperature=1.0)
    assert warm["top1"] == {"1": 100.0, "5": pytest.approx(200 / 3)}
    assert cold["num_classes"] == 2 and cold["num_train"] == 5 and cold["num_val"] == 3


def test_top5_with_fewer_than_five_classes_is_top_c():
    data = blobs(classes=3, per_class=10, dim=4, seed=0)
    val = blobs(classes=3, per_class=4, dim=4, seed=1)
    result = weighted_knn(data.features, data.labels, val.features, val.labels, ks=[5])
    assert result["top5_n"] == 3
    assert result["top5"] == {"5": 100.0}  # the right class is always among all 3
    many = blobs(classes=7, per_class=10, dim=4, seed=0)
    assert weighted_knn(many.features, many.labels, many.features, many.labels, ks=[5])["top5_n"] == 5


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 16, 1000])
def test_chunked_equals_unchunked(chunk_size):
    train = blobs(classes=5, per_class=20, dim=8, seed=0, spread=1.5)  # overlapping: not all correct
    val = blobs(classes=5, per_class=5, dim=8, seed=1, spread=1.5)
    assert len(val) % 7 and len(val) % 16  # chunk sizes that do not divide N_val
    reference = weighted_knn(train.features, train.labels, val.features, val.labels, ks=[1, 5, 20], chunk_size=len(val))
    chunked = weighted_knn(train.features, train.labels, val.features, val.labels, ks=[1, 5, 20], chunk_size=chunk_size)
    assert chunked == reference
    assert 0 < reference["top1"]["20"] < 100  # a non-trivial case


def test_k_larger_than_train_is_clamped_and_reported():
    train = blobs(classes=2, per_class=3, dim=4, seed=0)
    val = blobs(classes=2, per_class=5, dim=4, seed=1)
    result = weighted_knn(train.features, train.labels, val.features, val.labels, ks=[2, 10, 200])
    assert result["clamped"] == {"10": 6, "200": 6}
    assert set(result["top1"]) == {"2", "10", "200"}
    exact = weighted_knn(train.features, train.labels, val.features, val.labels, ks=[6])
    assert result["top1"]["200"] == result["top1"]["10"] == exact["top1"]["6"]
    assert exact["clamped"] == {}


def test_knn_is_deterministic_and_handles_tiny_temperature():
    train = blobs(classes=4, per_class=15, dim=6, seed=0, spread=1.0)
    val = blobs(classes=4, per_class=6, dim=6, seed=1, spread=1.0)
    first = weighted_knn(train.features, train.labels, val.features, val.labels, ks=[10])
    assert first == weighted_knn(train.features, train.labels, val.features, val.labels, ks=[10])
    # exp(1 / 0.001) overflows float32; the max-shifted weights must not produce NaN/inf votes
    cold = weighted_knn(train.features, train.labels, val.features, val.labels, ks=[10], temperature=0.001)
    nearest = weighted_knn(train.features, train.labels, val.features, val.labels, ks=[1])
    assert cold["top1"]["10"] == nearest["top1"]["1"]


def test_knn_rejects_bad_inputs():
    features = np.ones((4, 3), dtype=np.float32)
    labels = np.array([0, 1, 0, 1])
    with pytest.raises(ValueError, match="D=3 but val features D=2"):
        weighted_knn(features, labels, np.ones((2, 2), dtype=np.float32), labels[:2], ks=[1])
    with pytest.raises(ValueError, match="train_labels must have shape"):
        weighted_knn(features, labels[:3], features, labels, ks=[1])
    with pytest.raises(ValueError, match="ks"):
        weighted_knn(features, labels, features, labels, ks=[0])
    with pytest.raises(ValueError, match="num_classes=2"):
        weighted_knn(features, labels, features, labels + 1, ks=[1], num_classes=2)


# ------------------------------------------------------------------------ few-shot


def test_fewshot_draw_counts_seeds_and_train_only():
    labels = np.repeat(np.arange(4), [10, 12, 9, 15])
    picked = draw_fewshot_indices(labels, shots=5, seed=0, draw=0)
    assert np.bincount(labels[picked]).tolist() == [5, 5, 5, 5]
    assert len(set(picked.tolist())) == 20 and picked.min() >= 0 and picked.max() < len(labels)
    assert np.array_equal(picked, draw_fewshot_indices(labels, shots=5, seed=0, draw=0))
    assert not np.array_equal(picked, draw_fewshot_indices(labels, shots=5, seed=0, draw=1))
    assert not np.array_equal(picked, draw_fewshot_indices(labels, shots=5, seed=1, draw=0))
    with pytest.raises(ValueError, match="class 2 has 9 train images"):
        draw_fewshot_indices(labels, shots=10, seed=0, draw=0)


def test_fewshot_uses_only_drawn_train_images(monkeypatch):
    import pipeline.evaluation as evaluation

    train = blobs(classes=3, per_class=8, dim=4, seed=0)
    val = blobs(classes=3, per_class=4, dim=4, seed=1, offset=1000)
    calls = []
    real = evaluation.weighted_knn

    def spy(train_features, train_labels, val_features, val_labels, ks, *args, **kwargs):
        calls.append((np.array(train_features), np.array(train_labels), list(ks)))
        return real(train_features, train_labels, val_features, val_labels, ks, *args, **kwargs)

    monkeypatch.setattr(evaluation, "weighted_knn", spy)
    result = fewshot_knn(train, val, shots=[2], draws=3, k=20, temperature=0.07, seed=0)
    assert len(calls) == 3
    train_rows = {row.tobytes() for row in train.features}
    val_rows = {row.tobytes() for row in val.features}
    for features, labels, ks in calls:
        assert np.bincount(labels).tolist() == [2, 2, 2]
        rows = {row.tobytes() for row in features}
        assert rows <= train_rows and not rows & val_rows
        assert ks == [6]  # k = 20 clamped to the 2 x 3 picked images
    assert result["2"]["k"] == 6 and len(result["2"]["runs"]) == 3
    assert result["2"]["mean"] == pytest.approx(np.mean(result["2"]["runs"]))
    assert result["2"]["std"] == pytest.approx(np.std(result["2"]["runs"]))


def test_fewshot_is_seeded_and_skips_short_classes_with_a_warning():
    train = blobs(classes=3, per_class=12, dim=4, seed=0, spread=2.0)
    train = train.subset(np.flatnonzero((train.labels != 2) | (np.arange(len(train)) % 12 < 5)))  # class 2: 5 images
    val = blobs(classes=3, per_class=10, dim=4, seed=1, spread=2.0)
    with pytest.warns(UserWarning, match="few-shot 10: skipped, class 2 has 5 train images"):
        result = fewshot_knn(train, val, shots=[1, 5, 10], draws=4, k=20, temperature=0.07, seed=3)
    assert result["skipped"] == {"10": "class 2 has 5 train images"}
    assert set(result) == {"1", "5", "skipped"}
    assert len(set(result["1"]["runs"])) > 1  # different draws, different accuracies
    with pytest.warns(UserWarning):
        again = fewshot_knn(train, val, shots=[1, 5, 10], draws=4, k=20, temperature=0.07, seed=3)
    assert again == result


def test_fewshot_counts_classes_missing_from_train():
    train = blobs(classes=2, per_class=5, dim=4, seed=0)
    val = blobs(classes=3, per_class=2, dim=4, seed=1)  # class 2 has no train images at all
    with pytest.warns(UserWarning):
        result = fewshot_knn(train, val, shots=[1], draws=1, k=5, temperature=0.07, seed=0)
    assert result == {"skipped": {"1": "class 2 has 0 train images"}}


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
    train = Features.from_arrays(rng.normal(size=(200, 16)).astype(np.float32), rng.integers(0, 4, 200))
    val = Features.from_arrays(rng.normal(size=(400, 16)).astype(np.float32), rng.integers(0, 4, 400))
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
    scrambled = Features(val.features, np.roll(val.labels, 7), val.keys)
    other = linear_probe(train, scrambled, c_values=[0.01, 1.0, 100.0], cv_folds=3, max_iter=300, seed=0)
    assert other["C"] == result["C"] and other["cv"] == result["cv"]
    assert other["top1"] != result["top1"]


def test_linear_probe_is_deterministic_and_checks_folds():
    train = blobs(classes=3, per_class=10, dim=8, seed=0, spread=2.0)
    val = blobs(classes=3, per_class=5, dim=8, seed=1, spread=2.0)
    first = linear_probe(train, val, c_values=[0.1, 10.0], cv_folds=3, max_iter=200, seed=5)
    assert first == linear_probe(train, val, c_values=[0.1, 10.0], cv_folds=3, max_iter=200, seed=5)
    with pytest.raises(ValueError, match="cv_folds=20: class 0 has only 10 train images"):
        linear_probe(train, val, c_values=[1.0], cv_folds=20, max_iter=100, seed=0)


def test_cluster_quality_separable_blobs():
    data = blobs(classes=3, per_class=20, dim=8, seed=0, spread=0.1)
    quality = cluster_quality(data.features, data.labels, seed=0)
    assert quality["nmi"] == pytest.approx(100.0) and quality["ari"] == pytest.approx(100.0)
    assert quality == cluster_quality(data.features, data.labels, seed=0)


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


def test_write_json_is_rounded_and_sorted(tmp_path):
    write_json({"b": 1 / 3, "a": [2 / 3, 1]}, tmp_path / "out" / "x.json")
    assert (tmp_path / "out" / "x.json").read_text() == '{\n  "a": [\n    0.6667,\n    1\n  ],\n  "b": 0.3333\n}\n'


# -------------------------------------------------------------------------- stages


def write_variant(root: Path, variant: str, classes: int, per_class: int, spread: float, dim: int = 8) -> None:
    for split, seed, count in (("train", 0, per_class), ("val", 1, 5)):
        data = blobs(classes=classes, per_class=count, dim=dim, seed=seed, spread=spread)
        save_npz(root / "data" / "features" / variant / f"{split}.npz", data.features, data.labels, data.keys)


@pytest.fixture()
def feature_tree(tmp_path, monkeypatch):
    # 12 train images per class: k = 100/200 clamp, 20-shot is skipped
    write_variant(tmp_path, "pretrained", classes=3, per_class=12, spread=0.3)
    write_variant(tmp_path, "random_init", classes=3, per_class=12, spread=3.0)
    write_variant(tmp_path, "pixels", classes=3, per_class=12, spread=3.0, dim=20)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def default_params():
    return params_from_dict({})


def test_knn_stage_writes_every_variant(feature_tree, default_params, capsys):
    from stages import knn

    result = knn.main(default_params)
    written = json.loads((feature_tree / "reports" / "eval" / "knn.json").read_text())
    assert set(written) == {"pretrained", "random_init", "pixels"}
    assert set(written["pretrained"]["top1"]) == {"10", "20", "100", "200"}
    assert written["pretrained"]["top1"]["10"] == 100.0
    assert written["pretrained"]["clamped"] == {"100": 36, "200": 36}
    assert written == rounded(result)  # the JSON is the returned result, rounded to 4 decimals
    assert "pretrained" in capsys.readouterr().out
    before = (feature_tree / "reports" / "eval" / "knn.json").read_bytes()
    knn.main(default_params)
    assert (feature_tree / "reports" / "eval" / "knn.json").read_bytes() == before


def test_knn_stage_needs_pretrained_features(tmp_path, monkeypatch, default_params):
    from stages import knn

    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="pretrained/train.npz"):
        knn.main(default_params)


def test_fewshot_stage_writes_json_with_skipped_shots(feature_tree, default_params):
    from stages import fewshot

    with pytest.warns(UserWarning, match="few-shot 20"):
        fewshot.main(default_params)
    written = json.loads((feature_tree / "reports" / "eval" / "fewshot.json").read_text())
    assert set(written) == {"pretrained", "random_init"}
    assert set(written["pretrained"]) == {"1", "5", "10", "skipped"}
    assert written["pretrained"]["skipped"] == {"20": "class 0 has 12 train images (3 classes have fewer than 20)"}
    assert len(written["pretrained"]["1"]["runs"]) == default_params.fewshot.draws
    assert written["pretrained"]["10"]["mean"] == 100.0


def test_linear_stage_writes_json(feature_tree, default_params):
    from stages import linear

    linear.main(default_params)
    written = json.loads((feature_tree / "reports" / "eval" / "linear.json").read_text())
    assert set(written) == {"pretrained", "random_init"}
    assert written["pretrained"]["top1"] == 100.0
    assert set(written["pretrained"]["cv"]) == {"0.01", "0.1", "1", "10", "100"}
    assert written["pretrained"]["C"] in (0.01, 0.1, 1.0, 10.0, 100.0)

"""Weighted k-NN and few-shot k-NN on frozen features (pipeline/evaluation/knn.py)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.evaluation.feature_files import FeatureSet
from pipeline.evaluation.knn import draw_fewshot_indices, fewshot_knn, slice_fewshot_indices, weighted_knn


def unit(angle_degrees: float) -> list[float]:
    angle = math.radians(angle_degrees)
    return [math.cos(angle), math.sin(angle)]


def blobs(classes: int, per_class: int, dim: int, seed: int, spread: float = 0.3, offset: int = 0) -> FeatureSet:
    """Gaussian blobs around one-hot-ish class centres (centres fixed by ``classes``, not ``seed``)."""
    centres = np.random.default_rng(1234).normal(size=(classes, dim)) * 2.0
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), per_class)
    features = centres[labels] + spread * rng.normal(size=(len(labels), dim))
    keys = np.array([f"img{offset + i:05d}" for i in range(len(labels))])
    return FeatureSet.from_arrays(features.astype(np.float32), labels, keys)


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
    import pipeline.evaluation.knn as evaluation

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
    with pytest.warns(UserWarning, match="few-shot 10: skipped, needs 10 train images per class; class 2 has 5$"):
        result = fewshot_knn(train, val, shots=[1, 5, 10], draws=4, k=20, temperature=0.07, seed=3)
    assert result["skipped"] == {"10": "needs 10 train images per class; class 2 has 5"}
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
    assert result == {"skipped": {"1": "needs 1 train image per class; class 2 has 0"}}


# ------------------------------------------------- fewshot.draw: slices (the official low-shot protocol)
def test_slices_are_contiguous_runs_of_each_class_in_path_order():
    labels = np.array([1, 0, 1, 0, 0, 1, 0, 1])
    paths = ["b/3", "a/2", "b/0", "a/0", "a/3", "b/1", "a/1", "b/2"]  # rows are shuffled, as in the shards
    # class 0 in path order: rows 3, 6, 1, 4; class 1: rows 2, 5, 7, 0
    assert slice_fewshot_indices(labels, paths, shots=2, draw=0).tolist() == [2, 3, 5, 6]
    assert slice_fewshot_indices(labels, paths, shots=2, draw=1).tolist() == [0, 1, 4, 7]
    assert slice_fewshot_indices(labels, paths, shots=1, draw=3).tolist() == [0, 4]
    with pytest.raises(ValueError, match="class 0 has 4 train images, fewer than 6 for slice 2"):
        slice_fewshot_indices(labels, paths, shots=2, draw=2)
    with pytest.raises(ValueError, match="3 paths for 8 train labels"):
        slice_fewshot_indices(labels, paths[:3], shots=1, draw=0)


def test_fewshot_with_paths_takes_disjoint_slices_and_needs_draws_times_shots(monkeypatch):
    import pipeline.evaluation.knn as evaluation

    train = blobs(classes=3, per_class=8, dim=4, seed=0)
    val = blobs(classes=3, per_class=4, dim=4, seed=1, offset=1000)
    paths = [f"c{label}/{i:03d}" for i, label in enumerate(train.labels)]
    seen = []
    real = evaluation.weighted_knn

    def spy(train_features, *args, **kwargs):
        seen.append({row.tobytes() for row in np.asarray(train_features)})
        return real(train_features, *args, **kwargs)

    monkeypatch.setattr(evaluation, "weighted_knn", spy)
    with pytest.warns(UserWarning, match=r"few-shot 3: skipped, needs 9 train images per class \(3 draws x 3 shots, "
                                         r"slices do not overlap\); class 0 has 8, 3 of 3 classes have fewer"):
        result = fewshot_knn(train, val, shots=[2, 3], draws=3, k=20, temperature=0.07, seed=0, paths=paths)
    assert set(result) == {"2", "skipped"}  # 3 draws x 3 shots > 8 images per class
    assert len(seen) == 3 and not (seen[0] & seen[1] or seen[1] & seen[2] or seen[0] & seen[2])
    first = {row.tobytes() for row in train.features[slice_fewshot_indices(train.labels, paths, 2, 0)]}
    assert seen[0] == first
    assert fewshot_knn(train, val, shots=[2], draws=3, k=20, temperature=0.07, seed=5, paths=paths)["2"] == result["2"]

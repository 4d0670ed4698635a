"""Linear probe on frozen features: scikit-learn logistic regression, C chosen on train only."""
from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np

from pipeline.core.config import ParamsError
from pipeline.core.errors import UserError
from pipeline.core.seeding import derive_seed
from pipeline.evaluation.feature_files import FeatureSet

_EPS = 1e-12  # as F.normalize: an all-zero feature row stays zero


class ProbeDataError(UserError, ValueError):
    """The train features cannot be probed at all (fewer than two classes); the message says what was found."""


def l2_normalize(features: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (all-zero rows stay zero); (N, D) float32."""
    features = np.asarray(features, dtype=np.float32)
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.maximum(norms, _EPS)


def linear_probe(
    train: FeatureSet,
    val: FeatureSet,
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
        raise ProbeDataError(f"the linear probe needs at least 2 train classes, got {len(classes)}")
    check_folds(classes, counts, cv_folds)
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


def check_folds(classes: np.ndarray, counts: np.ndarray, cv_folds: int) -> None:
    """Stratified ``cv_folds``-fold CV needs ``cv_folds`` train images in every class (each fold scores one).

    At 1,000 classes with a few images each (a small subset, a rehearsal) the smallest class decides.
    The folds are not lowered behind the user's back: the C chosen would come from another protocol.

    Raises:
        ParamsError: ``linear.cv_folds``, naming the smallest class, how many classes fall short and what to set.
    """
    short = counts < cv_folds
    if not short.any():
        return
    worst = int(np.argmin(counts))
    least = int(counts[worst])
    others = f" ({int(short.sum())} of {len(classes)} classes have fewer than {cv_folds})" if short.sum() > 1 else ""
    fix = (f"set linear.cv_folds to at most {least} or use more train images per class" if least >= 2 else
           "cross-validation needs at least 2 per class; use more train images per class")
    raise ParamsError("linear.cv_folds", f"{cv_folds} stratified folds need {cv_folds} train images in every class; "
                                         f"class {int(classes[worst])} has only {least}{others}: {fix}")


def _c_key(c: float) -> str:
    return f"{float(c):g}"

"""Cross-validation machinery shared by every blind baseline.

A blind baseline is a scikit-learn estimator plus a hyper-parameter grid. The estimator sees only
per-sample inputs that need no fitting (texts, fixed media descriptors); everything that learns
from data (vectorisers, scalers, visual codebooks, classifiers) lives inside the estimator, so it is
refit in every training fold, and the grid is searched by an inner cross-validation on that
training fold alone (nested CV).

Pooling rule: each outer fold has its own classifier, and classifiers score on their own scales (a
forest's vote shares, a naive Bayes posterior, a base rate when nothing was learned), so raw
out-of-fold scores pooled across folds mix scales and the pooled AUC is off the per-fold one. Each
fold's scores are therefore replaced, before pooling, by their quantile within the fold: the share
of the fold that scores strictly lower, one scale for every fold. Ranks inside a fold are unchanged,
so each fold's AUC is kept exactly, and folds whose classifiers rank alike pool to that same AUC.
Rows without evidence (no rule matched, no year found, a classifier that learned nothing) tie at
the bottom of their fold and get 0 in every fold, so they tie across folds too; constant scores
give AUC exactly 0.5. (Mid-ranks would put such a block at a height set by how many rows of its
fold did match, an ordering across folds that no classifier made: +0.01 to +0.03 on the greedy
n-gram rules.) The quantiles use the test fold's scores, never its labels. TPR at low FPR, the ROC
and the bootstrap intervals all come from the one pooled vector.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, clone
from sklearn.ensemble import GradientBoostingClassifier, RandomForestClassifier, StackingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedGroupKFold, StratifiedKFold
from sklearn.naive_bayes import MultinomialNB

__all__ = [
    "SEARCH_PRESETS",
    "SearchSpace",
    "BlindMethod",
    "classifier",
    "cross_validate",
    "fit_and_score",
    "fold_quantiles",
]


@dataclass(frozen=True)
class SearchSpace:
    """How much of the hyper-parameter space the inner cross-validation explores."""

    text_models: tuple[str, ...]
    media_models: tuple[str, ...]
    vectorizers: tuple[str, ...]
    max_features: tuple[int | None, ...]
    inner_folds: int = 3


SEARCH_PRESETS: dict[str, SearchSpace] = {
    # a few seconds per baseline on hundreds of samples
    "fast": SearchSpace(("nb", "logreg"), ("logreg",), ("tfidf", "count"), (None,)),
    # the default: the model families of Blind-MIA without the (slow) stacking ensemble
    "standard": SearchSpace(("nb", "logreg", "rf", "gb"), ("logreg", "rf", "gb"), ("tfidf", "count"), (None,)),
    # Blind-MIA's grid: vocabulary sizes and stacking as well
    "full": SearchSpace(
        ("nb", "logreg", "rf", "gb", "stack"), ("logreg", "rf", "gb", "stack"), ("tfidf", "count"), (16, 64, 256, None)
    ),
}


def classifier(name: str, *, seed: int = 0, nonnegative: bool = True) -> BaseEstimator:
    """One small, fast classifier by name (nb, logreg, rf, gb, stack).

    Naive Bayes needs non-negative features (word counts); for standardised media features it is
    replaced by logistic regression.
    """
    if name == "nb":
        return MultinomialNB(alpha=0.1) if nonnegative else LogisticRegression(max_iter=2000)
    if name == "logreg":
        return LogisticRegression(C=1.0, max_iter=2000)
    # 50 trees / boosting stages, as Blind-MIA uses: on hundreds of rows the time goes to per-tree
    # overhead, and the permuted-label check refits the primary method over and over
    if name == "rf":
        return RandomForestClassifier(n_estimators=50, min_samples_leaf=2, random_state=seed, n_jobs=1)
    if name == "gb":
        return GradientBoostingClassifier(n_estimators=50, max_depth=2, learning_rate=0.2, random_state=seed)
    if name == "stack":
        base = [("rf", classifier("rf", seed=seed)), ("gb", classifier("gb", seed=seed))]
        base.append(("nb", MultinomialNB(alpha=0.1)) if nonnegative else ("lr", LogisticRegression(max_iter=2000)))
        return StackingClassifier(base, final_estimator=LogisticRegression(max_iter=2000), cv=3, n_jobs=1)
    raise ValueError(f"unknown classifier {name!r}; expected nb, logreg, rf, gb or stack")


@dataclass(frozen=True)
class BlindMethod:
    """A named blind baseline.

    ``build(space, seed)`` returns ``(estimator, param_grid)``; ``inputs(table)`` picks what the
    estimator consumes from a :class:`~fimmia_hf.shift.BlindTable`.
    """

    name: str
    build: Callable[[SearchSpace, int], tuple[BaseEstimator, list[dict[str, list[Any]]]]]
    inputs: Callable[[Any], Any]
    description: str = ""
    tags: tuple[str, ...] = field(default_factory=tuple)


def positive_scores(estimator: BaseEstimator, X: Any) -> np.ndarray:
    """Score of the member class (label 1): P(member) when available, else the decision function."""
    classes = list(getattr(estimator, "classes_", [0, 1]))
    if hasattr(estimator, "predict_proba"):
        proba = estimator.predict_proba(X)
        return np.asarray(proba[:, classes.index(1)], dtype=np.float64)
    return np.asarray(estimator.decision_function(X), dtype=np.float64).reshape(-1)


def _grid_size(grid: list[dict[str, list[Any]]]) -> int:
    return sum(int(np.prod([len(v) for v in g.values()])) if g else 1 for g in grid)


def _describe(params: dict[str, Any]) -> str:
    parts = []
    for key, value in sorted(params.items()):
        if isinstance(value, BaseEstimator):
            kind = type(value).__name__
            value = f"{kind}(max_features={value.max_features})" if kind.endswith("Vectorizer") else kind
        parts.append(f"{key}={value}")
    return ", ".join(parts)


def _take(X: Any, idx: np.ndarray) -> Any:
    if hasattr(X, "iloc"):
        return X.iloc[idx]
    return X[idx]


def fit_with_search(
    estimator: BaseEstimator,
    grid: list[dict[str, list[Any]]],
    X: Any,
    y: np.ndarray,
    *,
    inner_folds: int,
    seed: int,
    n_jobs: int = 1,
) -> tuple[BaseEstimator, str]:
    """Choose hyper-parameters by inner CV (AUC) on (X, y) only, refit on all of it."""
    counts = np.bincount(y, minlength=2)
    if counts.min() == 0:
        raise ValueError("a training fold holds only one class; need both members (1) and non-members (0)")
    n_inner = int(min(inner_folds, counts.min()))
    if _grid_size(grid) <= 1 or n_inner < 2:
        chosen = {k: v[0] for k, v in grid[0].items()} if grid else {}
        model = clone(estimator).set_params(**chosen).fit(X, y)
        return model, _describe(chosen)
    search = GridSearchCV(
        clone(estimator),
        grid,
        scoring="roc_auc",
        cv=StratifiedKFold(n_inner, shuffle=True, random_state=seed),
        n_jobs=n_jobs,
        refit=True,
        error_score="raise",
    )
    search.fit(X, y)
    return search.best_estimator_, _describe(search.best_params_)


def outer_folds(y: np.ndarray, folds: int, seed: int, groups: Sequence[Any] | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified outer folds; rows sharing a group (``sample_id``) stay on one side."""
    counts = np.bincount(y, minlength=2)
    n_splits = int(min(folds, counts.min()))
    if n_splits < 2:
        raise ValueError(
            f"cross-validation needs at least 2 members and 2 non-members (got {counts[1]} and {counts[0]})"
        )
    dummy = np.zeros(len(y))
    if groups is not None and len(set(groups)) < len(groups):
        splitter = StratifiedGroupKFold(n_splits, shuffle=True, random_state=seed)
        return list(splitter.split(dummy, y, groups))
    return list(StratifiedKFold(n_splits, shuffle=True, random_state=seed).split(dummy, y))


def fold_quantiles(scores: np.ndarray) -> np.ndarray:
    """Each score's quantile in [0, 1): the share of ``scores`` strictly below it (ties share one; constant -> 0)."""
    from scipy.stats import rankdata

    scores = np.asarray(scores, dtype=np.float64)
    return (rankdata(scores, method="min") - 1) / len(scores)


def cross_validate(
    method: BlindMethod,
    X: Any,
    y: np.ndarray,
    *,
    space: SearchSpace,
    folds: int,
    seed: int,
    groups: Sequence[Any] | None = None,
    n_jobs: int = 1,
    fold_limit: int | None = None,
) -> tuple[np.ndarray, list[float], list[str]]:
    """Out-of-fold scores as within-fold quantiles (see the module docstring), per-fold AUCs, chosen hyper-parameters.

    ``fold_limit`` scores only the first ``fold_limit`` outer folds (the other rows stay NaN): one
    held-out fold is enough for a repeat of the permuted-label check.
    """
    from sklearn.metrics import roc_auc_score

    estimator, grid = method.build(space, seed)
    scores = np.full(len(y), np.nan)
    fold_aucs, chosen = [], []
    for train, test in outer_folds(y, folds, seed, groups)[:fold_limit]:
        model, params = fit_with_search(
            estimator, grid, _take(X, train), y[train], inner_folds=space.inner_folds, seed=seed, n_jobs=n_jobs
        )
        scores[test] = fold_quantiles(positive_scores(model, _take(X, test)))
        if len(set(y[test])) == 2:
            fold_aucs.append(float(roc_auc_score(y[test], scores[test])))
        chosen.append(params)
    return scores, fold_aucs, chosen


def fit_and_score(
    method: BlindMethod,
    X_train: Any,
    y_train: np.ndarray,
    X_test: Any,
    *,
    space: SearchSpace,
    seed: int,
    n_jobs: int = 1,
) -> tuple[np.ndarray, str]:
    """Train/test mode: search and fit on the training set, score the test set."""
    estimator, grid = method.build(space, seed)
    model, params = fit_with_search(
        estimator, grid, X_train, y_train, inner_folds=space.inner_folds, seed=seed, n_jobs=n_jobs
    )
    return positive_scores(model, X_test), params

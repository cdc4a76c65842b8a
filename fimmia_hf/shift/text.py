"""Blind baselines on the text of a sample: bag of words, date detection, greedy n-gram rules.

After Das, Zhang & Tramèr, "Blind Baselines Beat Membership Inference Attacks for Foundation
Models" (arXiv 2406.16201): members and non-members of post-hoc benchmarks are told apart by words
and dates alone, without ever querying the model.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, TransformerMixin
from sklearn.feature_extraction.text import CountVectorizer, TfidfVectorizer
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline

from .evaluation import BlindMethod, SearchSpace, classifier

__all__ = [
    "sample_text",
    "extract_dates",
    "DateFeatures",
    "GreedyNgramClassifier",
    "bag_of_words_method",
    "date_detection_method",
    "greedy_ngrams_method",
    "text_vectorizer",
]


def sample_text(input: Any, answer: Any) -> str:
    """What a blind text baseline reads: the prompt and the answer."""
    return f"{input or ''}\n{answer or ''}"


# ---------------------------------------------------------------------------------------------
# bag of words


def text_vectorizer(kind: str, max_features: int | None) -> BaseEstimator:
    """TF-IDF or raw counts over word unigrams (numbers such as years are kept as words)."""
    words = r"(?u)\b\w+\b"  # one-character words count too (short answers: "A", "5")
    if kind == "tfidf":
        return TfidfVectorizer(max_features=max_features, sublinear_tf=True, token_pattern=words)
    if kind == "count":
        return CountVectorizer(max_features=max_features, token_pattern=words)
    raise ValueError(f"unknown vectorizer {kind!r}; expected 'tfidf' or 'count'")


# Trees split one feature at a threshold, and TF-IDF is a per-word monotone rescaling of counts up to
# each document's length normalisation: it teaches them next to nothing, so they search counts only
# (half the tree fits, the bulk of the search's time).
TREE_MODELS = ("rf", "gb")


def bag_of_words_method() -> BlindMethod:
    """Vectoriser + classifier; vectoriser kind, vocabulary size and model are searched per fold."""

    def build(space: SearchSpace, seed: int):
        pipe = Pipeline([("vec", text_vectorizer("tfidf", None)), ("clf", classifier("nb"))])
        trees = [c for c in space.text_models if c in TREE_MODELS]
        others = [c for c in space.text_models if c not in TREE_MODELS]
        tree_vectorizers = [v for v in space.vectorizers if v == "count"] or list(space.vectorizers)
        grid = [
            {
                "vec": [text_vectorizer(v, m) for v in kinds for m in space.max_features],
                "clf": [classifier(c, seed=seed) for c in models],
            }
            for kinds, models in ((space.vectorizers, others), (tree_vectorizers, trees))
            if models
        ]
        return pipe, grid

    return BlindMethod("bag_of_words", build, lambda t: t.texts, "TF-IDF/count words + NB/LR/RF/GB/stacking")


# ---------------------------------------------------------------------------------------------
# date detection

_YEAR = re.compile(r"(?<!\d)(1[6-9]\d\d|20\d\d)(?!\d)")
_MONTHS = (
    "january february march april may june july august september october november december".split()
)
_MONTH_ALT = "|".join([m for m in _MONTHS] + [m[:3] for m in _MONTHS])
_DATE_PATTERNS = (
    # 2021-03-14, 2021/03/14
    re.compile(r"(?<!\d)(?P<y>1[6-9]\d\d|20\d\d)[-/.](?P<m>0?[1-9]|1[0-2])[-/.](?:[0-2]?\d|3[01])(?!\d)"),
    # 14/03/2021, 03-14-2021 (the month is ambiguous; take the year only)
    re.compile(r"(?<!\d)(?:[0-3]?\d)[-/.](?:[0-3]?\d)[-/.](?P<y>1[6-9]\d\d|20\d\d)(?!\d)"),
    # March 2021, 14 March 2021, March 14, 2021
    re.compile(rf"\b(?P<mn>{_MONTH_ALT})\.?\s+(?:[0-3]?\d(?:st|nd|rd|th)?,?\s+)?(?P<y>1[6-9]\d\d|20\d\d)(?!\d)", re.I),
    re.compile(rf"\b[0-3]?\d(?:st|nd|rd|th)?\s+(?P<mn>{_MONTH_ALT})\.?,?\s+(?P<y>1[6-9]\d\d|20\d\d)(?!\d)", re.I),
)


def extract_dates(text: str) -> tuple[list[int], list[float]]:
    """Years (1600-2099) mentioned in ``text`` and full dates as fractional years (2021.17 = March 2021)."""
    years = [int(y) for y in _YEAR.findall(text)]
    dates = []
    for pattern in _DATE_PATTERNS:
        for m in pattern.finditer(text):
            month = 0
            groups = m.groupdict()
            if groups.get("m"):
                month = int(groups["m"]) - 1
            elif groups.get("mn"):
                name = groups["mn"].lower()[:3]
                month = [x[:3] for x in _MONTHS].index(name)
            dates.append(int(groups["y"]) + month / 12.0)
    return years, dates


class DateFeatures(TransformerMixin, BaseEstimator):
    """Stateless text -> date features: has/number of years, max/min/mean year, number/latest full date.

    The max year against a cutoff is Blind-MIA's ``date_detection`` rule; a depth-limited tree
    ensemble on these features learns that cutoff (and its direction) inside each training fold.
    Texts without a year get 0 in the year columns and 0 in ``has_year``.
    """

    names = ("has_year", "n_years", "max_year", "min_year", "mean_year", "n_dates", "latest_date")

    def fit(self, X: Any, y: Any = None) -> DateFeatures:
        return self

    def transform(self, X: Any) -> np.ndarray:
        rows = []
        for text in X:
            years, dates = extract_dates(str(text))
            if years:
                rows.append([1.0, len(years), max(years), min(years), float(np.mean(years)), len(dates), max(dates, default=0.0)])
            else:
                rows.append([0.0, 0.0, 0.0, 0.0, 0.0, len(dates), max(dates, default=0.0)])
        return np.asarray(rows, dtype=np.float64).reshape(-1, len(self.names))


def date_detection_method() -> BlindMethod:
    """Dates in the text -> small gradient-boosted trees (depth searched per fold)."""

    def build(space: SearchSpace, seed: int):
        from sklearn.ensemble import GradientBoostingClassifier

        pipe = Pipeline(
            [("dates", DateFeatures()), ("clf", GradientBoostingClassifier(n_estimators=50, max_depth=1, random_state=seed))]
        )
        return pipe, [{"clf__max_depth": [1, 2]}]

    return BlindMethod("date_detection", build, lambda t: t.texts, "years and dates mentioned in the text")


# ---------------------------------------------------------------------------------------------
# greedy n-gram rules at an FPR budget


def greedy_rule_order(presence: Any, y: np.ndarray, max_rules: int) -> list[int]:
    """Greedy rule list over binary n-gram presence (Blind-MIA's ``greedy_selection``).

    Each step adds the n-gram maximising (members newly covered) / (non-members newly covered + 1),
    so rules that flag members without flagging non-members come first.
    """
    presence = presence.tocsc().astype(np.float64)
    members, others = presence[y == 1], presence[y == 0]
    open_m = np.ones(members.shape[0])
    open_o = np.ones(others.shape[0])
    order: list[int] = []
    used = np.zeros(presence.shape[1], dtype=bool)
    for _ in range(max_rules):
        gain_m = np.asarray(members.T @ open_m).ravel()
        gain_o = np.asarray(others.T @ open_o).ravel()
        ratio = np.where(used | (gain_m == 0), -np.inf, gain_m / (gain_o + 1.0))
        best = int(np.argmax(ratio))
        if not np.isfinite(ratio[best]):
            break
        order.append(best)
        used[best] = True
        open_m[np.asarray(members[:, best].todense()).ravel() > 0] = 0
        open_o[np.asarray(others[:, best].todense()).ravel() > 0] = 0
    return order


class GreedyNgramClassifier(ClassifierMixin, BaseEstimator):
    """An ordered list of character n-gram rules, cut where a held-out FPR exceeds ``fpr_budget``.

    ``fit`` orders rules greedily on part of the training data and picks how many to keep on the
    rest (largest held-out TPR with FPR <= budget), so the budget is respected on data the rules
    were not chosen on. A text's score is (rules kept - index of its first matching rule) / rules
    kept, and 0 when no kept rule matches: the ROC is exact up to the budget and flat after it.
    """

    def __init__(
        self,
        fpr_budget: float = 0.01,
        ngram_range: tuple[int, int] = (3, 5),
        max_rules: int = 64,
        calibration_size: float = 0.3,
        min_df: int = 2,
        random_state: int = 0,
    ) -> None:
        self.fpr_budget = fpr_budget
        self.ngram_range = ngram_range
        self.max_rules = max_rules
        self.calibration_size = calibration_size
        self.min_df = min_df
        self.random_state = random_state

    def fit(self, X: Any, y: Any) -> GreedyNgramClassifier:
        texts = [str(t).lower() for t in X]
        y = np.asarray(y).astype(int)
        self.classes_ = np.array([0, 1])
        if np.bincount(y, minlength=2).min() >= 4:
            select, calib = train_test_split(
                np.arange(len(texts)), test_size=self.calibration_size, stratify=y, random_state=self.random_state
            )
        else:  # too few samples to hold some out: calibrate on the selection data (optimistic)
            select = calib = np.arange(len(texts))
        vec = CountVectorizer(analyzer="char_wb", ngram_range=self.ngram_range, min_df=self.min_df, binary=True)
        try:
            presence = vec.fit_transform([texts[i] for i in select])
        except ValueError:  # no n-gram reaches min_df: no rule can be learned
            self.rules_ = []
            return self
        order = greedy_rule_order(presence, y[select], self.max_rules)
        vocab = np.array(vec.get_feature_names_out())
        rules = [str(vocab[i]) for i in order]
        # first matching rule per calibration text -> pick the prefix length within the FPR budget
        first = self._first_match([texts[i] for i in calib], rules)
        y_cal = y[calib]
        n_pos, n_neg = max(1, int((y_cal == 1).sum())), max(1, int((y_cal == 0).sum()))
        best_len, best_tpr = 0, 0.0
        for length in range(1, len(rules) + 1):
            flagged = first < length
            fpr = float((flagged & (y_cal == 0)).sum()) / n_neg
            tpr = float((flagged & (y_cal == 1)).sum()) / n_pos
            if fpr > self.fpr_budget:
                break
            if tpr > best_tpr:
                best_len, best_tpr = length, tpr
        self.rules_ = rules[:best_len]
        self.calibration_tpr_ = best_tpr
        return self

    @staticmethod
    def _first_match(texts: list[str], rules: list[str]) -> np.ndarray:
        first = np.full(len(texts), len(rules) + 1, dtype=np.int64)
        for i, text in enumerate(texts):
            padded = f" {' '.join(text.split())} "  # char_wb pads words with spaces
            for j, rule in enumerate(rules):
                if rule in padded:
                    first[i] = j
                    break
        return first

    def decision_function(self, X: Any) -> np.ndarray:
        rules = self.rules_
        if not rules:
            return np.zeros(len(X))
        first = self._first_match([str(t).lower() for t in X], rules)
        return np.where(first < len(rules), (len(rules) - first) / len(rules), 0.0)

    def predict(self, X: Any) -> np.ndarray:
        return (self.decision_function(X) > 0).astype(int)


def greedy_ngrams_method(fpr_budget: float) -> BlindMethod:
    """Greedy character n-gram rules tuned for TPR at ``fpr_budget`` (n-gram length searched per fold)."""

    def build(space: SearchSpace, seed: int):
        model = GreedyNgramClassifier(fpr_budget=fpr_budget, random_state=seed)
        return model, [{"ngram_range": [(3, 5), (5, 8)]}]

    return BlindMethod("greedy_ngrams", build, lambda t: t.texts, f"greedy n-gram rules at FPR <= {fpr_budget:g}")

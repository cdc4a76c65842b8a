"""Blind (model-free) distribution-shift baselines: can members be told apart without the model?

On most published MIA benchmarks they can (Das, Zhang & Tramèr 2024; Duan et al. 2024): members and
non-members come from different distributions, and any attack, above all a learned one, may be
measuring that shift instead of membership. :func:`run_blind_baselines` runs classifiers that never
query a model, on text (words, dates, n-gram rules), on the media (image, audio, video statistics)
and on both, with nested stratified cross-validation (or on a given train/test split). A blind AUC
well above 0.5 means the split cannot support membership claims.

Two rules keep those AUCs honest. Out-of-fold scores become quantiles within their fold before
pooling, because each fold's classifier scores on its own scale (:mod:`fimmia_hf.shift.evaluation`).
And a permuted-label check reruns the primary method, search included, on independent label
permutations: a pipeline that overfits noise (or leaks) lands away from 0.5, and the repeats give
an interval, so :func:`sanity_warning` can tell a failed check from noise.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from threadpoolctl import threadpool_limits
from transformers.hf_argparser import HfArg

from ..data import labels_of, table_column, table_columns
from ..metrics import json_safe
from .evaluation import SEARCH_PRESETS, BlindMethod, SearchSpace, classifier, cross_validate, fit_and_score
from .text import bag_of_words_method, date_detection_method, greedy_ngrams_method, sample_text, text_vectorizer

__all__ = [
    "BlindTable",
    "SEARCH_PRESETS",
    "build_table",
    "blind_methods",
    "run_blind_baselines",
    "sanity_warning",
    "describe_evaluation",
    "ShiftArguments",
    "run_shift",
]

MEDIA_MODALITIES = ("image", "audio", "video")
PERMUTED = "permuted_labels"
SANITY_REPEATS = 10  # permutations in the sanity check: a t-interval of about ±0.05 on 400 rows


# ---------------------------------------------------------------------------------------------
# per-sample inputs (fixed functions of one sample: computing them before the folds leaks nothing)


@dataclass
class BlindTable:
    """What the blind methods read: texts, fixed media descriptors and (images) local descriptors."""

    texts: np.ndarray
    media: np.ndarray | None = None
    local: np.ndarray | None = None

    def joint(self) -> Any:
        """A DataFrame with a ``text`` column and one column per media feature (for ColumnTransformer)."""
        import pandas as pd

        frame = pd.DataFrame(self.media, columns=[f"m{i}" for i in range(self.media.shape[1])])
        frame.insert(0, "text", list(self.texts))
        return frame


def _modality(ds: Any, modality: str | None) -> str:
    columns = table_columns(ds)
    if modality is None:
        return next((m for m in MEDIA_MODALITIES if m in columns), "text")
    if modality not in (*MEDIA_MODALITIES, "text"):
        raise ValueError(f"unknown modality {modality!r}; expected text, image, audio or video")
    if modality != "text" and modality not in columns:
        raise ValueError(f"modality {modality!r} needs a {modality!r} column (columns: {', '.join(columns)})")
    return modality


def _labels(ds: Any, where: str) -> np.ndarray:
    if "label" not in table_columns(ds):
        raise ValueError(f"{where}: blind baselines need a 'label' column (1 = member, 0 = non-member)")
    return np.asarray(labels_of(table_column(ds, "label"), where), dtype=np.int64)


def build_table(ds: Any, modality: str, *, progress: bool = True) -> BlindTable:
    """Texts and the fixed media descriptors of every sample of ``ds``."""
    from tqdm.auto import tqdm

    columns = table_columns(ds)
    for needed in ("input", "answer"):
        if needed not in columns:
            raise ValueError(f"blind baselines need an {needed!r} column (columns: {', '.join(columns)})")
    texts = np.asarray([sample_text(i, a) for i, a in zip(table_column(ds, "input"), table_column(ds, "answer"))], dtype=object)
    if modality == "text":
        return BlindTable(texts)

    from ..media import MediaError, load_media

    values = table_column(ds, modality)
    media, local = [], []
    for row, value in enumerate(tqdm(values, desc=f"{modality} features", disable=not progress, leave=False)):
        try:
            if modality == "image":
                from .image import image_global_features, image_local_descriptors

                image = load_media("image", value)
                media.append(image_global_features(image))
                local.append(image_local_descriptors(image).ravel())
            elif modality == "audio":
                from .audio import AUDIO_RATE, audio_features

                wave, rate = load_media("audio", value, sampling_rate=AUDIO_RATE)
                media.append(audio_features(wave, rate))
            else:
                from .video import video_features

                media.append(video_features(load_media("video", value, num_frames=8)))
        except MediaError as err:
            raise ValueError(f"row {row + 1}: column {modality!r}: {err}") from err
    features = np.nan_to_num(np.asarray(media, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    return BlindTable(texts, features, np.asarray(local, dtype=np.float64) if local else None)


# ---------------------------------------------------------------------------------------------
# the methods


def _joint_method(modality: str) -> BlindMethod:
    """Words of the text next to the media descriptors, one classifier over both."""

    def build(space: SearchSpace, seed: int):
        from sklearn.compose import ColumnTransformer, make_column_selector
        from sklearn.pipeline import Pipeline
        from sklearn.preprocessing import StandardScaler

        features = ColumnTransformer(
            [
                ("text", text_vectorizer("tfidf", None), "text"),
                ("media", StandardScaler(), make_column_selector(pattern=r"^m\d+$")),
            ],
            sparse_threshold=1.0,
        )
        pipe = Pipeline([("features", features), ("clf", classifier("logreg"))])
        grid = [
            {
                "features__text": [text_vectorizer(v, m) for v in space.vectorizers for m in space.max_features],
                "clf": [classifier(c, seed=seed, nonnegative=False) for c in space.media_models],
            }
        ]
        return pipe, grid

    return BlindMethod(f"joint_text_{modality}", build, BlindTable.joint, f"text words + {modality} descriptors")


def blind_methods(modality: str, *, fpr_budget: float = 0.01) -> list[BlindMethod]:
    """The baselines that apply to ``modality``, primary one first (it gets the permuted-label run)."""
    text = [bag_of_words_method(), date_detection_method(), greedy_ngrams_method(fpr_budget)]
    if modality == "text":
        return text
    from .image import bag_of_visual_words_method, media_features_method

    descriptions = {
        "image": "size, colour histograms, DCT, LBP, sharpness",
        "audio": "loudness, spectral shape, MFCC and chroma statistics",
        "video": "per-frame image statistics + motion",
    }
    media = [media_features_method(f"{modality}_features", lambda t: t.media, descriptions[modality])]
    if modality == "image":
        media.append(bag_of_visual_words_method())
    return [_joint_method(modality), *media, *text]


# ---------------------------------------------------------------------------------------------
# running


def _metrics(labels: np.ndarray, scores: np.ndarray) -> dict[str, Any]:
    from ..metrics import membership_metrics

    return dict(membership_metrics(labels, scores))


def _mean_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, tuple[float, float]]:
    """Mean of independent repeats and its Student-t interval (clipped to [0, 1], the range of an AUC)."""
    from scipy.stats import t

    values = np.asarray(values, dtype=np.float64)
    mean = float(values.mean()) if len(values) else math.nan
    if len(values) < 2:
        return mean, (math.nan, math.nan)
    half = float(t.ppf(0.5 + confidence / 2, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values)))
    return mean, (max(0.0, mean - half), min(1.0, mean + half))


def _groups(ds: Any) -> list[Any] | None:
    return table_column(ds, "sample_id") if "sample_id" in table_columns(ds) else None


@dataclass
class _Evaluation:
    """How every method is scored: cross-validation on ``table``, or fit on it and score ``test_table``."""

    table: BlindTable
    y: np.ndarray
    test_table: BlindTable | None
    y_test: np.ndarray | None
    space: SearchSpace
    folds: int
    seed: int
    groups: list[Any] | None
    n_jobs: int

    def _cross_validate(
        self, method: BlindMethod, labels: np.ndarray, seed: int, fold_limit: int | None = None
    ) -> tuple[np.ndarray, list[float], list[str]]:
        return cross_validate(
            method, method.inputs(self.table), labels, space=self.space, folds=self.folds, seed=seed,
            groups=self.groups, n_jobs=self.n_jobs, fold_limit=fold_limit,
        )

    def baseline(self, method: BlindMethod) -> dict[str, Any]:
        """Metrics + scores of one baseline on the true labels."""
        if self.test_table is None:
            scores, fold_aucs, params = self._cross_validate(method, self.y, self.seed)
            entry = _metrics(self.y, scores)
            entry["fold_auc_mean"] = float(np.mean(fold_aucs)) if fold_aucs else math.nan
            entry["fold_auc_std"] = float(np.std(fold_aucs)) if fold_aucs else math.nan
            entry["evaluation"] = (
                f"{len(params)}-fold cross-validation, hyper-parameters searched inside each training fold; before "
                "pooling, each score becomes its quantile within its fold (the share of the fold scoring lower), so "
                "every fold is on one scale and constant scores give AUC 0.5"
            )
        else:
            scores, chosen = fit_and_score(
                method, method.inputs(self.table), self.y, method.inputs(self.test_table), space=self.space,
                seed=self.seed, n_jobs=self.n_jobs,
            )
            params = [chosen]
            entry = _metrics(self.y_test, scores)
            entry["evaluation"] = "fitted on the training split (hyper-parameters searched on it), scored on the test split"
        entry["params"] = params
        entry["scores"] = scores
        return entry

    def permuted(self, method: BlindMethod, rng: np.random.Generator, repeats: int) -> dict[str, Any]:
        """The permuted-label check: ``repeats`` independent label permutations, each scored on a held-out fold.

        A repeat shuffles the labels of ``table`` (the training split in train/test mode), draws a
        fresh stratified split and runs the full method, search included, on all folds but one,
        scoring the held-out fold: a method that fits noise, or a split that leaks, lands away from
        0.5. One fold per repeat buys the most independent repeats for the time. The repeats are
        independent, so the mean of their AUCs has a Student-t interval (a sound pipeline still
        misses it about one run in twenty); the other metrics come from the held-out quantiles pooled.
        """
        aucs: list[float] = []
        scores, labels, params = [], [], []
        for _ in range(repeats):
            shuffled = rng.permutation(self.y)
            held, fold_aucs, chosen = self._cross_validate(method, shuffled, int(rng.integers(2**31 - 1)), fold_limit=1)
            rows = ~np.isnan(held)
            aucs += fold_aucs
            scores.append(held[rows])
            labels.append(shuffled[rows])
            params += chosen
        entry = _metrics(np.concatenate(labels), np.concatenate(scores))
        entry["auc"], entry["auc_ci"] = _mean_interval(aucs)
        data = "the data" if self.test_table is None else "the training split"
        entry["evaluation"] = (
            f"mean held-out-fold AUC of the same method and search on {repeats} independent label permutations of "
            f"{data}, with a 95 % Student-t interval that must include 0.5"
        )
        entry.update(repeat_aucs=aucs, repeats=repeats, params=params, method=method.name)
        entry["scores"], entry["labels"] = np.concatenate(scores), np.concatenate(labels)
        return entry


def run_blind_baselines(
    ds: Any,
    *,
    modality: str | None = None,
    folds: int = 5,
    seed: int = 0,
    fpr_budget: float = 0.01,
    test_ds: Any = None,
    methods: Sequence[str] | None = None,
    search: str | SearchSpace = "standard",
    sanity: bool = True,
    sanity_repeats: int = SANITY_REPEATS,
    n_jobs: int = 1,
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Run every blind baseline that fits the data; name -> metrics.

    ``ds`` has ``label``, ``input``, ``answer`` and at most one media column (``image``/``audio``/
    ``video``: paths or decoded values). Without ``test_ds``: stratified ``folds``-fold CV (rows
    sharing a ``sample_id`` stay together), hyper-parameters searched by an inner CV on each
    training fold, metrics on the out-of-fold scores pooled as within-fold quantiles (the pooling
    rule: :mod:`fimmia_hf.shift.evaluation`). With ``test_ds``: fit on ``ds``, score ``test_ds``
    (so the baselines share the test split of the other attacks).

    Each entry is :func:`fimmia_hf.metrics.membership_metrics` of the scores plus ``scores``
    (np.ndarray aligned with the scored rows, higher = member: within-fold quantiles in CV mode,
    P(member) in train/test mode), ``params`` (the hyper-parameters chosen, one string per fit),
    ``evaluation`` (one sentence: how the scores and metrics were obtained) and ``fold_auc_mean`` /
    ``fold_auc_std`` in CV mode.

    The entry ``"permuted_labels"`` is the sanity check: the primary method (its ``method`` key)
    rerun on ``sanity_repeats`` independent label permutations (see :meth:`_Evaluation.permuted`).
    Its ``auc`` is the mean over the repeats (``repeat_aucs``) and ``auc_ci`` a Student-t interval;
    :func:`sanity_warning` speaks up when that interval excludes 0.5. Its ``scores`` are the
    repeats' held-out scores (within-fold quantiles), one repeat after the other, with the
    ``labels`` they were scored against (not aligned with the rows).

    ``methods`` restricts the run to those names; ``search`` is a :data:`SEARCH_PRESETS` name or a
    :class:`SearchSpace`.
    """
    from tqdm.auto import tqdm

    if not 0.0 < fpr_budget < 1.0:
        raise ValueError(f"fpr_budget must lie in (0, 1), got {fpr_budget}")
    if sanity and sanity_repeats < 2:
        raise ValueError(f"sanity_repeats must be at least 2 (an interval needs two repeats), got {sanity_repeats}")
    space = SEARCH_PRESETS[search] if isinstance(search, str) else search
    modality = _modality(ds, modality)
    if test_ds is not None:
        _modality(test_ds, modality)
    y = _labels(ds, "training data" if test_ds is not None else "data")
    y_test = _labels(test_ds, "test data") if test_ds is not None else None

    available = blind_methods(modality, fpr_budget=fpr_budget)
    if methods is not None:
        known = {m.name for m in available}
        unknown = [m for m in methods if m not in known]
        if unknown:
            raise ValueError(f"unknown blind method(s) {unknown} for modality {modality!r}; available: {sorted(known)}")
        available = [m for m in available if m.name in methods]

    evaluation = _Evaluation(
        table=build_table(ds, modality, progress=progress),
        y=y,
        test_table=build_table(test_ds, modality, progress=progress) if test_ds is not None else None,
        y_test=y_test,
        space=space,
        folds=folds,
        seed=seed,
        groups=_groups(ds),
        n_jobs=n_jobs,
    )
    rng = np.random.default_rng(seed)
    runs = [(m.name, m, evaluation.baseline) for m in available]
    if sanity and available:
        runs.append((PERMUTED, available[0], lambda m: evaluation.permuted(m, rng, sanity_repeats)))
    results: dict[str, dict[str, Any]] = {}
    with threadpool_limits(limits=1, user_api="blas"):  # small matrices: BLAS threads only contend
        for name, method, run in tqdm(runs, desc="blind baselines", disable=not progress, leave=False):
            try:
                results[name] = run(method)
            except ValueError as err:
                if "empty vocabulary" not in str(err):
                    raise
                warnings.warn(f"blind baseline {method.name!r} skipped: the texts contain no words", stacklevel=2)
    return results


def sanity_warning(entry: Mapping[str, Any] | None) -> str | None:
    """The warning for a permuted-label check whose interval excludes 0.5; None when it passed or did not run."""
    if entry is None:
        return None
    low, high = entry["auc_ci"]
    if not (math.isfinite(low) and math.isfinite(high)) or low <= 0.5 <= high:
        return None
    return (
        f"PERMUTED-LABEL CHECK FAILED: with shuffled labels {entry['method']} reaches AUC {entry['auc']:.3f} "
        f"[{low:.3f}, {high:.3f}] over {entry.get('repeats', 1)} permutation(s), an interval that excludes 0.5: "
        "the blind baselines may be overfitting; do not trust their AUCs."
    )


def describe_evaluation(results: Mapping[str, Mapping[str, Any]]) -> str | None:
    """One sentence on how the blind baselines and their permuted-label check were scored (the pooling rule)."""
    baseline = next((e["evaluation"] for n, e in results.items() if n != PERMUTED and "evaluation" in e), None)
    check = results.get(PERMUTED, {}).get("evaluation")
    parts = [f"Blind baselines: {baseline}." if baseline else "", f"Permuted-label check: {check}." if check else ""]
    return " ".join(p for p in parts if p) or None


# ---------------------------------------------------------------------------------------------
# command line (wired into `fimmia-hf shift` by cli.py)


@dataclass
class ShiftArguments:
    """`fimmia-hf shift`."""

    EXAMPLE: ClassVar[str] = "fimmia-hf shift --data samples.csv --modality image --out shift.json"
    data: str = HfArg(help="labelled samples: CSV/TSV/Parquet/JSON(L) table or save_to_disk folder")
    test: str | None = HfArg(default=None, help="optional test split: fit on --data, score this")
    modality: str | None = HfArg(default=None, metadata={"choices": ("text", *MEDIA_MODALITIES)},
                                 help="the samples' modality (default: from the media column)")
    media_root: str | None = HfArg(default=None, help="folder that relative media paths start from")
    folds: int = HfArg(default=5, help="outer cross-validation folds")
    seed: int = HfArg(default=0, help="seed of the folds and the models")
    fpr_budget: float = HfArg(default=0.01, help="FPR budget of the greedy n-gram rules")
    methods: str | None = HfArg(default=None, help="comma-separated subset of the baselines (default: all)")
    search: str = HfArg(default="standard", metadata={"choices": tuple(SEARCH_PRESETS)},
                        help="hyper-parameter grid size")
    sanity: bool = HfArg(default=True, help="run the permuted-label check (--no-sanity skips it)")
    sanity_repeats: int = HfArg(default=SANITY_REPEATS,
                                help="label permutations in the permuted-label check (at least 2)")
    out: str | None = HfArg(default=None, help="write the results (metrics and scores) to this JSON file")


def run_shift(args: ShiftArguments) -> dict[str, dict[str, Any]]:
    """``fimmia-hf shift``: load, run the blind baselines, print a table, optionally write JSON."""
    from ..data import load_samples

    ds = load_samples(args.data, modality=args.modality, media_root=args.media_root)
    test_ds = load_samples(args.test, modality=args.modality, media_root=args.media_root) if args.test else None
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    results = run_blind_baselines(
        ds,
        modality=args.modality,
        folds=args.folds,
        seed=args.seed,
        fpr_budget=args.fpr_budget,
        test_ds=test_ds,
        methods=methods,
        search=args.search,
        sanity=args.sanity,
        sanity_repeats=args.sanity_repeats,
    )
    print(f"{'method':<32} {'AUC [95% CI]':>22} {'TPR@1%FPR':>10}")
    for name, entry in results.items():
        label = f"{name} ({entry['method']})" if "method" in entry else name
        low, high = entry["auc_ci"]
        auc = f"{entry['auc']:.3f} [{low:.3f}, {high:.3f}]"
        print(f"{label:<32} {auc:>22} {entry.get('tpr@1%fpr', math.nan):>10.3f}")
    print(describe_evaluation(results) or "")
    worst = max((e.get("auc", 0.0) for n, e in results.items() if n != PERMUTED), default=0.0)
    if worst >= 0.6:
        print(f"warning: a blind baseline reaches AUC {worst:.3f} >= 0.6; members and non-members differ in "
              "distribution, so membership claims on this split are not supported")
    failed = sanity_warning(results.get(PERMUTED))
    if failed:
        print(f"warning: {failed}")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"modality": _modality(ds, args.modality), "n": len(ds), "results": json_safe(results)}
        if "sample_id" in table_columns(test_ds if test_ds is not None else ds):
            payload["sample_id"] = table_column(test_ds if test_ds is not None else ds, "sample_id")
        out.write_text(json.dumps(payload, indent=2))
    return results

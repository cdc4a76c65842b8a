"""Blind (model-free) distribution-shift baselines: can members be told apart without the model?

On most published MIA benchmarks they can (Das, Zhang & Tramèr 2024; Duan et al. 2024): members and
non-members come from different distributions, and any attack, above all a learned one, may be
measuring that shift instead of membership. :func:`run_blind_baselines` runs classifiers that never
query a model, on text (words, dates, n-gram rules), on the media (image, audio, video statistics)
and on both, with nested stratified cross-validation (or on a given train/test split), plus a
permuted-label run that must come out at AUC ~ 0.5. A blind AUC well above 0.5 means the split
cannot support membership claims.
"""

from __future__ import annotations

import argparse
import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from ..data import table_column, table_columns
from ..metrics import json_safe
from .evaluation import SEARCH_PRESETS, BlindMethod, SearchSpace, classifier, cross_validate, fit_and_score
from .text import bag_of_words_method, date_detection_method, greedy_ngrams_method, sample_text, text_vectorizer

__all__ = [
    "BlindTable",
    "SEARCH_PRESETS",
    "build_table",
    "blind_methods",
    "run_blind_baselines",
    "add_shift_arguments",
    "run_shift",
]

MEDIA_MODALITIES = ("image", "audio", "video")
PERMUTED = "permuted_labels"


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
    labels = []
    for i, v in enumerate(table_column(ds, "label")):
        if v is None or v not in (0, 1):
            raise ValueError(f"{where}: row {i + 1}: column 'label' must be 0 or 1, got {v!r}")
        labels.append(int(v))
    return np.asarray(labels, dtype=np.int64)


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


def _groups(ds: Any) -> list[Any] | None:
    return table_column(ds, "sample_id") if "sample_id" in table_columns(ds) else None


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
    P(member) in train/test mode), ``params`` (the hyper-parameters
    chosen, one string per fit) and ``fold_auc_mean`` / ``fold_auc_std`` in CV mode. The entry
    ``"permuted_labels"`` reruns the primary method with shuffled labels (its ``method`` key says
    which; in train/test mode the test labels are shuffled too); its AUC must be ~ 0.5, otherwise
    the pipeline leaks. ``methods`` restricts the run to
    those names; ``search`` is a :data:`SEARCH_PRESETS` name or a :class:`SearchSpace`.
    """
    from tqdm.auto import tqdm

    if not 0.0 < fpr_budget < 1.0:
        raise ValueError(f"fpr_budget must lie in (0, 1), got {fpr_budget}")
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

    table = build_table(ds, modality, progress=progress)
    test_table = build_table(test_ds, modality, progress=progress) if test_ds is not None else None
    groups = _groups(ds)
    rng = np.random.default_rng(seed)

    runs = [(m, False) for m in available]
    if sanity and available:
        runs.append((available[0], True))
    results: dict[str, dict[str, Any]] = {}
    with threadpool_limits(limits=1, user_api="blas"):  # small matrices: BLAS threads only contend
        for method, permuted in tqdm(runs, desc="blind baselines", disable=not progress, leave=False):
            try:
                results.update(
                    _run_one(method, permuted, rng, y, y_test, table, test_table, space, folds, seed, groups, n_jobs)
                )
            except ValueError as err:
                if "empty vocabulary" not in str(err):
                    raise
                warnings.warn(f"blind baseline {method.name!r} skipped: the texts contain no words", stacklevel=2)
    return results


def _run_one(
    method: BlindMethod,
    permuted: bool,
    rng: np.random.Generator,
    y: np.ndarray,
    y_test: np.ndarray | None,
    table: BlindTable,
    test_table: BlindTable | None,
    space: SearchSpace,
    folds: int,
    seed: int,
    groups: list[Any] | None,
    n_jobs: int,
) -> dict[str, dict[str, Any]]:
    """One baseline (or the permuted-label rerun of one) -> {name: metrics + scores}."""
    labels = rng.permutation(y) if permuted else y
    extra: dict[str, Any] = {}
    if test_table is None:
        scores, fold_aucs, params = cross_validate(
            method, method.inputs(table), labels, space=space, folds=folds, seed=seed, groups=groups, n_jobs=n_jobs
        )
        eval_labels = labels
        extra["fold_auc_mean"] = float(np.mean(fold_aucs)) if fold_aucs else math.nan
        extra["fold_auc_std"] = float(np.std(fold_aucs)) if fold_aucs else math.nan
        extra["params"] = params
    else:
        scores, params = fit_and_score(
            method, method.inputs(table), labels, method.inputs(test_table), space=space, seed=seed, n_jobs=n_jobs
        )
        # the permuted run shuffles the test labels too: any AUC away from 0.5 is then a leak
        eval_labels = rng.permutation(y_test) if permuted else y_test
        extra["params"] = [params]
    entry = _metrics(eval_labels, scores)
    entry.update(extra)
    entry["scores"] = scores
    if permuted:
        entry["method"] = method.name
    return {PERMUTED if permuted else method.name: entry}


# ---------------------------------------------------------------------------------------------
# command line (wired into `fimmia-hf shift` by cli.py)


def add_shift_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``fimmia-hf shift``."""
    parser.add_argument("--data", required=True, help="labelled samples: CSV/TSV/Parquet/JSON(L) table or save_to_disk folder")
    parser.add_argument("--test-data", default=None, help="optional test split: fit on --data, score this")
    parser.add_argument("--modality", choices=("text", *MEDIA_MODALITIES), default=None, help="default: from the media column")
    parser.add_argument("--media-root", default=None, help="folder that relative media paths start from")
    parser.add_argument("--folds", type=int, default=5, help="outer cross-validation folds (default 5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fpr-budget", type=float, default=0.01, help="FPR budget of the greedy n-gram rules")
    parser.add_argument("--methods", default=None, help="comma-separated subset of the baselines")
    parser.add_argument("--search", choices=tuple(SEARCH_PRESETS), default="standard", help="hyper-parameter grid size")
    parser.add_argument("--no-sanity", action="store_true", help="skip the permuted-label run")
    parser.add_argument("--out", default=None, help="write the results (metrics and scores) to this JSON file")
    return parser


def run_shift(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """``fimmia-hf shift``: load, run the blind baselines, print a table, optionally write JSON."""
    from ..data import load_samples

    ds = load_samples(args.data, modality=args.modality, media_root=args.media_root)
    test_ds = load_samples(args.test_data, modality=args.modality, media_root=args.media_root) if args.test_data else None
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
        sanity=not args.no_sanity,
    )
    print(f"{'method':<28} {'AUC':>7} {'TPR@1%FPR':>10}")
    for name, entry in results.items():
        label = f"{name} ({entry['method']})" if "method" in entry else name
        print(f"{label:<28} {entry.get('auc', math.nan):>7.3f} {entry.get('tpr@1%fpr', math.nan):>10.3f}")
    worst = max((e.get("auc", 0.0) for n, e in results.items() if n != PERMUTED), default=0.0)
    if worst >= 0.6:
        print(f"warning: a blind baseline reaches AUC {worst:.3f} >= 0.6; members and non-members differ in "
              "distribution, so membership claims on this split are not supported")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"modality": _modality(ds, args.modality), "n": len(ds), "results": json_safe(results)}
        if "sample_id" in table_columns(test_ds if test_ds is not None else ds):
            payload["sample_id"] = table_column(test_ds if test_ds is not None else ds, "sample_id")
        out.write_text(json.dumps(payload, indent=2))
    return results

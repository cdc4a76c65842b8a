"""Exact membership-inference metrics with stratified-bootstrap confidence intervals, and ROC plots.

Conventions (tested): label 1 = member, higher score = member. The ROC is the exact step curve over every
distinct score (tied scores form one point, as ``sklearn.metrics.roc_curve(drop_intermediate=False)``).
TPR@x%FPR is the largest TPR among ROC points with FPR ≤ x (no interpolation); FPR@95%TPR is the smallest
FPR among points with TPR ≥ 0.95; AUC counts ties as one half. Bootstrap resamples members and
non-members separately (stratified), so every resample keeps both classes and the class sizes.

The bootstrap is vectorised: a resample is a vector of multiplicities over the distinct scores, so all
resamples share one sort and every metric is a cumulative sum over a ``[n_bootstrap, n_levels]`` array.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

TPR_FOR_FPR = 0.95
# Elements per [chunk, n_levels] block; bounds bootstrap memory (int64 ≈ 8 bytes each) for large inputs.
_BLOCK_ELEMENTS = 4_000_000


def fpr_key(fpr: float) -> str:
    """``0.001 -> "tpr@0.1%fpr"``: the metric name used in results, reports and the evaluate module."""
    return f"tpr@{fpr * 100:g}%fpr"


FPR_AT_TPR_KEY = f"fpr@{TPR_FOR_FPR * 100:g}%tpr"


def _validate(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim != 1 or s.ndim != 1 or len(y) != len(s):
        raise ValueError(f"labels and scores must be 1-D of equal length, got shapes {y.shape} and {s.shape}")
    if len(y) == 0:
        raise ValueError("no samples: labels and scores are empty")
    if not np.isin(y, (0, 1)).all():
        bad = np.unique(y[~np.isin(y, (0, 1))])[:5]
        raise ValueError(f"labels must be 0 (non-member) or 1 (member); found {bad.tolist()}")
    if not np.isfinite(s).all():
        raise ValueError(f"scores contain {int((~np.isfinite(s)).sum())} NaN/inf values (first at index "
                         f"{int(np.flatnonzero(~np.isfinite(s))[0])}); drop or fix those samples first")
    y = y.astype(np.int64)
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == len(y):
        only = "members" if n_pos else "non-members"
        raise ValueError(f"membership metrics need both classes, but all {len(y)} samples are {only}")
    return y, s


def _levels(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Distinct scores in decreasing order and, for each member / non-member, the index of its level."""
    uniq, inverse = np.unique(-s, return_inverse=True)  # ascending in -s == descending in s
    level = inverse.reshape(-1)
    return -uniq, level[y == 1], level[y == 0], level


def roc_curve_exact(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact step ROC: ``(fpr, tpr, thresholds)`` starting at (0, 0) with threshold ``inf``, one point per
    distinct score (predict member when score ≥ threshold). Same points as sklearn with drop_intermediate=False."""
    y, s = _validate(labels, scores)
    thresholds, pos_level, neg_level, _ = _levels(y, s)
    n_levels = len(thresholds)
    tp = np.concatenate([[0], np.cumsum(np.bincount(pos_level, minlength=n_levels))])
    fp = np.concatenate([[0], np.cumsum(np.bincount(neg_level, minlength=n_levels))])
    return fp / fp[-1], tp / tp[-1], np.concatenate([[np.inf], thresholds])


def _max_count_with_rate_le(x: float, n: int) -> int:
    """Largest integer c in [0, n] with ``c / n <= x`` evaluated in floating point, exactly like a
    comparison on sklearn's ``fpr`` array, so integer comparisons below agree with it bit for bit."""
    c = min(max(int(math.floor(x * n)), 0), n)
    while c < n and (c + 1) / n <= x:
        c += 1
    while c > 0 and c / n > x:
        c -= 1
    return c


def _min_count_with_rate_ge(t: float, n: int) -> int:
    """Smallest integer c in [0, n] with ``c / n >= t`` in floating point."""
    c = min(max(int(math.ceil(t * n)), 0), n)
    while c > 0 and (c - 1) / n >= t:
        c -= 1
    while c < n and c / n < t:
        c += 1
    return c


def _metrics_from_counts(
    pos_counts: np.ndarray, neg_counts: np.ndarray, n_pos: int, n_neg: int, fprs: Sequence[float]
) -> dict[str, np.ndarray]:
    """Metrics for each row of per-level member / non-member multiplicities ``[R, n_levels]`` (levels by
    decreasing score). Integer arithmetic throughout: no [R, n_levels] float arrays are materialised."""
    tp = np.cumsum(pos_counts, axis=1, dtype=np.int64)
    fp = np.cumsum(neg_counts, axis=1, dtype=np.int64)
    # Pairs (member, non-member) ordered correctly = Σ pos·(n_neg − fp); tied pairs = Σ pos·neg, counted 1/2.
    below = n_pos * n_neg - np.einsum("ij,ij->i", pos_counts, fp)
    ties = np.einsum("ij,ij->i", pos_counts, neg_counts)
    out: dict[str, np.ndarray] = {"auc": (below + 0.5 * ties) / (n_pos * n_neg)}
    rows = np.arange(tp.shape[0])
    for x in fprs:
        # fp is non-decreasing, so the points with FPR <= x are a prefix; (0, 0) always qualifies.
        n_ok = (fp <= _max_count_with_rate_le(x, n_neg)).sum(axis=1)
        out[fpr_key(x)] = np.where(n_ok > 0, tp[rows, np.maximum(n_ok - 1, 0)], 0) / n_pos
    first = (tp < _min_count_with_rate_ge(TPR_FOR_FPR, n_pos)).sum(axis=1)  # tp reaches n_pos at the end
    out[FPR_AT_TPR_KEY] = fp[rows, first] / n_neg
    return out


def _bootstrap(
    pos_level: np.ndarray, neg_level: np.ndarray, n_levels: int, fprs: Sequence[float],
    n_bootstrap: int, rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    n_pos, n_neg = len(pos_level), len(neg_level)
    chunk = max(1, min(n_bootstrap, _BLOCK_ELEMENTS // max(n_levels, 1)))
    parts: list[dict[str, np.ndarray]] = []
    for start in range(0, n_bootstrap, chunk):
        b = min(chunk, n_bootstrap - start)
        offsets = (np.arange(b) * n_levels)[:, None]
        pos = pos_level[rng.integers(0, n_pos, size=(b, n_pos))] + offsets
        neg = neg_level[rng.integers(0, n_neg, size=(b, n_neg))] + offsets
        pos_counts = np.bincount(pos.ravel(), minlength=b * n_levels).reshape(b, n_levels)
        neg_counts = np.bincount(neg.ravel(), minlength=b * n_levels).reshape(b, n_levels)
        parts.append(_metrics_from_counts(pos_counts, neg_counts, n_pos, n_neg, fprs))
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _single(
    y: np.ndarray, s: np.ndarray, fprs: Sequence[float], n_bootstrap: int, rng: np.random.Generator,
    confidence: float,
) -> dict[str, Any]:
    thresholds, pos_level, neg_level, _ = _levels(y, s)
    n_levels = len(thresholds)
    n_pos, n_neg = len(pos_level), len(neg_level)
    point = _metrics_from_counts(
        np.bincount(pos_level, minlength=n_levels)[None], np.bincount(neg_level, minlength=n_levels)[None],
        n_pos, n_neg, fprs,
    )
    result: dict[str, Any] = {k: float(v[0]) for k, v in point.items()}
    if n_bootstrap > 0:
        boot = _bootstrap(pos_level, neg_level, n_levels, fprs, n_bootstrap, rng)
        alpha = (1.0 - confidence) / 2
        for key, values in boot.items():
            low, high = np.quantile(values, [alpha, 1.0 - alpha])
            result[f"{key}_ci"] = (float(low), float(high))
    result["n_members"] = n_pos
    result["n_nonmembers"] = n_neg
    warnings = []
    for x in fprs:
        need = math.ceil(1.0 / x - 1e-9)
        if n_neg < need:
            warnings.append(
                f"{fpr_key(x)}: only {n_neg} non-members, so FPR ≤ {x:g} is reached only at FPR = 0 "
                f"(one false positive is already {1 / n_neg:.3g}); need ≥ {need} non-members to resolve it"
            )
    need_pos = math.ceil(1.0 / (1.0 - TPR_FOR_FPR) - 1e-9)
    if n_pos < need_pos:
        warnings.append(
            f"{FPR_AT_TPR_KEY}: only {n_pos} members, so TPR ≥ {TPR_FOR_FPR:g} means every member; "
            f"need ≥ {need_pos} members to resolve it"
        )
    result["warnings"] = warnings
    return result


def membership_metrics(
    labels: Any,
    scores: Any,
    *,
    fprs: Sequence[float] = (0.001, 0.01, 0.05),
    n_bootstrap: int = 1000,
    seed: int = 0,
    groups: Any | None = None,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """AUC, TPR at each FPR in ``fprs``, FPR@95%TPR, each with a stratified-bootstrap ``<key>_ci`` interval.

    Returns keys ``auc``, ``tpr@0.1%fpr`` … (one per ``fprs``), ``fpr@95%tpr``, their ``_ci`` (low, high),
    ``n_members``, ``n_nonmembers``, ``warnings`` (FPRs or TPRs the sample sizes cannot resolve) and, when
    ``groups`` (e.g. the ``ds_name`` column) is given, ``groups``: ``{name: same dict}`` per group (a group
    with a single class gets ``{"error": ..., "n_members", "n_nonmembers"}`` instead).
    Raises ValueError for one class only, NaN scores, labels other than 0/1 or mismatched lengths.
    """
    y, s = _validate(labels, scores)
    if not fprs or not all(0.0 < x < 1.0 for x in fprs):
        raise ValueError(f"fprs must be in (0, 1), got {tuple(fprs)}")
    if n_bootstrap < 0:
        raise ValueError("n_bootstrap must be >= 0")
    if not 0.0 < confidence < 1.0:  # outside, numpy fails obscurely or the interval comes out inverted
        raise ValueError(f"confidence must be in (0, 1), e.g. 0.95; got {confidence}")
    rng = np.random.default_rng(seed)
    result = _single(y, s, fprs, n_bootstrap, rng, confidence)
    if groups is not None:
        g = np.asarray(groups)
        if g.shape != y.shape:
            raise ValueError(f"groups must have one entry per sample ({len(y)}), got shape {g.shape}")
        per_group: dict[str, Any] = {}
        for name in sorted(np.unique(g).tolist(), key=str):
            sel = g == name
            n_pos = int(y[sel].sum())
            n_neg = int(sel.sum()) - n_pos
            if n_pos == 0 or n_neg == 0:
                per_group[str(name)] = {
                    "error": "one class only: AUC and TPR@FPR are undefined for this group",
                    "n_members": n_pos, "n_nonmembers": n_neg,
                }
                result["warnings"].append(f"group {name!r} has only {'members' if n_pos else 'non-members'}")
                continue
            per_group[str(name)] = _single(y[sel], s[sel], fprs, n_bootstrap, rng, confidence)
        result["groups"] = per_group
    return result


def plot_roc(
    curves: Mapping[str, tuple[Iterable[int], Iterable[float]]],
    path: str | os.PathLike,
    *,
    log: bool | str = "both",
    title: str | None = None,
) -> Path:
    """Write ROC curves to a PNG: ``log=False`` linear axes, ``True`` log-log axes (where low-FPR behaviour is
    visible), ``"both"`` (default) side-by-side panels. ``curves`` maps a legend name to ``(labels, scores)``.
    Returns the PNG path."""
    if log not in (True, False, "both"):
        raise ValueError(f"log must be True, False or 'both', got {log!r}")
    if not curves:
        raise ValueError("no curves to plot")
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state is touched

    scales = ["linear", "log"] if log == "both" else (["log"] if log else ["linear"])
    fig = Figure(figsize=(5.5 * len(scales), 5 + 0.12 * len(curves)), layout="constrained")
    axes = fig.subplots(1, len(scales), squeeze=False)[0]
    computed = {name: roc_curve_exact(*map(np.asarray, pair)) for name, pair in curves.items()}
    n_neg_max = max(int(np.asarray(pair[0]).size - np.asarray(pair[0]).sum()) for pair in curves.values())
    floor = min(1e-3, 1.0 / max(n_neg_max, 1)) / 2
    for ax, scale in zip(axes, scales):
        for name, (fpr, tpr, _) in computed.items():
            auc = float(np.trapezoid(tpr, fpr))
            label = f"{name} (AUC {auc:.3f})"
            if scale == "log":
                ax.step(np.clip(fpr, floor, 1), np.clip(tpr, floor, 1), where="post", label=label)
            else:
                ax.step(fpr, tpr, where="post", label=label)
        if scale == "log":
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlim(floor, 1)
            ax.set_ylim(floor, 1.02)
            grid = np.logspace(np.log10(floor), 0, 50)
            ax.plot(grid, grid, "k--", lw=0.8, label="chance")
        else:
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1.02)
            ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="chance")
        ax.set_xlabel("False positive rate (non-members flagged)")
        ax.set_ylabel("True positive rate (members found)")
        ax.set_title(f"{title + ' — ' if title else ''}ROC ({'log-log' if scale == 'log' else 'linear'})")
        ax.grid(True, which="both", alpha=0.3)
    # one legend, below the panels: inside the axes it covers the curves
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncols=min(2, len(names)), fontsize=8, frameon=False)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120, format="png")
    return out


def json_safe(value: Any) -> Any:
    """Metrics as plain JSON: str keys, lists for arrays, Python scalars, None for NaN and infinities."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def evaluate_module_path() -> str:
    """Folder of the bundled ``evaluate`` metric (``membership_metrics/membership_metrics.py``, the layout
    ``evaluate.load`` expects of a local folder): ``evaluate.load(evaluate_module_path())`` works offline."""
    return str(Path(__file__).parent / "membership_metrics")


__all__ = ["FPR_AT_TPR_KEY", "evaluate_module_path", "fpr_key", "json_safe", "membership_metrics", "plot_roc", "roc_curve_exact"]

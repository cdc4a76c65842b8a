"""Classic score-based membership inference attacks, computed from the scorer's columns.

No attack here runs a model: each one turns columns that :class:`fimmia_hf.scoring.TargetScorer`
already wrote (the answer loss, per-token log-probabilities and per-position statistics of the
next-token distribution) into one score per sample. Every score follows the package convention
**higher = more likely a member**, so the raw quantities of the papers are negated where needed.

Columns used (one row per sample; all per-token lists are over the answer tokens, in order):

=====================  ======================================================================
``loss``               mean NLL over the answer tokens
``neighbor_losses``    list of the same loss on each neighbour text
``token_logprobs``     log p(x_t) of each answer token
``token_mean_logprob`` mu_t = sum_z p(z) log p(z) under the model's next-token distribution
``token_std_logprob``  sigma_t = std of log p(z) under p
``token_entropy``      -sum_z p(z) log p(z) (Rényi order 1)
``token_max_logprob``  log max_z p(z) (optional; Rényi order infinity is its negation)
``token_renyi_<a>``    Rényi entropy of order ``a`` per position, e.g. ``token_renyi_05``,
                       ``token_renyi_2`` (optional)
``reference_loss``     the same loss under a reference model (optional)
``lowercase_loss``     the loss of the lowercased sample (optional)
``answer``             the answer text (zlib entropy)
=====================  ======================================================================

Attacks whose columns are missing are skipped; :func:`missing_attacks` says why.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from .data import table_column, table_columns

__all__ = [
    "MIN_K_GRID",
    "RENYI_K_GRID",
    "available_attacks",
    "missing_attacks",
    "score_all",
    "loss_attack",
    "zlib_attack",
    "lowercase_attack",
    "min_k_attack",
    "min_k_plus_plus_attack",
    "neighborhood_attack",
    "reference_attack",
    "max_renyi_attack",
]

MIN_K_GRID: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
"""Fractions k of the lowest-scoring tokens kept by Min-K% and Min-K%++ (Shi et al.; Zhang et al.)."""

RENYI_K_GRID: tuple[float, ...] = (0.0, 0.1, 0.5, 1.0)
"""Fractions K of the highest-entropy positions kept by MaxRényi-K% (VL-MIA); 0 = the maximum, 1 = the mean."""

_EPS = 1e-12


def _floats(ds: Any, name: str) -> np.ndarray:
    values = table_column(ds, name)
    out = np.empty(len(values), dtype=np.float64)
    for i, v in enumerate(values):
        if v is None:
            raise ValueError(f"row {i + 1}: column {name!r} is empty (None)")
        out[i] = float(v)
    return out


def _token_lists(ds: Any, name: str) -> list[np.ndarray]:
    out = []
    for i, v in enumerate(table_column(ds, name)):
        arr = np.asarray(v if v is not None else [], dtype=np.float64).reshape(-1)
        if arr.size == 0:
            raise ValueError(f"row {i + 1}: column {name!r} has no answer tokens")
        out.append(arr)
    return out


def _check_aligned(name_a: str, a: Sequence[np.ndarray], name_b: str, b: Sequence[np.ndarray]) -> None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x.shape != y.shape:
            raise ValueError(
                f"row {i + 1}: column {name_a!r} has {x.size} tokens but {name_b!r} has {y.size}; "
                "per-token columns must cover the same answer tokens"
            )


def _k_count(n: int, k: float) -> int:
    """Number of positions kept for a fraction k: at least one, as in the Min-K% and VL-MIA code."""
    return max(1, int(n * k))


def _pct(k: float) -> str:
    return f"{round(k * 100):d}"


# ---------------------------------------------------------------------------------------------
# the attacks (each returns higher = member)


def loss_attack(loss: np.ndarray) -> np.ndarray:
    """LOSS (Yeom et al. 2018): members have lower loss, so the score is ``-loss``."""
    return -np.asarray(loss, dtype=np.float64)


def zlib_entropy(text: str) -> int:
    """Length in bytes of the zlib-compressed UTF-8 text (Carlini et al. 2021)."""
    return len(zlib.compress(text.encode("utf-8")))


def zlib_attack(loss: np.ndarray, texts: Iterable[str]) -> np.ndarray:
    """zlib ratio (Carlini et al. 2021): ``loss / zlib_bytes(text)``; lower = member, so negated.

    Normalising by the compressed length separates "the model finds this easy" from "this text is
    repetitive and easy for anyone".
    """
    z = np.array([zlib_entropy(t or "") for t in texts], dtype=np.float64)
    return -np.asarray(loss, dtype=np.float64) / z


def lowercase_attack(loss: np.ndarray, lowercase_loss: np.ndarray) -> np.ndarray:
    """Lowercase ratio (Carlini et al. 2021): ``loss / lowercase_loss``; lower = member, so negated.

    A memorised sample loses more of its advantage when its exact casing is destroyed.
    """
    loss = np.asarray(loss, dtype=np.float64)
    lower = np.asarray(lowercase_loss, dtype=np.float64)
    return -loss / np.maximum(lower, _EPS)


def min_k_attack(token_logprobs: Sequence[np.ndarray], k: float) -> np.ndarray:
    """Min-K% Prob (Shi et al. 2023): mean of the k% lowest token log-probs (higher = member)."""
    return np.array([np.sort(lp)[: _k_count(lp.size, k)].mean() for lp in token_logprobs])


def min_k_plus_plus_z(logprob: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Per-token Min-K%++ statistic z_t = (log p(x_t) - mu_t) / sigma_t.

    A position whose distribution is a point mass (sigma_t = 0) carries no evidence either way and
    gets z_t = 0.
    """
    z = np.zeros_like(logprob)
    ok = std > _EPS
    z[ok] = (logprob[ok] - mean[ok]) / std[ok]
    return z


def min_k_plus_plus_attack(
    token_logprobs: Sequence[np.ndarray],
    token_mean: Sequence[np.ndarray],
    token_std: Sequence[np.ndarray],
    k: float,
) -> np.ndarray:
    """Min-K%++ (Zhang et al. 2024): mean of the k% lowest z_t (higher = member).

    Members sit at local maxima of the likelihood, so their tokens score high relative to the
    model's own expectation mu_t, in units of sigma_t.
    """
    out = []
    for lp, mu, sd in zip(token_logprobs, token_mean, token_std):
        z = min_k_plus_plus_z(lp, mu, sd)
        out.append(np.sort(z)[: _k_count(z.size, k)].mean())
    return np.array(out)


def neighborhood_attack(loss: np.ndarray, neighbor_losses: Sequence[Sequence[float]]) -> np.ndarray:
    """Neighbourhood attack (Mattern et al. 2023): ``mean_k L'_k - L`` (higher = member).

    Equals ``-(L - mean L'_k)``: a member's loss is lower than that of its perturbed neighbours.
    """
    loss = np.asarray(loss, dtype=np.float64)
    out = np.empty_like(loss)
    for i, nl in enumerate(neighbor_losses):
        arr = np.asarray(nl if nl is not None else [], dtype=np.float64)
        if arr.size == 0:
            raise ValueError(f"row {i + 1}: column 'neighbor_losses' is empty")
        out[i] = arr.mean() - loss[i]
    return out


def reference_attack(loss: np.ndarray, reference_loss: np.ndarray) -> np.ndarray:
    """Reference-model attack (Carlini et al. 2021): ``L_ref - L_target`` (higher = member).

    The reference model calibrates away how hard the sample is in general.
    """
    return np.asarray(reference_loss, dtype=np.float64) - np.asarray(loss, dtype=np.float64)


def max_renyi_attack(token_renyi: Sequence[np.ndarray], k: float) -> np.ndarray:
    """MaxRényi-K% (Li et al., VL-MIA 2024): mean of the K% largest per-position Rényi entropies.

    Members make the model confident everywhere, so even the most uncertain positions have low
    entropy; the score is the negated mean (higher = member). K = 0 keeps the single maximum.
    """
    return np.array([-np.sort(h)[-_k_count(h.size, k) :].mean() for h in token_renyi])


# ---------------------------------------------------------------------------------------------
# dispatch


_RENYI_COLUMN = re.compile(r"^token_renyi_(\w+)$")


def _renyi_sources(columns: Iterable[str]) -> dict[str, tuple[str, Callable[[np.ndarray], np.ndarray]]]:
    """Rényi order name -> (column, transform to entropy values)."""
    cols = set(columns)
    out: dict[str, tuple[str, Callable[[np.ndarray], np.ndarray]]] = {}
    if "token_entropy" in cols:
        out["1"] = ("token_entropy", lambda h: h)
    if "token_max_logprob" in cols:
        out["inf"] = ("token_max_logprob", lambda m: -m)
    elif "token_max_prob" in cols:
        out["inf"] = ("token_max_prob", lambda p: -np.log(np.maximum(p, _EPS)))
    for c in sorted(cols):
        m = _RENYI_COLUMN.match(c)
        if m and m.group(1) not in out:
            out[m.group(1)] = (c, lambda h: h)
    return out


_REQUIREMENTS: dict[str, tuple[str, ...]] = {
    "loss": ("loss",),
    "zlib": ("loss", "answer"),
    "lowercase": ("loss", "lowercase_loss"),
    "min_k": ("token_logprobs",),
    "min_k_pp": ("token_logprobs", "token_mean_logprob", "token_std_logprob"),
    "neighborhood": ("loss", "neighbor_losses"),
    "reference": ("loss", "reference_loss"),
}


def missing_attacks(ds: Any) -> dict[str, str]:
    """Attack family -> why :func:`score_all` skips it on ``ds`` (empty when nothing is skipped)."""
    cols = set(table_columns(ds))
    notes = {}
    for family, needed in _REQUIREMENTS.items():
        absent = [c for c in needed if c not in cols]
        if absent:
            hint = ""
            if family == "lowercase":
                hint = " (score the lowercased sample with TargetScorer to enable it)"
            elif family == "reference":
                hint = " (score a reference model to enable it)"
            notes[family] = f"missing column(s) {', '.join(map(repr, absent))}{hint}"
    if not _renyi_sources(cols):
        notes["max_renyi"] = (
            "missing per-position entropy columns ('token_entropy', 'token_max_logprob' or 'token_renyi_<order>')"
        )
    return notes


def available_attacks(
    ds: Any, *, k_grid: Sequence[float] = MIN_K_GRID, renyi_k_grid: Sequence[float] = RENYI_K_GRID
) -> list[str]:
    """Names of the scores :func:`score_all` will return for ``ds``, in order."""
    cols = set(table_columns(ds))
    skipped = missing_attacks(ds)
    names: list[str] = []
    for family in _REQUIREMENTS:
        if family in skipped:
            continue
        if family in ("min_k", "min_k_pp"):
            names += [f"{family}_{_pct(k)}" for k in k_grid]
        else:
            names.append(family)
    for order in _renyi_sources(cols):
        names += [f"max_renyi_{order}_k{_pct(k)}" for k in renyi_k_grid]
    return names


def score_all(
    ds: Any, *, k_grid: Sequence[float] = MIN_K_GRID, renyi_k_grid: Sequence[float] = RENYI_K_GRID
) -> dict[str, np.ndarray]:
    """Every classic attack the columns of ``ds`` allow; name -> scores (higher = member).

    ``ds`` is a scored ``datasets.Dataset`` (or a DataFrame / mapping of columns). Names:
    ``loss``, ``zlib``, ``lowercase``, ``min_k_<k%>``, ``min_k_pp_<k%>``, ``neighborhood``,
    ``reference``, ``max_renyi_<order>_k<K%>``. Families without their columns are left out;
    :func:`missing_attacks` explains each omission.
    """
    for k in list(k_grid) + list(renyi_k_grid):
        if not 0.0 <= k <= 1.0 or math.isnan(k):
            raise ValueError(f"k must lie in [0, 1], got {k}")
    cols = set(table_columns(ds))
    skipped = missing_attacks(ds)
    scores: dict[str, np.ndarray] = {}
    loss = _floats(ds, "loss") if "loss" in cols else None

    if "loss" not in skipped:
        scores["loss"] = loss_attack(loss)
    if "zlib" not in skipped:
        scores["zlib"] = zlib_attack(loss, (str(a) if a is not None else "" for a in table_column(ds, "answer")))
    if "lowercase" not in skipped:
        scores["lowercase"] = lowercase_attack(loss, _floats(ds, "lowercase_loss"))
    if "min_k" not in skipped:
        lp = _token_lists(ds, "token_logprobs")
        for k in k_grid:
            scores[f"min_k_{_pct(k)}"] = min_k_attack(lp, k)
        if "min_k_pp" not in skipped:
            mu = _token_lists(ds, "token_mean_logprob")
            sd = _token_lists(ds, "token_std_logprob")
            _check_aligned("token_logprobs", lp, "token_mean_logprob", mu)
            _check_aligned("token_logprobs", lp, "token_std_logprob", sd)
            for k in k_grid:
                scores[f"min_k_pp_{_pct(k)}"] = min_k_plus_plus_attack(lp, mu, sd, k)
    if "neighborhood" not in skipped:
        scores["neighborhood"] = neighborhood_attack(loss, table_column(ds, "neighbor_losses"))
    if "reference" not in skipped:
        scores["reference"] = reference_attack(loss, _floats(ds, "reference_loss"))
    for order, (col, to_entropy) in _renyi_sources(cols).items():
        h = [to_entropy(x) for x in _token_lists(ds, col)]
        for k in renyi_k_grid:
            scores[f"max_renyi_{order}_k{_pct(k)}"] = max_renyi_attack(h, k)
    return scores

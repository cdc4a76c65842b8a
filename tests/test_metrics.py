"""Exact membership metrics: golden values vs scikit-learn and hand-computed cases, bootstrap, plots."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from fimmia_hf.metrics import (
    evaluate_module_path,
    fpr_key,
    membership_metrics,
    plot_roc,
    roc_curve_exact,
)

KEYS = ("auc", "tpr@0.1%fpr", "tpr@1%fpr", "tpr@5%fpr", "fpr@95%tpr")


def _sklearn_reference(y: np.ndarray, s: np.ndarray) -> dict[str, float]:
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    ref = {"auc": roc_auc_score(y, s), "fpr@95%tpr": fpr[tpr >= 0.95].min()}
    for x in (0.001, 0.01, 0.05):
        ref[fpr_key(x)] = tpr[fpr <= x].max()
    return ref


@pytest.mark.parametrize("kind", ["continuous", "heavy_ties", "large"])
def test_matches_sklearn(kind: str) -> None:
    rng = np.random.default_rng(1)
    for _ in range(30 if kind != "large" else 2):
        n = 3000 if kind == "large" else int(rng.integers(4, 80))
        y = rng.integers(0, 2, n)
        y[:2] = [0, 1]
        s = rng.normal(size=n) + y if kind != "heavy_ties" else rng.integers(0, 5, n) / 4
        got = membership_metrics(y, s, n_bootstrap=0)
        ref = _sklearn_reference(y, s)
        for key in KEYS:
            assert got[key] == pytest.approx(ref[key], abs=1e-12), key
        fpr, tpr, thr = roc_curve_exact(y, s)
        sk_fpr, sk_tpr, sk_thr = roc_curve(y, s, drop_intermediate=False)
        np.testing.assert_allclose(fpr, sk_fpr)
        np.testing.assert_allclose(tpr, sk_tpr)
        np.testing.assert_allclose(thr[1:], sk_thr[1:])


def test_hand_computed_case() -> None:
    # ROC points (0,0) (0,.5) (.5,.5) (.5,1) (1,1); 3 of 4 member/non-member pairs ordered correctly.
    m = membership_metrics([1, 1, 0, 0], [0.9, 0.4, 0.6, 0.1], n_bootstrap=0)
    assert m["auc"] == 0.75
    assert m["tpr@5%fpr"] == 0.5 and m["tpr@0.1%fpr"] == 0.5
    assert m["fpr@95%tpr"] == 0.5
    assert (m["n_members"], m["n_nonmembers"]) == (2, 2)


def test_ties_count_half_and_cannot_be_split() -> None:
    # The member at 0.5 ties a non-member: that pair counts 1/2; the tie moves TPR and FPR together.
    m = membership_metrics([1, 0, 1, 0], [0.5, 0.5, 0.8, 0.2], n_bootstrap=0)
    assert m["auc"] == 0.875
    assert m["tpr@5%fpr"] == 0.5
    assert m["fpr@95%tpr"] == 0.5


def test_all_equal_scores_is_chance() -> None:
    m = membership_metrics([0, 1, 0, 1, 1], [0.3] * 5, n_bootstrap=50)
    assert m["auc"] == 0.5
    assert m["tpr@1%fpr"] == 0.0  # only (0, 0) has FPR <= 1 %
    assert m["fpr@95%tpr"] == 1.0
    assert m["auc_ci"] == (0.5, 0.5)


def test_perfect_and_inverted_separation() -> None:
    y = np.array([0] * 30 + [1] * 30)
    s = np.arange(60, dtype=float)
    m = membership_metrics(y, s, n_bootstrap=100)
    assert m["auc"] == 1.0 and m["tpr@0.1%fpr"] == 1.0 and m["fpr@95%tpr"] == 0.0
    assert m["auc_ci"] == (1.0, 1.0)
    inv = membership_metrics(y, -s, n_bootstrap=0)
    assert inv["auc"] == 0.0 and inv["tpr@5%fpr"] == 0.0 and inv["fpr@95%tpr"] == 1.0


@pytest.mark.parametrize(
    "labels, scores, match",
    [
        ([1, 1, 1], [0.1, 0.2, 0.3], "both classes"),
        ([0, 0], [0.1, 0.2], "both classes"),
        ([0, 1, 2], [0.1, 0.2, 0.3], "0 \\(non-member\\) or 1"),
        ([0, 1], [0.1, float("nan")], "NaN"),
        ([0, 1], [0.1], "equal length"),
        ([], [], "no samples"),
    ],
)
def test_bad_input_raises(labels, scores, match) -> None:
    with pytest.raises(ValueError, match=match):
        membership_metrics(labels, scores)


def test_warnings_when_too_few_samples_to_resolve() -> None:
    rng = np.random.default_rng(0)
    y = np.array([0] * 50 + [1] * 10)
    m = membership_metrics(y, rng.normal(size=60), n_bootstrap=0)
    text = " ".join(m["warnings"])
    assert "tpr@0.1%fpr" in text and "1000" in text
    assert "tpr@1%fpr" in text and "100" in text
    assert "tpr@5%fpr" not in text  # 50 non-members resolve 5 % (need 20)
    assert "fpr@95%tpr" in text  # 10 members cannot resolve 95 % TPR (need 20)
    big = membership_metrics(np.array([0] * 1000 + [1] * 20), rng.normal(size=1020), n_bootstrap=0)
    assert big["warnings"] == []


def test_bootstrap_matches_naive_loop_and_is_stratified() -> None:
    """Every vectorised resample equals sklearn on the same resampled indices (members and non-members
    drawn separately), so the intervals are exactly the percentile bootstrap."""
    from fimmia_hf import metrics as M

    rng = np.random.default_rng(3)
    y = np.array([0] * 40 + [1] * 25)
    s = np.round(rng.normal(size=65) + y, 1)  # rounding creates ties
    n_boot = 40
    _, pos_level, neg_level, _ = M._levels(y, s)
    levels = np.unique(-s).size
    boot = M._bootstrap(pos_level, neg_level, levels, (0.01, 0.05), n_boot, np.random.default_rng(7))
    draw = np.random.default_rng(7)
    pos_s, neg_s = s[y == 1], s[y == 0]
    pos_idx = draw.integers(0, 25, size=(n_boot, 25))
    neg_idx = draw.integers(0, 40, size=(n_boot, 40))
    for b in range(n_boot):
        ys = np.r_[np.ones(25), np.zeros(40)]
        ss = np.r_[pos_s[pos_idx[b]], neg_s[neg_idx[b]]]
        ref = _sklearn_reference(ys, ss)
        for key in ("auc", "tpr@1%fpr", "tpr@5%fpr", "fpr@95%tpr"):
            assert boot[key][b] == pytest.approx(ref[key], abs=1e-12), (b, key)


def test_bootstrap_intervals() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    s = rng.normal(size=400) + y
    m = membership_metrics(y, s, n_bootstrap=500, seed=1)
    for key in KEYS:
        low, high = m[f"{key}_ci"]
        assert low <= m[key] <= high, key
    assert m["auc_ci"][1] - m["auc_ci"][0] < 0.15
    assert membership_metrics(y, s, n_bootstrap=500, seed=1) == m  # seeded
    assert membership_metrics(y, s, n_bootstrap=500, seed=2)["auc_ci"] != m["auc_ci"]
    # A single member still works: stratified resampling keeps it in every resample.
    one = membership_metrics([1] + [0] * 30, rng.normal(size=31), n_bootstrap=100)
    assert 0.0 <= one["auc_ci"][0] <= one["auc_ci"][1] <= 1.0


def test_bootstrap_is_fast() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 10_000)
    s = rng.normal(size=10_000) + 0.5 * y
    # CPU time, not wall time: the test machine is shared, and numpy here runs on one thread.
    start = time.process_time()
    membership_metrics(y, s, n_bootstrap=1000)
    elapsed = time.process_time() - start
    assert elapsed < 1.0, f"1000 bootstrap resamples of 10k samples took {elapsed:.2f} s of CPU"


def test_groups() -> None:
    rng = np.random.default_rng(0)
    y = np.array([0, 1] * 30 + [1] * 5)
    s = rng.normal(size=65) + y
    g = np.array(["a"] * 30 + ["b"] * 30 + ["only_members"] * 5)
    m = membership_metrics(y, s, groups=g, n_bootstrap=20)
    assert set(m["groups"]) == {"a", "b", "only_members"}
    for name in ("a", "b"):
        sel = g == name
        assert m["groups"][name]["auc"] == pytest.approx(roc_auc_score(y[sel], s[sel]))
        assert m["groups"][name]["n_members"] == int(y[sel].sum())
    assert "error" in m["groups"]["only_members"]
    assert any("only_members" in w for w in m["warnings"])
    with pytest.raises(ValueError, match="one entry per sample"):
        membership_metrics(y, s, groups=g[:-1])


def test_result_survives_a_json_round_trip() -> None:
    """Reports store the metrics as JSON: what is read back must equal what was computed."""
    m = membership_metrics([0, 1, 0, 1], [0.1, 0.9, 0.3, 0.6], groups=["x", "x", "y", "y"], n_bootstrap=10)
    back = json.loads(json.dumps(m))
    assert back["auc"] == m["auc"] == 1.0 and back["groups"]["y"]["auc"] == m["groups"]["y"]["auc"]
    assert back["auc_ci"] == list(m["auc_ci"]) and back["n_members"] == 2


@pytest.mark.parametrize("log", [True, False, "both"])
def test_plot_roc_writes_png(tmp_path, log) -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    curves = {"fimmia": (y, rng.normal(size=200) + y), "blind": (y, rng.normal(size=200))}
    path = plot_roc(curves, tmp_path / "plots" / "roc.png", log=log)
    assert path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError):
        plot_roc(curves, tmp_path / "x.png", log="loglog")


def test_evaluate_module_offline() -> None:
    evaluate = pytest.importorskip("evaluate")
    metric = evaluate.load(evaluate_module_path())
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 100).tolist()
    s = (rng.normal(size=100) + np.array(y)).tolist()
    got = metric.compute(prediction_scores=s, references=y, n_bootstrap=50, groups=["a", "b"] * 50)
    assert got == membership_metrics(y, s, n_bootstrap=50, groups=["a", "b"] * 50)
    assert Path(evaluate_module_path()).is_dir()  # the folder, as `evaluate.load` takes a Hub metric's
    assert evaluate.load(str(Path(evaluate_module_path()) / "membership_metrics.py")).name == metric.name


# -- issue 20: the confidence level asked for is the one returned ------------------------------------


@pytest.mark.parametrize("confidence", [0.95, 0.9, 0.5])
def test_interval_is_the_bootstrap_quantiles_at_the_confidence_asked(confidence: float) -> None:
    from fimmia_hf import metrics as M

    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 120)
    s = rng.normal(size=120) + y
    m = membership_metrics(y, s, n_bootstrap=300, seed=5, confidence=confidence)
    _, pos_level, neg_level, _ = M._levels(y, s)
    boot = M._bootstrap(pos_level, neg_level, np.unique(s).size, (0.001, 0.01, 0.05), 300, np.random.default_rng(5))
    alpha = (1 - confidence) / 2
    for key in KEYS:
        assert m[f"{key}_ci"] == pytest.approx(tuple(np.quantile(boot[key], [alpha, 1 - alpha])), abs=1e-12), key


def test_interval_has_the_coverage_of_a_known_distribution() -> None:
    """One member above half of 100 distinct non-members: each resampled AUC is Binomial(100, 1/2) / 100
    exactly (the member is in every stratified resample), so the 95 % interval is that distribution's
    2.5 % and 97.5 % quantiles, (0.40, 0.60); a 90 % one would be (0.42, 0.58)."""
    from scipy.stats import binom

    scores = np.r_[49.5, np.arange(100.0)]
    labels = np.r_[1, np.zeros(100, dtype=int)]
    for confidence in (0.95, 0.9):
        alpha = (1 - confidence) / 2
        expected = tuple(binom.ppf([alpha, 1 - alpha], 100, 0.5) / 100)
        got = membership_metrics(labels, scores, n_bootstrap=20_000, confidence=confidence)["auc_ci"]
        assert got == pytest.approx(expected, abs=1e-9), confidence
    assert expected == (0.42, 0.58)


@pytest.mark.parametrize("confidence", [0.0, 1.0, 1.5, -0.1])
def test_confidence_outside_zero_one_is_refused(confidence: float) -> None:
    with pytest.raises(ValueError, match="confidence must be in"):
        membership_metrics([0, 1, 0, 1], [0.1, 0.9, 0.3, 0.6], n_bootstrap=10, confidence=confidence)


# -- issue 20: survivors of a mutation run (mutmut) on metrics.py -------------------------------------


def test_tpr_at_any_fpr_matches_sklearn_where_x_times_n_rounds_off() -> None:
    """0.29 * 100 = 28.999…96 in floating point: a count taken as floor(x·n) would drop the 29th false
    positive that sklearn's `fpr <= 0.29` keeps (and 0.07 · 100 rounds the other way)."""
    rng = np.random.default_rng(2)
    for fpr in (0.29, 0.07, 0.57):
        y = np.r_[np.ones(60, dtype=int), np.zeros(100, dtype=int)]
        s = rng.normal(size=160) + y
        got = membership_metrics(y, s, fprs=(fpr,), n_bootstrap=0)[fpr_key(fpr)]
        sk_fpr, sk_tpr, _ = roc_curve(y, s, drop_intermediate=False)
        assert got == sk_tpr[sk_fpr <= fpr].max(), fpr


def test_rate_counts_equal_a_brute_force_count() -> None:
    from fimmia_hf.metrics import _max_count_with_rate_le, _min_count_with_rate_ge

    for n in range(1, 700):
        for x in (0.001, 0.01, 0.05, 0.07, 0.29, 0.57, 0.95):
            assert _max_count_with_rate_le(x, n) == max(c for c in range(n + 1) if c / n <= x), (x, n)
            assert _min_count_with_rate_ge(x, n) == min(c for c in range(n + 1) if c / n >= x), (x, n)


def test_resolution_warnings_at_their_boundaries() -> None:
    """20 non-members resolve 5 % FPR and 20 members 95 % TPR; 19 of either do not."""
    rng = np.random.default_rng(0)
    for n, warned in ((19, True), (20, False)):
        members = membership_metrics(np.r_[np.ones(n), np.zeros(2000)].astype(int), rng.normal(size=n + 2000),
                                     n_bootstrap=0)
        assert any(w.startswith("fpr@95%tpr") for w in members["warnings"]) is warned, n
        nonmembers = membership_metrics(np.r_[np.ones(30), np.zeros(n)].astype(int), rng.normal(size=n + 30),
                                        fprs=(0.05,), n_bootstrap=0)
        assert any(w.startswith("tpr@5%fpr") for w in nonmembers["warnings"]) is warned, n


def test_error_messages_name_what_is_wrong() -> None:
    with pytest.raises(ValueError, match=r"found \[2, 7\]"):
        membership_metrics([0, 1, 2, 7], [0.1, 0.2, 0.3, 0.4])
    with pytest.raises(ValueError, match="all 3 samples are members"):
        membership_metrics([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="all 2 samples are non-members"):
        membership_metrics([0, 0], [0.1, 0.2])
    with pytest.raises(ValueError, match=r"fprs must be in \(0, 1\)"):
        membership_metrics([0, 1], [0.1, 0.2], fprs=(1.0,))
    m = membership_metrics([0, 1, 1, 1], [0.1, 0.9, 0.3, 0.6], groups=["x", "x", "y", "y"], n_bootstrap=0)
    assert m["groups"]["y"] == {"error": "one class only: AUC and TPR@FPR are undefined for this group",
                                "n_members": 2, "n_nonmembers": 0}
    assert "group 'y' has only members" in m["warnings"]


def test_json_safe_turns_numpy_values_into_plain_ones() -> None:
    from fimmia_hf.metrics import json_safe

    value = {1: np.float64(0.25), "n": np.int64(3), "ci": (np.float32(0.5), 1.0), "curve": np.array([0.0, 1.0]),
             "nan": float("nan"), "inf": np.float64("inf")}
    assert json_safe(value) == {"1": 0.25, "n": 3, "ci": [0.5, 1.0], "curve": [0.0, 1.0], "nan": None, "inf": None}
    assert type(json_safe(value)["n"]) is int

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


def test_result_is_json_serialisable() -> None:
    m = membership_metrics([0, 1, 0, 1], [0.1, 0.9, 0.3, 0.6], groups=["x", "x", "y", "y"], n_bootstrap=10)
    json.dumps(m)


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

"""The evaluation report: every method on one split, blind controls beside it, a warning when shifted."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pytest

from fimmia_hf import load_samples
from fimmia_hf.report import build_report


def _scored(csv_path: str, seed: int = 0) -> datasets.Dataset:
    """Samples with scorer-like columns where members have a lower loss than non-members."""
    ds = load_samples(csv_path)
    rng = np.random.default_rng(seed)
    labels = np.asarray(ds["label"])
    n = len(ds)
    logprobs = [list(rng.normal(-1.5 + 0.8 * y, 0.3, 3)) for y in labels]
    return ds.add_column("loss", [-float(np.mean(lp)) for lp in logprobs]).add_column(
        "neighbor_losses", [list(-np.mean(lp) + rng.normal(0.3 * y, 0.1, 4)) for lp, y in zip(logprobs, labels)]
    ).add_column("token_logprobs", logprobs).add_column("token_mean_logprob", [[-1.0] * 3] * n).add_column(
        "token_std_logprob", [[0.5] * 3] * n
    )


@pytest.mark.parametrize("shifted", [True, False], ids=["year-shift", "iid"])
def test_report_warns_only_when_blind_baselines_separate_the_split(synthetic_table, tmp_path: Path, shifted: bool) -> None:
    from fimmia_hf.testing import make_synthetic_samples

    csv = make_synthetic_samples(tmp_path / "data", modality="text", n=160, seed=1, member_shift={"year": True} if shifted else None)
    ds = _scored(csv)
    train, test = ds.train_test_split(test_size=0.5, seed=0, stratify_by_column=None).values()
    detector = np.asarray(test["label"]) + np.random.default_rng(0).normal(0, 0.5, len(test))
    report = build_report(test, train=train, out_dir=tmp_path / "report", detector_scores={"FiMMIA": detector}, n_bootstrap=200)

    md = (tmp_path / "report" / "report.md").read_text()
    saved = json.loads((tmp_path / "report" / "report.json").read_text())
    assert (tmp_path / "report" / "roc.png").stat().st_size > 10_000
    kinds = {m["kind"] for m in saved["methods"].values()}
    assert {"detector", "classic attack", "blind baseline", "sanity check"} <= kinds
    assert {"loss", "min_k_20", "min_k_pp_20", "neighborhood"} <= set(saved["methods"])
    assert saved["methods"]["loss"]["auc"] > 0.9  # members have lower loss
    assert "tpr@1%fpr_ci" in saved["methods"]["FiMMIA"]
    lift = report["lift_over_best_blind"]
    assert lift["auc"] == pytest.approx(saved["methods"]["FiMMIA"]["auc"] - saved["methods"][lift["best_blind"]]["auc"])
    blind_aucs = {n: m["auc"] for n, m in saved["methods"].items() if m["kind"] == "blind baseline"}
    if shifted:
        assert blind_aucs["blind: date_detection"] > 0.9
        assert "**WARNING** DISTRIBUTION SHIFT" in md and "may be chance" not in md  # significant after adjustment
        assert saved["methods"]["blind: date_detection"]["shift_p_value"] < 0.01
    else:
        assert all(abs(a - 0.5) <= 0.15 for a in blind_aucs.values()), blind_aucs
        assert "DISTRIBUTION SHIFT" not in md
    assert "| FiMMIA | detector |" in md and "Lift of FiMMIA" in md


def test_shift_warning_says_when_no_flagged_baseline_is_significant() -> None:
    """Several baselines at a few dozen samples: one reaching 0.6 by chance is said to be possibly chance."""
    from fimmia_hf.report import CHANCE_NOTE, _shift_warning

    chance = {"blind: video_features": {"auc": 0.615, "auc_ci": [0.48, 0.76], "shift_p_value": 0.25}}
    clear = {"blind: date_detection": {"auc": 0.95, "auc_ci": [0.90, 0.99], "shift_p_value": 0.0015}}
    warning = _shift_warning(chance, list(chance))
    assert "[0.48, 0.76]" in warning and CHANCE_NOTE in warning and "video_features 0.25" in warning
    assert CHANCE_NOTE not in _shift_warning({**chance, **clear}, [*chance, *clear])
    assert _shift_warning({"blind: x": {"auc": 0.55, "auc_ci": [0.4, 0.7], "shift_p_value": 1.0}}, ["blind: x"]) is None


def test_auc_p_value_is_small_only_for_separating_scores() -> None:
    from fimmia_hf.report import auc_p_value

    labels = np.repeat([0, 1], 30)
    rng = np.random.default_rng(0)
    assert auc_p_value(labels, labels + rng.normal(0, 0.5, 60)) < 0.001  # AUC about 0.92
    null = [auc_p_value(labels, rng.normal(size=60)) for _ in range(400)]
    assert 0.02 <= np.mean(np.array(null) < 0.05) <= 0.08  # calibrated: about 5 % below 0.05 with no signal
    assert auc_p_value(labels, -labels.astype(float)) > 0.99  # members lower: no evidence of a shift
    assert auc_p_value(labels, np.full(60, 0.5)) == 1.0  # a baseline that found nothing (date_detection, no dates)


def test_report_heads_with_a_failed_permuted_label_check_and_states_the_pooling_rule(tmp_path: Path) -> None:
    from fimmia_hf.shift import run_blind_baselines
    from fimmia_hf.testing import make_synthetic_samples

    ds = _scored(make_synthetic_samples(tmp_path / "data", modality="text", n=60, seed=2))
    blind = run_blind_baselines(ds, methods=["date_detection"], search="fast", sanity_repeats=2, progress=False)
    build_report(ds, out_dir=tmp_path / "passed", blind=blind, n_bootstrap=50)
    md = (tmp_path / "passed" / "report.md").read_text()
    assert "each score becomes its quantile within its fold" in md and "on 2 independent label permutations of the data" in md
    assert "PERMUTED-LABEL CHECK" not in md

    failed = {**blind, "permuted_labels": {**blind["permuted_labels"], "auc": 0.436, "auc_ci": [0.379, 0.494]}}
    build_report(ds, out_dir=tmp_path / "failed", blind=failed, n_bootstrap=50)
    head = (tmp_path / "failed" / "report.md").read_text().split("| method |")[0]  # above the table
    assert "**WARNING** PERMUTED-LABEL CHECK FAILED" in head
    assert "0.436 [0.379, 0.494]" in head and "the blind baselines may be overfitting; do not trust their AUCs" in head
    saved = json.loads((tmp_path / "failed" / "report.json").read_text())
    assert saved["warnings"][0].startswith("PERMUTED-LABEL CHECK FAILED")
    assert "labels" not in saved["methods"]["blind: permuted_labels"]  # per-row arrays stay out of report.json


def test_tied_attacks_are_one_row_and_one_curve_named_together(tmp_path: Path) -> None:
    """With one-token answers LOSS, zlib and every Min-K% are the same ranking: the report says so once."""
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 30)
    logprobs = [[float(rng.normal(-1.5 + y, 0.5))] for y in labels]
    n = len(labels)
    test = datasets.Dataset.from_dict({
        "sample_id": [str(i) for i in range(n)], "input": [f"question {i}?" for i in range(n)], "answer": ["A"] * n,
        "ds_name": ["d"] * n, "label": labels.tolist(), "loss": [-lp[0] for lp in logprobs], "token_logprobs": logprobs,
        "token_mean_logprob": [[-1.0]] * n, "token_std_logprob": [[0.5]] * n,
    })
    report = build_report(test, out_dir=tmp_path, blind={}, n_bootstrap=0)
    (tie,) = report["ties"]
    assert {"loss", "zlib", "min_k_20", "min_k_pp_20"} <= set(tie["methods"])
    assert tie["name"].startswith("loss = zlib = min_k_* = min_k_pp_*") and tie["name"].endswith(": one-token answers")
    md = (tmp_path / "report.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ") and "classic attack" in line]
    assert len(rows) == 1 and rows[0].startswith("| loss = zlib = min_k_*")  # one row for the whole group
    assert "Tied: loss, zlib, " in md and "one-token answers" in md
    assert set(tie["methods"]) <= set(json.loads((tmp_path / "report.json").read_text())["methods"])  # all kept

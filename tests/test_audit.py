"""Dataset-level inference (fimmia_hf.audit): calibrated p-values, power, and the `fimmia-hf audit` command."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fimmia_hf.audit import DatasetInferenceResult, dataset_inference, run_audit
from fimmia_hf.cli import parse_command

TRIALS = 300


def _rejections(shift: float, n_suspect: int, n_reference: int, test: str, draw: str = "normal", seed: int = 0) -> float:
    """Fraction of trials in which the test rejects at alpha = 0.05."""
    rng = np.random.default_rng(seed)
    rejected = 0
    for _ in range(TRIALS):
        if draw == "normal":
            suspect, reference = rng.normal(shift, 1.0, n_suspect), rng.normal(0.0, 1.0, n_reference)
        else:  # skewed scores in [0, 1], like a detector's P(member)
            suspect, reference = rng.beta(0.5, 3.0, n_suspect), rng.beta(0.5, 3.0, n_reference)
        rejected += dataset_inference(suspect, reference, test=test).p_value < 0.05
    return rejected / TRIALS


@pytest.mark.parametrize("test, draw, n_suspect, n_reference", [
    ("welch", "normal", 200, 200), ("welch", "skewed", 40, 160), ("mann-whitney", "skewed", 40, 160),
])
def test_p_values_are_calibrated_under_the_null(test: str, draw: str, n_suspect: int, n_reference: int) -> None:
    rate = _rejections(0.0, n_suspect, n_reference, test, draw)
    assert 0.02 <= rate <= 0.07, rate  # about alpha: neither anti-conservative nor stuck at p = 1


@pytest.mark.parametrize("test", ["welch", "mann-whitney"])
def test_power_at_a_small_shift(test: str) -> None:
    assert _rejections(0.4, 200, 200, test, seed=1) >= 0.9


def test_result_fields_and_input_errors() -> None:
    from scipy import stats

    result = dataset_inference([0.9, 0.8, 0.7, 0.6], [0.1, 0.2, 0.3, 0.65])
    assert isinstance(result, DatasetInferenceResult) and result.test == "welch" and result.alternative == "greater"
    assert (result.n_suspect, result.n_reference) == (4, 4) and 0.01 < result.p_value < 0.02
    assert result.auc == pytest.approx(15 / 16)  # 0.6 < 0.65 is the one reference score above a suspect score
    ties = dataset_inference([0.5, 0.5, 0.9], [0.5, 0.1], test="mann-whitney")
    assert ties.auc == pytest.approx(stats.mannwhitneyu([0.5, 0.5, 0.9], [0.5, 0.1]).statistic / 6)
    pooled = np.sqrt((np.var([0.9, 0.8, 0.7, 0.6], ddof=1) + np.var([0.1, 0.2, 0.3, 0.65], ddof=1)) / 2)
    assert result.effect_size == pytest.approx((0.75 - 0.3125) / pooled)
    assert dataset_inference([0.9, 0.8, 0.7], [0.1, 0.2, 0.3], alternative="less").p_value > 0.99
    with pytest.raises(ValueError, match=r"suspect_scores\[1\] is nan: drop the samples without a score"):
        dataset_inference([0.5, float("nan"), 0.4], [0.1, 0.2])
    with pytest.raises(ValueError, match="at least 2 per set"):
        dataset_inference([0.5], [0.1, 0.2])
    with pytest.raises(ValueError, match="test must be one of"):
        dataset_inference([0.5, 0.6], [0.1, 0.2], test="z")


def test_lazy_export_is_the_function_even_after_the_module_is_imported() -> None:
    import fimmia_hf.audit  # noqa: F401  (importing the module must not shadow the function)

    assert fimmia_hf.dataset_inference is dataset_inference and fimmia_hf.DatasetInferenceResult is DatasetInferenceResult


def _audit(tmp_path, *argv: str) -> dict:
    args = parse_command("audit", [*argv, "--out", str(tmp_path / "audit.json")])
    result = run_audit(args)
    assert json.loads((tmp_path / "audit.json").read_text()) == result
    return result


@pytest.fixture(scope="module")
def sets(absolute_loss_signal, tmp_path_factory):
    """Scored tables: members of a fine-tuned target (suspect), non-members (reference), and non-members whose
    prompts come from another template (a shifted reference)."""
    ds = absolute_loss_signal(80, effect=0.8)
    root = tmp_path_factory.mktemp("sets")
    members, nonmembers = ds.filter(lambda r: r["label"] == 1), ds.filter(lambda r: r["label"] == 0)
    shifted = nonmembers.map(lambda r: {"input": f"Другой шаблон, вопрос {r['sample_id']}: выберите ответ"})
    half = len(nonmembers) // 2
    paths = {"suspect": members, "reference": nonmembers, "shifted": shifted,
             "null_a": nonmembers.select(range(half)), "null_b": nonmembers.select(range(half, len(nonmembers)))}
    for name, table in paths.items():
        table.to_parquet(str(root / f"{name}.parquet"))
    return {name: str(root / f"{name}.parquet") for name in paths}


def test_audit_with_a_classic_attack_finds_the_training_set(sets, tmp_path, capsys) -> None:
    result = _audit(tmp_path, "--suspect", sets["suspect"], "--reference", sets["reference"], "--score", "loss",
                    "--no-blind")
    di = result["dataset_inference"]
    assert di["n_suspect"] == di["n_reference"] == 40 and di["test"] == "welch" and result["significant"]
    assert di["p_value"] < 1e-3 and result["without_score"] == {"suspect": 0, "reference": 0}
    assert result["verdict"].startswith("EVIDENCE that the target was trained on the suspect set")
    assert "EVIDENCE" in capsys.readouterr().out


def test_verdict_names_the_baselines_that_separate_the_sets() -> None:
    from fimmia_hf.audit import _shift, _verdict

    found = dataset_inference([0.9, 0.8, 0.7, 0.6], [0.1, 0.2, 0.3, 0.65])
    at_chance = {"bag_of_words": {"auc": 0.52, "auc_ci": [0.40, 0.63]}, "permuted_labels": {"auc": 0.7, "auc_ci": [0.6, 0.8]}}
    assert _shift(at_chance) == []  # the permuted-label sanity run is no baseline
    assert _verdict(found, 0.05, at_chance, []).endswith("no blind baseline tells the sets apart.")
    subtle = {**at_chance, "date_detection": {"auc": 0.57, "auc_ci": [0.52, 0.62]}}  # below 0.6, but not chance
    assert _shift(subtle) == ["date_detection"]
    assert _verdict(found, 0.05, subtle, ["date_detection"]).startswith("INCONCLUSIVE")
    nothing = dataset_inference([0.1, 0.2, 0.3], [0.1, 0.2, 0.35])
    assert "may not be a valid control" in _verdict(nothing, 0.05, subtle, ["date_detection"])


def test_audit_says_when_a_shift_may_explain_the_p_value(sets, tmp_path) -> None:
    result = _audit(tmp_path, "--suspect", sets["suspect"], "--reference", sets["shifted"], "--score", "loss",
                    "--search", "fast")
    assert result["significant"] and result["shift_detected"]
    assert result["verdict"].startswith("INCONCLUSIVE") and "distribution shift" in result["verdict"]


def test_audit_of_two_non_member_halves_finds_nothing(sets, tmp_path) -> None:
    result = _audit(tmp_path, "--suspect", sets["null_a"], "--reference", sets["null_b"], "--score", "min_k_pp_20",
                    "--test", "mann-whitney", "--no-blind")
    assert not result["significant"] and result["blind_baselines"] is None
    assert result["verdict"].startswith("NO EVIDENCE") and "not checked for a distribution shift" in result["verdict"]


def test_audit_with_a_combined_detector(absolute_loss_signal, sets, tmp_path) -> None:
    from fimmia_hf.training import train_detector

    train_detector(absolute_loss_signal(120, effect=0.5, seed=7), config={"head": "combined", "projection_dim": 32,
                   "hidden_sizes": [16]}, output_dir=tmp_path / "det", num_train_epochs=2, disable_tqdm=True)
    result = _audit(tmp_path, "--suspect", sets["suspect"], "--reference", sets["reference"],
                    "--detector", str(tmp_path / "det"), "--no-blind")
    assert result["significant"] and result["score"] == f"detector {tmp_path / 'det'}"


def test_audit_input_errors(sets, tmp_path) -> None:
    with pytest.raises(ValueError, match="either a detector"):
        _audit(tmp_path, "--suspect", sets["suspect"], "--reference", sets["reference"])
    with pytest.raises(ValueError, match=r"no classic attack 'lowercase' \(lowercase: missing column\(s\) 'lowercase_loss'"):
        _audit(tmp_path, "--suspect", sets["suspect"], "--reference", sets["reference"], "--score", "lowercase")
    with pytest.raises(ValueError, match="40 sample\\(s\\) are in both"):
        _audit(tmp_path, "--suspect", sets["reference"], "--reference", sets["reference"], "--score", "loss")


def test_audit_scores_raw_sample_tables_through_the_pipeline(tiny_model, synthetic_table, tmp_path, capsys) -> None:
    """Raw sample tables (no scores) with a detector: its recorded component models run through the pipeline."""
    from pathlib import Path

    import pandas as pd

    from fimmia_hf import FiMMIAConfig, FiMMIAForMembershipInference

    csv = synthetic_table("image", n=8)
    rows = pd.read_csv(csv)
    for label, name in ((1, "suspect"), (0, "reference")):
        rows[rows["label"] == label].to_csv(tmp_path / f"{name}.csv", index=False)
    target, embedder = tiny_model("image-text"), tiny_model("text-encoder")
    config = FiMMIAConfig(
        head="combined", embedding_dim=json.loads((Path(embedder) / "config.json").read_text())["hidden_size"],
        projection_dim=8, hidden_sizes=[8], num_neighbors=3, target_model=target, embedding_model=embedder,
        neighbor_kwargs={"ops": ["delete", "swap"]}, sample_statistics=["loss", "min_k_pp_20"],
    )
    FiMMIAForMembershipInference(config).save_pretrained(tmp_path / "det")
    with pytest.warns(UserWarning, match="no decision threshold"):  # the pipeline says the detector is uncalibrated
        result = _audit(tmp_path, "--suspect", str(tmp_path / "suspect.csv"), "--reference",
                        str(tmp_path / "reference.csv"), "--detector", str(tmp_path / "det"), "--media-root",
                        str(Path(csv).parent), "--no-blind")
    assert "not scored for this detector" in capsys.readouterr().out
    di = result["dataset_inference"]
    assert di["n_suspect"] + di["n_reference"] == 8 and 0.0 <= di["p_value"] <= 1.0


def test_unwritable_out_fails_before_the_audit_runs(tmp_path, monkeypatch) -> None:
    """The audit's scores live in a temporary cache: an --out it cannot write is refused before computing them."""
    import fimmia_hf.audit

    monkeypatch.setattr(fimmia_hf.audit, "audit", lambda *a, **k: pytest.fail("the audit ran"))
    (tmp_path / "a_file").write_text("")
    args = parse_command("audit", [
        "--suspect", "s", "--reference", "r", "--score", "loss", "--out", str(tmp_path / "a_file" / "audit.json")])
    with pytest.raises(OSError, match=r"cannot write .*audit\.json .*choose another --out"):
        run_audit(args)

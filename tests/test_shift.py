"""Blind baselines: they find a planted distribution shift, stay at chance on i.i.d. splits, never leak."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.base import BaseEstimator, ClassifierMixin

from fimmia_hf.metrics import membership_metrics
from fimmia_hf.shift import evaluation, run_blind_baselines, sanity_warning
from fimmia_hf.shift.evaluation import SEARCH_PRESETS, BlindMethod, cross_validate, fold_quantiles, outer_folds
from fimmia_hf.shift.text import GreedyNgramClassifier, extract_dates

N = 200
SUBJECTS = ["the council", "a local team", "the museum", "our lab", "the company", "a small school", "the city"]
VERBS = ["opened", "announced", "built", "tested", "released", "described", "reviewed"]
OBJECTS = ["a new bridge", "the annual report", "a garden", "its first product", "a library", "the results"]


def _sentence(rng: np.random.Generator) -> str:
    return f"{rng.choice(SUBJECTS).capitalize()} {rng.choice(VERBS)} {rng.choice(OBJECTS)}."


def _texts(n: int, seed: int, member_years: range, other_years: range) -> dict[str, list]:
    """Members and non-members drawn alike, except for the year the answer mentions."""
    rng = np.random.default_rng(seed)
    labels = [i % 2 for i in range(n)]
    inputs = [f"What happened? {_sentence(rng)}" for _ in range(n)]
    answers = [
        f"{_sentence(rng)} This was in {rng.choice(member_years if y else other_years)}. {_sentence(rng)}" for y in labels
    ]
    return {"input": inputs, "answer": answers, "label": labels}


def _auc(results: dict, name: str) -> float:
    return results[name]["auc"]


def test_year_shift_is_found_by_date_detection_and_bag_of_words():
    ds = _texts(N, 0, range(2010, 2020), range(2022, 2025))
    res = run_blind_baselines(ds, search="fast", progress=False)
    assert _auc(res, "date_detection") > 0.9
    assert _auc(res, "bag_of_words") > 0.9
    assert _auc(res, "greedy_ngrams") > 0.6  # rules flag member years at (near) zero FPR
    permuted = res["permuted_labels"]
    assert abs(permuted["auc"] - 0.5) < 0.15 and permuted["method"] == "bag_of_words"
    assert permuted["repeats"] == len(permuted["repeat_aucs"]) == 10
    assert permuted["auc"] == pytest.approx(np.mean(permuted["repeat_aucs"]))
    assert permuted["auc_ci"][0] < 0.5 < permuted["auc_ci"][1] and sanity_warning(permuted) is None
    for name, entry in res.items():
        rows = entry["labels"].shape if name == "permuted_labels" else (N,)  # the repeats' held-out folds
        assert entry["scores"].shape == rows and np.isfinite(entry["scores"]).all()
        assert "tpr@1%fpr" in entry


def test_iid_split_keeps_every_text_baseline_at_chance():
    ds = _texts(N, 1, range(2010, 2025), range(2010, 2025))
    res = run_blind_baselines(ds, search="fast", progress=False)
    assert set(res) == {"bag_of_words", "date_detection", "greedy_ngrams", "permuted_labels"}
    for name, entry in res.items():
        assert abs(entry["auc"] - 0.5) <= 0.1, f"{name}: AUC {entry['auc']:.3f} on an i.i.d. split"


def _images(n: int, seed: int, brighter: float) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        base = rng.uniform(0.2, 0.5) + (brighter if i % 2 else 0.0)
        out.append((np.clip(base + 0.1 * rng.standard_normal((32, 32, 3)), 0, 1) * 255).astype(np.uint8))
    return out


@pytest.mark.parametrize("brighter", [0.3, 0.0])
def test_brighter_member_images_are_found_and_iid_images_are_not(brighter):
    n = 160
    ds = {
        "input": ["What is in the picture?"] * n,
        "answer": ["a picture"] * n,
        "label": [i % 2 for i in range(n)],
        "image": _images(n, 2, brighter),
    }
    res = run_blind_baselines(ds, search="fast", progress=False, methods=["image_features", "bag_of_visual_words"])
    for name in ("image_features", "bag_of_visual_words", "permuted_labels"):
        if brighter and name != "permuted_labels":
            assert _auc(res, name) > 0.9, name
        else:
            assert abs(_auc(res, name) - 0.5) <= 0.1, name


def test_louder_member_audio_is_found():
    rng = np.random.default_rng(3)
    rate, clips, n = 16000, [], 120
    for i in range(n):
        t = np.arange(rate // 8) / rate
        amp = rng.uniform(0.05, 0.1) * (3.0 if i % 2 else 1.0)
        wave = amp * np.sin(2 * np.pi * rng.uniform(200, 800) * t) + 0.01 * rng.standard_normal(t.size)
        clips.append({"array": wave.astype(np.float32), "sampling_rate": rate})
    ds = {"input": ["Transcribe."] * n, "answer": ["hello"] * n, "label": [i % 2 for i in range(n)], "audio": clips}
    res = run_blind_baselines(ds, search="fast", progress=False, methods=["audio_features"], sanity=False)
    assert _auc(res, "audio_features") > 0.9


def test_moving_member_videos_are_found_by_motion_statistics():
    rng = np.random.default_rng(4)
    n, videos = 60, []
    for i in range(n):
        frame = (rng.uniform(0, 1, (32, 32, 3)) * 255).astype(np.uint8)
        shifts = [3 * k if i % 2 else 0 for k in range(4)]  # members pan, non-members are still
        videos.append(np.stack([np.roll(frame, s, axis=1) for s in shifts]))
    ds = {"input": ["Describe."] * n, "answer": ["a clip"] * n, "label": [i % 2 for i in range(n)], "video": videos}
    res = run_blind_baselines(ds, search="fast", progress=False, methods=["video_features"], sanity=False)
    assert _auc(res, "video_features") > 0.9


def test_train_test_mode_scores_the_given_test_split():
    train = _texts(120, 5, range(2010, 2020), range(2022, 2025))
    test = _texts(60, 6, range(2010, 2020), range(2022, 2025))
    res = run_blind_baselines(
        train, test_ds=test, search="fast", progress=False, methods=["date_detection"], sanity_repeats=4
    )
    assert res["date_detection"]["scores"].shape == (60,)
    assert _auc(res, "date_detection") > 0.9
    assert abs(_auc(res, "permuted_labels") - 0.5) < 0.2  # cross-validated on shuffled training labels


def test_outer_folds_keep_a_sample_together():
    y = np.array([0, 1] * 20)
    groups = [f"s{i // 2}" for i in range(40)]  # paired protocol: each sample scored twice
    for train, test in outer_folds(y, 5, 0, groups):
        assert not {groups[i] for i in train} & {groups[i] for i in test}


def test_date_extraction_reads_years_and_full_dates():
    years, dates = extract_dates("Founded in 1998, renamed on 2021-03-14 and again in March 2023; code 12345.")
    assert years == [1998, 2021, 2023]
    assert sorted(round(d, 2) for d in dates) == [round(2021 + 2 / 12, 2), round(2023 + 2 / 12, 2)]


def test_greedy_rules_stay_within_the_fpr_budget_on_new_data():
    ds = _texts(400, 7, range(2010, 2020), range(2022, 2025))
    texts, y = np.array(ds["answer"], dtype=object), np.array(ds["label"])
    model = GreedyNgramClassifier(fpr_budget=0.05).fit(texts[:200], y[:200])
    flagged = model.predict(texts[200:])
    assert model.rules_
    assert flagged[y[200:] == 0].mean() <= 0.1
    assert flagged[y[200:] == 1].mean() > 0.5


def test_bad_input_raises_clear_errors():
    ds = _texts(20, 8, range(2010, 2020), range(2022, 2025))
    with pytest.raises(ValueError, match="label"):
        run_blind_baselines({k: v for k, v in ds.items() if k != "label"}, progress=False)
    with pytest.raises(ValueError, match="unknown blind method"):
        run_blind_baselines(ds, methods=["image_features"], progress=False)
    with pytest.raises(ValueError, match="row 3"):
        run_blind_baselines({**ds, "label": [0, 1, 2] + ds["label"][3:]}, progress=False)
    with pytest.raises(ValueError, match="sanity_repeats must be at least 2"):
        run_blind_baselines(ds, sanity_repeats=1, progress=False)


def test_audio_mfcc_matches_torchaudio():
    import torch
    import torchaudio.transforms as T

    from fimmia_hf.shift.audio import AUDIO_FEATURE_NAMES, audio_features

    wave = np.random.default_rng(0).standard_normal(8000).astype(np.float32)
    feats = audio_features(wave, 16000)
    ref = T.MFCC(sample_rate=16000, n_mfcc=20, melkwargs={"n_fft": 512, "hop_length": 256, "n_mels": 40})
    start = AUDIO_FEATURE_NAMES.index("mfcc0_mean")
    np.testing.assert_allclose(feats[start : start + 20], ref(torch.from_numpy(wave)).mean(dim=1).numpy(), atol=1e-4)


def test_cli_writes_json(tmp_path, capsys):
    import pandas as pd

    from fimmia_hf.cli import main

    ds = _texts(60, 9, range(2010, 2020), range(2022, 2025))
    pd.DataFrame(ds).to_csv(tmp_path / "samples.csv", index=False)
    argv = ["shift", "--data", str(tmp_path / "samples.csv"), "--methods", "date_detection", "--search", "fast",
            "--sanity-repeats", "2", "--out", str(tmp_path / "shift.json")]
    assert main(argv) == 0
    assert "distribution" in capsys.readouterr().out  # the shifted split is called out
    payload = json.loads((tmp_path / "shift.json").read_text())
    assert payload["modality"] == "text" and payload["n"] == 60
    assert payload["results"]["date_detection"]["auc"] > 0.9
    assert len(payload["results"]["date_detection"]["scores"]) == 60 == len(payload["sample_id"])
    permuted = payload["results"]["permuted_labels"]
    assert permuted["repeats"] == 2 and len(permuted["scores"]) == len(permuted["labels"]) == 24  # 2 folds of 12


def test_texts_without_words_skip_the_word_baselines_with_a_warning():
    ds = {"input": ["?"] * 20, "answer": ["!"] * 20, "label": [i % 2 for i in range(20)]}
    with pytest.warns(UserWarning, match="bag_of_words"):
        res = run_blind_baselines(ds, methods=["bag_of_words", "date_detection"], search="fast", progress=False)
    assert set(res) == {"date_detection"}
    assert res["date_detection"]["auc"] == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------------
# pooling out-of-fold scores, and the permuted-label check


def test_constant_scores_pool_to_exactly_one_half():
    """No year anywhere: date detection learns nothing and predicts each training fold's base rate.

    103 rows make folds of unequal class balance, so those constants differ from fold to fold.
    """
    rng = np.random.default_rng(10)
    ds = {
        "input": [f"What happened? {_sentence(rng)}" for _ in range(103)],
        "answer": [_sentence(rng) for _ in range(103)],
        "label": [int(i < 52) for i in range(103)],
    }
    res = run_blind_baselines(ds, methods=["date_detection"], search="fast", sanity=False, progress=False)
    assert res["date_detection"]["auc"] == 0.5
    assert len(set(res["date_detection"]["scores"])) == 1  # one scale: every fold's constant is the same point


class _FoldScaled(ClassifierMixin, BaseEstimator):
    """Ranks its inputs perfectly, on a scale its training fold sets (forests and naive Bayes, in the extreme)."""

    def fit(self, X, y):
        self.classes_ = np.array([0, 1])
        self.offset_ = 100.0 * float(np.sum(X))
        return self

    def decision_function(self, X):
        return np.asarray(X, dtype=float).ravel() + self.offset_


def test_two_folds_on_different_scales_give_the_per_fold_auc():
    rng = np.random.default_rng(11)
    y = np.array([0, 1] * 30)
    x = y + 0.5 * rng.random(len(y))  # every member above every non-member, within any fold
    method = BlindMethod("fold_scaled", lambda space, seed: (_FoldScaled(), [{}]), lambda t: t)
    scores, fold_aucs, _ = cross_validate(method, x, y, space=SEARCH_PRESETS["fast"], folds=2, seed=0)
    assert fold_aucs == [1.0, 1.0]
    assert membership_metrics(y, scores, n_bootstrap=0)["auc"] == 1.0  # pooled raw scores give 0.75

    # any AUC, not only a perfect one: folds that rank alike pool to their own AUC, whatever their scales
    labels = np.array([0, 1, 0, 1, 1, 0, 0, 1])
    fold = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    assert membership_metrics(labels, fold, n_bootstrap=0)["auc"] == 0.5625
    pooled = np.concatenate([fold_quantiles(fold), fold_quantiles(1000 + 50 * fold)])
    assert membership_metrics(np.tile(labels, 2), pooled, n_bootstrap=0)["auc"] == 0.5625
    raw = np.concatenate([fold, 1000 + 50 * fold])
    assert membership_metrics(np.tile(labels, 2), raw, n_bootstrap=0)["auc"] != 0.5625


def test_permuted_label_check_speaks_up_when_the_folds_leak(monkeypatch, tmp_path, capsys):
    """A split that lets test rows into training (the kind of bug the check exists for) must fail it, loudly."""
    import pandas as pd

    from fimmia_hf.cli import main

    honest = evaluation.outer_folds
    monkeypatch.setattr(
        evaluation, "outer_folds", lambda y, *a, **k: [(np.arange(len(y)), test) for _, test in honest(y, *a, **k)]
    )
    ds = _texts(120, 12, range(2010, 2025), range(2010, 2025))
    pd.DataFrame(ds).to_csv(tmp_path / "samples.csv", index=False)
    argv = ["shift", "--data", str(tmp_path / "samples.csv"), "--methods", "bag_of_words", "--search", "fast",
            "--sanity-repeats", "4"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "PERMUTED-LABEL CHECK FAILED" in out and "the blind baselines may be overfitting; do not trust their AUCs" in out
    assert "over 4 permutation(s)" in out and "quantile within its fold" in out  # the pooling rule is stated


def test_sanity_warning_only_when_the_interval_excludes_one_half():
    entry = {"method": "bag_of_words", "auc": 0.436, "auc_ci": [0.379, 0.494], "repeats": 10}
    assert "0.436 [0.379, 0.494] over 10 permutation(s)" in sanity_warning(entry)
    assert sanity_warning({**entry, "auc": 0.47, "auc_ci": [0.43, 0.51]}) is None
    assert sanity_warning({**entry, "auc": 0.58, "auc_ci": [0.52, 0.64]}) is not None  # above chance fails too
    assert sanity_warning(None) is None


# -- issue 20: the interval over repeats, checked on its own --------------------------------------------


def test_mean_interval_is_the_student_t_interval_clipped_to_auc_range() -> None:
    """Caught before only by chance, through one end-to-end bound (an interval at the wrong level, or from
    the population std, moved it from 0.49 to 0.50)."""
    from scipy import stats

    from fimmia_hf.shift import _mean_interval

    values = [0.61, 0.7, 0.74, 0.58, 0.66]
    mean, (low, high) = _mean_interval(values)
    expected = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
    assert mean == pytest.approx(np.mean(values)) and (low, high) == pytest.approx(expected, abs=1e-12)
    assert _mean_interval([0.98, 0.99, 0.999])[1][1] == 1.0  # an AUC interval never passes 1
    assert _mean_interval([0.7])[1] == pytest.approx((float("nan"), float("nan")), nan_ok=True)

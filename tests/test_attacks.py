"""Classic attacks: each matches a direct computation from full next-token distributions, and higher = member."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from fimmia_hf import attacks


def _distribution_columns(logits: np.ndarray, targets: np.ndarray) -> dict[str, list[float]]:
    """What the scorer writes for one sample, computed from full-vocabulary logits [T, V]."""
    logp = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) - logits.max(1, keepdims=True)
    p = np.exp(logp)
    mu = (p * logp).sum(1)
    sigma = np.sqrt(np.maximum((p * logp**2).sum(1) - mu**2, 0.0))
    return {
        "token_logprobs": logp[np.arange(len(targets)), targets].tolist(),
        "token_mean_logprob": mu.tolist(),
        "token_std_logprob": sigma.tolist(),
        "token_entropy": (-(p * logp).sum(1)).tolist(),
        "token_max_logprob": logp.max(1).tolist(),
        "token_renyi_2": (-np.log((p**2).sum(1))).tolist(),
    }


def _scored_rows(n: int = 60, seed: int = 0, vocab: int = 40) -> tuple[dict[str, list], np.ndarray, list[np.ndarray]]:
    """Members: the model puts extra mass on the answer tokens (lower loss, lower entropy)."""
    rng = np.random.default_rng(seed)
    rows: dict[str, list] = {}
    labels = np.arange(n) % 2
    all_logits = []
    for i, member in enumerate(labels):
        t = int(rng.integers(5, 12))
        logits = rng.normal(size=(t, vocab))
        targets = rng.integers(0, vocab, size=t)
        logits[np.arange(t), targets] += 3.0 if member else 0.5
        all_logits.append((logits, targets))
        cols = _distribution_columns(logits, targets)
        loss = -float(np.mean(cols["token_logprobs"]))
        cols["loss"] = loss
        cols["neighbor_losses"] = (loss + (1.0 if member else 0.0) + rng.normal(0, 0.2, size=4)).tolist()
        cols["reference_loss"] = loss + (1.0 if member else 0.0) + float(rng.normal(0, 0.2))
        cols["lowercase_loss"] = loss * (1.5 if member else 1.0) + 0.1
        cols["answer"] = " ".join(f"word{j}" for j in targets)
        cols["input"] = f"question {i}"
        for key, value in cols.items():
            rows.setdefault(key, []).append(value)
    return rows, labels, all_logits


def test_min_k_on_a_handful_of_tokens():
    lp = [np.array([-0.1, -2.0, -0.5, -3.0, -1.0])]
    assert attacks.min_k_attack(lp, 0.4)[0] == pytest.approx((-3.0 - 2.0) / 2)
    assert attacks.min_k_attack(lp, 0.1)[0] == pytest.approx(-3.0)  # at least one token is kept
    assert attacks.min_k_attack(lp, 1.0)[0] == pytest.approx(np.mean(lp[0]))


def test_loss_zlib_lowercase_neighbourhood_reference_match_direct_formulas():
    rows = {
        "loss": [2.0, 0.5],
        "answer": ["the cat sat on the mat", "aaaaaaaaaaaaaaaa"],
        "lowercase_loss": [2.5, 2.0],
        "neighbor_losses": [[2.2, 2.4], [1.5, 2.5, 2.0]],
        "reference_loss": [2.1, 1.5],
    }
    s = attacks.score_all(rows)
    np.testing.assert_allclose(s["loss"], [-2.0, -0.5])
    z = [len(zlib.compress(a.encode())) for a in rows["answer"]]
    np.testing.assert_allclose(s["zlib"], [-2.0 / z[0], -0.5 / z[1]])
    np.testing.assert_allclose(s["lowercase"], [-2.0 / 2.5, -0.5 / 2.0])
    np.testing.assert_allclose(s["neighborhood"], [2.3 - 2.0, 2.0 - 0.5])  # mean L'_k - L
    np.testing.assert_allclose(s["reference"], [2.1 - 2.0, 1.5 - 0.5])  # L_ref - L_target


def test_min_k_plus_plus_matches_full_vocabulary_reference():
    rows, _, logits = _scored_rows(n=6)
    scores = attacks.score_all(rows)
    for i, (lg, targets) in enumerate(logits):
        # the Min-K%++ paper's formula on the full distribution, in float64
        logp = lg - np.log(np.exp(lg).sum(1, keepdims=True))
        p = np.exp(logp)
        mu = (p * logp).sum(1)
        sigma = np.sqrt((p * logp**2).sum(1) - mu**2)
        z = (logp[np.arange(len(targets)), targets] - mu) / sigma
        for k in attacks.MIN_K_GRID:
            n_keep = max(1, int(len(z) * k))
            expected = np.sort(z)[:n_keep].mean()
            assert scores[f"min_k_pp_{round(k * 100)}"][i] == pytest.approx(expected, rel=1e-9)


def test_max_renyi_matches_entropies_of_the_distribution():
    rows, _, logits = _scored_rows(n=4)
    scores = attacks.score_all(rows)
    for i, (lg, _) in enumerate(logits):
        logp = lg - np.log(np.exp(lg).sum(1, keepdims=True))
        p = np.exp(logp)
        per_order = {"1": -(p * logp).sum(1), "inf": -logp.max(1), "2": -np.log((p**2).sum(1))}
        for order, h in per_order.items():
            assert scores[f"max_renyi_{order}_k0"][i] == pytest.approx(-h.max())  # K = 0: the largest entropy
            assert scores[f"max_renyi_{order}_k100"][i] == pytest.approx(-h.mean())
            top = np.sort(h)[-max(1, int(len(h) * 0.5)) :]
            assert scores[f"max_renyi_{order}_k50"][i] == pytest.approx(-top.mean())


def test_every_attack_scores_members_higher():
    rows, labels, _ = _scored_rows(n=80, seed=1)
    scores = attacks.score_all(rows)
    assert set(scores) == set(attacks.available_attacks(rows))
    for name, s in scores.items():
        assert s.shape == (80,) and np.isfinite(s).all(), name
        assert roc_auc_score(labels, s) > 0.7, f"{name}: members should score higher"


def test_missing_columns_skip_attacks_and_say_why():
    rows = {"loss": [1.0, 2.0], "token_logprobs": [[-1.0, -0.5], [-2.0, -3.0]], "answer": ["a b", "c d"]}
    scores = attacks.score_all(rows)
    assert {"loss", "zlib", "min_k_10"} <= set(scores)
    assert not any(n.startswith(("min_k_pp", "max_renyi", "neighborhood", "reference", "lowercase")) for n in scores)
    why = attacks.missing_attacks(rows)
    assert set(why) == {"lowercase", "min_k_pp", "neighborhood", "reference", "max_renyi"}
    assert "lowercase_loss" in why["lowercase"] and "reference_loss" in why["reference"]


def test_misaligned_token_columns_name_the_row():
    rows = {
        "token_logprobs": [[-1.0, -0.5], [-2.0, -3.0]],
        "token_mean_logprob": [[-1.0, -0.5], [-2.0]],
        "token_std_logprob": [[1.0, 1.0], [1.0, 1.0]],
    }
    with pytest.raises(ValueError, match=r"row 2: .*token_mean_logprob"):  # numbered from 1, as load_samples does
        attacks.score_all(rows)


def test_dataset_and_dataframe_give_the_same_scores():
    import datasets

    rows, _, _ = _scored_rows(n=10)
    from_dict = attacks.score_all(rows)
    from_ds = attacks.score_all(datasets.Dataset.from_dict(rows))
    from_df = attacks.score_all(datasets.Dataset.from_dict(rows).to_pandas())
    for name, s in from_dict.items():
        np.testing.assert_allclose(from_ds[name], s)
        np.testing.assert_allclose(from_df[name], s)


# -- issue 20: survivors of a mutation run (mutmut) on attacks.py -------------------------------------


def test_token_columns_alone_give_the_token_attacks_only():
    rows = {"token_logprobs": [[-1.0, -0.5], [-2.0, -3.0]], "token_entropy": [[1.0, 2.0], [0.5, 0.5]]}
    scores = attacks.score_all(rows, k_grid=(0.5,), renyi_k_grid=(0.0,))
    assert set(scores) == {"min_k_50", "max_renyi_1_k0"}
    np.testing.assert_allclose(scores["min_k_50"], [-1.0, -3.0])
    assert "loss" in attacks.missing_attacks(rows) and "zlib" in attacks.missing_attacks(rows)


def test_max_renyi_infinity_from_max_probabilities_equals_that_from_max_logprobs():
    """Tables written elsewhere may hold `token_max_prob`; Rényi order ∞ is -log max p either way."""
    max_p = [[0.5, 0.25, 0.9], [0.1, 0.2]]
    from_probs = attacks.score_all({"token_max_prob": max_p}, renyi_k_grid=(0.0, 1.0))
    from_logs = attacks.score_all({"token_max_logprob": [np.log(p).tolist() for p in max_p]}, renyi_k_grid=(0.0, 1.0))
    assert set(from_probs) == set(from_logs) == {"max_renyi_inf_k0", "max_renyi_inf_k100"}
    for name in from_logs:
        np.testing.assert_allclose(from_probs[name], from_logs[name])
    np.testing.assert_allclose(from_probs["max_renyi_inf_k0"], [np.log(0.25), np.log(0.1)])


def test_errors_name_the_column_and_the_row_numbered_from_one():
    misaligned_std = {"token_logprobs": [[-1.0, -0.5]], "token_mean_logprob": [[-1.0, -0.5]],
                      "token_std_logprob": [[1.0]]}
    with pytest.raises(ValueError, match=r"row 1: column 'token_logprobs' has 2 tokens but 'token_std_logprob' has 1"):
        attacks.score_all(misaligned_std)
    with pytest.raises(ValueError, match=r"row 2: column 'neighbor_losses' is empty"):
        attacks.score_all({"loss": [1.0, 2.0], "neighbor_losses": [[1.5], None]})
    with pytest.raises(ValueError, match=r"row 2: column 'loss' is empty \(None\)"):
        attacks.score_all({"loss": [1.0, None]})

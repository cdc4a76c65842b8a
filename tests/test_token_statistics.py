"""The scorer's per-token statistics (the Min-K%++ and entropy attacks read them) against an independent
float64 computation from the full logits, and against hand cases whose moments are known in closed form.

`token_entropy == -token_mean_logprob` holds by construction and `std >= 0` cannot fail, so neither says
whether μ = Σ_z p(z) log p(z) and σ = sqrt(Σ_z p(z) (log p(z) - μ)²) are what the scorer computes.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import log_softmax
from scipy.stats import entropy as shannon_entropy

from fimmia_hf.chat import ChatEncoder
from fimmia_hf.data import load_samples
from fimmia_hf.scoring import TargetScorer, load_target
from fimmia_hf.scoring.engine import token_statistics


def reference(logits: np.ndarray, targets: np.ndarray) -> dict[str, np.ndarray]:
    """Per-position statistics in float64, by other formulas than the scorer's (scipy's entropy, E[x²] - μ²)."""
    logp = log_softmax(logits.astype(np.float64), axis=-1)
    p = np.exp(logp)
    mean = (p * logp).sum(-1)
    return {
        "logprobs": logp[np.arange(len(targets)), targets],
        "mean_logprob": mean,
        "std_logprob": np.sqrt(np.maximum((p * logp**2).sum(-1) - mean**2, 0.0)),
        "entropy": shannon_entropy(p, axis=-1),
        "max_logprob": logp.max(-1),
    }


def assert_matches_reference(stats: dict[str, list[float]], ref: dict[str, np.ndarray], atol: float) -> None:
    for name, expected in ref.items():
        np.testing.assert_allclose(stats[name], expected, atol=atol, rtol=0, err_msg=name)


def test_statistics_equal_a_float64_reference_on_random_logits() -> None:
    rng = np.random.default_rng(0)
    vocab = 50
    # peaked, flat and spread rows: each moment differs from its plain or uncentred variant
    logits = rng.normal(size=(6, vocab)) * np.array([[0.1], [1.0], [3.0], [8.0], [0.5], [20.0]])
    targets = rng.integers(0, vocab, 6)
    stats = token_statistics(torch.tensor(logits, dtype=torch.float32), torch.tensor(targets))
    assert_matches_reference(stats, reference(logits, targets), atol=2e-5)


def test_uniform_logits_give_minus_log_v_and_zero_spread() -> None:
    vocab = 32
    stats = token_statistics(torch.zeros(3, vocab), torch.tensor([0, 5, 31]))
    assert stats["mean_logprob"] == pytest.approx([-math.log(vocab)] * 3, abs=1e-6)
    assert stats["entropy"] == pytest.approx([math.log(vocab)] * 3, abs=1e-6)
    assert stats["std_logprob"] == pytest.approx([0.0] * 3, abs=1e-6)
    assert stats["logprobs"] == stats["max_logprob"] == pytest.approx([-math.log(vocab)] * 3, abs=1e-6)


def test_two_outcome_distribution_in_closed_form() -> None:
    """p = (3/4, 1/4): μ = ¾ log ¾ + ¼ log ¼, σ = sqrt(¾·¼) · log 3 (a plain mean over the vocabulary, or an
    uncentred root mean square, gives other numbers)."""
    stats = token_statistics(torch.tensor([[math.log(3.0), 0.0]]), torch.tensor([1]))
    mean = 0.75 * math.log(0.75) + 0.25 * math.log(0.25)
    assert stats["mean_logprob"] == pytest.approx([mean], abs=1e-6)
    assert stats["std_logprob"] == pytest.approx([math.sqrt(0.75 * 0.25) * math.log(3.0)], abs=1e-6)
    assert stats["entropy"] == pytest.approx([-mean], abs=1e-6)
    assert stats["logprobs"] == pytest.approx([math.log(0.25)], abs=1e-6)
    assert stats["max_logprob"] == pytest.approx([math.log(0.75)], abs=1e-6)


def test_zero_probability_tokens_add_nothing() -> None:
    """A vocabulary entry with p = 0 (masked to -inf) changes neither μ nor σ, and never makes them NaN."""
    stats = token_statistics(torch.tensor([[0.0, 0.0, -math.inf, -math.inf]]), torch.tensor([0]))
    assert stats["mean_logprob"] == pytest.approx([math.log(0.5)], abs=1e-6)
    assert stats["std_logprob"] == pytest.approx([0.0], abs=1e-6)


def test_scorer_columns_equal_the_reference_from_the_models_full_logits(tiny_model, synthetic_table, tmp_path) -> None:
    """Through the whole stage (batched neighbours, reused prefixes): every `token_*` column, for the
    sample and its neighbours, is the reference computed from one plain forward's full logits."""
    model, processor = load_target(tiny_model("text-lm"), dtype="float32")
    ds = load_samples(synthetic_table("text", 2))
    ds = ds.add_column("neighbors", [[t + " Think.", "Hm, " + t] for t in ds["input"]])
    out = TargetScorer(model, processor=processor, model_batch_size=2, token_stats="all").apply(ds, cache_dir=tmp_path)
    encoder = ChatEncoder(processor)
    for row in out:
        for j, text in enumerate([row["input"], *row["neighbors"]]):
            encoding = encoder.encode(text, row["answer"], None, None)
            ids = torch.tensor([encoding.input_ids])
            with torch.inference_mode():
                logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].double().numpy()
            scored = np.array(encoding.score_positions)
            ref = reference(logits[scored - 1], ids[0, scored].numpy())
            stats = {name: row[f"token_{name}"] if j == 0 else row[f"neighbor_token_{name}"][j - 1] for name in ref}
            assert_matches_reference(stats, ref, atol=1e-4)

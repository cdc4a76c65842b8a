"""Delta features, masking, normalisation statistics, paired / member protocols, the collator."""

from __future__ import annotations

import math

import datasets
import numpy as np
import pytest

from fimmia_hf.features import (
    FiMMIADataCollator,
    build_features,
    fit_normalization,
    fit_statistics,
    membership_dataset,
    paired_dataset,
    sample_features,
    sample_statistics,
)


def _row(sid="s1", loss=1.0, neighbor_losses=(1.5, 0.5, 2.0), dim=3, **kw):
    k = len(neighbor_losses)
    base = {
        "sample_id": sid,
        "ds_name": "d",
        "loss": loss,
        "neighbor_losses": list(neighbor_losses),
        "embedding": [1.0] * dim,
        "neighbor_embeddings": [[1.0 + j] * dim for j in range(k)],
    }
    base.update(kw)
    return base


def _table(n=6, k=3, dim=4, seed=0, losses_shift=0.0):
    rng = np.random.default_rng(seed)
    return datasets.Dataset.from_dict({
        "sample_id": [f"id{i}" for i in range(n)],
        "ds_name": ["a", "b"] * (n // 2),
        "input": [f"q{i}" for i in range(n)],
        "loss": rng.uniform(1, 2, n).tolist(),
        "neighbor_losses": (rng.uniform(1, 2, (n, k)) + losses_shift).tolist(),
        "embedding": rng.normal(size=(n, dim)).tolist(),
        "neighbor_embeddings": rng.normal(size=(n, k, dim)).tolist(),
    })


def test_sign_is_neighbour_minus_original() -> None:
    f = sample_features(_row())
    np.testing.assert_allclose(f["loss_delta"], [0.5, -0.5, 1.0])
    np.testing.assert_allclose(f["embedding_delta"], [[0.0] * 3, [1.0] * 3, [2.0] * 3])
    assert f["neighbor_mask"].tolist() == [True, True, True]


def test_missing_neighbours_are_masked_not_dropped() -> None:
    row = _row(neighbor_losses=(1.5, None, float("nan"), 3.0))
    row["neighbor_embeddings"][3] = None
    f = sample_features(row)
    assert f["neighbor_mask"].tolist() == [True, False, False, False]
    assert np.isfinite(f["loss_delta"]).all() and np.isfinite(f["embedding_delta"]).all()
    assert f["loss_delta"][0] == pytest.approx(0.5)  # neighbour 0 stays neighbour 0
    nan_original = sample_features(_row(loss=None))
    assert not nan_original["neighbor_mask"].any()


def test_media_deltas() -> None:
    row = _row(media_embedding=[0.0, 1.0], neighbor_media_embeddings=[[1.0, 1.0], None, [0.0, 3.0]])
    f = sample_features(row, use_media=True)
    np.testing.assert_allclose(f["media_delta"], [[1.0, 0.0], [0.0, 0.0], [0.0, 2.0]])
    assert f["neighbor_mask"].tolist() == [True, False, True]


def test_inconsistent_rows_raise_with_sample_id() -> None:
    with pytest.raises(ValueError, match="sample_id='bad'.*2 neighbours but neighbor_losses has 3"):
        sample_features(_row(sid="bad", neighbor_embeddings=[[0.0] * 3] * 2))
    with pytest.raises(ValueError, match="sample_id='dim'.*dimension 2, expected 3"):
        sample_features(_row(sid="dim", neighbor_embeddings=[[0.0] * 3, [0.0] * 2, [0.0] * 3]))
    with pytest.raises(ValueError, match="expected 5"):
        sample_features(_row(), embedding_dim=5)
    with pytest.raises(ValueError, match="neighbor_losses"):
        sample_features({"sample_id": "x", "loss": 1.0})


def test_build_features_and_passthrough() -> None:
    ds = _table()
    feats = build_features(ds)
    assert {"loss_delta", "embedding_delta", "neighbor_mask"} <= set(feats.column_names)
    row = ds[2]
    np.testing.assert_allclose(feats[2]["loss_delta"], np.array(row["neighbor_losses"]) - row["loss"], rtol=1e-6)
    lean = build_features(ds, remove_inputs=True)
    assert "neighbor_embeddings" not in lean.column_names and "input" in lean.column_names
    # rows holding feature columns give the same features as the raw rows
    again = sample_features(lean[2])
    direct = sample_features(ds[2])
    for key in direct:
        np.testing.assert_allclose(again[key], direct[key], rtol=1e-6)


def test_fit_normalization_true_std_from_given_split_only() -> None:
    train = _table(n=8, seed=1)
    other = _table(n=8, seed=2, losses_shift=10.0)
    stats = fit_normalization(train)
    deltas = np.concatenate([np.array(r["neighbor_losses"]) - r["loss"] for r in train])
    assert stats["loss_mean"] == pytest.approx(deltas.mean())
    assert stats["loss_std"] == pytest.approx(deltas.std())  # a standard deviation, not the variance
    assert (stats["loss_min"], stats["loss_max"]) == pytest.approx((deltas.min(), deltas.max()))
    assert fit_normalization(other)["loss_mean"] > stats["loss_mean"] + 5  # only its argument counts
    assert fit_normalization(build_features(train, remove_inputs=True)) == pytest.approx(stats)


def test_fit_normalization_ignores_missing_and_degenerate() -> None:
    ds = datasets.Dataset.from_list([_row(neighbor_losses=(2.0, None, 2.0), loss=1.0)])
    stats = fit_normalization(ds)
    assert stats["loss_mean"] == 1.0 and stats["loss_std"] == 1.0 and stats["loss_max"] == 2.0
    empty = datasets.Dataset.from_list([_row(neighbor_losses=(None, None, None))])
    with pytest.raises(ValueError, match="no finite loss deltas"):
        fit_normalization(empty)


def test_paired_dataset_joins_by_sample_id() -> None:
    base = _table(n=6)
    rng = np.random.default_rng(5)
    finetuned = base.select_columns(["sample_id", "loss", "neighbor_losses"]).map(
        lambda r: {"loss": r["loss"] - 0.5, "neighbor_losses": [v + 0.3 for v in r["neighbor_losses"]]}
    ).shuffle(seed=3)  # a different row order: position must not matter
    paired = paired_dataset(base, finetuned)
    assert len(paired) == 12
    assert sorted(set(paired["model_role"])) == ["base", "finetuned"]
    by_key = {(r["sample_id"], r["label"]): r for r in paired}
    for r in base:
        ft = by_key[(r["sample_id"], 1)]
        assert ft["loss"] == pytest.approx(r["loss"] - 0.5)
        assert ft["embedding"] == pytest.approx(r["embedding"])  # borrowed from the base row of that sample
        assert ft["input"] == r["input"]
        assert by_key[(r["sample_id"], 0)]["loss"] == pytest.approx(r["loss"])
    assert paired.features["label"].dtype == "int64"
    del rng


def test_paired_dataset_mismatches_raise() -> None:
    base = _table(n=4)
    ft = base.select_columns(["sample_id", "loss", "neighbor_losses"])
    with pytest.raises(ValueError, match="only in base.*id3"):
        paired_dataset(base, ft.select(range(3)))
    with pytest.raises(ValueError, match="duplicate sample_id"):
        paired_dataset(base, datasets.concatenate_datasets([ft, ft.select([0])]))
    with pytest.raises(ValueError, match="neighbour counts"):
        paired_dataset(base, ft.map(lambda r: {"neighbor_losses": r["neighbor_losses"][:2]}))
    with pytest.raises(ValueError, match="sample_id"):
        paired_dataset(base.remove_columns("sample_id"), ft)
    with pytest.raises(ValueError, match="score it"):
        paired_dataset(base, ft.remove_columns("loss"))


def test_membership_dataset_validates_labels() -> None:
    ds = _table(n=4).add_column("label", [0, 1, 1, 0])
    assert membership_dataset(ds).features["label"].dtype == "int64"
    with pytest.raises(ValueError, match="'label' column"):
        membership_dataset(_table(n=4))
    with pytest.raises(ValueError, match="row 3: 2"):
        membership_dataset(_table(n=4).add_column("label", [0, 1, 2, 0]))


def test_collator_pads_variable_k_and_masks() -> None:
    rows = [
        {**_row(sid="a", neighbor_losses=(1.0, 2.0)), "label": 1},
        {**_row(sid="b", neighbor_losses=(1.0, None, 3.0, 4.0)), "label": 0},
    ]
    rows[0]["neighbor_embeddings"] = rows[0]["neighbor_embeddings"][:2]
    batch = FiMMIADataCollator(embedding_dim=3)(rows)
    assert batch["loss_delta"].shape == (2, 4) and batch["embedding_delta"].shape == (2, 4, 3)
    assert batch["neighbor_mask"].tolist() == [[True, True, False, False], [True, False, True, True]]
    assert batch["labels"].tolist() == [1, 0]
    assert not math.isnan(batch["loss_delta"].sum().item())
    no_labels = FiMMIADataCollator()([_row()])
    assert "labels" not in no_labels


def test_collator_for_blind_head_needs_no_losses() -> None:
    from fimmia_hf.configuration_fimmia import FiMMIAConfig

    row = _row()
    del row["loss"], row["neighbor_losses"]
    batch = FiMMIADataCollator.from_config(FiMMIAConfig(head="embedding_only", embedding_dim=3))([row])
    assert set(batch) == {"embedding_delta", "neighbor_mask"}
    with pytest.raises(ValueError, match="missing"):
        FiMMIADataCollator.from_config(FiMMIAConfig(head="fimmia", embedding_dim=3))([row])


def _scored(n=8, seed=0, answer_tokens=3):
    """Scored rows with the scorer's per-token lists (as TargetScorer writes them)."""
    rng = np.random.default_rng(seed)
    lp = -rng.uniform(0.2, 3.0, (n, answer_tokens))
    mu = -rng.uniform(0.5, 2.0, (n, answer_tokens))
    table = _table(n=n, seed=seed).to_dict()
    table.update(loss=(-lp.mean(1)).tolist(), answer=[f"answer {i}" for i in range(n)], token_logprobs=lp.tolist(),
                 token_mean_logprob=mu.tolist(), token_std_logprob=rng.uniform(0.5, 1.5, lp.shape).tolist(),
                 token_entropy=(-mu).tolist(), token_max_logprob=(lp * 0.2).tolist())
    return datasets.Dataset.from_dict(table)


def test_sample_statistics_are_the_classic_attack_scores() -> None:
    from fimmia_hf.attacks import score_all

    ds = _scored()
    names = ["loss", "zlib", "min_k_pp_20", "neighborhood", "max_renyi_inf_k0"]
    expected = score_all(ds)
    for i, row in enumerate(ds):
        np.testing.assert_allclose(sample_statistics(row, names), [expected[n][i] for n in names], rtol=1e-12)
    failed = {**ds[0], "loss": math.nan, "token_logprobs": []}  # a row the scorer could not score
    assert np.isnan(sample_statistics(failed, names)).all()
    with pytest.raises(ValueError, match=r"sample_id='id0': cannot compute the sample statistics \['min_k_pp_20'\] "
                                         r"\(min_k: missing column\(s\) 'token_logprobs'"):
        sample_statistics({k: v for k, v in ds[0].items() if k != "token_logprobs"}, names)


def test_fit_statistics_drops_repeats_and_constants_and_keeps_given_names() -> None:
    one_token = _scored(n=40, answer_tokens=1)  # every Min-K% of a one-token answer is the same number
    fitted = fit_statistics(one_token)
    names = fitted["sample_statistics"]
    assert names[0] == "loss" and not any(n.startswith("min_k_") and not n.startswith("min_k_pp") for n in names)
    assert sum(n.startswith("min_k_pp_") for n in names) == 1 and "neighborhood" in names
    matrix = np.array([sample_statistics(r, names) for r in one_token])
    np.testing.assert_allclose(fitted["sample_statistics_mean"], matrix.mean(0))
    np.testing.assert_allclose(fitted["sample_statistics_std"], matrix.std(0))  # population (true) std
    given = fit_statistics(one_token, ["loss", "min_k_10"])
    assert given["sample_statistics"] == ["loss", "min_k_10"]
    no_scores = one_token.remove_columns(["loss", "neighbor_losses"])
    with pytest.raises(ValueError, match="needs the scorer's columns"):
        fit_statistics(no_scores)


def test_collator_adds_statistics_for_the_combined_head() -> None:
    ds = _scored(n=4)
    collate = FiMMIADataCollator(statistics=["loss", "min_k_pp_10"])
    batch = collate(list(ds))
    assert batch["sample_statistics"].shape == (4, 2)
    np.testing.assert_allclose(batch["sample_statistics"][:, 0].numpy(), -np.asarray(ds["loss"]), rtol=1e-6)


# -- issue 20: rows that already hold the features ---------------------------------------------------


def test_precomputed_rows_mask_nan_features_even_under_a_full_mask() -> None:
    """A feature table written elsewhere (or by an older version) may hold NaN under `neighbor_mask` True:
    those neighbours are masked and zeroed, so one NaN never turns the sample's score into NaN."""
    row = {"sample_id": "pre", "loss_delta": [0.5, float("nan"), 1.0, 2.0],
           "embedding_delta": [[0.0, 1.0], [1.0, 1.0], [float("nan"), 0.0], [2.0, 2.0]],
           "neighbor_mask": [True, True, True, False]}
    f = sample_features(row)
    assert f["neighbor_mask"].tolist() == [True, False, False, False]
    np.testing.assert_array_equal(f["loss_delta"], [0.5, 0.0, 0.0, 0.0])
    np.testing.assert_array_equal(f["embedding_delta"], [[0.0, 1.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    batch = FiMMIADataCollator(embedding_dim=2)([row, {**row, "sample_id": "again"}])
    assert batch["neighbor_mask"].tolist() == [[True, False, False, False]] * 2
    assert batch["loss_delta"].isfinite().all() and batch["embedding_delta"].isfinite().all()


# -- issue 20: survivors of a mutation run (mutmut) on features.py --------------------------------------


def test_fit_normalization_is_the_same_over_any_number_of_batches() -> None:
    """Training sets above `batch_size` rows (1024 by default) are read in batches: every batch counts."""
    train = _table(n=10, seed=3)
    whole = fit_normalization(train)
    assert fit_normalization(train, batch_size=2) == pytest.approx(whole)
    assert fit_normalization(train.select(range(4)), batch_size=2) != pytest.approx(whole)


def test_paired_rows_must_list_the_same_neighbour_texts() -> None:
    base = _table(n=4).add_column("neighbors", [["a", "b", "c"]] * 4)
    ft = base.select_columns(["sample_id", "loss", "neighbor_losses", "neighbors"])
    other = ft.map(lambda r: {"neighbors": ["a", "b", "changed"] if r["sample_id"] == "id1" else r["neighbors"]})
    with pytest.raises(ValueError, match=r"different neighbour texts for sample_id \['id1'\]"):
        paired_dataset(base, other)
    assert len(paired_dataset(base, ft)) == 8


def test_missing_inputs_says_what_each_head_lacks() -> None:
    from fimmia_hf.configuration_fimmia import FiMMIAConfig
    from fimmia_hf.features import missing_inputs

    scored = ["sample_id", "loss", "neighbor_losses", "embedding", "neighbor_embeddings"]
    fimmia = FiMMIAConfig(head="fimmia", embedding_dim=3)
    assert missing_inputs(fimmia, scored) == []
    assert missing_inputs(fimmia, scored[:3]) == ["column 'embedding'", "column 'neighbor_embeddings'"]
    assert missing_inputs(FiMMIAConfig(head="loss_only"), scored[:3]) == []
    assert missing_inputs(fimmia, ["sample_id", "loss_delta", "embedding_delta", "neighbor_mask"]) == []
    combined = FiMMIAConfig(head="combined", embedding_dim=3, sample_statistics=["loss", "min_k_20"],
                            sample_statistics_mean=[0.0, 0.0], sample_statistics_std=[1.0, 1.0])
    assert missing_inputs(combined, scored) == ["the columns of the sample statistics ['min_k_20']"]
    assert missing_inputs(combined, [*scored, "token_logprobs"]) == []


def test_precomputed_media_deltas_pass_through_and_dimensions_are_checked() -> None:
    row = {"sample_id": "pre", "loss_delta": [0.5], "embedding_delta": [[1.0, 2.0]], "media_delta": [[3.0, 4.0, 5.0]],
           "neighbor_mask": [True]}
    f = sample_features(row, use_media=True, embedding_dim=2, media_embedding_dim=3)
    np.testing.assert_array_equal(f["media_delta"], [[3.0, 4.0, 5.0]])
    for media_delta in (row["media_delta"], np.array(row["media_delta"])):  # lists, or arrays as `with_format("numpy")`
        with pytest.raises(ValueError, match="sample_id='pre'.*media_delta.*expected 4"):  # one neighbour is enough
            sample_features({**row, "media_delta": media_delta}, use_media=True, embedding_dim=2, media_embedding_dim=4)

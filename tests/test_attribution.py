"""Gradient attribution of the detector's feature groups (fimmia_hf.attribution)."""

from __future__ import annotations

import json
import math

import datasets
import numpy as np
import pandas as pd
import pytest
import torch

from fimmia_hf.attribution import attribute, run_attribute
from fimmia_hf.cli import parse_command
from fimmia_hf.configuration_fimmia import FiMMIAConfig
from fimmia_hf.features import build_features
from fimmia_hf.modeling_fimmia import FiMMIAForMembershipInference
from fimmia_hf.testing import synthetic_features
from fimmia_hf.training import predict, train_detector

SMALL = {"projection_dim": 32, "hidden_sizes": [32, 16]}


def _embedding_signal(n: int, seed: int) -> datasets.Dataset:
    """The mirror image of `synthetic_features`: ΔL is uninformative, members' neighbour embeddings move
    along one direction (Δe carries the signal)."""
    ds = synthetic_features(n, k=4, dim=8, shift=0.0, seed=seed)
    labels = np.asarray(ds["label"])
    direction = np.zeros(8, np.float32)
    direction[0] = 0.6
    neigh = np.asarray(ds["neighbor_embeddings"], np.float32) + labels[:, None, None] * direction
    return ds.remove_columns("neighbor_embeddings").add_column("neighbor_embeddings", neigh.tolist())


@pytest.fixture(scope="module")
def loss_detector(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("loss_detector")
    train_detector(synthetic_features(128, k=4, dim=8, shift=1.0, seed=0), config=SMALL, output_dir=out,
                   num_train_epochs=5, learning_rate=1e-2, disable_tqdm=True)
    return str(out)


def _media_rows(n: int = 6, k: int = 4, seed: int = 0) -> datasets.Dataset:
    """Scored rows with text and media embeddings, one missing neighbour loss and one sample with fewer
    neighbours (both must be masked, not dropped)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        kk = k - 1 if i == 2 else k
        emb, media = rng.normal(size=6), rng.normal(size=5)
        losses = (1.0 + rng.normal(0.3, 0.4, kk)).tolist()
        if i == 1:
            losses[2] = None
        rows.append({
            "sample_id": f"m{i}", "label": i % 2, "loss": 1.0,
            "neighbor_losses": losses,
            "embedding": emb.tolist(), "neighbor_embeddings": (emb + rng.normal(0, 0.5, (kk, 6))).tolist(),
            "media_embedding": media.tolist(),
            "neighbor_media_embeddings": (media + rng.normal(0, 0.5, (kk, 5))).tolist(),
        })
    return datasets.Dataset.from_list(rows)


@pytest.fixture(scope="module")
def media_model() -> FiMMIAForMembershipInference:
    torch.manual_seed(0)
    cfg = FiMMIAConfig(embedding_dim=6, media_embedding_dim=5, projection_dim=16, hidden_sizes=[16, 8],
                       loss_mean=0.3, loss_std=0.5)
    return FiMMIAForMembershipInference(cfg)  # left in train mode on purpose


def test_integrated_gradients_are_complete_and_target_p_member(media_model, tmp_path) -> None:
    ds = _media_rows()
    result = attribute(media_model, ds, n_steps=100, batch_size=4, out_dir=tmp_path, graphs=False, progress=False)
    table = result.to_pandas()
    assert result.summary["groups"] == ["loss", "embedding", "media"]
    assert media_model.training, "the caller's train/eval mode must be restored"

    valid = table[table["valid"]]
    # completeness: the attributions of all inputs add up to P(x) - P(baseline) for every pair
    change = (valid["p_member"] - valid["p_member_baseline"]).abs()
    gap = (valid["loss_attr"] + valid["embedding_attr_sum"] + valid["media_attr_sum"]
           - (valid["p_member"] - valid["p_member_baseline"])).abs()
    assert change.max() > 0.01  # the check is not vacuous
    # measured: 0.6 % of the largest change, 0.45 % in aggregate with 100 steps; 10 %-off attributions fail
    assert gap.max() < 0.02 * change.max() and gap.sum() < 0.02 * change.sum()
    assert result.summary["convergence_delta"]["max_abs"] == pytest.approx(gap.max(), abs=1e-6)

    # the target is the detector's own per-neighbour P(member): its mean is the sample score of predict()
    scores = np.asarray(predict(media_model.eval(), ds, progress=False)["score"])
    media_model.train()
    by_sample = valid.groupby("row")["p_member"].mean()
    np.testing.assert_allclose(by_sample.to_numpy(), scores[by_sample.index], atol=1e-5)

    # masked neighbours (a missing loss, a padded slot) are rows with zero attribution
    masked = table[~table["valid"]]
    assert len(table) == 6 * 4 and set(zip(masked["row"], masked["neighbor"])) == {(1, 2), (2, 3)}
    attr_cols = [c for c in table.columns if "_attr" in c]
    assert (masked[attr_cols] == 0).all().all()
    assert result.attributions["embedding"].shape == (6, 4, 6) and result.attributions["media"].shape == (6, 4, 5)
    assert result.attributions["loss"][1, 2] == 0 and not result.attributions["embedding"][2, 3].any()
    np.testing.assert_allclose(result.attributions["embedding"].sum(-1).reshape(-1),
                               table["embedding_attr_sum"].to_numpy(), atol=1e-5)

    # eval mode: two runs give the same attributions (the original ran IG with dropout active)
    again = attribute(media_model, ds, n_steps=100, batch_size=4, graphs=False, progress=False)
    np.testing.assert_allclose(again.table["loss_attr"], table["loss_attr"], atol=1e-6)


def test_prebuilt_features_and_mean_baseline_give_complete_attributions(media_model) -> None:
    ds = build_features(_media_rows(), remove_inputs=True)
    result = attribute(media_model, ds, baseline="mean", n_steps=64, graphs=False, progress=False)
    valid = result.table[result.table["valid"]]
    assert len(valid) == 6 * 4 - 2
    change = (valid["p_member"] - valid["p_member_baseline"]).abs()
    gap = (valid["attr_total"] - (valid["p_member"] - valid["p_member_baseline"])).abs()
    assert gap.sum() < 0.02 * change.sum()
    # the mean baseline is one point: every pair integrates from the same P(member)
    assert valid["p_member_baseline"].nunique() == 1


def test_input_x_gradient_is_saliency_times_input(media_model) -> None:
    ds = _media_rows()
    sal = attribute(media_model, ds, method="saliency", graphs=False, progress=False).table
    ixg = attribute(media_model, ds, method="input_x_gradient", graphs=False, progress=False).table
    valid = sal["valid"]
    np.testing.assert_allclose(ixg["loss_attr"][valid], (sal["loss_attr"] * sal["loss_delta"])[valid], rtol=1e-4,
                               atol=1e-7)


def test_loss_group_dominates_when_only_loss_carries_signal(loss_detector) -> None:
    result = attribute(loss_detector, synthetic_features(64, k=4, dim=8, shift=1.0, seed=1), n_steps=50,
                       graphs=False, progress=False)
    shares = result.summary["share"]
    assert shares["all"]["loss"] > 0.9, shares
    assert all(s["loss"] > 0.9 for s in shares["by_label"].values()), shares
    assert math.isclose(sum(shares["all"].values()), 1.0)
    # members' neighbours are pushed toward "member" by their larger ΔL
    valid = result.table[result.table["valid"]]
    assert valid.loc[valid["label"] == 1, "loss_attr"].mean() > valid.loc[valid["label"] == 0, "loss_attr"].mean()


def test_embedding_group_dominates_when_only_embeddings_carry_signal(tmp_path) -> None:
    """The control: the loss share is not an artefact of ΔL's scale; it follows the signal."""
    model = train_detector(_embedding_signal(128, seed=0), config=SMALL, output_dir=tmp_path, num_train_epochs=5,
                           learning_rate=1e-2, disable_tqdm=True)
    result = attribute(model, _embedding_signal(64, seed=1), n_steps=50, graphs=False, progress=False)
    assert result.summary["share"]["all"]["embedding"] > 0.5, result.summary["share"]


def test_files_and_graphs_default_next_to_the_model(loss_detector) -> None:
    from matplotlib.image import imread

    result = attribute(loss_detector, synthetic_features(32, k=4, dim=8, seed=2), n_steps=20, progress=False)
    out = result.out_dir
    assert str(out) == f"{loss_detector}/attribution"
    assert set(result.files) == {"table", "summary", "arrays", "pairplot", "shares"}
    frame = pd.read_parquet(result.files["table"])
    assert len(frame) == 32 * 4 and {"sample_id", "label", "neighbor", "loss_attr", "embedding_attr_l2",
                                     "embedding_attr_linf", "loss_delta", "embedding_delta_l2"} <= set(frame.columns)
    summary = json.loads(open(result.files["summary"], encoding="utf-8").read())
    assert summary["share"]["all"] == pytest.approx(result.summary["share"]["all"])
    assert summary["seconds_per_100_samples"] > 0
    for key in ("pairplot", "shares"):
        image = imread(result.files[key])
        assert image.shape[0] > 200 and image.shape[1] > 200
        assert image[..., :3].std() > 0.05, f"{key} looks blank"


def test_noise_tunnel_is_seeded_and_reports_delta(loss_detector, tmp_path) -> None:
    ds = synthetic_features(8, k=4, dim=8, seed=3)
    kwargs = dict(noise_tunnel=True, nt_samples=6, n_steps=16, nt_stdev=0.05, graphs=False, progress=False)
    first = attribute(loss_detector, ds, out_dir=tmp_path, **kwargs)
    second = attribute(loss_detector, ds, **kwargs)
    plain = attribute(loss_detector, ds, n_steps=16, graphs=False, progress=False)
    np.testing.assert_allclose(first.table["loss_attr"], second.table["loss_attr"])
    assert not np.allclose(first.table["loss_attr"], plain.table["loss_attr"])
    assert first.table["convergence_delta"].notna().all()
    assert first.files["table"].endswith("integrated_gradients_smoothgrad.parquet")


def test_cli_writes_results(loss_detector, tmp_path, capsys) -> None:
    data = tmp_path / "scored.parquet"
    synthetic_features(16, k=4, dim=8, seed=4).to_parquet(str(data))
    args = parse_command("attribute", ["--model", loss_detector, "--data", str(data), "--n-steps", "10", "--no-graphs",
                              "--out", str(tmp_path / "attr")])
    result = run_attribute(args)
    assert (tmp_path / "attr" / "integrated_gradients.parquet").is_file()
    assert "pairplot" not in result.files
    assert "share of |attribution|: loss" in capsys.readouterr().out


def test_bad_arguments_are_clear(media_model) -> None:
    with pytest.raises(ValueError, match="method"):
        attribute(media_model, _media_rows(), method="deeplift")
    with pytest.raises(ValueError, match="baseline"):
        attribute(media_model, _media_rows(), baseline="blur")
    with pytest.raises(ValueError, match="neighbor_losses"):
        attribute(media_model, _media_rows().remove_columns("neighbor_losses"), graphs=False, progress=False)


def test_statistics_group_dominates_when_only_the_absolute_loss_carries_signal(absolute_loss_signal, tmp_path) -> None:
    """The combined head's sample statistics are a fourth group; on an absolute-loss signal they take the lead."""
    ds = absolute_loss_signal(96, effect=1.0)
    model = train_detector(ds, config={"head": "combined", **SMALL}, output_dir=tmp_path, num_train_epochs=2,
                           disable_tqdm=True)
    result = attribute(model, ds.select(range(24)), baseline="mean", graphs=False, progress=False)
    shares = result.shares
    assert set(shares) == {"loss", "embedding", "statistics"}
    assert shares["statistics"] > 0.5 and result.summary["dims"]["statistics"] == len(model.config.sample_statistics)
    assert result.summary["completeness_max_abs_error"] < 1e-3


def test_pair_plot_leaves_out_groups_without_attribution(tmp_path) -> None:
    """A detector without a media branch has zero media attribution: no empty media row and column."""
    from matplotlib.image import imread

    from fimmia_hf.attribution import plot_pairs

    rng = np.random.default_rng(0)
    table = pd.DataFrame({"valid": True, "label": np.repeat([0, 1], 20), "loss_attr": rng.normal(size=40),
                          "embedding_attr_l2": rng.random(40), "embedding_attr_linf": rng.random(40),
                          "media_attr_l2": 0.0, "media_attr_linf": np.nan})
    image = imread(plot_pairs(table, tmp_path / "pairs.png"))
    assert image.shape[1] == round((2.8 * 3 + 1.6) * 110)  # three groups plotted, not five

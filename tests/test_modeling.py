"""FiMMIAConfig / FiMMIAForMembershipInference: heads, masking, normalisation, Auto classes, original weights."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import fimmia_hf  # noqa: F401  (registers the Auto classes)
from fimmia_hf.configuration_fimmia import FiMMIAConfig
from fimmia_hf.modeling_fimmia import FiMMIAForMembershipInference


def _small(**kw) -> FiMMIAConfig:
    return FiMMIAConfig(**{"embedding_dim": 8, "projection_dim": 16, "hidden_sizes": [16, 8], **kw})


def _inputs(b=3, k=5, d=8, dm=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        loss_delta=torch.randn(b, k, generator=g),
        embedding_delta=torch.randn(b, k, d, generator=g),
        media_delta=torch.randn(b, k, dm, generator=g),
    )


def test_config_validation_and_roundtrip(tmp_path) -> None:
    cfg = _small(target_model="org/target", num_neighbors=5, modality="image", loss_mean=0.1, loss_std=2.0)
    cfg.save_pretrained(tmp_path)
    back = FiMMIAConfig.from_pretrained(tmp_path)
    assert (back.target_model, back.num_neighbors, back.loss_std, back.hidden_sizes) == ("org/target", 5, 2.0, [16, 8])
    assert back.id2label == {0: "non-member", 1: "member"}
    for bad in (dict(head="mlp"), dict(loss_norm="zscore"), dict(loss_std=0.0), dict(threshold=1.5),
                dict(loss_norm="minmax", loss_min=1.0, loss_max=1.0), dict(protocol="x")):
        with pytest.raises(ValueError):
            _small(**bad)
    with pytest.raises(ValueError, match="unknown normalisation"):
        cfg.set_normalization({"mean": 0.0})


@pytest.mark.parametrize("head", ["fimmia", "loss_only", "embedding_only"])
@pytest.mark.parametrize("media", [0, 4])
def test_forward_shapes_scores_and_loss(head: str, media: int) -> None:
    model = FiMMIAForMembershipInference(_small(head=head, media_embedding_dim=media)).eval()
    x = _inputs()
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[0, 3:] = False
    x["loss_delta"][0, 3:] = float("nan")  # masked neighbours may hold NaN
    x["embedding_delta"][0, 4] = float("nan")
    labels = torch.tensor([0, 1, 1])
    out = model(**x, neighbor_mask=mask, labels=labels)
    assert out.logits.shape == (3, 5, 2) and out.scores.shape == (3,)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
    p = out.logits.softmax(-1)[..., 1]
    expected = torch.stack([p[0, :3].mean(), p[1].mean(), p[2].mean()])
    torch.testing.assert_close(out.scores, expected)
    ce = F.cross_entropy(out.logits[mask], labels[:, None].expand(3, 5)[mask])
    torch.testing.assert_close(out.loss, ce)
    # masked neighbours do not influence the score of their sample
    x2 = {k: v.clone() for k, v in x.items()}
    x2["loss_delta"][0, 3:] = 123.0
    x2["embedding_delta"][0, 3:] = -7.0
    torch.testing.assert_close(model(**x2, neighbor_mask=mask).scores, out.scores)


def test_sample_without_valid_neighbour_scores_nan_and_is_skipped_in_loss() -> None:
    model = FiMMIAForMembershipInference(_small()).eval()
    mask = torch.tensor([[True, True, False], [False, False, False]])
    x = _inputs(b=2, k=3)
    out = model(x["loss_delta"], x["embedding_delta"], neighbor_mask=mask, labels=torch.tensor([1, 0]))
    assert torch.isfinite(out.scores[0]) and torch.isnan(out.scores[1])
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits[0, :2], torch.tensor([1, 1])))
    all_masked = model(x["loss_delta"], x["embedding_delta"], neighbor_mask=torch.zeros(2, 3), labels=torch.tensor([1, 0]))
    assert all_masked.loss.item() == 0.0 and all_masked.loss.requires_grad


def test_logits_are_not_clamped() -> None:
    """The original's final ReLU clamped logits at 0; ours are unconstrained."""
    model = FiMMIAForMembershipInference(_small()).eval()
    with torch.no_grad():
        model.attack_encoding[-1].bias.copy_(torch.tensor([-5.0, -3.0]))
    out = model(**_inputs(b=8, k=4, seed=1))
    assert (out.logits < 0).all()  # a final ReLU would make both 0 and every score exactly 0.5
    assert (out.scores > 0.75).all()
    assert not isinstance(model.attack_encoding[-1], torch.nn.ReLU)


def test_input_validation() -> None:
    model = FiMMIAForMembershipInference(_small(media_embedding_dim=4))
    x = _inputs()
    with pytest.raises(ValueError, match="media_delta"):
        model(x["loss_delta"], x["embedding_delta"])
    with pytest.raises(ValueError, match=r"embedding_delta must be \[batch, K, 8\]"):
        model(x["loss_delta"], torch.randn(3, 5, 7), x["media_delta"])
    with pytest.raises(ValueError, match="disagree"):
        model(x["loss_delta"][:, :4], x["embedding_delta"], x["media_delta"])
    with pytest.raises(ValueError, match="neighbor_mask"):
        model(**x, neighbor_mask=torch.ones(3, 4))


@pytest.mark.parametrize("norm", ["std", "minmax"])
def test_loss_normalisation_uses_config_statistics(norm: str) -> None:
    stats = dict(loss_mean=0.5, loss_std=2.0, loss_min=-1.0, loss_max=3.0)
    torch.manual_seed(0)
    model = FiMMIAForMembershipInference(_small(loss_norm=norm, **stats)).eval()
    plain = FiMMIAForMembershipInference(_small(loss_norm="none")).eval()
    plain.load_state_dict(model.state_dict())
    x = _inputs()
    normed = (x["loss_delta"] - 0.5) / 2.0 if norm == "std" else (x["loss_delta"] + 1.0) / 4.0
    torch.testing.assert_close(
        model(x["loss_delta"], x["embedding_delta"]).logits, plain(normed, x["embedding_delta"]).logits
    )


def test_periodic_head_and_parameter_counts_match_original() -> None:
    count = lambda cfg: sum(p.numel() for p in FiMMIAForMembershipInference(cfg).parameters())  # noqa: E731
    assert count(FiMMIAConfig(embedding_dim=4096)) == 10_140_194
    assert count(FiMMIAConfig(embedding_dim=4096, loss_norm="periodic")) == 10_402_082
    assert count(FiMMIAConfig(embedding_dim=4096, media_embedding_dim=1024)) == 11_189_794


def test_one_neighbour_inputs_are_accepted() -> None:
    model = FiMMIAForMembershipInference(_small()).eval()
    out = model(torch.randn(4), torch.randn(4, 8))
    assert out.logits.shape == (4, 1, 2)


def test_auto_classes_and_saved_code(tmp_path) -> None:
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

    model = FiMMIAForMembershipInference(_small(target_model="org/tiny")).eval()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "fimmia"
    assert saved["auto_map"] == {"AutoConfig": "configuration_fimmia.FiMMIAConfig",
                                 "AutoModel": "modeling_fimmia.FiMMIAForMembershipInference",
                                 "AutoModelForSequenceClassification": "modeling_fimmia.FiMMIAForMembershipInference"}
    assert (tmp_path / "modeling_fimmia.py").exists() and (tmp_path / "configuration_fimmia.py").exists()
    assert (tmp_path / "model.safetensors").exists()
    assert isinstance(AutoConfig.from_pretrained(tmp_path), FiMMIAConfig)
    for auto in (AutoModel, AutoModelForSequenceClassification):
        loaded = auto.from_pretrained(tmp_path)
        assert type(loaded) is FiMMIAForMembershipInference
        x = _inputs()
        torch.testing.assert_close(loaded.eval()(x["loss_delta"], x["embedding_delta"]).scores,
                                   model(x["loss_delta"], x["embedding_delta"]).scores)


@pytest.mark.slow  # a fresh interpreter importing torch + transformers: ~25 s on the shared test machine
def test_saved_folder_loads_as_remote_code_without_the_package(tmp_path) -> None:
    """Where fimmia_hf is not installed, trust_remote_code=True uses the copied files, through AutoModel and
    AutoModelForSequenceClassification alike."""
    FiMMIAForMembershipInference(_small()).save_pretrained(tmp_path / "det")
    code = (
        "import sys; sys.modules['fimmia_hf'] = None\n"
        "import torch\nfrom transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification\n"
        f"assert type(AutoConfig.from_pretrained({str(tmp_path / 'det')!r}, trust_remote_code=True)).__name__ == "
        "'FiMMIAConfig'\n"
        "for A in (AutoModel, AutoModelForSequenceClassification):\n"
        f"    m = A.from_pretrained({str(tmp_path / 'det')!r}, trust_remote_code=True)\n"
        "    assert type(m).__module__.startswith('transformers_modules'), type(m).__module__\n"
        "    print(m(torch.zeros(2, 3), torch.zeros(2, 3, 8)).scores.shape)\n"
    )
    env = {"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "OMP_NUM_THREADS": "1",
           "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=240,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("torch.Size([2])") == 2


# ------------------------------------------------------------------ original checkpoints (BaseLine family)
def _original_state_dict(emb: int, media: int = 0, periodic: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    """Synthetic weights in the released layout (fimmia_method.md §5.3): Sequential indices of Linear layers,
    512-wide projections, attack MLP 512-256-128-64-32-2."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}

    def lin(name: str, fan_in: int, fan_out: int) -> None:
        sd[f"{name}.weight"] = torch.randn(fan_out, fan_in, generator=g) / fan_in**0.5
        sd[f"{name}.bias"] = torch.randn(fan_out, generator=g) * 0.1

    if periodic:
        sd["loss_component.0.coefficients"] = torch.randn(256, generator=g) * 10
        lin("loss_component.1", 512, 512)
    else:
        lin("loss_component.0", 1, 512)
    lin("embedding_component.0", emb, emb // 2)
    lin("embedding_component.3", emb // 2, 512)
    if media:
        lin("modality_embedding_component.0", media, media // 2)
        lin("modality_embedding_component.3", media // 2, 512)
    widths = [512 * (3 if media else 2), 512, 256, 128, 64, 32, 2]
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        lin(f"attack_encoding.{3 * i}", a, b)
    return sd


def _reference_forward(sd, dl, de, dm=None, mean=0.0, std=1.0, periodic=False):
    """Written from the description: eval-mode (dropout = identity), ReLU after every hidden Linear,
    loss (normalised as (ΔL − mean)/std), embedding and modality blocks concatenated; returns the logits before
    the original's final ReLU."""
    lin = lambda x, n: x @ sd[f"{n}.weight"].T + sd[f"{n}.bias"]  # noqa: E731
    x = ((dl - mean) / std).reshape(-1, 1)
    if periodic:
        ang = 2 * torch.pi * sd["loss_component.0.coefficients"] * x
        h_loss = F.relu(lin(torch.cat([torch.cos(ang), torch.sin(ang)], -1), "loss_component.1"))
    else:
        h_loss = F.relu(lin(x, "loss_component.0"))
    h = [h_loss, F.relu(lin(F.relu(lin(de, "embedding_component.0")), "embedding_component.3"))]
    if dm is not None:
        h.append(F.relu(lin(F.relu(lin(dm, "modality_embedding_component.0")), "modality_embedding_component.3")))
    h = torch.cat(h, -1)
    for i in range(5):
        h = F.relu(lin(h, f"attack_encoding.{3 * i}"))
    return lin(h, "attack_encoding.15")


@pytest.mark.parametrize("variant", ["baseline", "periodic", "modality"])
def test_from_original_checkpoint_matches_reference(tmp_path, variant: str) -> None:
    from safetensors.torch import save_file

    emb, media = 16, (12 if variant == "modality" else 0)
    sd = _original_state_dict(emb, media, periodic=variant == "periodic")
    (tmp_path / "orig").mkdir()
    save_file(sd, tmp_path / "orig" / "model.safetensors")
    kwargs = {} if variant == "periodic" else {"sigmas": {"mean": 0.01, "std": 0.16}}
    model = FiMMIAForMembershipInference.from_original_checkpoint(tmp_path / "orig", target_model="org/vlm", **kwargs)
    assert model.config.embedding_dim == emb and model.config.media_embedding_dim == media
    assert model.config.target_model == "org/vlm"
    assert model.config.loss_norm == ("periodic" if variant == "periodic" else "std")
    g = torch.Generator().manual_seed(1)
    b, k = 4, 3
    dl, de, dm = torch.randn(b, k, generator=g), torch.randn(b, k, emb, generator=g), torch.randn(b, k, max(media, 1), generator=g)
    out = model(dl, de, dm if media else None)
    ref = _reference_forward(
        sd, dl.reshape(-1), de.reshape(b * k, emb), dm.reshape(b * k, media) if media else None,
        **({} if variant == "periodic" else {"mean": 0.01, "std": 0.16}), periodic=variant == "periodic",
    )
    torch.testing.assert_close(out.logits.reshape(-1, 2), ref, rtol=1e-4, atol=1e-5)
    # the original's released output is ReLU(logits); the scores use the unclamped logits
    torch.testing.assert_close(out.scores, ref.softmax(-1)[:, 1].reshape(b, k).mean(-1), rtol=1e-4, atol=1e-5)
    # round trip through save_pretrained keeps the imported behaviour
    model.save_pretrained(tmp_path / "hf")
    again = FiMMIAForMembershipInference.from_pretrained(tmp_path / "hf").eval()
    torch.testing.assert_close(again(dl, de, dm if media else None).logits, out.logits)


def test_from_original_checkpoint_full_size_file(tmp_path) -> None:
    """The released size (4096-d text embeddings) loads from a single .safetensors file."""
    from safetensors.torch import save_file

    save_file(_original_state_dict(4096), tmp_path / "w.safetensors")
    model = FiMMIAForMembershipInference.from_original_checkpoint(tmp_path / "w.safetensors")
    assert model.config.embedding_dim == 4096 and model.num_parameters() == 10_140_194


def test_from_original_checkpoint_rejects_other_layouts(tmp_path) -> None:
    from safetensors.torch import save_file

    save_file({"classifier.weight": torch.zeros(2, 3)}, tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="original FiMMIA layout"):
        FiMMIAForMembershipInference.from_original_checkpoint(tmp_path / "x.safetensors")
    with pytest.raises(FileNotFoundError):
        FiMMIAForMembershipInference.from_original_checkpoint(tmp_path / "missing")


STATS = ["loss", "min_k_pp_20", "neighborhood"]


def _combined(**kw) -> FiMMIAConfig:
    return _small(head="combined", sample_statistics=STATS, sample_statistics_mean=[-1.0, 0.5, 0.1],
                  sample_statistics_std=[0.5, 2.0, 0.2], **kw)


def test_combined_head_reads_normalised_statistics_beside_the_deltas() -> None:
    torch.manual_seed(0)
    model = FiMMIAForMembershipInference(_combined()).eval()
    x, stats = _inputs(b=4, k=3), torch.randn(4, 3)
    out = model(x["loss_delta"], x["embedding_delta"], sample_statistics=stats)
    assert out.logits.shape == (4, 3, 2) and torch.isfinite(out.scores).all()
    # the statistics change the scores: the head reads them (z-normalised with the config's mean and std)
    assert not torch.allclose(model(x["loss_delta"], x["embedding_delta"], sample_statistics=stats + 1).scores, out.scores)
    z = (stats - torch.tensor([-1.0, 0.5, 0.1])) / torch.tensor([0.5, 2.0, 0.2])
    torch.testing.assert_close(model.normalize_statistics(stats), z)
    with pytest.raises(ValueError, match=r"needs sample_statistics \[batch, 3\] \(loss, min_k_pp_20, neighborhood\)"):
        model(x["loss_delta"], x["embedding_delta"])
    with pytest.raises(ValueError, match=r"sample_statistics must be \[4, 3\]"):
        model(x["loss_delta"], x["embedding_delta"], sample_statistics=torch.randn(4, 2))


def test_combined_head_can_be_any_classic_attack_exactly() -> None:
    """The direct path alone (MLP output zeroed) ranks samples exactly as the one statistic it weights."""
    model = FiMMIAForMembershipInference(_combined()).eval()
    with torch.no_grad():
        model.attack_encoding[-1].weight.zero_()
        model.attack_encoding[-1].bias.zero_()
        model.statistics_logits.weight.zero_()
        model.statistics_logits.weight[1, 1] = 3.0  # P(member) rises with min_k_pp_20 only
    x, stats = _inputs(b=16, k=3), torch.randn(16, 3)
    scores = model(x["loss_delta"], x["embedding_delta"], sample_statistics=stats).scores
    assert torch.equal(scores.argsort(), stats[:, 1].argsort())


def test_combined_head_masks_a_sample_without_statistics() -> None:
    model = FiMMIAForMembershipInference(_combined()).eval()
    x, stats = _inputs(b=3, k=2), torch.randn(3, 3)
    stats[1, 0] = float("nan")  # the scorer could not score this sample
    out = model(x["loss_delta"], x["embedding_delta"], sample_statistics=stats, labels=torch.tensor([0, 1, 1]))
    assert torch.isnan(out.scores[1]) and torch.isfinite(out.scores[[0, 2]]).all() and torch.isfinite(out.loss)


def test_combined_config_checks_and_keeps_its_statistics(tmp_path) -> None:
    cfg = _combined(decision_thresholds={"0.01": 0.9, "0.05": 0.7})
    cfg.save_pretrained(tmp_path)
    back = FiMMIAConfig.from_pretrained(tmp_path)
    assert back.sample_statistics == STATS and back.sample_statistics_std == [0.5, 2.0, 0.2]
    assert back.decision_thresholds == {"0.01": 0.9, "0.05": 0.7} and back.uses_statistics and back.uses_loss
    assert FiMMIAConfig(head="combined", sample_statistics=["loss"]).sample_statistics_std == [1.0]
    for bad, message in (
        (dict(head="combined"), "needs sample_statistics"),
        (dict(head="combined", sample_statistics=["loss"], sample_statistics_std=[0.0]), "must be > 0"),
        (dict(head="combined", sample_statistics=["loss", "zlib"], sample_statistics_mean=[0.0]), "one finite value"),
        (dict(decision_thresholds={"1%": 0.9}), "FPR levels"),
        (dict(decision_thresholds={"0.01": 1.5}), r"score in \[0, 1\]"),
    ):
        with pytest.raises(ValueError, match=message):
            _small(**bad)

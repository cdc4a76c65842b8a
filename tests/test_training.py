"""train_detector / predict / CLI functions, and a 2-process `accelerate launch` run (slow)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from huggingface_hub import ModelCard

import fimmia_hf  # noqa: F401  (registers the Auto classes)
from fimmia_hf.cli import parse_command
from fimmia_hf.data import split_samples
from fimmia_hf.metrics import membership_metrics
from fimmia_hf.modeling_fimmia import FiMMIAForMembershipInference
from fimmia_hf.testing import synthetic_features
from fimmia_hf.training import (
    calibrate_thresholds,
    predict,
    run_predict,
    run_train,
    threshold_at_fpr,
    train_detector,
)

QUIET = dict(disable_tqdm=True, logging_strategy="no")


@pytest.fixture(scope="module")
def split():
    ds = synthetic_features(240, k=4, dim=8, shift=1.0, seed=0)
    return split_samples(ds, test_size=0.5, seed=0)


@pytest.fixture(scope="module")
def trained(split, tmp_path_factory):
    train, held_out = split
    out = tmp_path_factory.mktemp("detector")
    start = time.perf_counter()
    model = train_detector(
        train, held_out, config={"target_model": "org/tiny-vlm", "embedding_model": "org/tiny-embedder"},
        output_dir=out, seed=0, num_train_epochs=4, **QUIET,
    )
    return model, out, time.perf_counter() - start


def test_detector_learns_shifted_loss_deltas(trained, split) -> None:
    model, _, seconds = trained
    _, held_out = split
    scored = predict(model, held_out, progress=False)
    auc = membership_metrics(scored["label"], scored["score"], n_bootstrap=0)["auc"]
    print(f"held-out AUC {auc:.3f} after {seconds:.1f} s of training")
    assert auc > 0.9


def test_saved_detector_and_card_data(trained, split) -> None:
    from transformers import AutoModel

    model, out, _ = trained
    loaded = AutoModel.from_pretrained(out)
    assert type(loaded) is FiMMIAForMembershipInference
    card = loaded.config.card_data
    assert card["num_neighbors"] == 4 and loaded.config.num_neighbors == 4
    assert card["train_data"]["n_rows"] == len(split[0])
    assert card["train_data"]["n_members"] + card["train_data"]["n_nonmembers"] == len(split[0])
    assert set(card["train_data"]["ds_names"]) == {"synthetic_a", "synthetic_b"}
    assert card["components"]["target_model"] == "org/tiny-vlm"
    assert loaded.config.embedding_model == "org/tiny-embedder"
    assert card["eval_metrics"]["auc"] == pytest.approx(card["best_eval_auc"])
    assert card["best_checkpoint_step"] > 0 and loaded.config.protocol == "member"
    # normalisation statistics of the training split are stored (true std)
    train = split[0]
    deltas = np.concatenate([np.array(r["neighbor_losses"], dtype=np.float64) - r["loss"] for r in train])
    assert loaded.config.loss_std == pytest.approx(deltas.std(), rel=1e-5)
    # predict from the folder gives the same scores as the in-memory model
    a = predict(out, split[1], progress=False)["score"]
    b = predict(model, split[1], progress=False)["score"]
    np.testing.assert_allclose(a, b, rtol=1e-5)


def test_calibrated_thresholds_keep_the_fpr_on_the_calibration_split(trained, split) -> None:
    model, out, _ = trained
    _, held_out = split  # the validation split the thresholds were calibrated on
    thresholds = FiMMIAForMembershipInference.from_pretrained(out).config.decision_thresholds
    assert set(thresholds) == {"0.01", "0.05"}
    scored = predict(model, held_out, progress=False)
    labels, scores = np.asarray(scored["label"]), np.asarray(scored["score"])
    nonmembers = np.sort(scores[labels == 0])
    for key, t in thresholds.items():
        fpr = float(key)
        assert (nonmembers > t).mean() <= fpr  # score > t => member keeps the FPR at or below the level
        assert (nonmembers >= t).mean() > fpr  # and t is the smallest such threshold: one step lower exceeds it
    record = model.config.card_data["calibration"]
    assert record["n_nonmembers"] == len(nonmembers) < 100
    assert record["levels"]["0.05"]["fpr"] <= 0.05 and record["levels"]["0.05"]["tpr"] > 0.5
    assert any(f"{len(nonmembers)} validation non-members cannot resolve FPR 0.01" in n for n in record["notes"])
    assert thresholds["0.01"] == nonmembers[-1]  # too few to resolve 1 %: the highest non-member score


def test_threshold_rule_is_exact_where_a_quantile_is_not() -> None:
    scores = np.arange(50) / 50.0  # 50 non-members: FPR 5 % allows 2 false positives
    t = threshold_at_fpr(scores, 0.05)
    assert t == scores[-3] and (scores > t).sum() == 2
    interpolated = np.quantile(scores, 0.95)  # the obvious rule lets 3 through: FPR 6 %
    assert (scores > interpolated).mean() > 0.05
    assert threshold_at_fpr([0.2, 0.9, 0.9, 0.9], 0.25) == 0.9  # ties: none above it, FPR 0
    assert threshold_at_fpr(np.linspace(0, 1, 100), 0.01) == np.linspace(0, 1, 100)[-2]  # 0.01 * 100 = 1, not 0.999
    thresholds, record = calibrate_thresholds([1, 1, 0, 0], [0.9, float("nan"), 0.3, 0.6])
    assert thresholds == {"0.01": 0.6, "0.05": 0.6}
    assert record["n_members"] == 1 and record["levels"]["0.01"] == {"threshold": 0.6, "fpr": 0.0, "tpr": 1.0}


def test_without_validation_split_thresholds_are_not_calibrated(split, tmp_path, caplog) -> None:
    model = train_detector(split[0].select(range(32)), config={"projection_dim": 16, "hidden_sizes": [8]},
                           output_dir=tmp_path, num_train_epochs=1, **QUIET)
    assert model.config.decision_thresholds is None
    assert "not calibrated" in model.config.card_data["calibration"]["note"]
    assert "decision thresholds were not calibrated" in caplog.text
    card = ModelCard.load(tmp_path / "README.md")  # a card even without eval data: no results, says why
    assert card.data.library_name == "transformers" and card.data.eval_results is None
    assert "Not calibrated" in card.text and "No evaluation results" in card.text


def test_blind_embedding_only_control_is_near_chance(split, tmp_path) -> None:
    """Embeddings of the synthetic samples carry no membership signal: the blind head must not find one."""
    train, held_out = split
    model = train_detector(train, held_out, config={"head": "embedding_only"}, output_dir=tmp_path,
                           num_train_epochs=2, **QUIET)
    scored = predict(model, held_out.remove_columns(["loss", "neighbor_losses"]), progress=False)
    assert membership_metrics(scored["label"], scored["score"], n_bootstrap=0)["auc"] < 0.75


def test_seeded_training_is_reproducible(split, tmp_path) -> None:
    train = split[0].select(range(48))
    kw = dict(config={"projection_dim": 32, "hidden_sizes": [16]}, seed=3, num_train_epochs=1, **QUIET)
    a = train_detector(train, output_dir=tmp_path / "a", **kw).state_dict()
    b = train_detector(train, output_dir=tmp_path / "b", **kw).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "a" / "model.safetensors").exists()


def test_training_input_errors(split, tmp_path) -> None:
    train, held_out = split
    with pytest.raises(ValueError, match="members and non-members"):
        train_detector(train, held_out.filter(lambda r: r["label"] == 1), output_dir=tmp_path)
    with pytest.raises(ValueError, match="embedding_dim=5"):
        train_detector(train, config={"embedding_dim": 5}, output_dir=tmp_path)
    with pytest.raises(ValueError, match="media"):
        train_detector(train, config={"media_embedding_dim": 4}, output_dir=tmp_path)
    with pytest.raises(ValueError, match="'label'"):
        train_detector(train.remove_columns("label"), output_dir=tmp_path)


def test_combined_head_learns_an_absolute_loss_signal_the_delta_head_cannot(absolute_loss_signal, tmp_path) -> None:
    from fimmia_hf.attacks import score_all

    train, held_out = split_samples(absolute_loss_signal(160, effect=1.0), test_size=0.5, seed=0)
    auc = lambda scores: membership_metrics(held_out["label"], scores, n_bootstrap=0)["auc"]  # noqa: E731
    found = {}
    for head in ("fimmia", "combined"):
        config = {"head": head, "projection_dim": 64, "hidden_sizes": [32, 16]}
        model = train_detector(train, config=config, output_dir=tmp_path / head, num_train_epochs=5, **QUIET)
        found[head] = auc(predict(model, held_out, progress=False)["score"])
    loss_auc = auc(score_all(held_out)["loss"])
    print(f"held-out AUC: {found}, LOSS attack {loss_auc:.3f}")
    assert found["fimmia"] < 0.65  # the deltas carry nothing
    assert found["combined"] > 0.75 and found["combined"] >= loss_auc - 0.05
    assert model.config.sample_statistics[0] == "loss"


def _paired_tables(tmp_path: Path) -> tuple[str, str]:
    """The same samples scored by a base model and by a model fine-tuned on them (ΔL grows for the latter)."""
    base = synthetic_features(120, k=3, dim=8, shift=0.0, seed=4).remove_columns("label")
    finetuned = base.map(lambda r: {"loss": r["loss"] - 0.8}).shuffle(seed=1)
    base.save_to_disk(str(tmp_path / "base"))
    finetuned.to_parquet(str(tmp_path / "finetuned.parquet"))
    return str(tmp_path / "base"), str(tmp_path / "finetuned.parquet")


def test_cli_train_and_predict_paired(tmp_path) -> None:
    base, finetuned = _paired_tables(tmp_path)
    (tmp_path / "train.yaml").write_text(textwrap.dedent(f"""
        train_base: {base}
        train_finetuned: {finetuned}
        eval_size: 0.3
        epochs: 1
        target_model: org/base-vlm
        training_args: {{disable_tqdm: true, logging_strategy: "no"}}
    """))
    args = parse_command("train", ["--config", str(tmp_path / "train.yaml"), "--out", str(tmp_path / "det"),
                                   "--epochs", "3", "--neighbor-kwargs", '{"ops": ["delete"], "seed": 3}'])
    out = run_train(args)
    config = json.loads((out / "config.json").read_text())
    assert config["protocol"] == "paired" and config["target_model"] == "org/base-vlm"
    assert config["neighbor_kwargs"] == {"ops": ["delete"], "seed": 3}  # for the pipeline to make neighbours alike
    assert config["card_data"]["epochs"] == pytest.approx(3.0)  # the command line wins over the YAML
    card = ModelCard.load(out / "README.md")  # written by `train`, with the validation split's results
    assert card.data.library_name == "transformers" and card.data.base_model == "org/base-vlm"
    assert "membership-inference" in card.data.tags
    metrics = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert metrics["auc"] == pytest.approx(config["card_data"]["eval_metrics"]["auc"])
    assert "| 1 % |" in card.text and config["decision_thresholds"]  # the calibrated thresholds

    for suffix in (".parquet", ".csv"):
        pargs = parse_command("predict", [
            "--model", str(out), "--base", base, "--finetuned", finetuned,
            "--out", str(tmp_path / f"pred{suffix}"), "--n-bootstrap", "50",
        ])
        report = run_predict(pargs)
        frame = pd.read_parquet(tmp_path / "pred.parquet") if suffix == ".parquet" else pd.read_csv(tmp_path / "pred.csv")
        assert list(frame.columns) == ["sample_id", "ds_name", "model_role", "label", "score"]
        assert len(frame) == 240 and frame["score"].between(0, 1).all()
        saved = json.loads((tmp_path / "pred.metrics.json").read_text())
        assert saved["metrics"]["auc"] == pytest.approx(report["metrics"]["auc"])
        assert saved["metrics"]["auc"] > 0.9
        assert set(saved["metrics"]["groups"]) == {"synthetic_a", "synthetic_b"}


def test_cli_rejects_bad_data(tmp_path) -> None:
    with pytest.raises(ValueError, match="no training data"):
        run_train(parse_command("train", ["--out", str(tmp_path)]))
    with pytest.raises(ValueError, match="parquet or .csv"):
        run_predict(parse_command("predict", ["--model", "m", "--data", "d", "--out", str(tmp_path / "p.txt")]))


@pytest.mark.slow
def test_two_process_accelerate_launch(tmp_path) -> None:
    """`accelerate launch --multi_gpu --num_processes 2` runs two CPU processes (gloo) when no GPU exists."""
    accelerate = Path(sys.executable).with_name("accelerate")
    if not accelerate.exists():
        accelerate = shutil.which("accelerate")
    script = tmp_path / "train_2proc.py"
    script.write_text(textwrap.dedent("""
        import json, sys
        from fimmia_hf.data import split_samples
        from fimmia_hf.testing import synthetic_features
        from fimmia_hf.training import train_detector
        train, held_out = split_samples(synthetic_features(96, k=3, dim=8, shift=1.5), test_size=0.5, seed=0)
        model = train_detector(train, held_out, output_dir=sys.argv[1], num_train_epochs=3, use_cpu=True,
                               disable_tqdm=True, logging_strategy="no")
        card = model.config.card_data
        print("RESULT", json.dumps({"world": card["training_args"]["world_size"], "auc": card["eval_metrics"]["auc"]}))
    """))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    with socket.socket() as sock:  # a free rendezvous port: 29500 may be taken by another run on this machine
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--main_process_port", str(port),
           "--mixed_precision", "no", "--dynamo_backend", "no", str(script), str(tmp_path / "out")]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(line.split("RESULT", 1)[1]) for line in done.stdout.splitlines() if "RESULT" in line]
    assert len(results) == 2 and all(r["world"] == 2 for r in results)
    assert results[0]["auc"] > 0.9
    loaded = FiMMIAForMembershipInference.from_pretrained(tmp_path / "out")
    assert loaded.config.card_data["training_args"]["world_size"] == 2


@pytest.mark.slow
def test_cli_train_uses_the_users_accelerate_config(tmp_path) -> None:
    """Like TRL's CLI: with an accelerate config present, plain `fimmia-hf train` runs on every process it names."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    home = tmp_path / "hf"
    (home / "accelerate").mkdir(parents=True)
    (home / "accelerate" / "default_config.yaml").write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nnum_machines: 1\nnum_processes: 2\n"
        f"machine_rank: 0\nmain_process_port: {port}\nmixed_precision: 'no'\nuse_cpu: false\ngpu_ids: all\n"
        "rdzv_backend: static\nsame_network: true\nmain_training_function: main\n"
    )
    train, held_out = split_samples(synthetic_features(64, k=3, dim=8, shift=1.5), test_size=0.5, seed=0)
    train.save_to_disk(str(tmp_path / "train"))
    held_out.save_to_disk(str(tmp_path / "eval"))
    env = {**os.environ, "HF_HOME": str(home), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [str(Path(sys.executable).with_name("fimmia-hf")), "train", "--train", str(tmp_path / "train"),
           "--eval", str(tmp_path / "eval"), "--out", str(tmp_path / "out"), "--epochs", "2",
           "--training-args", '{"use_cpu": true, "disable_tqdm": true}']
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    card = FiMMIAForMembershipInference.from_pretrained(tmp_path / "out").config.card_data
    assert card["training_args"]["world_size"] == 2


# -- issue 20: `train --eval-size` holds out whole samples --------------------------------------------


def test_cli_eval_size_holds_out_whole_samples(tmp_path, monkeypatch) -> None:
    """Paired tables hold each sample twice (base and fine-tuned rows): a split by row would put most
    samples on both sides, and the held-out score would measure memorised rows."""
    import fimmia_hf.training as training

    base, finetuned = _paired_tables(tmp_path)
    seen = {}
    monkeypatch.setattr(training, "train_detector", lambda train, eval_ds, **kw: seen.update(train=train, eval=eval_ds))
    run_train(parse_command("train", [
        "--train-base", base, "--train-finetuned", finetuned, "--eval-size", "0.25", "--out", str(tmp_path / "d")]))
    train_ids, eval_ids = seen["train"]["sample_id"], seen["eval"]["sample_id"]
    assert not set(train_ids) & set(eval_ids)
    assert len(set(eval_ids)) == 30 and len(eval_ids) == 60  # a quarter of 120 samples, both rows of each
    assert sorted(seen["eval"]["label"]) == [0] * 30 + [1] * 30 and len(train_ids) == 180

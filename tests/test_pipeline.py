"""`pipeline("membership-inference")` end to end on tiny models: raw image samples in, scores out."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import datasets
import pandas as pd
import pytest
import torch
from transformers import pipeline

from fimmia_hf import FiMMIAConfig, FiMMIAForMembershipInference
from fimmia_hf.pipeline_fimmia import MembershipInferencePipeline

K = 4
# the random detectors built here have no calibrated thresholds; the test that checks the warning catches it itself
pytestmark = pytest.mark.filterwarnings("ignore:this detector has no decision threshold:UserWarning")


def _dim(path: str, *keys: str) -> int:
    cfg = json.loads((Path(path) / "config.json").read_text())
    for key in keys:
        cfg = cfg[key] if key in cfg else cfg
    return int(cfg)


@pytest.fixture(scope="module")
def detector_dir(tiny_model, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Random-weight detector whose config records the four tiny component models (dims read from them)."""
    paths = {k: tiny_model(k) for k in ("image-text", "t5-infill", "text-encoder", "image-encoder")}
    torch.manual_seed(0)
    cfg = FiMMIAConfig(
        embedding_dim=_dim(paths["text-encoder"], "hidden_size"),
        media_embedding_dim=_dim(paths["image-encoder"], "projection_dim"),
        projection_dim=16, hidden_sizes=[16, 8], num_neighbors=K, modality="image", protocol="member",
        target_model=paths["image-text"], neighbor_model=paths["t5-infill"],
        embedding_model=paths["text-encoder"], media_embedding_model=paths["image-encoder"],
    )
    out = tmp_path_factory.mktemp("detector")
    FiMMIAForMembershipInference(cfg).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def samples(synthetic_table) -> list[dict]:
    csv = synthetic_table("image", n=4)
    rows = pd.read_csv(csv).to_dict("records")
    for r in rows:
        r["image"] = str(Path(csv).parent / r["image"])
    return rows


@pytest.fixture(scope="module")
def pipe(detector_dir: str) -> MembershipInferencePipeline:
    # T5 span filling kept, with few masks: random tiny T5 weights generate until the length cap
    return pipeline("membership-inference", model=detector_dir, device="cpu",
                    neighbor_kwargs={"min_masks": 1, "max_masks": 2})


@pytest.fixture(scope="module")
def fast_pipe(detector_dir: str) -> MembershipInferencePipeline:
    """Model-free neighbour operations only, for the tests that score many samples."""
    return pipeline("membership-inference", model=detector_dir, device="cpu", neighbor_kwargs={"ops": ("delete", "swap")})


def test_raw_image_sample_gives_a_score(pipe: MembershipInferencePipeline, samples: list[dict]) -> None:
    from PIL import Image

    assert isinstance(pipe, MembershipInferencePipeline)  # registered task, no trust_remote_code needed
    sample = {"input": samples[0]["input"], "answer": samples[0]["answer"], "image": Image.open(samples[0]["image"])}
    out = pipe(sample, return_features=True)
    assert set(out) == {"score", "label", "features"}
    assert 0.0 <= out["score"] <= 1.0
    assert out["label"] == ("member" if out["score"] > 0.5 else "non-member")
    feats = out["features"]
    assert len(feats["neighbors"]) == len(feats["neighbor_losses"]) == K
    assert all(n != sample["input"] for n in feats["neighbors"])
    assert math.isfinite(feats["loss"]) and len(feats["loss_delta"]) == K
    assert len(feats["media_delta"][0]) == pipe.model.config.media_embedding_dim
    assert feats["loss_delta"][0] == pytest.approx(feats["neighbor_losses"][0] - feats["loss"], abs=1e-5)


def test_list_and_dataset_inputs_batched(fast_pipe: MembershipInferencePipeline, samples: list[dict]) -> None:
    pipe = fast_pipe
    rows = [{k: r[k] for k in ("input", "answer", "image")} for r in samples]
    listed = pipe(rows, batch_size=3)  # detector runs in chunks of 3 + 1
    assert isinstance(listed, list) and len(listed) == len(rows)
    assert all(0.0 <= r["score"] <= 1.0 and r["label"] in ("member", "non-member") for r in listed)
    single = pipe(rows[1])
    assert single["score"] == pytest.approx(listed[1]["score"], abs=1e-6)  # batch composition does not matter

    from_ds = pipe(datasets.Dataset.from_list(rows), batch_size=1)
    assert [r["score"] for r in from_ds] == pytest.approx([r["score"] for r in listed], abs=1e-6)

    assert all(r["label"] == "member" for r in pipe(rows, threshold=0.0))
    assert all(r["label"] == "non-member" for r in pipe(rows, threshold=1.0))
    with pytest.raises(ValueError, match="threshold"):
        pipe(rows[0], threshold=2.0)


def test_rows_with_features_skip_the_stages(tmp_path: Path) -> None:
    from fimmia_hf.testing import synthetic_features

    torch.manual_seed(0)
    model = FiMMIAForMembershipInference(FiMMIAConfig(embedding_dim=8, projection_dim=8, hidden_sizes=[8]))
    model.save_pretrained(tmp_path)  # records no component models: any stage would fail
    pipe = pipeline("membership-inference", model=str(tmp_path), device="cpu", threshold=0.0)
    ds = synthetic_features(n=5, k=3, dim=8)
    out = pipe(ds, batch_size=2)
    assert len(out) == 5 and pipe._stages == {}
    assert all(0.0 <= r["score"] <= 1.0 and r["label"] == "member" for r in out)  # threshold set at construction
    with torch.no_grad():
        from fimmia_hf.features import FiMMIADataCollator

        batch = FiMMIADataCollator.from_config(model.config)(list(ds))
        batch.pop("labels")
        expected = model.eval()(**batch).scores.tolist()
    assert [r["score"] for r in out] == pytest.approx(expected, abs=1e-6)

    with pytest.raises(ValueError, match="pass target_model="):
        pipe({"input": "Какая фигура? ОТВЕТ:", "answer": "A"})
    with pytest.raises(ValueError, match=r"sample 0: needs 'answer'"):
        pipe([{"input": "no answer"}])

    pipe.save_pretrained(tmp_path / "saved")
    assert "custom_pipelines" not in json.loads((tmp_path / "saved" / "config.json").read_text())


@pytest.mark.slow  # a fresh interpreter importing transformers: ~10-25 s on 2 shared cores
def test_remote_code_without_the_package(tmp_path: Path) -> None:
    """Where fimmia_hf is absent: the detector loads with trust_remote_code, and the pipeline module imports but
    says clearly that scoring needs the package."""
    torch.manual_seed(0)
    FiMMIAForMembershipInference(FiMMIAConfig(embedding_dim=8, projection_dim=8, hidden_sizes=[8])).save_pretrained(tmp_path / "det")
    pipeline_file = Path(__file__).parents[1] / "fimmia_hf" / "pipeline_fimmia.py"
    script = textwrap.dedent(f"""
        import importlib.util, sys
        sys.modules["fimmia_hf"] = None  # as if not installed
        from transformers import AutoModelForSequenceClassification
        m = AutoModelForSequenceClassification.from_pretrained({str(tmp_path / "det")!r}, trust_remote_code=True)
        assert type(m).__module__.startswith("transformers_modules"), type(m).__module__
        spec = importlib.util.spec_from_file_location("pipeline_fimmia", {str(pipeline_file)!r})
        mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
        try:
            mod._fimmia("features")
        except ImportError as err:
            assert "pip install fimmia-hf" in str(err), err
            print("OK")
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120,
                          cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-2000:]


def test_stage_settings_stored_at_training_are_the_pipeline_defaults(detector_dir: str, tmp_path: Path) -> None:
    detector = FiMMIAForMembershipInference.from_pretrained(detector_dir)
    detector.config.neighbor_kwargs = {"ops": ["delete"], "seed": 7}
    detector.config.scorer_kwargs = {"include_closing_tokens": True}
    detector.save_pretrained(tmp_path / "det")
    pipe = pipeline("membership-inference", model=str(tmp_path / "det"), device="cpu")
    neighbors, scorer = pipe._stage("neighbor"), pipe._stage("target")
    assert tuple(neighbors.ops) == ("delete",) and neighbors.seed == 7 and scorer.include_closing_tokens
    pipe = pipeline("membership-inference", model=str(tmp_path / "det"), device="cpu", neighbor_kwargs={"seed": 1})
    assert tuple(pipe._stage("neighbor").ops) == ("delete",) and pipe._stage("neighbor").seed == 1  # the caller wins
    with pytest.raises(ValueError, match="neighbor_kwargs must be a dict of JSON values"):
        FiMMIAConfig(neighbor_kwargs={"protected": {"<image>"}})


def test_labels_use_the_threshold_calibrated_at_an_fpr(tmp_path: Path) -> None:
    from fimmia_hf.testing import synthetic_features

    torch.manual_seed(0)
    rows = list(synthetic_features(n=6, k=3, dim=8))
    model = FiMMIAForMembershipInference(FiMMIAConfig(embedding_dim=8, projection_dim=8, hidden_sizes=[8]))
    model.save_pretrained(tmp_path / "plain")
    with pytest.warns(UserWarning, match="no decision threshold calibrated at FPR 0.01"):
        plain = pipeline("membership-inference", model=str(tmp_path / "plain"), device="cpu")
    scores = [r["score"] for r in plain(rows)]
    assert [r["label"] for r in plain(rows)] == ["member" if s > 0.5 else "non-member" for s in scores]  # fallback
    with pytest.raises(ValueError, match=r"no threshold calibrated at fpr=0.05; calibrated levels: none"):
        plain(rows, fpr=0.05)

    model.config.decision_thresholds = {"0.01": max(scores), "0.05": min(scores) / 2}
    model.save_pretrained(tmp_path / "calibrated")
    pipe = pipeline("membership-inference", model=str(tmp_path / "calibrated"), device="cpu")
    assert {r["label"] for r in pipe(rows)} == {"non-member"}  # FPR 1 % by default: no score exceeds the highest
    assert {r["label"] for r in pipe(rows, fpr=0.05)} == {"member"}
    assert {r["label"] for r in pipe(rows, threshold=1.0)} == {"non-member"}
    with pytest.raises(ValueError, match=r"fpr=0.1; calibrated levels: 0.01, 0.05"):
        pipe(rows, fpr=0.1)
    with pytest.raises(ValueError, match="not both"):
        pipe(rows, fpr=0.05, threshold=0.5)


def test_combined_head_scores_raw_samples_as_predict_does(tiny_model, samples: list[dict], tmp_path: Path) -> None:
    """The pipeline computes the combined head's statistics from its own scorer run exactly as training and
    `predict` do from the scorer's columns."""
    from fimmia_hf import load_samples
    from fimmia_hf.training import predict

    paths = {k: tiny_model(k) for k in ("image-text", "text-encoder")}
    torch.manual_seed(0)
    cfg = FiMMIAConfig(
        head="combined", embedding_dim=_dim(paths["text-encoder"], "hidden_size"), projection_dim=16,
        hidden_sizes=[8], num_neighbors=K, modality="image", target_model=paths["image-text"],
        embedding_model=paths["text-encoder"], sample_statistics=["loss", "min_k_pp_20", "neighborhood", "max_renyi_1_k0"],
        sample_statistics_mean=[-7.0, 0.0, 0.0, -7.0], sample_statistics_std=[1.0, 1.0, 0.1, 1.0],
    )
    FiMMIAForMembershipInference(cfg).save_pretrained(tmp_path / "det")
    with pytest.warns(UserWarning):  # not calibrated
        pipe = pipeline("membership-inference", model=str(tmp_path / "det"), device="cpu",
                        neighbor_kwargs={"ops": ("delete", "swap")})
    rows = [{k: r[k] for k in ("input", "answer", "image")} for r in samples]
    out = pipe(rows, return_features=True)
    assert pipe._stage("target").token_stats is True  # the scorer writes the per-token lists the statistics need
    assert all(math.isfinite(r["score"]) for r in out)
    assert set(out[0]["features"]["sample_statistics"]) == set(cfg.sample_statistics)

    ds = load_samples(datasets.Dataset.from_list(rows))
    for role in ("neighbor", "embedding", "target"):
        ds = pipe._stage(role).apply(ds, cache_dir=str(tmp_path / role))
    expected = predict(str(tmp_path / "det"), ds, progress=False)["score"]
    assert [r["score"] for r in out] == pytest.approx(expected, abs=1e-6)


def test_misspelt_or_missing_media_key_is_an_error(fast_pipe: MembershipInferencePipeline, samples: list[dict]) -> None:
    """An image detector never scores a sample as text-only because its media key was misspelt or left out."""
    row = {"input": samples[0]["input"], "answer": samples[0]["answer"]}
    with pytest.raises(ValueError, match=r"sample 1: unknown key\(s\) 'imgae' \(keys given: answer, imgae, input\)"):
        fast_pipe([{**row, "image": samples[0]["image"]}, {**row, "imgae": samples[0]["image"]}])
    with pytest.raises(ValueError, match=r"sample 0: this detector scores image samples, and this one has no 'image'"):
        fast_pipe(row)
    with pytest.raises(ValueError, match=r"this one has no 'image'"):
        fast_pipe({**row, "image": None})
def test_pipeline_from_another_folder_gives_the_cli_and_predict_score(tiny_model, synthetic_table, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A detector that records its components by relative path, used from another folder: the pipeline finds them
    and scores each sample exactly as the CLI stages + `predict` did from the table (media paths written relative,
    ds_name from the file's stem), a list with repeats too."""
    from fimmia_hf.cli import main
    from fimmia_hf.training import predict

    csv = Path(synthetic_table("image", n=3))
    monkeypatch.chdir(csv.parent)  # where the detector is trained: components named relative to here
    paths = {k: os.path.relpath(tiny_model(k)) for k in ("image-text", "text-encoder", "image-encoder")}
    torch.manual_seed(0)
    cfg = FiMMIAConfig(
        embedding_dim=_dim(paths["text-encoder"], "hidden_size"), media_embedding_dim=_dim(paths["image-encoder"],
        "projection_dim"), projection_dim=16, hidden_sizes=[8], num_neighbors=K, modality="image",
        target_model=paths["image-text"], embedding_model=paths["text-encoder"],
        media_embedding_model=paths["image-encoder"], neighbor_kwargs={"ops": ["delete", "swap"]},
    )
    FiMMIAForMembershipInference(cfg).save_pretrained(tmp_path / "det")
    recorded = json.loads((tmp_path / "det" / "config.json").read_text())
    assert all(Path(recorded[k]).is_absolute() for k in ("target_model", "embedding_model", "media_embedding_model"))

    stages = [["neighbors", "--data", csv.name, "--ops", "delete,swap", "--num-neighbors", str(K)],
              ["embed", "--model", paths["text-encoder"], "--media-model", paths["image-encoder"], "--device", "cpu"],
              ["score", "--model", paths["image-text"]]]
    data = csv.name
    for i, argv in enumerate(stages):
        out = str(tmp_path / f"stage{i}")
        argv = argv if "--data" in argv else [*argv, "--data", data]
        assert main([*argv, "--out", out]) == 0
        data = out
    expected = predict(str(tmp_path / "det"), data, progress=False)["score"]

    monkeypatch.chdir(tmp_path)  # elsewhere: relative component paths would resolve to nothing here
    rows = pd.read_csv(csv).to_dict("records")
    for row in rows:
        row["image"] = str(csv.parent / row["image"])
    pipe = pipeline("membership-inference", model=str(tmp_path / "det"), device="cpu")
    out = pipe([rows[0], rows[1], rows[0], rows[2], rows[1]])
    assert [r["score"] for r in out] == pytest.approx([expected[i] for i in (0, 1, 0, 2, 1)], abs=1e-6)
    assert out[0] == out[2] and out[0] is not out[2]  # scored once, returned in place
    assert pipe(rows[2])["score"] == pytest.approx(expected[2], abs=1e-6)


def test_pipeline_without_a_detector_says_what_to_pass() -> None:
    with pytest.raises(ValueError, match=r"needs model=<a trained detector"):
        pipeline("membership-inference")


# -- issue 20: the threshold a detector stores is the one its labels use ------------------------------


def test_labels_use_the_stored_fallback_threshold_strictly(tmp_path: Path) -> None:
    """Without calibrated thresholds, labels follow `config.threshold` (not a hard-coded 0.5), and a score
    equal to it is a non-member (score > threshold ⇒ member)."""
    from fimmia_hf.testing import synthetic_features

    torch.manual_seed(0)
    rows = list(synthetic_features(n=8, k=3, dim=8))
    model = FiMMIAForMembershipInference(FiMMIAConfig(embedding_dim=8, projection_dim=8, hidden_sizes=[8]))
    model.save_pretrained(tmp_path / "default")
    scores = [r["score"] for r in pipeline("membership-inference", model=str(tmp_path / "default"), device="cpu")(rows)]
    cut = sorted(scores)[2]
    model.config.threshold = cut
    model.save_pretrained(tmp_path / "stored")
    labels = [r["label"] for r in pipeline("membership-inference", model=str(tmp_path / "stored"), device="cpu")(rows)]
    assert labels == ["member" if s > cut else "non-member" for s in scores]
    assert labels.count("member") == 5 and labels[scores.index(cut)] == "non-member"  # the boundary row
    assert labels != ["member" if s > 0.5 else "non-member" for s in scores]  # 0.5 would label them otherwise

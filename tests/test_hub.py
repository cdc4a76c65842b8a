"""Hub push/pull offline: a fake `HfApi` records the operations and serves the uploaded folders back."""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fimmia_hf import FiMMIAConfig, FiMMIAForMembershipInference
from fimmia_hf.cli import parse_command
from fimmia_hf.hub import (
    load_detector,
    load_features,
    push_detector,
    push_features,
    render_model_card,
    run_push,
)


class FakeHfApi:
    """The three `HfApi` methods the hub module uses; uploads land in `root/<repo_type>/<repo_id>`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def _folder(self, repo_id: str, repo_type: str | None) -> Path:
        return self.root / (repo_type or "model") / repo_id

    def create_repo(self, repo_id: str, **kwargs: Any) -> str:
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        self._folder(repo_id, kwargs.get("repo_type")).mkdir(parents=True, exist_ok=True)
        return f"https://hub.example/{repo_id}"

    def upload_folder(self, *, repo_id: str, folder_path: str, **kwargs: Any) -> Any:
        files = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file())
        self.calls.append(("upload_folder", {"repo_id": repo_id, "files": files, **kwargs}))
        target = self._folder(repo_id, kwargs.get("repo_type"))
        if not target.is_dir():
            raise FileNotFoundError(f"repo {repo_id} was not created before the upload")
        shutil.copytree(folder_path, target, dirs_exist_ok=True)
        return argparse.Namespace(commit_url=f"https://hub.example/{repo_id}/commit/1")

    def snapshot_download(self, repo_id: str, **kwargs: Any) -> str:
        self.calls.append(("snapshot_download", {"repo_id": repo_id, **kwargs}))
        folder = self._folder(repo_id, kwargs.get("repo_type"))
        if not folder.is_dir():
            raise FileNotFoundError(f"no repo {repo_id}")
        return str(folder)


def _detector(media: bool = False, neighbor_model: str = "ai-forever/FRED-T5-1.7B") -> FiMMIAForMembershipInference:
    torch.manual_seed(0)
    cfg = FiMMIAConfig(
        embedding_dim=8, media_embedding_dim=4 if media else 0, projection_dim=16, hidden_sizes=[16, 8],
        num_neighbors=4, modality="image", target_model="Qwen/Qwen2.5-VL-3B-Instruct",
        neighbor_model=neighbor_model, embedding_model="intfloat/e5-mistral-7b-instruct",
        loss_mean=0.2, loss_std=0.5, neighbor_kwargs={"mask_ratio": 0.2, "seed": 3},
        card_data={"n_rows": 64, "n_members": 32, "n_nonmembers": 32, "n_samples": 64,
                   "ds_names": {"synthetic_a": 32, "synthetic_b": 32},
                   "neighbors_per_sample": {"min": 4, "max": 4, "mean": 4.0},
                   "eval_metrics": {"auc": 0.91, "tpr@1%fpr": 0.2}},
    )
    return FiMMIAForMembershipInference(cfg).eval()


METRICS = {
    "auc": 0.934, "auc_ci": [0.901, 0.962], "tpr@0.1%fpr": 0.05, "tpr@0.1%fpr_ci": [0.0, 0.12],
    "tpr@1%fpr": 0.31, "tpr@1%fpr_ci": [0.22, 0.4], "tpr@5%fpr": 0.52, "tpr@5%fpr_ci": [0.44, 0.6],
    "fpr@95%tpr": 0.4, "fpr@95%tpr_ci": [0.3, 0.5], "n_members": 200, "n_nonmembers": 200, "warnings": [],
    "blind": {"auc": 0.55, "tpr@1%fpr": 0.02, "fpr@95%tpr": 0.9}, "blind_name": "image statistics",
}

# The whole rendered card, in order: metadata with model-index, every section, the lift table, the usage snippet.
CARD_PATTERN = re.compile(
    r"^---\n"
    r"(?=[\s\S]*^library_name: transformers$)"
    r"(?=[\s\S]*^- membership-inference$)"
    r"(?=[\s\S]*^target_model: Qwen/Qwen2\.5-VL-3B-Instruct$)"
    r"(?=[\s\S]*^base_model: Qwen/Qwen2\.5-VL-3B-Instruct$)"
    r"[\s\S]*^model-index:\n- name: fimmia-demo\n  results:\n  - task:\n      type: membership-inference\n"
    r"[\s\S]*^    - type: auc\n      value: 0\.934\n      name: AUC \(95% CI \[0\.901, 0\.962\]\)\n"
    r"[\s\S]*^---\n\n# fimmia-demo\n"
    r"[\s\S]*## What it detects\n[\s\S]*\*\*Target model:\*\* Qwen/Qwen2\.5-VL-3B-Instruct \(image input\)"
    r"[\s\S]*K = 4 perturbed neighbours[\s\S]*Label `member` when score > 0\.5\."
    r"[\s\S]*## Component models\n[\s\S]*\| neighbour generator \(span filling\) \| ai-forever/FRED-T5-1\.7B \|"
    r"[\s\S]*\| text embedder \| intfloat/e5-mistral-7b-instruct \|"
    r"[\s\S]*## Training data\n\n64 training rows \(32 members, 32 non-members, 64 distinct samples\)\."
    r"[\s\S]*## Evaluation\n\nEvaluated on held-out samples: 200 members, 200 non-members\."
    r"[\s\S]*\| AUC \| 0\.934 \| \[0\.901, 0\.962\] \|"
    r"[\s\S]*\| TPR@1%FPR \| 0\.310 \| \[0\.220, 0\.400\] \|"
    r"[\s\S]*\*\*Lift over the blind baseline\*\* \(image statistics"
    r"[\s\S]*\| AUC \| 0\.934 \| 0\.550 \| \+0\.384 \|"
    r"[\s\S]*\| FPR@95%TPR \| 0\.400 \| 0\.900 \| \+0\.500 \|"
    r"[\s\S]*## How to use\n\n```python\nimport fimmia_hf[\s\S]*pipeline\(\n    \"membership-inference\",\n"
    r"    model=\"me/fimmia-demo\",\n    target_model=\"Qwen/Qwen2\.5-VL-3B-Instruct\",\n"
    r"[\s\S]*\"image\": \"photo\.png\"\}\)"
    r"[\s\S]*## Intended use and limits\n",
    re.MULTILINE,
)


def test_model_card_matches_expected_pattern() -> None:
    card = render_model_card(_detector(), "me/fimmia-demo", METRICS)
    text = str(card)
    assert CARD_PATTERN.match(text), text
    assert '`neighbor_kwargs={"mask_ratio": 0.2, "seed": 3}`' in text  # how to make the neighbours again
    results = card.data.eval_results
    assert [r.metric_type for r in results] == ["auc", "tpr@0.1%fpr", "tpr@1%fpr", "tpr@5%fpr", "fpr@95%tpr"]
    assert results[0].metric_value == pytest.approx(0.934)


def test_card_without_metrics_uses_training_record_and_warns_about_missing_baseline() -> None:
    text = str(render_model_card(_detector(), "me/x", None))
    assert "| AUC | 0.910 | n/a |" in text
    assert "No blind-baseline result was supplied" in text


def test_card_reads_report_json() -> None:
    report = {
        "methods": {"FiMMIA": {"kind": "detector", **{k: v for k, v in METRICS.items() if k not in ("blind", "blind_name")}},
                    "blind: text tf-idf": {"kind": "blind baseline", "auc": 0.61, "tpr@1%fpr": 0.05}},
        "best_blind_baseline": "blind: text tf-idf",
        "lift_over_best_blind": {"method": "FiMMIA", "best_blind": "blind: text tf-idf"},
        "warnings": ["DISTRIBUTION SHIFT: 1 blind baseline(s) reach AUC >= 0.6 ..."],
    }
    text = str(render_model_card(_detector(), "me/x", report))
    assert "(text tf-idf: a model-free classifier" in text
    assert "| AUC | 0.934 | 0.610 | +0.324 |" in text
    assert "- Note: DISTRIBUTION SHIFT" in text


def _features(model: FiMMIAForMembershipInference, n: int = 6) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    k, d = model.config.num_neighbors, model.config.embedding_dim
    return {"loss_delta": torch.randn(n, k, generator=g), "embedding_delta": torch.randn(n, k, d, generator=g),
            "neighbor_mask": torch.ones(n, k, dtype=torch.bool)}


def test_push_then_load_gives_identical_predictions(tmp_path: Path) -> None:
    api = FakeHfApi(tmp_path / "hub")
    model = _detector()
    info = push_detector(model, "me/fimmia-demo", api=api, metrics=METRICS, private=True, token="hf_secret")
    assert info.commit_url.endswith("/commit/1")
    (op1, create), (op2, upload) = api.calls
    assert (op1, op2) == ("create_repo", "upload_folder")
    assert create["exist_ok"] is True and create["private"] is True and create["repo_type"] == "model"
    assert {"README.md", "config.json", "model.safetensors", "configuration_fimmia.py", "modeling_fimmia.py"} <= set(
        upload["files"]
    )
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in upload["files"])
    stored = tmp_path / "hub" / "model" / "me" / "fimmia-demo"
    assert "hf_secret" not in "".join(p.read_text(errors="ignore") for p in stored.rglob("*") if p.suffix in (".md", ".json"))
    assert "custom_pipelines" not in json.loads((stored / "config.json").read_text())

    loaded = load_detector("me/fimmia-demo", api=api, revision="main")
    assert api.calls[-1] == ("snapshot_download", {"repo_id": "me/fimmia-demo", "repo_type": "model",
                                                   "revision": "main", "token": None})
    assert type(loaded) is FiMMIAForMembershipInference and not loaded.training
    assert loaded.config.target_model == model.config.target_model and loaded.config.loss_std == 0.5
    feats = _features(model)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**feats).scores, model(**feats).scores, rtol=0, atol=0)


def test_load_detector_errors_clearly(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no repo"):
        load_detector("me/missing", api=FakeHfApi(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_detector(tmp_path / "empty")


def test_push_and_load_features_with_dataset_card(tmp_path: Path) -> None:
    from fimmia_hf.testing import synthetic_features

    api = FakeHfApi(tmp_path / "hub")
    ds = synthetic_features(n=10, k=3, dim=4)
    ds = ds.add_column("image", [f"/home/alice/secret/img_{i}.png" for i in range(len(ds))])
    push_features(ds, "me/fimmia-features", api=api, target_model="Qwen/Qwen2.5-VL-3B-Instruct")
    create, upload = api.calls[0][1], api.calls[1][1]
    assert create["repo_type"] == upload["repo_type"] == "dataset"
    assert upload["files"] == ["README.md", "data/train-00000-of-00001.parquet"]
    card = (tmp_path / "hub" / "dataset" / "me" / "fimmia-features" / "README.md").read_text()
    assert re.search(r"^- membership-inference$", card, re.M)
    assert "Rows: 10 (5 members, 5 non-members)" in card and "| `neighbor_losses` |" in card
    assert "file names only" in card

    back = load_features("me/fimmia-features", api=api)
    assert back.column_names == ds.column_names and len(back) == 10
    assert back["image"][0] == "img_0.png" and "/home/alice" not in json.dumps(list(back["image"]))
    np.testing.assert_allclose(np.array(back["neighbor_losses"]), np.array(ds["neighbor_losses"]))

    ds.save_to_disk(str(tmp_path / "saved"))
    assert len(load_features(tmp_path / "saved")) == 10


def test_cli_push(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = _detector()
    model.save_pretrained(tmp_path / "det")
    (tmp_path / "m.json").write_text(json.dumps(METRICS))
    args = parse_command("push", ["--model", str(tmp_path / "det"), "--repo-id", "me/cli-det",
                              "--metrics", str(tmp_path / "m.json"), "--private"])
    api = FakeHfApi(tmp_path / "hub")
    assert run_push(args, api=api) == 0
    assert "pushed detector to https://hub.example/me/cli-det/commit/1" in capsys.readouterr().out
    assert api.calls[0][1]["private"] is True
    assert "| AUC | 0.934 | [0.901, 0.962] |" in (tmp_path / "hub" / "model" / "me" / "cli-det" / "README.md").read_text()


def test_card_reports_the_calibrated_thresholds_and_the_combined_statistics() -> None:
    model = _detector()
    model.config.decision_thresholds = {"0.01": 0.9312, "0.05": 0.8123}
    model.config.card_data = {**model.config.card_data, "calibration": {
        "split": "validation", "n_members": 40, "n_nonmembers": 60,
        "levels": {"0.01": {"threshold": 0.9312, "fpr": 0.0, "tpr": 0.25}, "0.05": {"threshold": 0.8123, "fpr": 0.05, "tpr": 0.5}},
        "notes": ["60 validation non-members cannot resolve FPR 0.01 (that needs at least 100): ..."],
    }}
    text = str(render_model_card(model, "me/x", METRICS))
    assert "Label `member` when score > 0.9312, the threshold calibrated at 1 % FPR" in text
    assert "Calibrated on the validation split (60 non-members, 40 members" in text
    assert "| 1 % | 0.9312 | 0.000 | 0.250 |\n| 5 % | 0.8123 | 0.050 | 0.500 |" in text
    assert "- Note: 60 validation non-members cannot resolve FPR 0.01" in text

    uncalibrated = str(render_model_card(_detector(), "me/x", METRICS))
    assert "Not calibrated (no validation split was recorded)" in uncalibrated and "score > 0.5" in uncalibrated

    cfg = FiMMIAConfig(**{**_detector().config.to_dict(), "head": "combined", "sample_statistics": ["loss", "zlib"]})
    combined = str(render_model_card(FiMMIAForMembershipInference(cfg), "me/x", METRICS))
    assert "plus the sample's own statistics from the same forward passes\n  (loss, zlib:" in combined


def test_load_detector_refuses_a_hub_repo_of_pickles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Hub repo holding only `pytorch_model.bin` is refused after the download, before the pickle is read."""
    from fimmia_hf.configuration_fimmia import PickledWeightsError

    api = FakeHfApi(tmp_path)
    repo = api._folder("org/pickled", "model")
    _detector().save_pretrained(repo)
    from safetensors.torch import load_file

    torch.save(load_file(str(repo / "model.safetensors")), repo / "pytorch_model.bin")
    (repo / "model.safetensors").unlink()
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    with pytest.raises(PickledWeightsError, match=r"pickled.*pytorch_model\.bin.*safetensors only"):
        load_detector("org/pickled", api=api)
def test_push_names_local_components_by_hub_id_or_refuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """A pushed config must resolve anywhere: a component recorded as a local folder needs its Hub id."""
    (tmp_path / "models" / "t5").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    model = _detector(neighbor_model="models/t5")  # as trained here: recorded as an absolute path
    assert model.config.neighbor_model == str(tmp_path / "models" / "t5")
    api = FakeHfApi(tmp_path / "hub")
    with pytest.raises(ValueError, match=r"local folders as components \(neighbor_model = .*--neighbor-model OWNER"):
        push_detector(model, "me/det", api=api)
    assert api.calls == []  # nothing created
    push_detector(model, "me/det", api=api, hub_ids={"neighbor_model": "ai-forever/FRED-T5-1.7B@v2"})
    pushed = json.loads((tmp_path / "hub" / "model" / "me" / "det" / "config.json").read_text())
    assert pushed["neighbor_model"] == "ai-forever/FRED-T5-1.7B@v2"
    assert model.config.neighbor_model == str(tmp_path / "models" / "t5")  # the caller's detector is unchanged
    card = (tmp_path / "hub" / "model" / "me" / "det" / "README.md").read_text()
    assert "| neighbour generator (span filling) | ai-forever/FRED-T5-1.7B@v2 |" in card
    with pytest.raises(ValueError, match="must be Hub ids"):
        push_detector(model, "me/det", api=api, hub_ids={"neighbor_model": "models/t5/x"})


def test_cli_push_offline_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    from fimmia_hf.cli import main

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    _detector().save_pretrained(tmp_path / "det")
    assert main(["push", "--model", str(tmp_path / "det"), "--repo-id", "me/offline"]) == 2
    err = capsys.readouterr().err
    assert "fimmia-hf push: error: could not push to the Hub:" in err and "offline mode" in err
    assert "Traceback" not in err

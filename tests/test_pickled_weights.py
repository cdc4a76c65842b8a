"""Every loader refuses pickled weights before reading them, with one message saying how to convert them."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from fimmia_hf.configuration_fimmia import PickledWeightsError
from fimmia_hf.modeling_fimmia import FiMMIAConfig, FiMMIAForMembershipInference


def _pickle_weights(folder: Path, name: str = "model.safetensors", pickled: str = "pytorch_model.bin") -> Path:
    """Replace `folder/name` (safetensors) by the same state dict as a genuine `torch.save` pickle."""
    from safetensors.torch import load_file

    torch.save(load_file(str(folder / name)), folder / pickled)
    (folder / name).unlink()
    return folder


def _pickled_copy(source: str | Path, dest: Path) -> Path:
    shutil.copytree(source, dest)
    return _pickle_weights(dest)


@pytest.fixture
def no_unpickling(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test the moment anything calls `torch.load` (the refusal must come before any read)."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"torch.load was called on {args[:1]}")

    monkeypatch.setattr(torch, "load", refuse)


@pytest.fixture(scope="module")
def pickled_detector(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("pickled") / "detector"
    FiMMIAForMembershipInference(FiMMIAConfig(embedding_dim=4, projection_dim=4, hidden_sizes=[4])).save_pretrained(folder)
    return _pickle_weights(folder)


def _assert_refused(load: Callable[[], object], folder: Path) -> None:
    with pytest.raises(PickledWeightsError) as caught:
        load()
    message = str(caught.value)
    assert str(folder) in message and ("pytorch_model.bin" in message or "adapter_model.bin" in message)
    assert "safetensors" in message and "st.save_file" in message  # says how to convert
    assert "weights_only=False" not in message


def _detector_loaders() -> dict[str, Callable[[Path], object]]:
    import fimmia_hf

    def pipe(folder: Path) -> object:
        from transformers import pipeline

        return pipeline("membership-inference", model=str(folder))

    def attribute(folder: Path) -> object:
        from fimmia_hf.testing import synthetic_features

        return fimmia_hf.attribute(folder, synthetic_features(4, k=2, dim=4), n_steps=2)

    def predict(folder: Path) -> object:
        from fimmia_hf.testing import synthetic_features

        return fimmia_hf.predict(folder, synthetic_features(4, k=2, dim=4), progress=False)

    return {
        "from_pretrained": lambda folder: FiMMIAForMembershipInference.from_pretrained(folder),
        "auto_model": lambda folder: __import__("transformers").AutoModel.from_pretrained(folder),
        "load_detector": lambda folder: fimmia_hf.load_detector(folder),
        "pipeline": pipe,
        "predict": predict,
        "attribute": attribute,
        "from_original_checkpoint": lambda folder: FiMMIAForMembershipInference.from_original_checkpoint(
            folder / "pytorch_model.bin"
        ),
    }


@pytest.mark.parametrize("loader", list(_detector_loaders()))
def test_detector_loaders_refuse_pickles(loader: str, pickled_detector: Path, no_unpickling: None) -> None:
    _assert_refused(lambda: _detector_loaders()[loader](pickled_detector), pickled_detector)


@pytest.mark.parametrize(
    ("stage", "kind"),
    [("TargetScorer", "text-lm"), ("TextEmbedder", "text-encoder"), ("ModalityEmbedder", "image-encoder"),
     ("NeighborGenerator", "t5-infill")],
)
def test_stage_loaders_refuse_pickles(stage: str, kind: str, tiny_model, tmp_path: Path, no_unpickling: None) -> None:
    import fimmia_hf

    folder = _pickled_copy(tiny_model(kind), tmp_path / kind)
    _assert_refused(lambda: getattr(fimmia_hf, stage)(str(folder)).load_model(), folder)


def test_pickled_adapter_refused(tiny_model, tmp_path: Path, no_unpickling: None) -> None:
    """A PEFT adapter saved as `adapter_model.bin` is refused before the base model even loads."""
    from fimmia_hf import TargetScorer

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": tiny_model("text-lm")}))
    torch.save({"w": torch.zeros(1)}, adapter / "adapter_model.bin")
    _assert_refused(lambda: TargetScorer(str(adapter)).load_model(), adapter)


def test_pickled_dense_module_refused(tiny_model, tmp_path: Path, no_unpickling: None) -> None:
    """A sentence-transformers Dense module holding only `pytorch_model.bin` gets the same refusal."""
    from fimmia_hf.embeddings.sentence_transformers_folder import load_dense

    dense = tmp_path / "st" / "2_Dense"
    dense.mkdir(parents=True)
    (dense / "config.json").write_text(json.dumps({"in_features": 2, "out_features": 2}))
    torch.save({"linear.weight": torch.zeros(2, 2)}, dense / "pytorch_model.bin")
    _assert_refused(lambda: load_dense(tmp_path / "st", "2_Dense", None), dense)


def test_safetensors_beside_pickles_loads(tmp_path: Path, no_unpickling: None) -> None:
    """Allowed on purpose: a folder holding safetensors weights loads them and ignores any pickles beside them."""
    model = FiMMIAForMembershipInference(FiMMIAConfig(embedding_dim=4, projection_dim=4, hidden_sizes=[4]))
    model.save_pretrained(tmp_path)
    torch.save({"junk": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    loaded = FiMMIAForMembershipInference.from_pretrained(tmp_path)
    assert torch.equal(loaded.attack_encoding[-1].weight, model.attack_encoding[-1].weight)


def test_cli_refusal_is_one_line(pickled_detector: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from fimmia_hf.cli import main
    from fimmia_hf.testing import synthetic_features

    synthetic_features(4, k=2, dim=4).to_parquet(tmp_path / "scored.parquet")
    assert main(["predict", "--model", str(pickled_detector), "--data", str(tmp_path / "scored.parquet"),
                 "--out", str(tmp_path / "pred.parquet")]) == 2
    assert f"fimmia-hf predict: error: {pickled_detector}: the weights are pickles" in capsys.readouterr().err

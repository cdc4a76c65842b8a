"""The Stage base: cache hits skip the work, interrupted runs resume, fingerprints track inputs."""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest

from fimmia_hf.stage import Stage, folder_hash, model_fingerprint


class Upper(Stage):
    name = "upper"
    batch_size = 2
    chunk_size = 4

    def __init__(self, suffix: str = "", fail_at: str | None = None) -> None:
        self.suffix, self.fail_at, self.calls = suffix, fail_at, 0

    def fingerprint_inputs(self) -> dict:
        return {"suffix": self.suffix}

    def process(self, batch: dict[str, list]) -> dict[str, list]:
        if self.fail_at in batch["input"]:
            raise KeyboardInterrupt  # a run stopped half-way
        self.calls += 1
        return {"upper": [t.upper() + self.suffix for t in batch["input"]]}


@pytest.fixture
def ds() -> datasets.Dataset:
    return datasets.Dataset.from_dict({"input": [f"text {i}" for i in range(10)]})


def test_rerun_reads_the_cache(ds: datasets.Dataset, tmp_path: Path) -> None:
    first = Upper().apply(ds, cache_dir=tmp_path)
    assert first["upper"][3] == "TEXT 3"
    again = Upper()
    assert again.apply(ds, cache_dir=tmp_path)["upper"] == first["upper"]
    assert again.calls == 0
    changed = Upper(suffix="!")
    assert changed.apply(ds, cache_dir=tmp_path)["upper"][0] == "TEXT 0!"
    assert changed.calls > 0


def test_interrupted_run_resumes_from_finished_chunks(ds: datasets.Dataset, tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt):
        Upper(fail_at="text 9").apply(ds, cache_dir=tmp_path)  # chunks [0-3] and [4-7] finished
    resumed = Upper()
    out = resumed.apply(ds, cache_dir=tmp_path)
    assert out["upper"] == [f"TEXT {i}" for i in range(10)]
    assert resumed.calls == 1  # only the last chunk (rows 8-9, one batch) was computed


def test_model_fingerprint_follows_folder_content(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"abc")
    before = model_fingerprint(str(tmp_path))
    assert before == model_fingerprint(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"abd")
    assert model_fingerprint(str(tmp_path)) != before
    assert folder_hash(tmp_path) in model_fingerprint(str(tmp_path))
    assert model_fingerprint("org/model", revision="v1") == "hub:org/model@v1"

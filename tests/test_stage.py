"""The Stage base: declared fingerprints, media content in the input fingerprint, explicit context;
and the four cache defects of issue 16, which a real stage must not show."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest

from fimmia_hf import ModalityEmbedder, TextEmbedder, load_samples
from fimmia_hf.stage import Stage, StageContext, folder_hash, input_fingerprint, model_fingerprint
from fimmia_hf.testing import make_synthetic_samples


class Weights:
    """Stands for a model: `datasets` must never pickle it (to hash it, as it would a transform's arguments)."""

    pickled = 0

    def __reduce__(self):
        Weights.pickled += 1
        return (Weights, ())


class Upper(Stage):
    name = "upper"
    settings = ("suffix",)
    map_batch_size = 2
    chunk_size = 4

    def __init__(self, suffix: str = "", note: str = "") -> None:
        self.suffix, self.note = suffix, note  # `note` is not declared: it must not change the fingerprint
        self.weights = Weights()
        self.seen: list[tuple[list[int], str]] = []

    def process(self, batch: dict[str, list], context: StageContext) -> dict[str, list]:
        self.seen.append((list(context.rows), context.where(batch, 0)))
        return {"upper": [t.upper() + self.suffix for t in batch["input"]]}


@pytest.fixture
def ds() -> datasets.Dataset:
    return datasets.Dataset.from_dict({"sample_id": [f"s{i}" for i in range(10)], "input": [f"text {i}" for i in range(10)]})


def test_only_declared_settings_enter_the_fingerprint(ds: datasets.Dataset, tmp_path: Path) -> None:
    first = Upper().apply(ds, cache_dir=tmp_path)
    assert first["upper"][3] == "TEXT 3"
    undeclared = Upper(note="speed only")
    assert undeclared.apply(ds, cache_dir=tmp_path)["upper"] == first["upper"] and undeclared.seen == []
    declared = Upper(suffix="!")
    assert declared.apply(ds, cache_dir=tmp_path)["upper"][0] == "TEXT 0!"
    assert Weights.pickled == 0


def test_process_gets_the_dataset_rows_of_each_batch(ds: datasets.Dataset, tmp_path: Path) -> None:
    stage = Upper()
    stage.apply(ds, cache_dir=tmp_path, map_batch_size=3)  # chunks [0-3], [4-7], [8-9]; batches of 3 within
    assert [rows for rows, _ in stage.seen] == [[0, 1, 2], [3], [4, 5, 6], [7], [8, 9]]
    assert stage.seen[2][1] == "row 5 (sample_id 's4')"  # numbered from 1, as load_samples errors are
    with pytest.raises(TypeError, match="map_batch_size"):  # one name per idea: rows per map batch
        stage.apply(ds, cache_dir=tmp_path, batch_size=3)


def test_input_fingerprint_reads_the_files_a_row_names(tmp_path: Path) -> None:
    image, other = tmp_path / "a.png", tmp_path / "b.png"
    image.write_bytes(b"first")
    other.write_bytes(b"other")
    paths = datasets.Dataset.from_dict({"image": [str(image)], "media_neighbors": [[str(other)]]})
    as_struct = datasets.Dataset.from_dict({"image": [{"path": str(image), "bytes": None}]})
    before = [input_fingerprint(paths), input_fingerprint(as_struct)]
    image.write_bytes(b"second")
    assert input_fingerprint(paths) != before[0] and input_fingerprint(as_struct) != before[1]
    changed = input_fingerprint(paths)
    other.write_bytes(b"a neighbour changed")
    assert input_fingerprint(paths) != changed
    text_only = datasets.Dataset.from_dict({"input": ["q"]})
    assert input_fingerprint(text_only) == text_only._fingerprint


def test_model_fingerprint_follows_folder_content(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"abc")
    before = model_fingerprint(str(tmp_path))
    assert before == model_fingerprint(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"abd")
    assert model_fingerprint(str(tmp_path)) != before
    assert folder_hash(tmp_path) in model_fingerprint(str(tmp_path))
    assert model_fingerprint("org/model", revision="v1") == "hub:org/model@v1"


# -- the four defects of issue 16 (tests written against the public API of both layouts) -------------


def _ten_rows() -> datasets.Dataset:
    return datasets.Dataset.from_dict({
        "sample_id": [f"s{i}" for i in range(10)],
        "input": [f"question number {i}?" for i in range(10)],
        "answer": ["A"] * 10,
    })


def test_another_chunk_size_keeps_every_row(tiny_model, tmp_path: Path) -> None:
    """Chunk files named without their row range handed back 8 of these 10 rows."""
    ds = _ten_rows()
    first = TextEmbedder(tiny_model("text-encoder"), device="cpu").apply(ds, cache_dir=tmp_path, chunk_size=4)
    again = TextEmbedder(tiny_model("text-encoder"), device="cpu").apply(ds, cache_dir=tmp_path, chunk_size=6)
    assert again["sample_id"] == ds["sample_id"]
    np.testing.assert_allclose(again["embedding"], first["embedding"], atol=1e-6)


def test_an_overwritten_image_is_embedded_anew(tiny_model, tmp_path: Path) -> None:
    """The input fingerprint covered the media path only: the old image's vector came back."""
    table = make_synthetic_samples(tmp_path / "samples", modality="image", n=2)
    embed = lambda cache: ModalityEmbedder(tiny_model("image-encoder"), device="cpu").apply(  # noqa: E731
        load_samples(table), cache_dir=tmp_path / cache)["media_embedding"]
    before = embed("cache")
    first, second = load_samples(table)["image"]
    shutil.copyfile(second, first)  # the same file name, another picture
    after, fresh = embed("cache"), embed("fresh")
    np.testing.assert_allclose(after, fresh, atol=1e-6)
    assert not np.allclose(after[0], before[0], atol=1e-3)


def test_a_damaged_chunk_is_recomputed_with_a_warning_naming_it(tiny_model, tmp_path: Path) -> None:
    """A chunk cut in half (disk full, a crash while copying) made the rerun die in pyarrow."""
    ds = _ten_rows()
    first = TextEmbedder(tiny_model("text-encoder"), device="cpu").apply(ds, cache_dir=tmp_path, chunk_size=4)
    expected = np.array(first["embedding"])  # read before the damage: `first` maps the chunk files
    chunk = sorted(tmp_path.glob("*.arrow"))[1]
    chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])
    with pytest.warns(UserWarning, match=re.escape(str(chunk))):
        again = TextEmbedder(tiny_model("text-encoder"), device="cpu").apply(ds, cache_dir=tmp_path, chunk_size=4)
    np.testing.assert_allclose(again["embedding"], expected, atol=1e-6)
    assert chunk.is_file()  # written again, whole


def test_unwritable_cache_fails_before_any_row_is_computed(tmp_path) -> None:
    from fimmia_hf import NeighborGenerator

    (tmp_path / "a_file").write_text("")
    ds = datasets.Dataset.from_dict({"sample_id": ["a"], "input": ["one two three four"], "answer": ["A"]})
    with pytest.raises(OSError, match=r"cannot write the stage cache .*a_file.*set FIMMIA_HF_CACHE to a writable folder"):
        NeighborGenerator(ops=("delete",), num_neighbors=2).apply(ds, cache_dir=tmp_path / "a_file" / "cache")

"""The stage contract, checked on every stage with tiny models and image samples.

A cache hit never loads the model; an interrupted run resumes at the first missing chunk; another
chunk size, an overwritten media file or a damaged chunk file never hands back wrong rows; and batch
sizes (rows per map batch, items per forward) never change the results.
"""

from __future__ import annotations

import functools
import math
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import pytest

from fimmia_hf import ModalityEmbedder, NeighborGenerator, TargetScorer, TextEmbedder, load_samples
from fimmia_hf.stage import Stage, file_hash
from fimmia_hf.testing import make_synthetic_samples

ROWS, CHUNK = 4, 2  # two chunks: rows 0-1 and 2-3

# each stage over its tiny model (loaded once per module, so the runs measure the stages, not loading)
STAGES: dict[str, Callable[..., Stage]] = {
    "neighbors": lambda loaded, **kw: NeighborGenerator(
        **loaded("masked-lm"), num_neighbors=2, media_perturbation=True, device="cpu", **kw),
    "text-embeddings": lambda loaded, **kw: TextEmbedder(**loaded("text-encoder"), device="cpu", **kw),
    "media-embeddings": lambda loaded, **kw: ModalityEmbedder(**loaded("image-encoder"), device="cpu", **kw),
    "score": lambda loaded, **kw: TargetScorer(**loaded("image-text"), device="cpu", **kw),
}


@dataclass
class Baseline:
    """One stage's first run: how to make the stage, its input, cache folder and output values."""

    make: Callable[..., Stage]
    ds: datasets.Dataset
    cache: Path
    values: dict[str, list]

    def apply(self, stage: Stage | None = None, *, cache: Path | None = None, **kwargs: Any) -> dict[str, list]:
        out = (stage or self.make()).apply(self.ds, cache_dir=cache or self.cache, **{"chunk_size": CHUNK, **kwargs})
        return _values(out)


def _values(ds: datasets.Dataset) -> dict[str, list]:
    """Every column as plain values; files are named by their content (perturbed media live in each cache)."""

    def plain(value: Any) -> Any:
        if isinstance(value, list):
            return [plain(v) for v in value]
        if isinstance(value, str) and os.path.isfile(value):
            return "file:" + file_hash(value)
        return value

    return {column: plain(values) for column, values in ds.with_format(None)[:].items()}


def assert_same(got: Any, expected: Any, where: str = "") -> None:
    """Equal values; floats within 1e-4 (NaN equals NaN), as batch sizes may reorder float sums."""
    if isinstance(expected, dict):
        assert list(got) == list(expected), where
        for key in expected:
            assert_same(got[key], expected[key], f"{where}{key}")
    elif isinstance(expected, list):
        assert isinstance(got, list) and len(got) == len(expected), where
        for i, (a, b) in enumerate(zip(got, expected)):
            assert_same(a, b, f"{where}[{i}]")
    elif isinstance(expected, float):
        assert math.isclose(got, expected, rel_tol=1e-4, abs_tol=1e-4) or (math.isnan(got) and math.isnan(expected)), where
    else:
        assert got == expected, where


def _refuse_to_load(monkeypatch: pytest.MonkeyPatch, stage_class: type[Stage]) -> None:
    def refuse(self: Stage) -> Any:
        raise AssertionError(f"{type(self).__name__} loaded its model")

    monkeypatch.setattr(stage_class, "load_model", refuse)


def _masked_lm() -> dict[str, Any]:
    """A tiny BERT-style infiller, held in memory: one forward fills a batch (a T5 `generate` takes many)."""
    import torch
    from transformers import RobertaConfig, RobertaForMaskedLM

    from fimmia_hf.testing import train_tokenizer

    tokenizer = train_tokenizer("roberta", vocab_size=400)
    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, max_position_embeddings=514, pad_token_id=tokenizer.pad_token_id)
    return {"model": RobertaForMaskedLM(config).eval(), "tokenizer": tokenizer}


@pytest.fixture(scope="module")
def loaded(tiny_model) -> Callable[[str], dict[str, Any]]:
    """`loaded(kind)` -> the stage arguments `model` and `tokenizer` or `processor`, each loaded once."""
    from transformers import AutoModel, AutoProcessor, AutoTokenizer

    from fimmia_hf.scoring import load_target

    def load(kind: str) -> dict[str, Any]:
        if kind == "masked-lm":
            return _masked_lm()
        path = tiny_model(kind)
        if kind == "image-text":
            return dict(zip(("model", "processor"), load_target(path)))
        if kind == "image-encoder":
            return {"model": AutoModel.from_pretrained(path), "processor": AutoProcessor.from_pretrained(path)}
        return {"model": AutoModel.from_pretrained(path), "tokenizer": AutoTokenizer.from_pretrained(path)}

    return functools.cache(load)


@pytest.fixture(scope="module", params=list(STAGES))
def baseline(request: pytest.FixtureRequest, loaded, tmp_path_factory: pytest.TempPathFactory) -> Baseline:
    root = tmp_path_factory.mktemp(request.param)
    make = functools.partial(STAGES[request.param], loaded)
    ds = load_samples(make_synthetic_samples(root / "samples", modality="image", n=ROWS))
    if not isinstance(make(), NeighborGenerator):
        ds = ds.add_column("neighbors", [[t.replace("?", "? ok", 1)] for t in ds["input"]])
    out = make().apply(ds, cache_dir=root / "cache", chunk_size=CHUNK)
    assert len(out) == ROWS
    return Baseline(make, ds, root / "cache", _values(out))


def test_a_cache_hit_never_loads_the_model(baseline: Baseline, monkeypatch: pytest.MonkeyPatch) -> None:
    stage = baseline.make()
    _refuse_to_load(monkeypatch, type(stage))
    assert_same(baseline.apply(stage), baseline.values)


def test_an_interrupted_run_resumes_at_the_first_missing_chunk(baseline: Baseline, tmp_path: Path) -> None:
    stopped, resumed = baseline.make(), baseline.make()
    real_process = stopped.process

    def stop_in_the_second_chunk(batch: dict, context: Any) -> dict:
        if context.rows[0] >= CHUNK:
            raise KeyboardInterrupt  # a run killed half-way
        return real_process(batch, context)

    stopped.process = stop_in_the_second_chunk
    with pytest.raises(KeyboardInterrupt):
        baseline.apply(stopped, cache=tmp_path)
    rows_done: list[int] = []
    real_resumed = resumed.process
    resumed.process = lambda batch, context: rows_done.extend(context.rows) or real_resumed(batch, context)
    assert_same(baseline.apply(resumed, cache=tmp_path), baseline.values)
    assert rows_done == list(range(CHUNK, ROWS))  # only the unfinished chunk ran again


def test_another_chunk_size_gives_the_same_rows(baseline: Baseline) -> None:
    assert_same(baseline.apply(chunk_size=CHUNK + 1), baseline.values)


def test_a_damaged_chunk_is_recomputed_with_a_warning(baseline: Baseline, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(baseline.cache, cache)
    fingerprint = baseline.make().fingerprint(baseline.ds)
    chunk = cache / f"{fingerprint}-0-{CHUNK}.arrow"
    chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 3])
    with pytest.warns(UserWarning, match=re.escape(str(chunk))):
        assert_same(baseline.apply(cache=cache), baseline.values)


def test_batch_sizes_do_not_change_the_results(baseline: Baseline, tmp_path: Path) -> None:
    one_by_one = baseline.make(model_batch_size=1)
    assert_same(baseline.apply(one_by_one, cache=tmp_path, map_batch_size=1), baseline.values)


def test_an_overwritten_media_file_is_read_again(baseline: Baseline, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = baseline.ds["image"][:2]
    original = Path(first).read_bytes()
    shutil.copyfile(second, first)  # the same file name, another picture
    try:
        with monkeypatch.context() as patch:
            _refuse_to_load(patch, type(baseline.make()))
            with pytest.raises(AssertionError, match="loaded its model"):  # not read back from the cache
                baseline.apply()
        assert_same(baseline.apply(), baseline.apply(cache=tmp_path))  # what a fresh cache computes
    finally:
        Path(first).write_bytes(original)  # the same content is the same input again
    assert_same(baseline.apply(), baseline.values)

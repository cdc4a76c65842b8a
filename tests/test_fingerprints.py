"""Fingerprint completeness: every stage parameter that can change a result changes the stage's fingerprint.

A parameter left out of `settings` (or `model_references`) makes a rerun with another value read the old
rows back from the cache, silently. So every `__init__` parameter of every stage is listed here, either with
another value that must change the fingerprint, or in `SPEED_ONLY` with the reason results do not depend
on it; a new parameter fails `test_every_parameter_is_fingerprinted_or_explained` until it is classified.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import datasets
import pytest

from fimmia_hf import ModalityEmbedder, NeighborGenerator, TargetScorer, TextEmbedder
from fimmia_hf.neighbors import MediaPerturbation
from fimmia_hf.stage import Stage

SPEED_ONLY = {
    "model_batch_size": "items per forward; test_stage_contract checks batch sizes never change results",
    "prefix_reuse": "KV-cache sharing is exact; test_scoring checks it against a plain forward",
    "device": "where the model runs; what it changes (the dtype 'auto' picks) is fingerprinted as resolved_dtype",
    "device_map": "how the weights are placed on devices, not what they compute",
}


@dataclass(frozen=True)
class Case:
    """A stage made with hub ids (nothing loads) and, per parameter, a value other than the one `make` uses."""

    make: Callable[..., Stage]
    changes: dict[str, Any]


CASES = {
    "neighbors": Case(
        lambda **kw: NeighborGenerator(**{"model": "org/t5", "device": "cpu", **kw}),
        {
            "model": "org/other-t5", "tokenizer": "org/tokenizer", "revision": "v2", "num_neighbors": 5,
            "ops": ("delete", "swap"), "mask_ratio": 0.2, "min_masks": 2, "max_masks": 10, "max_text_len": 100,
            "seed": 1, "protected": [r"\d+"], "protect_template": True, "template": {"a": ["Answer with a letter."]},
            "media_perturbation": MediaPerturbation(max_rotation=10.0),
            "infill_style": "mlm", "prefix": "fill: ", "sentinel": "<M{i}>", "eos_token": "</s>",
            "dtype": "bfloat16", "column": "answer",
        },
    ),
    "text-embeddings": Case(
        lambda **kw: TextEmbedder(**{"model": "org/encoder", "device": "cpu", **kw}),
        {
            "model": "org/other-encoder", "tokenizer": "org/tokenizer", "revision": "v2", "pooling": "cls",
            "normalize": False, "prefix": "query: ", "max_length": 16, "text_template": "{text}", "dtype": "float16",
        },
    ),
    "media-embeddings": Case(
        lambda **kw: ModalityEmbedder(**{"model": "org/clip", "device": "cpu", **kw}),
        {
            "model": "org/other-clip", "processor": "org/processor", "revision": "v2", "modality": "image",
            "normalize": False, "num_frames": 4, "dtype": "float16",
        },
    ),
    "score": Case(
        lambda **kw: TargetScorer(**{"model": "org/vlm", "device": "cpu", **kw}),
        {
            "model": "org/other-vlm", "processor": "org/processor", "revision": "v2", "name": "base",
            "answer_only": False, "dtype": "bfloat16", "max_length": 64, "token_stats": "all",
            "include_closing_tokens": True, "on_error": "skip", "system_prompt": "Be brief.", "num_frames": 4,
        },
    ),
}
SETTINGS = [(stage, name, value) for stage, case in CASES.items() for name, value in case.changes.items()]


@pytest.fixture(scope="module")
def ds() -> datasets.Dataset:
    return datasets.Dataset.from_dict({"sample_id": ["s0"], "input": ["What is drawn?"], "answer": ["A"]})


def _parameters(stage: Stage) -> set[str]:
    return set(inspect.signature(type(stage).__init__).parameters) - {"self"}


@pytest.mark.parametrize("stage", list(CASES))
def test_every_parameter_is_fingerprinted_or_explained(stage: str) -> None:
    case = CASES[stage]
    parameters = _parameters(case.make())
    unexplained = parameters - set(case.changes) - set(SPEED_ONLY)
    assert not unexplained, (f"{stage}: new parameter(s) {sorted(unexplained)}: declare them in `settings` and give "
                             f"another value in CASES, or say in SPEED_ONLY why results do not depend on them")
    assert set(case.changes) <= parameters, f"{stage}: CASES lists parameters the stage no longer takes"


@pytest.mark.parametrize(("stage", "name", "value"), SETTINGS, ids=[f"{s}-{n}" for s, n, _ in SETTINGS])
def test_changing_a_setting_changes_the_fingerprint(stage: str, name: str, value: Any, ds: datasets.Dataset) -> None:
    make = CASES[stage].make
    assert make(**{name: value}).fingerprint(ds) != make().fingerprint(ds), (
        f"{stage}: {name}={value!r} leaves the fingerprint unchanged, so a rerun reads the old rows from the cache")


@pytest.mark.parametrize("stage", list(CASES))
def test_every_declared_setting_is_exercised(stage: str) -> None:
    """Each name in `settings` is moved by some parameter above (none is dead, none goes untested)."""
    case = CASES[stage]
    base = case.make()
    moved = {setting for name, value in case.changes.items() for setting in base.settings + base.model_references
             if repr(getattr(case.make(**{name: value}), setting)) != repr(getattr(base, setting))}
    assert moved == set(base.settings + base.model_references)


@pytest.mark.parametrize("stage", list(CASES))
def test_speed_only_parameters_keep_the_fingerprint(stage: str, ds: datasets.Dataset) -> None:
    make = CASES[stage].make
    for name, value in (("model_batch_size", 3), ("prefix_reuse", False)):
        if name in _parameters(make()):
            assert make(**{name: value}).fingerprint(ds) == make().fingerprint(ds), name

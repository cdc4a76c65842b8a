"""`fimmia-hf bench neighbors`: NeighborGenerator's `fill` against the original's one-word-per-`generate` loop."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from ..neighbors import NeighborGenerator
from ..neighbors.words import has_letter
from ..stage import resolve_device

_BENCH_WORDS = (
    "the quick brown fox jumps over a lazy dog while seven red birds sing near an old stone bridge "
    "and children play with green kites in the wide summer field beside quiet blue water"
).split()


def _reference_fill(model: Any, tokenizer: Any, text: str, count: int, rng: np.random.Generator) -> tuple[str, int]:
    """The original's substitution: one random word masked and filled per `generate` call, sequentially."""
    import torch

    calls = 0
    for _ in range(count):
        tokens = text.split()
        candidates = [i for i, w in enumerate(tokens) if has_letter(w)]
        if not candidates:
            break
        i = int(rng.choice(candidates))
        word = tokens[i]
        tokens[i] = "<extra_id_0>"
        encoded = tokenizer(" ".join(tokens), return_tensors="pt").to(model.device)
        with torch.inference_mode():
            out = model.generate(**encoded, max_length=len(tokenizer.encode(word)) + 5, do_sample=False, num_beams=1)
        calls += 1
        decoded = tokenizer.decode(out[0][2:], skip_special_tokens=False).split("<extra_id_1>")[0]
        fill = " ".join(decoded.replace("</s>", " ").replace("<pad>", " ").split()) or word
        text = " ".join(tokens[:i] + [fill] + tokens[i + 1 :])
    return text, calls


def benchmark(
    n_samples: int = 8,
    *,
    model: str | os.PathLike | None = None,
    words: int = 80,
    neighbors_per_sample: int = 6,
    batch_size: int = 48,
    device: str | None = None,
) -> dict[str, Any]:
    """Time this generator's `fill` against the original's one-word-per-`generate` loop.

    Same model (a tiny T5 built offline unless `model` is given), same samples (`n_samples` prompts
    of `words` words), `neighbors_per_sample` fill neighbours each (the original's 6); `batch_size`
    sequences per `generate` call (48: all 8 x 6 neighbours at once). Model loading is excluded
    from both timings. Returns
    `{"speedup", "generate_calls": [ours, reference], "seconds": [ours, reference], ...}`.
    """
    import tempfile

    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from ..configuration_fimmia import refuse_pickled_weights

    with tempfile.TemporaryDirectory() as tmp:
        if model is None:
            from ..testing import build_tiny

            model = build_tiny("t5-infill", Path(tmp) / "t5")
        device = str(resolve_device(device))
        refuse_pickled_weights(model)
        loaded = AutoModelForSeq2SeqLM.from_pretrained(model, use_safetensors=True).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(model)
        rng = np.random.default_rng(0)
        texts = [" ".join(rng.choice(_BENCH_WORDS, size=words).tolist()) for _ in range(n_samples)]
        batch = {"input": texts, "sample_id": [f"bench-{i}" for i in range(n_samples)]}

        generator = NeighborGenerator(
            loaded,
            tokenizer=tokenizer,
            ops=("fill",),
            num_neighbors=neighbors_per_sample,
            infill_style="t5",
            model_batch_size=batch_size,
        )
        context = generator.context(datasets.Dataset.from_dict(batch), Path(tmp) / "cache")
        start = time.perf_counter()
        ours = generator.process(batch, context)
        ours_seconds = time.perf_counter() - start

        mask_count = generator.masks_per_neighbor(texts[0])
        start, reference_calls = time.perf_counter(), 0
        for text in texts:
            for k in range(neighbors_per_sample):
                _, calls = _reference_fill(loaded, tokenizer, text, mask_count, np.random.default_rng(k))
                reference_calls += calls
        reference_seconds = time.perf_counter() - start

    return {
        "speedup": reference_seconds / ours_seconds,
        "generate_calls": [generator.model_calls, reference_calls],
        "seconds": [ours_seconds, reference_seconds],
        "samples": n_samples,
        "words_per_sample": words,
        "masks_per_neighbor": mask_count,
        "neighbors_made": int(sum(ours["num_neighbors"])),
        "batch_size": batch_size,
        "device": device,
    }

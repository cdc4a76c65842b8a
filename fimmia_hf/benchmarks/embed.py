"""`fimmia-hf bench embed`: TextEmbedder's length-sorted batches against one text at a time (the original's way)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..embeddings import TextEmbedder
from ..stage import resolve_device


def _synthetic_texts(n_samples: int, k: int, seed: int) -> list[str]:
    """MERA-style prompts (+ answers) and K word-dropped neighbours each: realistic, varied lengths."""
    import tempfile

    import pandas as pd

    from ..testing import make_synthetic_samples

    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as tmp:
        table = pd.read_csv(make_synthetic_samples(tmp, modality="text", n=n_samples, seed=seed, language="en"))
    texts = []
    for prompt, answer in zip(table["input"], table["answer"]):
        words = prompt.split(" ")
        texts.append(f"{prompt} {answer}")
        for _ in range(k):
            keep = rng.random(len(words)) > rng.uniform(0.05, 0.5)  # neighbours of different lengths
            texts.append(" ".join(w for w, kept in zip(words, keep) if kept) + f" {answer}")
    return list(dict.fromkeys(texts))  # distinct, so batching alone is measured


def benchmark(
    n_samples: int = 16,
    *,
    k: int = 4,
    model: Any = None,
    batch_size: int = 32,
    device: Any = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Time batched, length-sorted embedding against one text at a time (the original's way).

    Same texts, same model (default: the "small" offline text encoder from `fimmia_hf.testing`);
    returns `{"speedup": ..., ...}` with both timings and the largest
    difference between the two results.
    """
    import tempfile

    import torch

    texts = _synthetic_texts(n_samples, k, seed)
    with tempfile.TemporaryDirectory() as tmp:
        label = str(model) if isinstance(model, (str, os.PathLike)) else type(model).__name__
        if model is None:
            from ..testing import build_tiny

            model = build_tiny("text-encoder", Path(tmp) / "text-encoder", size="small")
            label = "fimmia_hf.testing text-encoder (small)"
        batched = TextEmbedder(model, model_batch_size=batch_size, device=device)
        single = TextEmbedder(model, model_batch_size=1, device=device)
        batched.embed_texts(texts[:batch_size])  # load and warm up both
        single.embed_texts(texts[:2])
        sync = torch.cuda.synchronize if resolve_device(device).type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        fast = batched.embed_texts(texts)
        sync()
        t1 = time.perf_counter()
        slow = np.stack([single.embed_texts([t])[0] for t in texts])
        sync()
        t2 = time.perf_counter()
        lengths = [len(ids) for ids in batched.loaded().tokenizer(texts)["input_ids"]]
    return {
        "speedup": round((t2 - t1) / (t1 - t0), 2),
        "batched_s": round(t1 - t0, 3),
        "one_by_one_s": round(t2 - t1, 3),
        "texts": len(texts),
        "samples": n_samples,
        "neighbors_per_sample": k,
        "batch_size": batch_size,
        "tokens_min_mean_max": [min(lengths), round(float(np.mean(lengths)), 1), max(lengths)],
        "dim": int(fast.shape[1]),
        "max_abs_diff": float(np.abs(fast - slow).max()),
        "model": label,
        "device": str(resolve_device(device)),
        "dtype": str(batched.resolved_dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
    }

"""`fimmia-hf bench score`: TargetScorer against the original's way of scoring.

The reference runs one forward per item (original and each neighbour), batch 1, with the image
decoded and encoded again every time; ours shares each sample's media and KV-cache prefix. Both
score the same samples with the same model; the losses must agree. The neighbours are the real
generator's one-word deletions, duplications and swaps, in MERA's layout also with `protect_template`
(the preamble and closing instruction every sample shares stay as they are).
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from ..media import load_media
from ..neighbors import NeighborGenerator
from ..scoring import TargetScorer, load_target, loss_of, score_plain


def _with_neighbors(table: datasets.Dataset, k: int, protect_template: bool, cache: Path) -> datasets.Dataset:
    """`table` with `k` one-word delete / duplicate / swap neighbours per sample (no model needed)."""
    generator = NeighborGenerator(ops=("delete", "duplicate", "swap"), num_neighbors=k, mask_ratio=0.0, min_masks=1,
                                  protect_template=protect_template)
    return generator.apply(table, cache_dir=cache)


def _time_both_ways(ds: datasets.Dataset, model: Any, processor: Any, batch_size: int, cache: Path) -> dict[str, float]:
    """Seconds and language-model input positions for this scorer and for the per-item reference loop."""
    scorer = TargetScorer(model, processor=processor, model_batch_size=batch_size, token_stats=False)
    loaded = scorer.loaded()
    engine, encoder = loaded.engine, loaded.encoder
    start = time.perf_counter()
    ours = scorer.apply(ds, cache_dir=cache)
    fast_s = time.perf_counter() - start
    start = time.perf_counter()
    reference, reference_tokens = [], 0
    for row in ds:
        for text in [row["input"], *row["neighbors"]]:
            image = load_media("image", row["image"])  # decoded and encoded again for every item
            encoding = encoder.encode(text, row["answer"], image, "image")
            reference.append(loss_of(score_plain(model, encoding)))
            reference_tokens += len(encoding.input_ids)
    slow_s = time.perf_counter() - start
    got = [x for row in ours for x in [row["loss"], *row["neighbor_losses"]]]
    return {"speedup": slow_s / fast_s, "token_ratio": reference_tokens / engine.tokens_run,
            "max_abs_diff": float(np.max(np.abs(np.asarray(got) - np.asarray(reference)))),
            "items": len(got), "items_per_s": len(got) / fast_s, "reference_items_per_s": len(got) / slow_s}


# The prompt format of MERA's multimodal tasks (an example from the original project's README, with
# an image instead of audio): a short preamble, the media, then the question, options and a long
# closing instruction, so most perturbed words come after the media.
_MERA_PROMPT = (
    "Помогите мне, пожалуйста.\n\nЕсть задача такого типа. Задача на понимание изображений.\n\n"
    "Имеется 1 изображение\n\nИзображение: <image>\n{question}\n\nОпределите ответ к задаче, учитывая, что "
    "первому из предложенных вариантов ответа присваивается литера А, второму литера B, третьему литера C и так "
    "далее по английскому алфавиту. В качестве ответа выведите, пожалуйста, литеру, соответствующую верному "
    "варианту ответа из предложенных. Финальный ответ прошу написать после слова ОТВЕТ (литера через пробел "
    "после этого слова)."
)
_QUESTIONS = (  # ruCLEVR-like questions, one per sample as in MERA (the synthetic samples all ask the same)
    "Сколько предметов находится слева от большого красного куба?",
    "Какого цвета маленький металлический шар за зелёным цилиндром?",
    "Есть ли здесь резиновый предмет того же размера, что и синий конус?",
    "Из какого материала сделан большой предмет справа от жёлтого цилиндра?",
    "Сколько цилиндров того же цвета, что и маленький куб?",
    "Какой формы серый предмет перед большим металлическим шаром?",
    "Одинакового ли размера фиолетовый куб и коричневый шар?",
    "Сколько блестящих предметов находится за маленьким зелёным кубом?",
)


def _mera(text: str) -> str:
    """The synthetic prompt's question and options in MERA's prompt."""
    return _MERA_PROMPT.format(question=text.split("<image>\n")[1].rsplit("\n", 1)[0])


_LAYOUTS = {  # name: (layout of "instruction <image> question options ОТВЕТ:", protect_template)
    "mera": (_mera, False),
    "media_first": (lambda t: "<image>\n" + t.replace("<image>\n", ""), False),
    "media_last": (lambda t: t.replace("<image>\n", "") + "\n<image>", False),
    "template": (_mera, True),  # MERA's layout, the lines all its samples share protected
}


def benchmark(
    n_samples: int = 4,
    *,
    k: int = 24,
    size: str = "small",
    batch_size: int = 25,
    image_size: tuple[int, int] = (480, 320),
    workdir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """TargetScorer vs the original's way (one forward per item, batch 1, media re-encoded each time).

    Builds the `size` image-text model and synthetic image samples (resized to `image_size`; the
    default is CLEVR's 480x320, as in MERA's ruCLEVR: 187 image tokens at Qwen2.5-VL's own pixel
    limit) with `k` word-perturbed neighbours and scores them both ways in three prompt
    layouts: MERA's (the headline `speedup`), media first (the whole prompt after the media: the
    most prefix to share) and media last (the original's video and audio layout: every perturbed
    word comes before the media, so the media tokens run again for each neighbour); and MERA's again
    with `protect_template` neighbours (`speedup_template`: only each sample's own lines change, all
    after the media). Returns the throughput ratios, the largest loss difference and the peak RSS.
    """
    import resource
    import tempfile

    from ..data import load_samples
    from ..testing import build_tiny, make_synthetic_samples

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(workdir or tmp)
        model_dir = build_tiny("image-text", root / f"image-text-{size}", size=size)
        ds = load_samples(make_synthetic_samples(root / "samples", modality="image", n=n_samples))
        for path in ds["image"]:
            load_media("image", path).resize(tuple(image_size)).save(path)
        model, processor = load_target(model_dir, dtype="float32")
        processor.image_processor.size["longest_edge"] = 12845056  # Qwen2.5-VL's own pixel limit, not the tiny one
        texts = [re.sub(r"(?m)^Вопрос:.*$", f"Вопрос: {_QUESTIONS[i % len(_QUESTIONS)]}", t, count=1)
                 for i, t in enumerate(ds["input"])]
        runs = {}
        for layout, (to_layout, protect_template) in _LAYOUTS.items():
            table = ds.remove_columns("input").add_column("input", [to_layout(t) for t in texts])
            table = _with_neighbors(table, k, protect_template, root / f"neighbors-{layout}")
            runs[layout] = _time_both_ways(table, model, processor, batch_size, root / f"cache-{layout}")

    mera = runs["mera"]
    return {
        "speedup": mera["speedup"],
        **{f"speedup_{name}": r["speedup"] for name, r in runs.items() if name != "mera"},
        "token_ratio": mera["token_ratio"],
        **{f"token_ratio_{name}": r["token_ratio"] for name, r in runs.items() if name != "mera"},
        "max_abs_diff": max(r["max_abs_diff"] for r in runs.values()),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "items": mera["items"],
        "fimmia_hf_items_per_s": mera["items_per_s"],
        "reference_items_per_s": mera["reference_items_per_s"],
        "n_samples": n_samples,
        "k": k,
        "size": size,
        "image_size": list(image_size),
    }

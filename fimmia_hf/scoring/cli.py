"""`fimmia-hf score`: losses and per-token statistics of a target model on a sample table."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np
from transformers.hf_argparser import HfArg

from ..columns import LOSS
from .scorer import TargetScorer, score_distributed


@dataclasses.dataclass
class ScoreArguments:
    """`fimmia-hf score`."""

    EXAMPLE: ClassVar[str] = "fimmia-hf score --data embedded --model Qwen/Qwen2.5-VL-3B-Instruct --name base --out scored"
    data: str = HfArg(help="sample table or dataset folder (with a 'neighbors' column to score neighbours)")
    model: str = HfArg(help="target model: Hub id, local folder or PEFT adapter folder")
    out: str = HfArg(help="output: dataset folder, or .parquet/.csv/.jsonl file")
    name: str | None = HfArg(default=None, help="label written to a 'model_name' column (e.g. base / finetuned)")
    revision: str | None = HfArg(default=None, help="model revision (Hub ids)")
    batch_size: int = HfArg(default=8, help="sequences per forward pass")
    on_error: str = HfArg(default="raise", metadata={"choices": ("raise", "skip")}, help="rows with unreadable media: "
                          "stop, or keep them with an 'error' column and NaN scores")
    token_stats: str = HfArg(default="original", metadata={"choices": ("none", "original", "all")},
                             help="per-token statistics for the original only, for neighbours too, or none")
    score_prompt: bool = HfArg(default=False, help="score every text token, not only the answer")
    include_closing_tokens: bool = HfArg(
        default=False, help="also score the template tokens that close the answer (as the original FiMMIA)")
    max_length: int | None = HfArg(default=None, help="truncate longer prompts from the left (never the answer)")
    dtype: str = HfArg(default="auto", help="model dtype: auto, bfloat16, float16, float32")
    device_map: str | None = HfArg(default=None, help="e.g. auto (single process only)")
    system_prompt: str | None = HfArg(default=None, help="system message added to every chat")
    num_frames: int = HfArg(default=8, help="video frames sampled per clip")
    media_root: str | None = HfArg(
        default=None, help="folder media paths are relative to (default: the table's folder)")
    cache_dir: str | None = HfArg(
        default=None, help="stage cache folder (default: $FIMMIA_HF_CACHE or the datasets cache)")


def run_score(args: ScoreArguments) -> int:
    """`fimmia-hf score`: load samples, score them (sharded under accelerate), save the table."""
    from ..data import load_samples, save_dataset

    ds = load_samples(args.data, media_root=args.media_root)
    stats: bool | str = {"none": False, "original": True, "all": "all"}[args.token_stats]
    scorer = TargetScorer(
        args.model,
        name=args.name,
        revision=args.revision,
        answer_only=not args.score_prompt,
        include_closing_tokens=args.include_closing_tokens,
        model_batch_size=args.batch_size,
        dtype=args.dtype,
        device_map=args.device_map,
        max_length=args.max_length,
        token_stats=stats,
        on_error=args.on_error,
        system_prompt=args.system_prompt,
        num_frames=args.num_frames,
    )
    result = score_distributed(scorer, ds, cache_dir=args.cache_dir)
    if result is not None:
        path = save_dataset(result, args.out, inputs=[args.data])
        losses = np.asarray(result[LOSS], dtype=float)
        print(f"scored {len(result)} samples -> {path} (mean loss {np.nanmean(losses):.4f})")
    return 0

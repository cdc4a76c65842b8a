"""`fimmia-hf score`: losses and per-token statistics of a target model on a sample table."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..columns import LOSS
from .scorer import TargetScorer, score_distributed


def add_score_arguments(parser: Any) -> None:
    """Arguments of `fimmia-hf score`."""
    parser.add_argument("--data", required=True, help="sample table or dataset folder (with a 'neighbors' column to score neighbours)")
    parser.add_argument("--model", required=True, help="target model: Hub id, local folder or PEFT adapter folder")
    parser.add_argument("--out", required=True, help="output: dataset folder, or .parquet/.csv/.jsonl file")
    parser.add_argument("--name", help="label written to a 'model_name' column (e.g. base / finetuned)")
    parser.add_argument("--revision", help="model revision (Hub ids)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default: 8)")
    parser.add_argument("--on-error", choices=("raise", "skip"), default="raise", help="rows with unreadable media: stop, or keep them with an 'error' column and NaN scores")
    parser.add_argument("--token-stats", choices=("none", "original", "all"), default="original", help="per-token statistics for the original only (default), for neighbours too, or none")
    parser.add_argument("--score-prompt", action="store_true", help="score every text token, not only the answer")
    parser.add_argument("--include-closing-tokens", action="store_true", help="also score the template tokens that close the answer (as the original FiMMIA)")
    parser.add_argument("--max-length", type=int, help="truncate longer prompts from the left (never the answer)")
    parser.add_argument("--dtype", default="auto", help="model dtype: auto, bfloat16, float16, float32")
    parser.add_argument("--device-map", help="e.g. auto (single process only)")
    parser.add_argument("--system-prompt", help="system message added to every chat")
    parser.add_argument("--num-frames", type=int, default=8, help="video frames sampled per clip (default: 8)")
    parser.add_argument("--media-root", help="folder media paths are relative to (default: the table's folder)")
    parser.add_argument("--cache-dir", help="stage cache folder (default: $FIMMIA_HF_CACHE or the datasets cache)")


def run_score(args: Any) -> int:
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

"""`fimmia-hf neighbors`: add K perturbed neighbours to every sample of a table."""

from __future__ import annotations

import argparse

from ..columns import MEDIA_COLUMNS, NUM_NEIGHBORS
from .generator import NeighborGenerator
from .infill import INFILL_STYLES
from .operations import OPS


def add_neighbors_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="sample table or dataset folder (see `fimmia-hf validate`)")
    parser.add_argument("--out", required=True, help="output: a save_to_disk folder, or .parquet/.jsonl/.csv")
    parser.add_argument("--model", help="infilling model for 'fill' (T5/FRED-T5/BERT id or folder)")
    parser.add_argument("--revision", help="model revision (Hub)")
    parser.add_argument("--num-neighbors", type=int, default=24, help="K neighbours per sample (default 24)")
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {','.join(OPS)}")
    parser.add_argument("--mask-ratio", type=float, default=0.1, help="share of words changed (default 0.1)")
    parser.add_argument("--min-masks", type=int, default=5)
    parser.add_argument("--max-masks", type=int, default=40)
    parser.add_argument("--max-text-len", type=int, default=4000, help="keep the last N characters (output rows only)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--protect", action="append", default=[], metavar="REGEX", help="extra protected pattern (repeatable)"
    )
    parser.add_argument("--media-perturbation", action="store_true", help="also write perturbed media per neighbour")
    parser.add_argument("--infill-style", default="auto", choices=["auto", *INFILL_STYLES])
    parser.add_argument("--prefix", help="text before the masked prompt (FRED-T5: <SC1>)")
    parser.add_argument("--column", default="input", help="text column to perturb (default input)")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per generate call (default 16)")
    parser.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if available)")
    parser.add_argument("--cache-dir", help="stage cache folder (default $FIMMIA_HF_CACHE/neighbors)")
    parser.add_argument("--modality", choices=[*MEDIA_COLUMNS, "text"], help="expected modality")
    parser.add_argument("--media-root", help="folder media paths are relative to (default: the table's folder)")


def run_neighbors(args: argparse.Namespace) -> int:
    from ..data import load_samples, save_dataset

    ds = load_samples(args.data, modality=args.modality, media_root=args.media_root)
    generator = NeighborGenerator(
        args.model,
        num_neighbors=args.num_neighbors,
        ops=[op.strip() for op in args.ops.split(",") if op.strip()],
        mask_ratio=args.mask_ratio,
        min_masks=args.min_masks,
        max_masks=args.max_masks,
        max_text_len=args.max_text_len,
        seed=args.seed,
        protected=args.protect,
        media_perturbation=args.media_perturbation,
        model_batch_size=args.batch_size,
        infill_style=args.infill_style,
        prefix=args.prefix,
        revision=args.revision,
        device=args.device,
        column=args.column,
    )
    out = generator.apply(ds, cache_dir=args.cache_dir)
    path = save_dataset(out, args.out, inputs=[args.data])
    counts = out[NUM_NEIGHBORS]
    short = sum(c < args.num_neighbors for c in counts)
    print(
        f"{len(out)} samples, {sum(counts)} neighbours (mean {sum(counts) / max(len(counts), 1):.1f}/sample; "
        f"{short} with fewer than {args.num_neighbors}) -> {path}"
    )
    return 0

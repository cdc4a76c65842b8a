"""`fimmia-hf neighbors`: add K perturbed neighbours to every sample of a table."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from transformers.hf_argparser import HfArg

from ..columns import MEDIA_COLUMNS, NUM_NEIGHBORS
from .generator import NeighborGenerator
from .infill import INFILL_STYLES
from .operations import OPS


@dataclasses.dataclass
class NeighborsArguments:
    """`fimmia-hf neighbors`."""

    EXAMPLE: ClassVar[str] = ("fimmia-hf neighbors --data samples.csv --model google-t5/t5-base "
                              "--num-neighbors 24 --out neighbors")
    data: str = HfArg(help="sample table or dataset folder (see `fimmia-hf validate`)")
    out: str = HfArg(help="output: a save_to_disk folder, or .parquet/.jsonl/.csv")
    model: str | None = HfArg(
        default=None, help="infilling model for 'fill' (T5/FRED-T5/BERT Hub id or folder)")
    revision: str | None = HfArg(default=None, help="model revision (Hub)")
    num_neighbors: int = HfArg(default=24, help="K neighbours per sample")
    ops: str = HfArg(default=",".join(OPS), help=f"comma-separated subset of {','.join(OPS)}")
    mask_ratio: float = HfArg(default=0.1, help="share of words changed")
    min_masks: int = HfArg(default=5, help="fewest words changed per neighbour")
    max_masks: int = HfArg(default=40, help="most words changed per neighbour")
    max_text_len: int = HfArg(default=4000, help="keep the last N characters (output rows only)")
    seed: int = HfArg(default=0, help="seed; with the sample's content it fixes its neighbours")
    protect: list[str] = HfArg(
        default_factory=list, help="extra protected patterns (regular expressions)", metadata={"metavar": "REGEX"})
    protect_template: float = HfArg(
        default=0.0, help="also protect the lines at least this share of a ds_name's samples contain (0: off)",
        metadata={"metavar": "SHARE"})
    media_perturbation: bool = HfArg(
        default=False, help="also write perturbed media per neighbour")
    infill_style: str = HfArg(
        default="auto", help="how masks are written for the infiller", metadata={"choices": ["auto", *INFILL_STYLES]})
    prefix: str | None = HfArg(default=None, help="text before the masked prompt (FRED-T5: <SC1>)")
    column: str = HfArg(default="input", help="text column to perturb")
    batch_size: int = HfArg(default=16, help="sequences per generate call")
    device: str | None = HfArg(default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    cache_dir: str | None = HfArg(
        default=None, help="stage cache folder (default $FIMMIA_HF_CACHE/neighbors)")
    modality: str | None = HfArg(
        default=None, help="expected modality", metadata={"choices": [*MEDIA_COLUMNS, "text"]})
    media_root: str | None = HfArg(
        default=None, help="folder media paths are relative to (default: the table's folder)")


def run_neighbors(args: NeighborsArguments) -> int:
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
        protect_template=args.protect_template or False,
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

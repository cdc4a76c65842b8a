"""`fimmia-hf embed`: add text and/or media embeddings to a sample table."""

from __future__ import annotations

import dataclasses
import json
from typing import ClassVar

from transformers.hf_argparser import HfArg

from ..columns import EMBEDDING, MEDIA_EMBEDDING
from .media import ModalityEmbedder
from .text import DEFAULT_TEXT_MODEL, DEFAULT_TEXT_TEMPLATE, TextEmbedder
from .vectors import POOLING_MODES


@dataclasses.dataclass
class EmbedArguments:
    """`fimmia-hf embed`."""

    EXAMPLE: ClassVar[str] = ("fimmia-hf embed --data neighbors --model intfloat/e5-mistral-7b-instruct "
                              "--media-model openai/clip-vit-base-patch32 --out embedded")
    data: str = HfArg(help="samples with neighbours (table file or save_to_disk folder)")
    out: str = HfArg(help="output: a save_to_disk folder, or .parquet / .jsonl")
    model: str = HfArg(default=DEFAULT_TEXT_MODEL, help=f"text embedding model: Hub id or folder (default: "
                       f"{DEFAULT_TEXT_MODEL}, the original's); 'none' skips text embeddings")
    media_model: str | None = HfArg(default=None, help="media embedding model (CLIP, SigLIP, CLAP, X-CLIP, any "
                                    "AutoModel); default: media is not embedded")
    batch_size: int | None = HfArg(default=None, help="texts (default 32) or media items (default 16) per forward")
    prefix: str = HfArg(default="", help="instruction prepended to every text (e5: 'Instruct: ...\\nQuery: ')")
    pooling: str = HfArg(default="auto", metadata={"choices": ("auto", *POOLING_MODES)}, help="text pooling (auto: "
                         "the sentence-transformers config, else last for decoders, mean otherwise)")
    template: str = HfArg(default=DEFAULT_TEXT_TEMPLATE,
                          help="what is embedded: {text} (input or neighbour), {answer}, {input}")
    max_length: int | None = HfArg(default=None, help="truncate texts to this many tokens")
    num_frames: int = HfArg(default=8, help="frames per video")
    media_root: str | None = HfArg(
        default=None, help="folder that media paths are relative to (default: the table's folder)")
    device: str | None = HfArg(default=None, help="cuda, cuda:1, cpu ... (default: cuda if available)")


def run_embed(args: EmbedArguments) -> int:
    """`fimmia-hf embed`: add text and/or media embeddings to a sample table and save it."""
    from ..data import load_samples, modality_of, save_dataset

    if str(args.model).lower() == "none" and not args.media_model:
        raise ValueError("nothing to embed: --model none and no --media-model")
    ds = load_samples(args.data, media_root=args.media_root)
    batch = {"model_batch_size": args.batch_size} if args.batch_size else {}
    if str(args.model).lower() != "none":
        ds = TextEmbedder(args.model, pooling=args.pooling, prefix=args.prefix, max_length=args.max_length,
                          text_template=args.template, device=args.device, **batch).apply(ds)
    if args.media_model:
        modality = modality_of(ds)
        if modality == "text":
            raise ValueError(f"{args.data}: --media-model given but the samples have no image/audio/video column")
        ds = ModalityEmbedder(args.media_model, modality=modality, num_frames=args.num_frames, device=args.device,
                              **batch).apply(ds)
    out = save_dataset(ds, args.out, inputs=[args.data])
    dims = {c: len(ds[0][c]) for c in (EMBEDDING, MEDIA_EMBEDDING) if c in ds.column_names and len(ds)}
    print(json.dumps({"rows": len(ds), "out": str(out), "dims": dims}))
    return 0

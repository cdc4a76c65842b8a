"""TextEmbedder: each sample's text and its neighbours' texts as vectors (`embedding`, `neighbor_embeddings`).

The original embedded one text at a time with e5-mistral. Here distinct texts are embedded once, in
batches of similar length (right-padded, so a batched vector equals the one-by-one vector), with any
`AutoModel` (encoder, decoder or encoder-decoder) or a sentence-transformers folder.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import datasets
import numpy as np

from ..columns import ANSWER, EMBEDDING, INPUT, NEIGHBOR_EMBEDDINGS, NEIGHBORS
from ..stage import Stage, StageContext, resolve_device, token_limit
from .sentence_transformers_folder import SentenceTransformerLayout, load_dense, read_sentence_transformers
from .vectors import POOLING_MODES, VECTOR, VECTORS, normalize, pool, resolve_dtype, to_float32

if TYPE_CHECKING:
    import torch

DEFAULT_TEXT_MODEL = "intfloat/e5-mistral-7b-instruct"
DEFAULT_TEXT_TEMPLATE = "{text} {answer}"


def _is_decoder_only(config: Any) -> bool:
    """True for causal LMs (last-token pooling suits them); BERT-likes have causal heads too, so exclude MLMs."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    if getattr(config, "is_encoder_decoder", False):
        return False
    model_type = getattr(config, "model_type", None)
    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


@dataclass
class LoadedTextModel:
    """The loaded encoder and everything read from its folder that shapes a vector."""

    encoder: Any
    tokenizer: Any
    device: torch.device
    pooling: tuple[str, ...]  # modes, concatenated in this order
    dense: Any  # sentence-transformers Dense layers, or None
    truncate_to: int | None
    prompt_tokens: int  # leading prefix tokens left out of the pooling (include_prompt=False)
    lower_case: bool
    forward_keys: set[str]


class TextEmbedder(Stage):
    """Embed each sample's text and its neighbours' texts (`embedding`, `neighbor_embeddings`).

    `model` is a Hub id, a local folder (plain transformers or sentence-transformers) or a loaded
    model (then pass `tokenizer` unless it can be loaded from the model's `name_or_path`).
    `pooling="auto"` takes the sentence-transformers config if there is one, else `last` for
    decoder-only models and `mean` otherwise. `text_template` says what is embedded: `{text}` is the
    input (or the neighbour), `{answer}` the answer, `{input}` always the original input; the default
    `"{text} {answer}"` is the original's. `prefix` is prepended to every text (e.g. e5-mistral's
    "Instruct: ...\\nQuery: "). Batches are right-padded whatever the tokenizer's padding side, so each
    real token keeps the position it has alone and a batched vector equals the one-by-one vector.
    `model_batch_size` texts go through each forward. Longer texts are cut at `max_length` tokens
    (default: the sentence-transformers `max_seq_length`, else the model's limit, see `token_limit`).
    """

    name: ClassVar[str] = "text-embeddings"
    version: ClassVar[str] = "3"  # 3: texts cut at the model's position limit when the tokenizer has none
    settings: ClassVar[tuple[str, ...]] = ("pooling", "normalize", "prefix", "max_length", "text_template",
                                           "resolved_dtype")
    model_references: ClassVar[tuple[str, ...]] = ("model", "tokenizer")
    map_batch_size: ClassVar[int] = 64  # rows whose texts are sorted by length together

    def __init__(
        self,
        model: Any = DEFAULT_TEXT_MODEL,
        *,
        pooling: str = "auto",
        normalize: bool = True,
        prefix: str = "",
        max_length: int | None = None,
        model_batch_size: int = 32,
        text_template: str = DEFAULT_TEXT_TEMPLATE,
        tokenizer: Any = None,
        revision: str | None = None,
        device: Any = None,
        dtype: Any = "auto",
    ) -> None:
        if pooling != "auto" and pooling not in POOLING_MODES:
            raise ValueError(f"unknown pooling {pooling!r}; expected 'auto' or one of {', '.join(POOLING_MODES)}")
        try:
            text_template.format(text="", answer="", input="")
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"text_template {text_template!r} may only use {{text}}, {{answer}} and {{input}}: {err}") from err
        if model_batch_size < 1:
            raise ValueError(f"model_batch_size must be >= 1, got {model_batch_size}")
        self.model, self.tokenizer, self.revision = model, tokenizer, revision
        self.pooling, self.normalize, self.prefix = pooling, normalize, prefix
        self.max_length, self.model_batch_size, self.text_template = max_length, model_batch_size, text_template
        self.device, self.dtype = device, dtype

    @property
    def resolved_dtype(self) -> torch.dtype:
        """The dtype the encoder runs in ("auto" depends on the device)."""
        return resolve_dtype(self.dtype, resolve_device(self.device))

    # -- the stage contract --------------------------------------------------------------------------

    def check(self, ds: datasets.Dataset) -> None:
        for column in (INPUT, ANSWER):
            if column not in ds.column_names:
                raise ValueError(f"TextEmbedder needs a {column!r} column; the dataset has {ds.column_names}")

    def features(self, ds: datasets.Dataset) -> datasets.Features:
        """Float32 vectors (`datasets` would infer float64 from the arrays' values)."""
        features = ds.features.copy()
        features[EMBEDDING] = VECTOR
        if NEIGHBORS in ds.column_names:
            features[NEIGHBOR_EMBEDDINGS] = VECTORS
        return features

    def process(self, batch: dict[str, list], context: StageContext) -> dict[str, list]:
        inputs, answers = batch[INPUT], batch[ANSWER]
        texts = [self.render(inputs[i], answers[i], inputs[i]) for i in range(len(inputs))]
        counts = []
        for i, neighbors in enumerate(batch.get(NEIGHBORS) or []):
            neighbors = neighbors or []
            texts.extend(self.render(nb, answers[i], inputs[i]) for nb in neighbors)
            counts.append(len(neighbors))
        vectors = self.embed_texts(texts)
        n = len(inputs)
        out: dict[str, list] = {EMBEDDING: list(vectors[:n])}
        if NEIGHBORS in batch:
            starts = np.cumsum([n, *counts])
            out[NEIGHBOR_EMBEDDINGS] = [vectors[a:b] for a, b in zip(starts[:-1], starts[1:])]
        return out

    def load_model(self) -> LoadedTextModel:
        import torch
        from transformers import AutoModel, AutoTokenizer

        from ..configuration_fimmia import refuse_pickled_weights

        device = resolve_device(self.device)
        if isinstance(self.model, (str, os.PathLike)):
            source = self.model
            layout = read_sentence_transformers(source, self.revision)
            sub = {"subfolder": layout.transformer_path} if layout and layout.transformer_path else {}
            refuse_pickled_weights(source, sub.get("subfolder", ""))
            model = AutoModel.from_pretrained(
                str(source), revision=self.revision, dtype=self.resolved_dtype, use_safetensors=True, **sub
            )
            tokenizer = self.tokenizer or AutoTokenizer.from_pretrained(str(source), revision=self.revision, **sub)
        else:
            model, source = self.model, getattr(self.model, "name_or_path", None)
            layout = read_sentence_transformers(source) if source and Path(source).is_dir() else None
            if self.tokenizer is None and not source:
                raise ValueError("a loaded model without name_or_path needs tokenizer=...")
            tokenizer = self.tokenizer or AutoTokenizer.from_pretrained(source)
        if tokenizer.pad_token_id is None:  # decoder tokenizers often have none; the mask hides pads anyway
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
            if tokenizer.pad_token_id is None:
                raise ValueError(f"the tokenizer of {self.model} has no pad, eos or unk token to pad with")
        model.eval().to(device)
        encoder = model.get_encoder() if getattr(model.config, "is_encoder_decoder", False) else model.base_model
        if self.pooling != "auto":
            modes: tuple[str, ...] = (self.pooling,)
        elif layout is not None and layout.pooling:
            modes = layout.pooling
        else:
            modes = ("last",) if _is_decoder_only(model.config) else ("mean",)
        dense = None
        if layout is not None and layout.dense_paths:
            dense = torch.nn.Sequential(*(load_dense(source, p, self.revision) for p in layout.dense_paths))
            dense = dense.to(device).eval()
        limit = self.max_length or (layout.max_seq_length if layout else None) or token_limit(model, tokenizer)
        return LoadedTextModel(
            encoder=encoder, tokenizer=tokenizer, device=device, pooling=modes, dense=dense, truncate_to=limit,
            prompt_tokens=self._prompt_tokens(tokenizer, layout),
            lower_case=layout is not None and layout.do_lower_case,
            forward_keys=set(inspect.signature(encoder.forward).parameters),
        )

    def _prompt_tokens(self, tokenizer: Any, layout: SentenceTransformerLayout | None) -> int:
        """How many leading tokens the prefix takes, when the folder pools without it (include_prompt=False)."""
        if layout is None or layout.include_prompt or not self.prefix:
            return 0
        ids = tokenizer(self.prefix)["input_ids"]
        special = set(tokenizer.all_special_ids)
        while ids and ids[-1] in special:  # the trailing eos/sep belongs to the text, not the prompt
            ids = ids[:-1]
        return len(ids)

    # -- embedding -------------------------------------------------------------------------------

    def render(self, text: str, answer: str | None, input: str | None = None) -> str:
        """The string embedded for one (text, answer) pair, before the prefix."""
        return self.text_template.format(text=text, answer="" if answer is None else answer,
                                          input=text if input is None else input)

    @property
    def pooling_modes(self) -> tuple[str, ...]:
        """The pooling actually used (loads the model on first access)."""
        return self.loaded().pooling

    def embed_texts(self, texts: list[str], *, progress: bool = False) -> np.ndarray:
        """Embed strings (the prefix is added here): `[len(texts), dim]` float32.

        Distinct strings are embedded once, in batches of similar length (longest first, so an
        out-of-memory error shows up at once rather than at the end).
        """
        import torch
        from tqdm.auto import tqdm

        loaded = self.loaded()
        tokenizer = loaded.tokenizer
        unique = list(dict.fromkeys(texts))
        if not unique:
            return np.zeros((0, 0), dtype=np.float32)
        prepared = [self.prefix + t for t in unique]
        if loaded.lower_case:
            prepared = [t.lower() for t in prepared]
        encoded = tokenizer(prepared, truncation=loaded.truncate_to is not None, max_length=loaded.truncate_to)
        keys = [k for k in ("input_ids", "token_type_ids") if k in encoded and k in loaded.forward_keys]
        order = sorted(range(len(unique)), key=lambda i: -len(encoded["input_ids"][i]))
        result: np.ndarray | None = None
        starts = range(0, len(order), self.model_batch_size)
        for start in tqdm(starts, desc="embedding texts", leave=False, disable=not progress or len(starts) < 2):
            rows = order[start:start + self.model_batch_size]
            width = max(len(encoded["input_ids"][i]) for i in rows)
            batch = {}
            for key in keys:
                fill = tokenizer.pad_token_id if key == "input_ids" else 0
                batch[key] = torch.tensor([encoded[key][i] + [fill] * (width - len(encoded[key][i])) for i in rows])
            mask = torch.tensor([[1] * len(encoded["input_ids"][i]) + [0] * (width - len(encoded["input_ids"][i]))
                                 for i in rows])
            with torch.inference_mode():
                hidden = loaded.encoder(**{k: v.to(loaded.device) for k, v in batch.items()},
                                        attention_mask=mask.to(loaded.device)).last_hidden_state
                pool_mask = mask.clone()
                if loaded.prompt_tokens:  # include_prompt=False: the instruction is not pooled
                    pool_mask[:, : loaded.prompt_tokens] = 0
                vectors = torch.cat([pool(hidden, pool_mask, mode) for mode in loaded.pooling], dim=-1)
                if loaded.dense is not None:
                    vectors = loaded.dense(vectors)
                if self.normalize:
                    vectors = normalize(vectors)
            vectors = to_float32(vectors)
            if result is None:
                result = np.empty((len(unique), vectors.shape[1]), dtype=np.float32)
            result[rows] = vectors
        index = {text: i for i, text in enumerate(unique)}
        return result[[index[t] for t in texts]]

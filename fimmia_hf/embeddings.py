"""Text and media embeddings as cached `datasets.map` stages.

FiMMIA's second feature family is the embedding shift between a sample and each of its neighbours
(`Δe_k = e'_k − e`, optionally `Δm_k = m'_k − m` for the media). The original embedded one text at a
time with e5-mistral and re-embedded the same media file K times; here both stages batch, sort texts
by length so padding is small, embed each distinct text or media item once per chunk, and store
float32 vectors in Arrow through the cached, resumable `Stage` machinery.

- `TextEmbedder`: any `AutoModel` (encoder, decoder or encoder-decoder), or a sentence-transformers
  folder whose pooling / dense / normalize modules are read from its config (no sentence-transformers
  dependency). Adds `embedding` and `neighbor_embeddings`.
- `ModalityEmbedder`: image / audio / video through `get_image_features`-style methods (CLIP, SigLIP,
  CLAP, X-CLIP, ...) or the mean of an `AutoModel`'s last hidden state. Adds `media_embedding` and
  `neighbor_media_embeddings`.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import datasets
import numpy as np
from datasets import Sequence, Value

from .media import MEDIA_COLUMNS, MediaError, load_media
from .stage import Stage, model_fingerprint

if TYPE_CHECKING:  # torch loads lazily: `import fimmia_hf` stays light
    import torch

DEFAULT_TEXT_MODEL = "intfloat/e5-mistral-7b-instruct"
DEFAULT_TEXT_TEMPLATE = "{text} {answer}"
POOLING_MODES = ("last", "mean", "cls", "max", "mean_sqrt_len", "weightedmean")
VECTOR = Sequence(Value("float32"))
VECTORS = Sequence(Sequence(Value("float32")))

# sentence-transformers Pooling config keys, in the order its Pooling module concatenates them
_ST_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "last",
}
_ST_POOLING_NAMES = {"cls": "cls", "max": "max", "mean": "mean", "mean_sqrt_len_tokens": "mean_sqrt_len",
                     "weightedmean": "weightedmean", "lasttoken": "last"}
_ST_ACTIVATIONS = ("Identity", "Tanh", "ReLU", "GELU", "Sigmoid", "SiLU")


# ------------------------------------------------------------------------------------------------
# devices, dtypes, pooling
# ------------------------------------------------------------------------------------------------


def _resolve_device(device: Any) -> torch.device:
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _resolve_dtype(dtype: Any, device: torch.device) -> torch.dtype:
    """"auto": float32 on CPU (exact, and CPU half precision is slow), bfloat16 on a GPU that has it."""
    import torch

    if dtype is None or dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype, None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}; use e.g. 'float32', 'bfloat16', 'float16' or 'auto'")
        return resolved
    return dtype


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Pool `[batch, seq, dim]` hidden states over the positions where `mask` is 1.

    Every mode finds the real tokens from the mask, never from the row length, so it is correct
    whether the batch was padded on the left or on the right.
    """
    import torch

    hidden = hidden.float()
    m = mask.to(hidden.device).float()
    if mode == "cls":  # the first real token
        return hidden[torch.arange(len(hidden), device=hidden.device), m.argmax(dim=1)]
    if mode == "last":  # the last real token
        positions = torch.arange(m.shape[1], device=hidden.device).float()
        return hidden[torch.arange(len(hidden), device=hidden.device), (m * positions).argmax(dim=1)]
    m3 = m.unsqueeze(-1)
    if mode == "max":
        return hidden.masked_fill(m3 == 0, torch.finfo(hidden.dtype).min).max(dim=1).values
    if mode == "weightedmean":  # position weights 1, 2, ... counted from the first real token
        weights = (m.cumsum(dim=1) * m).unsqueeze(-1)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
    summed, count = (hidden * m3).sum(dim=1), m3.sum(dim=1).clamp(min=1e-9)
    if mode == "mean":
        return summed / count
    if mode == "mean_sqrt_len":
        return summed / count.sqrt()
    raise ValueError(f"unknown pooling {mode!r}; expected one of {', '.join(POOLING_MODES)}")


def _normalize(x: torch.Tensor) -> torch.Tensor:
    import torch

    return torch.nn.functional.normalize(x.float(), p=2, dim=-1)


def _to_float32(x: torch.Tensor) -> np.ndarray:
    return x.detach().float().cpu().numpy().astype(np.float32, copy=False)


def _features_of(output: Any) -> torch.Tensor:
    """The vector a `get_*_features` method returned: a tensor (transformers 4) or `pooler_output` (5)."""
    import torch

    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if pooled is None:
        raise ValueError(f"cannot find the features in a {type(output).__name__} (no pooler_output)")
    return pooled


def _mean_hidden(output: Any) -> torch.Tensor:
    """Mean of an AutoModel's last hidden state: over the sequence (transformers) or space (CNNs)."""
    hidden = getattr(output, "last_hidden_state", None)
    if hidden is None:
        raise ValueError(f"{type(output).__name__} has no last_hidden_state to pool")
    hidden = hidden.float()
    if hidden.ndim == 3:
        return hidden.mean(dim=1)
    if hidden.ndim == 4:  # [batch, channels, height, width]
        return hidden.mean(dim=(2, 3))
    raise ValueError(f"cannot pool a last_hidden_state of shape {tuple(hidden.shape)}")


def _call_accepting(fn: Any, inputs: dict[str, Any]) -> Any:
    """Call `fn` with the processor outputs it names (processors return extras some methods refuse)."""
    params = inspect.signature(fn).parameters
    return fn(**{k: v for k, v in inputs.items() if k in params and params[k].kind != inspect.Parameter.VAR_KEYWORD})


def _on(inputs: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Move processor outputs to the device; floating tensors also to the model's dtype."""
    import torch

    moved = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, dtype=dtype) if value.is_floating_point() else value.to(device)
        moved[key] = value
    return moved


# ------------------------------------------------------------------------------------------------
# sentence-transformers folders
# ------------------------------------------------------------------------------------------------


def _model_file(model: str | os.PathLike, filename: str, revision: str | None = None) -> Path | None:
    """A file of a local model folder or of a Hub repo (downloaded or cached), or None if it has none."""
    if Path(model).is_dir():
        path = Path(model) / filename
        return path if path.is_file() else None
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(str(model), filename, revision=revision))
    except Exception:  # absent file, unknown repo, offline: the model load itself reports real errors
        return None


@dataclass
class SentenceTransformerLayout:
    """What a sentence-transformers `modules.json` says happens after the transformer."""

    transformer_path: str = ""
    pooling: tuple[str, ...] | None = None
    include_prompt: bool = True
    max_seq_length: int | None = None
    do_lower_case: bool = False
    dense_paths: list[str] = field(default_factory=list)
    normalize: bool = False


def read_sentence_transformers(model: str | os.PathLike, revision: str | None = None) -> SentenceTransformerLayout | None:
    """Read a sentence-transformers folder's module list; None for a plain transformers model."""
    modules_file = _model_file(model, "modules.json", revision)
    if modules_file is None:
        return None
    where = f"{model}/modules.json"
    layout = SentenceTransformerLayout()
    for module in json.loads(modules_file.read_text(encoding="utf-8")):
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        path = str(module.get("path", ""))
        if kind == "Transformer":
            layout.transformer_path = path
            config_file = _model_file(model, f"{path}/sentence_bert_config.json" if path else "sentence_bert_config.json",
                                      revision)
            if config_file is not None:
                config = json.loads(config_file.read_text(encoding="utf-8"))
                layout.max_seq_length = config.get("max_seq_length")
                layout.do_lower_case = bool(config.get("do_lower_case", False))
        elif kind == "Pooling":
            config_file = _model_file(model, f"{path}/config.json", revision)
            if config_file is None:
                raise ValueError(f"{where}: the Pooling module has no {path}/config.json")
            config = json.loads(config_file.read_text(encoding="utf-8"))
            if isinstance(config.get("pooling_mode"), str):
                name = config["pooling_mode"]
                if name not in _ST_POOLING_NAMES:
                    raise ValueError(f"{where}: unsupported pooling_mode {name!r}")
                layout.pooling = (_ST_POOLING_NAMES[name],)
            else:
                layout.pooling = tuple(mode for key, mode in _ST_POOLING_KEYS.items() if config.get(key))
            if not layout.pooling:
                raise ValueError(f"{where}: the Pooling config {path}/config.json enables no pooling mode")
            layout.include_prompt = bool(config.get("include_prompt", True))
        elif kind == "Dense":
            layout.dense_paths.append(path)
        elif kind == "Normalize":
            layout.normalize = True
        else:
            raise ValueError(f"{where}: unsupported sentence-transformers module {module.get('type')!r} "
                             f"(supported: Transformer, Pooling, Dense, Normalize)")
    return layout


def _load_dense(model: str | os.PathLike, path: str, revision: str | None) -> torch.nn.Module:
    """A sentence-transformers Dense module (Linear + activation) from its safetensors weights."""
    import torch
    from safetensors.torch import load_file

    config_file = _model_file(model, f"{path}/config.json", revision)
    weights_file = _model_file(model, f"{path}/model.safetensors", revision)
    if config_file is None or weights_file is None:
        raise ValueError(f"{model}/{path}: a Dense module needs config.json and model.safetensors "
                         "(pickled .bin weights are not loaded)")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    activation = str(config.get("activation_function", torch.nn.modules.linear.Identity)).rsplit(".", 1)[-1]
    if activation not in _ST_ACTIVATIONS:
        raise ValueError(f"{model}/{path}: unsupported Dense activation {activation!r}")
    linear = torch.nn.Linear(config["in_features"], config["out_features"], bias=config.get("bias", True))
    state = load_file(str(weights_file))
    linear.load_state_dict({k.removeprefix("linear."): v for k, v in state.items()})
    return torch.nn.Sequential(linear, getattr(torch.nn, activation)())


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


# ------------------------------------------------------------------------------------------------
# text
# ------------------------------------------------------------------------------------------------


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
    """

    name: ClassVar[str] = "text-embeddings"
    version: ClassVar[str] = "1"
    rows_per_map_batch: ClassVar[int] = 64  # rows whose texts are sorted by length together

    def __init__(
        self,
        model: Any = DEFAULT_TEXT_MODEL,
        *,
        pooling: str = "auto",
        normalize: bool = True,
        prefix: str = "",
        max_length: int | None = None,
        batch_size: int = 32,
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
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.tokenizer, self.revision = model, tokenizer, revision
        self.pooling, self.normalize, self.prefix = pooling, normalize, prefix
        self.max_length, self.batch_size, self.text_template = max_length, batch_size, text_template
        self.device = _resolve_device(device)
        self.dtype = _resolve_dtype(dtype, self.device)
        self._encoder: Any = None  # loaded on first use, so a cache hit never loads the model
        self._layout: SentenceTransformerLayout | None = None
        self._modes: tuple[str, ...] = ()
        self._dense: Any = None
        self._truncate_to: int | None = None
        self._prompt_tokens = 0
        self._forward_keys: set[str] = set()

    # -- stage protocol --------------------------------------------------------------------------

    def fingerprint_inputs(self) -> dict[str, Any]:
        return {
            "model": model_fingerprint(self.model, self.revision),
            "pooling": self.pooling,
            "normalize": self.normalize,
            "prefix": self.prefix,
            "max_length": self.max_length,
            "template": self.text_template,
            "dtype": str(self.dtype),
        }

    def apply(self, ds: datasets.Dataset, **map_kwargs: Any) -> datasets.Dataset:
        """Add `embedding` (and `neighbor_embeddings` when `ds` has `neighbors`) as float32 lists."""
        for column in ("input", "answer"):
            if column not in ds.column_names:
                raise ValueError(f"TextEmbedder needs a {column!r} column; the dataset has {ds.column_names}")
        features = ds.features.copy()
        features["embedding"] = VECTOR
        if "neighbors" in ds.column_names:
            features["neighbor_embeddings"] = VECTORS
        map_kwargs.setdefault("features", features)
        map_kwargs.setdefault("batch_size", self.rows_per_map_batch)
        return super().apply(ds, **map_kwargs)

    def process(self, batch: dict[str, list]) -> dict[str, list]:
        inputs, answers = batch["input"], batch["answer"]
        texts = [self.render(inputs[i], answers[i], inputs[i]) for i in range(len(inputs))]
        counts = []
        if "neighbors" in batch:
            for i, neighbors in enumerate(batch["neighbors"]):
                neighbors = neighbors or []
                texts.extend(self.render(nb, answers[i], inputs[i]) for nb in neighbors)
                counts.append(len(neighbors))
        vectors = self.embed_texts(texts)
        n = len(inputs)
        out: dict[str, list] = {"embedding": list(vectors[:n])}
        if "neighbors" in batch:
            starts = np.cumsum([n, *counts])
            out["neighbor_embeddings"] = [vectors[a:b] for a, b in zip(starts[:-1], starts[1:])]
        return out

    # -- embedding -------------------------------------------------------------------------------

    def render(self, text: str, answer: str | None, input: str | None = None) -> str:
        """The string embedded for one (text, answer) pair, before the prefix."""
        return self.text_template.format(text=text, answer="" if answer is None else answer,
                                          input=text if input is None else input)

    @property
    def pooling_modes(self) -> tuple[str, ...]:
        """The pooling actually used (loads the model's config on first access)."""
        self._load()
        return self._modes

    def _load(self) -> None:
        if self._encoder is not None:
            return
        import torch
        from transformers import AutoModel, AutoTokenizer

        if isinstance(self.model, (str, os.PathLike)):
            self._layout = read_sentence_transformers(self.model, self.revision)
            sub = {"subfolder": self._layout.transformer_path} if self._layout and self._layout.transformer_path else {}
            model = AutoModel.from_pretrained(str(self.model), revision=self.revision, dtype=self.dtype, **sub)
            tokenizer = self.tokenizer or AutoTokenizer.from_pretrained(str(self.model), revision=self.revision, **sub)
        else:
            model = self.model
            name = getattr(model, "name_or_path", None)
            if name and Path(name).is_dir():
                self._layout = read_sentence_transformers(name)
            if self.tokenizer is None and not name:
                raise ValueError("a loaded model without name_or_path needs tokenizer=...")
            tokenizer = self.tokenizer or AutoTokenizer.from_pretrained(name)
        layout = self._layout
        if tokenizer.pad_token_id is None:  # decoder tokenizers often have none; the mask hides pads anyway
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
            if tokenizer.pad_token_id is None:
                raise ValueError(f"the tokenizer of {self.model} has no pad, eos or unk token to pad with")
        model.eval().to(self.device)
        encoder = model.get_encoder() if getattr(model.config, "is_encoder_decoder", False) else model.base_model
        if self.pooling != "auto":
            self._modes = (self.pooling,)
        elif layout is not None and layout.pooling:
            self._modes = layout.pooling
        else:
            self._modes = ("last",) if _is_decoder_only(model.config) else ("mean",)
        if layout is not None and layout.dense_paths:
            self._dense = torch.nn.Sequential(*(_load_dense(self.model if isinstance(self.model, (str, os.PathLike))
                                                            else model.name_or_path, p, self.revision)
                                                for p in layout.dense_paths)).to(self.device).eval()
        limit = self.max_length or (layout.max_seq_length if layout else None)
        if limit is None and 0 < getattr(tokenizer, "model_max_length", 0) < 1_000_000:
            limit = tokenizer.model_max_length
        self._truncate_to = limit
        if layout is not None and not layout.include_prompt and self.prefix:
            ids = tokenizer(self.prefix)["input_ids"]
            special = set(tokenizer.all_special_ids)
            while ids and ids[-1] in special:  # the trailing eos/sep belongs to the text, not the prompt
                ids = ids[:-1]
            self._prompt_tokens = len(ids)
        self._forward_keys = set(inspect.signature(encoder.forward).parameters)
        self._tokenizer = tokenizer
        self._encoder = encoder

    def embed_texts(self, texts: list[str], *, progress: bool = False) -> np.ndarray:
        """Embed strings (the prefix is added here): `[len(texts), dim]` float32.

        Distinct strings are embedded once, in batches of similar length (longest first, so an
        out-of-memory error shows up at once rather than at the end).
        """
        import torch
        from tqdm.auto import tqdm

        self._load()
        tokenizer, layout = self._tokenizer, self._layout
        unique = list(dict.fromkeys(texts))
        if not unique:
            return np.zeros((0, 0), dtype=np.float32)
        prepared = [self.prefix + t for t in unique]
        if layout is not None and layout.do_lower_case:
            prepared = [t.lower() for t in prepared]
        encoded = tokenizer(prepared, truncation=self._truncate_to is not None, max_length=self._truncate_to)
        keys = [k for k in ("input_ids", "token_type_ids") if k in encoded and k in self._forward_keys]
        order = sorted(range(len(unique)), key=lambda i: -len(encoded["input_ids"][i]))
        result: np.ndarray | None = None
        starts = range(0, len(order), self.batch_size)
        for start in tqdm(starts, desc="embedding texts", leave=False, disable=not progress or len(starts) < 2):
            rows = order[start:start + self.batch_size]
            width = max(len(encoded["input_ids"][i]) for i in rows)
            batch = {}
            for key in keys:
                fill = tokenizer.pad_token_id if key == "input_ids" else 0
                batch[key] = torch.tensor([encoded[key][i] + [fill] * (width - len(encoded[key][i])) for i in rows])
            mask = torch.tensor([[1] * len(encoded["input_ids"][i]) + [0] * (width - len(encoded["input_ids"][i]))
                                 for i in rows])
            with torch.inference_mode():
                hidden = self._encoder(**{k: v.to(self.device) for k, v in batch.items()},
                                       attention_mask=mask.to(self.device)).last_hidden_state
                pool_mask = mask.clone()
                if self._prompt_tokens:  # include_prompt=False: the instruction is not pooled
                    pool_mask[:, : self._prompt_tokens] = 0
                vectors = torch.cat([pool(hidden, pool_mask, mode) for mode in self._modes], dim=-1)
                if self._dense is not None:
                    vectors = self._dense(vectors)
                if self.normalize:
                    vectors = _normalize(vectors)
            vectors = _to_float32(vectors)
            if result is None:
                result = np.empty((len(unique), vectors.shape[1]), dtype=np.float32)
            result[rows] = vectors
        index = {text: i for i, text in enumerate(unique)}
        return result[[index[t] for t in texts]]


# ------------------------------------------------------------------------------------------------
# media
# ------------------------------------------------------------------------------------------------


def media_key(value: Any) -> str:
    """A key equal for the same media item: its path, else a hash of its content."""
    if isinstance(value, dict) and ("path" in value or "bytes" in value) and "array" not in value:
        value = value.get("path") or value.get("bytes")
    if isinstance(value, (str, os.PathLike)):
        return "path:" + os.path.abspath(os.fspath(value))
    digest = hashlib.sha256()
    if isinstance(value, (bytes, bytearray)):
        digest.update(value)
    elif isinstance(value, np.ndarray):
        digest.update(str((value.shape, value.dtype)).encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    elif isinstance(value, dict) and "array" in value:
        digest.update(str(value.get("sampling_rate")).encode())
        digest.update(np.ascontiguousarray(np.asarray(value["array"])).tobytes())
    elif isinstance(value, tuple) and len(value) == 2:
        digest.update(str(value[1]).encode())
        digest.update(np.ascontiguousarray(np.asarray(value[0])).tobytes())
    elif hasattr(value, "tobytes") and hasattr(value, "mode"):  # PIL image
        digest.update(f"{value.mode}{value.size}".encode())
        digest.update(value.tobytes())
    else:  # e.g. a decoder object: no content to hash cheaply, so it is never deduplicated
        return f"object:{id(value)}"
    return "sha:" + digest.hexdigest()


class ModalityEmbedder(Stage):
    """Embed each sample's media (`media_embedding`) and its media neighbours (`neighbor_media_embeddings`).

    Models with `get_image_features` / `get_audio_features` / `get_video_features` (CLIP, SigLIP,
    CLAP, X-CLIP, ...) use them; other `AutoModel`s give the mean of their last hidden state. Video
    without a video method is the mean of its frames' image features. Each distinct item is embedded
    once per chunk; without `media_neighbors` the neighbours reuse the original's vector (K copies,
    one per text neighbour), since an unperturbed medium has exactly zero embedding shift.
    """

    name: ClassVar[str] = "media-embeddings"
    version: ClassVar[str] = "1"
    rows_per_map_batch: ClassVar[int] = 64

    def __init__(
        self,
        model: Any,
        *,
        modality: str | None = None,
        normalize: bool = True,
        batch_size: int = 16,
        num_frames: int = 8,
        processor: Any = None,
        revision: str | None = None,
        device: Any = None,
        dtype: Any = "auto",
    ) -> None:
        if modality is not None and modality not in MEDIA_COLUMNS:
            raise ValueError(f"unknown modality {modality!r}; expected one of {', '.join(MEDIA_COLUMNS)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.processor, self.revision = model, processor, revision
        self.modality, self.normalize = modality, normalize
        self.batch_size, self.num_frames = batch_size, num_frames
        self.device = _resolve_device(device)
        self.dtype = _resolve_dtype(dtype, self.device)
        self._active = modality  # the modality of the dataset being processed
        self._model: Any = None
        self._processor: Any = None

    # -- stage protocol --------------------------------------------------------------------------

    def fingerprint_inputs(self) -> dict[str, Any]:
        return {
            "model": model_fingerprint(self.model, self.revision),
            "modality": self._active,
            "normalize": self.normalize,
            "num_frames": self.num_frames if self._active == "video" else None,
            "dtype": str(self.dtype),
        }

    def apply(self, ds: datasets.Dataset, **map_kwargs: Any) -> datasets.Dataset:
        """Add `media_embedding` (+ `neighbor_media_embeddings` when there are neighbours) as float32."""
        present = [c for c in MEDIA_COLUMNS if c in ds.column_names]
        if self.modality is not None and self.modality not in present:
            raise ValueError(f"ModalityEmbedder(modality={self.modality!r}): the dataset has no {self.modality!r} "
                             f"column (columns: {ds.column_names})")
        if not present:
            raise ValueError(f"ModalityEmbedder: the dataset has no media column ({', '.join(MEDIA_COLUMNS)}); "
                             f"columns: {ds.column_names}")
        self._active = self.modality or present[0]
        features = ds.features.copy()
        features["media_embedding"] = VECTOR
        if "neighbors" in ds.column_names or "media_neighbors" in ds.column_names:
            features["neighbor_media_embeddings"] = VECTORS
        map_kwargs.setdefault("features", features)
        map_kwargs.setdefault("batch_size", self.rows_per_map_batch)
        return super().apply(ds, **map_kwargs)

    def process(self, batch: dict[str, list]) -> dict[str, list]:
        column = self._active
        values = batch[column]
        ids = batch.get("sample_id") or [str(i) for i in range(len(values))]
        items: dict[str, tuple[Any, str]] = {}  # key -> (value, where it was first seen)
        originals = []
        for i, value in enumerate(values):
            if value is None:
                raise ValueError(f"sample {ids[i]}: the {column!r} column is empty")
            originals.append(media_key(value))
            items.setdefault(originals[-1], (value, f"sample {ids[i]}, column {column!r}"))
        media_neighbors: list[list[str]] = [[] for _ in values]
        if "media_neighbors" in batch:
            for i, row in enumerate(batch["media_neighbors"]):
                for j, value in enumerate(row or []):
                    if value is None:
                        raise ValueError(f"sample {ids[i]}: media_neighbors[{j}] is empty")
                    media_neighbors[i].append(media_key(value))
                    items.setdefault(media_neighbors[i][-1], (value, f"sample {ids[i]}, media_neighbors[{j}]"))
        keys = list(items)
        vectors = self.embed_media([items[k][0] for k in keys], where=[items[k][1] for k in keys])
        index = {k: i for i, k in enumerate(keys)}
        out: dict[str, list] = {"media_embedding": [vectors[index[k]] for k in originals]}
        if "neighbors" in batch or "media_neighbors" in batch:
            rows = []
            for i, key in enumerate(originals):
                if media_neighbors[i]:
                    rows.append(vectors[[index[k] for k in media_neighbors[i]]])
                else:
                    count = len((batch.get("neighbors") or [[]] * len(values))[i] or [])
                    rows.append(np.repeat(vectors[index[key]][None, :], count, axis=0))
            out["neighbor_media_embeddings"] = rows
        return out

    # -- embedding -------------------------------------------------------------------------------

    def _load(self) -> None:
        if self._model is not None:
            return
        from transformers import AutoModel, AutoProcessor

        if isinstance(self.model, (str, os.PathLike)):
            model = AutoModel.from_pretrained(str(self.model), revision=self.revision, dtype=self.dtype)
            processor = self.processor or AutoProcessor.from_pretrained(str(self.model), revision=self.revision)
        else:
            model = self.model
            name = getattr(model, "name_or_path", None)
            if self.processor is None and not name:
                raise ValueError("a loaded model without name_or_path needs processor=...")
            processor = self.processor or AutoProcessor.from_pretrained(name)
        config = model.config
        declared = getattr(getattr(config, "vision_config", None), "num_frames", None) or getattr(config, "num_frames", None)
        if self._active == "video" and isinstance(declared, int) and declared != self.num_frames:
            raise ValueError(f"{self.model}: the model takes videos of {declared} frames; set num_frames={declared}")
        self._model = model.eval().to(self.device)
        self._model_dtype = next(model.parameters()).dtype
        self._processor = processor

    def _prepare(self, kind: str, items: list[Any]) -> dict[str, Any]:
        """Processor outputs for a list of images, waveforms or frame stacks."""
        from transformers import ProcessorMixin

        processor = self._processor
        is_processor = isinstance(processor, ProcessorMixin)
        if kind == "image":
            inputs = processor(images=items, return_tensors="pt")
        elif kind == "audio":
            rate = self._sampling_rate()
            if is_processor:
                inputs = processor(audio=items, sampling_rate=rate, return_tensors="pt")
            else:
                inputs = processor(items, sampling_rate=rate, return_tensors="pt")
        elif is_processor or hasattr(processor, "sample_frames") or "videos" in inspect.signature(processor.__call__).parameters:
            inputs = processor(videos=items, return_tensors="pt")
        else:
            inputs = processor(items, return_tensors="pt")
        return _on(dict(inputs), self.device, self._model_dtype)

    def _sampling_rate(self) -> int:
        extractor = getattr(self._processor, "feature_extractor", self._processor)
        return int(getattr(extractor, "sampling_rate", None) or 16000)

    def _forward(self, kind: str, items: list[Any]) -> torch.Tensor:
        """Raw vectors `[len(items), dim]` for loaded images, waveforms or frame stacks."""
        import torch

        model = self._model
        with torch.inference_mode():
            method = getattr(model, f"get_{kind}_features", None)
            if method is not None and kind == "video":
                counts = [len(video) for video in items]
                if len(set(counts)) > 1:  # stacked per video below, so only equal frame counts batch
                    return torch.cat([self._forward(kind, [video]) for video in items])
                inputs = self._prepare(kind, items)
                pixels = inputs.get("pixel_values")
                if pixels is not None and pixels.ndim == 4 and pixels.shape[0] == sum(counts):
                    # image-processor-backed video processors (X-CLIP) flatten the frames of all videos
                    inputs["pixel_values"] = pixels.view(len(items), counts[0], *pixels.shape[1:])
                return _features_of(_call_accepting(method, inputs)).float()
            if method is not None:
                return _features_of(_call_accepting(method, self._prepare(kind, items))).float()
            if kind == "video" and (hasattr(model, "get_image_features") or not self._is_video_model()):
                frames = [frame for video in items for frame in video]
                per_frame = torch.cat([self._forward("image", frames[s:s + self.batch_size * 8])
                                       for s in range(0, len(frames), self.batch_size * 8)])
                counts = [len(video) for video in items]
                return torch.stack([chunk.mean(dim=0) for chunk in per_frame.split(counts)])
            return _mean_hidden(_call_accepting(model.forward, self._prepare(kind, items)))

    def _is_video_model(self) -> bool:
        from transformers.models.auto.modeling_auto import MODEL_FOR_VIDEO_CLASSIFICATION_MAPPING_NAMES

        return getattr(self._model.config, "model_type", None) in MODEL_FOR_VIDEO_CLASSIFICATION_MAPPING_NAMES

    def _load_item(self, value: Any, where: str) -> Any:
        kind = self._active
        try:
            if kind == "audio":
                return load_media(kind, value, sampling_rate=self._sampling_rate())[0]
            if kind == "video":
                return load_media(kind, value, num_frames=self.num_frames)
            return load_media(kind, value)
        except MediaError as err:
            raise ValueError(f"{where}: {err}") from err

    def embed_media(self, values: list[Any], *, where: list[str] | None = None) -> np.ndarray:
        """Embed media items of the active modality (one vector each, no deduplication): `[n, dim]`."""
        self._load()
        kind = self._active
        if kind is None:
            raise ValueError("ModalityEmbedder: set modality=... or call apply() on a dataset with a media column")
        where = where or [f"item {i}" for i in range(len(values))]
        # a generic audio model pads differently per family, so it only batches equal lengths
        generic_audio = kind == "audio" and not hasattr(self._model, "get_audio_features")
        result: np.ndarray | None = None
        start, pending = 0, None
        while start < len(values):
            loaded = [pending if pending is not None else self._load_item(values[start], where[start])]
            pending, stop = None, start + 1
            while stop < len(values) and stop - start < self.batch_size:
                item = self._load_item(values[stop], where[stop])
                if generic_audio and len(item) != len(loaded[0]):
                    pending = item  # starts the next batch; never loaded twice
                    break
                loaded.append(item)
                stop += 1
            vectors = self._forward(kind, loaded)
            if self.normalize:
                vectors = _normalize(vectors)
            vectors = _to_float32(vectors)
            if result is None:
                result = np.empty((len(values), vectors.shape[1]), dtype=np.float32)
            result[start:stop] = vectors
            start = stop
        return result if result is not None else np.zeros((0, 0), dtype=np.float32)


# ------------------------------------------------------------------------------------------------
# command line and benchmark
# ------------------------------------------------------------------------------------------------


def add_embed_arguments(parser: Any) -> None:
    """Arguments of `fimmia-hf embed`."""
    parser.add_argument("--data", required=True, help="samples with neighbours (table file or save_to_disk folder)")
    parser.add_argument("--out", required=True, help="output: a save_to_disk folder, or .parquet / .jsonl")
    parser.add_argument("--model", default=DEFAULT_TEXT_MODEL,
                        help=f"text embedding model: Hub id or folder (default: {DEFAULT_TEXT_MODEL}, the original's); "
                             "'none' skips text embeddings")
    parser.add_argument("--media-model", help="media embedding model (CLIP, SigLIP, CLAP, X-CLIP, any AutoModel); "
                                              "default: media is not embedded")
    parser.add_argument("--batch-size", type=int, help="texts (default 32) or media items (default 16) per forward")
    parser.add_argument("--prefix", default="", help="instruction prepended to every text (e5: 'Instruct: ...\\nQuery: ')")
    parser.add_argument("--pooling", default="auto", choices=("auto", *POOLING_MODES),
                        help="text pooling (auto: the sentence-transformers config, else last for decoders, mean otherwise)")
    parser.add_argument("--template", default=DEFAULT_TEXT_TEMPLATE,
                        help="what is embedded: {text} (input or neighbour), {answer}, {input}")
    parser.add_argument("--max-length", type=int, help="truncate texts to this many tokens")
    parser.add_argument("--num-frames", type=int, default=8, help="frames per video")
    parser.add_argument("--media-root", help="folder that media paths are relative to (default: the table's folder)")
    parser.add_argument("--device", help="cuda, cuda:1, cpu ... (default: cuda if available)")


def run_embed(args: Any) -> int:
    """`fimmia-hf embed`: add text and/or media embeddings to a sample table and save it."""
    from .data import load_samples, modality_of, save_dataset

    if str(args.model).lower() == "none" and not args.media_model:
        raise ValueError("nothing to embed: --model none and no --media-model")
    ds = load_samples(args.data, media_root=args.media_root)
    batch = {"batch_size": args.batch_size} if args.batch_size else {}
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
    dims = {c: len(ds[0][c]) for c in ("embedding", "media_embedding") if c in ds.column_names and len(ds)}
    print(json.dumps({"rows": len(ds), "out": str(out), "dims": dims}))
    return 0


def _synthetic_texts(n_samples: int, k: int, seed: int) -> list[str]:
    """MERA-style prompts (+ answers) and K word-dropped neighbours each: realistic, varied lengths."""
    import tempfile

    import pandas as pd

    from .testing import make_synthetic_samples

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
    json_path: str | os.PathLike | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Time batched, length-sorted embedding against one text at a time (the original's way).

    Same texts, same model (default: the "small" offline text encoder from `fimmia_hf.testing`);
    returns and optionally writes `{"speedup": ..., ...}` with both timings and the largest
    difference between the two results.
    """
    import tempfile

    import torch

    texts = _synthetic_texts(n_samples, k, seed)
    with tempfile.TemporaryDirectory() as tmp:
        label = str(model) if isinstance(model, (str, os.PathLike)) else type(model).__name__
        if model is None:
            from .testing import build_tiny

            model = build_tiny("text-encoder", Path(tmp) / "text-encoder", size="small")
            label = "fimmia_hf.testing text-encoder (small)"
        batched = TextEmbedder(model, batch_size=batch_size, device=device)
        single = TextEmbedder(model, batch_size=1, device=device)
        batched.embed_texts(texts[:batch_size])  # load and warm up both
        single.embed_texts(texts[:2])
        sync = torch.cuda.synchronize if batched.device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        fast = batched.embed_texts(texts)
        sync()
        t1 = time.perf_counter()
        slow = np.stack([single.embed_texts([t])[0] for t in texts])
        sync()
        t2 = time.perf_counter()
        lengths = [len(ids) for ids in batched._tokenizer(texts)["input_ids"]]
    result = {
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
        "device": str(batched.device),
        "dtype": str(batched.dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
    }
    if json_path is not None:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result

"""TargetScorer: the target model's loss on each sample and its neighbours, fast and model-agnostic.

Membership signals are differences between a sample's loss and its neighbours' losses, so the
scorer must be exact (scores may not depend on batch size, padding or caching) and it is where the
cost is (K + 1 forwards per sample and target). One engine serves every model family:

* each sample's variants (original + K neighbours) share their media, which is processed and
  encoded once;
* the original runs first with `use_cache=True`; every neighbour reuses its KV cache up to the
  neighbour's own first differing token (the system prompt, the media when it comes before the
  change, the unchanged words), so only the changed tails run, right-padded, in batches of similar
  tail length; identical variants run once and no token after the last scored one runs;
* a tail that contains the media gets the encoded media features, not the pixels again;
* logits are computed only where a scored token is predicted (`logits_to_keep` as a boolean mask);
* the only family-specific piece is position ids: models with `get_rope_index` (Qwen2/2.5-VL
  M-RoPE) get theirs from it, all others count tokens.

Output columns (plain names; `name` adds a `model_name` column so the base and fine-tuned runs of the
paired protocol concatenate without renaming): `loss`, `neighbor_losses`, and with `token_stats` the
per-token `token_logprobs`, `token_mean_logprob` (μ = Σ_z p(z) log p(z)), `token_std_logprob`
(σ of log p(z) under p), `token_entropy` (= −μ) and `token_max_logprob` (log max_z p(z)); with
`token_stats="all"` the same for every neighbour (`neighbor_token_logprobs`, ...).
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from .chat import ChatEncoder, ChatEncoding, _common_prefix, is_per_token
from .media import MEDIA_COLUMNS, MediaError, load_media
from .stage import Stage, model_fingerprint

STAT_NAMES = ("logprobs", "mean_logprob", "std_logprob", "entropy", "max_logprob")
_ENCODER_INPUTS = {"image": ("pixel_values", "image_grid_thw"), "video": ("pixel_values_videos", "video_grid_thw")}
_AUTO_CLASSES = ("AutoModelForImageTextToText", "AutoModelForMultimodalLM", "AutoModelForCausalLM", "AutoModelForSeq2SeqLM")


# ----------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------
def _load_base(path: str, *, revision: str | None, dtype: Any, device_map: Any) -> Any:
    """Load a model with the first Auto class whose mapping knows its config."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(path, revision=revision)
    for name in _AUTO_CLASSES:
        auto = getattr(transformers, name, None)
        if auto is not None and type(config) in auto._model_mapping:
            return auto.from_pretrained(path, revision=revision, dtype=dtype, device_map=device_map, use_safetensors=True)
    raise ValueError(f"{path}: no generative Auto class supports {type(config).__name__}")


def load_target(
    model: str | os.PathLike,
    *,
    revision: str | None = None,
    dtype: Any = "auto",
    device_map: Any = None,
) -> tuple[Any, Any]:
    """Load (model, processor) from a Hub id or folder; PEFT adapter folders load base + adapter."""
    from transformers import AutoProcessor

    path = str(model)
    adapter_config = Path(path) / "adapter_config.json"
    if adapter_config.is_file():
        from peft import PeftModel

        base_path = json.loads(adapter_config.read_text())["base_model_name_or_path"]
        base = _load_base(base_path, revision=None, dtype=dtype, device_map=device_map)
        loaded = PeftModel.from_pretrained(base, path)
        try:
            processor = AutoProcessor.from_pretrained(path)
        except (OSError, ValueError, TypeError):
            processor = AutoProcessor.from_pretrained(base_path)
        return loaded, processor
    return _load_base(path, revision=revision, dtype=dtype, device_map=device_map), AutoProcessor.from_pretrained(
        path, revision=revision
    )


def _find_attr(model: Any, name: str) -> Any:
    """`name` on the model or the models it wraps (PEFT wrappers, `.model` cores)."""
    seen = set()
    stack = [model]
    while stack:
        m = stack.pop(0)
        if m is None or id(m) in seen:
            continue
        seen.add(id(m))
        if hasattr(type(m), name):
            return getattr(m, name)
        stack.extend([getattr(m, "base_model", None), getattr(m, "model", None)])
    return None


# ----------------------------------------------------------------------------------------------
# statistics
# ----------------------------------------------------------------------------------------------
def token_statistics(logits: Any, targets: Any) -> dict[str, list[float]]:
    """Per-position log-prob of the target and moments of log p under the model's own p."""
    import torch

    logp = torch.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    plogp = torch.nan_to_num(p * logp)
    mean = plogp.sum(-1)
    var = torch.nan_to_num(p * (logp - mean[:, None]) ** 2).sum(-1)  # centred: no cancellation
    return {
        "logprobs": logp.gather(-1, targets[:, None])[:, 0].tolist(),
        "mean_logprob": mean.tolist(),
        "std_logprob": var.sqrt().tolist(),
        "entropy": (-mean).tolist(),
        "max_logprob": logp.max(-1).values.tolist(),
    }


def _loss(stats: dict[str, list[float]]) -> float:
    lp = stats["logprobs"]
    return -float(np.mean(lp)) if lp else float("nan")


# ----------------------------------------------------------------------------------------------
# the engine
# ----------------------------------------------------------------------------------------------
class ScoringEngine:
    """Scores groups of encodings that share one media item (a sample and its neighbours)."""

    def __init__(self, model: Any, *, batch_size: int = 8, prefix_reuse: bool = True) -> None:
        import torch

        self.model = model.eval()
        self.batch_size = max(1, int(batch_size))
        self.prefix_reuse = prefix_reuse
        self.device = next(model.parameters()).device
        core_forward = _find_attr(model, "forward")
        params = inspect.signature(core_forward).parameters if core_forward is not None else {}
        if "logits_to_keep" not in params:  # PEFT wrappers hide the signature: look at the wrapped model
            inner = getattr(model, "get_base_model", lambda: model)()
            params = inspect.signature(inner.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.keep_logits = "logits_to_keep" in params
        self.rope_index = _find_attr(model, "get_rope_index")
        self.takes_encoder_outputs = "mm_encoder_outputs" in params
        self.torch = torch
        self.tokens_run = 0  # input positions run so far, padding included (benchmarks report it)

    def encode_media(self, media: dict[str, Any]) -> dict[str, Any] | None:
        """Run the media encoder once (models that accept `mm_encoder_outputs`), else None."""
        if not self.takes_encoder_outputs or not media:
            return None
        outputs, used = {}, set()
        for modality, (values_key, grid_key) in _ENCODER_INPUTS.items():
            getter = _find_attr(self.model, f"get_{modality}_features")
            if values_key in media and getter is not None:
                with self.torch.inference_mode():
                    outputs[modality] = getter(
                        media[values_key].to(self.device), media[grid_key].to(self.device), return_dict=True
                    )
                used.update((values_key, grid_key))
        leftover = set(media) - used - {"second_per_grid_ts"}  # timing only feeds position ids, given explicitly
        return outputs if outputs and not leftover else None

    # -- position ids (the one family-specific piece) ----------------------------------------------
    def positions(self, enc: ChatEncoding, media: dict[str, Any]) -> Any:
        """Position ids of one unpadded sequence: (1, L) or (3, 1, L) for M-RoPE models."""
        torch = self.torch
        n = len(enc.input_ids)
        if self.rope_index is None:
            return torch.arange(n)[None]
        types = enc.inputs.get("mm_token_type_ids")
        if enc.media_span is None or types is None:
            return torch.arange(n).view(1, 1, -1).expand(3, 1, -1)
        kwargs = {k: media[k] for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts") if k in media}
        position_ids, _ = self.rope_index(torch.tensor([enc.input_ids]), mm_token_type_ids=types, **kwargs)
        return position_ids

    # -- forward ------------------------------------------------------------------------------------
    def _forward(self, keep: Any | None, **kwargs: Any) -> Any:
        torch = self.torch
        kwargs = {k: (v.to(self.device) if hasattr(v, "to") and not hasattr(v, "get_seq_length") else v) for k, v in kwargs.items()}
        if keep is not None and self.keep_logits:
            kwargs["logits_to_keep"] = keep.to(self.device)
        with torch.inference_mode():
            out = self.model(**kwargs)
        logits = out.logits
        if keep is not None and not self.keep_logits:
            logits = logits[keep.to(logits.device)]
        return out, logits

    def score(self, encodings: Sequence[ChatEncoding], want_stats: Sequence[bool] | None = None) -> list[dict[str, list[float]]]:
        """Token statistics of each encoding; the first one (the original) carries the media tensors.

        The original runs alone and keeps its KV cache; every other variant reuses that cache up to its
        own first differing token, so only its changed tail runs, right-padded, in batches of similar
        tail length. Identical variants are scored once.
        """
        if not encodings:
            return []
        trunk = encodings[0]
        media = {k: v for k, v in trunk.inputs.items() if not is_per_token(v, len(trunk.input_ids))}
        group = _Group(
            encodings=encodings,
            positions=[self.positions(e, media) for e in encodings],
            scored=[e.score_positions for e in encodings],
            media=media,
            encoded=self.encode_media(media) if trunk.media_span is not None else None,
        )
        first_of: dict[tuple[int, ...], int] = {}
        for i, e in enumerate(encodings):
            first_of.setdefault(tuple(e.input_ids), i)
        cache = self._run(group, [0], keep_cache=self.prefix_reuse) if group.scored[0] else None
        todo = [i for i in range(1, len(encodings)) if first_of[tuple(encodings[i].input_ids)] == i and group.scored[i]]
        if cache is not None:
            for i in todo:
                group.starts[i] = self._shared_prefix(group, i)
        todo.sort(key=group.tail, reverse=True)
        batch: list[int] = []
        for i in todo:  # a new batch when full or when padding would exceed a fifth of a row
            if batch and (len(batch) == self.batch_size or group.tail(i) < 0.8 * group.tail(batch[0])):
                self._run(group, batch, cache)
                batch = []
            batch.append(i)
        if batch:
            self._run(group, batch, cache)

        out = []
        for i, e in enumerate(encodings):
            stats = group.results.get(first_of[tuple(e.input_ids)], {name: [] for name in STAT_NAMES})
            if want_stats is not None and not want_stats[i]:
                stats = {"logprobs": stats["logprobs"]}
            out.append(stats)
        return out

    def _shared_prefix(self, group: _Group, i: int) -> int:
        """How many of the original's cached tokens variant `i` can start from."""
        trunk, span = group.encodings[0], group.encodings[0].media_span
        p = min(_common_prefix(trunk.input_ids, group.encodings[i].input_ids), group.scored[i][0] - 1, group.ends[0])
        if span is not None and span[0] < p < span[1]:
            p = span[0]  # never split the media: a tail carries all of it or none
        same_positions = self.torch.equal(group.positions[i][..., :p], group.positions[0][..., :p])
        return p if same_positions else 0

    def _run(self, group: _Group, rows: list[int], cache: Any = None, keep_cache: bool = False) -> Any:
        """One right-padded forward of `rows`, each from its own start over the original's cache.

        The cache is cut to the latest start; each row masks the cached slots after its own start.
        Returns the KV cache when `keep_cache`.
        """
        torch = self.torch
        enc = group.encodings
        past = max(group.starts[i] for i in rows)
        width = max(group.tail(i) for i in rows)
        n = len(rows)
        input_ids = torch.zeros(n, width, dtype=torch.long)
        attention = torch.zeros(n, past + width, dtype=torch.long)
        position_ids = torch.zeros(group.positions[0].shape[:-2] + (n, width), dtype=torch.long)
        keep = torch.zeros(n, width, dtype=torch.bool)
        length = len(enc[0].input_ids)
        per_token = {k: v[:, :1].expand(n, width).clone() for k, v in enc[0].inputs.items() if is_per_token(v, length)}
        with_media = 0
        for r, i in enumerate(rows):
            a, b = group.starts[i], group.ends[i]
            input_ids[r, : b - a] = torch.tensor(enc[i].input_ids[a:b])
            attention[r, :a] = 1
            attention[r, past : past + b - a] = 1
            position_ids[..., r, : b - a] = group.positions[i][..., 0, a:b]
            keep[r, [t - 1 - a for t in group.scored[i]]] = True
            for key, feat in per_token.items():
                feat[r, : b - a] = enc[i].inputs[key][0, a:b]
            span = enc[i].media_span
            with_media += span is not None and a <= span[0] < b
        kwargs = {"input_ids": input_ids, "attention_mask": attention, "position_ids": position_ids, **per_token}
        if past:
            kwargs[self.cache_kw] = rows_cache = copy.deepcopy(cache)
            rows_cache.crop(past - cache.get_seq_length())
            rows_cache.batch_repeat_interleave(n)
        if keep_cache or past:
            kwargs["use_cache"] = True
        if with_media and group.encoded is not None:  # media features computed once, repeated per row that needs them
            kwargs["mm_encoder_outputs"] = {
                k: type(v)(**{**v, "pooler_output": tuple(v.pooler_output) * with_media}) for k, v in group.encoded.items()
            }
        elif with_media:  # models without that hook encode the media again for each row
            kwargs.update({k: torch.cat([v] * with_media) for k, v in group.media.items()})
        out, flat = self._forward(keep, **kwargs)
        self.tokens_run += input_ids.numel()
        offsets = [0] + keep.sum(1).cumsum(0).tolist()  # the kept logits come row by row
        for r, i in enumerate(rows):
            targets = torch.tensor([enc[i].input_ids[t] for t in group.scored[i]], device=flat.device)
            group.results[i] = token_statistics(flat[offsets[r] : offsets[r + 1]], targets)
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        return cache if keep_cache and _cuttable(cache) else None


def _cuttable(cache: Any) -> bool:
    """Only plain full-attention KV caches can be cut at any position and shared exactly.

    Sliding-window and recurrent layers (Gemma 3, hybrid models) keep a summary of the past, so their
    variants run from the start instead.
    """
    from transformers.cache_utils import DynamicLayer

    return cache is not None and all(type(layer) is DynamicLayer for layer in getattr(cache, "layers", [None]))


@dataclass
class _Group:
    """A sample's variants being scored: their inputs, where each starts and ends, and the results."""

    encodings: Sequence[ChatEncoding]
    positions: list[Any]
    scored: list[list[int]]
    media: dict[str, Any]
    encoded: dict[str, Any] | None
    starts: list[int] = field(init=False)
    ends: list[int] = field(init=False)
    results: dict[int, dict[str, list[float]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.starts = [0] * len(self.encodings)
        # inputs are needed up to the last scored token, exclusive: later tokens predict nothing scored
        self.ends = [s[-1] if s else 0 for s in self.scored]

    def tail(self, i: int) -> int:
        return self.ends[i] - self.starts[i]


def score_plain(model: Any, encoding: ChatEncoding) -> dict[str, list[float]]:
    """The reference: one full forward of one encoding (with its own media), all logits computed."""
    import torch

    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in encoding.inputs.items()}
    ids = torch.tensor([encoding.input_ids], device=device)
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), **inputs).logits[0]
    scored = encoding.score_positions
    return token_statistics(logits[[t - 1 for t in scored]], ids[0, scored])


# ----------------------------------------------------------------------------------------------
# the stage
# ----------------------------------------------------------------------------------------------
class TargetScorer(Stage):
    """Add the target model's losses (and per-token statistics) to each sample and its neighbours.

    `model` is a Hub id, a local folder (a PEFT adapter folder loads base + adapter), or a loaded
    model (then `processor` is required). The model loads on first use, so a cached rerun never
    loads it. `on_error="skip"` keeps rows whose media cannot be read, with an `error` message and
    NaN scores; `"raise"` stops naming the row.
    """

    name = "score"
    version = "1"

    def __init__(
        self,
        model: Any,
        *,
        processor: Any = None,
        name: str | None = None,
        answer_only: bool = True,
        batch_size: int = 8,
        dtype: Any = "auto",
        device_map: Any = None,
        device: str | None = None,
        max_length: int | None = None,
        token_stats: bool | str = True,
        include_closing_tokens: bool = False,
        on_error: str = "raise",
        revision: str | None = None,
        system_prompt: str | None = None,
        num_frames: int = 8,
        prefix_reuse: bool = True,
    ) -> None:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
        if token_stats not in (True, False, "all"):
            raise ValueError(f"token_stats must be True, False or 'all', not {token_stats!r}")
        if not isinstance(model, (str, os.PathLike)) and processor is None:
            raise ValueError("a loaded model needs its `processor` (or tokenizer)")
        self.model_ref, self.processor_ref = model, processor
        self.model_name = name
        self.answer_only, self.include_closing_tokens = answer_only, include_closing_tokens
        self.batch_size, self.dtype, self.device_map, self.device = batch_size, dtype, device_map, device
        self.max_length, self.token_stats, self.on_error = max_length, token_stats, on_error
        self.revision, self.system_prompt, self.num_frames = revision, system_prompt, num_frames
        self.prefix_reuse = prefix_reuse
        self._engine: ScoringEngine | None = None
        self._encoder: ChatEncoder | None = None
        self._row_of: dict[str, int] = {}

    def fingerprint_inputs(self) -> dict[str, Any]:
        processor = self.processor_ref
        return {
            "model": model_fingerprint(self.model_ref, self.revision),
            "processor": None if processor is None else (getattr(processor, "name_or_path", None) or type(processor).__name__),
            "model_name": self.model_name,
            "answer_only": self.answer_only,
            "include_closing_tokens": self.include_closing_tokens,
            "dtype": str(self.dtype),
            "max_length": self.max_length,
            "token_stats": self.token_stats,
            "on_error": self.on_error,
            "system_prompt": self.system_prompt,
            "num_frames": self.num_frames,
        }

    # -- lazy model ---------------------------------------------------------------------------------
    def load(self) -> tuple[ScoringEngine, ChatEncoder]:
        """Load the model and processor (once)."""
        if self._engine is None:
            import torch

            if isinstance(self.model_ref, (str, os.PathLike)):
                model, processor = load_target(self.model_ref, revision=self.revision, dtype=self.dtype, device_map=self.device_map)
                processor = self.processor_ref or processor
            else:
                model, processor = self.model_ref, self.processor_ref
            if self.device_map is None:
                model.to(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))
            self._engine = ScoringEngine(model, batch_size=self.batch_size, prefix_reuse=self.prefix_reuse)
            self._encoder = ChatEncoder(
                processor,
                answer_only=self.answer_only,
                include_closing_tokens=self.include_closing_tokens,
                max_length=self.max_length,
                system_prompt=self.system_prompt,
            )
        return self._engine, self._encoder  # type: ignore[return-value]

    def apply(self, ds: datasets.Dataset, **kwargs: Any) -> datasets.Dataset:
        """Add the score columns to `ds` (cached; see `Stage.apply`)."""
        if "sample_id" in ds.column_names:
            self._row_of = {sid: i for i, sid in enumerate(ds["sample_id"])}
        return super().apply(ds, **kwargs)

    # -- per batch ------------------------------------------------------------------------------------
    def process(self, batch: dict[str, list]) -> dict[str, list]:
        engine, encoder = self.load()
        n_rows = len(batch["input"])
        modality = next((c for c in MEDIA_COLUMNS if c in batch), None)
        has_neighbors = "neighbors" in batch
        want_all = self.token_stats == "all"
        out: dict[str, list] = {"loss": []}
        if has_neighbors:
            out["neighbor_losses"] = []
        if self.token_stats:
            out.update({f"token_{s}": [] for s in STAT_NAMES})
            if want_all and has_neighbors:
                out.update({f"neighbor_token_{s}": [] for s in STAT_NAMES})
        if self.on_error == "skip":
            out["error"] = []
        for j in range(n_rows):
            neighbors = list(batch["neighbors"][j] or []) if has_neighbors else []
            answer = batch["answer"][j]
            column = modality
            try:
                media = encoder.load_media(modality, batch[modality][j], num_frames=self.num_frames) if modality else None
                column = "input"
                variants = [(batch["input"][j], answer)] + [(t, answer) for t in neighbors]
                encodings = encoder.encode_variants(variants, media, modality)
                stats = engine.score(encodings, [bool(self.token_stats)] + [want_all] * len(neighbors))
                error = ""
            except (MediaError, ValueError) as err:
                sid = batch["sample_id"][j] if "sample_id" in batch else None
                where = f"row {self._row_of[sid] + 1}" if sid in self._row_of else f"row {j + 1} of its batch"
                message = f"{where} (sample_id {sid!r}), column '{column}': {err}"
                if self.on_error == "raise":
                    raise ValueError(message) from err
                stats, error = None, message
            if stats is None:
                out["loss"].append(float("nan"))
                if has_neighbors:
                    out["neighbor_losses"].append([float("nan")] * len(neighbors))
                for key in out:
                    if key.startswith(("token_", "neighbor_token_")):
                        out[key].append([])
                out["error"].append(error)
                continue
            out["loss"].append(_loss(stats[0]))
            if has_neighbors:
                out["neighbor_losses"].append([_loss(s) for s in stats[1:]])
            if self.token_stats:
                for s in STAT_NAMES:
                    out[f"token_{s}"].append(stats[0][s])
                    if want_all and has_neighbors:
                        out[f"neighbor_token_{s}"].append([x[s] for x in stats[1:]])
            if self.on_error == "skip":
                out["error"].append(error)
        if self.model_name is not None:
            out["model_name"] = [self.model_name] * n_rows
        return out


# ----------------------------------------------------------------------------------------------
# scale-out and CLI
# ----------------------------------------------------------------------------------------------
def score_distributed(scorer: TargetScorer, ds: datasets.Dataset, **apply_kwargs: Any) -> datasets.Dataset | None:
    """Score `ds` across the processes of `accelerate launch`; rank 0 returns the whole result.

    Each process scores one contiguous shard into the stage cache; after a barrier, rank 0 reads
    every shard back from that cache (no model load) and concatenates them in the original order.
    Other ranks return None. A single process just scores.
    """
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    if state.num_processes == 1:
        return scorer.apply(ds, **apply_kwargs)
    if scorer.device_map is None and scorer.device is None:
        scorer.device = str(state.device)
    shards = [ds.shard(state.num_processes, i, contiguous=True) for i in range(state.num_processes)]
    scorer.apply(shards[state.process_index], **apply_kwargs)
    state.wait_for_everyone()
    result = None
    if state.is_main_process:
        result = datasets.concatenate_datasets([scorer.apply(shard, **apply_kwargs) for shard in shards])
    state.wait_for_everyone()
    return result


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
    from .data import load_samples, save_dataset

    ds = load_samples(args.data, media_root=args.media_root)
    stats: bool | str = {"none": False, "original": True, "all": "all"}[args.token_stats]
    scorer = TargetScorer(
        args.model,
        name=args.name,
        revision=args.revision,
        answer_only=not args.score_prompt,
        include_closing_tokens=args.include_closing_tokens,
        batch_size=args.batch_size,
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
        losses = np.asarray(result["loss"], dtype=float)
        print(f"scored {len(result)} samples -> {path} (mean loss {np.nanmean(losses):.4f})")
    return 0


# ----------------------------------------------------------------------------------------------
# benchmark
# ----------------------------------------------------------------------------------------------
def _word_neighbors(text: str, k: int, seed: int) -> list[str]:
    """Cheap deterministic word perturbations (delete / swap / duplicate) for the benchmark.

    Like the real neighbour generator, they never touch or move a media placeholder.
    """
    rng = np.random.default_rng(seed)
    words = text.split(" ")
    free = [i for i, w in enumerate(words) if "<" not in w]
    out = []
    for _ in range(k):
        w = list(words)
        i, j = (int(x) for x in rng.choice(free, 2))
        op = int(rng.integers(0, 3))
        if op == 0:
            del w[i]
        elif op == 1:
            w[i], w[j] = w[j], w[i]
        else:
            w.insert(i, w[i])
        out.append(" ".join(w))
    return out


def _time_both_ways(ds: datasets.Dataset, model: Any, processor: Any, batch_size: int, cache: Path) -> dict[str, float]:
    """Seconds and language-model input positions for this scorer and for the per-item reference loop."""
    scorer = TargetScorer(model, processor=processor, batch_size=batch_size, token_stats=False)
    engine, encoder = scorer.load()
    start = time.perf_counter()
    ours = scorer.apply(ds, cache_dir=cache)
    fast_s = time.perf_counter() - start
    start = time.perf_counter()
    reference, reference_tokens = [], 0
    for row in ds:
        for text in [row["input"], *row["neighbors"]]:
            image = load_media("image", row["image"])  # decoded and encoded again for every item
            encoding = encoder.encode(text, row["answer"], image, "image")
            reference.append(_loss(score_plain(model, encoding)))
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
_LAYOUTS = {  # the synthetic prompt is "instruction <image> question options ОТВЕТ:"
    "mera": lambda t: _MERA_PROMPT.format(question=t.split("<image>\n")[1].rsplit("\n", 1)[0]),
    "media_first": lambda t: "<image>\n" + t.replace("<image>\n", ""),
    "media_last": lambda t: t.replace("<image>\n", "") + "\n<image>",
}


def benchmark(
    n_samples: int = 4,
    k: int = 24,
    json_path: str | os.PathLike | None = None,
    *,
    size: str = "small",
    batch_size: int = 25,
    image_size: tuple[int, int] = (480, 320),
    workdir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """This scorer vs the original's way (one forward per item, batch 1, media re-encoded each time).

    Builds the `size` image-text model and synthetic image samples (resized to `image_size`; the
    default is CLEVR's 480x320, as in MERA's ruCLEVR: 187 image tokens at Qwen2.5-VL's own pixel
    limit) with `k` word-perturbed neighbours and scores them both ways in three prompt
    layouts: MERA's (the headline `speedup`), media first (the whole prompt after the media: the
    most prefix to share) and media last (the original's video and audio layout: every perturbed
    word comes before the media, so the media tokens run again for each neighbour). Returns the
    throughput ratios, the largest loss difference and the peak RSS.
    """
    import resource
    import tempfile

    from .data import load_samples
    from .testing import build_tiny, make_synthetic_samples

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(workdir or tmp)
        model_dir = build_tiny("image-text", root / f"image-text-{size}", size=size)
        ds = load_samples(make_synthetic_samples(root / "samples", modality="image", n=n_samples))
        for path in ds["image"]:
            load_media("image", path).resize(tuple(image_size)).save(path)
        model, processor = load_target(model_dir, dtype="float32")
        processor.image_processor.size["longest_edge"] = 12845056  # Qwen2.5-VL's own pixel limit, not the tiny one
        runs = {}
        for layout, to_layout in _LAYOUTS.items():
            prompts = [to_layout(t) for t in ds["input"]]
            table = ds.remove_columns("input").add_column("input", prompts)
            table = table.add_column("neighbors", [_word_neighbors(t, k, i) for i, t in enumerate(prompts)])
            runs[layout] = _time_both_ways(table, model, processor, batch_size, root / f"cache-{layout}")

    mera = runs["mera"]
    result = {
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
    if json_path is not None:
        Path(json_path).write_text(json.dumps(result, indent=2))
    return result

"""The scoring engine: exact per-token statistics of a sample and its neighbours.

One engine serves every model family (the package docstring says how it shares media and KV-cache
prefixes); `score_plain`, one full forward per item, is the reference it must agree with.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..chat import ChatEncoding, _common_prefix, is_per_token
from ..columns import TOKEN_STATS

_ENCODER_INPUTS = {"image": ("pixel_values", "image_grid_thw"), "video": ("pixel_values_videos", "video_grid_thw")}


def find_attr(model: Any, name: str) -> Any:
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


def loss_of(stats: dict[str, list[float]]) -> float:
    lp = stats["logprobs"]
    return -float(np.mean(lp)) if lp else float("nan")


class ScoringEngine:
    """Scores groups of encodings that share one media item (a sample and its neighbours)."""

    def __init__(self, model: Any, *, batch_size: int = 8, prefix_reuse: bool = True) -> None:
        import torch

        self.model = model.eval()
        self.batch_size = max(1, int(batch_size))
        self.prefix_reuse = prefix_reuse
        self.device = next(model.parameters()).device
        core_forward = find_attr(model, "forward")
        params = inspect.signature(core_forward).parameters if core_forward is not None else {}
        if "logits_to_keep" not in params:  # PEFT wrappers hide the signature: look at the wrapped model
            inner = getattr(model, "get_base_model", lambda: model)()
            params = inspect.signature(inner.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.keep_logits = "logits_to_keep" in params
        self.rope_index = find_attr(model, "get_rope_index")
        self.takes_encoder_outputs = "mm_encoder_outputs" in params
        self.torch = torch
        self.tokens_run = 0  # input positions run so far, padding included (benchmarks report it)

    def encode_media(self, media: dict[str, Any]) -> dict[str, Any] | None:
        """Run the media encoder once (models that accept `mm_encoder_outputs`), else None."""
        if not self.takes_encoder_outputs or not media:
            return None
        outputs, used = {}, set()
        for modality, (values_key, grid_key) in _ENCODER_INPUTS.items():
            getter = find_attr(self.model, f"get_{modality}_features")
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
            stats = group.results.get(first_of[tuple(e.input_ids)], {name: [] for name in TOKEN_STATS})
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

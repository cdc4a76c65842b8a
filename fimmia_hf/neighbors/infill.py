"""The infilling back-ends of the `fill` operation: a seq2seq sentinel model (T5, FRED-T5) or a
BERT-style masked LM, each filling every mask of many neighbours in one batched call.

The original called `generate` once per masked word. Here all masks of one neighbour are filled by
ONE `generate` call (a logits processor keeps the output in the `<extra_id_0> fill <extra_id_1> fill
... </s>` shape) and the neighbours of many samples are batched, sorted by length so padding is small.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from .operations import FillRequest

if TYPE_CHECKING:
    import torch

INFILL_STYLES: dict[str, dict[str, str]] = {
    "t5": {"prefix": "", "sentinel": "<extra_id_{i}>"},
    "fred-t5": {"prefix": "<SC1>", "sentinel": "<extra_id_{i}>", "eos_token": "</s>"},
    "mlm": {},
}


def load_infiller(
    model: Any,
    *,
    tokenizer: Any = None,
    style: str = "auto",
    overrides: dict[str, str] | None = None,
    revision: str | None = None,
    dtype: Any = None,
    device: Any = None,
    batch_size: int = 16,
) -> Infiller:
    """The back-end for a Hub id, a folder or a loaded model: seq2seq models fill sentinels, others
    must be masked LMs. `style` "auto" is FRED-T5's when the model id says so, else T5's."""
    from transformers import AutoConfig, AutoModelForMaskedLM, AutoModelForSeq2SeqLM, AutoTokenizer

    from ..configuration_fimmia import refuse_pickled_weights

    name = str(model) if isinstance(model, (str, os.PathLike)) else str(getattr(model, "name_or_path", ""))
    if isinstance(model, (str, os.PathLike)):
        refuse_pickled_weights(model)
        config = AutoConfig.from_pretrained(model, revision=revision)
        auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForMaskedLM
        kwargs = {"revision": revision, "use_safetensors": True, **({"dtype": dtype} if dtype is not None else {})}
        model = auto.from_pretrained(model, **kwargs)
    model = model.to(device).eval()
    if tokenizer is None:
        if not name:
            raise ValueError("pass tokenizer= with a loaded model that has no name_or_path")
        tokenizer = AutoTokenizer.from_pretrained(name, revision=revision)
    elif isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer, revision=revision)
    seq2seq = getattr(model.config, "is_encoder_decoder", False)
    if style == "auto":
        style = ("fred-t5" if "fred" in name.lower() else "t5") if seq2seq else "mlm"
    back_end = Seq2SeqInfiller if seq2seq else MaskedLMInfiller
    return back_end(model, tokenizer, {**INFILL_STYLES[style], **(overrides or {})}, batch_size)


class Infiller:
    """Fills the masks of `FillRequest`s, `batch_size` sequences per model call; counts its calls."""

    def __init__(self, model: Any, tokenizer: Any, style: dict[str, str], batch_size: int) -> None:
        self.model, self.tokenizer, self.style, self.batch_size = model, tokenizer, style, batch_size
        self.calls = 0

    def fill(self, requests: list[FillRequest]) -> list[list[str | None]]:
        """One fill (or None: keep the word) per mask of each request."""
        raise NotImplementedError

    def _chunks(self, texts: list[str]) -> Iterable[list[int]]:
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths pad less
        for start in range(0, len(order), self.batch_size):
            yield order[start : start + self.batch_size]

    def _word_ids(self, word: str) -> list[int]:
        return self.tokenizer(word, add_special_tokens=False)["input_ids"]


class Seq2SeqInfiller(Infiller):
    """T5-style span filling: masks become sentinels, one `generate` call fills them all."""

    def __init__(self, model: Any, tokenizer: Any, style: dict[str, str], batch_size: int) -> None:
        super().__init__(model, tokenizer, style, batch_size)
        sentinel = style.get("sentinel", "<extra_id_{i}>")
        vocab = tokenizer.get_vocab()
        self.sentinel_ids = []
        while sentinel.format(i=len(self.sentinel_ids)) in vocab:
            self.sentinel_ids.append(vocab[sentinel.format(i=len(self.sentinel_ids))])
        if not self.sentinel_ids:
            raise ValueError(
                f"the tokenizer has no {sentinel.format(i=0)!r} token; set sentinel= to the model's mask format"
            )
        eos = style.get("eos_token") or tokenizer.eos_token
        self.eos_id = tokenizer.convert_tokens_to_ids(eos)
        if self.eos_id is None:
            raise ValueError(f"the tokenizer has no end token {eos!r}; set eos_token=")

    def _first_visible(self, ids: list[int]) -> int:
        """The first token of a word that is more than a space marker (-1: none), banned at span start."""
        return next((i for i in ids if self.tokenizer.decode([i]).strip()), -1)

    def fill(self, requests: list[FillRequest]) -> list[list[str | None]]:
        import torch
        from transformers import LogitsProcessorList

        sentinel, prefix = self.style.get("sentinel", "<extra_id_{i}>"), self.style.get("prefix", "")
        usable = len(self.sentinel_ids)
        texts = []
        for request in requests:
            parts = [request.pieces[0]]
            for j, piece in enumerate(request.pieces[1:]):
                # beyond the tokenizer's sentinels, a word stays as it is
                parts.append((sentinel.format(i=j) if j < usable else request.cores[j]) + piece)
            texts.append(prefix + "".join(parts))
        banned = sorted(set(self.tokenizer.all_special_ids) | set(self.sentinel_ids) | {self.eos_id})
        results: list[list[str | None]] = [[] for _ in requests]
        device = self.model.device
        for chunk in self._chunks(texts):
            n = [min(len(requests[i].cores), usable) for i in chunk]
            words = [[self._word_ids(" " + c) or [self.eos_id] for c in requests[i].cores[:usable]] for i in chunk]
            caps = [[len(w) + 3 for w in ws] for ws in words]  # the original allowed len(word) + 3 tokens
            first = [[self._first_visible(w) for w in ws] for ws in words]
            shape = SpanShape(self.sentinel_ids[: max(n) + 1], self.eos_id, banned, n, caps, first)
            encoded = self.tokenizer([texts[i] for i in chunk], return_tensors="pt", padding=True).to(device)
            with torch.inference_mode():
                generated = self.model.generate(
                    **encoded,
                    do_sample=False,
                    num_beams=1,
                    max_new_tokens=max(sum(c) + len(c) + 1 for c in caps),
                    logits_processor=LogitsProcessorList([shape]),
                    eos_token_id=self.eos_id,
                )
            self.calls += 1
            for row, i in zip(generated.tolist(), chunk):
                results[i] = self._parse(row, len(requests[i].cores))
        return results

    def _parse(self, ids: list[int], count: int) -> list[str | None]:
        """Split generated ids at the sentinels; span j is the text after sentinel j."""
        fills: list[str | None] = [None] * count
        index = {tok: j for j, tok in enumerate(self.sentinel_ids)}
        current, tokens = None, []
        for tok in ids + [self.eos_id]:
            if tok in index or tok == self.eos_id:
                if current is not None and current < count:
                    text = " ".join(self.tokenizer.decode(tokens, skip_special_tokens=True).split())
                    fills[current] = text or None
                if tok == self.eos_id:
                    break
                current, tokens = index[tok], []
            elif current is not None:
                tokens.append(tok)
        return fills


class MaskedLMInfiller(Infiller):
    """BERT-style filling: one forward per batch; each sub-token mask takes the best token other than
    the original's."""

    def __init__(self, model: Any, tokenizer: Any, style: dict[str, str], batch_size: int) -> None:
        super().__init__(model, tokenizer, style, batch_size)
        if tokenizer.mask_token is None:
            raise ValueError(
                f"{type(model).__name__} is neither a seq2seq infilling model nor a masked LM (no mask token)"
            )

    def fill(self, requests: list[FillRequest]) -> list[list[str | None]]:
        import torch

        mask = self.tokenizer.mask_token
        originals = [[self._word_ids(c) or [self.tokenizer.mask_token_id] for c in r.cores] for r in requests]
        texts = []
        for request, ids in zip(requests, originals):
            texts.append(request.pieces[0] + "".join(mask * len(w) + p for w, p in zip(ids, request.pieces[1:])))
        banned = torch.tensor(sorted(set(self.tokenizer.all_special_ids)))
        max_length = self.tokenizer.model_max_length
        if not max_length or max_length > 100_000:  # tokenizer without a limit: stay inside the positions
            max_length = getattr(self.model.config, "max_position_embeddings", 514) - 2
        results: list[list[str | None]] = [[] for _ in requests]
        for chunk in self._chunks(texts):
            encoded = self.tokenizer(
                [texts[i] for i in chunk], return_tensors="pt", padding=True, truncation=True, max_length=max_length
            ).to(self.model.device)
            with torch.inference_mode():
                logits = self.model(**encoded).logits.float().cpu()
            logits = logits.clone()  # a normal tensor, so it can be edited in place
            self.calls += 1
            logits[..., banned[banned < logits.shape[-1]]] = float("-inf")
            for b, i in enumerate(chunk):
                positions = (encoded["input_ids"][b] == self.tokenizer.mask_token_id).nonzero().flatten().tolist()
                fills: list[str | None] = []
                for word in originals[i]:
                    taken, positions = positions[: len(word)], positions[len(word) :]
                    if len(taken) < len(word):  # cut by truncation: keep the word
                        fills.append(None)
                        continue
                    scores = logits[b, taken].clone()
                    scores[torch.arange(len(word)), torch.tensor(word)] = float("-inf")
                    text = self.tokenizer.decode(scores.argmax(-1).tolist(), skip_special_tokens=True)
                    fills.append(" ".join(text.split()) or None)
                results[i] = fills
        return results


class SpanShape:
    """Logits processor keeping a seq2seq infill in the shape `<s0> fill <s1> fill ... </s>`.

    Per row: sentinels come in order, each span gets at least one token and at most `caps[j]`
    (then the next sentinel is forced, like the original's per-fill `max_length`), the first token
    of a span may not be the masked word's first token (so the word changes), and no other special
    token is produced. Real T5 models emit this shape anyway; tiny or odd models are kept parseable.
    """

    def __init__(
        self,
        sentinel_ids: list[int],
        eos_id: int,
        banned_ids: list[int],
        n: list[int],
        caps: list[list[int]],
        first: list[list[int]],
    ):
        import torch

        width = max(max(n), 1)
        self.sentinels = torch.tensor(sentinel_ids)
        self.eos, self.banned_ids = eos_id, banned_ids
        self.n = torch.tensor(n)
        self.caps = torch.tensor([c + [1] * (width - len(c)) for c in caps])
        self.first = torch.tensor([f + [-1] * (width - len(f)) for f in first])
        self._banned = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        import torch

        device = scores.device
        if self._banned is None or self._banned.shape[0] != scores.shape[-1]:
            self._banned = torch.zeros(scores.shape[-1], dtype=torch.bool)
            self._banned[[i for i in self.banned_ids if i < scores.shape[-1]]] = True
            self.sentinels, self.n, self.caps, self.first = (
                t.to(device) for t in (self.sentinels, self.n, self.caps, self.first)
            )
            self._banned = self._banned.to(device)
        rows = torch.arange(scores.shape[0], device=device)
        is_sentinel = torch.isin(input_ids, self.sentinels)
        count = is_sentinel.sum(1)
        positions = torch.arange(input_ids.shape[1], device=device)
        last = torch.where(is_sentinel, positions, -1).max(1).values
        since = input_ids.shape[1] - 1 - last
        span = (count - 1).clamp(min=0, max=self.caps.shape[1] - 1)
        cap = self.caps[rows, span]
        terminator = torch.where(
            count >= self.n, torch.full_like(count, self.eos), self.sentinels[count.clamp(max=len(self.sentinels) - 1)]
        )
        out = scores.masked_fill(self._banned, float("-inf"))
        may_close = (count >= 1) & (since >= 1)
        out[rows[may_close], terminator[may_close]] = scores[rows[may_close], terminator[may_close]]
        opening = (count >= 1) & (since == 0) & (self.first[rows, span] >= 0)
        out[rows[opening], self.first[rows, span][opening]] = float("-inf")
        forced = (count == 0) | ((count >= 1) & (since >= cap))
        target = torch.where(count == 0, self.sentinels[0].expand_as(count), terminator)
        out[forced] = float("-inf")
        out[rows[forced], target[forced]] = 0.0
        return out

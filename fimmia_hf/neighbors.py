"""Neighbour generation: K perturbed copies of each sample's prompt, as a cached `datasets.map` stage.

FiMMIA compares the target's loss on a sample with its loss on slightly changed copies
("neighbours"). Four word-level operations make them, about `mask_ratio` of the words each:
span filling by an infilling model (T5 sentinels, FRED-T5's `<SC1>` prefix, or a BERT-style masked
LM), deletion, duplication and swap. Unlike the original:

- all masks of one neighbour are filled by ONE `generate` call (a logits processor keeps the output
  in the `<extra_id_0> fill <extra_id_1> fill ... </s>` shape), and the neighbours of many samples are
  batched, instead of one `generate` call per masked word;
- media placeholders, option letters, answer/question markers and user regexes are never changed,
  deleted, duplicated or moved, and the original's whitespace and line breaks are kept (words are
  changed in place between the original separators);
- every random choice comes from a generator seeded by a hash of (seed, sample_id, op, k), so the
  same sample gets the same neighbours in any process and in any batch;
- neighbours differ from the original and from each other; a text too short for K of them gets
  fewer, and says so in `num_neighbors` (never padded with copies);
- truncation to `max_text_len` only changes the generated rows (the `input` column of the output,
  flagged by `input_truncated`), never the user's file.

With `media_perturbation=True`, each neighbour also gets a seeded, slightly perturbed copy of the
sample's image/audio/video (`fimmia_hf.perturb_media`), written beside the stage cache.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets
import numpy as np

from .media import MEDIA_COLUMNS, MediaError
from .perturb_media import MediaPerturbation, write_perturbed
from .stage import Stage, default_cache_dir, model_fingerprint

if TYPE_CHECKING:
    import torch

OPS = ("fill", "delete", "duplicate", "swap")

DEFAULT_PROTECTED: tuple[str, ...] = (
    r"<(?:image|audio|video)(?:_\d+)?>",  # media placeholders
    r"(?<!\S)\(?[A-HА-З][.)](?!\S)",  # option letters: "A.", "B)", "(C)" standing alone
    r"(?i)\b(?:ОТВЕТ|ANSWER|ВОПРОС|QUESTION)\s*:",  # answer / question markers
)

INFILL_STYLES: dict[str, dict[str, str]] = {
    "t5": {"prefix": "", "sentinel": "<extra_id_{i}>"},
    "fred-t5": {"prefix": "<SC1>", "sentinel": "<extra_id_{i}>", "eos_token": "</s>"},
    "mlm": {},
}

_SPLIT = re.compile(r"(\S+)")
_CORE = re.compile(r"^(\W*)(.*?)(\W*)$", re.S)
_ALNUM = re.compile(r"\w")
_FILL_ROUNDS = 3  # fill rounds: later ones retry samples whose fills collided with other neighbours


def derive_seed(*parts: Any) -> int:
    """A 64-bit seed from a sha256 of the parts: stable across processes (unlike `hash()`)."""
    return int.from_bytes(hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()[:8], "little")


@dataclass
class _Words:
    """A text as word tokens plus the exact separators around them (`seps[i]` precedes `words[i]`)."""

    words: list[str]
    seps: list[str]
    protected: list[bool]

    @classmethod
    def parse(cls, text: str, patterns: Sequence[re.Pattern]) -> _Words:
        parts = _SPLIT.split(text)
        words, seps = parts[1::2], parts[0::2]
        spans = [m.span() for p in patterns for m in p.finditer(text) if m.end() > m.start()]
        protected, pos = [], len(seps[0])
        for word, sep in zip(words, seps[1:]):
            start, end = pos, pos + len(word)
            protected.append(any(s < end and start < e for s, e in spans))
            pos = end + len(sep)
        return cls(words, seps, protected)

    def text(self, words: list[str] | None = None, seps: list[str] | None = None) -> str:
        words, seps = words if words is not None else self.words, seps if seps is not None else self.seps
        return seps[0] + "".join(w + s for w, s in zip(words, seps[1:]))

    @property
    def eligible(self) -> list[int]:
        """Words that may be filled, deleted or duplicated: unprotected and containing a letter/digit."""
        return [i for i, (w, p) in enumerate(zip(self.words, self.protected)) if not p and _ALNUM.search(w)]

    @property
    def movable(self) -> list[int]:
        """Words that may be swapped: every unprotected word."""
        return [i for i, p in enumerate(self.protected) if not p]


def _merge_separators(left: str, right: str, *, first: bool, last: bool) -> str:
    """The separator left when the word between `left` and `right` is deleted; line breaks survive,
    and so do the text's leading and trailing whitespace."""
    if "\n" in left and "\n" in right:
        return left + right
    if "\n" in right or (last and not first):
        return right
    return left if left or first else right


def truncate_tail(text: str, max_len: int) -> str:
    """The last `max_len` characters, starting at a word boundary (the end holds the question)."""
    if len(text) <= max_len:
        return text
    cut = len(text) - max_len
    if not text[cut - 1].isspace():
        match = re.search(r"\s", text[cut:])
        cut = cut + match.start() if match else cut
    return text[cut:]


@dataclass
class _FillRequest:
    """One neighbour to fill: the text pieces around the masks and the masked words' cores."""

    row: int
    pieces: list[str]  # len(cores) + 1 pieces; masks go between them
    cores: list[str]
    build: Any  # callable(fills) -> neighbour text


@dataclass
class _RowState:
    sample_id: str
    text: _Words
    mask_count: int
    seen: set[str] = field(default_factory=set)
    made: dict[str, list[str]] = field(default_factory=dict)
    attempts: dict[str, int] = field(default_factory=dict)


class NeighborGenerator(Stage):
    """Add `neighbors`, `neighbor_ops`, `num_neighbors` (+ `media_neighbors`) columns to samples.

    Args:
        model: infilling model for the `fill` op: a Hub id or local folder (seq2seq T5-style, or a
            BERT-style masked LM), or a loaded model (then pass `tokenizer`). Not needed without `fill`.
        num_neighbors: K, split evenly over `ops` (the first ops get the remainder).
        ops: any of "fill", "delete", "duplicate", "swap".
        mask_ratio, min_masks, max_masks: words changed per neighbour: `mask_ratio` of the words,
            clipped to [min(min_masks, eligible - 1), max_masks] (the original's rule).
        max_text_len: longer prompts keep their last `max_text_len` characters (in the output rows only).
        seed: with `sample_id`, fixes every random choice.
        protected: extra regexes (str or compiled) whose matches are never touched, on top of
            `DEFAULT_PROTECTED` (media placeholders, option letters, answer/question markers).
        media_perturbation: also write one perturbed media file per neighbour (`media_neighbors`);
            `True` uses `MediaPerturbation()`, or pass a `MediaPerturbation` to set strengths.
        batch_size: rows per `map` batch and sequences per `generate` call.
        infill_style: "auto" (FRED-T5 if the model id says so, "mlm" for masked LMs, else "t5"),
            "t5", "fred-t5" or "mlm"; `prefix`, `sentinel` (with `{i}`) and `eos_token` override it.
        column: the text column to perturb ("input"; "answer" to perturb answers).
    """

    name = "neighbors"
    version = "1"

    def __init__(
        self,
        model: Any = None,
        *,
        num_neighbors: int = 24,
        ops: Sequence[str] = OPS,
        mask_ratio: float = 0.1,
        min_masks: int = 5,
        max_masks: int = 40,
        max_text_len: int = 4000,
        seed: int = 0,
        protected: Iterable[str | re.Pattern] | None = None,
        media_perturbation: bool | MediaPerturbation = False,
        batch_size: int = 16,
        infill_style: str = "auto",
        prefix: str | None = None,
        sentinel: str | None = None,
        eos_token: str | None = None,
        tokenizer: Any = None,
        revision: str | None = None,
        device: str | None = None,
        dtype: Any = None,
        column: str = "input",
    ) -> None:
        ops = tuple(ops)
        unknown = [op for op in ops if op not in OPS]
        if unknown or not ops or len(set(ops)) != len(ops):
            raise ValueError(f"ops must be distinct names from {', '.join(OPS)}; got {', '.join(ops) or 'none'}")
        if "fill" in ops and model is None:
            raise ValueError(
                "the 'fill' operation needs an infilling model (model=<T5/FRED-T5/BERT id or folder>); "
                "or drop it: ops=('delete', 'duplicate', 'swap')"
            )
        if num_neighbors < 1:
            raise ValueError(f"num_neighbors must be at least 1, got {num_neighbors}")
        if not 0 <= mask_ratio <= 1 or min_masks < 0 or max_masks < 1:
            raise ValueError("need 0 <= mask_ratio <= 1, min_masks >= 0 and max_masks >= 1")
        if infill_style not in (*INFILL_STYLES, "auto"):
            raise ValueError(f"infill_style must be 'auto' or one of {', '.join(INFILL_STYLES)}; got {infill_style!r}")
        self.model, self.tokenizer, self.revision = model, tokenizer, revision
        self.num_neighbors, self.ops = num_neighbors, ops
        self.mask_ratio, self.min_masks, self.max_masks = mask_ratio, min_masks, max_masks
        self.max_text_len, self.seed, self.column = max_text_len, seed, column
        self.patterns = [
            p if isinstance(p, re.Pattern) else re.compile(p) for p in (*DEFAULT_PROTECTED, *(protected or ()))
        ]
        if media_perturbation is True:
            media_perturbation = MediaPerturbation()
        self.media: MediaPerturbation | None = media_perturbation or None
        self.batch_size = batch_size
        self.infill_style = infill_style
        self.infill_overrides = {
            k: v for k, v in {"prefix": prefix, "sentinel": sentinel, "eos_token": eos_token}.items() if v is not None
        }
        self.device, self.dtype = device, dtype
        self._infiller: _Infiller | None = None
        self._media_dir: Path | None = None
        self._media_column: str | None = None

    # ------------------------------------------------------------------ stage plumbing
    def quotas(self) -> dict[str, int]:
        """Neighbours asked of each op: K split evenly, the first ops taking the remainder."""
        base, extra = divmod(self.num_neighbors, len(self.ops))
        return {op: base + (i < extra) for i, op in enumerate(self.ops)}

    def fingerprint_inputs(self) -> dict[str, Any]:
        uses_model = "fill" in self.ops
        return {
            "model": model_fingerprint(self.model, self.revision) if uses_model else "none",
            "tokenizer": model_fingerprint(self.tokenizer, self.revision)
            if uses_model and self.tokenizer is not None
            else "none",
            "infill": [self.infill_style, sorted(self.infill_overrides.items())] if uses_model else "none",
            "dtype": str(self.dtype) if uses_model else "none",
            "ops": list(self.ops),
            "num_neighbors": self.num_neighbors,
            "masks": [self.mask_ratio, self.min_masks, self.max_masks],
            "max_text_len": self.max_text_len,
            "seed": self.seed,
            "protected": [(p.pattern, p.flags) for p in self.patterns],
            "media": asdict(self.media) if self.media else None,
            "column": self.column,
        }

    def apply(
        self, ds: datasets.Dataset, *, cache_dir: str | os.PathLike | None = None, **map_kwargs: Any
    ) -> datasets.Dataset:
        """Add the neighbour columns to `ds` (cached; a rerun with the same inputs never loads the model)."""
        if self.column not in ds.column_names:
            raise ValueError(f"no {self.column!r} column to perturb (columns: {', '.join(ds.column_names)})")
        if "sample_id" not in ds.column_names:
            raise ValueError("samples need a 'sample_id' column; load them with fimmia_hf.load_samples")
        empty = [
            (i, sid) for i, (text, sid) in enumerate(zip(ds[self.column], ds["sample_id"])) if not (text or "").strip()
        ]
        if empty:
            listed = "; ".join(f"row {i + 1} (sample_id {sid})" for i, sid in empty[:10])
            raise ValueError(
                f"empty {self.column!r} text, nothing to perturb: {listed}" + (" ..." if len(empty) > 10 else "")
            )
        self._media_column = next((c for c in MEDIA_COLUMNS if c in ds.column_names), None)
        if self.media and not self._media_column:
            warnings.warn("media_perturbation is on but the samples have no image/audio/video column", stacklevel=2)
        if self.media and self._media_column:
            folder = Path(cache_dir) if cache_dir else default_cache_dir() / self.name
            self._media_dir = folder / f"media-{self.fingerprint(ds)}"
        return super().apply(ds, cache_dir=cache_dir, **map_kwargs)

    @property
    def model_calls(self) -> int:
        """How many `generate` (or masked-LM forward) calls this generator has made so far."""
        return self._infiller.calls if self._infiller else 0

    def _load_infiller(self) -> _Infiller:
        if self._infiller is None:
            self._infiller = _Infiller.load(self)
        return self._infiller

    # ------------------------------------------------------------------ per-row planning
    def _mask_count(self, words: _Words) -> int:
        eligible = len(words.eligible)
        if eligible == 0:
            return 0
        floor = max(1, min(self.min_masks, eligible - 1))
        return min(max(int(len(words.words) * self.mask_ratio), floor), self.max_masks, eligible)

    def _rng(self, sample_id: str, op: str, k: int) -> np.random.Generator:
        return np.random.default_rng(derive_seed(self.seed, sample_id, op, k))

    def _edit(self, state: _RowState, op: str, rng: np.random.Generator) -> str | None:
        """One delete/duplicate/swap neighbour; None when the op cannot apply to this text."""
        text, count = state.text, state.mask_count
        words, seps = list(text.words), list(text.seps)
        if op in ("delete", "duplicate"):
            eligible = text.eligible
            if not eligible or (op == "delete" and len(text.words) < 2):
                return None
            count = min(count, len(eligible) - (op == "delete" and len(eligible) == len(text.words)))
            if count < 1:
                return None
            picked = sorted(rng.choice(eligible, size=count, replace=False).tolist(), reverse=True)
            for i in picked:
                if op == "delete":
                    del words[i]
                    seps[i : i + 2] = [_merge_separators(seps[i], seps[i + 1], first=i == 0, last=i == len(words))]
                else:
                    words.insert(i + 1, words[i])
                    seps.insert(i + 1, " ")
            return text.text(words, seps)
        movable = text.movable
        if len(set(text.words[i] for i in movable)) < 2:
            return None
        for _ in range(max(1, count)):
            i, j = rng.choice(movable, size=2, replace=False).tolist()
            while words[i] == words[j]:
                i, j = rng.choice(movable, size=2, replace=False).tolist()
            words[i], words[j] = words[j], words[i]
        return text.text(words, seps)

    def _fill_request(self, row: int, state: _RowState, rng: np.random.Generator) -> _FillRequest:
        text = state.text
        picked = set(rng.choice(text.eligible, size=state.mask_count, replace=False).tolist())
        pieces, cores = [], []
        current = text.seps[0]
        for i, (word, sep) in enumerate(zip(text.words, text.seps[1:])):
            if i in picked:
                lead, core, trail = _CORE.match(word).groups()
                if not core:  # the whole token is "punctuation" to \W (e.g. "№"): mask it all
                    lead, core, trail = "", word, ""
                pieces.append(current + lead)
                cores.append(core)
                current = trail + sep
            else:
                current += word + sep
        pieces.append(current)

        def build(fills: list[str | None]) -> str:
            out = pieces[0]
            for core, fill, piece in zip(cores, fills, pieces[1:]):
                out += (fill if fill else core) + piece
            return out

        return _FillRequest(row, pieces, cores, build)

    def _run_fill(self, states: list[_RowState], quota: int) -> None:
        """Fill neighbours for all rows, batched; rows whose fills collide get up to two more rounds."""
        active = [r for r, s in enumerate(states) if s.mask_count > 0]
        for _ in range(_FILL_ROUNDS):
            requests = []
            for r in active:
                state = states[r]
                need = quota - len(state.made["fill"])
                for _ in range(need):
                    k = state.attempts["fill"]
                    state.attempts["fill"] = k + 1
                    requests.append(self._fill_request(r, state, self._rng(state.sample_id, "fill", k)))
            if not requests:
                return
            fills = self._load_infiller().fill(requests)
            for request, filled in zip(requests, fills):
                state = states[request.row]
                candidate = request.build(filled)
                if candidate not in state.seen and len(state.made["fill"]) < quota:
                    state.seen.add(candidate)
                    state.made["fill"].append(candidate)
            active = [r for r in active if len(states[r].made["fill"]) < quota]

    # ------------------------------------------------------------------ the map function
    def process(self, batch: dict[str, list]) -> dict[str, list]:
        """Neighbours for a batch of rows (called by `datasets.map`)."""
        texts, ids = batch[self.column], batch["sample_id"]
        truncated = [len(t) > self.max_text_len for t in texts]
        texts = [truncate_tail(t, self.max_text_len) for t in texts]
        states = []
        for text, sid in zip(texts, ids):
            if not text.strip():
                raise ValueError(f"sample_id {sid}: empty {self.column!r} text, nothing to perturb")
            words = _Words.parse(text, self.patterns)
            states.append(_RowState(sid, words, self._mask_count(words), seen={text}))
        quotas = self.quotas()
        for state in states:
            state.made = {op: [] for op in self.ops}
            state.attempts = {op: 0 for op in self.ops}
        for op in self.ops:
            if op == "fill":
                self._run_fill(states, quotas[op])
                continue
            for state in states:
                if state.mask_count == 0:
                    continue
                for k in range(4 * quotas[op] + 8):
                    if len(state.made[op]) >= quotas[op]:
                        break
                    candidate = self._edit(state, op, self._rng(state.sample_id, op, k))
                    if candidate is None:
                        break
                    if candidate not in state.seen:
                        state.seen.add(candidate)
                        state.made[op].append(candidate)

        out: dict[str, list] = {"neighbors": [], "neighbor_ops": [], "num_neighbors": []}
        short = []
        for state in states:
            neighbors = [n for op in self.ops for n in state.made[op]]
            out["neighbors"].append(neighbors)
            out["neighbor_ops"].append([op for op in self.ops for _ in state.made[op]])
            out["num_neighbors"].append(len(neighbors))
            if len(neighbors) < self.num_neighbors:
                short.append(f"{state.sample_id} ({len(neighbors)})")
        if short:
            warnings.warn(
                f"{len(short)} sample(s) got fewer than {self.num_neighbors} distinct neighbours because their "
                f"text is too short (see the 'num_neighbors' column): {', '.join(short[:10])}"
                + (" ..." if len(short) > 10 else ""),
                stacklevel=2,
            )
        out[self.column] = texts  # truncated where flagged; the user's file is never touched
        out[f"{self.column}_truncated"] = truncated
        modality = self._media_column or next((c for c in MEDIA_COLUMNS if c in batch), None)
        if self.media and modality:
            out["media_neighbors"] = [
                self._media_for(modality, value, sid, len(n))
                for value, sid, n in zip(batch[modality], ids, out["neighbors"])
            ]
        return out

    def _media_for(self, modality: str, value: Any, sample_id: str, count: int) -> list[str]:
        """One perturbed media file per neighbour, named by sample and index, seeded by (seed, sample_id, k)."""
        if value is None or count == 0:
            return []
        folder = (
            self._media_dir
            or default_cache_dir()
            / self.name
            / f"media-{derive_seed(json.dumps(self.fingerprint_inputs(), sort_keys=True, default=str))}"
        )
        stem = re.sub(r"[^A-Za-z0-9_.-]", "_", str(sample_id))[:48] + f"-{derive_seed(sample_id) % 16**8:08x}"
        seeds = [derive_seed(self.seed, sample_id, "media", k) for k in range(count)]
        try:
            return write_perturbed(modality, value, seeds, folder, stem, self.media)
        except MediaError as err:
            raise MediaError(f"sample_id {sample_id}: {err}") from err


# ---------------------------------------------------------------------- infilling models
class _SpanShape:
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


class _Infiller:
    """Fills masked words with a seq2seq sentinel model or a masked LM, batched over neighbours."""

    def __init__(self, model: Any, tokenizer: Any, style: dict[str, str], batch_size: int) -> None:
        self.model, self.tokenizer, self.style, self.batch_size = model, tokenizer, style, batch_size
        self.calls = 0
        self.is_mlm = not getattr(model.config, "is_encoder_decoder", False)
        if self.is_mlm:
            if tokenizer.mask_token is None:
                raise ValueError(
                    f"{type(model).__name__} is neither a seq2seq infilling model nor a masked LM (no mask token)"
                )
            return
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

    @classmethod
    def load(cls, gen: NeighborGenerator) -> _Infiller:
        import torch
        from transformers import AutoConfig, AutoModelForMaskedLM, AutoModelForSeq2SeqLM, AutoTokenizer

        device = gen.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model, tokenizer = gen.model, gen.tokenizer
        name = str(model) if isinstance(model, (str, os.PathLike)) else str(getattr(model, "name_or_path", ""))
        if isinstance(model, (str, os.PathLike)):
            config = AutoConfig.from_pretrained(model, revision=gen.revision)
            auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForMaskedLM
            kwargs = {"revision": gen.revision, "use_safetensors": True}
            if gen.dtype is not None:
                kwargs["dtype"] = gen.dtype
            model = auto.from_pretrained(model, **kwargs).to(device)
        elif gen.device is not None:
            model = model.to(device)
        if tokenizer is None:
            if not name:
                raise ValueError("pass tokenizer= with a loaded model that has no name_or_path")
            tokenizer = AutoTokenizer.from_pretrained(name, revision=gen.revision)
        elif isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = AutoTokenizer.from_pretrained(tokenizer, revision=gen.revision)
        model.eval()
        style_name = gen.infill_style
        if style_name == "auto":
            if not getattr(model.config, "is_encoder_decoder", False):
                style_name = "mlm"
            else:
                style_name = "fred-t5" if "fred" in name.lower() else "t5"
        style = {**INFILL_STYLES[style_name], **gen.infill_overrides}
        return cls(model, tokenizer, style, gen.batch_size)

    def _chunks(self, texts: list[str]) -> Iterable[list[int]]:
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths pad less
        for start in range(0, len(order), self.batch_size):
            yield order[start : start + self.batch_size]

    def _first_visible(self, ids: list[int]) -> int:
        """The first token of a word that is more than a space marker (-1: none), banned at span start."""
        return next((i for i in ids if self.tokenizer.decode([i]).strip()), -1)

    def _word_ids(self, word: str) -> list[int]:
        return self.tokenizer(word, add_special_tokens=False)["input_ids"]

    def fill(self, requests: list[_FillRequest]) -> list[list[str | None]]:
        """One fill (or None: keep the word) per mask of each request."""
        return self._fill_mlm(requests) if self.is_mlm else self._fill_seq2seq(requests)

    def _fill_seq2seq(self, requests: list[_FillRequest]) -> list[list[str | None]]:
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
            shape = _SpanShape(self.sentinel_ids[: max(n) + 1], self.eos_id, banned, n, caps, first)
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

    def _fill_mlm(self, requests: list[_FillRequest]) -> list[list[str | None]]:
        """One forward per chunk; each sub-token mask takes the best token other than the original's."""
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


# ---------------------------------------------------------------------- CLI
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
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if available)")
    parser.add_argument("--cache-dir", help="stage cache folder (default $FIMMIA_HF_CACHE/neighbors)")
    parser.add_argument("--modality", choices=[*MEDIA_COLUMNS, "text"], help="expected modality")
    parser.add_argument("--media-root", help="folder media paths are relative to (default: the table's folder)")


def run_neighbors(args: argparse.Namespace) -> int:
    from .data import load_samples, save_dataset

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
        batch_size=args.batch_size,
        infill_style=args.infill_style,
        prefix=args.prefix,
        revision=args.revision,
        device=args.device,
        column=args.column,
    )
    out = generator.apply(ds, cache_dir=args.cache_dir)
    path = save_dataset(out, args.out, inputs=[args.data])
    counts = out["num_neighbors"]
    short = sum(c < args.num_neighbors for c in counts)
    print(
        f"{len(out)} samples, {sum(counts)} neighbours (mean {sum(counts) / max(len(counts), 1):.1f}/sample; "
        f"{short} with fewer than {args.num_neighbors}) -> {path}"
    )
    return 0


# ---------------------------------------------------------------------- benchmark
_BENCH_WORDS = (
    "the quick brown fox jumps over a lazy dog while seven red birds sing near an old stone bridge "
    "and children play with green kites in the wide summer field beside quiet blue water"
).split()


def _reference_fill(model: Any, tokenizer: Any, text: str, count: int, rng: np.random.Generator) -> tuple[str, int]:
    """The original's substitution: one random word masked and filled per `generate` call, sequentially."""
    import torch

    calls = 0
    for _ in range(count):
        tokens = text.split()
        candidates = [i for i, w in enumerate(tokens) if _ALNUM.search(w)]
        if not candidates:
            break
        i = int(rng.choice(candidates))
        word = tokens[i]
        tokens[i] = "<extra_id_0>"
        encoded = tokenizer(" ".join(tokens), return_tensors="pt").to(model.device)
        with torch.inference_mode():
            out = model.generate(**encoded, max_length=len(tokenizer.encode(word)) + 5, do_sample=False, num_beams=1)
        calls += 1
        decoded = tokenizer.decode(out[0][2:], skip_special_tokens=False).split("<extra_id_1>")[0]
        fill = " ".join(decoded.replace("</s>", " ").replace("<pad>", " ").split()) or word
        text = " ".join(tokens[:i] + [fill] + tokens[i + 1 :])
    return text, calls


def benchmark(
    n_samples: int = 8,
    json_path: str | os.PathLike | None = None,
    *,
    model: str | os.PathLike | None = None,
    words: int = 80,
    neighbors_per_sample: int = 6,
    batch_size: int = 48,
    device: str | None = None,
) -> dict[str, Any]:
    """Time this generator's `fill` against the original's one-word-per-`generate` loop.

    Same model (a tiny T5 built offline unless `model` is given), same samples (`n_samples` prompts
    of `words` words), `neighbors_per_sample` fill neighbours each (the original's 6); `batch_size`
    sequences per `generate` call (48: all 8 x 6 neighbours at once). Model loading is excluded
    from both timings. Returns and optionally writes
    `{"speedup", "generate_calls": [ours, reference], "seconds": [ours, reference], ...}`.
    """
    import tempfile

    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        if model is None:
            from .testing import build_tiny

            model = build_tiny("t5-infill", Path(tmp) / "t5")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        loaded = AutoModelForSeq2SeqLM.from_pretrained(model, use_safetensors=True).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(model)
        rng = np.random.default_rng(0)
        texts = [" ".join(rng.choice(_BENCH_WORDS, size=words).tolist()) for _ in range(n_samples)]
        batch = {"input": texts, "sample_id": [f"bench-{i}" for i in range(n_samples)]}

        generator = NeighborGenerator(
            loaded,
            tokenizer=tokenizer,
            ops=("fill",),
            num_neighbors=neighbors_per_sample,
            infill_style="t5",
            batch_size=batch_size,
        )
        start = time.perf_counter()
        ours = generator.process(batch)
        ours_seconds = time.perf_counter() - start

        mask_count = generator._mask_count(_Words.parse(texts[0], generator.patterns))
        start, reference_calls = time.perf_counter(), 0
        for text in texts:
            for k in range(neighbors_per_sample):
                _, calls = _reference_fill(loaded, tokenizer, text, mask_count, np.random.default_rng(k))
                reference_calls += calls
        reference_seconds = time.perf_counter() - start

    result = {
        "speedup": reference_seconds / ours_seconds,
        "generate_calls": [generator.model_calls, reference_calls],
        "seconds": [ours_seconds, reference_seconds],
        "samples": n_samples,
        "words_per_sample": words,
        "masks_per_neighbor": mask_count,
        "neighbors_made": int(sum(ours["num_neighbors"])),
        "batch_size": batch_size,
        "device": device,
    }
    if json_path is not None:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=2))
    return result

"""NeighborGenerator: K perturbed copies of each sample's prompt, as a cached `datasets.map` stage.

Per batch of rows it plans every neighbour (`operations`), fills the `fill` ones with one batched
model call per round (`infill`), keeps only neighbours that differ from the original and from each
other, and with media perturbation writes one seeded, perturbed media file per neighbour into the
stage's cache folder (`perturb_media`). A text too short for K neighbours gets fewer, and says so in
`num_neighbors` (never padded with copies); truncation to `max_text_len` only changes the generated
rows (the `input` column of the output, flagged by `input_truncated`), never the user's file. With
`protect_template`, the lines most samples of a `ds_name` share are found at `apply` time (`survey`) and
protected in every neighbour; with `template`, the given lines are (a detector stores the lines its training
data had, so that a sample's neighbours do not depend on the other samples of the call).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import datasets
import numpy as np

from ..columns import ANSWER, DS_NAME, INPUT, MEDIA_NEIGHBORS, NEIGHBOR_OPS, NEIGHBORS, NUM_NEIGHBORS, SAMPLE_ID
from ..media import MediaError
from ..stage import Stage, StageContext, media_digest, resolve_device
from .infill import INFILL_STYLES, Infiller, load_infiller
from .operations import OPS, derive_seed, edit, fill_request, mask_count
from .perturb_media import MediaPerturbation, write_perturbed
from .template import given_template, line_patterns, lines_of, template_lines, template_share
from .words import DEFAULT_PROTECTED, Words, truncate_tail

DEFAULT_MAX_TEXT_LEN = 4000  # characters kept of a longer prompt (its end)
_FILL_ROUNDS = 3  # fill rounds: later ones retry samples whose fills collided with other neighbours


@dataclass
class _RowState:
    """One row's neighbours as they are made: per op, and every text seen so far (kept distinct)."""

    sample_id: str
    content: str  # what seeds its draws (see `content_key`)
    text: Words
    mask_count: int
    seen: set[str]
    made: dict[str, list[str]]  # op -> its neighbours so far
    attempts: dict[str, int]  # op -> draws so far (the k of each draw's seed)

    def offer(self, op: str, candidate: str, quota: int) -> None:
        if candidate not in self.seen and len(self.made[op]) < quota:
            self.seen.add(candidate)
            self.made[op].append(candidate)


def content_key(batch: dict[str, list], j: int, column: str, media_column: str | None) -> str:
    """What seeds row `j`'s neighbours: its content (the text perturbed, the answer, the media bytes), never its
    `sample_id`, which hashes `ds_name` and the media path as written; so a sample gets the same neighbours from
    a table file, the CLI or the pipeline, from any folder."""
    answer = batch[ANSWER][j] if ANSWER in batch else ""
    media = media_digest(batch[media_column][j]) if media_column else ""
    return f"{derive_seed(batch[column][j], answer, media):016x}"


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
        seed: with the sample's content (`content_key`), fixes every random choice.
        protected: extra regexes (str or compiled) whose matches are never touched, on top of
            `DEFAULT_PROTECTED` (media placeholders, option letters, answer/question markers).
        protect_template: also protect the template lines: those at least this share of the samples of the
            same `ds_name` (and at least two) contain (`True` = 0.5; see `neighbors.template`); `mask_ratio`
            then counts only the words outside them. A sample the template leaves no word to change is
            perturbed as without it (one warning counts them). A sample's neighbours then depend on the other
            samples of its `ds_name` in the dataset; `template` fixes them.
        template: the template lines per `ds_name`, given instead of found (each line as `template.lines_of`
            yields it: stripped, non-empty, no newline); it implies protection, `protect_template`'s share is
            then unused. A sample whose `ds_name` is not in it has no template line.
        media_perturbation: also write one perturbed media file per neighbour (`media_neighbors`);
            `True` uses `MediaPerturbation()`, or pass a `MediaPerturbation` to set strengths.
        model_batch_size: sequences per `generate` (or masked-LM forward) call.
        infill_style: "auto" (FRED-T5 if the model id says so, "mlm" for masked LMs, else "t5"),
            "t5", "fred-t5" or "mlm"; `prefix`, `sentinel` (with `{i}`) and `eos_token` override it.
        column: the text column to perturb ("input"; "answer" to perturb answers).
    """

    name: ClassVar[str] = "neighbors"
    version: ClassVar[str] = "3"  # 3: draws seeded by the sample's content, not its sample_id
    settings: ClassVar[tuple[str, ...]] = (
        "ops", "num_neighbors", "mask_ratio", "min_masks", "max_masks", "max_text_len", "seed", "patterns",
        "template_share", "template", "media", "infill_style", "infill_overrides", "dtype", "column",
    )
    model_references: ClassVar[tuple[str, ...]] = ("model", "tokenizer")
    map_batch_size: ClassVar[int] = 16

    def __init__(
        self,
        model: Any = None,
        *,
        num_neighbors: int = 24,
        ops: Sequence[str] = OPS,
        mask_ratio: float = 0.1,
        min_masks: int = 5,
        max_masks: int = 40,
        max_text_len: int = DEFAULT_MAX_TEXT_LEN,
        seed: int = 0,
        protected: Iterable[str | re.Pattern] | None = None,
        protect_template: bool | float = False,
        template: Mapping[str, Sequence[str]] | None = None,
        media_perturbation: bool | MediaPerturbation = False,
        model_batch_size: int = 16,
        infill_style: str = "auto",
        prefix: str | None = None,
        sentinel: str | None = None,
        eos_token: str | None = None,
        tokenizer: Any = None,
        revision: str | None = None,
        device: str | None = None,
        dtype: Any = None,
        column: str = INPUT,
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
        share = template_share(protect_template)  # checked even where `template` makes it unused
        self.template = given_template(template)
        self.template_share = share if self.template is None else None
        if media_perturbation is True:
            media_perturbation = MediaPerturbation()
        self.media: MediaPerturbation | None = media_perturbation or None
        self.model_batch_size = model_batch_size
        self.infill_style = infill_style
        self.infill_overrides = {
            k: v for k, v in {"prefix": prefix, "sentinel": sentinel, "eos_token": eos_token}.items() if v is not None
        }
        self.device, self.dtype = device, dtype

    # ------------------------------------------------------------------ the stage contract
    def check(self, ds: datasets.Dataset) -> None:
        if self.column not in ds.column_names:
            raise ValueError(f"no {self.column!r} column to perturb (columns: {', '.join(ds.column_names)})")
        if SAMPLE_ID not in ds.column_names:
            raise ValueError("samples need a 'sample_id' column; load them with fimmia_hf.load_samples")
        empty = [
            (i, sid) for i, (text, sid) in enumerate(zip(ds[self.column], ds[SAMPLE_ID])) if not (text or "").strip()
        ]
        if empty:
            listed = "; ".join(f"row {i + 1} (sample_id {sid!r})" for i, sid in empty[:10])
            raise ValueError(
                f"empty {self.column!r} text, nothing to perturb: {listed}" + (" ..." if len(empty) > 10 else "")
            )
        if self.media and self.media_column(ds) is None:
            warnings.warn("media_perturbation is on but the samples have no image/audio/video column", stacklevel=3)

    def survey(self, ds: datasets.Dataset) -> Mapping[str, Any]:
        """The template lines per `ds_name`: the given ones, or (with `protect_template`) those found in the texts
        as `process` sees them."""
        if self.template is None and self.template_share is None:
            return {}
        texts = [truncate_tail(t, self.max_text_len) for t in ds[self.column]]
        groups = ds[DS_NAME] if DS_NAME in ds.column_names else [""] * len(texts)
        if self.template is None:
            template = template_lines(texts, groups, self.template_share)
        else:
            template = {group: frozenset(lines) for group, lines in self.template.items()}
        unprotected = sum(self._parse(t, template.get(g, frozenset()))[1] for t, g in zip(texts, groups))
        if unprotected:
            warnings.warn(
                f"{unprotected} sample(s) have no word to change outside their template lines (the lines most "
                f"samples of their ds_name share); they are perturbed as with protect_template=False",
                stacklevel=4,
            )
        return {"template": template}

    def _parse(self, text: str, template: frozenset[str] = frozenset()) -> tuple[Words, bool]:
        """`text` as words with its template lines protected too, and whether that was dropped because it left
        no word to change."""
        words = Words.parse(text, self.patterns)
        shared = lines_of(text) & template
        if not shared:
            return words, False
        protected = Words.parse(text, self.patterns, line_patterns(shared))
        return (protected, False) if protected.eligible else (words, bool(words.eligible))

    def load_model(self) -> Infiller:
        return load_infiller(
            self.model, tokenizer=self.tokenizer, style=self.infill_style, overrides=self.infill_overrides,
            revision=self.revision, dtype=self.dtype, device=resolve_device(self.device),
            batch_size=self.model_batch_size,
        )

    @property
    def model_calls(self) -> int:
        """How many `generate` (or masked-LM forward) calls this generator has made so far."""
        return self._loaded.calls if self._loaded is not None else 0

    def quotas(self) -> dict[str, int]:
        """Neighbours asked of each op: K split evenly, the first ops taking the remainder."""
        base, extra = divmod(self.num_neighbors, len(self.ops))
        return {op: base + (i < extra) for i, op in enumerate(self.ops)}

    def masks_per_neighbor(self, text: str | Words) -> int:
        """Words changed per neighbour of `text`."""
        words = text if isinstance(text, Words) else Words.parse(text, self.patterns)
        return mask_count(words, self.mask_ratio, self.min_masks, self.max_masks)

    def _rng(self, content: str, op: str, k: int) -> np.random.Generator:
        return np.random.default_rng(derive_seed(self.seed, content, op, k))

    # ------------------------------------------------------------------ the map function
    def process(self, batch: dict[str, list], context: StageContext) -> dict[str, list]:
        """Neighbours for a batch of rows (called by `datasets.map`)."""
        texts, ids = batch[self.column], batch[SAMPLE_ID]
        contents = [content_key(batch, j, self.column, context.media_column) for j in range(len(texts))]
        truncated = [len(t) > self.max_text_len for t in texts]
        texts = [truncate_tail(t, self.max_text_len) for t in texts]
        template = context.survey.get("template", {})
        groups = batch.get(DS_NAME) or [""] * len(texts)
        states = []
        for text, sid, content, group in zip(texts, ids, contents, groups):
            words = self._parse(text, template.get(group, frozenset()))[0]
            states.append(_RowState(sid, content, words, self.masks_per_neighbor(words), seen={text},
                                    made={op: [] for op in self.ops}, attempts=dict.fromkeys(self.ops, 0)))
        quotas = self.quotas()
        for op in self.ops:
            if op == "fill":
                self._run_fill(states, quotas[op])
            else:
                self._run_edit(states, op, quotas[op])

        out: dict[str, list] = {NEIGHBORS: [], NEIGHBOR_OPS: [], NUM_NEIGHBORS: []}
        for state in states:
            neighbors = [n for op in self.ops for n in state.made[op]]
            out[NEIGHBORS].append(neighbors)
            out[NEIGHBOR_OPS].append([op for op in self.ops for _ in state.made[op]])
            out[NUM_NEIGHBORS].append(len(neighbors))
        self._warn_short(states, out[NUM_NEIGHBORS])
        out[self.column] = texts  # truncated where flagged; the user's file is never touched
        out[f"{self.column}_truncated"] = truncated
        if self.media and context.media_column:
            folder = context.folder / f"media-{context.fingerprint}"
            out[MEDIA_NEIGHBORS] = [
                self._media_for(batch, j, len(neighbors), folder, context, contents[j])
                for j, neighbors in enumerate(out[NEIGHBORS])
            ]
        return out

    def _run_edit(self, states: list[_RowState], op: str, quota: int) -> None:
        """Delete / duplicate / swap neighbours, each draw seeded by (seed, content, op, k)."""
        for state in states:
            if state.mask_count == 0:
                continue
            for k in range(4 * quota + 8):
                if len(state.made[op]) >= quota:
                    break
                candidate = edit(state.text, op, state.mask_count, self._rng(state.content, op, k))
                if candidate is None:
                    break
                state.offer(op, candidate, quota)

    def _run_fill(self, states: list[_RowState], quota: int) -> None:
        """Fill neighbours for all rows, batched; rows whose fills collide get up to two more rounds."""
        active = [r for r, s in enumerate(states) if s.mask_count > 0]
        for _ in range(_FILL_ROUNDS):
            requests = []
            for r in active:
                state = states[r]
                for _ in range(quota - len(state.made["fill"])):
                    k = state.attempts["fill"]
                    state.attempts["fill"] = k + 1
                    rng = self._rng(state.content, "fill", k)
                    requests.append(fill_request(r, state.text, state.mask_count, rng))
            if not requests:
                return
            for request, fills in zip(requests, self.loaded().fill(requests)):
                states[request.row].offer("fill", request.build(fills), quota)
            active = [r for r in active if len(states[r].made["fill"]) < quota]

    def _warn_short(self, states: list[_RowState], counts: list[int]) -> None:
        short = [f"{s.sample_id} ({n})" for s, n in zip(states, counts) if n < self.num_neighbors]
        if short:
            warnings.warn(
                f"{len(short)} sample(s) got fewer than {self.num_neighbors} distinct neighbours because their "
                f"text is too short (see the 'num_neighbors' column): {', '.join(short[:10])}"
                + (" ..." if len(short) > 10 else ""),
                stacklevel=2,
            )

    def _media_for(self, batch: dict[str, list], j: int, count: int, folder: Path, context: StageContext,
                   content: str) -> list[str]:
        """Row `j`'s perturbed media, one file per neighbour, named by sample and index and seeded by
        (seed, content, k)."""
        modality, sample_id = context.media_column, batch[SAMPLE_ID][j]
        value = batch[modality][j]
        if value is None or count == 0:
            return []
        stem = re.sub(r"[^A-Za-z0-9_.-]", "_", str(sample_id))[:48] + f"-{derive_seed(sample_id) % 16**8:08x}"
        seeds = [derive_seed(self.seed, content, "media", k) for k in range(count)]
        try:
            return write_perturbed(modality, value, seeds, folder, stem, self.media)
        except MediaError as err:
            raise MediaError(f"{context.where(batch, j)}, column {modality!r}: {err}") from err

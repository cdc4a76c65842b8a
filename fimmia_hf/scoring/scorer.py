"""TargetScorer: the target model's losses on each sample and its neighbours, as a cached stage."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import datasets

from ..chat import ChatEncoder
from ..columns import (
    ANSWER,
    ERROR,
    INPUT,
    LOSS,
    MODEL_NAME,
    NEIGHBOR_LOSSES,
    NEIGHBORS,
    TOKEN_STATS,
)
from ..media import MediaError
from ..stage import Stage, StageContext, resolve_device, token_limit
from .engine import ScoringEngine, loss_of
from .loading import load_target


@dataclass
class LoadedTarget:
    """The scoring engine around the loaded target, and the encoder that turns rows into its inputs."""

    engine: ScoringEngine
    encoder: ChatEncoder


class TargetScorer(Stage):
    """Add the target model's losses (and per-token statistics) to each sample and its neighbours.

    `model` is a Hub id, a local folder (a PEFT adapter folder loads base + adapter), or a loaded
    model (then `processor` is required). The model loads on first use, so a cached rerun never
    loads it. `on_error="skip"` keeps rows whose media cannot be read, with an `error` message and
    NaN scores; `"raise"` stops naming the row. `model_batch_size` sequences go through each forward.
    A prompt longer than `max_length` tokens (default: the model's limit, see `token_limit`) is cut from
    the left, never the answer or the media, with a warning naming the row. A row with nothing to
    score (an empty answer, with `answer_only` and no closing tokens) is an error in column 'answer'.
    """

    name: ClassVar[str] = "score"
    version: ClassVar[str] = "3"  # 3: prompts cut at the model's limit by default
    settings: ClassVar[tuple[str, ...]] = (
        "model_name", "answer_only", "include_closing_tokens", "dtype", "max_length", "token_stats", "on_error",
        "system_prompt", "num_frames",
    )
    model_references: ClassVar[tuple[str, ...]] = ("model", "processor")
    map_batch_size: ClassVar[int] = 8

    def __init__(
        self,
        model: Any,
        *,
        processor: Any = None,
        name: str | None = None,
        answer_only: bool = True,
        model_batch_size: int = 8,
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
        self.model, self.processor = model, processor
        self.model_name = name
        self.answer_only, self.include_closing_tokens = answer_only, include_closing_tokens
        self.model_batch_size, self.dtype, self.device_map, self.device = model_batch_size, dtype, device_map, device
        self.max_length, self.token_stats, self.on_error = max_length, token_stats, on_error
        self.revision, self.system_prompt, self.num_frames = revision, system_prompt, num_frames
        self.prefix_reuse = prefix_reuse

    # -- the stage contract -------------------------------------------------------------------------
    def load_model(self) -> LoadedTarget:
        """Load the model and processor (a PEFT adapter folder: base + adapter) and build the engine."""
        if isinstance(self.model, (str, os.PathLike)):
            model, processor = load_target(self.model, revision=self.revision, dtype=self.dtype, device_map=self.device_map)
            processor = self.processor or processor
        else:
            model, processor = self.model, self.processor
        if self.device_map is None:
            model.to(resolve_device(self.device))
        encoder = ChatEncoder(
            processor,
            answer_only=self.answer_only,
            include_closing_tokens=self.include_closing_tokens,
            max_length=self.max_length or token_limit(model, getattr(processor, "tokenizer", processor)),
            system_prompt=self.system_prompt,
        )
        return LoadedTarget(ScoringEngine(model, batch_size=self.model_batch_size, prefix_reuse=self.prefix_reuse), encoder)

    def _columns(self, has_neighbors: bool) -> list[str]:
        """The columns this scorer adds, in order."""
        columns = [LOSS] + ([NEIGHBOR_LOSSES] if has_neighbors else [])
        if self.token_stats:
            columns += [f"token_{s}" for s in TOKEN_STATS]
            if self.token_stats == "all" and has_neighbors:
                columns += [f"neighbor_token_{s}" for s in TOKEN_STATS]
        return columns + ([ERROR] if self.on_error == "skip" else [])

    def process(self, batch: dict[str, list], context: StageContext) -> dict[str, list]:
        loaded = self.loaded()
        modality = context.media_column
        has_neighbors = NEIGHBORS in batch
        want_all = self.token_stats == "all"
        out: dict[str, list] = {column: [] for column in self._columns(has_neighbors)}
        for j in range(len(batch[INPUT])):
            neighbors = list(batch[NEIGHBORS][j] or []) if has_neighbors else []
            answer = batch[ANSWER][j]
            column = modality
            try:
                media = loaded.encoder.load_media(modality, batch[modality][j], num_frames=self.num_frames) if modality else None
                column = INPUT
                variants = [(batch[INPUT][j], answer)] + [(t, answer) for t in neighbors]
                with warnings.catch_warnings(record=True) as caught:  # re-emitted below, naming the row
                    warnings.simplefilter("always")
                    encodings = loaded.encoder.encode_variants(variants, media, modality)
                for message in dict.fromkeys(str(w.message) for w in caught):
                    warnings.warn(f"{context.where(batch, j)}: {message}", stacklevel=2)
                if not encodings[0].score_positions:
                    column = ANSWER
                    raise ValueError("nothing to score: the answer is empty; give one, or score the prompt "
                                     "(answer_only=False) or the closing tokens (include_closing_tokens=True)")
                stats = loaded.engine.score(encodings, [bool(self.token_stats)] + [want_all] * len(neighbors))
            except (MediaError, ValueError) as err:
                message = f"{context.where(batch, j)}, column '{column}': {err}"
                if self.on_error == "raise":
                    raise ValueError(message) from err
                failed = {LOSS: float("nan"), NEIGHBOR_LOSSES: [float("nan")] * len(neighbors), ERROR: message}
                for key, values in out.items():  # the other columns are token statistics: none
                    values.append(failed.get(key, []))
                continue
            out[LOSS].append(loss_of(stats[0]))
            if has_neighbors:
                out[NEIGHBOR_LOSSES].append([loss_of(s) for s in stats[1:]])
            if self.token_stats:
                for s in TOKEN_STATS:
                    out[f"token_{s}"].append(stats[0][s])
                    if want_all and has_neighbors:
                        out[f"neighbor_token_{s}"].append([x[s] for x in stats[1:]])
            if self.on_error == "skip":
                out[ERROR].append("")
        if self.model_name is not None:
            out[MODEL_NAME] = [self.model_name] * len(batch[INPUT])
        return out


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

"""The four word operations that make neighbours: fill (planned here, filled by a model), delete,
duplicate and swap.

Each changes about `mask_ratio` of a text's words, never a protected one, and draws every choice
from the generator it is given, which the caller seeds from (seed, sample_id, op, k): the same
sample gets the same neighbours in any process and in any batch.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from .words import Words, merge_separators, split_core

OPS = ("fill", "delete", "duplicate", "swap")


def derive_seed(*parts: Any) -> int:
    """A 64-bit seed from a sha256 of the parts: stable across processes (unlike `hash()`)."""
    return int.from_bytes(hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()[:8], "little")


def mask_count(text: Words, mask_ratio: float, min_masks: int, max_masks: int) -> int:
    """Words changed per neighbour: `mask_ratio` of the words (those outside template lines), clipped to
    [min(min_masks, eligible - 1), max_masks] (the original's rule); 0 when no word may change."""
    eligible = len(text.eligible)
    if eligible == 0:
        return 0
    floor = max(1, min(min_masks, eligible - 1))
    return min(max(int((len(text.words) - text.shared) * mask_ratio), floor), max_masks, eligible)


def edit(text: Words, op: str, count: int, rng: np.random.Generator) -> str | None:
    """One delete / duplicate / swap neighbour changing `count` words; None when `op` cannot apply."""
    words, seps = list(text.words), list(text.seps)
    if op in ("delete", "duplicate"):
        eligible = text.eligible
        if not eligible or (op == "delete" and len(text.words) < 2):
            return None
        count = min(count, len(eligible) - (op == "delete" and len(eligible) == len(text.words)))
        if count < 1:
            return None
        for i in sorted(rng.choice(eligible, size=count, replace=False).tolist(), reverse=True):
            if op == "delete":
                del words[i]
                seps[i : i + 2] = [merge_separators(seps[i], seps[i + 1], first=i == 0, last=i == len(words))]
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


@dataclass
class FillRequest:
    """One neighbour to fill: the text pieces around the masks and the masked words' cores."""

    row: int
    pieces: list[str]  # len(cores) + 1 pieces; masks go between them
    cores: list[str]

    def build(self, fills: list[str | None]) -> str:
        """The neighbour text: each mask replaced by its fill, or by the original word where there is none."""
        out = self.pieces[0]
        for core, fill, piece in zip(self.cores, fills, self.pieces[1:]):
            out += (fill if fill else core) + piece
        return out


def fill_request(row: int, text: Words, count: int, rng: np.random.Generator) -> FillRequest:
    """Mask `count` eligible words (their cores; punctuation around them stays) for an infilling model."""
    picked = set(rng.choice(text.eligible, size=count, replace=False).tolist())
    pieces, cores = [], []
    current = text.seps[0]
    for i, (word, sep) in enumerate(zip(text.words, text.seps[1:])):
        if i in picked:
            lead, core, trail = split_core(word)
            pieces.append(current + lead)
            cores.append(core)
            current = trail + sep
        else:
            current += word + sep
    pieces.append(current)
    return FillRequest(row, pieces, cores)


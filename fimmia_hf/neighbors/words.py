"""A prompt as words plus the exact separators around them, and which words are protected.

Neighbours change words in place between the original separators, so whitespace and line breaks
survive every operation; media placeholders, option letters, answer/question markers and user
regexes are protected: never changed, deleted, duplicated or moved; so are a task's template lines
(`template`), whose words are also left out of the count `mask_ratio` applies to.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

DEFAULT_PROTECTED: tuple[str, ...] = (
    r"<(?:image|audio|video)(?:_\d+)?>",  # media placeholders
    r"(?<!\S)\(?[A-HА-З][.)](?!\S)",  # option letters: "A.", "B)", "(C)" standing alone
    r"(?i)\b(?:ОТВЕТ|ANSWER|ВОПРОС|QUESTION)\s*:",  # answer / question markers
)

_SPLIT = re.compile(r"(\S+)")
_CORE = re.compile(r"^(\W*)(.*?)(\W*)$", re.S)
_ALNUM = re.compile(r"\w")


@dataclass
class Words:
    """A text as word tokens plus the exact separators around them (`seps[i]` precedes `words[i]`)."""

    words: list[str]
    seps: list[str]
    protected: list[bool]
    shared: int = 0  # how many words are in template lines (protected, and not the sample's own)

    @classmethod
    def parse(cls, text: str, patterns: Sequence[re.Pattern], template: Sequence[re.Pattern] = ()) -> Words:
        """`text` split into words; those overlapping a match of `patterns` or `template` are protected."""
        parts = _SPLIT.split(text)
        words, seps = parts[1::2], parts[0::2]
        positions, pos = [], len(seps[0])
        for word, sep in zip(words, seps[1:]):
            positions.append((pos, pos + len(word)))
            pos += len(word) + len(sep)
        protected, shared = _overlapping(text, positions, patterns), _overlapping(text, positions, template)
        return cls(words, seps, [p or t for p, t in zip(protected, shared)], sum(shared))

    def text(self, words: list[str] | None = None, seps: list[str] | None = None) -> str:
        words, seps = words if words is not None else self.words, seps if seps is not None else self.seps
        return seps[0] + "".join(w + s for w, s in zip(words, seps[1:]))

    @property
    def eligible(self) -> list[int]:
        """Words that may be filled, deleted or duplicated: unprotected and containing a letter/digit."""
        return [i for i, (w, p) in enumerate(zip(self.words, self.protected)) if not p and has_letter(w)]

    @property
    def movable(self) -> list[int]:
        """Words that may be swapped: every unprotected word."""
        return [i for i, p in enumerate(self.protected) if not p]


def _overlapping(text: str, positions: list[tuple[int, int]], patterns: Sequence[re.Pattern]) -> list[bool]:
    """Per word (its (start, end) in `text`), whether it overlaps a non-empty match of one of `patterns`."""
    spans = [m.span() for p in patterns for m in p.finditer(text) if m.end() > m.start()]
    return [any(s < end and start < e for s, e in spans) for start, end in positions]


def has_letter(word: str) -> bool:
    """Whether a word holds a letter or digit (punctuation alone is never a mask)."""
    return _ALNUM.search(word) is not None


def split_core(word: str) -> tuple[str, str, str]:
    """(leading punctuation, core, trailing punctuation); a token that is all punctuation to `\\W`
    (e.g. "№") is all core, so it can still be masked."""
    lead, core, trail = _CORE.match(word).groups()
    return (lead, core, trail) if core else ("", word, "")


def merge_separators(left: str, right: str, *, first: bool, last: bool) -> str:
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

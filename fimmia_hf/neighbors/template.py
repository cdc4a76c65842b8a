"""Template lines: the boilerplate the samples of one task share, which neighbours leave alone.

Perturbing text that every sample of a `ds_name` holds (MERA's preamble "Помогите мне, пожалуйста...", its
closing instruction about answer letters) moves members and non-members alike, so it adds noise to the loss
deltas; and before the media it makes the scorer run the media tokens again for that neighbour. The rule,
found from the data being perturbed: a *line* (the text split on "\\n", stripped, non-empty) is template when
at least `share` of the samples of its `ds_name`, and at least two of them, contain it. A task of one sample
has no template (there is nothing to compare it with). A detector stores the lines its training data had
(`given_template`), so that at serving time a sample's neighbours do not depend on the rest of the call.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence

DEFAULT_SHARE = 0.5  # what protect_template=True means


def template_share(protect_template: bool | float) -> float | None:
    """The share a `protect_template` setting stands for: None (off), 0.5 for True, else the float in (0, 1]."""
    if protect_template is False or protect_template is None:
        return None
    if protect_template is True:
        return DEFAULT_SHARE
    share = float(protect_template)
    if not 0 < share <= 1:
        raise ValueError(f"protect_template must be True, False or a share in (0, 1]; got {protect_template!r}")
    return share


def lines_of(text: str) -> set[str]:
    """The distinct stripped, non-empty lines of `text`."""
    return {line.strip() for line in text.split("\n")} - {""}


def template_lines(texts: Sequence[str], groups: Sequence[str], share: float) -> dict[str, frozenset[str]]:
    """Per group (`ds_name`), the lines at least `share` of its samples (and at least two) contain."""
    sizes = Counter(groups)
    counts: dict[str, Counter] = defaultdict(Counter)
    for text, group in zip(texts, groups):
        counts[group].update(lines_of(text))
    return {
        group: frozenset(line for line, n in counts[group].items() if n >= 2 and n / sizes[group] >= share)
        for group in sizes
    }


def given_template(template: Mapping[str, Sequence[str]] | None) -> dict[str, tuple[str, ...]] | None:
    """Template lines given per `ds_name`, checked and sorted (a stable fingerprint; JSON lists in a config)."""
    if template is None:
        return None
    if not isinstance(template, Mapping):
        raise ValueError(f"template must map each ds_name to its lines, got {type(template).__name__}")
    checked = {}
    for group, lines in template.items():
        listed = not isinstance(lines, str) and isinstance(lines, Iterable)
        if not listed or not all(isinstance(line, str) and {line} == lines_of(line) for line in lines):
            raise ValueError(
                f"template[{group!r}] must be a list of lines, each stripped, non-empty and without a newline "
                f"(as template.lines_of yields them); got {lines!r}"
            )
        checked[str(group)] = tuple(sorted(set(lines)))
    return checked


def line_patterns(lines: Iterable[str]) -> list[re.Pattern]:
    """Patterns matching each of `lines` as a whole line (whatever spaces surround it), for `Words.parse`."""
    return [re.compile(rf"(?m)^[^\S\n]*{re.escape(line)}[^\S\n]*$") for line in sorted(lines)]

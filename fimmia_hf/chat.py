"""The one place where a sample row becomes model inputs: chat messages, template, tokens, label mask.

Scoring and fine-tuning must see exactly the same tokens, or a "member" is scored on a text the model
never trained on. So both call `ChatEncoder`: it builds the chat (media where the `<image>`/`<audio>`/
`<video>` placeholder stands, first when there is none), applies the processor's chat template, runs
the processor, and marks the answer's tokens (optionally with the template tokens that close the
assistant turn, as the original FiMMIA scored them).

Neighbours differ from their original only in the text, so `encode_variants` runs the processor with
the media once and expands the media placeholder of the other variants by splicing in the original's
expanded tokens (checked, with a fall back to a full processor call when the layout is unusual).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

MEDIA_TYPES = ("image", "audio", "video")
IGNORE_INDEX = -100


def build_messages(
    text: str,
    answer: str | None = None,
    modality: str | None = None,
    *,
    system_prompt: str | None = None,
) -> list[dict[str, Any]]:
    """Chat messages for one sample.

    With a modality, the user content is a list of typed items and the media item goes where the
    first `<modality>` placeholder stands (other occurrences are dropped), or first when there is
    none. Without one (text models) contents are plain strings, which every text template accepts.
    """
    messages: list[dict[str, Any]] = []
    if system_prompt is not None:
        messages.append({"role": "system", "content": system_prompt if modality is None else [{"type": "text", "text": system_prompt}]})
    if modality is None:
        messages.append({"role": "user", "content": text})
    else:
        if modality not in MEDIA_TYPES:
            raise ValueError(f"unknown modality {modality!r}; expected one of {', '.join(MEDIA_TYPES)}")
        placeholder = f"<{modality}>"
        before, found, after = text.partition(placeholder)
        if not found:
            before, after = "", text
        after = after.replace(placeholder, "")
        content = [{"type": "text", "text": before}] if before else []
        content.append({"type": modality})
        if after:
            content.append({"type": "text", "text": after})
        messages.append({"role": "user", "content": content})
    if answer is not None:
        messages.append(
            {"role": "assistant", "content": answer if modality is None else [{"type": "text", "text": answer}]}
        )
    return messages


@dataclass
class ChatEncoding:
    """One templated, tokenized conversation.

    `labels` is `input_ids` with -100 outside the scored tokens (ready for a causal-LM loss);
    `inputs` holds the processor's other outputs (pixel values, grids, token types, audio features)
    with their batch dimension; `media_span` is the [start, end) token range of the expanded media.
    """

    input_ids: list[int]
    labels: list[int]
    answer_span: tuple[int, int]
    inputs: dict[str, Any] = field(default_factory=dict)
    media_span: tuple[int, int] | None = None
    truncated: int = 0  # characters cut from the left of the user text to fit `max_length`

    @property
    def score_positions(self) -> list[int]:
        return [i for i, label in enumerate(self.labels) if label != IGNORE_INDEX]


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _find(haystack: Sequence[int], needle: Sequence[int]) -> list[int]:
    n = len(needle)
    return [i for i in range(len(haystack) - n + 1) if list(haystack[i : i + n]) == list(needle)]


class ChatEncoder:
    """Turn (input, answer, media) into token ids, a label mask and processor features.

    `processor` is an `AutoProcessor` result (multimodal) or a tokenizer (text models); it must
    carry a chat template. `answer_only=False` scores every text token after the first (prompt and
    answer, never media tokens). `max_length` truncates the user text from the left, never the
    answer, the template or the media.
    """

    def __init__(
        self,
        processor: Any,
        *,
        answer_only: bool = True,
        include_closing_tokens: bool = False,
        max_length: int | None = None,
        system_prompt: str | None = None,
    ) -> None:
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        if getattr(processor, "chat_template", None) is None and getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError(f"{type(processor).__name__} has no chat template; set `processor.chat_template`")
        self.answer_only = answer_only
        self.include_closing_tokens = include_closing_tokens
        self.max_length = max_length
        self.system_prompt = system_prompt
        fe = getattr(processor, "feature_extractor", None)
        self.sampling_rate: int | None = getattr(fe, "sampling_rate", None)

    def load_media(self, modality: str | None, value: Any, *, num_frames: int = 8) -> Any:
        """Decode a sample's media as the model expects it (audio at the processor's rate, N video frames).

        Scoring and fine-tuning both decode through here, so they feed the model the same inputs.
        """
        from .media import load_media

        if modality is None:
            return None
        if modality == "audio":
            return load_media("audio", value, sampling_rate=self.sampling_rate or 16000)[0]
        if modality == "video":
            return load_media("video", value, num_frames=num_frames)
        return load_media(modality, value)

    # -- text side -------------------------------------------------------------------------------
    def _template(self, messages: list[dict], **kwargs: Any) -> str:
        owner = self.processor if getattr(self.processor, "chat_template", None) else self.tokenizer
        return owner.apply_chat_template(messages, tokenize=False, **kwargs)

    def render(self, text: str, answer: str, modality: str | None) -> tuple[str, int, int]:
        """The templated conversation and the character range of the answer in it."""
        full = self._template(build_messages(text, answer, modality, system_prompt=self.system_prompt))
        prompt = self._template(
            build_messages(text, None, modality, system_prompt=self.system_prompt), add_generation_prompt=True
        )
        search_from = len(prompt) if full.startswith(prompt) else 0
        start = full.find(answer, search_from) if answer else -1
        if answer and start < 0:
            raise ValueError("the chat template does not reproduce the answer text verbatim")
        if not answer:  # empty answer: score nothing but the closing tokens
            start = len(prompt) if full.startswith(prompt) else len(full)
        return full, start, start + len(answer)

    def _tokens(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]

    def _spans(self, full: str, start: int, end: int) -> tuple[list[int], int, int, int]:
        """Tokenizer ids of `full` and the token ranges [a0, a1) of the answer and [a1, n) of the rest."""
        ids, offsets = self._tokens(full)
        inside = [i for i, (s, e) in enumerate(offsets) if s < end and e > start]
        if inside:
            a0, a1 = inside[0], inside[-1] + 1
        else:  # empty answer
            a0 = a1 = next((i for i, (s, _) in enumerate(offsets) if s >= start), len(ids))
        return ids, a0, a1, len(ids)

    # -- processor side ----------------------------------------------------------------------------
    def _process(self, full: str, media: Any, modality: str | None) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"text": [full], "return_tensors": "pt"}
        if self.tokenizer is not self.processor:
            kwargs["add_special_tokens"] = False  # the template already has them
            if modality == "image":
                kwargs["images"] = [media]
            elif modality == "video":
                kwargs["videos"] = [media]
            elif modality == "audio":
                kwargs["audio"] = [media]
                if self.sampling_rate:
                    kwargs["sampling_rate"] = self.sampling_rate
        elif modality is not None:
            raise ValueError(f"a {modality} sample needs a multimodal processor, got the tokenizer {type(self.processor).__name__}")
        else:
            kwargs["add_special_tokens"] = False
        return dict(self.processor(**kwargs))

    def _media_token_id(self, modality: str | None) -> int | None:
        if modality is None:
            return None
        token_id = getattr(self.processor, f"{modality}_token_id", None)
        token = getattr(self.processor, f"{modality}_token", None)
        if token_id is None and isinstance(token, str):
            token_id = self.tokenizer.convert_tokens_to_ids(token)
        return token_id if isinstance(token_id, int) and token_id != self.tokenizer.unk_token_id else None

    def _labels(self, ids: list[int], a0: int, a1: int, media_span: tuple[int, int] | None) -> list[int]:
        end = len(ids) if self.include_closing_tokens else a1
        start = a0 if self.answer_only else 1
        labels = [IGNORE_INDEX] * len(ids)
        for i in range(max(start, 1), end):
            if media_span is None or not media_span[0] <= i < media_span[1]:
                labels[i] = ids[i]
        return labels

    def _encode_one(self, text: str, answer: str, media: Any, modality: str | None) -> tuple[ChatEncoding, list[int]]:
        """Encode with a processor call; also return the tokenizer-only ids (unexpanded media)."""
        full, start, end = self.render(text, answer, modality)
        tok_ids, a0, a1, n = self._spans(full, start, end)
        inputs = self._process(full, media, modality)
        ids = [int(x) for x in inputs.pop("input_ids")[0].tolist()]
        inputs.pop("attention_mask", None)
        delta = len(ids) - n  # tokens the processor added (media expansion), all before the answer
        if ids[a0 + delta : n + delta] != tok_ids[a0:n]:
            raise ValueError("the processor's tokens after the media differ from the tokenizer's; cannot locate the answer")
        media_span = None
        token_id = self._media_token_id(modality)
        where = [i for i, t in enumerate(ids) if t == token_id] if token_id is not None else []
        if where:
            media_span = (where[0], where[-1] + 1)
        elif modality is not None:  # processors without a declared media token: locate the expansion by diff
            lo = _common_prefix(tok_ids, ids)
            hi = _common_prefix(tok_ids[::-1], ids[::-1])
            hi = min(hi, len(tok_ids) - lo)
            if lo + hi == len(tok_ids) and lo > 0:  # expansion repeats the placeholder: keep one inside
                lo -= 1
            media_span = (lo, len(ids) - hi)
        encoding = ChatEncoding(ids, self._labels(ids, a0 + delta, a1 + delta, media_span), (a0 + delta, a1 + delta), inputs, media_span)
        return encoding, tok_ids

    def _fit(self, text: str, answer: str, media: Any, modality: str | None) -> tuple[ChatEncoding, list[int], str]:
        """Encode, cutting the user text from the left until the conversation fits `max_length`."""
        original, text = text, self._cut_characters(text, modality)
        encoding, tok_ids = self._encode_one(text, answer, media, modality)
        if self.max_length is None or (len(encoding.input_ids) <= self.max_length and text == original):
            return encoding, tok_ids, text
        for _ in range(4):
            overflow = len(encoding.input_ids) - self.max_length
            if overflow <= 0:
                break
            text, cut = self._cut_left(text, overflow, modality)
            if cut == 0:
                raise ValueError(
                    f"the conversation needs {len(encoding.input_ids)} tokens without any user text; max_length={self.max_length}"
                )
            encoding, tok_ids = self._encode_one(text, answer, media, modality)
        if len(encoding.input_ids) > self.max_length:
            raise ValueError(f"cannot fit the prompt into max_length={self.max_length}")
        encoding.truncated = len(original) - len(text)
        warnings.warn(
            f"prompt of {len(original)} characters truncated from the left by {encoding.truncated} to fit "
            f"max_length={self.max_length} tokens", stacklevel=3,
        )
        return encoding, tok_ids, text

    def _cut_characters(self, text: str, modality: str | None) -> str:
        """A prompt far longer than `max_length` loses characters from its left before any tokenizing.

        It keeps 16 characters per allowed token when those still make `max_length` tokens (else the whole
        text goes to the exact cut), so a 1 MB prompt is not tokenized whole several times (seconds each).
        """
        keep = 16 * self.max_length if self.max_length else len(text)
        if len(text) <= keep:
            return text
        placeholder = f"<{modality}>" if modality else None
        parts = text.split(placeholder, 1) if placeholder and placeholder in text else [text]
        excess, out = len(text) - keep, []
        for part in parts:
            take = min(excess, len(part))
            excess -= take
            out.append(part[take:])
        cut = placeholder.join(out) if len(parts) == 2 else out[0]
        return cut if len(self.tokenizer(cut, add_special_tokens=False)["input_ids"]) >= self.max_length else text

    def _cut_left(self, text: str, n: int, modality: str | None) -> tuple[str, int]:
        """Drop `n` tokens from the start of the user text, keeping the media placeholder."""
        placeholder = f"<{modality}>" if modality else None
        parts = text.split(placeholder, 1) if placeholder and placeholder in text else [text]
        out, cut = [], 0
        for part in parts:
            ids = self.tokenizer(part, add_special_tokens=False)["input_ids"]
            take = min(n - cut, len(ids))
            cut += take
            out.append(self.tokenizer.decode(ids[take:]) if take else part)
        return (placeholder.join(out) if len(parts) == 2 else out[0]), cut

    # -- public ------------------------------------------------------------------------------------
    def encode(self, text: str, answer: str, media: Any = None, modality: str | None = None) -> ChatEncoding:
        """Encode one conversation (media already decoded: PIL image, waveform, frames)."""
        return self._fit(text, answer, media, modality)[0]

    def encode_variants(
        self, variants: Sequence[tuple[str, str]], media: Any = None, modality: str | None = None
    ) -> list[ChatEncoding]:
        """Encode (input, answer) variants that share one media item; the media is processed once.

        The first variant is processed with the media; the others reuse its expanded media tokens
        and per-token features. Their `inputs` hold only per-token features (media tensors live on
        the first encoding).
        """
        if not variants:
            return []
        first, ref_tok, _ = self._fit(*variants[0], media, modality)
        out = [first]
        for text, answer in variants[1:]:
            out.append(self._splice(first, ref_tok, text, answer, media, modality))
        return out

    def _splice(
        self, ref: ChatEncoding, ref_tok: list[int], text: str, answer: str, media: Any, modality: str | None
    ) -> ChatEncoding:
        if modality is None or ref.media_span is None:
            return self._fit(text, answer, media, modality)[0]
        lo, hi = ref.media_span
        tail = len(ref.input_ids) - hi
        placeholder = ref_tok[lo : len(ref_tok) - tail]
        expanded = ref.input_ids[lo:hi]
        full, start, end = self.render(text, answer, modality)
        tok_ids, a0, a1, n = self._spans(full, start, end)
        where = _find(tok_ids, placeholder) if placeholder else []
        if len(where) != 1 or (self.max_length is not None and n - len(placeholder) + len(expanded) > self.max_length):
            encoding = self._fit(text, answer, media, modality)[0]  # unusual layout or too long: full processor call
            encoding.inputs = {k: v for k, v in encoding.inputs.items() if is_per_token(v, len(encoding.input_ids))}
            return encoding
        p = where[0]
        ids = tok_ids[:p] + expanded + tok_ids[p + len(placeholder) :]
        delta = len(expanded) - len(placeholder)
        span = (p, p + len(expanded))
        inputs = {}
        import torch

        for key, value in ref.inputs.items():  # per-token features: text positions take the value at position 0
            if is_per_token(value, len(ref.input_ids)):
                text_value = value[:, :1]
                inputs[key] = torch.cat(
                    [text_value.expand(-1, p), value[:, lo:hi], text_value.expand(-1, len(ids) - span[1])], dim=1
                )
        shift = delta if a0 >= p else 0
        labels = self._labels(ids, a0 + shift, a1 + shift, span)
        return ChatEncoding(ids, labels, (a0 + shift, a1 + shift), inputs, span)


def is_per_token(value: Any, length: int) -> bool:
    """Whether a processor output is a per-token feature (batch 1, sequence length `length`)."""
    shape = getattr(value, "shape", None)
    return shape is not None and len(shape) == 2 and shape[0] == 1 and shape[1] == length

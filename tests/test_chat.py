"""ChatEncoder: media placement, answer masks, spliced neighbour encodings, left truncation."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fimmia_hf.chat import IGNORE_INDEX, ChatEncoder, build_messages


def test_media_goes_where_the_placeholder_stands_or_first():
    msgs = build_messages("Look: <image> what is it?", "cat", "image")
    assert msgs[0]["content"] == [{"type": "text", "text": "Look: "}, {"type": "image"}, {"type": "text", "text": " what is it?"}]
    assert msgs[1] == {"role": "assistant", "content": [{"type": "text", "text": "cat"}]}
    assert build_messages("what is it?", None, "audio")[0]["content"][0] == {"type": "audio"}
    assert build_messages("plain <image> text", "x") == [
        {"role": "user", "content": "plain <image> text"},
        {"role": "assistant", "content": "x"},
    ]
    with pytest.raises(ValueError, match="unknown modality"):
        build_messages("x", "y", "smell")


@pytest.fixture(scope="module")
def image_processor(tiny_model):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_model("image-text"))


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (56, 84, 3), dtype=np.uint8))


def _scored_text(processor, enc) -> str:
    return processor.tokenizer.decode([enc.input_ids[i] for i in enc.score_positions])


def test_answer_mask_covers_exactly_the_answer(image_processor, image):
    enc = ChatEncoder(image_processor).encode("Which shape? <image>", "a red circle", image, "image")
    assert _scored_text(image_processor, enc) == "a red circle"
    assert enc.labels[: enc.answer_span[0]] == [IGNORE_INDEX] * enc.answer_span[0]
    lo, hi = enc.media_span
    assert set(enc.input_ids[lo:hi]) == {image_processor.image_token_id}
    assert hi - lo > 1  # the processor expanded the placeholder
    closing = ChatEncoder(image_processor, include_closing_tokens=True).encode("Which shape? <image>", "a red circle", image, "image")
    text = _scored_text(image_processor, closing)
    assert text.startswith("a red circle") and len(text) > len("a red circle")
    full = ChatEncoder(image_processor, answer_only=False).encode("Which shape? <image>", "a red circle", image, "image")
    assert len(full.score_positions) > len(enc.score_positions)
    assert not set(full.score_positions) & set(range(lo, hi))  # media tokens are never scored


def test_spliced_variants_equal_full_processor_calls(image_processor, image):
    encoder = ChatEncoder(image_processor)
    variants = [("Which shape is <image> shown?", "B"), ("Which one shape <image> is shown here?", "B"), ("shape?", "B")]
    fast = encoder.encode_variants(variants, image, "image")
    for enc, (text, answer) in zip(fast, variants):
        ref = encoder.encode(text, answer, image, "image")
        assert enc.input_ids == ref.input_ids and enc.labels == ref.labels and enc.media_span == ref.media_span
        assert (enc.inputs["mm_token_type_ids"] == ref.inputs["mm_token_type_ids"]).all()
    assert "pixel_values" in fast[0].inputs and "pixel_values" not in fast[1].inputs  # media processed once


def test_long_prompt_is_cut_from_the_left_never_the_answer(tiny_model):
    from transformers import AutoProcessor

    tok = AutoProcessor.from_pretrained(tiny_model("text-lm"))
    short = ChatEncoder(tok).encode("end of the question", "answer")
    encoder = ChatEncoder(tok, max_length=len(short.input_ids) + 3)
    with pytest.warns(UserWarning, match="truncated from the left"):
        enc = encoder.encode("many many words at the start " * 10 + "end of the question", "answer")
    assert len(enc.input_ids) <= encoder.max_length and enc.truncated > 0
    assert tok.decode([enc.input_ids[i] for i in enc.score_positions]) == "answer"
    assert "question" in tok.decode(enc.input_ids)

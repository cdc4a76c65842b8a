"""NeighborGenerator: seeded, protected, whitespace-keeping, batched, cached neighbours (+ media)."""

from __future__ import annotations

import collections
import hashlib
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import datasets
import numpy as np
import pytest

from fimmia_hf.neighbors import NeighborGenerator

PROMPT = (
    "Look  at the picture and answer the question. Choose one option\tand write only its letter.\n"
    "<image>\n"
    "\n"
    "Question: Which shape is drawn in the middle of the small square canvas today?\n"
    "A. a red circle\n"
    "B. a green square\n"
    "C) a blue triangle\n"
    "D. a yellow diamond\n"
    "ANSWER:  "
)
LONG = " ".join(f"word{i} alpha beta gamma" for i in range(30))
SEPARATORS = re.compile(r"\S+")


@pytest.fixture(scope="module")
def t5(tiny_model) -> str:
    return tiny_model("t5-infill")


def samples(*texts: str, **columns) -> datasets.Dataset:
    return datasets.Dataset.from_dict(
        {"sample_id": [f"s{i}" for i in range(len(texts))], "input": list(texts), **columns}
    )


def seps(text: str) -> list[str]:
    return SEPARATORS.split(text)


def test_counts_per_operation_distinct_and_one_generate_call_per_batch(t5, tmp_path):
    gen = NeighborGenerator(t5, num_neighbors=24, model_batch_size=64, seed=1)
    out = gen.apply(samples(PROMPT, LONG), cache_dir=tmp_path)
    for row in out:
        assert row["num_neighbors"] == len(row["neighbors"]) == 24
        assert collections.Counter(row["neighbor_ops"]) == {"fill": 6, "delete": 6, "duplicate": 6, "swap": 6}
        assert len(set(row["neighbors"])) == 24 and row["input"] not in row["neighbors"]
    # 12 fill neighbours, every mask of each filled by one generate call, all in one batch (plus
    # at most two retry rounds for collisions); the original's loop needed one call per masked word
    assert gen.model_calls in (1, 2, 3)
    uneven = NeighborGenerator(t5, num_neighbors=10, seed=1).apply(samples(LONG), cache_dir=tmp_path)
    assert collections.Counter(uneven[0]["neighbor_ops"]) == {"fill": 3, "delete": 3, "duplicate": 2, "swap": 2}


def test_protected_spans_never_change_or_move(t5, tmp_path):
    text = PROMPT + " KEEP-1234 end"
    gen = NeighborGenerator(t5, num_neighbors=40, mask_ratio=0.5, max_masks=40, protected=[r"KEEP-\d+"], seed=3)
    row = gen.apply(samples(text), cache_dir=tmp_path)[0]
    marks = re.compile(r"<image>|^[A-D][.)]|ANSWER:|Question:|KEEP-1234", re.M)
    expected = marks.findall(text)
    assert len(expected) == 8
    for neighbor, op in zip(row["neighbors"], row["neighbor_ops"]):
        assert marks.findall(neighbor) == expected, (op, neighbor)
        assert [line[:2] for line in neighbor.splitlines() if re.match(r"[A-D][.)]", line)] == ["A.", "B.", "C)", "D."]


def test_whitespace_and_line_breaks_kept(t5, tmp_path):
    text = "  first line  with   spaces\n\n\tsecond\tline here now\r\nthird line of words and more words \n"
    row = NeighborGenerator(t5, num_neighbors=16, mask_ratio=0.3, seed=5).apply(samples(text), cache_dir=tmp_path)[0]
    assert row["num_neighbors"] == 16
    for neighbor, op in zip(row["neighbors"], row["neighbor_ops"]):
        assert neighbor.count("\n") == text.count("\n") and neighbor.count("\r") == text.count("\r")
        if op == "swap":  # words change places: every separator identical
            assert seps(neighbor) == seps(text)
        if op in ("fill", "duplicate"):  # only single spaces are added (inside a fill, before a copy)
            assert [s for s in seps(neighbor) if s != " "] == [s for s in seps(text) if s != " "], op
        assert neighbor.startswith("  ") and neighbor.endswith(" \n")


def test_same_neighbours_in_another_process_and_batch(t5, tmp_path):
    texts = [PROMPT, LONG, "one two three four five six seven"]
    rows = {"input": texts, "sample_id": ["a", "b", "c"]}
    # every random choice (fill positions included) is seeded the same way; a second process with
    # another string-hash seed must agree (the model-free ops keep the child process light; it
    # starts first and runs while this one works)
    script = textwrap.dedent(
        """
        import json, sys
        import datasets
        from fimmia_hf.neighbors import NeighborGenerator
        rows = datasets.Dataset.from_dict(json.loads(sys.argv[1]))
        out = NeighborGenerator(ops=("delete", "duplicate", "swap"), num_neighbors=9, seed=7).apply(rows, cache_dir=sys.argv[2])
        print(json.dumps(list(out["neighbors"])))
        """
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "HF_HUB_OFFLINE": "1"}
    child = subprocess.Popen([sys.executable, "-c", script, json.dumps(rows), str(tmp_path / "child")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    def neighbours(rows: dict, cache: str, **settings) -> list[list[str]]:
        generator = NeighborGenerator(**{"model": t5, "num_neighbors": 8, "seed": 7, **settings})
        return list(generator.apply(datasets.Dataset.from_dict(rows), cache_dir=tmp_path / cache)["neighbors"])

    ours = neighbours(rows, "together", model_batch_size=16)
    alone = neighbours({"input": texts[1:2], "sample_id": ["b"]}, "alone", model_batch_size=1)
    assert alone[0] == ours[1]  # batch composition does not matter
    assert neighbours(rows, "seed-8", seed=8) != ours
    here = neighbours(rows, "here", model=None, ops=("delete", "duplicate", "swap"), num_neighbors=9)
    out, err = child.communicate(timeout=300)
    assert child.returncode == 0, err[-3000:]
    assert json.loads(out.strip().splitlines()[-1]) == here


def test_short_and_empty_text(tmp_path):
    with pytest.raises(ValueError, match=r"row 2 \(sample_id 's1'\)"):
        NeighborGenerator(ops=("delete", "swap")).apply(samples("fine text here", "   "), cache_dir=tmp_path)
    with pytest.raises(ValueError, match="needs an infilling model"):
        NeighborGenerator()
    with pytest.warns(UserWarning, match="fewer than 24 distinct neighbours"):
        out = NeighborGenerator(ops=("delete", "duplicate", "swap")).apply(
            samples("hello world", "<image>"), cache_dir=tmp_path
        )
    short, placeholder = out
    assert 0 < short["num_neighbors"] < 24 and len(set(short["neighbors"])) == short["num_neighbors"]
    assert "hello world" not in short["neighbors"]
    assert placeholder["num_neighbors"] == 0 and placeholder["neighbors"] == []


def test_truncation_only_in_output_rows_and_cli(tmp_path):
    from fimmia_hf.cli import parse_command
    from fimmia_hf.neighbors.cli import run_neighbors

    table = tmp_path / "samples.csv"
    long_text = "intro " * 50 + "What is two plus two? ANSWER:"
    table.write_text("input,answer\n" + json.dumps(long_text) + ",four\nshort question here please,yes\n")
    before = hashlib.sha256(table.read_bytes()).hexdigest()
    out = tmp_path / "out"
    args = parse_command(
        "neighbors",
        [
            "--data",
            str(table),
            "--out",
            str(out),
            "--ops",
            "delete,swap",
            "--num-neighbors",
            "4",
            "--max-text-len",
            "60",
            "--cache-dir",
            str(tmp_path / "cache"),
        ]
    )
    assert run_neighbors(args) == 0
    assert hashlib.sha256(table.read_bytes()).hexdigest() == before
    ds = datasets.load_from_disk(str(out))
    assert ds["input_truncated"] == [True, False]
    assert len(ds[0]["input"]) <= 60 and ds[0]["input"].endswith("two plus two? ANSWER:")
    assert all(len(n) <= 60 for n in ds[0]["neighbors"])


def test_masked_lm_fills(tmp_path):
    import torch
    from transformers import RobertaConfig, RobertaForMaskedLM

    from fimmia_hf.testing import train_tokenizer

    tok = train_tokenizer("roberta", vocab_size=400)
    torch.manual_seed(0)
    config = RobertaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        max_position_embeddings=130,
        pad_token_id=tok.pad_token_id,
    )
    RobertaForMaskedLM(config).save_pretrained(tmp_path / "mlm")
    tok.save_pretrained(tmp_path / "mlm")
    gen = NeighborGenerator(str(tmp_path / "mlm"), ops=("fill",), num_neighbors=4, seed=2)
    row = gen.apply(samples(LONG), cache_dir=tmp_path / "cache")[0]
    assert row["num_neighbors"] == 4 and gen.model_calls == 1
    for neighbor in row["neighbors"]:  # words replaced in place (a fill may be several words)
        assert neighbor != LONG and set(seps(neighbor)) == {"", " "}


def _torchcodec_works() -> bool:
    try:
        from torchcodec.decoders import AudioDecoder  # noqa: F401

        return True
    except Exception:
        return False


@pytest.mark.parametrize("modality", ["image", "audio", "video"])
def test_media_neighbours_differ_yet_decode(modality, synthetic_table, tmp_path):
    from fimmia_hf.data import load_samples
    from fimmia_hf.media import load_media

    if modality != "image" and not _torchcodec_works():
        pytest.skip("torchcodec/FFmpeg cannot load here")
    ds = load_samples(synthetic_table(modality, 2))
    gen = NeighborGenerator(ops=("delete", "swap"), num_neighbors=3, media_perturbation=True)
    out = gen.apply(ds, cache_dir=tmp_path)
    kwargs = {"sampling_rate": None} if modality == "audio" else {"num_frames": None} if modality == "video" else {}
    for row in out:
        paths = row["media_neighbors"]
        assert len(paths) == row["num_neighbors"] == 3 and len(set(paths)) == 3
        original = load_media(modality, row[modality], **kwargs)
        for path in paths:
            assert Path(path).is_absolute() and str(tmp_path) in path
            perturbed = load_media(modality, path, **kwargs)
            if modality == "image":
                original_arr, perturbed_arr = np.asarray(original), np.asarray(perturbed)
                assert perturbed_arr.shape == original_arr.shape and not np.array_equal(perturbed_arr, original_arr)
            elif modality == "audio":
                (wave, rate), (new, new_rate) = original, perturbed
                assert new_rate == rate and len(new) == len(wave) and not np.allclose(new, wave, atol=1e-3)
            else:
                assert 0 < len(perturbed) < len(original)
    # seeded: a fresh run elsewhere writes the same media (H.264 bytes may differ, frames do not)
    again = NeighborGenerator(ops=("delete", "swap"), num_neighbors=3, media_perturbation=True).apply(
        ds, cache_dir=tmp_path / "b"
    )
    first, second = out[0]["media_neighbors"][0], again[0]["media_neighbors"][0]
    assert first != second
    a, b = (load_media(modality, p, **kwargs) for p in (first, second))
    a, b = (np.asarray(x[0] if modality == "audio" else x, dtype=np.float32) for x in (a, b))
    assert a.shape == b.shape and np.abs(a - b).mean() < (2.0 if modality == "video" else 1e-6)


# -- issue 20: every sample gets its own draws ------------------------------------------------------


def _deleted_positions(original: str, neighbor: str) -> tuple[int, ...]:
    kept = set(neighbor.split())
    return tuple(i for i, word in enumerate(original.split()) if word not in kept)


def test_distinct_samples_get_distinct_edit_positions_and_equal_ones_the_same(tmp_path):
    """The seed follows the sample: texts of the same length must not all lose the same words (a seed
    without the sample does exactly that), and a sample gets the same neighbours in any row or table."""
    from fimmia_hf import load_samples

    texts = [" ".join(f"s{i}w{j}" for j in range(20)) for i in range(6)]
    rows = load_samples(datasets.Dataset.from_dict({"input": texts, "answer": ["A"] * 6}))
    generator = NeighborGenerator(ops=("delete",), num_neighbors=3)
    out = generator.apply(rows, cache_dir=tmp_path)
    draws = [tuple(_deleted_positions(row["input"], nb) for nb in row["neighbors"]) for row in out]
    assert all(len(positions) == 5 for draw in draws for positions in draw)  # min_masks words each
    assert len(set(draws)) == 6  # every sample its own positions
    reordered = generator.apply(rows.select([5, 0]), cache_dir=tmp_path)
    assert reordered["neighbors"] == [out[5]["neighbors"], out[0]["neighbors"]]


def test_samples_sharing_an_image_get_their_own_perturbations(synthetic_table, tmp_path):
    """Two questions about one picture are two samples: each gets its own seeded media perturbations."""
    from fimmia_hf import load_samples
    from fimmia_hf.stage import file_hash

    image = load_samples(synthetic_table("image", 2))[0]["image"]
    rows = load_samples(datasets.Dataset.from_dict({
        "input": [f"Which shape is drawn here, {who}? <image>" for who in ("Ann", "Bob")],
        "answer": ["A", "A"], "image": [image, image]}))
    out = NeighborGenerator(ops=("delete", "swap"), num_neighbors=2, media_perturbation=True).apply(rows, cache_dir=tmp_path)
    first, second = ([file_hash(p) for p in row["media_neighbors"]] for row in out)
    assert len(first) == len(second) == 2 and not set(first) & set(second)

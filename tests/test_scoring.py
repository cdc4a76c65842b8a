"""TargetScorer: exact against a plain per-item forward, for every model kind, fast paths included."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import datasets
import numpy as np
import pytest

from fimmia_hf.chat import ChatEncoder
from fimmia_hf.data import load_samples
from fimmia_hf.scoring import ScoringEngine, TargetScorer, load_target, score_plain

KINDS = {"image": "image-text", "video": "image-text", "audio": "audio-text", "text": "text-lm"}


def _with_neighbors(ds: datasets.Dataset) -> datasets.Dataset:
    """Two neighbours per row: one perturbs text after the media, one before it (media not shared)."""
    return ds.add_column("neighbors", [[t.replace("?", "? ok", 1), "Hm, " + t[8:]] for t in ds["input"]])


@pytest.fixture(scope="module")
def loaded(tiny_model):
    cache = {}

    def get(kind):
        if kind not in cache:
            cache[kind] = load_target(tiny_model(kind), dtype="float32")
        return cache[kind]

    return get


@pytest.mark.parametrize("modality", list(KINDS))
def test_scores_equal_plain_forward_for_every_kind(modality, loaded, synthetic_table, tmp_path):
    model, processor = loaded(KINDS[modality])
    ds = _with_neighbors(load_samples(synthetic_table(modality, 2)))
    fast = TargetScorer(model, processor=processor, model_batch_size=2, token_stats="all")
    out = fast.apply(ds, cache_dir=tmp_path)
    media = None if modality == "text" else modality
    scorer = TargetScorer(model, processor=processor)
    encoder = scorer.loaded().encoder
    for row in out:
        value = encoder.load_media(media, row.get(modality))
        for text, loss, logprobs in zip(
            [row["input"], *row["neighbors"]], [row["loss"], *row["neighbor_losses"]], [row["token_logprobs"], *row["neighbor_token_logprobs"]]
        ):
            ref = score_plain(model, encoder.encode(text, row["answer"], value, media))
            assert loss == pytest.approx(-np.mean(ref["logprobs"]), abs=1e-4)
            assert logprobs == pytest.approx(ref["logprobs"], abs=1e-4)
        assert len(row["token_mean_logprob"]) == len(row["token_logprobs"]) >= 1
        assert row["token_entropy"] == pytest.approx([-m for m in row["token_mean_logprob"]])
        assert all(m <= 0 and s >= 0 for m, s in zip(row["token_max_logprob"], row["token_std_logprob"]))
    full = sum(len(encoder.encode(t, r["answer"], encoder.load_media(media, r.get(modality)), media).input_ids)
               for r in out for t in [r["input"], *r["neighbors"]])
    assert fast.loaded().engine.tokens_run < 0.85 * full  # the neighbour changed after the media reused the cache


def test_batch_size_padding_side_and_prefix_reuse_do_not_change_scores(loaded, synthetic_table):
    model, processor = loaded("image-text")
    row = load_samples(synthetic_table("image", 2))[0]
    from fimmia_hf.media import load_image

    image = load_image(row["image"])
    # changes after the media (reuse covers it), before it, none (a duplicate of the original), twice the same
    texts = [row["input"], row["input"] + " Think.", "Short? <image>", row["input"].replace("A.", "A)"), row["input"], "Short? <image>"]
    runs, tokens = [], {}
    for side in ("left", "right"):
        processor.tokenizer.padding_side = side
        encodings = ChatEncoder(processor).encode_variants([(t, row["answer"]) for t in texts], image, "image")
        for batch_size in (1, 3, 8):
            for reuse in (True, False):
                engine = ScoringEngine(model, batch_size=batch_size, prefix_reuse=reuse)
                stats = engine.score(encodings)
                runs.append([s["logprobs"] + s["std_logprob"] for s in stats])
                tokens[reuse] = engine.tokens_run
    for run in runs[1:]:
        for got, ref in zip(run, runs[0]):
            assert got == pytest.approx(ref, abs=1e-4)
    full = sum(len(e.input_ids) for e in encodings)
    # duplicates run once, tokens after the answer never run, and with reuse the variants changed
    # after the media run only their changed tails
    assert tokens[False] < full * 0.75 and tokens[True] < tokens[False] * 0.6


def test_only_answer_tokens_are_scored_and_the_answer_matters(loaded):
    model, tok = loaded("text-lm")
    encoder = ChatEncoder(tok)
    enc = encoder.encode("Which colour is the ball?", "green")
    assert tok.decode([enc.input_ids[i] for i in enc.score_positions]) == "green"
    ds = datasets.Dataset.from_dict({"sample_id": ["a", "b"], "input": ["Which colour is the ball?"] * 2, "answer": ["green", "blue"], "ds_name": ["t", "t"]})
    out = TargetScorer(model, processor=tok, token_stats=False).apply(ds)
    assert "neighbor_losses" not in out.column_names and "token_logprobs" not in out.column_names
    assert out[0]["loss"] != pytest.approx(out[1]["loss"], abs=1e-6)
    closing = TargetScorer(model, processor=tok, include_closing_tokens=True, token_stats=True).apply(ds)
    assert len(closing[0]["token_logprobs"]) > len(enc.score_positions)


def test_name_labels_every_row(loaded, tmp_path):
    model, tok = loaded("text-lm")
    ds = datasets.Dataset.from_dict({"sample_id": ["a"], "input": ["Which colour?"], "answer": ["green"], "ds_name": ["t"]})
    out = TargetScorer(model, processor=tok, name="base", token_stats=False).apply(ds, cache_dir=tmp_path)
    assert out["model_name"] == ["base"]  # so base and fine-tuned runs of the paired protocol concatenate


def test_bad_media_rows_raise_naming_the_row_or_are_kept_with_an_error(loaded, synthetic_table, tmp_path):
    model, processor = loaded("image-text")
    ds = load_samples(synthetic_table("image", 3))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    ds = ds.map(lambda r, i: {"image": str(broken) if i == 1 else r["image"]}, with_indices=True)
    sid = ds[1]["sample_id"]
    with pytest.raises(ValueError, match=rf"row 2 \(sample_id '{sid}'\), column 'image'"):
        TargetScorer(model, processor=processor).apply(ds, cache_dir=tmp_path / "a")
    out = TargetScorer(model, processor=processor, on_error="skip").apply(ds, cache_dir=tmp_path / "b")
    assert out["error"][0] == "" and "cannot decode image" in out["error"][1]
    assert math.isnan(out[1]["loss"]) and not math.isnan(out[0]["loss"]) and out[1]["token_logprobs"] == []


def test_peft_adapter_folder_loads_base_plus_adapter(tiny_model, tmp_path):
    from peft import LoraConfig, get_peft_model

    base_dir = tiny_model("text-lm")
    base, tok = load_target(base_dir)
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    loaded, _ = load_target(tmp_path / "adapter")
    assert hasattr(loaded, "peft_config")
    ds = datasets.Dataset.from_dict({"input": ["Which colour?"], "answer": ["green"], "ds_name": ["t"]})
    plain = TargetScorer(base_dir).apply(ds, cache_dir=tmp_path / "c")["loss"][0]
    adapted = TargetScorer(str(tmp_path / "adapter")).apply(ds, cache_dir=tmp_path / "c")["loss"][0]
    assert plain != pytest.approx(adapted, abs=1e-6)  # the adapter is applied and fingerprinted


@pytest.mark.slow
def test_two_processes_shard_and_gather_in_order(tiny_model, synthetic_table, tmp_path):
    data = tmp_path / "data.jsonl"
    ds = _with_neighbors(load_samples(synthetic_table("text", 5)))
    ds.to_json(str(data), lines=True, force_ascii=False)
    out = tmp_path / "scored"
    env = {**os.environ, "FIMMIA_HF_CACHE": str(tmp_path / "cache"), "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "-m", "fimmia_hf.cli", "score",
           "--data", str(data), "--model", tiny_model("text-lm"), "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    gathered = datasets.load_from_disk(str(out))
    single = TargetScorer(tiny_model("text-lm")).apply(load_samples(data), cache_dir=tmp_path / "single")
    assert gathered["sample_id"] == single["sample_id"]
    assert gathered["loss"] == pytest.approx(single["loss"], abs=1e-5)


def test_long_prompt_is_cut_at_the_model_limit_with_a_warning_naming_the_row(loaded, tmp_path):
    """A 1 MB prompt is cut from the left at the model's limit (2048 positions), not run whole."""
    model, processor = loaded("text-lm")
    assert model.config.max_position_embeddings == 2048
    words = "слово word " * 100_000
    ds = load_samples(datasets.Dataset.from_list([{"input": "short question?", "answer": "A"},
                                                  {"input": words + "question?", "answer": "B"}]))
    assert len(ds[1]["input"].encode()) > 1_000_000
    scorer = TargetScorer(model, processor=processor, token_stats=False)
    with pytest.warns(UserWarning, match=r"row 2 \(sample_id .*\): prompt of \d{7} characters truncated from the left"):
        out = scorer.apply(ds, cache_dir=tmp_path)
    assert math.isfinite(out[1]["loss"])
    assert scorer.loaded().engine.tokens_run <= 2048 + 64
    explicit = TargetScorer(model, processor=processor, token_stats=False, max_length=2048)
    with pytest.warns(UserWarning):
        assert explicit.apply(ds, cache_dir=tmp_path)["loss"] == pytest.approx(out["loss"])


def test_empty_answer_with_nothing_to_score_names_the_row(loaded, tmp_path):
    """An empty answer scored over the answer only gives nothing: an error, not a silent NaN."""
    model, processor = loaded("text-lm")
    ds = load_samples(datasets.Dataset.from_list([{"input": "Вопрос?", "answer": "A"}, {"input": "Ещё?", "answer": ""}]))
    with pytest.raises(ValueError, match=r"row 2 .*column 'answer': nothing to score: the answer is empty"):
        TargetScorer(model, processor=processor).apply(ds, cache_dir=tmp_path)
    skipped = TargetScorer(model, processor=processor, on_error="skip").apply(ds, cache_dir=tmp_path)
    assert "nothing to score" in skipped[1]["error"] and math.isnan(skipped[1]["loss"])
    for allowed in ({"answer_only": False}, {"include_closing_tokens": True}):  # these score without an answer
        out = TargetScorer(model, processor=processor, **allowed).apply(ds, cache_dir=tmp_path)
        assert all(math.isfinite(x) for x in out["loss"])

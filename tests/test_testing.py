"""Tests of the offline tiny-model kit and the synthetic data (fimmia_hf.testing)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import transformers
from PIL import Image

from fimmia_hf import testing
from fimmia_hf.testing import AUTO_CLASSES, KINDS, MARKER_FILE, build_tiny, make_synthetic_samples, synthetic_features

QUESTION = "Какого цвета фигура на изображении?"


@pytest.fixture(scope="session")
def tiny(tiny_model):
    """Tiny models shared with the other test files (conftest's session fixture)."""
    return tiny_model


def _load(kind: str, path: str):
    model = getattr(transformers, AUTO_CLASSES[kind]).from_pretrained(path)
    processor = transformers.AutoProcessor.from_pretrained(path)
    return model.eval(), processor


def _options(prompt: str) -> dict[str, str]:
    return dict(re.findall(r"^([ABCD])\. (.+)$", prompt, flags=re.M))


# ------------------------------------------------------------------------------------ models


def test_image_text_image_and_video(tiny) -> None:
    model, processor = _load("image-text", tiny("image-text"))
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert type(processor).__name__ == "Qwen2_5_VLProcessor"
    image = Image.new("RGB", (224, 224), (200, 30, 30))
    messages = [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": QUESTION}]},
        {"role": "assistant", "content": [{"type": "text", "text": "B"}]},
    ]
    inputs = processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt")
    n_image_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert 0 < n_image_tokens <= 16  # small images give few tokens
    with torch.no_grad():
        out = model(**inputs, labels=inputs["input_ids"])
    assert torch.isfinite(out.loss)

    frames = np.random.default_rng(0).integers(0, 255, (8, 64, 64, 3), dtype=np.uint8)
    video_msgs = [{"role": "user", "content": [{"type": "video", "video": [Image.fromarray(f) for f in frames]},
                                               {"type": "text", "text": "Куда движется фигура?"}]}]
    inputs = processor.apply_chat_template(video_msgs, tokenize=True, return_dict=True, return_tensors="pt",
                                           add_generation_prompt=True)
    assert "pixel_values_videos" in inputs and int((inputs["input_ids"] == model.config.video_token_id).sum()) > 0
    with torch.no_grad():
        assert model(**inputs).logits.shape[:2] == inputs["input_ids"].shape

    text = processor.apply_chat_template(video_msgs, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], videos=[frames], return_tensors="pt")
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()


def test_audio_text_forward(tiny) -> None:
    path = tiny("audio-text")
    model, processor = _load("audio-text", path)
    assert type(model).__name__ == "Qwen2AudioForConditionalGeneration"
    assert type(transformers.AutoModelForSeq2SeqLM.from_pretrained(path)).__name__ == type(model).__name__
    wav = (0.3 * np.sin(np.arange(24000) / 16000 * 2 * np.pi * 440)).astype(np.float32)
    messages = [{"role": "user", "content": [{"type": "audio", "audio": wav},
                                             {"type": "text", "text": "Сколько сигналов?"}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert "<|audio_bos|><|AUDIO|><|audio_eos|>" in text
    inputs = processor(text=[text], audio=[wav], sampling_rate=16000, return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.audio_token_id).sum()) > 1  # placeholder expanded
    with torch.no_grad():
        assert torch.isfinite(model(**inputs, labels=inputs["input_ids"]).loss)


def test_text_lm_chat_template(tiny) -> None:
    path = tiny("text-lm")
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    conv = [{"role": "user", "content": "Сколько будет 2 + 3?"}, {"role": "assistant", "content": "5"}]
    enc = tok.apply_chat_template(conv, tokenize=True, return_dict=True, return_tensors="pt")
    assert tok.decode(enc["input_ids"][0]).endswith("<|im_start|>assistant\n5<|im_end|>\n")
    with torch.no_grad():
        out = model(**enc, labels=enc["input_ids"])
    assert torch.isfinite(out.loss) and out.logits.shape[-1] >= len(tok)


def test_t5_sentinels_and_generate(tiny) -> None:
    path = tiny("t5-infill")
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(path).eval()
    assert type(tok).__name__ == "T5Tokenizer"
    assert tok.convert_tokens_to_ids(["<pad>", "</s>", "<unk>"]) == [0, 1, 2]
    ids = tok.convert_tokens_to_ids([f"<extra_id_{i}>" for i in range(100)])
    assert ids[0] == len(tok) - 1 and ids == sorted(ids, reverse=True)  # T5 layout
    enc = tok(["Маша записывает число <extra_id_0> и прибавляет к нему 5."], return_tensors="pt")
    assert ids[0] in enc["input_ids"][0].tolist()
    with torch.no_grad():
        gen = model.generate(**enc, max_new_tokens=8, do_sample=False)
    assert gen.shape[1] > 1 and int(gen[0, 0]) == model.config.decoder_start_token_id
    assert isinstance(tok.decode(gen[0], skip_special_tokens=False), str)


def test_encoders_features(tiny) -> None:
    path = tiny("text-encoder")
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path)
    with torch.no_grad():
        hidden = model(**tok(["красный круг", "a blue square"], return_tensors="pt", padding=True)).last_hidden_state
    assert hidden.shape[0] == 2 and hidden.shape[-1] == model.config.hidden_size

    model, processor = _load("image-encoder", tiny("image-encoder"))
    pix = processor(images=[Image.new("RGB", (96, 64), (10, 200, 10))], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        feats = model.get_image_features(pixel_values=pix)
    feats = getattr(feats, "pooler_output", feats)
    assert feats.shape == (1, model.config.projection_dim)

    model, processor = _load("audio-encoder", tiny("audio-encoder"))
    wav = np.random.default_rng(0).normal(0, 0.1, 24000).astype(np.float32)
    enc = processor(audio=[wav], sampling_rate=16000, return_tensors="pt")
    with torch.no_grad():
        feats = model.get_audio_features(input_features=enc["input_features"], is_longer=enc.get("is_longer"))
    feats = getattr(feats, "pooler_output", feats)
    assert feats.shape == (1, model.config.projection_dim)


def test_every_kind_saved_with_safetensors_and_marker(tiny) -> None:
    for kind in KINDS:
        path = Path(tiny(kind))
        marker = json.loads((path / MARKER_FILE).read_text())
        assert marker["complete"] and marker["kind"] == kind and marker["num_parameters"] < 300_000
        assert (path / "model.safetensors").is_file() and not list(path.glob("*.bin"))
        assert sum(f.stat().st_size for f in path.iterdir()) < 1_500_000


def test_same_seed_same_weights_and_cache(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    a = build_tiny("text-lm", tmp_path / "a", seed=3)
    b = build_tiny("text-lm", tmp_path / "b", seed=3)
    c = build_tiny("text-lm", tmp_path / "c", seed=4)
    wa, wb, wc = (load_file(str(Path(p) / "model.safetensors")) for p in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)
    assert (Path(a) / "tokenizer.json").read_bytes() == (Path(b) / "tokenizer.json").read_bytes()

    weights = Path(a) / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    assert build_tiny("text-lm", a, seed=3) == a and weights.stat().st_mtime_ns == mtime  # reused
    build_tiny("text-lm", a, seed=4)  # other seed: rebuilt in place
    assert json.loads((Path(a) / MARKER_FILE).read_text())["seed"] == 4

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="refusing"):
        build_tiny("text-lm", foreign)
    with pytest.raises(ValueError, match="unknown kind"):
        build_tiny("nope", tmp_path / "x")


def test_russian_tokenizes_compactly() -> None:
    text = "Прослушайте аудиозапись и ответьте на вопрос. Сколько звуковых сигналов слышно в записи?"
    for family in ("qwen", "t5", "clip", "roberta"):
        tok = testing.train_tokenizer(family)
        n_tokens = len(tok(text, add_special_tokens=False)["input_ids"])
        assert n_tokens < len(text.encode("utf-8")) / 4, family
    tok = testing.train_tokenizer("qwen")
    for special in ("<|image_pad|>", "<|video_pad|>", "<|AUDIO|>", "<|im_start|>"):
        assert tok(special, add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids(special)]


# ------------------------------------------------------------------------------------ data


def _foreground(arr: np.ndarray) -> np.ndarray:
    """Pixels clearly different from the background (taken from the corner)."""
    return np.abs(arr.astype(int) - arr[..., :1, :1, :].astype(int)).sum(-1) > 60


def _nearest_colour(rgb: np.ndarray, lang: str = "ru") -> str:
    idx = 1 if lang == "ru" else 2
    best = min(testing._COLOURS.values(), key=lambda c: float(np.sum((np.array(c[0]) - rgb) ** 2)))
    return best[idx]


def _read_table(csv: str, modality: str) -> pd.DataFrame:
    df = pd.read_csv(csv)
    expected = ["input", "answer", "ds_name"] + ([modality] if modality != "text" else []) + ["label"]
    assert list(df.columns) == expected
    assert set(df["answer"]) <= set("ABCD") and (df["ds_name"] == f"synthetic_{modality}").all()
    assert df["label"].sum() * 2 == len(df)
    return df


def test_synthetic_member_fraction_sets_how_many_rows_are_members(tmp_path: Path) -> None:
    """The demo's recipe fine-tunes on a quarter of the samples: the labels say exactly which, and the samples
    themselves are those of the balanced draw (only the labels differ)."""
    quarter = pd.read_csv(make_synthetic_samples(tmp_path / "q", modality="text", n=10, seed=2, member_fraction=0.25))
    half = pd.read_csv(make_synthetic_samples(tmp_path / "h", modality="text", n=10, seed=2))
    assert quarter["label"].sum() == 2 and half["label"].sum() == 5  # round(2.5) == 2
    assert quarter["input"].tolist() == half["input"].tolist()
    with pytest.raises(ValueError, match="member_fraction must be in"):
        make_synthetic_samples(tmp_path / "x", modality="text", n=4, member_fraction=1.5)


def test_synthetic_images_answer_from_pixels(tmp_path: Path) -> None:
    csv = make_synthetic_samples(tmp_path, modality="image", n=12, seed=1)
    df = _read_table(csv, "image")
    assert df["input"].str.contains("<image>").all() and df["input"].str.endswith("ОТВЕТ:").all()
    checked = 0
    for _, row in df.iterrows():
        arr = np.asarray(Image.open(tmp_path / row["image"]).convert("RGB"))
        assert 64 <= arr.shape[0] <= 112
        if "цвета" in row["input"]:
            colour = _nearest_colour(np.median(arr[_foreground(arr)], axis=0))
            assert _options(row["input"])[row["answer"]] == colour
            checked += 1
    assert checked > 0


def test_synthetic_audio_beep_count(tmp_path: Path) -> None:
    import soundfile as sf

    csv = make_synthetic_samples(tmp_path, modality="audio", n=8, seed=2, language="en")
    df = _read_table(csv, "audio")
    assert df["input"].str.endswith("ANSWER:").all()
    for _, row in df.iterrows():
        wav, sr = sf.read(tmp_path / row["audio"])
        assert sr == 16000 and wav.ndim == 1 and 1.0 <= len(wav) / sr <= 2.0
        env = np.convolve(np.abs(wav), np.ones(160) / 160, mode="same") > 0.05
        loud = np.flatnonzero(env)
        beeps = int(len(loud) > 0) + int(np.sum(np.diff(loud) > 800))  # silences > 50 ms split beeps
        assert _options(row["input"])[row["answer"]] == str(beeps)


def test_synthetic_video_direction(tmp_path: Path) -> None:
    from torchcodec.decoders import VideoDecoder

    csv = make_synthetic_samples(tmp_path, modality="video", n=6, seed=3)
    df = _read_table(csv, "video")
    names = {v[1]: k for k, v in testing._DIRECTIONS.items()}
    checked = 0
    for _, row in df.iterrows():
        frames = VideoDecoder(str(tmp_path / row["video"]))[:].permute(0, 2, 3, 1).numpy()
        assert frames.shape == (8, 64, 64, 3)
        answer = _options(row["input"])[row["answer"]]
        if answer in names:
            centroids = [np.argwhere(_foreground(f)).mean(0) for f in frames]  # (y, x)
            dy, dx = centroids[-1] - centroids[0]
            moved = ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")
            assert moved == names[answer]
            checked += 1
    assert checked > 0


def test_synthetic_text_and_determinism(tmp_path: Path) -> None:
    a = pd.read_csv(make_synthetic_samples(tmp_path / "a", modality="text", n=10, seed=5))
    b = pd.read_csv(make_synthetic_samples(tmp_path / "b", modality="text", n=10, seed=5))
    _read_table(str(tmp_path / "a" / "samples.csv"), "text")
    pd.testing.assert_frame_equal(a, b)
    for _, row in a.iterrows():
        m = re.search(r"число (\d+) и прибавляет к нему (\d+)", row["input"])
        if m:
            assert _options(row["input"])[row["answer"]] == str(int(m[1]) + int(m[2]))


def test_member_shifts(tmp_path: Path) -> None:
    import soundfile as sf

    img = pd.read_csv(make_synthetic_samples(tmp_path / "i", modality="image", n=16, member_shift={"brightness": 0.4}))
    bright = [np.asarray(Image.open(tmp_path / "i" / p)).mean() for p in img["image"]]
    assert np.mean([b for b, lab in zip(bright, img["label"]) if lab]) > np.mean(
        [b for b, lab in zip(bright, img["label"]) if not lab]) + 20

    aud = pd.read_csv(make_synthetic_samples(tmp_path / "a", modality="audio", n=8, member_shift={"loudness": 2.0}))
    peak = {lab: np.mean([np.abs(sf.read(tmp_path / "a" / p)[0]).max() for p in aud["audio"][aud["label"] == lab]])
            for lab in (0, 1)}
    assert peak[1] > 1.5 * peak[0]

    txt = pd.read_csv(make_synthetic_samples(tmp_path / "t", modality="text", n=10, member_shift={"year": True}))
    years = txt["input"].str.extract(r"(\d{4}) году")[0].astype(int)
    assert years[txt["label"] == 1].min() > years[txt["label"] == 0].max()

    with pytest.raises(ValueError, match="unknown key"):
        make_synthetic_samples(tmp_path / "x", modality="text", n=2, member_shift={"colour": 1})
    with pytest.raises(ValueError, match="modality"):
        make_synthetic_samples(tmp_path / "x", modality="smell", n=2)


def test_synthetic_features_members_have_larger_delta() -> None:
    ds = synthetic_features(40, k=3, dim=5, shift=1.0, seed=0)
    assert ds.column_names == ["sample_id", "input", "answer", "ds_name", "label", "loss", "neighbor_losses",
                               "embedding", "neighbor_embeddings"]
    row = ds[0]
    assert len(row["neighbor_losses"]) == 3 and len(row["embedding"]) == 5
    assert np.asarray(row["neighbor_embeddings"]).shape == (3, 5)
    delta = np.asarray(ds["neighbor_losses"]).mean(1) - np.asarray(ds["loss"])
    labels = np.asarray(ds["label"])
    assert sum(labels) == 20 and delta[labels == 1].mean() > delta[labels == 0].mean() + 0.5


@pytest.mark.slow
def test_small_image_text_size(tmp_path: Path) -> None:
    path = build_tiny("image-text", tmp_path / "small", size="small")
    n = json.loads((Path(path) / MARKER_FILE).read_text())["num_parameters"]
    assert 20_000_000 < n < 40_000_000
    model, processor = _load("image-text", path)
    inputs = processor(text=["<|vision_start|><|image_pad|><|vision_end|>Что это?"],
                       images=[Image.new("RGB", (224, 224))], return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 64
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()


# ------------------------------------------------------------------------------------ pretrained-like kit models


def test_prompts_carry_content_of_their_own(tmp_path: Path) -> None:
    """Every prompt has a line only it has (who sent the task, from where), as real benchmark items do;
    a model can memorise a sample only by what distinguishes it."""
    frame = pd.read_csv(make_synthetic_samples(tmp_path, modality="image", n=64, seed=0))
    assert frame["input"].nunique() == 64
    assert frame["input"].str.contains(r"^Задание №\d+ прислала? \w+ из \w+ .+\.$", regex=True, flags=re.M).all()


def test_build_target_records_its_recipe_and_is_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = testing.build_target("text", tmp_path / "t", pool_size=16, epochs=1)
    marker = json.loads((Path(path) / MARKER_FILE).read_text())
    assert marker["kind"] == "target-text" and marker["size"] == "mini" and marker["pool_size"] == 16
    assert np.isfinite(marker["heldout_answer_loss"])
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    assert model.config.hidden_size == 64

    def no_training(*args, **kwargs):
        raise AssertionError("a finished build must be reused, not retrained")

    monkeypatch.setattr(testing, "_train_language_model", no_training)
    assert testing.build_target("text", tmp_path / "t", pool_size=16, epochs=1) == path
    with pytest.raises(AssertionError, match="reused"):  # another recipe is another build
        testing.build_target("text", tmp_path / "t", pool_size=16, epochs=2)


def test_build_target_rejects_unknown_modality(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown modality 'smell'"):
        testing.build_target("smell", tmp_path)
    assert not tmp_path.joinpath(MARKER_FILE).exists()


def test_build_infiller_records_its_accuracy_and_is_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = testing.build_infiller(tmp_path / "f", epochs=1)
    marker = json.loads((Path(path) / MARKER_FILE).read_text())
    assert marker["kind"] == "infiller" and 0.0 <= marker["heldout_word_accuracy"] <= 1.0
    monkeypatch.setattr(testing, "_train_span_filling", lambda *a, **k: pytest.fail("retrained"))
    assert testing.build_infiller(tmp_path / "f", epochs=1) == path


@pytest.mark.slow
@pytest.mark.parametrize("modality", ["image", "audio", "video", "text"])
def test_kit_target_answers_in_the_task_format(modality: str, kit_target) -> None:
    """The default recipe: held-out answer loss within 0.3 of ln 4 (four options) or below, far under the
    ln V = 7.6 of a random-weight target (measured, seeds 0 / 1: image 1.41 / 1.43, audio 1.44 / 1.43,
    video 1.66 / 1.41, text 1.46 / 1.64)."""
    loss = json.loads((Path(kit_target(modality)) / MARKER_FILE).read_text())["heldout_answer_loss"]
    assert loss <= np.log(4) + 0.3


@pytest.mark.slow
def test_kit_infiller_fills_in_words(tmp_path: Path) -> None:
    """Fill neighbours of the trained infiller are mostly the corpus's words; a random T5's are not. (16 samples give
    about 75 new words: 0.80 of them known on an AVX-512 machine, where 4 samples' 14 words gave 0.64; random 0.09.
    The rest are glued or cut words such as 'Выбери' from 'Выберите'.)"""
    import datasets

    from fimmia_hf import NeighborGenerator, load_samples

    datasets.disable_progress_bars()
    words = {w.strip(".,:?!") for line in testing._corpus() for w in line.split()}
    samples = load_samples(make_synthetic_samples(tmp_path / "s", modality="text", n=16, seed=3))

    def share_of_known_words(model: str) -> float:
        ds = NeighborGenerator(model, num_neighbors=4, ops=["fill"]).apply(samples, cache_dir=tmp_path / model[-6:])
        new = [w.strip(".,:?!") for row in ds for text in row["neighbors"]
               for w in set(text.split()) - set(row["input"].split())]
        return float(np.mean([w in words for w in new]))

    trained = testing.build_infiller(tmp_path / "trained")
    random = build_tiny("t5-infill", tmp_path / "random")
    assert json.loads((Path(trained) / MARKER_FILE).read_text())["heldout_word_accuracy"] > 0.02
    assert share_of_known_words(trained) > 0.6 and share_of_known_words(random) < 0.2

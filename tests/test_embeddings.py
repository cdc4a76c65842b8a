"""Text and media embedding stages: pooling, batching, caching, dedupe, Arrow types."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pytest
import torch

from fimmia_hf.data import SampleError, load_samples
from fimmia_hf.embeddings import POOLING_MODES, ModalityEmbedder, TextEmbedder, pool
from fimmia_hf.embeddings import media as media_embeddings
from fimmia_hf.embeddings.text import _is_decoder_only
from fimmia_hf.media import load_video

TEXTS = [
    "Прочитайте текст и ответьте на вопрос. A",
    "Short one. B",
    "What colour is the shape in the image? Choose one option from A, B, C, D and write only the letter. C",
    "Маша has a red ball. D",
    "Numbers: 1 2 3",
]


def _text_rows(k: int = 3) -> datasets.Dataset:
    inputs = ["Какого цвета мяч у Маши?", "What number did Anna get?", "Сколько звуковых сигналов слышно в записи?"]
    return datasets.Dataset.from_dict({
        "sample_id": [f"s{i}" for i in range(len(inputs))],
        "input": inputs,
        "answer": ["A", "B", "C"],
        "ds_name": ["t"] * len(inputs),
        "neighbors": [[f"{text} {'x ' * j}".strip() for j in range(1, k + 1)] for text in inputs],
    })


# -- pooling ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", POOLING_MODES)
def test_pooling_is_the_same_for_left_and_right_padding(mode: str) -> None:
    torch.manual_seed(0)
    lengths, width, dim = [5, 2, 7], 7, 4
    rows = [torch.randn(n, dim) for n in lengths]
    right, left = torch.zeros(3, width, dim), torch.zeros(3, width, dim)
    right_mask, left_mask = torch.zeros(3, width), torch.zeros(3, width)
    for i, row in enumerate(rows):
        right[i, : len(row)], right_mask[i, : len(row)] = row, 1
        left[i, width - len(row):], left_mask[i, width - len(row):] = row, 1
        right[i, len(row):] = 100.0  # garbage in the padding must not leak into any pooling
        left[i, : width - len(row)] = 100.0
    alone = torch.cat([pool(row[None], torch.ones(1, len(row)), mode) for row in rows])
    torch.testing.assert_close(pool(right, right_mask, mode), alone)
    torch.testing.assert_close(pool(left, left_mask, mode), alone)
    expected = {"cls": rows[1][0], "last": rows[1][-1], "mean": rows[1].mean(0), "max": rows[1].max(0).values}
    if mode in expected:
        torch.testing.assert_close(alone[1], expected[mode])


def test_auto_pooling_picks_last_for_decoders_and_mean_for_encoders() -> None:
    from transformers import BertConfig, Qwen2Config, RobertaConfig, T5Config

    assert _is_decoder_only(Qwen2Config())
    assert not _is_decoder_only(BertConfig())
    assert not _is_decoder_only(RobertaConfig())
    assert not _is_decoder_only(T5Config())


# -- text ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pooling", ["auto", "mean", "cls"])
def test_batched_equals_one_by_one_and_padding_side_does_not_matter(tiny_model, pooling: str) -> None:
    path = tiny_model("text-encoder")
    batched = TextEmbedder(path, pooling=pooling, model_batch_size=4, device="cpu")
    vectors = batched.embed_texts(TEXTS)
    one_by_one = np.stack([batched.embed_texts([t])[0] for t in TEXTS])  # one text per forward, no padding
    np.testing.assert_allclose(vectors, one_by_one, atol=1e-5)
    assert vectors.dtype == np.float32 and vectors.shape == (len(TEXTS), 32)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert batched.pooling_modes == (("last",) if pooling == "auto" else (pooling,))  # Qwen2 is a decoder

    from transformers import AutoTokenizer

    left = AutoTokenizer.from_pretrained(path, padding_side="left")
    from_left = TextEmbedder(path, pooling=pooling, tokenizer=left, model_batch_size=4, device="cpu").embed_texts(TEXTS)
    np.testing.assert_allclose(from_left, vectors, atol=1e-5)


def test_apply_adds_float32_columns_with_the_original_texts(tiny_model, tmp_path: Path) -> None:
    embedder = TextEmbedder(tiny_model("text-encoder"), model_batch_size=8, device="cpu")
    ds = _text_rows(k=3)
    out = embedder.apply(ds, cache_dir=tmp_path)
    assert out.features["embedding"] == datasets.Sequence(datasets.Value("float32"))
    assert out.data.schema.field("embedding").type == pa.list_(pa.float32())
    assert out.data.schema.field("neighbor_embeddings").type == pa.list_(pa.list_(pa.float32()))
    assert out.column_names == [*ds.column_names, "embedding", "neighbor_embeddings"]
    row = out.with_format("numpy")[1]
    assert row["embedding"].shape == (32,) and np.stack(row["neighbor_embeddings"]).shape == (3, 32)
    # default: embed input + " " + answer and neighbour + " " + answer, as the original did
    expected = embedder.embed_texts([ds[1]["input"] + " B", *[nb + " B" for nb in ds[1]["neighbors"]]])
    np.testing.assert_allclose(row["embedding"], expected[0], atol=1e-6)
    np.testing.assert_allclose(np.stack(row["neighbor_embeddings"]), expected[1:], atol=1e-6)
    assert not np.allclose(expected[0], expected[1])


def test_sentence_transformers_folder_pooling_dense_and_normalize(tiny_model, tmp_path: Path) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModel, AutoTokenizer

    folder = tmp_path / "st"
    shutil.copytree(tiny_model("text-encoder"), folder)
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"},
        {"idx": 3, "name": "3", "path": "3_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": 32, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
        "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False, "pooling_mode_lasttoken": False, "include_prompt": True,
    }))
    (folder / "2_Dense").mkdir()
    (folder / "2_Dense" / "config.json").write_text(json.dumps(
        {"in_features": 32, "out_features": 16, "bias": True, "activation_function": "torch.nn.modules.activation.Tanh"}))
    torch.manual_seed(0)
    linear = torch.nn.Linear(32, 16)
    save_file({"linear.weight": linear.weight.detach(), "linear.bias": linear.bias.detach()},
              str(folder / "2_Dense" / "model.safetensors"))
    (folder / "3_Normalize").mkdir()

    embedder = TextEmbedder(folder, device="cpu")
    vectors = embedder.embed_texts(TEXTS[:3])
    assert embedder.pooling_modes == ("mean",)  # from the folder, not the decoder default "last"
    model, tokenizer = AutoModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        expected = []
        for text in TEXTS[:3]:
            hidden = model(**tokenizer(text, return_tensors="pt")).last_hidden_state[0]
            expected.append(torch.nn.functional.normalize(torch.tanh(linear(hidden.mean(0))), dim=0))
    np.testing.assert_allclose(vectors, torch.stack(expected).numpy(), atol=1e-5)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="pooling"):
        TextEmbedder("x", pooling="median")
    with pytest.raises(ValueError, match="text_template"):
        TextEmbedder("x", text_template="{prompt} {answer}")
    with pytest.raises(ValueError, match="modality"):
        ModalityEmbedder("x", modality="smell")


# -- media -----------------------------------------------------------------------------------------


def _counting(method, key: str, counts: list[int]):
    """Wrap a model method (keeping its signature) to record how many items each call embeds."""

    @functools.wraps(method)
    def wrapper(**inputs):
        counts.append(len(inputs[key]))
        return method(**inputs)

    return wrapper


def test_each_distinct_image_is_loaded_and_embedded_once(tiny_model, synthetic_table, monkeypatch,
                                                         tmp_path: Path) -> None:
    samples = load_samples(synthetic_table("image", 3))
    ds = datasets.concatenate_datasets([samples, samples, samples])  # 9 rows, 3 distinct images
    ds = ds.add_column("neighbors", [[f"{t} {j}" for j in range(4)] for t in ds["input"]])
    loads: list[str] = []
    real_load = media_embeddings.load_media
    monkeypatch.setattr(media_embeddings, "load_media", lambda kind, value, **kw: loads.append(value) or real_load(kind, value, **kw))
    embedder = ModalityEmbedder(tiny_model("image-encoder"), device="cpu")
    model = embedder.loaded().model
    calls: list[int] = []
    model.get_image_features = _counting(model.get_image_features, "pixel_values", calls)

    out = embedder.apply(ds, cache_dir=tmp_path)
    assert sorted(loads) == sorted(samples["image"]) and sum(calls) == 3
    assert out.data.schema.field("media_embedding").type == pa.list_(pa.float32())
    columns = out.with_format("numpy")[:]
    media, neighbours = columns["media_embedding"], columns["neighbor_media_embeddings"]
    assert media.shape == (9, 32)
    np.testing.assert_allclose(np.linalg.norm(media, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(media[0], media[3], atol=0)  # same file, same vector
    assert not np.allclose(media[0], media[1])
    for i in range(9):  # no media neighbours: K copies of the original, so Δm = 0 exactly
        assert np.stack(neighbours[i]).shape == (4, 32)
        np.testing.assert_array_equal(np.stack(neighbours[i]), np.repeat(media[i][None], 4, axis=0))


def test_media_neighbors_are_embedded(tiny_model, synthetic_table, tmp_path: Path) -> None:
    samples = load_samples(synthetic_table("image", 3))
    paths = samples["image"]
    ds = samples.add_column("media_neighbors", [[paths[(i + 1) % 3], paths[(i + 2) % 3]] for i in range(3)])
    out = ModalityEmbedder(tiny_model("image-encoder"), device="cpu").apply(ds, cache_dir=tmp_path)
    columns = out.with_format("numpy")[:]
    media = columns["media_embedding"]
    np.testing.assert_allclose(np.stack(columns["neighbor_media_embeddings"][0]), media[[1, 2]], atol=1e-6)


def test_audio_and_video_embeddings(tiny_model, synthetic_table, tmp_path: Path) -> None:
    audio = ModalityEmbedder(tiny_model("audio-encoder"), device="cpu").apply(
        load_samples(synthetic_table("audio", 2)), cache_dir=tmp_path / "a").with_format("numpy")[:]["media_embedding"]
    assert audio.shape == (2, 32) and not np.allclose(audio[0], audio[1])

    video_rows = load_samples(synthetic_table("video", 2))
    embedder = ModalityEmbedder(tiny_model("image-encoder"), num_frames=4, device="cpu")
    video = embedder.apply(video_rows, cache_dir=tmp_path / "v").with_format("numpy")[:]
    frames = load_video(video_rows[0]["video"], num_frames=4)
    per_frame = embedder.embed_media(list(frames), "image")  # CLIP has no video method: a video is the mean of its frames
    embedder.normalize = False
    expected = embedder.embed_media(list(frames), "image").mean(axis=0)
    np.testing.assert_allclose(video["media_embedding"][0], expected / np.linalg.norm(expected), atol=1e-5)
    assert per_frame.shape == (4, 32)


def test_missing_media_names_the_sample(tiny_model, tmp_path: Path) -> None:
    ds = datasets.Dataset.from_dict({"sample_id": ["abc"], "input": ["q"], "answer": ["A"], "ds_name": ["d"],
                                     "image": [str(tmp_path / "gone.png")]})
    with pytest.raises(ValueError, match=r"row 1 \(sample_id 'abc'\), column 'image': .*not found"):
        ModalityEmbedder(tiny_model("image-encoder"), device="cpu").apply(ds, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="no media column"):
        ModalityEmbedder(tiny_model("image-encoder")).apply(ds.remove_columns("image"), cache_dir=tmp_path)


# -- command line ----------------------------------------------------------------------------------


def test_run_embed_writes_text_and_media_embeddings(tiny_model, synthetic_table, tmp_path: Path) -> None:
    samples = load_samples(synthetic_table("image", 2))
    data = tmp_path / "in"
    samples.add_column("neighbors", [[t + " ?"] for t in samples["input"]]).save_to_disk(str(data))
    from fimmia_hf.cli import main

    code = main(["embed", "--data", str(data), "--out", str(tmp_path / "out"), "--model", tiny_model("text-encoder"),
                 "--media-model", tiny_model("image-encoder"), "--batch-size", "4", "--device", "cpu"])
    assert code == 0
    out = datasets.load_from_disk(str(tmp_path / "out"))
    assert {"embedding", "neighbor_embeddings", "media_embedding", "neighbor_media_embeddings"} <= set(out.column_names)
    assert len(out[0]["neighbor_media_embeddings"]) == 1


def test_video_method_gets_the_frames_of_each_video(tiny_model, synthetic_table) -> None:
    """X-CLIP's processor flattens all frames; the embedder regroups them per video."""
    from transformers import AutoTokenizer, CLIPImageProcessor, XCLIPConfig, XCLIPModel, XCLIPProcessor

    tokenizer = AutoTokenizer.from_pretrained(tiny_model("image-encoder"))
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    torch.manual_seed(0)
    model = XCLIPModel(XCLIPConfig(
        text_config=dict(vocab_size=len(tokenizer) + 8, **small), projection_dim=32, prompt_layers=1,
        vision_config=dict(image_size=32, patch_size=8, num_frames=4, mit_hidden_size=32, mit_intermediate_size=64,
                           mit_num_hidden_layers=1, mit_num_attention_heads=4, **small),
    ))
    processor = XCLIPProcessor(CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                               tokenizer)
    videos = load_samples(synthetic_table("video", 2))["video"]
    embedder = ModalityEmbedder(model, modality="video", processor=processor, num_frames=4, device="cpu")
    together = embedder.embed_media(videos)
    np.testing.assert_allclose(together, np.concatenate([embedder.embed_media([v]) for v in videos]), atol=1e-5)
    assert together.shape == (2, 32) and not np.allclose(together[0], together[1])
    with pytest.raises(ValueError, match="num_frames=4"):
        ModalityEmbedder(model, modality="video", processor=processor, num_frames=8, device="cpu").embed_media(videos)


@pytest.mark.parametrize("damage", ["truncated", "empty", "text"])
def test_damaged_video_names_the_row_in_every_stage(damage, tiny_model, synthetic_table, tmp_path: Path) -> None:
    """A video damaged after validation stops the embedder and the scorer with the row, column and the decoder's
    reason (torchcodec's C++ source location left out)."""
    from fimmia_hf import TargetScorer

    ds = load_samples(synthetic_table("video", 2))
    good = Path(ds[0]["video"]).read_bytes()
    bad = tmp_path / "bad.mp4"
    bad.write_bytes({"truncated": good[: len(good) // 2], "empty": b"", "text": b"not a video"}[damage])
    ds = ds.map(lambda r, i: {"video": str(bad) if i == 1 else r["video"]}, with_indices=True)
    for stage in (ModalityEmbedder(tiny_model("image-encoder"), num_frames=2, device="cpu"),
                  TargetScorer(tiny_model("image-text"), num_frames=2, device="cpu")):
        with pytest.raises(ValueError, match=r"row 2 \(sample_id '\w+'\), column 'video': cannot decode video .*bad\.mp4") as caught:
            stage.apply(ds, cache_dir=tmp_path / stage.name)
        assert ".cpp" not in str(caught.value)
    with pytest.raises(SampleError, match=r"column 'video'.*\n  row 2: cannot decode video"):
        load_samples(ds)

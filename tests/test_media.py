"""Media loaders: every accepted form gives the one normal form, and failures say what and where."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fimmia_hf.media import MediaError, load_audio, load_image, load_video


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from torchcodec.encoders import AudioEncoder, VideoEncoder

    root = tmp_path_factory.mktemp("media")
    Image.new("RGB", (20, 10), "green").save(root / "img.png")
    t = torch.arange(22050) / 22050
    AudioEncoder(torch.sin(2 * torch.pi * 440 * t).unsqueeze(0).repeat(2, 1), sample_rate=22050).to_file(str(root / "tone.wav"))
    frames = torch.zeros(10, 3, 32, 32, dtype=torch.uint8)
    for i in range(10):
        frames[i, :, :, i * 3 : i * 3 + 3] = 255  # a bar moving right
    VideoEncoder(frames, frame_rate=5).to_file(str(root / "clip.mp4"))
    return root


def test_image_from_path_bytes_pil_array_and_hf_dict(media_dir: Path) -> None:
    path = media_dir / "img.png"
    data = path.read_bytes()
    for value in (str(path), path, data, Image.open(path), np.asarray(Image.open(path)), {"bytes": data, "path": None}):
        image = load_image(value)
        assert image.mode == "RGB" and image.size == (20, 10)


def test_audio_is_mono_float32_and_resampled(media_dir: Path) -> None:
    wave, rate = load_audio(media_dir / "tone.wav", sampling_rate=16000)
    assert rate == 16000 and wave.dtype == np.float32 and wave.ndim == 1
    assert abs(len(wave) - 16000) <= 2
    native, native_rate = load_audio(media_dir / "tone.wav", sampling_rate=None)
    assert native_rate == 22050
    same, _ = load_audio({"array": native, "sampling_rate": native_rate}, sampling_rate=16000)
    np.testing.assert_allclose(same, wave, atol=1e-4)
    from_bytes, _ = load_audio((media_dir / "tone.wav").read_bytes(), sampling_rate=16000)
    np.testing.assert_allclose(from_bytes, wave, atol=1e-6)


def test_video_frames_by_count_or_rate(media_dir: Path) -> None:
    frames = load_video(media_dir / "clip.mp4", num_frames=4)
    assert frames.shape == (4, 32, 32, 3) and frames.dtype == np.uint8
    assert load_video(media_dir / "clip.mp4", num_frames=None).shape[0] == 10
    assert load_video(media_dir / "clip.mp4", num_frames=None, fps=2.5).shape[0] == 5
    # the bar moves right: the brightest column increases over time
    columns = frames.mean(axis=(1, 3)).argmax(axis=1)
    assert list(columns) == sorted(columns) and columns[-1] > columns[0]
    decoded = [Image.fromarray(f) for f in frames]
    assert load_video(decoded, num_frames=2).shape == (2, 32, 32, 3)


def test_errors_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "bad.png").write_bytes(b"nope")
    with pytest.raises(MediaError, match="bad.png"):
        load_image(tmp_path / "bad.png")
    with pytest.raises(MediaError, match="not found.*missing.wav"):
        load_audio(tmp_path / "missing.wav")
    with pytest.raises(MediaError, match="cannot decode video.*bad.png"):
        load_video(tmp_path / "bad.png")
    with pytest.raises(MediaError, match="cannot read an image from a int"):
        load_image(3)
    assert isinstance(MediaError("x"), ValueError)


def test_16_bit_grayscale_png_is_scaled_not_clamped(tmp_path) -> None:
    """A 0-65535 gradient keeps its gradient (PIL's convert("RGB") would turn it nearly white)."""
    from PIL import Image

    gradient = np.linspace(0, 65535, 256).round().astype(np.uint16)[None, :].repeat(4, axis=0)
    Image.fromarray(gradient).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    for value in (tmp_path / "g16.png", gradient):
        rgb = np.asarray(load_image(value))
        assert rgb.shape == (4, 256, 3)
        np.testing.assert_allclose(rgb[0, :, 0], np.linspace(0, 255, 256), atol=1)

"""Load images, audio and video from whatever form a sample holds them in.

A media value may be a path, raw bytes, a decoded object (PIL image, waveform, frames), or what a
`datasets` Image/Audio/Video feature yields. Each loader returns one normal form, so the stages never
care where the media came from, and raises `MediaError` saying what could not be read.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from .columns import MEDIA_COLUMNS

MEDIA_PLACEHOLDERS = {m: f"<{m}>" for m in MEDIA_COLUMNS}


class MediaError(ValueError):
    """A media item is missing or cannot be decoded."""


def _reason(err: Exception) -> str:
    """A decoder's message without torchcodec's C++ source location ("SingleStreamDecoder, ….cpp:41, ")."""
    return re.sub(r"^\w+, \S+\.cpp:\d+, ", "", str(err))


def _describe(value: Any) -> str:
    if isinstance(value, (str, os.PathLike)):
        return str(value)
    return type(value).__name__


def _source(value: Any) -> Any:
    """Unwrap the `{"path": ..., "bytes": ...}` dicts that datasets stores for undecoded media."""
    if isinstance(value, dict) and ("bytes" in value or "path" in value) and "array" not in value:
        return value.get("bytes") or value.get("path")
    return value


def load_image(value: Any) -> PIL.Image.Image:  # noqa: F821
    """An RGB PIL image from a path, bytes, PIL image, array or datasets Image value.

    16-bit grayscale (PNG mode ``I;16``/``I``, uint16 arrays) is scaled from 0-65535 to 0-255, not clamped.
    """
    from PIL import Image

    value = _source(value)
    try:
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, np.ndarray):
            image = Image.fromarray(value)
        elif isinstance(value, (bytes, bytearray)):
            image = Image.open(io.BytesIO(value))
        elif isinstance(value, (str, os.PathLike)):
            image = Image.open(value)
        else:
            raise MediaError(f"cannot read an image from a {type(value).__name__}")
        image.load()
        if image.mode == "I" or image.mode.startswith("I;16"):  # 16-bit: scale to 8 bits (convert() would clamp)
            image = Image.fromarray((np.asarray(image, dtype=np.float64) / 257).round().clip(0, 255).astype(np.uint8))
        return image.convert("RGB")
    except MediaError:
        raise
    except FileNotFoundError as err:
        raise MediaError(f"image file not found: {value}") from err
    except Exception as err:
        raise MediaError(f"cannot decode image {_describe(value)}: {err}") from err


def _resample(wave: np.ndarray, rate: int, target: int | None) -> tuple[np.ndarray, int]:
    if target is None or rate == target:
        return wave, rate
    import torch
    import torchaudio.functional as F

    return F.resample(torch.from_numpy(wave), rate, target).numpy(), target


def load_audio(value: Any, sampling_rate: int | None = 16000) -> tuple[np.ndarray, int]:
    """A mono float32 waveform and its rate, resampled to `sampling_rate` (None keeps the file's).

    Accepts a path, bytes, `(array, rate)`, a datasets Audio dict `{"array", "sampling_rate"}` or a
    torchcodec `AudioDecoder` (what datasets 4+ yields).
    """
    value = _source(value)
    try:
        if isinstance(value, dict) and "array" in value:
            wave, rate = np.asarray(value["array"]), int(value["sampling_rate"])
        elif isinstance(value, tuple) and len(value) == 2:
            wave, rate = np.asarray(value[0]), int(value[1])
        elif isinstance(value, (str, os.PathLike, bytes, bytearray)) or hasattr(value, "get_all_samples"):
            if isinstance(value, (str, os.PathLike)) and not Path(value).is_file():
                raise MediaError(f"audio file not found: {value}")
            from torchcodec.decoders import AudioDecoder

            decoder = value if hasattr(value, "get_all_samples") else AudioDecoder(
                value if isinstance(value, (bytes, bytearray)) else str(value)
            )
            samples = decoder.get_all_samples()
            wave, rate = samples.data.numpy(), int(samples.sample_rate)
        else:
            raise MediaError(f"cannot read audio from a {type(value).__name__}")
    except MediaError:
        raise
    except Exception as err:
        raise MediaError(f"cannot decode audio {_describe(value)}: {_reason(err)}") from err
    wave = wave.astype(np.float32)
    if wave.ndim == 2:  # (channels, time) from decoders; (time, channels) from soundfile-style arrays
        wave = wave.mean(axis=0 if wave.shape[0] <= wave.shape[1] else 1)
    if wave.ndim != 1 or wave.size == 0:
        raise MediaError(f"audio {_describe(value)} has no samples")
    return _resample(wave, rate, sampling_rate)


def load_video(value: Any, num_frames: int | None = 8, fps: float | None = None) -> np.ndarray:
    """Frames as uint8 `[T, H, W, 3]`: `num_frames` spread evenly, or sampled at `fps`, or all (both None).

    Accepts a path, bytes, a torchcodec `VideoDecoder`, or frames already decoded (array or list of
    images).
    """
    value = _source(value)
    try:
        if isinstance(value, (str, os.PathLike, bytes, bytearray)) or hasattr(value, "get_frames_at"):
            if isinstance(value, (str, os.PathLike)) and not Path(value).is_file():
                raise MediaError(f"video file not found: {value}")
            from torchcodec.decoders import VideoDecoder

            decoder = value if hasattr(value, "get_frames_at") else VideoDecoder(
                value if isinstance(value, (bytes, bytearray)) else str(value), dimension_order="NHWC"
            )
            total = decoder.metadata.num_frames or len(decoder)
            if fps is not None and decoder.metadata.average_fps:
                step = max(1.0, decoder.metadata.average_fps / fps)
                indices = np.arange(0, total, step).astype(int)
            elif num_frames is not None:
                indices = np.linspace(0, total - 1, num=min(num_frames, total)).round().astype(int)
            else:
                indices = np.arange(total)
            frames = decoder.get_frames_at(indices=indices.tolist()).data.numpy()
            if frames.shape[-1] != 3:  # a decoder made elsewhere may be NCHW
                frames = frames.transpose(0, 2, 3, 1)
        elif isinstance(value, (list, tuple, np.ndarray)):
            frames = np.stack([np.asarray(load_image(f)) for f in value]) if isinstance(value, (list, tuple)) else value
            if num_frames is not None and len(frames) > num_frames:
                frames = frames[np.linspace(0, len(frames) - 1, num=num_frames).round().astype(int)]
        else:
            raise MediaError(f"cannot read a video from a {type(value).__name__}")
    except MediaError:
        raise
    except Exception as err:
        raise MediaError(f"cannot decode video {_describe(value)}: {_reason(err)}") from err
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[0] == 0:
        raise MediaError(f"video {_describe(value)} has no frames")
    return frames.astype(np.uint8)


LOADERS = {"image": load_image, "audio": load_audio, "video": load_video}


def load_media(modality: str, value: Any, **kwargs: Any) -> Any:
    """Dispatch to the loader of `modality` ("image", "audio" or "video")."""
    if modality not in LOADERS:
        raise ValueError(f"unknown modality {modality!r}; expected one of {', '.join(LOADERS)}")
    return LOADERS[modality](value, **kwargs)

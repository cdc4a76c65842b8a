"""Seeded media perturbations for neighbour generation, written as standard files.

FiMMIA pairs each text neighbour with a slightly perturbed copy of the sample's media, so the attack
also sees how the target reacts to small media changes. The original drew its seeds from Python's
per-process `hash()` and could produce black or colour-negated images; here every perturbation is
small, drawn from a `numpy` generator whose seed the caller derives from (seed, sample_id, k), and
the result is written in a format `fimmia_hf.media` decodes: PNG for images, 16-bit WAV for audio,
H.264 MP4 for video (frames only; an audio track of the source video is not carried over).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..media import load_audio, load_image, load_video

EXTENSIONS = {"image": ".png", "audio": ".wav", "video": ".mp4"}


@dataclass(frozen=True)
class MediaPerturbation:
    """How strong the perturbations are; every field is part of the neighbour stage's fingerprint.

    Image: rotation within ±`max_rotation` degrees, translation within ±`max_translate` of the size,
    shear within ±`max_shear` degrees, brightness and contrast factors within 1 ± `max_color`.
    Audio: white noise at `snr_db` dB, gain within ±`max_gain_db`, 1..`max_silences` silences of
    `silence_s` seconds (bounds). Video: drop `drop_frames` (fraction bounds) of the frames and apply
    an image perturbation to `perturb_frames` (fraction bounds) of the rest.
    """

    max_rotation: float = 2.5
    max_translate: float = 0.02
    max_shear: float = 2.0
    max_color: float = 0.15
    snr_db: float = 30.0
    max_gain_db: float = 3.0
    max_silences: int = 3
    silence_s: tuple[float, float] = (0.05, 0.25)
    drop_frames: tuple[float, float] = (0.05, 0.15)
    perturb_frames: tuple[float, float] = (0.3, 0.5)

    def perturb_image(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A small affine move plus brightness/contrast change of a uint8 `[H, W, 3]` image."""
        import torch
        import torchvision.transforms.v2.functional as TF

        height, width = image.shape[:2]
        tensor = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
        translate = [
            int(round(rng.uniform(-1, 1) * self.max_translate * width)),
            int(round(rng.uniform(-1, 1) * self.max_translate * height)),
        ]
        tensor = TF.affine(
            tensor,
            angle=float(rng.uniform(-self.max_rotation, self.max_rotation)),
            translate=translate,
            scale=1.0,
            shear=[float(rng.uniform(-self.max_shear, self.max_shear)), 0.0],
            interpolation=TF.InterpolationMode.BILINEAR,
        )
        # factors are kept away from 1 so that even a flat image changes
        sign = lambda: 1.0 if rng.random() < 0.5 else -1.0  # noqa: E731
        tensor = TF.adjust_brightness(tensor, 1.0 + sign() * rng.uniform(self.max_color / 3, self.max_color))
        tensor = TF.adjust_contrast(tensor, 1.0 + sign() * rng.uniform(self.max_color / 3, self.max_color))
        out = tensor.permute(1, 2, 0).numpy()
        if np.array_equal(out, image):  # e.g. an all-black image: nudge a pixel so the neighbour differs
            out = out.copy()
            out[0, 0] = 255 - out[0, 0]
        return out

    def perturb_audio(self, wave: np.ndarray, rate: int, rng: np.random.Generator) -> np.ndarray:
        """Gain change, white noise at `snr_db`, and a few short silences of a mono waveform."""
        import torch
        import torchaudio.functional as AF

        signal = torch.from_numpy(wave.astype(np.float32))[None]
        signal = signal * float(10 ** (rng.uniform(-self.max_gain_db, self.max_gain_db) / 20))
        noise = torch.from_numpy(rng.standard_normal(signal.shape[-1]).astype(np.float32))[None]
        if float(signal.abs().max()) > 0:
            signal = AF.add_noise(signal, noise, torch.tensor([self.snr_db]))
        else:  # silence has no SNR; add a faint noise floor instead
            signal = signal + 1e-3 * noise
        out = signal[0].numpy()
        duration = len(out) / rate
        for _ in range(int(rng.integers(1, self.max_silences + 1))):
            length = rng.uniform(self.silence_s[0], max(self.silence_s[0], min(self.silence_s[1], duration / 4)))
            count = max(1, int(length * rate))
            start = int(rng.integers(0, max(1, len(out) - count)))
            out[start : start + count] = 0.0
        return np.clip(out, -1.0, 1.0)

    def perturb_video(self, frames: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Drop a few frames and perturb a random subset of the rest (each with its own draw)."""
        total = len(frames)
        drop = int(round(total * rng.uniform(*self.drop_frames))) if total >= 3 else 0
        drop = max(drop, 1) if total >= 3 else 0
        keep = np.sort(rng.choice(total, size=total - drop, replace=False))
        frames = frames[keep].copy()
        count = max(1, int(round(len(frames) * rng.uniform(*self.perturb_frames))))
        for index in np.sort(rng.choice(len(frames), size=count, replace=False)):
            frames[index] = self.perturb_image(frames[index], rng)
        return frames


def _video_rate(value: Any) -> float:
    """Frames per second of a video file (25 when unknown, e.g. for decoded frames)."""
    if isinstance(value, dict):
        value = value.get("path") or value.get("bytes")
    if isinstance(value, (str, os.PathLike, bytes, bytearray)):
        from torchcodec.decoders import VideoDecoder

        source = value if isinstance(value, (bytes, bytearray)) else str(value)
        rate = VideoDecoder(source).metadata.average_fps
        if rate and math.isfinite(rate):
            return float(rate)
    return 25.0


def _partial(path: Path) -> Path:
    """A temporary name with the same extension, renamed into place once the file is complete."""
    return path.with_name(f".partial-{os.getpid()}-{path.name}")


def write_perturbed(
    modality: str,
    value: Any,
    seeds: list[int],
    out_dir: str | os.PathLike,
    stem: str,
    settings: MediaPerturbation = MediaPerturbation(),
) -> list[str]:
    """Write one perturbed copy of `value` per seed to `out_dir/<stem>_<k><ext>`; return absolute paths.

    Files that already exist are kept (the seeds fix their content), so an interrupted run resumes.
    """
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}_{k:03d}{EXTENSIONS[modality]}" for k in range(len(seeds))]
    todo = [(path, seed) for path, seed in zip(paths, seeds) if not path.is_file()]
    if not todo:
        return [str(p) for p in paths]
    if modality == "image":
        original = np.asarray(load_image(value))
        from PIL import Image

        for path, seed in todo:
            partial = _partial(path)
            Image.fromarray(settings.perturb_image(original, np.random.default_rng(seed))).save(partial)
            os.replace(partial, path)
    elif modality == "audio":
        import soundfile

        wave, rate = load_audio(value, sampling_rate=None)
        for path, seed in todo:
            partial = _partial(path)
            soundfile.write(
                partial, settings.perturb_audio(wave, rate, np.random.default_rng(seed)), rate, subtype="PCM_16"
            )
            os.replace(partial, path)
    elif modality == "video":
        import torch
        from torchcodec.encoders import VideoEncoder

        frames = load_video(value, num_frames=None)
        frames = frames[:, : frames.shape[1] // 2 * 2, : frames.shape[2] // 2 * 2]  # H.264 needs even sizes
        rate = _video_rate(value)
        for path, seed in todo:
            perturbed = settings.perturb_video(frames, np.random.default_rng(seed))
            partial = _partial(path)
            VideoEncoder(torch.from_numpy(perturbed).permute(0, 3, 1, 2).contiguous(), frame_rate=rate).to_file(
                str(partial)
            )
            os.replace(partial, path)
    else:
        raise ValueError(f"unknown modality {modality!r}; expected one of {', '.join(EXTENSIONS)}")
    return [str(p) for p in paths]

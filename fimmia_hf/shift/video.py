"""Blind video features: per-frame image statistics pooled over time, plus motion statistics.

Member and non-member videos from different sources differ in resolution, colour grading, frame
rate and camera motion; none of that needs the model to see.
"""

from __future__ import annotations

import numpy as np

from .image import image_array, image_global_features

__all__ = ["video_features"]


def video_features(frames: np.ndarray) -> np.ndarray:
    """Fixed-length descriptor of uint8 frames ``[T, H, W, 3]``.

    Mean and std over frames of :func:`~fimmia_hf.shift.image.image_global_features`, then motion:
    mean/std/max of the absolute difference of consecutive grey frames, the fraction of pixels that
    change by more than 10 %, and the brightness trend over time.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[0] == 0:
        raise ValueError(f"expected frames [T, H, W, 3], got shape {frames.shape}")
    per_frame = np.stack([image_global_features(f) for f in frames])
    grey = np.stack([image_array(f)[0] @ np.array([0.299, 0.587, 0.114]) for f in frames])
    if len(frames) > 1:
        diff = np.abs(np.diff(grey, axis=0))
        brightness = grey.mean(axis=(1, 2))
        trend = float(np.polyfit(np.arange(len(brightness)), brightness, 1)[0])
        motion = [diff.mean(), diff.mean(axis=(1, 2)).std(), diff.mean(axis=(1, 2)).max(), (diff > 0.1).mean(), trend]
    else:
        motion = [0.0, 0.0, 0.0, 0.0, 0.0]
    return np.concatenate([[np.log(len(frames))], per_frame.mean(axis=0), per_frame.std(axis=0), motion])

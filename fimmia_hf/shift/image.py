"""Blind baselines on images: global statistics and a bag of visual words.

Members and non-members of image MIA benchmarks often come from different sources (camera photos vs
generated images, different crawls, different resolutions), which colour, frequency and texture
statistics expose without the model (ai-forever ``bag_of_visual_words``; VL-MIA blind AUC 0.99).

Per-image descriptors are fixed functions of the pixels, computed once. What is learned from data
(the visual-word codebook, the scaler, the classifier) is fitted inside each training fold.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.fft import dctn
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.cluster import KMeans
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from .evaluation import BlindMethod, SearchSpace, classifier

__all__ = [
    "IMAGE_SIZE",
    "image_array",
    "image_global_features",
    "image_local_descriptors",
    "lbp_histogram",
    "VisualWords",
    "media_features_method",
    "bag_of_visual_words_method",
]

IMAGE_SIZE = 64
"""Side of the square every image is resized to before the pixel statistics."""

_CELL = 8  # pixels per cell of the gradient histograms (SIFT-like local descriptors)
_ORIENTATIONS = 8


def image_array(image: Any) -> tuple[np.ndarray, tuple[int, int]]:
    """RGB float array in [0, 1] of shape (IMAGE_SIZE, IMAGE_SIZE, 3) and the original (width, height)."""
    from PIL import Image

    if isinstance(image, np.ndarray):
        arr = image
        if arr.dtype != np.uint8:
            arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
        image = Image.fromarray(arr)
    image = image.convert("RGB")
    size = image.size
    small = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
    return np.asarray(small, dtype=np.float64) / 255.0, size


def _gray(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.array([0.299, 0.587, 0.114])


def lbp_histogram(gray: np.ndarray) -> np.ndarray:
    """Uniform local binary pattern histogram (P = 8, R = 1): 9 uniform codes + 1 for the rest."""
    h, w = gray.shape
    centre = gray[1:-1, 1:-1]
    ring = [(-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1)]
    bits = np.stack([gray[1 + dy : h - 1 + dy, 1 + dx : w - 1 + dx] >= centre for dy, dx in ring])
    transitions = (bits != np.roll(bits, 1, axis=0)).sum(axis=0)
    codes = np.where(transitions <= 2, bits.sum(axis=0), 9)
    return np.bincount(codes.ravel(), minlength=10).astype(np.float64) / codes.size


def _hsv_histogram(rgb: np.ndarray, bins: int = 16) -> np.ndarray:
    from PIL import Image

    hsv = np.asarray(Image.fromarray((rgb * 255).astype(np.uint8)).convert("HSV"), dtype=np.float64) / 255.0
    hists = [np.histogram(hsv[..., c], bins=bins, range=(0.0, 1.0))[0] for c in range(3)]
    return np.concatenate(hists).astype(np.float64) / (rgb.shape[0] * rgb.shape[1])


def _dct_features(gray: np.ndarray) -> np.ndarray:
    """Log magnitudes of the 8x8 lowest and 4x4 highest 2-D DCT frequencies (content vs. compression/noise)."""
    coeffs = np.log1p(np.abs(dctn(gray, norm="ortho")))
    return np.concatenate([coeffs[:8, :8].ravel(), coeffs[-4:, -4:].ravel()])


def image_global_features(image: Any) -> np.ndarray:
    """One fixed-length vector per image: size, colour statistics, HSV histograms, DCT, LBP, sharpness."""
    rgb, (width, height) = image_array(image)
    gray = _gray(rgb)
    gy, gx = np.gradient(gray)
    stats = [
        np.log(width),
        np.log(height),
        np.log(width / height),
        *rgb.mean(axis=(0, 1)),
        *rgb.std(axis=(0, 1)),
        gray.mean(),
        gray.std(),
        *np.percentile(gray, [5, 50, 95]),
        np.hypot(gx, gy).mean(),  # sharpness
    ]
    return np.concatenate([np.asarray(stats), _hsv_histogram(rgb), _dct_features(gray), lbp_histogram(gray)])


def image_local_descriptors(image: Any) -> np.ndarray:
    """Dense SIFT-like descriptors: for each 16x16 patch (stride 8), 2x2 cells x 8 gradient orientations + mean colour.

    Returns an array of shape (49, 35) for the 64x64 working size.
    """
    rgb, _ = image_array(image)
    gray = _gray(rgb)
    gy, gx = np.gradient(gray)
    magnitude = np.hypot(gx, gy)
    orientation = ((np.arctan2(gy, gx) % (2 * np.pi)) / (2 * np.pi) * _ORIENTATIONS).astype(int) % _ORIENTATIONS
    n = IMAGE_SIZE // _CELL
    cell_of = (np.arange(IMAGE_SIZE) // _CELL)
    index = (cell_of[:, None] * n + cell_of[None, :]) * _ORIENTATIONS + orientation
    cells = np.bincount(index.ravel(), weights=magnitude.ravel(), minlength=n * n * _ORIENTATIONS).reshape(n, n, _ORIENTATIONS)
    colour = rgb.reshape(n, _CELL, n, _CELL, 3).mean(axis=(1, 3))
    descriptors = []
    for i in range(n - 1):
        for j in range(n - 1):
            hist = cells[i : i + 2, j : j + 2].ravel()
            hist = hist / (np.linalg.norm(hist) + 1e-8)
            hist = np.minimum(hist, 0.2)  # SIFT's clipping of dominant gradients
            hist = hist / (np.linalg.norm(hist) + 1e-8)
            descriptors.append(np.concatenate([hist, colour[i : i + 2, j : j + 2].mean(axis=(0, 1))]))
    return np.asarray(descriptors)


class VisualWords(TransformerMixin, BaseEstimator):
    """Codebook of local descriptors (k-means, fit on the training images only) -> word histograms.

    Input rows are flattened ``(n_patches * dim)`` descriptor arrays of equal size.
    """

    def __init__(self, n_words: int = 32, dim: int = 35, random_state: int = 0, max_fit_descriptors: int = 5000) -> None:
        self.n_words = n_words
        self.dim = dim
        self.random_state = random_state
        self.max_fit_descriptors = max_fit_descriptors

    def _descriptors(self, X: Any) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        return X.reshape(X.shape[0], -1, self.dim)

    def fit(self, X: Any, y: Any = None) -> VisualWords:
        d = self._descriptors(X).reshape(-1, self.dim)
        rng = np.random.default_rng(self.random_state)
        if len(d) > self.max_fit_descriptors:
            d = d[rng.choice(len(d), self.max_fit_descriptors, replace=False)]
        k = int(min(self.n_words, len(d)))
        self.kmeans_ = KMeans(n_clusters=k, n_init=1, random_state=self.random_state).fit(d)
        return self

    def transform(self, X: Any) -> np.ndarray:
        d = self._descriptors(X)
        words = self.kmeans_.predict(d.reshape(-1, self.dim)).reshape(d.shape[0], d.shape[1])
        k = self.kmeans_.n_clusters
        hist = np.stack([np.bincount(w, minlength=k) for w in words]).astype(np.float64)
        return hist / d.shape[1]


def media_features_method(name: str, inputs: Any, description: str) -> BlindMethod:
    """Fixed media descriptors -> scaler -> classifier (model searched per fold)."""

    def build(space: SearchSpace, seed: int):
        pipe = Pipeline([("scale", StandardScaler()), ("clf", classifier("logreg"))])
        return pipe, [{"clf": [classifier(c, seed=seed, nonnegative=False) for c in space.media_models]}]

    return BlindMethod(name, build, inputs, description)


def bag_of_visual_words_method() -> BlindMethod:
    """Dense local descriptors -> k-means codebook (per fold) -> word histogram -> classifier."""

    def build(space: SearchSpace, seed: int):
        pipe = Pipeline(
            [("words", VisualWords(random_state=seed)), ("scale", StandardScaler()), ("clf", classifier("logreg"))]
        )
        models = [m for m in space.media_models if m != "stack"] or ["logreg"]
        return pipe, [{"clf": [classifier(c, seed=seed, nonnegative=False) for c in models]}]

    return BlindMethod("bag_of_visual_words", build, lambda t: t.local, "k-means visual words over dense gradient patches")

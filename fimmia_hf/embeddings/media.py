"""ModalityEmbedder: each sample's image, audio or video as a vector (`media_embedding`), and its
media neighbours' (`neighbor_media_embeddings`).

The original re-embedded the same media file K times. Here each distinct item is loaded and embedded
once per batch, through `get_image_features`-style methods (CLIP, SigLIP, CLAP, X-CLIP, ...) or the
mean of an `AutoModel`'s last hidden state.
"""

from __future__ import annotations

import hashlib
import inspect
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import datasets
import numpy as np

from ..columns import MEDIA_COLUMNS, MEDIA_EMBEDDING, MEDIA_NEIGHBORS, NEIGHBOR_MEDIA_EMBEDDINGS, NEIGHBORS
from ..media import MediaError, load_media
from ..stage import Stage, StageContext, resolve_device
from .vectors import VECTOR, VECTORS, normalize, resolve_dtype, to_float32

if TYPE_CHECKING:
    import torch


def media_key(value: Any) -> str:
    """A key equal for the same media item: its path, else a hash of its content."""
    if isinstance(value, dict) and ("path" in value or "bytes" in value) and "array" not in value:
        value = value.get("path") or value.get("bytes")
    if isinstance(value, (str, os.PathLike)):
        return "path:" + os.path.abspath(os.fspath(value))
    digest = hashlib.sha256()
    if isinstance(value, (bytes, bytearray)):
        digest.update(value)
    elif isinstance(value, np.ndarray):
        digest.update(str((value.shape, value.dtype)).encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    elif isinstance(value, dict) and "array" in value:
        digest.update(str(value.get("sampling_rate")).encode())
        digest.update(np.ascontiguousarray(np.asarray(value["array"])).tobytes())
    elif isinstance(value, tuple) and len(value) == 2:
        digest.update(str(value[1]).encode())
        digest.update(np.ascontiguousarray(np.asarray(value[0])).tobytes())
    elif hasattr(value, "tobytes") and hasattr(value, "mode"):  # PIL image
        digest.update(f"{value.mode}{value.size}".encode())
        digest.update(value.tobytes())
    else:  # e.g. a decoder object: no content to hash cheaply, so it is never deduplicated
        return f"object:{id(value)}"
    return "sha:" + digest.hexdigest()


def _features_of(output: Any) -> torch.Tensor:
    """The vector a `get_*_features` method returned: a tensor (transformers 4) or `pooler_output` (5)."""
    import torch

    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if pooled is None:
        raise ValueError(f"cannot find the features in a {type(output).__name__} (no pooler_output)")
    return pooled


def _mean_hidden(output: Any) -> torch.Tensor:
    """Mean of an AutoModel's last hidden state: over the sequence (transformers) or space (CNNs)."""
    hidden = getattr(output, "last_hidden_state", None)
    if hidden is None:
        raise ValueError(f"{type(output).__name__} has no last_hidden_state to pool")
    hidden = hidden.float()
    if hidden.ndim == 3:
        return hidden.mean(dim=1)
    if hidden.ndim == 4:  # [batch, channels, height, width]
        return hidden.mean(dim=(2, 3))
    raise ValueError(f"cannot pool a last_hidden_state of shape {tuple(hidden.shape)}")


def _call_accepting(fn: Any, inputs: dict[str, Any]) -> Any:
    """Call `fn` with the processor outputs it names (processors return extras some methods refuse)."""
    params = inspect.signature(fn).parameters
    return fn(**{k: v for k, v in inputs.items() if k in params and params[k].kind != inspect.Parameter.VAR_KEYWORD})


@dataclass
class LoadedMediaModel:
    """The loaded media model, its processor, and where and in which dtype it runs."""

    model: Any
    processor: Any
    device: torch.device
    dtype: torch.dtype

    @property
    def sampling_rate(self) -> int:
        extractor = getattr(self.processor, "feature_extractor", self.processor)
        return int(getattr(extractor, "sampling_rate", None) or 16000)

    def inputs(self, kind: str, items: list[Any]) -> dict[str, Any]:
        """Processor outputs for a list of images, waveforms or frame stacks, on the model's device and dtype."""
        import torch
        from transformers import ProcessorMixin

        processor = self.processor
        is_processor = isinstance(processor, ProcessorMixin)
        if kind == "image":
            inputs = processor(images=items, return_tensors="pt")
        elif kind == "audio":
            if is_processor:
                inputs = processor(audio=items, sampling_rate=self.sampling_rate, return_tensors="pt")
            else:
                inputs = processor(items, sampling_rate=self.sampling_rate, return_tensors="pt")
        elif is_processor or hasattr(processor, "sample_frames") or "videos" in inspect.signature(processor.__call__).parameters:
            inputs = processor(videos=items, return_tensors="pt")
        else:
            inputs = processor(items, return_tensors="pt")
        moved = {}
        for key, value in dict(inputs).items():
            if isinstance(value, torch.Tensor):
                value = value.to(self.device, dtype=self.dtype) if value.is_floating_point() else value.to(self.device)
            moved[key] = value
        return moved

    def is_video_model(self) -> bool:
        from transformers.models.auto.modeling_auto import MODEL_FOR_VIDEO_CLASSIFICATION_MAPPING_NAMES

        return getattr(self.model.config, "model_type", None) in MODEL_FOR_VIDEO_CLASSIFICATION_MAPPING_NAMES

    def declared_frames(self) -> int | None:
        """The frame count a video model is built for, if it declares one (X-CLIP does)."""
        config = self.model.config
        frames = getattr(getattr(config, "vision_config", None), "num_frames", None) or getattr(config, "num_frames", None)
        return frames if isinstance(frames, int) else None


class ModalityEmbedder(Stage):
    """Embed each sample's media (`media_embedding`) and its media neighbours (`neighbor_media_embeddings`).

    Models with `get_image_features` / `get_audio_features` / `get_video_features` (CLIP, SigLIP,
    CLAP, X-CLIP, ...) use them; other `AutoModel`s give the mean of their last hidden state. Video
    without a video method is the mean of its frames' image features. Each distinct item is embedded
    once per map batch; without `media_neighbors` the neighbours reuse the original's vector (K copies,
    one per text neighbour), since an unperturbed medium has exactly zero embedding shift.
    `model_batch_size` items go through each forward.
    """

    name: ClassVar[str] = "media-embeddings"
    version: ClassVar[str] = "2"
    settings: ClassVar[tuple[str, ...]] = ("modality", "normalize", "num_frames", "resolved_dtype")
    model_references: ClassVar[tuple[str, ...]] = ("model", "processor")

    def __init__(
        self,
        model: Any,
        *,
        modality: str | None = None,
        normalize: bool = True,
        model_batch_size: int = 16,
        num_frames: int = 8,
        processor: Any = None,
        revision: str | None = None,
        device: Any = None,
        dtype: Any = "auto",
    ) -> None:
        if modality is not None and modality not in MEDIA_COLUMNS:
            raise ValueError(f"unknown modality {modality!r}; expected one of {', '.join(MEDIA_COLUMNS)}")
        if model_batch_size < 1:
            raise ValueError(f"model_batch_size must be >= 1, got {model_batch_size}")
        self.model, self.processor, self.revision = model, processor, revision
        self.modality, self.normalize = modality, normalize
        self.model_batch_size, self.num_frames = model_batch_size, num_frames
        self.device, self.dtype = device, dtype

    @property
    def resolved_dtype(self) -> torch.dtype:
        """The dtype the model runs in ("auto" depends on the device)."""
        return resolve_dtype(self.dtype, resolve_device(self.device))

    # -- the stage contract --------------------------------------------------------------------------

    def media_column(self, ds: datasets.Dataset) -> str | None:
        return self.modality or super().media_column(ds)

    def check(self, ds: datasets.Dataset) -> None:
        if self.modality is not None and self.modality not in ds.column_names:
            raise ValueError(f"ModalityEmbedder(modality={self.modality!r}): the dataset has no {self.modality!r} "
                             f"column (columns: {ds.column_names})")
        if self.media_column(ds) is None:
            raise ValueError(f"ModalityEmbedder: the dataset has no media column ({', '.join(MEDIA_COLUMNS)}); "
                             f"columns: {ds.column_names}")

    def features(self, ds: datasets.Dataset) -> datasets.Features:
        """Float32 vectors (`datasets` would infer float64 from the arrays' values)."""
        features = ds.features.copy()
        features[MEDIA_EMBEDDING] = VECTOR
        if NEIGHBORS in ds.column_names or MEDIA_NEIGHBORS in ds.column_names:
            features[NEIGHBOR_MEDIA_EMBEDDINGS] = VECTORS
        return features

    def process(self, batch: dict[str, list], context: StageContext) -> dict[str, list]:
        column = context.media_column
        values = batch[column]
        items: dict[str, tuple[Any, str]] = {}  # key -> (value, where it was first seen)
        originals = []
        for i, value in enumerate(values):
            if value is None:
                raise ValueError(f"{context.where(batch, i)}, column {column!r}: no media")
            originals.append(media_key(value))
            items.setdefault(originals[-1], (value, f"{context.where(batch, i)}, column {column!r}"))
        media_neighbors: list[list[str]] = [[] for _ in values]
        for i, row in enumerate(batch.get(MEDIA_NEIGHBORS) or []):
            for j, value in enumerate(row or []):
                where = f"{context.where(batch, i)}, {MEDIA_NEIGHBORS}[{j}]"
                if value is None:
                    raise ValueError(f"{where}: no media")
                media_neighbors[i].append(media_key(value))
                items.setdefault(media_neighbors[i][-1], (value, where))
        keys = list(items)
        vectors = self.embed_media([items[k][0] for k in keys], column, where=[items[k][1] for k in keys])
        index = {k: i for i, k in enumerate(keys)}
        out: dict[str, list] = {MEDIA_EMBEDDING: [vectors[index[k]] for k in originals]}
        if NEIGHBORS in batch or MEDIA_NEIGHBORS in batch:
            rows = []
            for i, key in enumerate(originals):
                if media_neighbors[i]:
                    rows.append(vectors[[index[k] for k in media_neighbors[i]]])
                else:
                    count = len((batch.get(NEIGHBORS) or [[]] * len(values))[i] or [])
                    rows.append(np.repeat(vectors[index[key]][None, :], count, axis=0))
            out[NEIGHBOR_MEDIA_EMBEDDINGS] = rows
        return out

    def load_model(self) -> LoadedMediaModel:
        from transformers import AutoModel, AutoProcessor

        from ..configuration_fimmia import refuse_pickled_weights

        if isinstance(self.model, (str, os.PathLike)):
            refuse_pickled_weights(self.model)
            model = AutoModel.from_pretrained(
                str(self.model), revision=self.revision, dtype=self.resolved_dtype, use_safetensors=True
            )
            processor = self.processor or AutoProcessor.from_pretrained(str(self.model), revision=self.revision)
        else:
            model = self.model
            name = getattr(model, "name_or_path", None)
            if self.processor is None and not name:
                raise ValueError("a loaded model without name_or_path needs processor=...")
            processor = self.processor or AutoProcessor.from_pretrained(name)
        device = resolve_device(self.device)
        model = model.eval().to(device)
        return LoadedMediaModel(model, processor, device, next(model.parameters()).dtype)

    # -- embedding -------------------------------------------------------------------------------

    def _forward(self, kind: str, items: list[Any]) -> torch.Tensor:
        """Raw vectors `[len(items), dim]` for loaded images, waveforms or frame stacks."""
        import torch

        loaded = self.loaded()
        model = loaded.model
        with torch.inference_mode():
            method = getattr(model, f"get_{kind}_features", None)
            if method is not None and kind == "video":
                counts = [len(video) for video in items]
                if len(set(counts)) > 1:  # stacked per video below, so only equal frame counts batch
                    return torch.cat([self._forward(kind, [video]) for video in items])
                inputs = loaded.inputs(kind, items)
                pixels = inputs.get("pixel_values")
                if pixels is not None and pixels.ndim == 4 and pixels.shape[0] == sum(counts):
                    # image-processor-backed video processors (X-CLIP) flatten the frames of all videos
                    inputs["pixel_values"] = pixels.view(len(items), counts[0], *pixels.shape[1:])
                return _features_of(_call_accepting(method, inputs)).float()
            if method is not None:
                return _features_of(_call_accepting(method, loaded.inputs(kind, items))).float()
            if kind == "video" and (hasattr(model, "get_image_features") or not loaded.is_video_model()):
                frames = [frame for video in items for frame in video]
                step = self.model_batch_size * 8
                per_frame = torch.cat([self._forward("image", frames[s:s + step]) for s in range(0, len(frames), step)])
                counts = [len(video) for video in items]
                return torch.stack([chunk.mean(dim=0) for chunk in per_frame.split(counts)])
            return _mean_hidden(_call_accepting(model.forward, loaded.inputs(kind, items)))

    def _load_item(self, kind: str, value: Any, where: str) -> Any:
        try:
            if kind == "audio":
                return load_media(kind, value, sampling_rate=self.loaded().sampling_rate)[0]
            if kind == "video":
                return load_media(kind, value, num_frames=self.num_frames)
            return load_media(kind, value)
        except MediaError as err:
            raise ValueError(f"{where}: {err}") from err

    def embed_media(self, values: list[Any], modality: str | None = None, *, where: list[str] | None = None) -> np.ndarray:
        """Embed media items of one modality (default: the embedder's), one vector each, no deduplication: `[n, dim]`."""
        kind = modality or self.modality
        if kind is None:
            raise ValueError("ModalityEmbedder: set modality=... or call apply() on a dataset with a media column")
        loaded = self.loaded()
        declared = loaded.declared_frames()
        if kind == "video" and declared is not None and declared != self.num_frames:
            raise ValueError(f"{self.model}: the model takes videos of {declared} frames; set num_frames={declared}")
        where = where or [f"item {i}" for i in range(len(values))]
        # a generic audio model pads differently per family, so it only batches equal lengths
        generic_audio = kind == "audio" and not hasattr(loaded.model, "get_audio_features")
        result: np.ndarray | None = None
        start, pending = 0, None
        while start < len(values):
            batch = [pending if pending is not None else self._load_item(kind, values[start], where[start])]
            pending, stop = None, start + 1
            while stop < len(values) and stop - start < self.model_batch_size:
                item = self._load_item(kind, values[stop], where[stop])
                if generic_audio and len(item) != len(batch[0]):
                    pending = item  # starts the next batch; never loaded twice
                    break
                batch.append(item)
                stop += 1
            vectors = self._forward(kind, batch)
            if self.normalize:
                vectors = normalize(vectors)
            vectors = to_float32(vectors)
            if result is None:
                result = np.empty((len(values), vectors.shape[1]), dtype=np.float32)
            result[start:stop] = vectors
            start = stop
        return result if result is not None else np.zeros((0, 0), dtype=np.float32)

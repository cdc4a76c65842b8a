"""Cached, resumable `datasets.map` stages.

Every model stage (neighbours, embeddings, scoring) is a pure function of the input rows, the model
(identified by its Hub id + revision, or by a hash of a local folder's files) and the stage's
parameters. `Stage.apply` turns that into a fingerprint, so a rerun with the same inputs is read back
from the cache without loading the model, and it maps the dataset in chunks that are cached one by
one, so an interrupted run resumes at the first chunk that is missing. `datasets` never hashes the
stage object itself (that would pickle model weights).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, ClassVar

import datasets
from datasets.fingerprint import Hasher

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json", ".model", ".txt", ".jinja", ".tiktoken", ".py")
_folder_hash_cache: dict[tuple, str] = {}


def default_cache_dir() -> Path:
    """Where stage outputs go: `$FIMMIA_HF_CACHE`, else `<datasets cache>/fimmia_hf`."""
    env = os.environ.get("FIMMIA_HF_CACHE")
    return Path(env) if env else Path(datasets.config.HF_DATASETS_CACHE) / "fimmia_hf"


def folder_hash(path: str | os.PathLike) -> str:
    """Content hash of the model files in a local folder (weights, configs, tokenizer, adapter).

    Memoised per process on (name, size, mtime) of each file, so a 15 GB checkpoint is read once.
    """
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
    key = tuple((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    if key not in _folder_hash_cache:
        digest = hashlib.sha256()
        for p in files:
            digest.update(str(p.relative_to(path)).encode())
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 24), b""):
                    digest.update(block)
        _folder_hash_cache[key] = digest.hexdigest()[:32]
    return _folder_hash_cache[key]


def _hub_commit(repo_id: str, revision: str | None) -> str | None:
    """The commit of a Hub model already in the local cache (no network), if any."""
    try:
        from huggingface_hub import snapshot_download

        snapshot = snapshot_download(repo_id, revision=revision, local_files_only=True)
    except Exception:
        return None
    return Path(snapshot).name


def model_fingerprint(model: Any, revision: str | None = None) -> str:
    """A stable identity for a model given as a local folder, a Hub id or a loaded object.

    Local folders hash their files; Hub ids use the cached commit (else the revision asked for);
    loaded models use the folder they came from, or a hash of their tensors as a last resort.
    """
    if model is None:
        return "none"
    if isinstance(model, (str, os.PathLike)):
        if Path(model).is_dir():
            return "dir:" + folder_hash(model)
        repo_id = str(model)
        return f"hub:{repo_id}@{_hub_commit(repo_id, revision) or revision or 'main'}"
    parts = []
    name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    if name:
        parts.append(model_fingerprint(name, revision))
    peft_config = getattr(model, "peft_config", None)
    if peft_config:  # a PEFT model: the adapter folder(s) matter as much as the base
        for adapter in peft_config.values():
            parts.append(model_fingerprint(getattr(adapter, "base_model_name_or_path", None)))
    if not name and hasattr(model, "state_dict"):
        import torch

        digest = hashlib.sha256()
        for key, tensor in sorted(model.state_dict().items()):
            digest.update(key.encode())
            digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
        parts.append("weights:" + digest.hexdigest()[:32])
    return "|".join(parts) or f"object:{type(model).__qualname__}"


class Stage:
    """Base class of the cached `datasets.map` stages.

    Subclasses set `name`, implement `fingerprint_inputs()` (parameters + model fingerprints, no
    weights) and `process(batch) -> dict[str, list]` (the new columns for a batch of rows). Models
    should load lazily inside `process` so that a cache hit never loads them.
    """

    name: ClassVar[str] = "stage"
    version: ClassVar[str] = "1"  # bump when the computation changes, to invalidate old caches
    batch_size: int = 8
    chunk_size: int = 256

    def fingerprint_inputs(self) -> dict[str, Any]:
        raise NotImplementedError

    def process(self, batch: dict[str, list]) -> dict[str, list]:
        raise NotImplementedError

    def fingerprint(self, ds: datasets.Dataset) -> str:
        """Hash of the input rows' fingerprint, the stage, its version and its inputs."""
        return Hasher.hash(
            {"stage": self.name, "version": self.version, "input": ds._fingerprint, **self.fingerprint_inputs()}
        )

    def apply(
        self,
        ds: datasets.Dataset,
        *,
        cache_dir: str | os.PathLike | None = None,
        chunk_size: int | None = None,
        **map_kwargs: Any,
    ) -> datasets.Dataset:
        """Add this stage's columns to `ds`, reading finished chunks from the cache."""
        fingerprint = self.fingerprint(ds)
        folder = Path(cache_dir) if cache_dir else default_cache_dir() / self.name
        folder.mkdir(parents=True, exist_ok=True)
        chunk_size = chunk_size or self.chunk_size
        starts = list(range(0, len(ds), chunk_size)) or [0]
        map_kwargs = {"batched": True, "batch_size": self.batch_size, "load_from_cache_file": True, **map_kwargs}
        parts = []
        for i, start in enumerate(starts):
            part = ds if len(starts) == 1 else ds.select(range(start, min(start + chunk_size, len(ds))))
            name = f"{fingerprint}-{i:05d}"
            parts.append(
                part.map(
                    self.process,
                    new_fingerprint=name,
                    cache_file_name=str(folder / f"{name}.arrow"),
                    desc=f"{self.name} [{i + 1}/{len(starts)}]" if len(starts) > 1 else self.name,
                    **map_kwargs,
                )
            )
        return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)

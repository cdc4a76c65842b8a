"""The stage contract: cached, resumable `datasets.map` transforms whose cache never hands back wrong rows.

A model stage (neighbours, embeddings, scoring) is a pure function of
- its input rows, *including the content of the media files they name*,
- the settings that change its output, which each class declares in `settings`,
- its models, declared in `model_references` (a Hub id + revision, or a hash of a local folder's files),
- its `version`, bumped when the computation changes.

`Stage.apply` hashes these into one fingerprint (`datasets` would otherwise hash every argument of the
transform, pickling model weights to do so) and maps the dataset in chunks of `chunk_size` rows, each
cached in a file named by the fingerprint *and its row range*. So a rerun reads the finished chunks back
without loading a model; an interrupted run resumes at the first missing chunk; another chunk size never
mixes ranges; a damaged chunk file is detected, deleted and computed again, with a warning naming it.
Settings that only change speed are left out of the fingerprint, since results do not depend on them:
`map_batch_size` (rows per `map` batch), `model_batch_size` (items per forward) and the device.

What a stage knows about the dataset being mapped (including what `survey` finds across all its rows)
travels in a `StageContext` handed to `process`, never in attributes of the stage, so one stage object
serves any number of datasets.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import datasets
import pyarrow as pa
from datasets.fingerprint import Hasher

from .columns import MEDIA_COLUMNS, MEDIA_REFERENCES, SAMPLE_ID

if TYPE_CHECKING:
    import torch

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json", ".model", ".txt", ".jinja", ".tiktoken", ".py")
_file_hashes: dict[tuple[str, int, int], str] = {}


def default_cache_dir() -> Path:
    """Where stage outputs go: `$FIMMIA_HF_CACHE`, else `<datasets cache>/fimmia_hf`."""
    env = os.environ.get("FIMMIA_HF_CACHE")
    return Path(env) if env else Path(datasets.config.HF_DATASETS_CACHE) / "fimmia_hf"


def resolve_device(device: Any = None) -> torch.device:
    """The device a stage runs on: the one asked for, else the first GPU, else the CPU."""
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def token_limit(model: Any, tokenizer: Any) -> int | None:
    """The longest sequence `model` takes: the smaller of its position embeddings and the tokenizer's limit.

    Tokenizers without a limit hold a huge placeholder (`VERY_LARGE_INTEGER`), ignored here; None when
    neither says, so a stage never runs a forward far past what the model was built for.
    """
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    limits = [getattr(text_config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    limits = [int(n) for n in limits if isinstance(n, int) and 0 < n < 10_000_000]
    return min(limits) if limits else None


# ------------------------------------------------------------------------------------------------
# fingerprints
# ------------------------------------------------------------------------------------------------


def file_hash(path: str | os.PathLike) -> str:
    """Content hash of one file, memoised per process on (path, size, mtime): each file is read once."""
    stat = os.stat(path)
    key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _file_hashes:
        with open(path, "rb") as f:
            _file_hashes[key] = hashlib.file_digest(f, "sha256").hexdigest()[:32]
    return _file_hashes[key]


def media_digest(value: Any) -> str:
    """Content hash of one media value as a row holds it: a file path, a ``{"path", "bytes"}`` struct, bytes, or a
    decoded object (PIL image, array); "" for none. Unreadable files hash as "unreadable" (the stage that reads
    them reports it, naming the row)."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (str, os.PathLike)):
        return _content_key(os.fspath(value))
    if isinstance(value, (bytes, bytearray, memoryview)):
        return hashlib.sha256(value).hexdigest()[:32]
    if hasattr(value, "tobytes"):
        return hashlib.sha256(value.tobytes()).hexdigest()[:32]
    return ""


def folder_hash(path: str | os.PathLike) -> str:
    """Content hash of the model files in a local folder (weights, configs, tokenizer, adapter)."""
    path = Path(path)
    digest = hashlib.sha256()
    for p in sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in _WEIGHT_SUFFIXES):
        digest.update(f"{p.relative_to(path)}\0{file_hash(p)}\0".encode())
    return digest.hexdigest()[:32]


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


def _file_references(column: pa.ChunkedArray | pa.Array) -> list[str]:
    """The file paths a media column names: plain paths, lists of them, or `{"path", "bytes"}` structs
    without bytes (stored bytes are in the table, so the dataset's own fingerprint covers them)."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    kind = array.type
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        return _file_references(array.flatten())
    if pa.types.is_struct(kind) and kind.get_field_index("path") >= 0:
        paths = array.field("path").to_pylist()
        if kind.get_field_index("bytes") >= 0:
            stored = array.field("bytes").is_valid().to_pylist()
            paths = [p for p, has_bytes in zip(paths, stored) if not has_bytes]
        return [p for p in paths if p]
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return [p for p in array.to_pylist() if p]
    return []


def _content_key(path: str) -> str:
    try:
        return file_hash(path)
    except OSError:  # missing or unreadable: the stage itself reports it, naming the row
        return "unreadable"


def input_fingerprint(ds: datasets.Dataset) -> str:
    """The dataset's own fingerprint plus the content of every media file its rows name.

    `datasets` fingerprints a table by its values, so a media path stands for whatever the file held
    when the path was written; hashing the files makes an overwritten image a new input.
    """
    columns = [c for c in MEDIA_REFERENCES if c in ds.column_names]
    if not columns:
        return ds._fingerprint
    table = ds.select_columns(columns).with_format("arrow")[:]  # raw values: nothing is decoded
    digest = hashlib.sha256(ds._fingerprint.encode())
    for column in columns:
        for path in _file_references(table.column(column)):
            digest.update(f"{path}\0{_content_key(path)}\0".encode())
    return digest.hexdigest()[:32]


def _plain(value: Any) -> Any:
    """A setting as plain data, so its hash is the same in every process (patterns, dataclasses, dtypes)."""
    if isinstance(value, re.Pattern):
        return [value.pattern, value.flags]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in sorted(value.items(), key=lambda item: str(item[0]))}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


# ------------------------------------------------------------------------------------------------
# chunk files
# ------------------------------------------------------------------------------------------------


def discard_if_damaged(path: Path, rows: int) -> None:
    """Delete a cache file of `rows` rows that is cut short or unreadable (disk full, a crash while
    copying), with a warning naming it, so that it is computed again instead of failing the rerun."""
    if not path.exists():
        return
    try:
        with pa.memory_map(str(path)) as source:
            found = pa.ipc.open_stream(source).read_all().num_rows
        problem = None if found == rows else f"holds {found} of its {rows} rows"
    except (OSError, pa.ArrowException) as err:
        problem = f"cannot be read ({err})"
    if problem:
        warnings.warn(f"cache file {path} {problem}; deleted it, computing it again", stacklevel=3)
        path.unlink()


# ------------------------------------------------------------------------------------------------
# the contract
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StageContext:
    """What `process` knows about the dataset being mapped: made by `apply`, never kept on the stage."""

    fingerprint: str  # of this stage applied to this dataset
    folder: Path  # the stage's cache folder (a stage may keep files there, e.g. perturbed media)
    media_column: str | None  # the media column the stage reads, if any
    rows: Sequence[int] = ()  # the dataset rows (0-based) of the batch being processed
    survey: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # what `Stage.survey` found in the dataset

    def where(self, batch: Mapping[str, list], j: int) -> str:
        """"row 12 (sample_id 'abc')" for row `j` of `batch`, numbered from 1 as `load_samples` errors are."""
        row = f"row {self.rows[j] + 1}" if j < len(self.rows) else f"row {j + 1} of its batch"
        return f"{row} (sample_id {batch[SAMPLE_ID][j]!r})" if SAMPLE_ID in batch else row


class Stage:
    """Base class of the cached `datasets.map` stages.

    A subclass sets `name` and `version`, declares the attributes that change its output (`settings`)
    and hold its models (`model_references`), loads its models in `load_model()` (called on first use
    only, through `loaded()`, so a cache hit never loads one) and computes the new columns of a batch
    of rows in `process(batch, context)`. `check` refuses bad input up front, `features` gives the new
    columns' types where the inferred ones would be wrong.
    """

    name: ClassVar[str] = "stage"
    version: ClassVar[str] = "1"
    settings: ClassVar[tuple[str, ...]] = ()
    model_references: ClassVar[tuple[str, ...]] = ()
    map_batch_size: ClassVar[int] = 64  # rows per `datasets.map` batch
    chunk_size: ClassVar[int] = 256  # rows per cached chunk file
    revision: str | None = None  # of the Hub models in `model_references`
    _loaded: Any = None

    # -- what a stage implements -------------------------------------------------------------------
    def load_model(self) -> Any:
        """Load what `process` runs (model, tokenizer or processor, ...)."""
        raise NotImplementedError

    def process(self, batch: dict[str, list], context: StageContext) -> dict[str, list]:
        """The new columns for a batch of rows."""
        raise NotImplementedError

    def check(self, ds: datasets.Dataset) -> None:
        """Raise a `ValueError` naming the rows and columns this stage cannot process."""

    def survey(self, ds: datasets.Dataset) -> Mapping[str, Any]:
        """What `process` must know about the whole dataset, not just its batch (e.g. lines most samples share);
        found once per `apply`, it reaches `process` as `context.survey`."""
        return {}

    def features(self, ds: datasets.Dataset) -> datasets.Features | None:
        """The output features (None: inferred from the first batch)."""
        return None

    def media_column(self, ds: datasets.Dataset) -> str | None:
        """The media column this stage reads: the table's one, if any."""
        return next((c for c in MEDIA_COLUMNS if c in ds.column_names), None)

    # -- the machinery -----------------------------------------------------------------------------
    def loaded(self) -> Any:
        """What `load_model()` returned, loading it on first use."""
        if self._loaded is None:
            self._loaded = self.load_model()
        return self._loaded

    def fingerprint(self, ds: datasets.Dataset) -> str:
        """Hash of the input (media content included), the stage, its version, settings and models."""
        return Hasher.hash({
            "stage": self.name,
            "version": self.version,
            "input": input_fingerprint(ds),
            "settings": {name: _plain(getattr(self, name)) for name in self.settings},
            "models": {name: model_fingerprint(getattr(self, name), self.revision) for name in self.model_references},
        })

    def context(self, ds: datasets.Dataset, cache_dir: str | os.PathLike | None = None) -> StageContext:
        """The context `process` gets for `ds` (also for calling `process` directly, as benchmarks do)."""
        folder = Path(cache_dir) if cache_dir else default_cache_dir() / self.name
        return StageContext(self.fingerprint(ds), folder, self.media_column(ds), survey=self.survey(ds))

    def _process_rows(self, batch: dict[str, list], indices: list[int], context: StageContext,
                      first_row: int) -> dict[str, list]:
        return self.process(batch, dataclasses.replace(context, rows=[first_row + i for i in indices]))

    def apply(
        self,
        ds: datasets.Dataset,
        *,
        cache_dir: str | os.PathLike | None = None,
        chunk_size: int | None = None,
        map_batch_size: int | None = None,
        **map_kwargs: Any,
    ) -> datasets.Dataset:
        """Add this stage's columns to `ds`, reading finished chunks from the cache."""
        if "batch_size" in map_kwargs:
            raise TypeError("apply() takes map_batch_size= (rows per map batch); items per forward are the "
                            "stage's model_batch_size")
        self.check(ds)
        context = self.context(ds, cache_dir)
        try:  # before any computing: a read-only cache fails now, not after the first chunk
            context.folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OSError(f"cannot write the stage cache {context.folder} ({err}); pass cache_dir= or set "
                          "FIMMIA_HF_CACHE to a writable folder") from err
        size = chunk_size or self.chunk_size
        ranges = [(start, min(start + size, len(ds))) for start in range(0, len(ds), size)] or [(0, 0)]
        options = {"batched": True, "batch_size": map_batch_size or self.map_batch_size, "with_indices": True,
                   "load_from_cache_file": True, "features": self.features(ds), **map_kwargs}
        parts = []
        for i, (start, stop) in enumerate(ranges):
            name = f"{context.fingerprint}-{start}-{stop}"
            path = context.folder / f"{name}.arrow"
            discard_if_damaged(path, stop - start)
            part = ds if len(ranges) == 1 else ds.select(range(start, stop))
            parts.append(part.map(
                self._process_rows,
                fn_kwargs={"context": context, "first_row": start},
                new_fingerprint=name,
                cache_file_name=str(path),
                desc=f"{self.name} [{i + 1}/{len(ranges)}]" if len(ranges) > 1 else self.name,
                **options,
            ))
        return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)

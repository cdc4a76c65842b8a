"""The sample table: loading, validation, stable ids, group-aware splits, safe saving.

One row per sample (`input`, `answer`, `ds_name`, at most one media column, optional `label` and
`sample_id`). Every later stage adds columns to these rows; nothing is ever joined by position, so
each row gets a stable `sample_id`. Bad input raises `SampleError` naming the file, rows and column,
and the user's files are only ever read.
"""

from __future__ import annotations

import codecs
import copy
import dataclasses
import hashlib
import io
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import datasets
import numpy as np
import pyarrow as pa
from transformers.hf_argparser import HfArg

from .columns import ANSWER, DS_NAME, INPUT, LABEL, LIST_COLUMNS, MEDIA_COLUMNS, SAMPLE_ID
from .media import MediaError, load_media
from .stage import default_cache_dir, discard_if_damaged

REQUIRED_COLUMNS = (INPUT, ANSWER)
MODALITIES = (*MEDIA_COLUMNS, "text")
_TABLE_SUFFIXES = {".csv": ",", ".tsv": "\t"}
_MAX_LISTED = 20
_TEXT_COLUMNS = {INPUT, ANSWER, DS_NAME, SAMPLE_ID}


class SampleError(ValueError):
    """Bad sample data; the message names the file, the row(s) and the column."""


def _rows_message(where: str, column: str, problem: str, rows: list[tuple[int, str]]) -> str:
    shown = "\n".join(f"  row {row}: {detail}" for row, detail in rows[:_MAX_LISTED])
    more = f"\n  ... and {len(rows) - _MAX_LISTED} more" if len(rows) > _MAX_LISTED else ""
    return f"{where}: column '{column}': {problem} in {len(rows)} row(s) (rows numbered from 1):\n{shown}{more}"


def read_table(path: str | os.PathLike) -> datasets.Dataset:
    """Read a table file or `save_to_disk` folder as it is (no validation): stage outputs, paired tables.

    Text columns keep what the user wrote (answer "1" stays "1"); a CSV/JSON `label` becomes 0/1 (empty:
    missing). A folder is read into our cache, so no later transform writes beside the user's files.
    """
    import pandas as pd

    path = Path(path)

    if path.is_dir():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            raise SampleError(f"{path}: holds a DatasetDict ({', '.join(loaded)}); pass one split's folder")
        return _own_copy(loaded)
    if not path.is_file():
        raise SampleError(f"{path}: no such file or folder")
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":  # typed already: read as it is (feature columns stay list<float32>)
            return datasets.Dataset.from_parquet(str(path))
        if suffix in _TABLE_SUFFIXES:  # strings throughout: answer "1" stays "1", "" stays ""
            frame = pd.read_csv(io.StringIO(_read_text(path)), sep=_TABLE_SUFFIXES[suffix], dtype=str, keep_default_na=False)
        elif suffix in (".json", ".jsonl"):
            frame = _read_json(path, lines=suffix == ".jsonl")
        else:
            raise SampleError(f"{path}: unsupported format {suffix!r}; use CSV, TSV, Parquet, JSON, JSONL or a dataset folder")
    except SampleError:
        raise
    except Exception as err:
        raise SampleError(f"{path}: cannot read the table: {err}") from err
    lists = [c for c in frame.columns if c in LIST_COLUMNS or c.startswith(("token_", "neighbor_token_"))]
    if suffix in _TABLE_SUFFIXES and lists:
        raise SampleError(f"{path}: the list columns {', '.join(lists)} were written to CSV as text and cannot be "
                          "read back; write stage outputs as .parquet, .jsonl or a folder")
    for column in _TEXT_COLUMNS & set(frame.columns):  # JSON may hold numbers or mixed types here
        frame[column] = text_values(frame[column].tolist(), str(path), column)
    if LABEL in frame.columns:  # CSV cells are text: "1" is the label 1
        frame[LABEL] = pd.array(labels_of(frame[LABEL].tolist(), str(path), missing_ok=True), dtype="Int64")
    return datasets.Dataset.from_pandas(frame, preserve_index=False)


def _read_text(path: Path) -> str:
    """A table file as UTF-8 text (a BOM dropped); a byte that is not UTF-8 names its line, not a buffer position."""
    data = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise SampleError(f"{path}: line {line}: not UTF-8 text (byte {data[err.start]:#04x}: {err.reason}); "
                          "save the file as UTF-8") from None


def _read_json(path: Path, *, lines: bool) -> Any:
    """A JSON (records or columns) or JSON Lines file as a DataFrame; a syntax error names its line."""
    import pandas as pd

    text = _read_text(path)
    try:
        if not lines:
            json.loads(text)  # only for the error: pandas reports a character position, json the line
            return pd.read_json(io.StringIO(text), dtype=False, convert_dates=False)
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise SampleError(f"{path}: line {number}: expected a JSON object per line, got {type(record).__name__}")
                records.append(record)
    except json.JSONDecodeError as err:
        line = number if lines else err.lineno
        raise SampleError(f"{path}: line {line}, column {err.colno}: not valid JSON ({err.msg})") from None
    return pd.DataFrame.from_records(records)


def text_values(values: list[Any], where: str, column: str) -> list[str]:
    """A text column's values as strings; lists, dicts and arrays are refused, naming their rows.

    Numbers become text on purpose (a JSON/Parquet answer 1 or 1.0 is the answer "1"), missing values "".
    """
    bad = [(i + 1, f"a {type(v).__name__}: {str(v)[:60]}") for i, v in enumerate(values) if not _is_scalar(v)]
    if bad:
        raise SampleError(_rows_message(where, column, "expected text, got a list, mapping or array", bad))
    return [_as_text(v) for v in values]


def labels_of(values: list[Any], where: str, *, missing_ok: bool = False) -> list[int | None]:
    """Membership labels as 0/1 from ints, bools or their text ("1", "1.0", "true"); bad rows are named.

    `missing_ok` lets empty cells through as None (tables to predict on need no labels).
    """
    labels, bad = [], []
    for i, value in enumerate(values):
        text = _as_text(value).strip().lower() if _is_scalar(value) else repr(value)
        label = {"0": 0, "1": 1, "false": 0, "true": 1, "0.0": 0, "1.0": 1}.get(text)
        if label is None and not (missing_ok and text == ""):
            bad.append((i + 1, f"{value!r}"))
        labels.append(label)
    if bad:
        raise SampleError(_rows_message(where, LABEL, "label must be 0 (non-member) or 1 (member)", bad))
    return labels


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool, np.generic))


def _as_text(value: Any) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    if isinstance(value, float) and value.is_integer():  # a JSON/Parquet number 1.0 written as answer "1"
        return str(int(value))
    return str(value)


def _media_key(value: Any) -> str:
    """What identifies a media item in the sample id: its path as given, or a hash of its content."""
    if isinstance(value, dict):
        value = value.get("path") or value.get("bytes")
    if isinstance(value, (str, os.PathLike)):
        return str(value)
    if isinstance(value, (bytes, bytearray)):
        return hashlib.sha1(value).hexdigest()
    if hasattr(value, "tobytes"):
        return hashlib.sha1(value.tobytes()).hexdigest()
    return ""


def sample_id_of(ds_name: str, input: str, answer: str, media: Any = None) -> str:
    """Stable content hash of a sample, the same in any process or machine."""
    payload = json.dumps([ds_name, input, answer, _media_key(media)], ensure_ascii=False)
    return hashlib.sha1(payload.encode("utf-8")).hexdigest()[:16]


def _media_column(columns: list[str], modality: str | None, where: str) -> str | None:
    present = [c for c in MEDIA_COLUMNS if c in columns]
    if len(present) > 1:
        raise SampleError(f"{where}: more than one media column ({', '.join(present)}); keep one per table")
    if modality is not None:
        if modality not in MODALITIES:
            raise SampleError(f"{where}: unknown modality {modality!r}; expected one of {', '.join(MODALITIES)}")
        if modality == "text":
            if present:
                raise SampleError(f"{where}: modality 'text' but the table has a '{present[0]}' column")
            return None
        if modality not in columns:
            raise SampleError(f"{where}: modality '{modality}' needs a '{modality}' column (columns: {', '.join(columns)})")
    return present[0] if present else None


def _check_media(ds: datasets.Dataset, column: str, where: str) -> None:
    """Decode every media item up front and list all the rows that fail."""
    bad = []
    for i, value in enumerate(ds[column]):
        try:
            load_media(column, value, **({"sampling_rate": None} if column == "audio" else {}))
        except MediaError as err:
            bad.append((i + 1, str(err)))
    if bad:
        raise SampleError(_rows_message(where, column, "missing or undecodable media", bad))


def load_samples(
    source: Any,
    *,
    modality: str | None = None,
    media_root: str | os.PathLike | None = None,
    ds_name: str | None = None,
) -> datasets.Dataset:
    """Load and validate samples from a table file, a dataset folder, a `Dataset` or a DataFrame.

    Media paths are resolved against `media_root` (default: the table's folder) and stored
    absolute. `ds_name` fills the column when the table has none (default: the file's stem).
    Columns added by later stages pass through unchanged, so stage outputs load back too.
    `input`, `answer`, `ds_name` and `sample_id` must be text (numbers are written as text). An empty
    `answer` is allowed on purpose: scoring the prompt (`answer_only=False`) or the closing tokens
    needs none; `TargetScorer` stops, naming the row, when a row leaves it nothing to score.
    """
    import pandas as pd

    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        where, base = str(path), (path if path.is_dir() else path.parent)
        ds = read_table(path)
        default_name = ds_name or path.stem
    elif isinstance(source, datasets.Dataset):
        where, base, ds, default_name = "dataset", None, _own_copy(source), ds_name or "samples"
    elif isinstance(source, pd.DataFrame):
        where, base, default_name = "DataFrame", None, ds_name or "samples"
        ds = datasets.Dataset.from_pandas(source, preserve_index=False)
    else:
        raise SampleError(f"cannot load samples from a {type(source).__name__}; pass a path, Dataset or DataFrame")
    if media_root is not None:
        base = Path(media_root)

    columns = list(ds.column_names)
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise SampleError(f"{where}: missing required column(s) {', '.join(map(repr, missing))} (columns: {', '.join(columns)})")
    media = _media_column(columns, modality, where)

    inputs = text_values(ds[INPUT], where, INPUT)
    empty = [(i + 1, "empty text") for i, text in enumerate(inputs) if not text.strip()]
    if empty:
        raise SampleError(_rows_message(where, "input", "empty input", empty))
    updates: dict[str, list] = {INPUT: inputs, ANSWER: text_values(ds[ANSWER], where, ANSWER)}
    if "ds_name" in columns:
        updates["ds_name"] = [v or default_name for v in text_values(ds[DS_NAME], where, DS_NAME)]
    else:
        updates["ds_name"] = [default_name] * len(ds)

    if "label" in columns:
        updates["label"] = labels_of(ds[LABEL], where)

    is_path_column = media is not None and isinstance(ds.features[media], datasets.Value)
    if is_path_column:
        raw = ds[media]
        missing_ref = [(i + 1, "no media path") for i, v in enumerate(raw) if not v]
        if missing_ref:
            raise SampleError(_rows_message(where, media, "missing media reference", missing_ref))
        resolved = [str((base / v).resolve()) if base is not None and not Path(v).is_absolute() else v for v in raw]
        media_keys = raw  # ids use the path as written, so they do not depend on where the table lives
        updates[media] = resolved
    elif media is not None:  # decoded media (datasets Image/Audio/Video features): hash the stored bytes
        feature = copy.copy(ds.features[media])
        if hasattr(feature, "decode"):
            feature.decode = False
        media_keys = ds.cast_column(media, feature)[media]

    if "sample_id" in columns:
        ids = text_values(ds[SAMPLE_ID], where, SAMPLE_ID)
    else:
        keys = media_keys if media is not None else [None] * len(ds)
        ids = [sample_id_of(n, t, a, m) for n, t, a, m in zip(updates["ds_name"], inputs, updates["answer"], keys)]
    first_seen: dict[str, int] = {}
    duplicates = []
    for i, sid in enumerate(ids):
        if sid in first_seen:
            duplicates.append((i + 1, f"sample_id {sid!r} repeats row {first_seen[sid] + 1}"))
        else:
            first_seen[sid] = i
    if duplicates:
        raise SampleError(_rows_message(where, "sample_id", "duplicate samples", duplicates))
    updates["sample_id"] = ids

    rest = ds.remove_columns([c for c in updates if c in columns])
    out = datasets.Dataset.from_dict(updates)
    if rest.column_names:
        out = datasets.concatenate_datasets([out, rest], axis=1)
    if media is not None:
        _check_media(out, media, where)
    first = [c for c in (SAMPLE_ID, INPUT, ANSWER, DS_NAME, media, LABEL) if c in out.column_names]
    return out.select_columns(first + [c for c in out.column_names if c not in first])


def _own_copy(ds: datasets.Dataset) -> datasets.Dataset:
    """`ds` in table order, held in memory or, when it is backed by files, copied into our cache.

    `datasets` writes a transform's cache file next to the dataset's own files, so a dataset read
    from the user's `save_to_disk` folder would get `cache-*.arrow` files written into that folder by
    its first `map` or `flatten_indices` (column concatenation flattens); after the copy every later
    write lands in our cache.
    """
    if not ds.cache_files:
        return ds.flatten_indices(keep_in_memory=True) if ds._indices is not None else ds
    folder = default_cache_dir() / "samples"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{ds._fingerprint}.arrow"
    discard_if_damaged(path, len(ds))
    return ds.flatten_indices(cache_file_name=str(path))


def table_columns(table: Any) -> list[str]:
    """Column names of a `datasets.Dataset`, a pandas DataFrame or a mapping of columns."""
    if hasattr(table, "column_names"):
        return list(table.column_names)
    if hasattr(table, "columns"):
        return [str(c) for c in table.columns]
    if isinstance(table, Mapping):
        return list(table.keys())
    raise TypeError(f"expected a datasets.Dataset, a pandas DataFrame or a mapping of columns, got {type(table).__name__}")


def table_column(table: Any, name: str) -> list[Any]:
    """One column as a Python list, whatever kind of table holds it."""
    values = table[name]
    return list(values.tolist() if hasattr(values, "tolist") else values)


def modality_of(ds: datasets.Dataset) -> str:
    """The dataset's modality: its media column's name, or "text"."""
    return next((c for c in MEDIA_COLUMNS if c in ds.column_names), "text")


def _stratum(labels: Iterable[Any], names: Iterable[Any]) -> str:
    labels, names = set(labels), set(names)
    return f"{labels.pop() if len(labels) == 1 else 'mixed'}|{'/'.join(sorted(map(str, names)))}"


def split_samples(
    ds: datasets.Dataset, test_size: float | int, seed: int = 0
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Split by sample (rows sharing a `sample_id` stay together), stratified by label and ds_name.

    Paired tables hold each sample twice (base and fine-tuned scores); both rows go to the same
    side. Strata too small to split fall back to label-only, then to a plain shuffled split.
    """
    from sklearn.model_selection import train_test_split

    ids = ds["sample_id"] if "sample_id" in ds.column_names else [str(i) for i in range(len(ds))]
    labels = ds["label"] if "label" in ds.column_names else [None] * len(ds)
    names = ds["ds_name"] if "ds_name" in ds.column_names else [None] * len(ds)
    groups: dict[str, list[int]] = {}
    for i, sid in enumerate(ids):
        groups.setdefault(sid, []).append(i)
    keys = list(groups)
    if len(keys) < 2:
        raise SampleError(f"cannot split {len(keys)} sample(s) into train and test")
    full = [_stratum([labels[i] for i in groups[k]], [names[i] for i in groups[k]]) for k in keys]
    label_only = [s.split("|")[0] for s in full]
    for stratify in (full, label_only, None):
        try:
            train_keys, test_keys = train_test_split(keys, test_size=test_size, random_state=seed, stratify=stratify)
            break
        except ValueError:
            if stratify is None:
                raise
    train_rows = sorted(i for k in train_keys for i in groups[k])
    test_rows = sorted(i for k in test_keys for i in groups[k])
    return ds.select(train_rows), ds.select(test_rows)


def check_writable(out: str | os.PathLike) -> None:
    """Fail before the work, not after it, when an output file cannot be written (read-only folder, a file in the way)."""
    folder = Path(out).parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(f"cannot write {out} ({err}); choose another --out") from err
    if not os.access(folder, os.W_OK):
        raise OSError(f"cannot write {out}: {folder} is not writable (read-only?); choose another --out")


def save_dataset(ds: datasets.Dataset, out: str | os.PathLike, *, inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Write `ds` to `out` (a `save_to_disk` folder, or `.parquet` / `.csv` / `.jsonl` by suffix).

    Refuses to overwrite any of `inputs`, so a stage never replaces the data it read, and CSV for
    tables with list columns (neighbours, embeddings, losses), which CSV would store as unreadable text.
    """
    out = Path(out)
    for source in inputs:
        if Path(source).resolve() == out.resolve():
            raise ValueError(f"refusing to overwrite the input {source}; choose another --out")
    suffix = out.suffix.lower()
    lists = [field.name for field in ds.data.schema if pa.types.is_list(field.type) or pa.types.is_large_list(field.type)]
    if suffix == ".csv" and lists:
        raise SampleError(f"{out}: CSV cannot hold the list columns {', '.join(lists)} (they would read back as "
                          "text); write .parquet, .jsonl or a folder (stage results stay cached)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if suffix == ".parquet":
            ds.to_parquet(str(out))
        elif suffix == ".csv":
            ds.to_csv(str(out), index=False)
        elif suffix == ".jsonl":
            ds.to_json(str(out), lines=True, force_ascii=False)
        else:
            ds.save_to_disk(str(out))
    except OSError as err:  # a read-only folder, a file where a folder should be, a full disk
        raise OSError(f"cannot write {out} ({err}); choose another --out (stage results stay cached)") from err
    return out


# --------------------------------------------------------------------------------------------- CLI
@dataclasses.dataclass
class ValidateArguments:
    """`fimmia-hf validate`."""

    EXAMPLE: ClassVar[str] = "fimmia-hf validate --data samples.csv --modality image"
    data: str = HfArg(help="sample table (CSV/TSV/Parquet/JSON/JSONL) or a save_to_disk folder")
    modality: str | None = HfArg(
        default=None, help="expected modality (default: from the columns)", metadata={"choices": MODALITIES})
    media_root: str | None = HfArg(
        default=None, help="folder that media paths are relative to (default: the table's folder)")


def run_validate(args: ValidateArguments) -> int:
    ds = load_samples(args.data, modality=args.modality, media_root=args.media_root)
    summary = {"rows": len(ds), "modality": modality_of(ds), "columns": ds.column_names}
    if "label" in ds.column_names:
        summary["members"] = int(sum(ds["label"]))
        summary["non_members"] = len(ds) - summary["members"]
    names = ds["ds_name"]
    summary["ds_name"] = {n: names.count(n) for n in sorted(set(names))}
    print(json.dumps(summary, indent=2, ensure_ascii=False))
    return 0


@dataclasses.dataclass
class SplitArguments:
    """`fimmia-hf split`."""

    EXAMPLE: ClassVar[str] = "fimmia-hf split --data scored.parquet --test-size 0.3 --out splits"
    data: str = HfArg(help=(
        "table to split: raw samples (validated, given a sample_id) or a stage output such as a scored table"))
    out: str = HfArg(help="folder for train.parquet and test.parquet")
    test_size: float = HfArg(
        default=0.2, help="share of samples in the test split (below 1), or a number of samples")
    seed: int = HfArg(default=0, help="random seed of the split")


def run_split(args: SplitArguments) -> int:
    """Rows sharing a sample_id (paired tables, neighbours) stay on one side, as `split_samples` does."""
    ds = read_table(args.data)
    if SAMPLE_ID not in ds.column_names:
        ds = load_samples(args.data)
    size = int(args.test_size) if args.test_size >= 1 else args.test_size
    train, test = split_samples(ds, test_size=size, seed=args.seed)
    out = Path(args.out)
    paths = {name: save_dataset(part, out / f"{name}.parquet", inputs=[args.data])
             for name, part in (("train", train), ("test", test))}
    print(json.dumps({name: {"rows": len(part), "path": str(paths[name])}
                      for name, part in (("train", train), ("test", test))}, indent=2))
    return 0

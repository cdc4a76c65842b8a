"""Delta features of the FiMMIA detector, normalisation statistics and the two training protocols.

From a scored dataset (one row per sample: `loss`, `neighbor_losses`, `embedding`, `neighbor_embeddings`,
optionally `media_embedding`, `neighbor_media_embeddings`) each neighbour k gets
``ΔL_k = L'_k − L``, ``Δe_k = e'_k − e`` and ``Δm_k = m'_k − m`` (neighbour minus original, everywhere).
A neighbour whose loss or embedding is missing (None/NaN) is masked instead of dropped, so neighbour k
stays neighbour k; samples may have different K (the collator pads and masks).

The combined head also reads the sample's own statistics: the scores :mod:`fimmia_hf.attacks` computes from the
scorer's columns, by the same functions, one row at a time, so training, `predict` and the pipeline cannot
compute them differently.

Nothing is joined by position: the paired protocol matches base and fine-tuned scores by `sample_id`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

LOSS_COLUMNS = ("loss", "neighbor_losses")
EMBEDDING_COLUMNS = ("embedding", "neighbor_embeddings")
MEDIA_COLUMNS = ("media_embedding", "neighbor_media_embeddings")
FEATURE_COLUMNS = ("loss_delta", "embedding_delta", "media_delta", "neighbor_mask")
DUPLICATE_CORRELATION = 0.99
STATISTICS_COLUMN = "sample_statistics"  # added by `with_statistics` (training only)
_STATISTICS_INPUTS = ("sample_id", "answer", "loss", "neighbor_losses", "lowercase_loss", "reference_loss")


def _row_name(row: Mapping[str, Any]) -> str:
    sid = row.get("sample_id")
    return f"sample_id={sid!r}" if sid is not None else "row without sample_id"


def _scalar(value: Any) -> float:
    if value is None:
        return math.nan
    return float(np.asarray(value, dtype=np.float64).reshape(()))


def _vector(value: Any, dtype: Any = np.float32) -> np.ndarray:
    """1-D float array; None entries become NaN (a missing neighbour)."""
    try:
        return np.asarray(value, dtype=dtype).reshape(-1)
    except (TypeError, ValueError):
        return np.array([math.nan if v is None else v for v in value], dtype=dtype)


def _matrix(value: Any, dim: int | None, what: str, row: Mapping[str, Any]) -> np.ndarray:
    """[K, D] float32 array from a list of vectors; a None vector becomes a NaN row."""
    if isinstance(value, np.ndarray) and value.dtype != object and value.ndim == 2:
        out = value.astype(np.float32, copy=False)
    else:
        items = list(value)
        if dim is None:
            dim = next((len(v) for v in items if v is not None), 0)
        out = np.full((len(items), dim), np.nan, dtype=np.float32)
        for k, v in enumerate(items):
            if v is None:
                continue
            v = np.asarray(v, dtype=np.float32).reshape(-1)
            if v.shape[0] != dim:
                raise ValueError(f"{_row_name(row)}: {what}[{k}] has dimension {v.shape[0]}, expected {dim}")
            out[k] = v
    if dim is not None and out.shape[1] != dim and out.shape[0] > 0:
        raise ValueError(f"{_row_name(row)}: {what} have dimension {out.shape[1]}, expected {dim}")
    return out


def _delta_block(
    row: Mapping[str, Any], original_col: str, neighbors_col: str, dim: int | None, k: int | None
) -> np.ndarray:
    if row.get(original_col) is None or row.get(neighbors_col) is None:
        raise ValueError(f"{_row_name(row)}: column {original_col!r} or {neighbors_col!r} is missing or null")
    original = _vector(row[original_col])
    if dim is not None and original.shape[0] != dim:
        raise ValueError(f"{_row_name(row)}: {original_col} has dimension {original.shape[0]}, expected {dim}")
    neighbors = _matrix(row[neighbors_col], original.shape[0], neighbors_col, row)
    if k is not None and neighbors.shape[0] != k:
        raise ValueError(
            f"{_row_name(row)}: {neighbors_col} has {neighbors.shape[0]} neighbours but neighbor_losses has {k}; "
            "they must describe the same neighbours in the same order"
        )
    return neighbors - original[None, :]


def sample_features(
    row: Mapping[str, Any],
    *,
    use_loss: bool = True,
    use_embeddings: bool = True,
    use_media: bool = False,
    embedding_dim: int | None = None,
    media_embedding_dim: int | None = None,
) -> dict[str, np.ndarray]:
    """Features of one sample: ``loss_delta [K]``, ``embedding_delta [K, D]``, ``media_delta [K, Dm]``,
    ``neighbor_mask [K]`` (bool). Rows that already hold the feature columns are passed through, so the
    collator accepts both scored rows and the output of :func:`build_features`."""
    if "neighbor_mask" in row and row["neighbor_mask"] is not None:
        mask = _vector(row["neighbor_mask"]).astype(bool)
        out: dict[str, np.ndarray] = {}
        if use_loss:
            out["loss_delta"] = _vector(row["loss_delta"])
        if use_embeddings:
            out["embedding_delta"] = _matrix(row["embedding_delta"], embedding_dim, "embedding_delta", row)
        if use_media:
            out["media_delta"] = _matrix(row["media_delta"], media_embedding_dim, "media_delta", row)
        k = len(mask)
        for name, value in out.items():
            if value.shape[0] != k:
                raise ValueError(f"{_row_name(row)}: {name} has {value.shape[0]} neighbours, neighbor_mask has {k}")
            mask &= np.isfinite(value.reshape(k, -1)).all(-1)
        for value in out.values():
            value[~mask] = 0.0
        out["neighbor_mask"] = mask
        return out

    out = {}
    k: int | None = None
    valid: np.ndarray | None = None
    if use_loss:
        for col in LOSS_COLUMNS:
            if col not in row:
                raise ValueError(f"{_row_name(row)}: column {col!r} is missing (score the samples first)")
        if row["neighbor_losses"] is None:
            raise ValueError(f"{_row_name(row)}: neighbor_losses is null")
        losses = _vector(row["neighbor_losses"], np.float64)  # subtract in float64: ΔL is small next to L
        k = losses.shape[0]
        out["loss_delta"] = (losses - _scalar(row["loss"])).astype(np.float32)
        valid = np.isfinite(out["loss_delta"])
    for use, (orig, nbrs), dim, name in (
        (use_embeddings, EMBEDDING_COLUMNS, embedding_dim, "embedding_delta"),
        (use_media, MEDIA_COLUMNS, media_embedding_dim, "media_delta"),
    ):
        if not use:
            continue
        delta = _delta_block(row, orig, nbrs, dim, k)
        k = delta.shape[0]
        finite = np.isfinite(delta).all(-1)
        valid = finite if valid is None else valid & finite
        out[name] = delta
    if valid is None:
        raise ValueError("sample_features needs at least one of use_loss / use_embeddings")
    for value in out.values():
        value[~valid] = 0.0  # masked slots hold zeros, never NaN
    out["neighbor_mask"] = valid
    return out


def _iter_rows(ds: Any, batch_size: int = 1024) -> Any:
    """The rows of a `datasets.Dataset` as dicts, read a batch at a time (faster than indexing row by row)."""
    for batch in ds.iter(batch_size=batch_size):
        n = len(next(iter(batch.values()), []))
        yield from ({key: values[i] for key, values in batch.items()} for i in range(n))


def _statistics_columns(columns: Sequence[str]) -> list[str]:
    """The columns of a table the classic attacks read (the scorer's per-token lists among them)."""
    return [c for c in columns if c in _STATISTICS_INPUTS or c.startswith("token_")]


def detector_columns(config: Any, columns: Sequence[str]) -> list[str]:
    """The columns of a table that a detector with ``config`` reads (nothing else, e.g. media, is copied)."""
    wanted = {"sample_id", *LOSS_COLUMNS, *EMBEDDING_COLUMNS, *MEDIA_COLUMNS, *FEATURE_COLUMNS}
    if config.uses_statistics:
        wanted.update(_statistics_columns(columns))
    return [c for c in columns if c in wanted]


def missing_inputs(config: Any, columns: Sequence[str]) -> list[str]:
    """What a table lacks for a detector with ``config`` (empty: `predict` scores it as it is), in words."""
    has_deltas = "neighbor_mask" in columns
    needed = [] if has_deltas else [
        *(LOSS_COLUMNS if config.uses_loss else ()), *(EMBEDDING_COLUMNS if config.uses_embeddings else ()),
        *(MEDIA_COLUMNS if config.uses_media else ()),
    ]
    missing = [f"column {c!r}" for c in needed if c not in columns]
    if config.uses_statistics:
        absent = [n for n in config.sample_statistics if n not in computable_statistics(columns)]
        missing += [f"the columns of the sample statistics {absent}"] if absent else []
    return missing


def computable_statistics(columns: Sequence[str]) -> list[str]:
    """Names of the sample statistics (classic-attack scores) that a table with these columns allows."""
    from .attacks import available_attacks

    return available_attacks({c: [] for c in columns})


def sample_statistics(row: Mapping[str, Any], names: Sequence[str]) -> np.ndarray:
    """The statistics ``names`` of one sample (float64, in that order): :func:`fimmia_hf.attacks.score_all` on a
    one-row table. A sample the scorer could not score (loss None/NaN) gets NaN, so the detector masks it."""
    from .attacks import missing_attacks, score_all

    if not math.isfinite(_scalar(row.get("loss"))):
        return np.full(len(names), math.nan)
    table = {c: [row[c]] for c in _statistics_columns(list(row))}
    try:
        scores = score_all(table)
    except ValueError as err:
        raise ValueError(f"{_row_name(row)}: {str(err).removeprefix('row 0: ')}") from None
    absent = [n for n in names if n not in scores]
    if absent:
        reasons = [f"{family}: {why}" for family, why in missing_attacks(table).items()
                   if any(n.startswith(family) for n in absent)]
        raise ValueError(f"{_row_name(row)}: cannot compute the sample statistics {absent} "
                         f"({'; '.join(reasons) or 'unknown names'})")
    return np.array([scores[n][0] for n in names], dtype=np.float64)


def statistics_matrix(ds: Any, names: Sequence[str], *, batch_size: int = 1024) -> np.ndarray:
    """``[rows, len(names)]`` float64: :func:`sample_statistics` of every row of a `datasets.Dataset`."""
    view = ds.select_columns(_statistics_columns(ds.column_names))
    return np.array([sample_statistics(row, names) for row in _iter_rows(view, batch_size)]).reshape(-1, len(names))


def _distinct(values: np.ndarray) -> np.ndarray:
    """Which columns to keep: not constant and not a repeat (|r| >= DUPLICATE_CORRELATION) of an earlier kept one."""
    std = values.std(axis=0)
    keep = np.zeros(values.shape[1], dtype=bool)
    z = (values - values.mean(axis=0)) / np.where(std > 1e-12, std, 1.0)
    for j in np.flatnonzero(std > 1e-12):
        kept = np.flatnonzero(keep)
        if kept.size == 0 or np.abs(z[:, kept].T @ z[:, j] / len(z)).max() < DUPLICATE_CORRELATION:
            keep[j] = True
    return keep


def with_statistics(ds: Any, names: Sequence[str]) -> Any:
    """``ds`` with a ``sample_statistics`` column holding :func:`sample_statistics` of each row, computed once (the
    collator reads it instead of recomputing the attacks every epoch)."""
    values = statistics_matrix(ds, names).tolist()
    ds = ds.remove_columns(STATISTICS_COLUMN) if STATISTICS_COLUMN in ds.column_names else ds
    return ds.add_column(STATISTICS_COLUMN, values)


def fit_statistics(train: Any, names: Sequence[str] | None = None, *, batch_size: int = 1024) -> dict[str, list]:
    """Names, means and true standard deviations of the sample statistics on the **training split only** (store
    them with ``FiMMIAConfig.set_normalization``).

    ``names=None`` takes every statistic the columns allow, less those undefined on a scored training row, constant
    on the split, or repeating an earlier one (|r| >= 0.99: e.g. every Min-K% of a one-token answer), so that a
    family with many grid points does not outweigh the others. Given ``names`` are kept as they are (a constant
    one gets std 1, so normalising stays finite)."""
    if "loss" not in train.column_names:
        raise ValueError(f"the combined head needs the scorer's columns ('loss', 'token_logprobs', ...); the training "
                         f"data has {train.column_names}")
    given = names is not None
    names = list(names) if given else computable_statistics(train.column_names)
    values = statistics_matrix(train, names, batch_size=batch_size)
    values = values[np.isfinite(values).any(axis=1)]  # rows the scorer could not score carry nothing
    if len(values) == 0:
        raise ValueError("no training row has a finite loss: cannot fit the sample statistics")
    defined = np.isfinite(values).all(axis=0)
    if given and not defined.all():
        bad = [n for n, ok in zip(names, defined) if not ok]
        raise ValueError(f"the sample statistics {bad} are undefined (NaN/inf) on some scored training rows")
    names, values = [n for n, ok in zip(names, defined) if ok], values[:, defined]
    if not given:
        keep = _distinct(values)
        if not keep.any():
            raise ValueError("every sample statistic is constant or undefined on the training split")
        names, values = [n for n, k in zip(names, keep) if k], values[:, keep]
    std = values.std(axis=0)
    return {
        "sample_statistics": names,
        "sample_statistics_mean": values.mean(axis=0).tolist(),
        "sample_statistics_std": np.where(std > 1e-12, std, 1.0).tolist(),
    }


def _feature_flags(ds_columns: Sequence[str]) -> dict[str, bool]:
    return {
        "use_loss": all(c in ds_columns for c in LOSS_COLUMNS),
        "use_embeddings": all(c in ds_columns for c in EMBEDDING_COLUMNS),
        "use_media": all(c in ds_columns for c in MEDIA_COLUMNS),
    }


def build_features(ds: Any, *, remove_inputs: bool = False, **map_kwargs: Any) -> Any:
    """Add ``loss_delta``, ``embedding_delta``, ``media_delta`` (when media embeddings of neighbours exist) and
    ``neighbor_mask`` to a scored `datasets.Dataset` (a cached `map`). ``remove_inputs`` drops the raw
    loss/embedding columns afterwards (the features are then self-sufficient)."""
    import datasets

    flags = _feature_flags(ds.column_names)
    if not (flags["use_loss"] or flags["use_embeddings"]):
        raise ValueError(
            f"dataset has neither {LOSS_COLUMNS} nor {EMBEDDING_COLUMNS}; columns are {ds.column_names}"
        )

    def fn(batch: dict[str, list]) -> dict[str, list]:
        n = len(next(iter(batch.values())))
        rows = ({key: values[i] for key, values in batch.items()} for i in range(n))
        feats = [sample_features(r, **flags) for r in rows]
        return {name: [f[name].tolist() for f in feats] for name in feats[0]} if feats else {}

    features = ds.features.copy()
    if flags["use_loss"]:
        features["loss_delta"] = datasets.List(datasets.Value("float32"))
    for flag, name in (("use_embeddings", "embedding_delta"), ("use_media", "media_delta")):
        if flags[flag]:
            features[name] = datasets.List(datasets.List(datasets.Value("float32")))
    features["neighbor_mask"] = datasets.List(datasets.Value("bool"))
    remove = [c for c in (*LOSS_COLUMNS, *EMBEDDING_COLUMNS, *MEDIA_COLUMNS) if c in ds.column_names]
    if remove_inputs:
        for col in remove:
            del features[col]
    map_kwargs.setdefault("desc", "delta features")
    return ds.map(
        fn, batched=True, batch_size=map_kwargs.pop("batch_size", 64), features=features,
        remove_columns=remove if remove_inputs else None, **map_kwargs,
    )


def fit_normalization(train: Any, *, batch_size: int = 1024) -> dict[str, float]:
    """ΔL statistics of the **training split only**: ``loss_mean``, ``loss_std`` (a true, population standard
    deviation), ``loss_min``, ``loss_max``. Store them with ``FiMMIAConfig.set_normalization``. A degenerate
    spread (all ΔL equal) falls back to 1 so normalising stays finite."""
    cols = ["loss_delta", "neighbor_mask"] if "loss_delta" in train.column_names else list(LOSS_COLUMNS)
    for col in cols:
        if col not in train.column_names:
            raise ValueError(f"fit_normalization needs columns {cols}; dataset has {train.column_names}")
    count, total, total_sq = 0, 0.0, 0.0
    low, high = math.inf, -math.inf
    sub = train.select_columns(cols)
    for batch in sub.iter(batch_size=batch_size):
        n = len(batch[cols[0]])
        parts = []
        for i in range(n):
            if cols[0] == "loss_delta":
                d = _vector(batch["loss_delta"][i])
                d = d[_vector(batch["neighbor_mask"][i]).astype(bool)]
            else:
                d = _vector(batch["neighbor_losses"][i], np.float64) - _scalar(batch["loss"][i])
            parts.append(np.asarray(d, dtype=np.float64))
        values = np.concatenate(parts) if parts else np.zeros(0)
        values = values[np.isfinite(values)]
        if values.size:
            count += values.size
            total += float(values.sum())
            total_sq += float(np.square(values).sum())
            low, high = min(low, float(values.min())), max(high, float(values.max()))
    if count == 0:
        raise ValueError("no finite loss deltas in the training data: cannot fit normalisation statistics")
    mean = total / count
    std = math.sqrt(max(total_sq / count - mean * mean, 0.0))
    return {
        "loss_mean": mean,
        "loss_std": std if std > 1e-12 else 1.0,
        "loss_min": low,
        "loss_max": high if high > low else low + 1.0,
    }


def _check_ids(ds: Any, name: str) -> list[str]:
    if "sample_id" not in ds.column_names:
        raise ValueError(f"{name} has no 'sample_id' column; rows are joined by sample_id, never by position")
    ids = [str(s) for s in ds["sample_id"]]
    seen: set[str] = set()
    dups = [s for s in ids if s in seen or seen.add(s)]
    if dups:
        raise ValueError(f"{name} has duplicate sample_id values, e.g. {dups[:3]}")
    return ids


def paired_dataset(base_ds: Any, finetuned_ds: Any) -> Any:
    """The original's protocol: the same samples scored by a base model (label 0) and by a model fine-tuned on
    them (label 1). Rows are matched by `sample_id`; columns the fine-tuned table lacks (embeddings, text,
    media) are taken from the base row of the same sample. Returns both halves concatenated with ``label``
    and ``model_role`` ("base" / "finetuned"); split it by sample (`fimmia_hf.data.split_samples`) so the two
    rows of a sample stay on one side."""
    import datasets

    base_ids = _check_ids(base_ds, "base dataset")
    ft_ids = _check_ids(finetuned_ds, "fine-tuned dataset")
    for name, ds in (("base dataset", base_ds), ("fine-tuned dataset", finetuned_ds)):
        missing = [c for c in LOSS_COLUMNS if c not in ds.column_names]
        if missing:
            raise ValueError(f"{name} lacks {missing}: score it with the target model first")
    only_base = sorted(set(base_ids) - set(ft_ids))
    only_ft = sorted(set(ft_ids) - set(base_ids))
    if only_base or only_ft:
        raise ValueError(
            f"base and fine-tuned datasets hold different samples: {len(only_base)} only in base "
            f"(e.g. {only_base[:3]}), {len(only_ft)} only in fine-tuned (e.g. {only_ft[:3]})"
        )
    position = {sid: i for i, sid in enumerate(ft_ids)}
    ft = finetuned_ds.select([position[sid] for sid in base_ids]).flatten_indices()

    ft_k = [len(v) if v is not None else 0 for v in ft["neighbor_losses"]]
    base_k = [len(v) if v is not None else 0 for v in base_ds["neighbor_losses"]]
    bad = [base_ids[i] for i, (a, b) in enumerate(zip(base_k, ft_k)) if a != b]
    if bad:
        raise ValueError(f"base and fine-tuned scores have different neighbour counts for sample_id {bad[:3]}")
    if "neighbors" in base_ds.column_names and "neighbors" in ft.column_names:
        diff = [base_ids[i] for i, (a, b) in enumerate(zip(base_ds["neighbors"], ft["neighbors"])) if a != b]
        if diff:
            raise ValueError(f"base and fine-tuned rows list different neighbour texts for sample_id {diff[:3]}")

    base_cols = [c for c in base_ds.column_names if c not in ("label", "model_role")]
    own = [c for c in base_cols if c in ft.column_names]
    borrowed = [c for c in base_cols if c not in ft.column_names]
    ft = ft.select_columns(own)
    if borrowed:
        ft = datasets.concatenate_datasets([ft, base_ds.select_columns(borrowed).flatten_indices()], axis=1)
    ft = ft.select_columns(base_cols)
    base = base_ds.select_columns(base_cols)
    ft = ft.cast(base.features) if ft.features != base.features else ft

    def tag(ds: Any, label: int, role: str) -> Any:
        ds = ds.add_column("label", [label] * len(ds)).add_column("model_role", [role] * len(ds))
        return ds.cast_column("label", datasets.Value("int64"))

    return datasets.concatenate_datasets([tag(base, 0, "base"), tag(ft, 1, "finetuned")])


def membership_dataset(ds: Any) -> Any:
    """The member / non-member protocol: one target model, ``label`` = 1 when the sample was in its training
    data. Checks that every row has a 0/1 label and returns the dataset with an int64 ``label``."""
    import datasets

    if "label" not in ds.column_names:
        raise ValueError("member/non-member data needs a 'label' column (1 = member, 0 = non-member)")
    from .data import labels_of

    labels = labels_of(ds["label"], "member/non-member data")
    if labels != ds["label"]:  # labels written as text ("1"): replace the column where it stands
        ds = ds.remove_columns("label").add_column("label", labels).select_columns(ds.column_names)
    return ds.cast_column("label", datasets.Value("int64"))


class FiMMIADataCollator:
    """Turns rows (scored or with feature columns) into padded tensors for
    :class:`~fimmia_hf.modeling_fimmia.FiMMIAForMembershipInference`: ``loss_delta [B, K]``,
    ``embedding_delta [B, K, D]``, ``media_delta [B, K, Dm]``, ``sample_statistics [B, S]`` (the named
    ``statistics``, for the combined head; read from the rows' ``sample_statistics`` column where
    ``precomputed``, see :func:`with_statistics`), ``neighbor_mask [B, K]`` and ``labels [B]`` (when every row has
    a label). K is the largest neighbour count in the batch; padding is masked."""

    def __init__(
        self,
        *,
        use_loss: bool = True,
        use_embeddings: bool = True,
        use_media: bool = False,
        embedding_dim: int | None = None,
        media_embedding_dim: int | None = None,
        statistics: Sequence[str] | None = None,
        precomputed: bool = False,
    ) -> None:
        self.kwargs = dict(
            use_loss=use_loss, use_embeddings=use_embeddings, use_media=use_media,
            embedding_dim=embedding_dim, media_embedding_dim=media_embedding_dim,
        )
        self.statistics = list(statistics) if statistics else None
        self.precomputed = precomputed

    @classmethod
    def from_config(cls, config: Any, *, precomputed: bool = False) -> FiMMIADataCollator:
        """The inputs a detector config needs (the blind ``embedding_only`` head needs no losses)."""
        return cls(
            use_loss=config.uses_loss, use_embeddings=config.uses_embeddings, use_media=config.uses_media,
            embedding_dim=config.embedding_dim if config.uses_embeddings else None,
            media_embedding_dim=config.media_embedding_dim if config.uses_media else None,
            statistics=config.sample_statistics if config.uses_statistics else None, precomputed=precomputed,
        )

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        import torch

        feats = [sample_features(r, **self.kwargs) for r in rows]
        batch, k = len(feats), max((len(f["neighbor_mask"]) for f in feats), default=0)
        out: dict[str, Any] = {}
        mask = np.zeros((batch, k), dtype=bool)
        for i, f in enumerate(feats):
            mask[i, : len(f["neighbor_mask"])] = f["neighbor_mask"]
        out["neighbor_mask"] = torch.from_numpy(mask)
        if self.kwargs["use_loss"]:
            loss = np.zeros((batch, k), dtype=np.float32)
            for i, f in enumerate(feats):
                loss[i, : len(f["loss_delta"])] = f["loss_delta"]
            out["loss_delta"] = torch.from_numpy(loss)
        for name in ("embedding_delta", "media_delta"):
            if name not in feats[0]:
                continue
            dim = max(f[name].shape[1] for f in feats)
            arr = np.zeros((batch, k, dim), dtype=np.float32)
            for i, f in enumerate(feats):
                arr[i, : f[name].shape[0]] = f[name]
            out[name] = torch.from_numpy(arr)
        if self.statistics:
            values = [r[STATISTICS_COLUMN] if self.precomputed else sample_statistics(r, self.statistics) for r in rows]
            out["sample_statistics"] = torch.from_numpy(np.asarray(values, dtype=np.float32).reshape(len(rows), -1))
        labels = [r.get("label") for r in rows]
        if all(lab is not None for lab in labels):
            out["labels"] = torch.tensor([int(lab) for lab in labels], dtype=torch.long)
        return out


__all__ = [
    "FEATURE_COLUMNS",
    "FiMMIADataCollator",
    "build_features",
    "computable_statistics",
    "detector_columns",
    "fit_normalization",
    "fit_statistics",
    "missing_inputs",
    "membership_dataset",
    "paired_dataset",
    "sample_features",
    "sample_statistics",
    "statistics_matrix",
    "with_statistics",
]

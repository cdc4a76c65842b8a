"""Which feature group drives the detector? Gradient attribution of ΔL, Δe (and Δm) with captum.

The original (``attribute_fimmia.py``) ran Integrated Gradients one record at a time with the model left in
train mode (dropout on, so the attributions were noisy and completeness did not hold) toward the item's true
label. Here the detector is put in eval mode, every valid (sample, neighbour) pair of a batch is attributed at
once, and the target is always the per-neighbour **P(member)** (the quantity averaged into the sample score),
so attributions of members and non-members share one sign convention: positive pushes toward "member".

The detector classifies each neighbour independently, so the valid pairs of a batch are flattened into
``[N, 1, ...]`` inputs; padded or masked neighbours are never fed to the network and get zero attribution.
With the default zero baseline, IG integrates from "the neighbour is identical to the original" (ΔL = 0,
Δe = 0) to the observed deltas; ΔL normalisation happens inside the model, so attributions are in raw units.
The combined head's sample statistics (loss, Min-K%++, ...) are a fourth group, one vector per sample repeated over
its neighbours; for them the ``mean`` baseline is the meaningful one (a raw loss of 0 is no neutral sample).

Outputs: an :class:`AttributionResult` with one row per (sample, neighbour), the share of |attribution| that
each group takes (overall and per label), the IG convergence delta, a pair plot and a bar chart of the shares.
CLI: ``fimmia-hf attribute`` (:class:`AttributeArguments` + :func:`run_attribute`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from transformers.hf_argparser import HfArg

from .metrics import json_safe

logger = logging.getLogger(__name__)

METHODS = ("integrated_gradients", "saliency", "input_x_gradient")
BASELINES = ("zeros", "mean")
# group name -> model input; order is the order of the model's branches
GROUP_INPUTS = {"loss": "loss_delta", "embedding": "embedding_delta", "media": "media_delta",
                "statistics": "sample_statistics"}  # statistics: the combined head's, one vector per sample
# input elements per captum chunk (bounds memory when embeddings are 4096-d and IG multiplies rows by n_steps)
_ELEMENT_BUDGET = 2**25
_CONTEXT_COLUMNS = ("sample_id", "ds_name", "model_role", "label")


@dataclass
class AttributionResult:
    """Attributions of every (sample, neighbour) pair toward P(member).

    table: one row per neighbour slot (``valid=False`` rows are masked/padded and hold zeros); see
        :meth:`to_pandas`.
    summary: settings, each group's share of |attribution| (``share["all"]`` and ``share["by_label"]``),
        mean |attribution| per pair, the IG convergence delta and timings.
    attributions: full arrays per group: ``loss [S, K]``, ``embedding [S, K, D]``, ``media [S, K, Dm]``
        (S samples in dataset order, K the largest neighbour count; zeros where masked).
    files: what was written (``table``, ``summary``, ``arrays``, ``pairplot``, ``shares``) when saved.
    """

    table: Any
    summary: dict[str, Any]
    attributions: dict[str, np.ndarray] = field(repr=False)
    out_dir: Path | None = None
    files: dict[str, str] = field(default_factory=dict)

    def to_pandas(self) -> Any:
        """The per-(sample, neighbour) table as a `pandas.DataFrame` (a copy)."""
        return self.table.copy()

    @property
    def shares(self) -> dict[str, float]:
        """Overall share of |attribution| per group (sums to 1)."""
        return dict(self.summary["share"]["all"])

    def save(self, out_dir: str | os.PathLike, *, graphs: bool = True) -> dict[str, str]:
        """Write the table (Parquet), the summary (JSON), the full arrays (safetensors) and, with ``graphs``,
        the pair plot and the share chart (PNG) into ``out_dir``; returns the written paths."""
        from safetensors.numpy import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        stem = _stem(self.summary)
        files = {
            "table": out / f"{stem}.parquet",
            "summary": out / f"{stem}.json",
            "arrays": out / f"{stem}.safetensors",
        }
        self.table.to_parquet(files["table"], index=False)
        save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in self.attributions.items()},
                  str(files["arrays"]))
        if graphs and not bool(self.table["valid"].any()):
            logger.warning("no valid (sample, neighbour) pair: no graphs written")
        elif graphs:
            files["pairplot"] = plot_pairs(self.table, out / f"{stem}_pairplot.png", label_names=self._label_names())
            files["shares"] = plot_shares(self.summary, out / f"{stem}_shares.png", label_names=self._label_names())
        self.out_dir = out
        self.files = {k: str(v) for k, v in files.items()}
        self.summary["files"] = dict(self.files)
        files["summary"].write_text(json.dumps(json_safe(self.summary), indent=2), encoding="utf-8")
        return dict(self.files)

    def _label_names(self) -> dict[str, str]:
        return {str(k): str(v) for k, v in (self.summary.get("label_names") or {}).items()}


def _stem(summary: Mapping[str, Any]) -> str:
    """File stem naming the settings, so runs with different settings do not overwrite each other."""
    baseline = summary.get("baseline")
    return (
        summary["method"]
        + (f"_{baseline}" if baseline not in (None, "zeros") else "")
        + ("_smoothgrad" if summary.get("noise_tunnel") else "")
    )


# --------------------------------------------------------------------------------------------- inputs
def _load_model(model: Any) -> tuple[Any, Path | None]:
    """The detector and, when it lives in a local folder, that folder (the default output location)."""
    from .modeling_fimmia import FiMMIAForMembershipInference

    if isinstance(model, FiMMIAForMembershipInference):
        where = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
        return model, (Path(where) if where and Path(where).is_dir() else None)
    if isinstance(model, (str, os.PathLike)):
        loaded = FiMMIAForMembershipInference.from_pretrained(str(model))
        return loaded, (Path(model) if Path(model).is_dir() else None)
    raise TypeError(f"model must be a FiMMIAForMembershipInference or a path/Hub id, not {type(model).__name__}")


def _load_data(ds: Any) -> Any:
    import datasets

    from .training import load_scored

    try:
        import pandas as pd
    except ImportError:  # pragma: no cover - pandas is a dependency
        pd = None
    if pd is not None and isinstance(ds, pd.DataFrame):
        return datasets.Dataset.from_pandas(ds, preserve_index=False)
    return load_scored(ds)


def _groups(config: Any) -> list[str]:
    flags = {"loss": config.uses_loss, "embedding": config.uses_embeddings, "media": config.uses_media,
             "statistics": config.uses_statistics}
    return [g for g in GROUP_INPUTS if flags[g]]


def _group_values(batch: dict[str, Any], groups: list[str]) -> dict[str, Any]:
    """Each group's collated input, per neighbour slot: a sample's statistics repeat over its K slots."""
    values = {g: batch[GROUP_INPUTS[g]].float() for g in groups}
    if "statistics" in values:
        values["statistics"] = values["statistics"][:, None, :].expand(-1, batch["neighbor_mask"].shape[1], -1)
    return values


def _label_of(value: Any) -> int | None:
    if value is None:
        return None
    try:
        if isinstance(value, float) and math.isnan(value):
            return None
        return int(value)
    except (TypeError, ValueError):
        return None


def _dataset_mean(view: Any, collator: Any, groups: list[str], batch_size: int) -> dict[str, Any]:
    """Mean of each feature over valid neighbours of the data being attributed (the ``mean`` baseline)."""
    import torch

    sums: dict[str, torch.Tensor] = {}
    count = 0
    for start in range(0, len(view), batch_size):
        batch = _collate(view, collator, start, batch_size)
        mask = batch["neighbor_mask"]
        count += int(mask.sum())
        for g, value in _group_values(batch, groups).items():
            x = value[mask].double().sum(0)
            sums[g] = x if g not in sums else sums[g] + x
    if count == 0:
        raise ValueError("no valid neighbour in the data: cannot compute a 'mean' baseline")
    return {g: (s / count).float() for g, s in sums.items()}


def _collate(view: Any, collator: Any, start: int, batch_size: int) -> dict[str, Any]:
    columns = view[start : start + batch_size]
    n = len(next(iter(columns.values())))
    return collator([{k: v[i] for k, v in columns.items()} for i in range(n)])


# --------------------------------------------------------------------------------------------- captum
def _summed_gradients(
    forward_fn: Callable[..., Any],
    inputs: tuple[Any, ...],
    target_ind: Any = None,
    additional_forward_args: Any = None,
) -> tuple[Any, ...]:
    """Drop-in for captum's ``compute_gradients``: one backward of the summed outputs instead of one root per
    output row (captum unbinds the outputs, which costs ~100 µs per row). Exact here because every row is an
    independent (sample, neighbour) pair in eval mode, so d(sum)/d(row i) = d(output i)/d(row i)."""
    import torch

    if target_ind is not None or additional_forward_args is not None:
        raise ValueError("the attribution forward takes neither targets nor extra arguments")
    with torch.enable_grad():
        outputs = forward_fn(*inputs)
        return torch.autograd.grad(outputs.sum(), inputs)


def _make_explainer(method: str, forward: Callable[..., Any], noise_tunnel: bool) -> Any:
    from captum.attr import InputXGradient, IntegratedGradients, NoiseTunnel, Saliency

    base = {"integrated_gradients": IntegratedGradients, "saliency": Saliency, "input_x_gradient": InputXGradient}
    explainer = base[method](forward)
    explainer.gradient_func = _summed_gradients
    return NoiseTunnel(explainer) if noise_tunnel else explainer


def _attribute_pairs(
    explainer: Any,
    inputs: tuple[Any, ...],
    baselines: tuple[Any, ...],
    *,
    method: str,
    noise_tunnel: bool,
    n_steps: int,
    nt_samples: int,
    nt_stdev: float,
    internal_batch_size: int | None,
) -> tuple[tuple[Any, ...], Any]:
    """Attributions for N flattened pairs and, for IG, the per-pair |convergence delta| (mean over noisy copies
    with the noise tunnel)."""
    n = inputs[0].shape[0]
    width = sum(int(np.prod(t.shape[1:])) for t in inputs)
    rows_cap = max(1, _ELEMENT_BUDGET // max(width, 1))
    steps = n_steps if method == "integrated_gradients" else 1
    kwargs: dict[str, Any] = {}
    if method == "saliency":
        kwargs["abs"] = False  # keep the sign: positive pushes toward "member"
    nt_batch = 1
    if noise_tunnel:
        nt_batch = int(min(nt_samples, max(1, rows_cap // max(n * steps, 1))))
        kwargs.update(nt_type="smoothgrad", nt_samples=nt_samples, nt_samples_batch_size=nt_batch, stdevs=nt_stdev)
    examples = n * nt_batch
    if method == "integrated_gradients":
        kwargs.update(
            baselines=baselines, n_steps=n_steps, return_convergence_delta=True,
            internal_batch_size=internal_batch_size or max(examples, rows_cap),
        )
    out = explainer.attribute(inputs, **kwargs)
    if method != "integrated_gradients":
        return tuple(out), None
    attrs, delta = out
    delta = delta.detach().abs().float()
    if noise_tunnel:
        delta = _per_pair_delta(delta, n, nt_samples, nt_batch)
    return tuple(attrs), delta


def _per_pair_delta(delta: Any, n: int, nt_samples: int, nt_batch: int) -> Any:
    """Undo NoiseTunnel's layout (chunks of ``n * nt_batch`` deltas, each pair's copies adjacent) and average
    the |delta| of each pair's noisy copies."""
    import torch

    if delta.numel() != n * nt_samples:
        return delta.reshape(-1).mean().expand(n).clone()
    parts, offset = [], 0
    sizes = [nt_batch] * (nt_samples // nt_batch) + ([nt_samples % nt_batch] if nt_samples % nt_batch else [])
    for size in sizes:
        parts.append(delta[offset : offset + n * size].reshape(n, size))
        offset += n * size
    return torch.cat(parts, dim=1).mean(1)


# --------------------------------------------------------------------------------------------- main entry
def attribute(
    model: Any,
    ds: Any,
    *,
    method: str = "integrated_gradients",
    noise_tunnel: bool = False,
    n_steps: int = 100,
    baseline: str = "zeros",
    out_dir: str | os.PathLike | None = None,
    batch_size: int = 64,
    nt_samples: int = 250,
    nt_stdev: float = 0.02,
    graphs: bool = True,
    max_samples: int | None = None,
    device: str | None = None,
    internal_batch_size: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> AttributionResult:
    """Attribute the detector's per-neighbour P(member) to its input groups ΔL, Δe (and Δm).

    ``model``: a :class:`~fimmia_hf.FiMMIAForMembershipInference` or a path/Hub id. ``ds``: scored samples
    (features are built here) or the output of :func:`fimmia_hf.features.build_features`; a Dataset, a
    ``save_to_disk`` folder, a Parquet/JSON file or a pandas DataFrame. ``method``: ``integrated_gradients``
    (captum IG, ``n_steps``, ``baseline`` ``"zeros"`` = no perturbation, or ``"mean"`` = the mean feature of the
    valid neighbours), ``saliency`` (signed gradients) or ``input_x_gradient``; ``noise_tunnel`` wraps it in
    SmoothGrad (``nt_samples`` noisy copies, noise std ``nt_stdev`` in raw feature units, seeded by ``seed``).
    ``batch_size`` samples are collated at a time; ``max_samples`` keeps the first rows only.
    Results are saved into ``out_dir`` (default: ``<model folder>/attribution`` when the model is a local
    folder; otherwise nothing is written unless ``out_dir`` is given); ``graphs`` adds the PNG plots.
    """
    import torch
    from tqdm.auto import tqdm

    from .features import FiMMIADataCollator, detector_columns

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")
    if method == "integrated_gradients" and n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    if noise_tunnel and (nt_samples < 1 or not nt_stdev >= 0):
        raise ValueError(f"noise tunnel needs nt_samples >= 1 and nt_stdev >= 0, got {nt_samples}, {nt_stdev}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    started = time.perf_counter()
    detector, model_dir = _load_model(model)
    model_name = str(model) if isinstance(model, (str, os.PathLike)) else (str(model_dir) if model_dir else None)
    data = _load_data(ds)
    if max_samples is not None:
        data = data.select(range(min(max_samples, len(data))))
    if len(data) == 0:
        raise ValueError("no samples to attribute")
    groups = _groups(detector.config)
    collator = FiMMIADataCollator.from_config(detector.config)
    wanted = {*_CONTEXT_COLUMNS, *detector_columns(detector.config, data.column_names)}
    view = data.select_columns([c for c in data.column_names if c in wanted])
    context = {c: list(data[c]) for c in _CONTEXT_COLUMNS if c in data.column_names}

    if device is not None:
        detector = detector.to(device)
    dev = next(detector.parameters()).device
    was_training = detector.training
    detector.eval()
    means = _dataset_mean(view, collator, groups, batch_size) if baseline == "mean" else None

    def forward(*tensors: Any) -> Any:
        """P(member) of each flattened pair: inputs ``[n, 1]`` / ``[n, 1, D]`` are n samples with one neighbour."""
        out = detector(**{GROUP_INPUTS[g]: t for g, t in zip(groups, tensors)}, return_dict=True)
        return out.logits.float().softmax(-1)[:, 0, 1]

    explainer = _make_explainer(method, forward, noise_tunnel)
    per_batch: list[dict[str, Any]] = []
    rng_devices = [dev.index if dev.index is not None else 0] if dev.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=rng_devices), torch.enable_grad():
            torch.manual_seed(seed)
            starts = range(0, len(view), batch_size)
            for start in tqdm(starts, desc=f"attribution ({method})", disable=not progress):
                batch = _collate(view, collator, start, batch_size)
                mask = batch["neighbor_mask"]
                values = _group_values(batch, groups)
                record: dict[str, Any] = {"mask": mask, "values": values, "attr": {}, "delta": None}
                n_pairs = int(mask.sum())
                if n_pairs:
                    # valid pairs as n samples with one neighbour: loss [n, 1], embeddings [n, 1, D]
                    flat = {g: values[g][mask].reshape(n_pairs, 1, -1) for g in groups}
                    if "loss" in flat:
                        flat["loss"] = flat["loss"].reshape(n_pairs, 1)
                    if "statistics" in flat:  # the model takes one statistics vector per (one-neighbour) sample
                        flat["statistics"] = flat["statistics"].reshape(n_pairs, -1)
                    inputs = tuple(flat[g].to(dev).requires_grad_() for g in groups)
                    if means is None:
                        bases = tuple(torch.zeros_like(t) for t in inputs)
                    else:
                        bases = tuple(means[g].to(dev).reshape((1,) * (t.dim() - 1) + (-1,)).expand_as(t).clone()
                                      for g, t in zip(groups, inputs))
                    attrs, delta = _attribute_pairs(
                        explainer, inputs, bases, method=method, noise_tunnel=noise_tunnel, n_steps=n_steps,
                        nt_samples=nt_samples, nt_stdev=float(nt_stdev), internal_batch_size=internal_batch_size,
                    )
                    with torch.no_grad():
                        record["p"] = forward(*inputs).cpu()
                        record["p_base"] = forward(*bases).cpu() if method == "integrated_gradients" else None
                    record["attr"] = {g: a.detach().float().cpu().reshape(n_pairs, -1) for g, a in zip(groups, attrs)}
                    record["delta"] = delta.cpu() if delta is not None else None
                per_batch.append(record)
    finally:
        detector.train(was_training)
    elapsed = time.perf_counter() - started

    table, arrays = _assemble(per_batch, groups, context, len(view), method)
    summary: dict[str, Any] = dict(
        model=model_name,
        head=detector.config.head,
        method=method,
        noise_tunnel=bool(noise_tunnel),
        n_steps=n_steps if method == "integrated_gradients" else None,
        baseline=baseline if method == "integrated_gradients" else None,
        nt_samples=nt_samples if noise_tunnel else None,
        nt_stdev=float(nt_stdev) if noise_tunnel else None,
        seed=seed,
        target="P(member) per neighbour (softmax of the member logit)",
        label_names={str(k): v for k, v in (detector.config.id2label or {}).items()},
        runtime_s=round(elapsed, 4),
        seconds_per_100_samples=round(100.0 * elapsed / len(view), 4),
        device=str(dev),
    )
    summary.update(_summarize(table, arrays, groups, method))
    if summary["n_pairs"] == 0:
        logger.warning("no valid (sample, neighbour) pair in %d samples: every attribution is zero", len(view))
    result = AttributionResult(table=table, summary=summary, attributions=arrays)
    target_dir = Path(out_dir) if out_dir is not None else (model_dir / "attribution" if model_dir else None)
    if target_dir is not None:
        result.save(target_dir, graphs=graphs)
    elif graphs:
        logger.info("model is not a local folder and no out_dir was given: nothing written, no graphs")
    return result


def _assemble(
    per_batch: list[dict[str, Any]], groups: list[str], context: dict[str, list], n_samples: int, method: str
) -> tuple[Any, dict[str, np.ndarray]]:
    """One table row per neighbour slot and the full [S, K, ...] arrays, zeros where masked."""
    import pandas as pd

    k_max = max((int(r["mask"].shape[1]) for r in per_batch), default=0)
    dims = {g: next((int(r["values"][g].shape[-1]) for r in per_batch if r["values"][g].dim() == 3), 1) for g in groups}
    arrays = {g: np.zeros((n_samples, k_max) if g == "loss" else (n_samples, k_max, dims[g]), np.float32)
              for g in groups}
    cols: dict[str, list] = {c: [] for c in ("row", "neighbor", "valid")}
    numeric: dict[str, list[np.ndarray]] = {}

    def put(name: str, value: np.ndarray) -> None:
        numeric.setdefault(name, []).append(np.asarray(value, dtype=np.float64))

    row0 = 0
    for rec in per_batch:
        mask = rec["mask"].numpy()
        b, k = mask.shape
        flat_mask = mask.reshape(-1)
        n_slots = b * k
        cols["row"].extend(np.repeat(np.arange(row0, row0 + b), k).tolist())
        cols["neighbor"].extend(np.tile(np.arange(k), b).tolist())
        cols["valid"].extend(flat_mask.tolist())

        def scatter(pair_values: np.ndarray | None, fill: float = 0.0, _mask: np.ndarray = flat_mask) -> np.ndarray:
            """Per-pair values back onto the neighbour slots of this batch (``fill`` where masked)."""
            out = np.full(_mask.shape[0], fill, dtype=np.float64)
            if pair_values is not None and _mask.any():
                out[_mask] = pair_values
            return out

        for g in groups:
            x = rec["values"][g].numpy().reshape(n_slots, -1)
            if g == "loss":
                put("loss_delta", np.where(flat_mask, x[:, 0], np.nan))
            else:
                put(f"{g}_delta_l2", np.where(flat_mask, np.linalg.norm(x, axis=1), np.nan))
        p = rec.get("p")
        put("p_member", scatter(p.numpy() if p is not None else None, np.nan))
        if method == "integrated_gradients":
            pb = rec.get("p_base")
            put("p_member_baseline", scatter(pb.numpy() if pb is not None else None, np.nan))
        total = np.zeros(int(flat_mask.sum()))
        for g in groups:
            a = rec["attr"].get(g)
            a = a.numpy() if a is not None else np.zeros((0, 1))
            if g == "loss":
                put("loss_attr", scatter(a[:, 0] if len(a) else None))
                total = total + (a[:, 0] if len(a) else 0)
            else:
                put(f"{g}_attr_sum", scatter(a.sum(1) if len(a) else None))
                put(f"{g}_attr_l1", scatter(np.abs(a).sum(1) if len(a) else None))
                put(f"{g}_attr_l2", scatter(np.linalg.norm(a, axis=1) if len(a) else None))
                put(f"{g}_attr_linf", scatter(np.abs(a).max(1) if len(a) else None))
                total = total + (a.sum(1) if len(a) else 0)
            if len(a):
                full = np.zeros((b, k_max) if g == "loss" else (b, k_max, dims[g]), np.float32)
                sub = full[:, :k]
                sub[mask] = a[:, 0] if g == "loss" else a
                arrays[g][row0 : row0 + b] = full
        put("attr_total", scatter(total if flat_mask.any() else None))
        if method == "integrated_gradients":
            d = rec.get("delta")
            put("convergence_delta", scatter(d.numpy() if d is not None else None, np.nan))
        row0 += b

    frame: dict[str, Any] = {}
    rows = np.asarray(cols["row"], dtype=np.int64)
    if "sample_id" in context:
        frame["sample_id"] = [str(context["sample_id"][r]) for r in rows]
    else:
        frame["sample_id"] = [str(r) for r in rows]
    frame["row"] = rows
    for c in ("ds_name", "model_role"):
        if c in context:
            frame[c] = [context[c][r] for r in rows]
    labels = [_label_of(context["label"][r]) for r in rows] if "label" in context else [None] * len(rows)
    frame["label"] = pd.array(labels, dtype="Int64")
    frame["neighbor"] = np.asarray(cols["neighbor"], dtype=np.int64)
    frame["valid"] = np.asarray(cols["valid"], dtype=bool)
    for name, parts in numeric.items():
        frame[name] = np.concatenate(parts) if parts else np.zeros(0)
    return pd.DataFrame(frame), arrays


def _group_abs(table: Any, group: str) -> Any:
    return table["loss_attr"].abs() if group == "loss" else table[f"{group}_attr_l1"]


def _shares(table: Any, groups: list[str]) -> tuple[dict[str, float], dict[str, float]]:
    """Pooled share of |attribution| per group (Σ over pairs and elements), and mean |attribution| per pair."""
    totals = {g: float(_group_abs(table, g).sum()) for g in groups}
    grand = sum(totals.values())
    share = {g: (totals[g] / grand if grand > 0 else math.nan) for g in groups}
    mean = {g: (totals[g] / len(table) if len(table) else math.nan) for g in groups}
    return share, mean


def _summarize(table: Any, arrays: dict[str, np.ndarray], groups: list[str], method: str) -> dict[str, Any]:
    valid = table[table["valid"]]
    share_all, mean_all = _shares(valid, groups)
    share_by: dict[str, dict[str, float]] = {}
    mean_by: dict[str, dict[str, float]] = {}
    for lab in sorted(int(v) for v in valid["label"].dropna().unique()):
        sub = valid[valid["label"] == lab]
        share_by[str(lab)], mean_by[str(lab)] = _shares(sub, groups)
    summary: dict[str, Any] = {
        "groups": groups,
        "n_samples": int(table["row"].nunique()),
        "n_pairs": int(len(valid)),
        "n_masked": int((~table["valid"]).sum()),
        "share": {"all": share_all, "by_label": share_by},
        "mean_abs_attribution": {"all": mean_all, "by_label": mean_by},
        "dims": {g: (1 if g == "loss" else int(arrays[g].shape[-1])) for g in groups},
    }
    if method == "integrated_gradients" and len(valid):
        d = valid["convergence_delta"].to_numpy(dtype=np.float64)
        gap = (valid["attr_total"] - (valid["p_member"] - valid["p_member_baseline"])).abs().to_numpy()
        summary["convergence_delta"] = {
            "mean_abs": float(np.nanmean(d)), "max_abs": float(np.nanmax(d)),
            "p95_abs": float(np.nanpercentile(d, 95)),
        }
        summary["completeness_max_abs_error"] = float(np.nanmax(gap))
    else:
        summary["convergence_delta"] = None
    return summary


# --------------------------------------------------------------------------------------------- graphs
_PAIR_COLUMNS = {
    "loss_attr": "ΔL (loss delta)",
    "embedding_attr_l2": "Δe (text embedding), L2 norm",
    "embedding_attr_linf": "Δe (text embedding), L∞ norm",
    "media_attr_l2": "Δm (media embedding), L2 norm",
    "media_attr_linf": "Δm (media embedding), L∞ norm",
}


def _label_groups(frame: Any, label_names: Mapping[str, str]) -> list[tuple[str, Any]]:
    labels = frame["label"]
    out = [(label_names.get(str(int(v)), str(int(v))), frame[labels == v]) for v in sorted(labels.dropna().unique())]
    if labels.isna().any():
        out.append(("unlabelled", frame[labels.isna()]))
    return out


def plot_pairs(
    table: Any, path: str | os.PathLike, *, label_names: Mapping[str, str] | None = None,
    max_points: int = 2000, seed: int = 0,
) -> Path:
    """Pair plot of the loss attribution and the L2/L∞ norms of the embedding (and media) attributions over
    valid pairs, coloured by label: step histograms on the diagonal, scatter (at most ``max_points``) below,
    2-D density contours above. Matplotlib only (no pyplot state, no seaborn). Returns the PNG path."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    frame = table[table["valid"]]
    # a group without attribution (no media branch, a head without embeddings) would be an empty row and column
    cols = [c for c in _PAIR_COLUMNS if c in frame.columns and (frame[c].fillna(0).to_numpy() != 0).any()]
    if frame.empty or not cols:
        raise ValueError("no valid (sample, neighbour) pairs to plot")
    parts = _label_groups(frame, label_names or {})
    colors = colormaps["magma"](np.linspace(0.25, 0.75, max(len(parts), 2)))
    rng = np.random.default_rng(seed)
    n = len(cols)
    legend_width = 1.6
    fig = Figure(figsize=(2.8 * n + legend_width, 2.8 * n + 0.4))
    axes = fig.subplots(n, n, squeeze=False)
    for i, yc in enumerate(cols):
        for j, xc in enumerate(cols):
            ax = axes[i, j]
            if i == j:
                values = frame[xc].to_numpy(dtype=np.float64)
                bins = np.histogram_bin_edges(values[np.isfinite(values)], bins=30)
                for (name, sub), color in zip(parts, colors):
                    ax.hist(sub[xc].to_numpy(dtype=np.float64), bins=bins, histtype="step", color=color,
                            lw=1.4, label=name)
            elif i > j:
                for (name, sub), color in zip(parts, colors):
                    if len(sub) > max_points:
                        sub = sub.iloc[rng.choice(len(sub), max_points, replace=False)]
                    ax.scatter(sub[xc], sub[yc], s=6, alpha=0.5, color=color, label=name, linewidths=0)
            else:
                _density_contours(ax, parts, colors, xc, yc)
            if i == n - 1:
                ax.set_xlabel(_PAIR_COLUMNS[xc])
            if j == 0:
                ax.set_ylabel(_PAIR_COLUMNS[yc])
            ax.tick_params(labelsize=7)
            ax.xaxis.set_major_locator(MaxNLocator(4))
            ax.ticklabel_format(style="sci", scilimits=(-2, 3), useMathText=True)
    handles, names = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, names, loc="center right", title="label", fontsize=8)
    fig.suptitle("Attribution toward P(member) of each input group, per (sample, neighbour) pair", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 - legend_width / (2.8 * n + legend_width), 0.97))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, format="png")
    return out


def _smooth(hist: np.ndarray) -> np.ndarray:
    """[1, 2, 1] binomial smoothing along both axes (a cheap KDE stand-in that never fails on degenerate data)."""
    padded = np.pad(hist, 1)
    rows = padded[:-2] + 2 * padded[1:-1] + padded[2:]
    return rows[:, :-2] + 2 * rows[:, 1:-1] + rows[:, 2:]


def _density_contours(ax: Any, parts: list[tuple[str, Any]], colors: Any, xc: str, yc: str) -> None:
    """Contours of a smoothed 2-D histogram per label (skipped for labels with too few or degenerate points)."""
    drawn = False
    for (_, sub), color in zip(parts, colors):
        x = sub[xc].to_numpy(dtype=np.float64)
        y = sub[yc].to_numpy(dtype=np.float64)
        keep = np.isfinite(x) & np.isfinite(y)
        x, y = x[keep], y[keep]
        if x.size < 10 or np.ptp(x) <= 0 or np.ptp(y) <= 0:
            continue
        hist, xe, ye = np.histogram2d(x, y, bins=24)
        hist = _smooth(hist)
        if hist.max() <= 0:
            continue
        xm, ym = (xe[:-1] + xe[1:]) / 2, (ye[:-1] + ye[1:]) / 2
        levels = hist.max() * np.array([0.1, 0.3, 0.6])
        ax.contour(xm, ym, hist.T, levels=levels, colors=[color], linewidths=1.0)
        drawn = True
    if not drawn:
        ax.set_axis_off()


def plot_shares(summary: Mapping[str, Any], path: str | os.PathLike, *, label_names: Mapping[str, str] | None = None) -> Path:
    """Bar chart of each group's share of |attribution|: all pairs and per label. Returns the PNG path."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    groups = list(summary["groups"])
    series = [("all", summary["share"]["all"])]
    series += [((label_names or {}).get(k, f"label {k}"), v) for k, v in summary["share"]["by_label"].items()]
    colors = colormaps["magma"](np.linspace(0.15, 0.8, len(series)))
    fig = Figure(figsize=(1.8 + 1.6 * len(groups) * max(1, len(series)) / 2, 4))
    ax = fig.subplots()
    width = 0.8 / len(series)
    x = np.arange(len(groups))
    for s, ((name, shares), color) in enumerate(zip(series, colors)):
        heights = [float(shares.get(g, math.nan)) for g in groups]
        bars = ax.bar(x + (s - (len(series) - 1) / 2) * width, heights, width, label=name, color=color)
        for bar, h in zip(bars, heights):
            if math.isfinite(h):
                ax.annotate(f"{h:.2f}", (bar.get_x() + bar.get_width() / 2, h), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, [f"{g} ({summary.get('dims', {}).get(g, '?')}-d)" for g in groups])
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("share of |attribution|")
    title = summary.get("method", "attribution") + (" + SmoothGrad" if summary.get("noise_tunnel") else "")
    ax.set_title(f"Feature-group shares ({title})")
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110, format="png")
    return out


# --------------------------------------------------------------------------------------------- CLI
@dataclasses.dataclass
class AttributeArguments:
    """`fimmia-hf attribute`."""

    EXAMPLE: ClassVar[str] = "fimmia-hf attribute --model detector --base base_scored --finetuned finetuned_scored"
    model: str = HfArg(help="detector folder or Hub id")
    data: str | None = HfArg(
        default=None, help="scored samples or built features (save_to_disk folder, .parquet, .json/.jsonl)")
    base: str | None = HfArg(default=None, help="paired protocol: samples scored by the base model (label 0)")
    finetuned: str | None = HfArg(default=None, help="paired protocol: the same samples scored by the fine-tuned model")
    method: str = HfArg(default="integrated_gradients", metadata={"choices": METHODS}, help="captum attribution method")
    noise_tunnel: bool = HfArg(default=False, help="wrap the method in SmoothGrad (NoiseTunnel)")
    graphs: bool = HfArg(default=True, help="write the pair plot and the share chart (PNG); --no-graphs skips them")
    n_steps: int = HfArg(default=100, help="IG integration steps")
    baseline: str = HfArg(default="zeros", metadata={"choices": BASELINES}, help="IG baseline")
    nt_samples: int = HfArg(default=250, help="noisy copies per pair")
    nt_stdev: float = HfArg(default=0.02, help="SmoothGrad noise std")
    batch_size: int = HfArg(default=64, help="samples per batch")
    max_samples: int | None = HfArg(default=None, help="attribute only the first N samples")
    device: str | None = HfArg(default=None, help="torch device, e.g. cuda:0 (default: the model's)")
    seed: int = HfArg(default=0, help="seed of the baselines and the noise")
    out: str | None = HfArg(default=None, help="output folder (default: <model folder>/attribution)")


def run_attribute(args: AttributeArguments) -> AttributionResult:
    """``fimmia-hf attribute``: writes the table, summary, arrays and graphs; prints the group shares."""
    from .training import load_protocol

    data = load_protocol(args.data, args.base, args.finetuned) if (args.base or args.finetuned) else args.data
    if data is None:
        raise ValueError("no data: give --data, or --base and --finetuned")
    if args.out is None and not Path(args.model).is_dir():
        raise ValueError(f"--model {args.model} is not a local folder: give --out for the results")
    result = attribute(
        args.model, data, method=args.method, noise_tunnel=args.noise_tunnel, n_steps=args.n_steps,
        baseline=args.baseline, out_dir=args.out, batch_size=args.batch_size, nt_samples=args.nt_samples,
        nt_stdev=args.nt_stdev, graphs=args.graphs, max_samples=args.max_samples, device=args.device, seed=args.seed,
    )
    shares = result.summary["share"]
    print("share of |attribution|: " + ", ".join(f"{g} {v:.3f}" for g, v in shares["all"].items()))
    for lab, values in shares["by_label"].items():
        print(f"  label {lab}: " + ", ".join(f"{g} {v:.3f}" for g, v in values.items()))
    delta = result.summary.get("convergence_delta")
    if delta:
        print(f"IG convergence |delta|: mean {delta['mean_abs']:.2e}, max {delta['max_abs']:.2e}")
    for name, path in result.files.items():
        print(f"{name}: {path}")
    return result


__all__ = [
    "AttributionResult",
    "AttributeArguments",
    "attribute",
    "plot_pairs",
    "plot_shares",
    "run_attribute",
]

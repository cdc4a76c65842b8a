"""`pipeline("membership-inference")`: raw samples in, P(member) out.

The pipeline chains the stages a detector was trained on (neighbours → text/media embeddings → target
losses), builds the delta features and runs the detector. Component models default to the ids recorded in the
detector's config; each may be overridden with a Hub id, a local folder, a loaded model or a ready stage object
(anything with ``.apply(ds)``). Rows that already carry a stage's columns (``neighbors``, ``embedding`` /
``neighbor_embeddings``, ``media_embedding`` / ``neighbor_media_embeddings``, ``loss`` / ``neighbor_losses``, or
the delta features ``loss_delta`` … ``neighbor_mask``) skip that stage.

Batching: ``Pipeline``'s own batching pads with a tokenizer, which a detector has not. ``__call__`` therefore runs
every stage once over the whole input (the stages batch internally) and then runs the detector in chunks of
``batch_size`` rows; ``preprocess`` collates a *list* of rows.

Remote code: this file is importable without ``fimmia_hf`` (top-level imports are torch and transformers only),
but scoring needs the package's stages and feature builder, which are imported lazily; without the package a
clear ``ImportError`` says so. Saved detectors therefore carry only ``configuration_fimmia.py`` and
``modeling_fimmia.py`` as remote code (``AutoModelForSequenceClassification.from_pretrained(...,
trust_remote_code=True)`` works anywhere), and no ``custom_pipelines`` entry: that entry would make transformers
demand ``trust_remote_code=True`` even where ``fimmia_hf`` is installed and has registered the task.
"""

import importlib
import math
import os
import shutil
import tempfile
import warnings
import weakref
from collections.abc import Iterable, Mapping
from typing import Any

from transformers import Pipeline

LOSS_OUTPUTS = ("loss", "neighbor_losses")
EMBEDDING_OUTPUTS = ("embedding", "neighbor_embeddings")
MEDIA_EMBEDDING_OUTPUTS = ("media_embedding", "neighbor_media_embeddings")
DELTA_OUTPUTS = ("loss_delta", "embedding_delta", "media_delta", "neighbor_mask")
MEDIA_KEYS = ("image", "audio", "video")
# what a sample dict may hold: the sample's own fields, then any stage's output (precomputed columns)
SAMPLE_KEYS = ("input", "answer", "ds_name", "sample_id", "label", *MEDIA_KEYS)
STAGE_KEYS = (
    "neighbors", "neighbor_ops", "media_neighbors", "num_neighbors", *EMBEDDING_OUTPUTS, *MEDIA_EMBEDDING_OUTPUTS,
    *LOSS_OUTPUTS, *DELTA_OUTPUTS, "sample_statistics", "model_name", "model_role", "error",
)
STAGE_KEY_PREFIXES = ("token_", "neighbor_token_")  # the scorer's per-token statistics
DEFAULT_FPR = "0.01"  # the decision_thresholds level labels use unless told otherwise
_FREE_OPS = ("delete", "duplicate", "swap")  # neighbour operations that need no fill model
_OPTIONS = {"target": "target_model", "embedding": "embedding_model", "media_embedding": "media_embedding_model"}
_SETTINGS = {"neighbor": "neighbor_kwargs", "embedding": "embedding_kwargs", "media_embedding": "media_embedding_kwargs",
             "target": "scorer_kwargs"}  # config fields holding each stage's training-time settings


def _fimmia(module: str) -> Any:
    """Import ``fimmia_hf.<module>`` on first use, with an actionable message where the package is absent."""
    try:
        return importlib.import_module(f"fimmia_hf.{module}")
    except ImportError as err:
        raise ImportError(
            f"the membership-inference pipeline needs the fimmia-hf package (missing fimmia_hf.{module}: {err}); "
            "install it with `pip install fimmia-hf`. Without it, the detector weights alone load with "
            "AutoModelForSequenceClassification.from_pretrained(..., trust_remote_code=True)."
        ) from err


def _has(row: Mapping[str, Any], columns: Iterable[str]) -> bool:
    return all(row.get(c) is not None for c in columns)


class MembershipInferencePipeline(Pipeline):
    """Membership inference with a FiMMIA detector.

    ``pipeline("membership-inference", model=<detector dir or Hub id>, target_model=..., neighbor_model=...,
    embedding_model=..., media_embedding_model=..., device=...)``; then ``pipe(sample)`` with a sample dict
    (``{"input", "answer", "image"|"audio"|"video": path, PIL image, array...}``), a list of them or a
    ``datasets.Dataset``; an unknown key, or no media value where the detector's ``config.modality`` needs one,
    is an error. Each sample gives ``{"score": float, "label": "member" | "non-member"}`` (``label`` is
    None and ``score`` NaN when no neighbour of the sample was valid); ``return_features=True`` adds
    ``"features"``. Call options: ``fpr`` (default 0.01: label with the threshold training calibrated at that
    false-positive rate, ``config.decision_thresholds``; a detector without them falls back to ``config.threshold``,
    with a warning), ``threshold`` (an explicit score threshold instead; score > threshold ⇒ member),
    ``return_features``, ``batch_size``.

    Extra constructor options: ``target_processor``; ``num_neighbors`` (default: the config's K);
    ``neighbor_kwargs``, ``embedding_kwargs``, ``media_embedding_kwargs``, ``scorer_kwargs`` (passed to the stage
    constructors, over the settings of the same names stored in the detector's config at training);
    ``cache_dir`` (stage cache; default a temporary folder that lives as long as the pipeline).
    """

    _load_processor = False
    _load_image_processor = False
    _load_video_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False

    def __init__(
        self,
        model: Any,
        *args: Any,
        target_model: Any = None,
        target_processor: Any = None,
        neighbor_model: Any = None,
        embedding_model: Any = None,
        media_embedding_model: Any = None,
        num_neighbors: int | None = None,
        neighbor_kwargs: dict[str, Any] | None = None,
        embedding_kwargs: dict[str, Any] | None = None,
        media_embedding_kwargs: dict[str, Any] | None = None,
        scorer_kwargs: dict[str, Any] | None = None,
        cache_dir: str | os.PathLike | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, *args, **kwargs)
        cfg = self.model.config
        self.components: dict[str, Any] = {
            "target": target_model if target_model is not None else getattr(cfg, "target_model", None),
            "neighbor": neighbor_model if neighbor_model is not None else getattr(cfg, "neighbor_model", None),
            "embedding": embedding_model if embedding_model is not None else getattr(cfg, "embedding_model", None),
            "media_embedding": media_embedding_model
            if media_embedding_model is not None
            else getattr(cfg, "media_embedding_model", None),
        }
        self.target_processor = target_processor
        self.num_neighbors = int(num_neighbors or getattr(cfg, "num_neighbors", None) or 24)
        given = {"neighbor": neighbor_kwargs, "embedding": embedding_kwargs,
                 "media_embedding": media_embedding_kwargs, "target": scorer_kwargs}
        # the settings the detector was trained with, overridden by the caller's
        self.stage_kwargs = {
            role: {**(getattr(cfg, _SETTINGS[role], None) or {}), **(kwargs or {})} for role, kwargs in given.items()
        }
        if cache_dir is None:
            cache_dir = tempfile.mkdtemp(prefix="fimmia-pipeline-")
            weakref.finalize(self, shutil.rmtree, cache_dir, True)
        self.cache_dir = os.fspath(cache_dir)
        self._stages: dict[str, Any] = {}
        if DEFAULT_FPR not in (getattr(cfg, "decision_thresholds", None) or {}):
            warnings.warn(
                f"this detector has no decision threshold calibrated at FPR {DEFAULT_FPR} (e.g. it was trained without a "
                f"validation split): labels use score > {cfg.threshold} (config.threshold), which bounds no "
                "false-positive rate",
                UserWarning, stacklevel=2,
            )

    # ------------------------------------------------------------------ parameters
    def _sanitize_parameters(
        self, threshold: float | None = None, fpr: float | None = None, return_features: bool | None = None,
        **kwargs: Any,
    ) -> tuple[dict, dict, dict]:
        if kwargs:
            raise TypeError(f"unexpected membership-inference arguments: {sorted(kwargs)}")
        postprocess: dict[str, Any] = {}
        if threshold is not None and fpr is not None:
            raise ValueError("give either threshold= (a score) or fpr= (a calibrated false-positive rate), not both")
        if threshold is not None:
            if not 0.0 <= float(threshold) <= 1.0:
                raise ValueError(f"threshold must be in [0, 1], got {threshold}")
            postprocess["threshold"] = float(threshold)
        if fpr is not None:
            postprocess["threshold"] = self._calibrated_threshold(fpr)
        if return_features is not None:
            postprocess["return_features"] = bool(return_features)
        return {}, {}, postprocess

    def _calibrated_threshold(self, fpr: float) -> float:
        """The threshold training calibrated at false-positive rate ``fpr`` on its validation split."""
        thresholds = getattr(self.model.config, "decision_thresholds", None) or {}
        key = _fimmia("configuration_fimmia").fpr_key(fpr)
        if key not in thresholds:
            known = ", ".join(sorted(thresholds)) or "none (trained without a validation split)"
            raise ValueError(f"this detector has no threshold calibrated at fpr={key}; calibrated levels: {known}")
        return float(thresholds[key])

    def _default_threshold(self) -> float:
        """FPR 1 % where training calibrated it, else the config's fallback threshold."""
        cfg = self.model.config
        if DEFAULT_FPR in (getattr(cfg, "decision_thresholds", None) or {}):
            return float(cfg.decision_thresholds[DEFAULT_FPR])
        return float(cfg.threshold)

    # ------------------------------------------------------------------ stages
    def _stage(self, role: str) -> Any:
        """The stage object for ``role`` (built once; a component that already has ``.apply`` is used as is)."""
        if role in self._stages:
            return self._stages[role]
        spec = self.components[role]
        kwargs = dict(self.stage_kwargs[role])
        if isinstance(spec, (str, os.PathLike)):  # the stage loads it: on the pipeline's device, at its revision
            spec, revision = _fimmia("configuration_fimmia").split_reference(os.fspath(spec))
            if revision:
                kwargs.setdefault("revision", revision)
            kwargs.setdefault("device", str(self.device))
        if spec is not None and hasattr(spec, "apply"):
            stage = spec
        elif role == "neighbor":
            kwargs.setdefault("num_neighbors", self.num_neighbors)
            if spec is None:
                kwargs.setdefault("ops", _FREE_OPS)
            stage = _fimmia("neighbors").NeighborGenerator(spec, **kwargs)
        else:
            if spec is None:
                raise ValueError(f"no {_OPTIONS[role]} for this detector")  # _prepare checks this up front
            if role == "target":
                if self.target_processor is not None:
                    kwargs.setdefault("processor", self.target_processor)
                kwargs.setdefault("token_stats", self.model.config.uses_statistics)  # per-token lists: combined only
                stage = _fimmia("scoring").TargetScorer(spec, **kwargs)
            elif role == "embedding":
                stage = _fimmia("embeddings").TextEmbedder(spec, **kwargs)
            else:
                stage = _fimmia("embeddings").ModalityEmbedder(spec, **kwargs)
        self._stages[role] = stage
        return stage

    def _needed(self, row: Mapping[str, Any]) -> list[str]:
        """The stages a row still needs, in order, given the detector's head."""
        cfg = self.model.config
        has_deltas = _has(row, ("neighbor_mask",))
        roles = []
        if not has_deltas:
            if cfg.uses_embeddings and not _has(row, EMBEDDING_OUTPUTS):
                roles.append("embedding")
            if cfg.uses_media and not _has(row, MEDIA_EMBEDDING_OUTPUTS):
                roles.append("media_embedding")
            if cfg.uses_loss and not _has(row, LOSS_OUTPUTS):
                roles.append("target")
        if cfg.uses_statistics and "target" not in roles and not self._has_statistics(row):
            roles.append("target")  # the scorer's per-token lists
        if ("embedding" in roles or "target" in roles) and not has_deltas and not _has(row, ("neighbors",)):
            roles.insert(0, "neighbor")
        return roles

    def _check_sample(self, i: int, row: Mapping[str, Any]) -> None:
        """A sample to score has its input, answer and the media the detector reads, and no unknown key.

        A misspelt key (``"imgae"``) would otherwise be dropped and the sample scored as text-only.
        """
        given = ", ".join(sorted(row))
        unknown = [k for k in row if k not in SAMPLE_KEYS + STAGE_KEYS and not k.startswith(STAGE_KEY_PREFIXES)]
        if unknown:
            raise ValueError(
                f"sample {i}: unknown key(s) {', '.join(map(repr, unknown))} (keys given: {given}); a sample holds "
                f"{', '.join(SAMPLE_KEYS)} and the columns of earlier stages"
            )
        missing = [c for c in ("input", "answer") if row.get(c) is None]
        if missing:
            raise ValueError(
                f"sample {i}: needs {' and '.join(map(repr, missing))} to be scored "
                f"(or precomputed feature columns); keys given: {given}"
            )
        modality = getattr(self.model.config, "modality", None)
        if modality in MEDIA_KEYS and row.get(modality) is None:
            raise ValueError(f"sample {i}: this detector scores {modality} samples, and this one has no "
                             f"{modality!r} value (keys given: {given})")

    def _has_statistics(self, row: Mapping[str, Any]) -> bool:
        """Whether the row holds the columns of every sample statistic the combined head reads."""
        present = [k for k, v in row.items() if v is not None]
        return set(self.model.config.sample_statistics) <= set(_fimmia("features").computable_statistics(present))

    def _run_stage(self, role: str, rows: list[dict[str, Any]], indices: list[int]) -> None:
        """Apply one stage to the rows at ``indices`` (one `datasets.map` over all of them) and copy its columns
        back into those rows."""
        import datasets

        subset = [rows[i] for i in indices]
        keys = list(dict.fromkeys(k for r in subset for k in r))
        ds = datasets.Dataset.from_dict({k: [r.get(k) for r in subset] for k in keys})
        stage = self._stage(role)
        cache = os.path.join(self.cache_dir, role)
        try:
            out = stage.apply(ds, cache_dir=cache)
        except TypeError as err:  # a user-supplied stage without a cache_dir option
            if "cache_dir" not in str(err):
                raise
            out = stage.apply(ds)
        if len(out) != len(subset):
            raise ValueError(f"the {role} stage returned {len(out)} rows for {len(subset)} samples")
        new = [c for c in out.column_names if c not in keys or all(r.get(c) is None for r in subset)]
        values = out.select_columns(new).to_list() if new else [{}] * len(subset)
        for i, value in zip(indices, values):
            rows[i].update(value)

    def _prepare(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Validate raw rows (sample ids, media) and run every missing stage once over all rows needing it."""
        needs = [self._needed(r) for r in rows]
        raw = [i for i, n in enumerate(needs) if n]
        if not raw:
            return rows
        for i in raw:
            self._check_sample(i, rows[i])
        roles = {role for n in needs for role in n}
        missing = [_OPTIONS[r] for r in _OPTIONS if r in roles and self.components[r] is None]
        if missing:
            raise ValueError(
                "these samples need model stages whose models the detector's config does not record: pass "
                + ", ".join(f"{m}=..." for m in missing) + " to pipeline() (or give rows with the feature columns)"
            )
        import datasets

        data = _fimmia("data")
        subset = [rows[i] for i in raw]
        keys = list(dict.fromkeys(k for r in subset for k in r))
        loaded = data.load_samples(
            datasets.Dataset.from_dict({k: [r.get(k) for r in subset] for k in keys}),
            modality=getattr(self.model.config, "modality", None) if any(m in keys for m in MEDIA_KEYS) else None,
        )
        fresh = [c for c in loaded.column_names if c not in MEDIA_KEYS]
        for i, value in zip(raw, loaded.select_columns(fresh).to_list()):
            rows[i].update({k: v for k, v in value.items() if rows[i].get(k) is None or k in ("input", "answer")})
        for role in ("neighbor", "embedding", "media_embedding", "target"):
            todo = [i for i, n in enumerate(needs) if role in n]
            if todo:
                self._run_stage(role, rows, todo)
        return rows

    # ------------------------------------------------------------------ Pipeline contract
    def preprocess(self, inputs: list[Mapping[str, Any]], **_: Any) -> dict[str, Any]:
        """Collate rows that carry stage columns (or delta features) into detector tensors."""
        if isinstance(inputs, Mapping):
            inputs = [inputs]
        collator = _fimmia("features").FiMMIADataCollator.from_config(self.model.config)
        batch = collator([{k: v for k, v in r.items() if k != "label"} for r in inputs])
        batch.pop("labels", None)
        return batch

    def _forward(self, model_inputs: dict[str, Any], **_: Any) -> dict[str, Any]:
        return {"scores": self.model(**model_inputs, return_dict=True).scores}

    def postprocess(
        self, model_outputs: dict[str, Any], threshold: float | None = None, **_: Any
    ) -> list[dict[str, Any]]:
        threshold = self._default_threshold() if threshold is None else float(threshold)
        results = []
        for score in model_outputs["scores"].float().tolist():
            if math.isnan(score):
                results.append({"score": score, "label": None})
            else:
                results.append({"score": score, "label": "member" if score > threshold else "non-member"})
        return results

    def __call__(self, inputs: Any, *args: Any, batch_size: int | None = None, **kwargs: Any) -> Any:
        """Score one sample dict, a list/iterable of them, or a ``datasets.Dataset`` (returns a list)."""
        if args:
            raise TypeError("pass one sample dict, a list of them or a datasets.Dataset")
        single = isinstance(inputs, Mapping)
        rows = [dict(inputs)] if single else [dict(r) for r in inputs]
        if not all(isinstance(r, dict) for r in rows):
            raise TypeError("each sample must be a dict like {'input': ..., 'answer': ..., 'image': ...}")
        preprocess_params, forward_params, postprocess_params = self._sanitize_parameters(**kwargs)
        preprocess_params = {**self._preprocess_params, **preprocess_params}
        forward_params = {**self._forward_params, **forward_params}
        postprocess_params = {**self._postprocess_params, **postprocess_params}
        return_features = postprocess_params.pop("return_features", False)
        size = int(batch_size or self._batch_size or 64)
        if size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")

        rows, where = self._unique(rows)
        rows = self._prepare(rows)
        results: list[dict[str, Any]] = []
        for start in range(0, len(rows), size):
            chunk = rows[start : start + size]
            outputs = self.forward(self.preprocess(chunk, **preprocess_params), **forward_params)
            results.extend(self.postprocess(outputs, **postprocess_params))
        if return_features:
            for result, row in zip(results, rows):
                result["features"] = self._features(row)
        results = [dict(results[i]) for i in where]
        return results[0] if single else results

    @staticmethod
    def _unique(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[int]]:
        """The distinct samples among ``rows`` (same text, answer, media bytes, ds_name and sample_id: one sample,
        scored once) and, for each row, the index of its sample, so every result comes back in place."""
        digest = _fimmia("stage").media_digest
        keys: dict[Any, int] = {}
        unique, where = [], []
        for row in rows:
            if row.get("input") is None:  # rows of ready features are never merged
                key: Any = len(where)
            else:
                media = next((row[k] for k in MEDIA_KEYS if row.get(k) is not None), None)
                key = (row.get("sample_id"), row.get("ds_name"), row["input"], row.get("answer"), digest(media))
            if key not in keys:
                keys[key] = len(unique)
                unique.append(row)
            where.append(keys[key])
        return unique, where

    def _features(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """Stage columns of a row plus its delta features (and the combined head's statistics), as plain lists."""
        cfg = self.model.config
        features = _fimmia("features")
        keep = ("sample_id", "neighbors", "neighbor_ops", *LOSS_OUTPUTS, *EMBEDDING_OUTPUTS, *MEDIA_EMBEDDING_OUTPUTS)
        out = {k: row[k] for k in keep if row.get(k) is not None}
        deltas = features.sample_features(
            row, use_loss=cfg.uses_loss, use_embeddings=cfg.uses_embeddings, use_media=cfg.uses_media
        )
        out.update({k: v.tolist() for k, v in deltas.items()})
        if cfg.uses_statistics:
            values = features.sample_statistics(row, cfg.sample_statistics)
            out["sample_statistics"] = dict(zip(cfg.sample_statistics, values.tolist()))
        return out

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Save the detector only: no ``custom_pipelines`` entry (see the module docstring for why)."""
        self.model.save_pretrained(save_directory, **kwargs)


__all__ = ["MembershipInferencePipeline"]

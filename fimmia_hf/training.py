"""Train the FiMMIA detector with `transformers.Trainer` and score datasets with it.

`train_detector` takes scored datasets as the stages produce them (features are built in the collator, so
nothing is duplicated on disk), fits the ΔL normalisation (and the combined head's statistics) on the training
split only, keeps the checkpoint with the best validation AUC, calibrates decision thresholds by false-positive
rate on the validation split, records what the model card needs in ``config.card_data`` and saves the model. It
runs unchanged under ``accelerate launch`` (Trainer handles the processes).

CLI entry points (wired into ``fimmia-hf train`` / ``fimmia-hf predict``): ``TrainArguments`` + ``run_train``
and ``PredictArguments`` + ``run_predict``, parsed by ``fimmia_hf.cli`` (the command line wins over ``--config``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from transformers.hf_argparser import HfArg

from .configuration_fimmia import STAGE_SETTINGS, FiMMIAConfig, fpr_key
from .features import (
    EMBEDDING_COLUMNS,
    LOSS_COLUMNS,
    MEDIA_COLUMNS,
    STATISTICS_COLUMN,
    FiMMIADataCollator,
    detector_columns,
    fit_normalization,
    fit_statistics,
    membership_dataset,
    paired_dataset,
    with_statistics,
)

logger = logging.getLogger(__name__)

CONFIG_METADATA = ("target_model", "neighbor_model", "embedding_model", "media_embedding_model", "modality", *STAGE_SETTINGS)


# --------------------------------------------------------------------------------------------- data loading
def load_scored(source: Any) -> Any:
    """A scored `datasets.Dataset` from a Dataset, a list of them, a `save_to_disk` folder or a table file."""
    import datasets

    from .data import read_table

    if isinstance(source, datasets.Dataset):
        return source
    if isinstance(source, datasets.DatasetDict):
        raise ValueError(f"got a DatasetDict with splits {list(source)}; pass one split, e.g. ds['train']")
    if isinstance(source, (list, tuple)):
        return datasets.concatenate_datasets([load_scored(s) for s in source])
    return read_table(source)


def _first_dim(ds: Any, column: str) -> int:
    for value in ds.select_columns([column]).select(range(min(len(ds), 64)))[column]:
        if value is not None:
            return len(value)
    raise ValueError(f"column {column!r} is null in the first rows; cannot tell the embedding dimension")


def _neighbor_counts(ds: Any) -> list[int]:
    """Neighbours per row, read as Arrow list lengths (no embedding is copied into Python)."""
    import pyarrow.compute as pc

    for col in ("neighbor_losses", "neighbor_embeddings", "neighbor_mask"):
        if col in ds.column_names:
            lengths = pc.list_value_length(ds.select_columns([col]).with_format("arrow")[col]).fill_null(0)
            return lengths.to_pylist()
    raise ValueError(f"no neighbour column in dataset (columns: {ds.column_names})")


def _requested(config: FiMMIAConfig | dict | None, key: str) -> Any:
    """A setting as the caller gave it (None when not given)."""
    if isinstance(config, FiMMIAConfig):
        return getattr(config, key)
    return config.get(key) if isinstance(config, dict) else None


def _infer_config(train: Any, config: FiMMIAConfig | dict | None) -> FiMMIAConfig:
    """Sizes from the data, the rest from ``config``; mismatches between the two are errors."""
    cols = train.column_names
    inferred: dict[str, Any] = {}
    if all(c in cols for c in EMBEDDING_COLUMNS):
        inferred["embedding_dim"] = _first_dim(train, "embedding")
    elif "embedding_delta" in cols:
        inferred["embedding_dim"] = len(next(r for r in train[0]["embedding_delta"] if r is not None))
    if all(c in cols for c in MEDIA_COLUMNS):
        inferred["media_embedding_dim"] = _first_dim(train, "media_embedding")
    elif "media_delta" in cols:
        inferred["media_embedding_dim"] = len(next(r for r in train[0]["media_delta"] if r is not None))
    head = _requested(config, "head") or "fimmia"
    if "embedding_dim" not in inferred and head != "loss_only":
        raise ValueError(f"training data has no text embeddings {EMBEDDING_COLUMNS}; columns are {cols}")
    inferred["num_neighbors"] = max(_neighbor_counts(train))
    inferred["protocol"] = "paired" if "model_role" in cols else "member"
    # statistics of the training split always win over values given in the config
    fitted = fit_statistics(train, _requested(config, "sample_statistics")) if head == "combined" else {}

    if config is None:
        return FiMMIAConfig(**inferred)
    if isinstance(config, dict):
        merged = {**inferred, **{k: v for k, v in config.items() if v is not None or k not in inferred}, **fitted}
        cfg = FiMMIAConfig(**merged)
    elif isinstance(config, FiMMIAConfig):
        cfg = FiMMIAConfig.from_dict(config.to_dict())
        cfg.num_neighbors = inferred["num_neighbors"]
        cfg.protocol = cfg.protocol or inferred["protocol"]
        cfg.set_normalization(fitted)
    else:
        raise TypeError(f"config must be a FiMMIAConfig, a dict or None, not {type(config).__name__}")
    for key in ("embedding_dim", "media_embedding_dim"):
        used = cfg.uses_embeddings if key == "embedding_dim" else cfg.uses_media
        if used and key in inferred and getattr(cfg, key) != inferred[key]:
            raise ValueError(f"config.{key}={getattr(cfg, key)} but the training data has {inferred[key]}")
    if cfg.uses_media and "media_embedding_dim" not in inferred:
        raise ValueError(
            f"config asks for a media branch (media_embedding_dim={cfg.media_embedding_dim}) but the data has no "
            f"{MEDIA_COLUMNS}; set media_embedding_dim=0 when the media is not perturbed"
        )
    if cfg.uses_loss and not (all(c in cols for c in LOSS_COLUMNS) or "loss_delta" in cols):
        raise ValueError(f"head {cfg.head!r} needs target-model losses {LOSS_COLUMNS}; columns are {cols}")
    return cfg


def _store_template(cfg: FiMMIAConfig, train: Any) -> None:
    """With ``protect_template`` in ``neighbor_kwargs`` (and no ``template``), store the template lines of the
    training split there, found by the neighbour stage's rule (its share and truncation), so the pipeline
    protects the same lines in every call: found from the call's samples instead, a sample scored alone would
    have none. From the training split because the scored table does not keep the stage's survey; at a share
    of 0.5 a random part of the data finds the same lines as the whole."""
    from .columns import DS_NAME, INPUT, SAMPLE_ID
    from .neighbors.generator import DEFAULT_MAX_TEXT_LEN
    from .neighbors.template import template_lines, template_share
    from .neighbors.words import truncate_tail

    kwargs = cfg.neighbor_kwargs or {}
    share = template_share(kwargs.get("protect_template", False))
    if share is None or kwargs.get("template") is not None:
        return
    column = kwargs.get("column", INPUT)
    if column not in train.column_names:
        raise ValueError(
            f"neighbor_kwargs asks for protect_template but the training data has no {column!r} column to find "
            f"the template lines in (columns: {', '.join(train.column_names)}); give them as "
            f"neighbor_kwargs['template'] = {{ds_name: [line, ...]}}"
        )
    names = train.column_names
    ids = train[SAMPLE_ID] if SAMPLE_ID in names else range(len(train))
    rows = list({sid: i for i, sid in enumerate(ids)}.values())  # one per sample (paired data holds two)
    texts, groups = train[column], train[DS_NAME] if DS_NAME in names else [""] * len(train)
    max_len = kwargs.get("max_text_len", DEFAULT_MAX_TEXT_LEN)
    found = template_lines([truncate_tail(texts[i] or "", max_len) for i in rows], [groups[i] for i in rows], share)
    cfg.neighbor_kwargs = {**kwargs, "template": {group: sorted(lines) for group, lines in found.items()}}


def _data_summary(ds: Any) -> dict[str, Any]:
    labels = np.asarray(ds["label"])
    counts = _neighbor_counts(ds)
    summary: dict[str, Any] = {
        "n_rows": len(ds),
        "n_members": int((labels == 1).sum()),
        "n_nonmembers": int((labels == 0).sum()),
        "neighbors_per_sample": {"min": int(min(counts)), "max": int(max(counts)), "mean": float(np.mean(counts))},
    }
    if "sample_id" in ds.column_names:
        summary["n_samples"] = len(set(ds["sample_id"]))
    if "ds_name" in ds.column_names:
        names, n = np.unique(np.asarray(ds["ds_name"], dtype=str), return_counts=True)
        summary["ds_names"] = {str(a): int(b) for a, b in zip(names, n)}
    return summary


# --------------------------------------------------------------------------------------------- decision thresholds
CALIBRATION_FPRS = (0.01, 0.05)
NOT_CALIBRATED = (
    "no validation split: decision thresholds were not calibrated, so labels fall back to score > config.threshold, "
    "which bounds no false-positive rate; pass eval data (or --eval / --eval-size) to calibrate them"
)


def threshold_at_fpr(nonmember_scores: Any, fpr: float) -> float:
    """The smallest threshold t whose false-positive rate #{s > t} / n on these non-member scores is at most
    ``fpr`` (score > t ⇒ member): the (⌊fpr·n⌋ + 1)-th highest score."""
    scores = np.sort(np.asarray(nonmember_scores, dtype=np.float64))[::-1]
    if scores.size == 0:
        raise ValueError("no non-member scores to calibrate a threshold on")
    allowed = int(np.floor(fpr * scores.size + 1e-9))  # false positives allowed; 1e-9 keeps 0.05 * 100 at 5
    return float(scores[min(allowed, scores.size - 1)])


def calibrate_thresholds(labels: Any, scores: Any, fprs: tuple[float, ...] = CALIBRATION_FPRS) -> tuple[dict | None, dict]:
    """Thresholds at each FPR level from a calibration split (samples without a score are left out): returns
    ``({"0.01": t, ...}, record)``, the record holding what the model card reports (the FPR and TPR each threshold
    gives on the split, and a note where too few non-members resolve a level). ``None`` when no non-member has a
    score."""
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    keep = np.isfinite(scores)
    members, nonmembers = scores[keep & (labels == 1)], scores[keep & (labels == 0)]
    record: dict[str, Any] = {"split": "validation", "n_members": int(members.size), "n_nonmembers": int(nonmembers.size),
                              "levels": {}, "notes": []}
    if nonmembers.size == 0:
        record["notes"].append("no validation non-member has a score: thresholds were not calibrated")
        return None, record
    thresholds = {}
    for fpr in fprs:
        key = fpr_key(fpr)
        thresholds[key] = t = threshold_at_fpr(nonmembers, fpr)
        record["levels"][key] = {"threshold": t, "fpr": float((nonmembers > t).mean()),
                                 "tpr": float((members > t).mean()) if members.size else None}
        if fpr * nonmembers.size < 1:
            record["notes"].append(
                f"{nonmembers.size} validation non-members cannot resolve FPR {key} (that needs at least "
                f"{math.ceil(1 / fpr)}): its threshold is the highest non-member score, so expect an FPR near "
                f"1/(n+1) = {1 / (nonmembers.size + 1):.3f} on new samples"
            )
    return thresholds, record


# --------------------------------------------------------------------------------------------- Trainer parts
def _scores_only(outputs: Any, labels: Any) -> Any:
    """Keep only the per-sample scores for evaluation (the per-neighbour logits are not needed and their K
    may differ between batches)."""
    if isinstance(outputs, (tuple, list)):
        return next(t for t in outputs if t.dim() == 1)
    return outputs


def _compute_metrics(eval_pred: Any) -> dict[str, float]:
    from .metrics import membership_metrics

    scores = np.asarray(eval_pred.predictions, dtype=np.float64).reshape(-1)
    labels = np.asarray(eval_pred.label_ids).reshape(-1)
    keep = np.isfinite(scores)
    result = membership_metrics(labels[keep], scores[keep], n_bootstrap=0)
    out = {k: v for k, v in result.items() if isinstance(v, float)}
    out["accuracy"] = float(((scores[keep] > 0.5) == (labels[keep] == 1)).mean())
    return out


def _make_card_callback(summary: dict[str, Any]) -> Any:
    from transformers import TrainerCallback

    class ModelCardCallback(TrainerCallback):
        """Records what a model card needs (data, K, component models, metrics) in ``config.card_data``, which
        is saved with the model."""

        def __init__(self) -> None:
            self.card: dict[str, Any] = dict(summary)

        def _write(self, model: Any) -> None:
            if model is not None:
                model.config.card_data = json.loads(json.dumps(self.card, default=float))

        def on_train_begin(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
            self.card["training_args"] = {
                k: getattr(args, k) for k in (
                    "num_train_epochs", "learning_rate", "per_device_train_batch_size", "seed", "optim",
                    "lr_scheduler_type", "weight_decay",
                )
            }
            self.card["training_args"]["world_size"] = args.world_size
            self._started = time.perf_counter()
            self._write(model)

        def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):  # noqa: ANN001
            if metrics:
                skip = ("runtime", "samples_per_second", "steps_per_second")
                self.card["eval_metrics"] = {
                    k.removeprefix("eval_"): float(v) for k, v in metrics.items()
                    if isinstance(v, (int, float)) and not k.endswith(skip)
                }
                self._write(model)

        def on_train_end(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
            self.card["train_runtime_s"] = round(time.perf_counter() - getattr(self, "_started", time.perf_counter()), 3)
            self.card["global_step"] = state.global_step
            self.card["epochs"] = state.epoch
            if state.best_metric is not None:
                self.card["best_eval_auc"] = float(state.best_metric)
                self.card["best_checkpoint_step"] = (
                    int(state.best_model_checkpoint.rsplit("-", 1)[-1]) if state.best_model_checkpoint else None
                )
            self._write(model)

    return ModelCardCallback()


def _logistic_fit(x: np.ndarray, y: np.ndarray, groups: np.ndarray, seed: int) -> Any:
    """L2 logistic regression, its strength chosen by grouped, stratified cross-validated log-loss."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedGroupKFold
    from threadpoolctl import threadpool_limits

    folds = min(5, int(np.bincount(y, minlength=2).min()))
    with threadpool_limits(limits=1):  # tiny problems: threads only contend (a fit took 170 ms with them, 15 without)
        if folds < 2:
            return LogisticRegression(C=1.0, max_iter=1000).fit(x, y)
        cv = list(StratifiedGroupKFold(folds, shuffle=True, random_state=seed).split(x, y, groups))
        search = GridSearchCV(LogisticRegression(max_iter=1000), {"C": np.logspace(-3, 2, 11)}, cv=cv,
                              scoring="neg_log_loss")
        return search.fit(x, y).best_estimator_


def _fit_direct_path(model: Any, train: Any, seed: int) -> float:
    """Set the combined head's direct path to the logistic regression of the training split on the normalised
    statistics, freeze it, and zero the MLP's output layer, so training starts from the best linear combination of
    the classic attacks and the MLP only learns what the deltas add. (Adam's first steps move every weight by about
    the learning rate whatever its gradient, so 80 steps on 64 samples give a noisy statistic as much weight as the
    strong one; a regularised fit does not.) Returns the regularisation strength C chosen."""
    import torch

    cfg = model.config
    x = np.asarray(train[STATISTICS_COLUMN], dtype=np.float64)
    y = np.asarray(train["label"], dtype=int)
    groups = np.asarray(train["sample_id"]) if "sample_id" in train.column_names else np.arange(len(y))
    keep = np.isfinite(x).all(axis=1)
    x = (x[keep] - np.asarray(cfg.sample_statistics_mean)) / np.asarray(cfg.sample_statistics_std)
    fit = _logistic_fit(x, y[keep], groups[keep], seed)
    half = torch.as_tensor(fit.coef_[0] / 2, dtype=model.statistics_logits.weight.dtype)
    bias = float(fit.intercept_[0]) / 2
    with torch.no_grad():  # P(member) = sigmoid(logit_1 - logit_0): split the fit evenly between the two
        model.statistics_logits.weight.copy_(torch.stack([-half, half]))
        model.statistics_logits.bias.copy_(torch.tensor([-bias, bias]))
        model.attack_encoding[-1].weight.zero_()
        model.attack_encoding[-1].bias.zero_()
    model.statistics_logits.requires_grad_(False)
    return float(fit.C)


def train_detector(
    train: Any,
    eval: Any | None = None,  # noqa: A002 - public contract name
    *,
    config: FiMMIAConfig | dict | None = None,
    output_dir: str | os.PathLike,
    seed: int = 0,
    **training_args: Any,
) -> Any:
    """Train a :class:`FiMMIAForMembershipInference` on scored samples and save it to ``output_dir``.

    ``train`` / ``eval``: scored datasets with a 0/1 ``label`` (from :func:`fimmia_hf.features.paired_dataset`
    or member/non-member tables), or paths to them; split by sample beforehand. ``config``: a FiMMIAConfig or a
    dict of its fields (sizes are inferred from the data). ``training_args`` override the defaults given to
    `transformers.TrainingArguments` (10 epochs, AdamW lr 1e-3, 16 samples per device and step).
    With ``eval``, the checkpoint with the best validation AUC is kept and score thresholds at 1 % and 5 % FPR are
    calibrated on it (``config.decision_thresholds``, see :func:`calibrate_thresholds`); without, none are.
    The ``combined`` head fits its statistics' normalisation and its direct path on ``train`` first. Returns the
    trained model.
    """
    import torch
    import transformers
    from transformers import Trainer, TrainingArguments

    from .modeling_fimmia import FiMMIAForMembershipInference

    train = membership_dataset(load_scored(train))
    eval_ds = membership_dataset(load_scored(eval)) if eval is not None else None
    if eval_ds is not None:
        eval_labels = set(eval_ds["label"])
        if eval_labels != {0, 1}:
            raise ValueError(f"eval data must contain members and non-members (labels found: {sorted(eval_labels)})")
    if set(train["label"]) != {0, 1}:
        raise ValueError("training data must contain members (label 1) and non-members (label 0)")
    cfg = _infer_config(train, config)
    _store_template(cfg, train)
    if cfg.uses_loss and cfg.loss_norm in ("std", "minmax"):
        cfg.set_normalization(fit_normalization(train))
    summary = {
        "protocol": cfg.protocol,
        "head": cfg.head,
        "num_neighbors": cfg.num_neighbors,
        "train_data": _data_summary(train),
        "eval_data": _data_summary(eval_ds) if eval_ds is not None else None,
        "components": {k: getattr(cfg, k) for k in CONFIG_METADATA},
        "normalization": {k: getattr(cfg, k) for k in ("loss_norm", "loss_mean", "loss_std", "loss_min", "loss_max")},
    }

    transformers.set_seed(seed)
    model = FiMMIAForMembershipInference(cfg)
    if cfg.uses_statistics:
        train = with_statistics(train, cfg.sample_statistics)
        eval_ds = with_statistics(eval_ds, cfg.sample_statistics) if eval_ds is not None else None
        summary["statistics_fit"] = {"names": cfg.sample_statistics, "C": _fit_direct_path(model, train, seed)}
    has_eval = eval_ds is not None
    args_dict: dict[str, Any] = dict(
        output_dir=str(output_dir),
        num_train_epochs=10,
        learning_rate=1e-3,
        per_device_train_batch_size=16,
        per_device_eval_batch_size=64,
        lr_scheduler_type="linear",
        weight_decay=0.0,
        logging_steps=10,
        eval_strategy="epoch" if has_eval else "no",
        save_strategy="epoch" if has_eval else "no",
        load_best_model_at_end=has_eval,
        metric_for_best_model="auc" if has_eval else None,
        greater_is_better=True,
        save_total_limit=1,
        save_only_model=True,
        report_to="none",
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
    )
    args_dict.update(training_args)
    if args_dict.get("remove_unused_columns"):
        logger.warning("remove_unused_columns=True would strip the feature columns; forcing False")
    args_dict["remove_unused_columns"] = False
    args = TrainingArguments(**args_dict)

    callback = _make_card_callback(summary)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=eval_ds,
        data_collator=FiMMIADataCollator.from_config(cfg, precomputed=cfg.uses_statistics),
        compute_metrics=_compute_metrics if has_eval else None,
        preprocess_logits_for_metrics=_scores_only if has_eval else None,
        callbacks=[callback],
    )
    trainer.train()
    trained = trainer.model
    if has_eval:
        trainer.evaluate()  # final metrics of the kept (best) checkpoint go into the card
        scores = predict(trained, eval_ds, progress=False)["score"]
        trained.config.decision_thresholds, callback.card["calibration"] = calibrate_thresholds(eval_ds["label"], scores)
    else:
        logger.warning(NOT_CALIBRATED)
        callback.card["calibration"] = {"note": NOT_CALIBRATED}
    callback._write(trained)
    trainer.save_model(str(output_dir))
    # Trainer pickles its arguments beside the weights; the card data already records them, and a
    # detector folder should hold nothing that needs unpickling
    Path(output_dir, "training_args.bin").unlink(missing_ok=True)
    if trainer.is_world_process_zero():
        _write_model_card(trained, Path(output_dir))
    return trained


def _write_model_card(model: Any, folder: Path) -> None:
    """The card travels with the folder (and is rendered again, with the Hub id, by `push_detector`): eval
    results from the validation split when there is one, the calibrated thresholds."""
    from .hub import render_model_card

    render_model_card(model, str(folder.resolve())).save(str(folder / "README.md"))


# --------------------------------------------------------------------------------------------- prediction
def predict(model: Any, ds: Any, *, batch_size: int = 64, device: str | None = None, progress: bool = True) -> Any:
    """Score every sample: returns ``ds`` with a ``score`` column (mean P(member) over valid neighbours; NaN
    for a sample without any valid neighbour). ``model`` is a detector or a path/Hub id; ``ds`` a dataset
    or a path, with the same columns as for training (labels not needed)."""
    import torch
    from tqdm.auto import tqdm

    from .modeling_fimmia import FiMMIAForMembershipInference

    if not isinstance(model, FiMMIAForMembershipInference):
        model = FiMMIAForMembershipInference.from_pretrained(str(model))
    ds = load_scored(ds)
    if device is not None:
        model = model.to(device)
    model.eval()
    collator = FiMMIADataCollator.from_config(model.config)
    view = ds.select_columns(detector_columns(model.config, ds.column_names))
    scores: list[np.ndarray] = []
    with torch.no_grad():
        for start in tqdm(range(0, len(view), batch_size), desc="FiMMIA scores", disable=not progress):
            columns = view[start : start + batch_size]
            n = len(next(iter(columns.values())))
            batch = collator([{k: v[i] for k, v in columns.items()} for i in range(n)])
            batch.pop("labels", None)
            batch = {k: v.to(model.device) for k, v in batch.items()}
            out = model(**batch)
            scores.append(out.scores.float().cpu().numpy())
    values = np.concatenate(scores) if scores else np.zeros(0)
    n_nan = int(np.isnan(values).sum())
    if n_nan:
        logger.warning("%d sample(s) have no valid neighbour; their score is NaN", n_nan)
    if "score" in ds.column_names:
        ds = ds.remove_columns("score")
    return ds.add_column("score", values.astype(np.float64).tolist())


# --------------------------------------------------------------------------------------------- CLI
def json_object(value: str | dict | None, flag: str) -> dict:
    """A JSON object given on the command line (or a mapping from the YAML file), with a message that says what
    is wrong with it."""
    if value is None or isinstance(value, dict):
        return dict(value or {})
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as err:
        raise ValueError(f"--{flag}: not valid JSON ({err}): {value!r}") from err
    if not isinstance(parsed, dict):
        raise ValueError(f"--{flag}: expected a JSON object such as '{{\"seed\": 3}}', got {value!r}")
    return parsed


_SETTINGS_HELP = "the {} settings the features were made with, as JSON (stored so the pipeline works the same way)"


@dataclasses.dataclass
class TrainArguments:
    """`fimmia-hf train`."""

    EXAMPLE: ClassVar[str] = ("fimmia-hf train --train-base base_scored --train-finetuned finetuned_scored "
                              "--eval-size 0.2 --target-model Qwen/Qwen2.5-VL-3B-Instruct --out detector")
    out: str = HfArg(help="folder for checkpoints, the final detector and its model card (README.md)")
    train: str | None = HfArg(
        default=None, help="scored member/non-member samples with a 'label' column (save_to_disk folder or .parquet)")
    eval: str | None = HfArg(default=None, help="scored validation samples (same format); the best checkpoint by "
                             "validation AUC is kept and the decision thresholds are calibrated on them")
    train_base: str | None = HfArg(default=None, help="paired protocol: training samples scored by the base model")
    train_finetuned: str | None = HfArg(
        default=None, help="paired protocol: the same samples scored by the fine-tuned model")
    eval_base: str | None = HfArg(default=None, help="paired protocol: validation samples scored by the base model")
    eval_finetuned: str | None = HfArg(
        default=None, help="paired protocol: validation samples scored by the fine-tuned model")
    eval_size: float = HfArg(
        default=0.0, help="without eval data, hold out this share of training samples (split by sample_id)")
    head: str = HfArg(default="fimmia", metadata={"choices": ("fimmia", "loss_only", "embedding_only", "combined")},
                      help="fimmia | loss_only | embedding_only (blind control) | combined (the deltas plus the "
                      "sample's own statistics: loss, zlib, Min-K%%++, MaxRényi, neighbourhood...)")
    loss_norm: str = HfArg(default="std", metadata={"choices": ("none", "std", "minmax", "periodic")},
                           help="normalisation of the loss deltas")
    seed: int = HfArg(default=0, help="random seed (initialisation, data order, the eval split)")
    epochs: float = HfArg(default=10.0, help="training epochs")
    learning_rate: float = HfArg(default=1e-3, help="peak learning rate")
    batch_size: int = HfArg(default=16, help="training samples per device and step")
    eval_batch_size: int = HfArg(default=64, help="validation samples per device and step")
    target_model: str | None = HfArg(
        default=None, help="the target the samples were scored with (Hub id or folder; recorded for the pipeline)")
    neighbor_model: str | None = HfArg(default=None, help="the infilling model of the neighbours (recorded)")
    embedding_model: str | None = HfArg(default=None, help="the text-embedding model (recorded)")
    media_embedding_model: str | None = HfArg(default=None, help="the media-embedding model (recorded)")
    modality: str | None = HfArg(
        default=None, metadata={"choices": ("image", "audio", "video", "text")}, help="the samples' modality")
    neighbor_kwargs: str | None = HfArg(default=None, help=_SETTINGS_HELP.format("neighbour") + ", e.g. '{\"seed\": 3}'")
    embedding_kwargs: str | None = HfArg(default=None, help=_SETTINGS_HELP.format("text-embedding"))
    media_embedding_kwargs: str | None = HfArg(default=None, help=_SETTINGS_HELP.format("media-embedding"))
    scorer_kwargs: str | None = HfArg(default=None, help=_SETTINGS_HELP.format("scoring"))
    threshold: float = HfArg(default=0.5, help="score above which the pipeline says 'member'")
    training_args: str | None = HfArg(
        default=None, help="other transformers.TrainingArguments as JSON, e.g. '{\"optim\": \"adafactor\"}'")


@dataclasses.dataclass
class PredictArguments:
    """`fimmia-hf predict`."""

    EXAMPLE: ClassVar[str] = "fimmia-hf predict --model detector --data test_scored --out predictions.parquet"
    model: str = HfArg(help="detector folder or Hub id")
    out: str = HfArg(help="predictions file (.parquet or .csv): sample_id, ds_name, label, score")
    data: str | None = HfArg(default=None, help="scored samples to predict (save_to_disk folder or .parquet)")
    base: str | None = HfArg(default=None, help="paired protocol: samples scored by the base model")
    finetuned: str | None = HfArg(default=None, help="paired protocol: the same samples scored by the fine-tuned model")
    metrics: str | None = HfArg(default=None, help="metrics JSON (default: <out stem>.metrics.json)")
    batch_size: int = HfArg(default=64, help="samples per forward pass")
    n_bootstrap: int = HfArg(default=1000, help="bootstrap resamples for the metric confidence intervals")
    seed: int = HfArg(default=0, help="seed of the bootstrap")


def load_protocol(single: str | None, base: str | None, finetuned: str | None, prefix: str = "") -> Any | None:
    """Scored data from the command line: one labelled table (`--data`, `--train`...), or the paired protocol's
    two tables (`--base`/`--finetuned`, `--train-base`/`--train-finetuned`...). None when none is given."""
    pair = f"--{prefix}-" if prefix else "--"
    if single and (base or finetuned):
        raise ValueError(f"give either --{prefix or 'data'} or {pair}base/{pair}finetuned, not both")
    if base or finetuned:
        if not (base and finetuned):
            raise ValueError(f"the paired protocol needs both {pair}base and {pair}finetuned")
        return paired_dataset(load_scored(base), load_scored(finetuned))
    return load_scored(single) if single else None


def run_train(cfg: TrainArguments) -> Path:
    """``fimmia-hf train``: returns the output folder."""
    detector_config: dict[str, Any] = {  # JSON options first: a typo fails before any data is read
        "head": cfg.head, "loss_norm": cfg.loss_norm, "threshold": cfg.threshold,
        **{k: getattr(cfg, k) for k in CONFIG_METADATA if k not in STAGE_SETTINGS},
        **{k: json_object(getattr(cfg, k), k.replace("_", "-")) or None for k in STAGE_SETTINGS},
    }
    training_args = json_object(cfg.training_args, "training-args")
    train = load_protocol(cfg.train, cfg.train_base, cfg.train_finetuned, "train")
    if train is None:
        raise ValueError("no training data: give --train, or --train-base and --train-finetuned")
    eval_ds = load_protocol(cfg.eval, cfg.eval_base, cfg.eval_finetuned, "eval")
    if eval_ds is None and cfg.eval_size > 0:
        from .data import split_samples

        train, eval_ds = split_samples(train, test_size=cfg.eval_size, seed=cfg.seed)
    train_detector(
        train, eval_ds, config=detector_config, output_dir=cfg.out, seed=cfg.seed,
        num_train_epochs=cfg.epochs, learning_rate=cfg.learning_rate,
        per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.eval_batch_size,
        **training_args,
    )
    print(f"detector and its model card saved to {cfg.out}")
    return Path(cfg.out)


def run_predict(cfg: PredictArguments) -> dict[str, Any]:
    """``fimmia-hf predict``: writes predictions (Parquet or CSV) and a metrics JSON; returns the metrics."""
    from .metrics import json_safe, membership_metrics

    out = Path(cfg.out)
    if out.suffix.lower() not in (".parquet", ".csv"):
        raise ValueError(f"--out must end in .parquet or .csv, got {out}")
    data = load_protocol(cfg.data, cfg.base, cfg.finetuned)
    if data is None:
        raise ValueError("no data: give --data, or --base and --finetuned")
    scored = predict(cfg.model, data, batch_size=cfg.batch_size)
    cols = [c for c in ("sample_id", "ds_name", "model_role", "label", "score") if c in scored.column_names]
    frame = scored.select_columns(cols).to_pandas()
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".parquet":
        frame.to_parquet(out, index=False)
    else:
        frame.to_csv(out, index=False)

    report: dict[str, Any] = {"model": cfg.model, "n_samples": len(frame), "predictions": str(out)}
    if "label" in frame and frame["label"].notna().all():
        valid = frame["score"].notna()
        if not valid.all():
            report["n_without_score"] = int((~valid).sum())
        sub = frame[valid]
        try:
            report["metrics"] = membership_metrics(
                sub["label"].astype(int).to_numpy(), sub["score"].to_numpy(), n_bootstrap=cfg.n_bootstrap,
                seed=cfg.seed, groups=sub["ds_name"].astype(str).to_numpy() if "ds_name" in sub else None,
            )
        except ValueError as err:
            report["metrics_error"] = str(err)
    else:
        report["metrics_error"] = "no labels: metrics need a 'label' column"
    metrics_path = Path(cfg.metrics) if cfg.metrics else out.with_name(out.stem + ".metrics.json")
    metrics_path.write_text(json.dumps(json_safe(report), indent=2), encoding="utf-8")
    print(f"predictions: {out}\nmetrics: {metrics_path}")
    return report


__all__ = [
    "PredictArguments",
    "TrainArguments",
    "load_protocol",
    "load_scored",
    "predict",
    "run_predict",
    "run_train",
    "train_detector",
]

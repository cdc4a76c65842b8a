"""Push and pull detectors and scored feature datasets, with model and dataset cards.

Every function takes an injectable ``api`` (anything with the `huggingface_hub.HfApi` methods it uses:
``create_repo``, ``upload_folder``, ``snapshot_download``), so tests and air-gapped machines run the same code
with a fake. Detectors are saved with ``save_pretrained`` (safetensors, plus the self-contained configuration /
modeling files as remote code); the model card is rendered from ``hub_cards/model_card.md`` with the metrics
as model-index eval results. Tokens are passed through, never printed or written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import tempfile
from collections.abc import Iterator, Mapping
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

from transformers.hf_argparser import HfArg

from .configuration_fimmia import COMPONENTS, split_reference

METRIC_NAMES = {
    "auc": "AUC",
    "tpr@0.1%fpr": "TPR@0.1%FPR",
    "tpr@1%fpr": "TPR@1%FPR",
    "tpr@5%fpr": "TPR@5%FPR",
    "fpr@95%tpr": "FPR@95%TPR",
}
TASK_TYPE = "membership-inference"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _api(api: Any, token: str | None) -> Any:
    if api is not None:
        return api
    from huggingface_hub import HfApi

    return HfApi(token=token)


def _template(name: str) -> str:
    return str(resources.files("hub_cards") / name)


def _hub_id(value: Any) -> str | None:
    """The Hub repo id (``owner/name``, from ``owner/name@revision`` too) usable as card metadata; local paths and
    objects give None."""
    if not isinstance(value, str) or os.path.exists(value):
        return None
    repo_id = split_reference(value)[0]
    return repo_id if _REPO_ID.match(repo_id) else None


def _describe_component(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, (str, os.PathLike)):
        return (value if _hub_id(str(value)) else None) or f"local folder `{Path(value).name}`"
    return type(value).__name__


def _hub_components(cfg: Any, hub_ids: Mapping[str, str]) -> dict[str, str]:
    """The component references a pushed config records: each local folder replaced by its Hub id from
    ``hub_ids``; a local folder without one is refused (it would resolve nowhere but on this machine)."""
    unknown = sorted(set(hub_ids) - set(COMPONENTS))
    if unknown:
        raise ValueError(f"hub_ids: unknown components {unknown}; expected some of {list(COMPONENTS)}")
    bad = {k: v for k, v in hub_ids.items() if not _hub_id(v)}
    if bad:
        raise ValueError(f"hub_ids must be Hub ids like 'owner/name' or 'owner/name@revision', got {bad}")
    out = dict(hub_ids)
    local = {k: v for k in COMPONENTS if k not in out and (v := getattr(cfg, k, None)) is not None and not _hub_id(v)}
    if local:
        listed = ", ".join(f"{k} = {v}" for k, v in local.items())
        flags = " ".join(f"--{k.replace('_', '-')} OWNER/NAME" for k in local)
        raise ValueError(f"the detector records local folders as components ({listed}); a pushed detector must "
                         f"name them by Hub id: pass hub_ids={{...}} (CLI: {flags})")
    return out


# ---------------------------------------------------------------------------------------------- metrics
def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def normalize_metrics(metrics: Mapping[str, Any] | None, card_data: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One shape for the card from what users have at hand.

    Accepts a :func:`fimmia_hf.metrics.membership_metrics` result (optionally with ``"blind"``: the blind
    baseline's metrics, ``"blind_name"``, ``"dataset"``), a ``report.json`` from :func:`fimmia_hf.build_report`
    (its first detector and best blind baseline), or None (then the training run's ``eval_metrics`` recorded in
    the config, without intervals). Returns ``{"detector", "blind", "blind_name", "dataset", "n_members",
    "n_nonmembers", "warnings"}``.
    """
    card_data = card_data or {}
    out: dict[str, Any] = {"detector": {}, "blind": None, "blind_name": None, "dataset": None,
                           "n_members": None, "n_nonmembers": None, "warnings": []}
    if metrics is None:
        metrics = card_data.get("eval_metrics") or {}
        out["dataset"] = "validation split of the training run"
    if "methods" in metrics:  # a report.json
        methods = metrics["methods"]
        lift = metrics.get("lift_over_best_blind") or {}
        primary = lift.get("method") or next((n for n, m in methods.items() if m.get("kind") == "detector"), None)
        if primary is None:
            raise ValueError("the report holds no detector results (no method of kind 'detector')")
        out["detector"] = dict(methods[primary])
        blind = metrics.get("best_blind_baseline")
        if blind:
            out["blind"], out["blind_name"] = dict(methods[blind]), blind.removeprefix("blind: ")
        out["warnings"] = [w for w in metrics.get("warnings", []) if "DISTRIBUTION SHIFT" in w]
        out["dataset"] = metrics.get("dataset") or metrics.get("title")
    else:
        out["detector"] = dict(metrics)
        if metrics.get("blind") is not None:
            out["blind"] = dict(metrics["blind"])
            out["blind_name"] = metrics.get("blind_name", "blind baseline")
        out["dataset"] = metrics.get("dataset") or out["dataset"]
        out["warnings"] = list(metrics.get("warnings", []))
    det = out["detector"]
    for key in ("n_members", "n_nonmembers"):
        if det.get(key) is not None:
            out[key] = int(det[key])
    out["dataset"] = out["dataset"] or "held-out samples"
    return out


def _ci_text(entry: Mapping[str, Any], key: str) -> str:
    ci = entry.get(f"{key}_ci")
    if ci is None or len(ci) != 2 or not all(_finite(v) for v in ci):
        return "n/a"
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def _metric_rows(norm: Mapping[str, Any]) -> tuple[list[dict], list[dict]]:
    det, blind = norm["detector"], norm["blind"] or {}
    rows, lift = [], []
    for key, name in METRIC_NAMES.items():
        if not _finite(det.get(key)):
            continue
        rows.append({"key": key, "name": name, "value": f"{det[key]:.3f}", "ci": _ci_text(det, key)})
        if _finite(blind.get(key)):
            sign = -1.0 if key.startswith("fpr") else 1.0  # lower FPR is better: lift is the reduction
            lift.append({"name": name, "value": f"{det[key]:.3f}", "blind": f"{blind[key]:.3f}",
                         "lift": f"{sign * (det[key] - blind[key]):+.3f}"})
    return rows, lift


def _eval_results(norm: Mapping[str, Any], rows: list[dict]) -> list[Any]:
    from huggingface_hub import EvalResult

    det = norm["detector"]
    results = []
    for row in rows:
        ci = det.get(f"{row['key']}_ci")
        name = row["name"] if row["ci"] == "n/a" else f"{row['name']} (95% CI {row['ci']})"
        results.append(EvalResult(
            task_type=TASK_TYPE, task_name="Membership inference",
            dataset_type=_hub_id(norm["dataset"]) or "custom", dataset_name=str(norm["dataset"]),
            metric_type=row["key"], metric_name=name, metric_value=float(det[row["key"]]),
            metric_config="stratified bootstrap 95% CI" if ci is not None else None,
        ))
    return results


# ---------------------------------------------------------------------------------------------- cards
def _training_data(card: Mapping[str, Any]) -> str:
    if not card:
        return "Not recorded (the detector was not trained with `fimmia_hf.train_detector`)."
    parts = []
    if card.get("n_rows") is not None:
        parts.append(f"{card['n_rows']} training rows ({card.get('n_members', '?')} members, "
                     f"{card.get('n_nonmembers', '?')} non-members"
                     + (f", {card['n_samples']} distinct samples" if card.get("n_samples") is not None else "") + ").")
    if card.get("ds_names"):
        parts.append("Source datasets (`ds_name`: rows): " + ", ".join(f"{k}: {v}" for k, v in card["ds_names"].items()) + ".")
    nb = card.get("neighbors_per_sample")
    if isinstance(nb, Mapping):
        parts.append(f"Neighbours per sample: {nb.get('min')}–{nb.get('max')} (mean {float(nb.get('mean', 0)):.1f}).")
    args = card.get("training_args")
    if isinstance(args, Mapping):
        parts.append("Training: " + ", ".join(f"{k}={v}" for k, v in args.items()) + ".")
    for key in ("datasets", "train_dataset"):
        if card.get(key):
            parts.append(f"Data: {card[key]}.")
    return " ".join(parts) or "Not recorded."


def _threshold_rows(cfg: Any, calibration: Mapping[str, Any]) -> dict[str, Any]:
    """The card's decision-threshold table from ``config.decision_thresholds`` and training's calibration record."""
    thresholds = getattr(cfg, "decision_thresholds", None) or {}
    levels = calibration.get("levels") or {}
    rows = []
    for key, t in sorted(thresholds.items(), key=lambda kv: float(kv[0])):
        seen = levels.get(key, {})
        rows.append({"level": f"{float(key) * 100:g} %", "threshold": f"{t:.4f}",
                     **{k: f"{seen[k]:.3f}" if _finite(seen.get(k)) else "n/a" for k in ("fpr", "tpr")}})
    default = thresholds.get("0.01")
    return {"thresholds": rows, "calibration": {"notes": [], "n_members": "?", "n_nonmembers": "?", **calibration},
            "default_threshold": f"{default:.4f}" if default is not None else None}


def render_model_card(model: Any, repo_id: str, metrics: Mapping[str, Any] | None = None) -> Any:
    """The detector's `huggingface_hub.ModelCard` (YAML metadata with model-index + the Markdown body)."""
    from huggingface_hub import ModelCard, ModelCardData

    from .configuration_fimmia import STAGE_SETTINGS

    cfg = model.config
    card = dict(getattr(cfg, "card_data", None) or {})
    norm = normalize_metrics(metrics, card)
    rows, lift = _metric_rows(norm)
    modality = getattr(cfg, "modality", None)
    tags = ["fimmia", "fimmia-hf", "membership-inference", "privacy", "data-contamination"]
    if modality:
        tags.append(modality)
    base = _hub_id(getattr(cfg, "target_model", None))
    model_name = repo_id.split("/")[-1]
    data = ModelCardData(
        library_name="transformers", license=card.get("license"), tags=tags,
        base_model=base, target_model=base,  # the model it audits (the Hub links base_model)
        model_name=model_name, eval_results=_eval_results(norm, rows) or None,
        datasets=[d for d in [_hub_id(norm["dataset"])] if d] or None,
    )
    examples = {"image": "photo.png", "audio": "clip.wav", "video": "clip.mp4"}
    return ModelCard.from_template(
        data,
        template_path=_template("model_card.md"),
        model_name=model_name, repo_id=repo_id, modality=modality, protocol=cfg.protocol,
        target_model=_describe_component(getattr(cfg, "target_model", None)),
        neighbor_model=_describe_component(getattr(cfg, "neighbor_model", None)),
        embedding_model=_describe_component(getattr(cfg, "embedding_model", None)),
        media_embedding_model=_describe_component(getattr(cfg, "media_embedding_model", None)),
        stage_settings={k: json.dumps(v, ensure_ascii=False) for k in STAGE_SETTINGS if (v := getattr(cfg, k, None))},
        num_neighbors=getattr(cfg, "num_neighbors", None), threshold=cfg.threshold, head=cfg.head,
        sample_statistics=cfg.sample_statistics if cfg.uses_statistics else None,
        **_threshold_rows(cfg, card.get("calibration") or {}),
        loss_norm=cfg.loss_norm, embedding_dim=cfg.embedding_dim, media_embedding_dim=cfg.media_embedding_dim,
        uses_embeddings=cfg.uses_embeddings, uses_media=cfg.uses_media,
        num_parameters=f"{sum(p.numel() for p in model.parameters()):,}",
        training_data=_training_data(card), metric_rows=rows, lift_rows=lift, blind_name=norm["blind_name"],
        eval_dataset=norm["dataset"], n_members=norm["n_members"], n_nonmembers=norm["n_nonmembers"],
        metric_warnings=norm["warnings"][:5],
        example_input="Какая фигура на картинке? A. круг B. квадрат ОТВЕТ:", example_answer="A",
        example_media=examples.get(modality or "", ""),
    )


# ---------------------------------------------------------------------------------------------- detectors
@contextlib.contextmanager
def _config_values(cfg: Any, values: Mapping[str, Any]) -> Iterator[None]:
    """``values`` set on ``cfg`` for the block only: the caller's detector keeps what it records."""
    before = {k: getattr(cfg, k) for k in values}
    try:
        for key, value in values.items():
            setattr(cfg, key, value)
        yield
    finally:
        for key, value in before.items():
            setattr(cfg, key, value)


def _as_model(model: Any) -> Any:
    if isinstance(model, (str, os.PathLike)):
        return load_detector(model)
    if not hasattr(model, "save_pretrained") or getattr(getattr(model, "config", None), "model_type", None) != "fimmia":
        raise TypeError(f"expected a FiMMIAForMembershipInference or its folder, got {type(model).__name__}")
    return model


def push_detector(
    model: Any,
    repo_id: str,
    *,
    api: Any = None,
    metrics: Mapping[str, Any] | str | os.PathLike | None = None,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    hub_ids: Mapping[str, str] | None = None,
) -> Any:
    """Upload a detector (object or saved folder) with its model card to ``repo_id``; returns the commit info.

    ``metrics``: a ``membership_metrics`` dict (optionally with ``"blind"``), a ``report.json`` dict, or a path
    to either as JSON; default: the validation metrics recorded by training. ``hub_ids``: the Hub id
    (``owner/name[@revision]``) of each component the detector records as a local folder, e.g.
    ``{"target_model": "Qwen/Qwen2.5-VL-3B-Instruct"}``; a local component without one is refused.
    """
    model = _as_model(model)
    components = _hub_components(model.config, hub_ids or {})
    if isinstance(metrics, (str, os.PathLike)):
        metrics = json.loads(Path(metrics).read_text(encoding="utf-8"))
    api = _api(api, token)
    with tempfile.TemporaryDirectory(prefix="fimmia-push-") as tmp:
        with _config_values(model.config, components):
            card = render_model_card(model, repo_id, metrics)
            model.save_pretrained(tmp)  # safetensors + config + remote-code files
        card.save(os.path.join(tmp, "README.md"))
        api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True, token=token)
        return api.upload_folder(
            repo_id=repo_id, folder_path=tmp, repo_type="model", token=token,
            commit_message=commit_message or "Upload FiMMIA membership-inference detector",
        )


def _download(repo_id_or_path: str | os.PathLike, repo_type: str, api: Any, revision: str | None, token: str | None) -> str:
    path = os.fspath(repo_id_or_path)
    if os.path.isdir(path):
        return path
    return _api(api, token).snapshot_download(repo_id=path, repo_type=repo_type, revision=revision, token=token)


def load_detector(
    repo_id_or_path: str | os.PathLike, *, api: Any = None, revision: str | None = None, token: str | None = None
) -> Any:
    """A detector from a local folder or a Hub repo (downloaded through ``api``), in eval mode."""
    from .modeling_fimmia import FiMMIAForMembershipInference

    folder = _download(repo_id_or_path, "model", api, revision, token)
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise FileNotFoundError(f"{repo_id_or_path}: no config.json in {folder}; is this a saved detector?")
    return FiMMIAForMembershipInference.from_pretrained(folder).eval()


# ---------------------------------------------------------------------------------------------- features
def _basenames(batch: dict[str, list], column: str) -> dict[str, list]:
    return {column: [os.path.basename(v) if v else v for v in batch[column]]}


def _strip_local_paths(ds: Any) -> tuple[Any, str | None]:
    """Media paths on this machine mean nothing on the Hub and leak folder names: keep the file names."""
    import datasets

    from .media import MEDIA_COLUMNS

    note = None
    for col in MEDIA_COLUMNS:
        if col in ds.column_names and ds.features[col] == datasets.Value("string"):
            ds = ds.map(_basenames, batched=True, fn_kwargs={"column": col}, desc=f"{col}: file names only")
            note = f"The `{col}` column holds file names only (media files are not included)."
    return ds, note


def render_dataset_card(ds: Any, repo_id: str, *, target_model: str | None = None, media_note: str | None = None) -> Any:
    from huggingface_hub import DatasetCard, DatasetCardData

    from .data import modality_of

    labels = ds["label"] if "label" in ds.column_names else None
    names = sorted(set(ds["ds_name"])) if "ds_name" in ds.column_names else []
    size = len(ds)
    category = "n<1K" if size < 1000 else "1K<n<10K" if size < 10_000 else "10K<n<100K" if size < 100_000 else "n>100K"
    data = DatasetCardData(
        tags=["fimmia", "fimmia-hf", "membership-inference"], size_categories=[category],
        pretty_name=repo_id.split("/")[-1], configs=[{"config_name": "default", "data_files": "data/*.parquet"}],
    )
    return DatasetCard.from_template(
        data, template_path=_template("dataset_card.md"), pretty_name=repo_id.split("/")[-1], repo_id=repo_id,
        num_rows=size, modality=modality_of(ds),
        n_members=sum(1 for v in labels if v == 1) if labels is not None else None,
        n_nonmembers=sum(1 for v in labels if v == 0) if labels is not None else None,
        ds_names=", ".join(names[:20]), target_model=target_model,
        columns=[(name, str(feature)) for name, feature in ds.features.items()], media_note=media_note,
    )


def push_features(
    ds: Any,
    repo_id: str,
    *,
    api: Any = None,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    target_model: str | None = None,
) -> Any:
    """Upload a scored dataset (a `datasets.Dataset` or anything `load_samples` reads) as Parquet with a
    dataset card; returns the commit info."""
    import datasets

    if not isinstance(ds, datasets.Dataset):
        from .training import load_scored

        ds = load_scored(ds)
    ds, note = _strip_local_paths(ds)
    api = _api(api, token)
    card = render_dataset_card(ds, repo_id, target_model=target_model, media_note=note)
    with tempfile.TemporaryDirectory(prefix="fimmia-push-") as tmp:
        os.makedirs(os.path.join(tmp, "data"))
        ds.to_parquet(os.path.join(tmp, "data", "train-00000-of-00001.parquet"))
        card.save(os.path.join(tmp, "README.md"))
        api.create_repo(repo_id=repo_id, repo_type="dataset", private=private, exist_ok=True, token=token)
        return api.upload_folder(
            repo_id=repo_id, folder_path=tmp, repo_type="dataset", token=token,
            commit_message=commit_message or "Upload FiMMIA scored features",
        )


def load_features(
    repo_id_or_path: str | os.PathLike, *, api: Any = None, revision: str | None = None, token: str | None = None
) -> Any:
    """A scored dataset from a Hub dataset repo (through ``api``), a folder of Parquet files (as pushed) or a
    ``save_to_disk`` folder."""
    import datasets

    folder = Path(_download(repo_id_or_path, "dataset", api, revision, token))
    if (folder / "state.json").is_file() or (folder / "dataset_info.json").is_file():
        return datasets.load_from_disk(str(folder))
    files = sorted(str(p) for p in folder.rglob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"{repo_id_or_path}: no Parquet files or saved dataset in {folder}")
    return datasets.Dataset.from_parquet(files)


# ---------------------------------------------------------------------------------------------- CLI
_COMPONENT_HELP = "Hub id of the {} (id or id@revision), where the detector records a local folder"


@dataclasses.dataclass
class PushArguments:
    """`fimmia-hf push`."""

    EXAMPLE: ClassVar[str] = ("fimmia-hf push --model detector --repo-id me/fimmia-qwen2.5-vl "
                              "--target-model Qwen/Qwen2.5-VL-3B-Instruct --metrics report/report.json")
    model: str = HfArg(help="saved detector folder (from `fimmia-hf train`)")
    repo_id: str = HfArg(help="Hub repo to create or update, e.g. me/fimmia-qwen2.5-vl")
    metrics: str | None = HfArg(
        default=None, help="JSON with membership_metrics output or a report.json (default: training metrics)")
    private: bool = HfArg(default=False, help="create the repo private")
    features: str | None = HfArg(default=None, help="also push this scored dataset (folder or table) ...")
    features_repo_id: str | None = HfArg(default=None, help="... to this dataset repo (default: <repo-id>-features)")
    commit_message: str | None = HfArg(default=None, help="commit message")
    target_model: str | None = HfArg(default=None, help=_COMPONENT_HELP.format("target model"))
    neighbor_model: str | None = HfArg(default=None, help=_COMPONENT_HELP.format("infilling model"))
    embedding_model: str | None = HfArg(default=None, help=_COMPONENT_HELP.format("text-embedding model"))
    media_embedding_model: str | None = HfArg(default=None, help=_COMPONENT_HELP.format("media-embedding model"))


def run_push(args: PushArguments, *, api: Any = None) -> int:
    """`fimmia-hf push`: the token comes from the environment / `hf auth login`, never from the command line.
    A Hub that cannot be reached (offline mode, no network, refused token) is one line, not a traceback."""
    model = load_detector(args.model)
    hub_ids = {name: getattr(args, name) for name in COMPONENTS if getattr(args, name)}
    try:
        info = push_detector(model, args.repo_id, api=api, metrics=args.metrics, private=args.private or None,
                             commit_message=args.commit_message, hub_ids=hub_ids)
        print(f"pushed detector to {getattr(info, 'commit_url', None) or args.repo_id}")
        if args.features:
            repo = args.features_repo_id or f"{args.repo_id}-features"
            finfo = push_features(args.features, repo, api=api, private=args.private or None,
                                  target_model=_hub_id(getattr(model.config, "target_model", None)))
            print(f"pushed features to {getattr(finfo, 'commit_url', None) or repo}")
    except OSError as err:  # huggingface_hub's offline and HTTP errors are OSErrors
        if isinstance(err, FileNotFoundError):
            raise
        raise ValueError(f"could not push to the Hub: {str(err).splitlines()[0]}") from err
    return 0


__all__ = [
    "PushArguments",
    "load_detector",
    "load_features",
    "normalize_metrics",
    "push_detector",
    "push_features",
    "render_dataset_card",
    "render_model_card",
    "run_push",
]

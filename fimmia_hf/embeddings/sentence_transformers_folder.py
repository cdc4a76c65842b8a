"""sentence-transformers folders, read without the sentence-transformers package.

A sentence-transformers model is a transformers model plus a `modules.json` that says what follows it:
pooling (one or several modes, concatenated), Dense layers, normalisation. `TextEmbedder` reads that
list so the vectors equal what sentence-transformers computes, with safetensors weights only.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# sentence-transformers Pooling config keys, in the order its Pooling module concatenates them
_ST_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "last",
}
_ST_POOLING_NAMES = {"cls": "cls", "max": "max", "mean": "mean", "mean_sqrt_len_tokens": "mean_sqrt_len",
                     "weightedmean": "weightedmean", "lasttoken": "last"}
_ST_ACTIVATIONS = ("Identity", "Tanh", "ReLU", "GELU", "Sigmoid", "SiLU")


def model_file(model: str | os.PathLike, filename: str, revision: str | None = None) -> Path | None:
    """A file of a local model folder or of a Hub repo (downloaded or cached), or None if it has none."""
    if Path(model).is_dir():
        path = Path(model) / filename
        return path if path.is_file() else None
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(str(model), filename, revision=revision))
    except Exception:  # absent file, unknown repo, offline: the model load itself reports real errors
        return None


@dataclass
class SentenceTransformerLayout:
    """What a sentence-transformers `modules.json` says happens after the transformer."""

    transformer_path: str = ""
    pooling: tuple[str, ...] | None = None
    include_prompt: bool = True
    max_seq_length: int | None = None
    do_lower_case: bool = False
    dense_paths: list[str] = field(default_factory=list)
    normalize: bool = False


def read_sentence_transformers(model: str | os.PathLike, revision: str | None = None) -> SentenceTransformerLayout | None:
    """Read a sentence-transformers folder's module list; None for a plain transformers model."""
    modules_file = model_file(model, "modules.json", revision)
    if modules_file is None:
        return None
    where = f"{model}/modules.json"
    layout = SentenceTransformerLayout()
    for module in json.loads(modules_file.read_text(encoding="utf-8")):
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        path = str(module.get("path", ""))
        if kind == "Transformer":
            layout.transformer_path = path
            config_file = model_file(model, f"{path}/sentence_bert_config.json" if path else "sentence_bert_config.json",
                                      revision)
            if config_file is not None:
                config = json.loads(config_file.read_text(encoding="utf-8"))
                layout.max_seq_length = config.get("max_seq_length")
                layout.do_lower_case = bool(config.get("do_lower_case", False))
        elif kind == "Pooling":
            config_file = model_file(model, f"{path}/config.json", revision)
            if config_file is None:
                raise ValueError(f"{where}: the Pooling module has no {path}/config.json")
            config = json.loads(config_file.read_text(encoding="utf-8"))
            if isinstance(config.get("pooling_mode"), str):
                name = config["pooling_mode"]
                if name not in _ST_POOLING_NAMES:
                    raise ValueError(f"{where}: unsupported pooling_mode {name!r}")
                layout.pooling = (_ST_POOLING_NAMES[name],)
            else:
                layout.pooling = tuple(mode for key, mode in _ST_POOLING_KEYS.items() if config.get(key))
            if not layout.pooling:
                raise ValueError(f"{where}: the Pooling config {path}/config.json enables no pooling mode")
            layout.include_prompt = bool(config.get("include_prompt", True))
        elif kind == "Dense":
            layout.dense_paths.append(path)
        elif kind == "Normalize":
            layout.normalize = True
        else:
            raise ValueError(f"{where}: unsupported sentence-transformers module {module.get('type')!r} "
                             f"(supported: Transformer, Pooling, Dense, Normalize)")
    return layout


def load_dense(model: str | os.PathLike, path: str, revision: str | None) -> torch.nn.Module:
    """A sentence-transformers Dense module (Linear + activation) from its safetensors weights."""
    import torch
    from safetensors.torch import load_file

    from ..configuration_fimmia import refuse_pickled_weights

    refuse_pickled_weights(model, path)
    config_file = model_file(model, f"{path}/config.json", revision)
    weights_file = model_file(model, f"{path}/model.safetensors", revision)
    if config_file is None or weights_file is None:
        raise ValueError(f"{model}/{path}: a Dense module needs config.json and model.safetensors")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    activation = str(config.get("activation_function", torch.nn.modules.linear.Identity)).rsplit(".", 1)[-1]
    if activation not in _ST_ACTIVATIONS:
        raise ValueError(f"{model}/{path}: unsupported Dense activation {activation!r}")
    linear = torch.nn.Linear(config["in_features"], config["out_features"], bias=config.get("bias", True))
    state = load_file(str(weights_file))
    linear.load_state_dict({k.removeprefix("linear."): v for k, v in state.items()})
    return torch.nn.Sequential(linear, getattr(torch.nn, activation)())

"""Load a target model and its processor from a Hub id or folder; PEFT adapter folders load base + adapter."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

_AUTO_CLASSES = ("AutoModelForImageTextToText", "AutoModelForMultimodalLM", "AutoModelForCausalLM", "AutoModelForSeq2SeqLM")


def _load_base(path: str, *, revision: str | None, dtype: Any, device_map: Any) -> Any:
    """Load a model with the first Auto class whose mapping knows its config."""
    import transformers

    from ..configuration_fimmia import refuse_pickled_weights

    refuse_pickled_weights(path)
    config = transformers.AutoConfig.from_pretrained(path, revision=revision)
    for name in _AUTO_CLASSES:
        auto = getattr(transformers, name, None)
        if auto is not None and type(config) in auto._model_mapping:
            return auto.from_pretrained(path, revision=revision, dtype=dtype, device_map=device_map, use_safetensors=True)
    raise ValueError(f"{path}: no generative Auto class supports {type(config).__name__}")


def load_target(
    model: str | os.PathLike,
    *,
    revision: str | None = None,
    dtype: Any = "auto",
    device_map: Any = None,
) -> tuple[Any, Any]:
    """Load (model, processor) from a Hub id or folder; PEFT adapter folders load base + adapter."""
    from transformers import AutoProcessor

    path = str(model)
    adapter_config = Path(path) / "adapter_config.json"
    if adapter_config.is_file():
        from peft import PeftModel

        from ..configuration_fimmia import refuse_pickled_weights

        refuse_pickled_weights(path)
        base_path = json.loads(adapter_config.read_text())["base_model_name_or_path"]
        base = _load_base(base_path, revision=None, dtype=dtype, device_map=device_map)
        loaded = PeftModel.from_pretrained(base, path)
        try:
            processor = AutoProcessor.from_pretrained(path)
        except (OSError, ValueError, TypeError):
            processor = AutoProcessor.from_pretrained(base_path)
        return loaded, processor
    return _load_base(path, revision=revision, dtype=dtype, device_map=device_map), AutoProcessor.from_pretrained(
        path, revision=revision
    )

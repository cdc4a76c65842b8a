"""fimmia-hf: membership inference (training-data leakage detection) for multimodal LLMs.

`import fimmia_hf` registers the detector with the Auto classes and the pipeline task
"membership-inference"; everything heavy (stages, training, attacks) loads on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it (loaded on first attribute access)
_LAZY = {
    "load_samples": "data",
    "split_samples": "data",
    "SampleError": "data",
    "NeighborGenerator": "neighbors",
    "TextEmbedder": "embeddings",
    "ModalityEmbedder": "embeddings",
    "TargetScorer": "scoring",
    "train_detector": "training",
    "predict": "training",
    "finetune": "finetuning",
    "attribute": "attribution",
    "push_detector": "hub",
    "load_detector": "hub",
    "push_features": "hub",
    "load_features": "hub",
    "build_report": "report",
    "MembershipInferencePipeline": "pipeline_fimmia",
}

__all__ = ["FiMMIAConfig", "FiMMIAForMembershipInference", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'fimmia_hf' has no attribute {name!r}")


def _register() -> None:
    """Make `AutoConfig`/`AutoModel*` and `pipeline("membership-inference")` know our classes."""
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification
    from transformers.pipelines import PIPELINE_REGISTRY

    from .configuration_fimmia import FiMMIAConfig
    from .modeling_fimmia import FiMMIAForMembershipInference

    AutoConfig.register("fimmia", FiMMIAConfig, exist_ok=True)
    AutoModel.register(FiMMIAConfig, FiMMIAForMembershipInference, exist_ok=True)
    AutoModelForSequenceClassification.register(FiMMIAConfig, FiMMIAForMembershipInference, exist_ok=True)
    # saved detectors carry their code, so `trust_remote_code=True` works where fimmia_hf is absent
    FiMMIAConfig.register_for_auto_class()
    FiMMIAForMembershipInference.register_for_auto_class("AutoModelForSequenceClassification")

    try:
        from .pipeline_fimmia import MembershipInferencePipeline
    except ImportError:  # the pipeline module lands with its own issue
        return
    if "membership-inference" not in PIPELINE_REGISTRY.supported_tasks:
        PIPELINE_REGISTRY.register_pipeline(
            "membership-inference",
            pipeline_class=MembershipInferencePipeline,
            pt_model=AutoModelForSequenceClassification,
            type="multimodal",
        )


try:
    from .configuration_fimmia import FiMMIAConfig
    from .modeling_fimmia import FiMMIAForMembershipInference
except ImportError:  # pragma: no cover - only while the detector modules are being written
    pass
else:
    _register()

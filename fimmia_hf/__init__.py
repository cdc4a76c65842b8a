"""fimmia-hf: membership inference (training-data leakage detection) for multimodal LLMs.

`import fimmia_hf` registers the detector with `AutoConfig`, `AutoModel` and
`AutoModelForSequenceClassification`, and the pipeline task "membership-inference". It stays light:
the model class (whose import pulls in all of `transformers.modeling_utils`) loads on first use, and
the task is registered the moment `transformers.pipelines` is imported, which `pipeline(...)` does.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from typing import Any

from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

from .configuration_fimmia import FiMMIAConfig

__version__ = "0.1.0"

# public name -> module that defines it (loaded on first attribute access)
_LAZY = {
    "FiMMIAForMembershipInference": "modeling_fimmia",
    "MembershipInferencePipeline": "pipeline_fimmia",
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
    "AttributionResult": "attribution",
    "push_detector": "hub",
    "load_detector": "hub",
    "push_features": "hub",
    "load_features": "hub",
    "build_report": "report",
    "dataset_inference": "audit",
    "DatasetInferenceResult": "audit",
}

__all__ = ["FiMMIAConfig", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'fimmia_hf' has no attribute {name!r}")


class _DetectorInAutoMappings:
    """Stands in for `FiMMIAForMembershipInference` in the Auto mappings until a detector is loaded.

    The Auto classes only call `from_pretrained` / `_from_config` on what they find, so both forward
    to the real class, imported then; what comes back is a real `FiMMIAForMembershipInference`.
    """

    config_class = FiMMIAConfig

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        return __getattr__("FiMMIAForMembershipInference").from_pretrained(*args, **kwargs)

    @classmethod
    def _from_config(cls, *args: Any, **kwargs: Any) -> Any:
        return __getattr__("FiMMIAForMembershipInference")._from_config(*args, **kwargs)


class _NoDefaultDetector(dict):
    """The task's ``default`` entry: `pipeline("membership-inference")` without ``model=`` looks up a default model
    here, and there is none (a detector belongs to its target), so the lookup says what to pass."""

    def __init__(self) -> None:
        super().__init__(model=None)

    def __getitem__(self, key: str) -> Any:
        raise ValueError(
            "pipeline('membership-inference') needs model=<a trained detector: its folder (from `fimmia-hf train`) "
            "or Hub id>; there is no default detector"
        )


def _register_pipeline() -> None:
    from transformers.pipelines import PIPELINE_REGISTRY

    from .pipeline_fimmia import MembershipInferencePipeline

    if "membership-inference" not in PIPELINE_REGISTRY.supported_tasks:
        PIPELINE_REGISTRY.register_pipeline(
            "membership-inference",
            pipeline_class=MembershipInferencePipeline,
            pt_model=AutoModelForSequenceClassification,
            default=_NoDefaultDetector(),
            type="multimodal",
        )


class _RegisterTaskOnImport(importlib.abc.MetaPathFinder):
    """Registers the pipeline task right after `transformers.pipelines` is first imported."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != "transformers.pipelines":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module: Any) -> None:
            run(module)
            _register_pipeline()

        spec.loader.exec_module = exec_module
        return spec


AutoConfig.register("fimmia", FiMMIAConfig, exist_ok=True)
AutoModel.register(FiMMIAConfig, _DetectorInAutoMappings, exist_ok=True)
AutoModelForSequenceClassification.register(FiMMIAConfig, _DetectorInAutoMappings, exist_ok=True)
if "transformers.pipelines" in sys.modules:
    _register_pipeline()
else:
    sys.meta_path.insert(0, _RegisterTaskOnImport())

"""Configuration of the FiMMIA membership-inference detector.

Self-contained on purpose (imports only `transformers`): this file is copied next to saved detectors and
doubles as Hub remote code.

Everything a model card or the `membership-inference` pipeline needs later lives here: the component model
ids (target, neighbour generator, embedders) and the settings their stages ran with, the number of neighbours,
the protocol, the decision thresholds calibrated by false-positive rate and the normalisation statistics of the
training split (true standard deviations, unlike the original's variance).
"""

import json
import math
import os
from typing import Any

from transformers import PreTrainedConfig

HEADS = ("fimmia", "loss_only", "embedding_only", "combined")
LOSS_NORMS = ("none", "std", "minmax", "periodic")
PROTOCOLS = ("paired", "member")
STAGE_SETTINGS = ("neighbor_kwargs", "embedding_kwargs", "media_embedding_kwargs", "scorer_kwargs")
COMPONENTS = ("target_model", "neighbor_model", "embedding_model", "media_embedding_model")


def component_reference(value: Any) -> Any:
    """A component model recorded so that it resolves from any folder: an existing local path becomes absolute;
    anything else (a Hub id, ``id@revision``, an absolute path) is kept as given."""
    if isinstance(value, (str, os.PathLike)) and os.path.exists(value):
        return os.path.abspath(value)
    return os.fspath(value) if isinstance(value, os.PathLike) else value


def split_reference(reference: str) -> tuple[str, str | None]:
    """``"owner/name@revision"`` -> ``("owner/name", "revision")``; a local path or a bare id has no revision
    (Hub ids cannot hold ``@``)."""
    if os.path.exists(reference) or "@" not in reference:
        return reference, None
    repo_id, _, revision = reference.rpartition("@")
    return repo_id, revision or None


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_NOT_WEIGHTS = ("training_args.bin",)  # Trainer's pickled arguments: never loaded by anyone here


class PickledWeightsError(Exception):
    """A model folder or file whose weights are pickles, which can run code when read; refused unread.

    Not an `OSError`/`ValueError`: loaders that retry on those (`transformers.pipeline` tries other classes and
    dtypes) pass this one through as it is.
    """


def _safetensors_name(name: str) -> str:
    stem = name.rsplit(".", 1)[0]
    return {"pytorch_model": "model", "adapter_model": "adapter_model"}.get(stem, stem) + ".safetensors"


def refuse_pickled_weights(path: str | os.PathLike, subfolder: str = "") -> None:
    """Stop before loading a local model whose weights exist only as pickles (``.bin``, ``.pt``, ``.pkl``, ...).

    Every loader of fimmia-hf calls this first and then loads with ``use_safetensors=True``, so a pickle is
    never opened: reading one can run arbitrary code. A folder holding safetensors weights too loads those
    (the pickles are ignored). Hub ids are not local paths: there ``use_safetensors=True`` does the refusing.
    """
    folder = os.path.join(os.fspath(path), subfolder) if subfolder else os.fspath(path)
    if os.path.isfile(folder):
        folder, names = os.path.dirname(folder), [os.path.basename(folder)]
    elif os.path.isdir(folder):
        names = sorted(os.listdir(folder))
        if any(n.endswith(".safetensors") for n in names):
            return
    else:
        return
    pickled = [n for n in names if n.endswith(PICKLE_SUFFIXES) and n not in _NOT_WEIGHTS]
    if not pickled:
        return
    source = os.path.join(folder, pickled[0])
    target = os.path.join(folder, _safetensors_name(pickled[0]))
    raise PickledWeightsError(
        f"{folder}: the weights are pickles ({', '.join(pickled)}), and fimmia-hf loads safetensors only (reading a "
        "pickle can run arbitrary code). If you trust the file, convert it once, then load the folder again:\n"
        '  python -c "import torch, safetensors.torch as st; '
        f"st.save_file({{k: v.contiguous().clone() for k, v in torch.load({source!r}, weights_only=True).items()}}, "
        f"{target!r}, metadata={{'format': 'pt'}})\"\n"
        "(a sharded checkpoint: load it with its own library and save_pretrained it, which writes safetensors)"
    )


def _is_json(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def fpr_key(level: float) -> str:
    """The key of a false-positive-rate level in ``decision_thresholds``: 0.01 -> "0.01"."""
    return f"{float(level):g}"


def _check_thresholds(thresholds: dict[str, float]) -> None:
    for key, value in thresholds.items():
        try:
            level = float(key)
        except ValueError:
            level = math.nan
        if not 0.0 < level < 1.0 or key != fpr_key(level):
            raise ValueError(f"decision_thresholds keys are FPR levels in (0, 1) written like '0.01', got {key!r}")
        if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
            raise ValueError(f"decision_thresholds[{key!r}] must be a score in [0, 1], got {value!r}")


class FiMMIAConfig(PreTrainedConfig):
    """Configuration of :class:`FiMMIAForMembershipInference`.

    Architecture
        head: ``"fimmia"`` (loss branch + text-embedding branch [+ media branch]), ``"loss_only"``,
            ``"embedding_only"`` (model-free blind control: embedding deltas only) or ``"combined"`` (the fimmia
            branches plus the sample's own statistics, with a direct linear path from them to the logits, so it can
            represent every classic attack).
        sample_statistics: names of the classic-attack scores the combined head reads (``fimmia_hf.attacks``
            names: ``loss``, ``zlib``, ``min_k_pp_20``, ``neighborhood``, ...; set by training from the columns);
            sample_statistics_mean / sample_statistics_std: their training-split mean and true std.
        statistics_projection_dim: width of the combined head's statistics branch inside the MLP (small, beside
            the direct path that carries the statistics themselves).
        embedding_dim / media_embedding_dim: sizes of the text / media embedding deltas (0 = no media branch).
        projection_dim: width of every branch output (512 in the original).
        hidden_sizes: widths of the attack MLP after the concatenated branches (512, 256, 128, 64, 32) → 2.
        dropout: dropout after every hidden layer (0.2 in the original).
        loss_norm: ``none`` | ``std`` (``(ΔL − loss_mean) / loss_std``) | ``minmax``
            (``(ΔL − loss_min) / (loss_max − loss_min)``) | ``periodic`` (learned Fourier features of ΔL).
        periodic_sigma: initial std of the periodic frequencies.
    Provenance (model card / pipeline)
        num_neighbors, modality, protocol (``paired`` base-vs-fine-tuned or ``member`` member/non-member;
        None = unknown, set by training from the data), card_data (filled by training).
        target_model, neighbor_model, embedding_model, media_embedding_model: references that resolve from any
            folder: a Hub id (``owner/name`` or ``owner/name@revision``) or an absolute path (a local path given
            relative is made absolute when the config is built).
        decision_thresholds: ``{"0.01": t, "0.05": t}``, score thresholds calibrated by training on its
            validation split (score > t ⇒ "member" keeps the FPR on those non-members at or below the level);
            None when the detector was trained without one.
        threshold: the fallback decision threshold where no calibrated one exists (score > threshold ⇒ "member").
        neighbor_kwargs / embedding_kwargs / media_embedding_kwargs / scorer_kwargs: the settings the training
            features were made with (e.g. ``{"ops": ["delete", "fill"], "seed": 3}``); the pipeline starts from
            them, so a detector from the Hub computes its features as it was trained (JSON values only).
    """

    model_type = "fimmia"

    head: str = "fimmia"
    embedding_dim: int = 4096
    media_embedding_dim: int = 0
    projection_dim: int = 512
    hidden_sizes: list[int] | tuple[int, ...] = (512, 256, 128, 64, 32)
    dropout: float = 0.2
    loss_norm: str = "std"
    loss_mean: float = 0.0
    loss_std: float = 1.0
    loss_min: float = 0.0
    loss_max: float = 1.0
    periodic_sigma: float = 10.0
    sample_statistics: list[str] | None = None
    sample_statistics_mean: list[float] | None = None
    sample_statistics_std: list[float] | None = None
    statistics_projection_dim: int = 16
    num_neighbors: int | None = None
    modality: str | None = None
    protocol: str | None = None
    target_model: str | None = None
    neighbor_model: str | None = None
    embedding_model: str | None = None
    media_embedding_model: str | None = None
    neighbor_kwargs: dict[str, Any] | None = None
    embedding_kwargs: dict[str, Any] | None = None
    media_embedding_kwargs: dict[str, Any] | None = None
    scorer_kwargs: dict[str, Any] | None = None
    threshold: float = 0.5
    decision_thresholds: dict[str, float] | None = None
    card_data: dict[str, Any] | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        self.hidden_sizes = [int(h) for h in self.hidden_sizes]
        if self.sample_statistics is not None:
            self.sample_statistics = [str(name) for name in self.sample_statistics]
            n = len(self.sample_statistics)
            self.sample_statistics_mean = [float(v) for v in self.sample_statistics_mean or [0.0] * n]
            self.sample_statistics_std = [float(v) for v in self.sample_statistics_std or [1.0] * n]
        for name in COMPONENTS:
            setattr(self, name, component_reference(getattr(self, name)))
        for name in STAGE_SETTINGS:  # tuples become lists now rather than after a save and reload
            value = getattr(self, name)
            if isinstance(value, dict) and _is_json(value):
                setattr(self, name, json.loads(json.dumps(value)))
        if self.id2label is None:
            self.id2label = {0: "non-member", 1: "member"}
            self.label2id = {"non-member": 0, "member": 1}
        kwargs.setdefault("num_labels", 2)
        super().__post_init__(**kwargs)
        self._check()

    def _check(self) -> None:
        """Fail at construction rather than in the middle of a forward pass."""
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        if self.loss_norm not in LOSS_NORMS:
            raise ValueError(f"loss_norm must be one of {LOSS_NORMS}, got {self.loss_norm!r}")
        if self.protocol is not None and self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if self.embedding_dim < 1 or self.media_embedding_dim < 0:
            raise ValueError("embedding_dim must be >= 1 and media_embedding_dim >= 0")
        if self.loss_norm == "std" and not self.loss_std > 0:
            raise ValueError(f"loss_std must be > 0 for loss_norm='std', got {self.loss_std}")
        if self.loss_norm == "minmax" and not self.loss_max > self.loss_min:
            raise ValueError(f"loss_max ({self.loss_max}) must exceed loss_min ({self.loss_min}) for 'minmax'")
        if self.loss_norm == "periodic" and self.projection_dim % 2:
            raise ValueError("projection_dim must be even for loss_norm='periodic' (cos and sin halves)")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")
        if self.decision_thresholds is not None:
            if not isinstance(self.decision_thresholds, dict):
                raise ValueError(f"decision_thresholds must be a dict like {{'0.01': 0.93}}, got {self.decision_thresholds!r}")
            _check_thresholds(self.decision_thresholds)
        if self.head == "combined":
            self._check_statistics()
        for name in STAGE_SETTINGS:
            value = getattr(self, name)
            if value is not None and not (isinstance(value, dict) and _is_json(value)):
                raise ValueError(f"{name} must be a dict of JSON values (it is saved in config.json), got {value!r}")

    def _check_statistics(self) -> None:
        names = self.sample_statistics
        if not names:
            raise ValueError("head 'combined' needs sample_statistics: the names of the classic-attack scores it reads")
        if len(set(names)) != len(names):
            raise ValueError(f"sample_statistics lists a name twice: {names}")
        for key in ("sample_statistics_mean", "sample_statistics_std"):
            values = getattr(self, key)
            if len(values) != len(names) or not all(math.isfinite(v) for v in values):
                raise ValueError(f"{key} must hold one finite value per statistic ({len(names)}), got {values}")
        if not all(v > 0 for v in self.sample_statistics_std):
            raise ValueError(f"sample_statistics_std must be > 0, got {self.sample_statistics_std}")
        if self.statistics_projection_dim < 1:
            raise ValueError(f"statistics_projection_dim must be >= 1, got {self.statistics_projection_dim}")

    def set_normalization(self, stats: dict[str, Any]) -> None:
        """Store statistics of the training split: from :func:`fimmia_hf.features.fit_normalization` (``loss_mean``,
        ``loss_std``, ``loss_min``, ``loss_max``) or :func:`fimmia_hf.features.fit_statistics` (``sample_statistics``,
        ``sample_statistics_mean``, ``sample_statistics_std``); unknown keys are rejected so a typo cannot silently
        keep the defaults."""
        scalars = {"loss_mean", "loss_std", "loss_min", "loss_max"}
        lists = {"sample_statistics", "sample_statistics_mean", "sample_statistics_std"}
        unknown = set(stats) - scalars - lists
        if unknown:
            raise ValueError(f"unknown normalisation statistics {sorted(unknown)}; expected {sorted(scalars | lists)}")
        for key, value in stats.items():
            if key == "sample_statistics":
                value = [str(v) for v in value]
            elif key in lists:
                value = [float(v) for v in value]
            else:
                value = float(value)
            setattr(self, key, value)
        self._check()

    @property
    def uses_loss(self) -> bool:
        return self.head in ("fimmia", "loss_only", "combined")

    @property
    def uses_embeddings(self) -> bool:
        return self.head in ("fimmia", "embedding_only", "combined")

    @property
    def uses_statistics(self) -> bool:
        return self.head == "combined"

    @property
    def uses_media(self) -> bool:
        return self.uses_embeddings and self.media_embedding_dim > 0


__all__ = ["COMPONENTS", "FiMMIAConfig", "PickledWeightsError", "component_reference", "refuse_pickled_weights",
           "split_reference"]


FiMMIAConfig.register_for_auto_class()  # saved detectors carry this file: `trust_remote_code=True` works anywhere

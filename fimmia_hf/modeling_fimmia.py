"""The FiMMIA detector as a `transformers.PreTrainedModel`.

Self-contained (only a relative import of the configuration): this file is copied next to saved detectors
and doubles as Hub remote code.

Each (sample, neighbour) pair is classified from its deltas (neighbour minus original): the target-model
loss delta ΔL_k, the text-embedding delta Δe_k and optionally the media-embedding delta Δm_k. The sample
score is the mean P(member) over its valid neighbours.

Deltas cannot see how low a sample's loss is, which is the strongest signal once a target memorises, so the
``combined`` head also reads the sample's own statistics (the classic attacks' scores: loss, zlib ratio, Min-K%++,
MaxRényi, neighbourhood...), z-normalised with training-split statistics, through a small MLP branch and a
direct linear path to the logits. The direct path makes every classic attack one setting of the weights (a
single statistic, the rest zero), which a logistic fit on 64 samples can still find.

Module names follow the original's released layout (`loss_component`, `embedding_component`,
`attack_encoding`), so its weights load by name; unlike the original there is no ReLU on the logits (it clamped
them at 0, turning P into 0.5).
"""

import math
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .configuration_fimmia import FiMMIAConfig, PickledWeightsError, refuse_pickled_weights


@dataclass
class MembershipInferenceOutput(ModelOutput):
    """Output of :class:`FiMMIAForMembershipInference`.

    loss: cross-entropy over valid neighbours (each neighbour carries its sample's label), when labels are given.
    logits: ``[B, K, 2]`` per-neighbour logits (non-member, member).
    scores: ``[B]`` mean P(member) over valid neighbours; NaN for a sample without any valid neighbour.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    scores: torch.Tensor | None = None


class PeriodicEmbedding(nn.Module):
    """Learned Fourier features of a scalar: ``[cos(2π c x), sin(2π c x)]`` with ``c ~ N(0, σ²)`` learnable."""

    def __init__(self, n_frequencies: int, sigma: float) -> None:
        super().__init__()
        self.sigma = sigma
        self.coefficients = nn.Parameter(torch.empty(n_frequencies))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        angles = 2 * math.pi * self.coefficients * x
        return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def _projection(in_dim: int, out_dim: int, dropout: float) -> nn.Sequential:
    """Two-layer encoder of an embedding delta: in → in/2 → out (original layout: Linear, Dropout, ReLU ×2)."""
    half = max(in_dim // 2, 1)
    return nn.Sequential(
        nn.Linear(in_dim, half), nn.Dropout(dropout), nn.ReLU(),
        nn.Linear(half, out_dim), nn.Dropout(dropout), nn.ReLU(),
    )


class FiMMIAForMembershipInference(PreTrainedModel):
    """Per-neighbour membership classifier with per-sample mean aggregation.

    Inputs: ``loss_delta [B, K]``, ``embedding_delta [B, K, D]``, optional ``media_delta [B, K, Dm]``,
    ``sample_statistics [B, S]`` (combined head: the raw statistics named by ``config.sample_statistics``),
    ``neighbor_mask [B, K]`` (bool or 0/1; invalid entries may hold NaN, they never reach the network),
    optional ``labels [B]`` (1 = member). Heads: ``fimmia``, ``loss_only``, ``embedding_only``, ``combined``.
    """

    config_class = FiMMIAConfig
    base_model_prefix = "fimmia"
    main_input_name = "loss_delta"
    _no_split_modules: list[str] = []

    def __init__(self, config: FiMMIAConfig) -> None:
        super().__init__(config)
        p, dropout = config.projection_dim, config.dropout
        n_blocks = 0
        if config.uses_loss:
            if config.loss_norm == "periodic":
                self.loss_component = nn.Sequential(
                    PeriodicEmbedding(p // 2, config.periodic_sigma), nn.Linear(p, p), nn.Dropout(dropout), nn.ReLU()
                )
            else:
                self.loss_component = nn.Sequential(nn.Linear(1, p), nn.Dropout(dropout), nn.ReLU())
            n_blocks += 1
        if config.uses_embeddings:
            self.embedding_component = _projection(config.embedding_dim, p, dropout)
            n_blocks += 1
        if config.uses_media:
            self.media_component = _projection(config.media_embedding_dim, p, dropout)
            n_blocks += 1
        width = n_blocks * p
        if config.uses_statistics:
            n_stats, sp = len(config.sample_statistics), config.statistics_projection_dim
            self.statistics_component = nn.Sequential(nn.Linear(n_stats, sp), nn.Dropout(dropout), nn.ReLU())
            self.statistics_logits = nn.Linear(n_stats, 2)  # the direct path: a logistic regression on the statistics
            width += sp
        layers: list[nn.Module] = []
        for hidden in config.hidden_sizes:
            layers += [nn.Linear(width, hidden), nn.Dropout(dropout), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, 2))
        self.attack_encoding = nn.Sequential(*layers)
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
        """`PreTrainedModel.from_pretrained`, safetensors only: pickled weights are refused before being read."""
        refuse_pickled_weights(pretrained_model_name_or_path, kwargs.get("subfolder") or "")
        return super().from_pretrained(pretrained_model_name_or_path, *args, **{**kwargs, "use_safetensors": True})

    def _init_weights(self, module: nn.Module) -> None:
        """PyTorch's default Linear init (as the original used); N(0, 0.02) starves this deep ReLU MLP."""
        if isinstance(module, nn.Linear):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                bound = 1 / math.sqrt(module.in_features) if module.in_features > 0 else 0
                init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, PeriodicEmbedding):
            init.normal_(module.coefficients, mean=0.0, std=module.sigma)

    def normalize_statistics(self, statistics: torch.Tensor) -> torch.Tensor:
        """z-normalise the sample statistics with the training-split mean and std stored in the config."""
        cfg = self.config
        mean = torch.tensor(cfg.sample_statistics_mean, dtype=statistics.dtype, device=statistics.device)
        std = torch.tensor(cfg.sample_statistics_std, dtype=statistics.dtype, device=statistics.device)
        return (statistics - mean) / std

    def normalize_loss(self, loss_delta: torch.Tensor) -> torch.Tensor:
        """Apply the configured ΔL normalisation with the statistics stored in the config."""
        cfg = self.config
        if cfg.loss_norm == "std":
            return (loss_delta - cfg.loss_mean) / cfg.loss_std
        if cfg.loss_norm == "minmax":
            return (loss_delta - cfg.loss_min) / (cfg.loss_max - cfg.loss_min)
        return loss_delta

    def _check_statistics(self, statistics: torch.Tensor | None, batch: int) -> None:
        names = self.config.sample_statistics
        if statistics is None:
            raise ValueError(f"head 'combined' needs sample_statistics [batch, {len(names)}] ({', '.join(names)})")
        if tuple(statistics.shape) != (batch, len(names)):
            raise ValueError(f"sample_statistics must be [{batch}, {len(names)}], got shape {tuple(statistics.shape)}")

    def _check_inputs(
        self,
        loss_delta: torch.Tensor | None,
        embedding_delta: torch.Tensor | None,
        media_delta: torch.Tensor | None,
    ) -> tuple[int, int]:
        cfg = self.config
        shapes = []
        if cfg.uses_loss:
            if loss_delta is None:
                raise ValueError(f"head {cfg.head!r} needs loss_delta [batch, K]")
            if loss_delta.dim() != 2:
                raise ValueError(f"loss_delta must be [batch, K], got shape {tuple(loss_delta.shape)}")
            shapes.append(tuple(loss_delta.shape))
        for name, value, dim, used in (
            ("embedding_delta", embedding_delta, cfg.embedding_dim, cfg.uses_embeddings),
            ("media_delta", media_delta, cfg.media_embedding_dim, cfg.uses_media),
        ):
            if not used:
                continue
            if value is None:
                raise ValueError(f"head {cfg.head!r} needs {name} [batch, K, {dim}]")
            if value.dim() != 3 or value.shape[-1] != dim:
                raise ValueError(f"{name} must be [batch, K, {dim}], got shape {tuple(value.shape)}")
            shapes.append(tuple(value.shape[:2]))
        if len(set(shapes)) != 1:
            raise ValueError(f"feature tensors disagree on [batch, K]: {shapes}")
        return shapes[0]

    def forward(
        self,
        loss_delta: torch.Tensor | None = None,
        embedding_delta: torch.Tensor | None = None,
        media_delta: torch.Tensor | None = None,
        sample_statistics: torch.Tensor | None = None,
        neighbor_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> MembershipInferenceOutput | tuple:
        # A [B] loss delta / [B, D] embedding delta means one neighbour per sample.
        if loss_delta is not None and loss_delta.dim() == 1:
            loss_delta = loss_delta[:, None]
        if embedding_delta is not None and embedding_delta.dim() == 2:
            embedding_delta = embedding_delta[:, None]
        if media_delta is not None and media_delta.dim() == 2:
            media_delta = media_delta[:, None]
        batch, k = self._check_inputs(loss_delta, embedding_delta, media_delta)
        device = next(self.parameters()).device
        if neighbor_mask is None:
            mask = torch.ones(batch, k, dtype=torch.bool, device=device)
        else:
            mask = neighbor_mask.to(device=device).bool()
            if tuple(mask.shape) != (batch, k):
                raise ValueError(f"neighbor_mask must be [{batch}, {k}], got {tuple(mask.shape)}")

        dtype = self.attack_encoding[0].weight.dtype
        statistics = None
        if self.config.uses_statistics:
            self._check_statistics(sample_statistics, batch)
            s = sample_statistics.to(device=device, dtype=dtype)
            known = torch.isfinite(s).all(-1)
            mask = mask & known[:, None]  # a sample without its statistics has no valid neighbour
            statistics = self.normalize_statistics(torch.where(known[:, None], s, torch.zeros_like(s)))
        blocks = []
        if self.config.uses_loss:
            x = loss_delta.to(device=device, dtype=dtype)
            x = torch.where(mask, x, torch.zeros_like(x))  # NaN in masked slots must not reach the network
            blocks.append(self.loss_component(self.normalize_loss(x).reshape(-1, 1)))
        if self.config.uses_embeddings:
            e = embedding_delta.to(device=device, dtype=dtype)
            e = torch.where(mask[..., None], e, torch.zeros_like(e))
            blocks.append(self.embedding_component(e.reshape(batch * k, -1)))
        if self.config.uses_media:
            m = media_delta.to(device=device, dtype=dtype)
            m = torch.where(mask[..., None], m, torch.zeros_like(m))
            blocks.append(self.media_component(m.reshape(batch * k, -1)))
        if statistics is not None:
            blocks.append(self.statistics_component(statistics).repeat_interleave(k, dim=0))
        logits = self.attack_encoding(torch.cat(blocks, dim=-1)).reshape(batch, k, 2)
        if statistics is not None:
            logits = logits + self.statistics_logits(statistics)[:, None, :]

        weights = mask.to(logits.dtype)
        p_member = logits.float().softmax(-1)[..., 1]
        counts = weights.sum(-1)
        scores = (p_member * weights).sum(-1) / counts
        scores = torch.where(counts > 0, scores, torch.full_like(scores, float("nan")))

        loss = None
        if labels is not None:
            per_neighbor = labels.to(device).long()[:, None].expand(batch, k)
            if mask.any():
                loss = nn.functional.cross_entropy(logits[mask].float(), per_neighbor[mask])
            else:  # keeps the graph (and DDP) alive on a batch without valid neighbours
                loss = logits.sum() * 0.0

        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if not return_dict:
            out = (logits, scores)
            return ((loss,) + out) if loss is not None else out
        return MembershipInferenceOutput(loss=loss, logits=logits, scores=scores)

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        """Also name ``AutoModel`` in ``auto_map`` (``register_for_auto_class`` records one class), so both
        ``AutoModel`` and ``AutoModelForSequenceClassification`` load the remote code where fimmia_hf is absent."""
        name = f"{type(self).__module__.rsplit('.', 1)[-1]}.{type(self).__name__}"
        self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), "AutoModel": name}
        super().save_pretrained(save_directory, *args, **kwargs)

    @classmethod
    def from_original_checkpoint(
        cls, path: str | os.PathLike, *, sigmas: dict[str, float] | None = None, **config_kwargs: Any
    ) -> "FiMMIAForMembershipInference":
        """Import weights released by the original FiMMIA (``ai-forever/FiMMIA-*``, BaseLine/ModalityAll V2 family).

        ``path``: a ``.safetensors`` file or a folder holding ``model.safetensors`` (safetensors only; no pickles).
        Sizes and the periodic/media variants are read from the tensors; ``config_kwargs`` set the rest
        (``loss_norm``, ``target_model``, …). Those weights were trained on deltas *neighbour − original*, our
        convention. ``sigmas`` takes one entry of the original's ``sigmas.json`` (``{"mean": μ, "std": v}``): the
        original divided by that stored value (a variance, bug), so it becomes ``loss_std`` verbatim to reproduce
        the released behaviour, with ``loss_norm="std"``. The original's final ReLU on the logits is dropped.
        """
        from safetensors.torch import load_file

        refuse_pickled_weights(path)
        file = os.fspath(path)
        if os.path.isdir(file):
            file = os.path.join(file, "model.safetensors")
        if not os.path.isfile(file):
            raise FileNotFoundError(f"no safetensors weights at {file}")
        state = load_file(file)
        renamed = {
            key.replace("modality_embedding_component.", "media_component.", 1): value for key, value in state.items()
        }
        try:
            embedding_dim = renamed["embedding_component.0.weight"].shape[1]
            projection_dim = renamed["embedding_component.3.weight"].shape[0]
            attack_in = renamed["attack_encoding.0.weight"].shape[1]
        except KeyError as err:
            raise ValueError(f"{file} does not have the original FiMMIA layout (missing {err})") from None
        periodic = "loss_component.0.coefficients" in renamed
        media_dim = renamed["media_component.0.weight"].shape[1] if "media_component.0.weight" in renamed else 0
        linear_ids = sorted(
            int(k.split(".")[1]) for k in renamed if k.startswith("attack_encoding.") and k.endswith(".weight")
        )
        hidden = [renamed[f"attack_encoding.{i}.weight"].shape[0] for i in linear_ids[:-1]]
        kwargs: dict[str, Any] = dict(
            head="fimmia",
            embedding_dim=int(embedding_dim),
            media_embedding_dim=int(media_dim),
            projection_dim=int(projection_dim),
            hidden_sizes=hidden,
            loss_norm="periodic" if periodic else "none",
        )
        if sigmas is not None:
            kwargs.update(loss_norm="std", loss_mean=float(sigmas["mean"]), loss_std=float(sigmas["std"]))
        kwargs.update(config_kwargs)
        if periodic and kwargs["loss_norm"] != "periodic":
            raise ValueError("checkpoint has a periodic loss branch; loss_norm must stay 'periodic'")
        n_blocks = 3 if media_dim else 2
        if attack_in != n_blocks * projection_dim:
            raise ValueError(f"{file}: attack input width {attack_in} != {n_blocks} x projection {projection_dim}")
        model = cls(cls.config_class(**kwargs))
        missing, unexpected = model.load_state_dict(renamed, strict=False)
        if missing or unexpected:
            raise ValueError(f"{file}: layout mismatch; missing {sorted(missing)}, unexpected {sorted(unexpected)}")
        return model.eval()


__all__ = [
    "FiMMIAForMembershipInference", "MembershipInferenceOutput", "PeriodicEmbedding", "PickledWeightsError",
    "refuse_pickled_weights",
]


FiMMIAForMembershipInference.register_for_auto_class("AutoModelForSequenceClassification")

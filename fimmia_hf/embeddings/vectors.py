"""What both embedders share: the compute dtype, pooling over a mask, normalisation, float32 output."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from datasets import Sequence, Value

if TYPE_CHECKING:  # torch loads lazily: `import fimmia_hf` stays light
    import torch

POOLING_MODES = ("last", "mean", "cls", "max", "mean_sqrt_len", "weightedmean")
VECTOR = Sequence(Value("float32"))
VECTORS = Sequence(Sequence(Value("float32")))


def resolve_dtype(dtype: Any, device: torch.device) -> torch.dtype:
    """"auto": float32 on CPU (exact, and CPU half precision is slow), bfloat16 on a GPU that has it."""
    import torch

    if dtype is None or dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype, None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}; use e.g. 'float32', 'bfloat16', 'float16' or 'auto'")
        return resolved
    return dtype


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Pool `[batch, seq, dim]` hidden states over the positions where `mask` is 1.

    Every mode finds the real tokens from the mask, never from the row length, so it is correct
    whether the batch was padded on the left or on the right.
    """
    import torch

    hidden = hidden.float()
    m = mask.to(hidden.device).float()
    if mode == "cls":  # the first real token
        return hidden[torch.arange(len(hidden), device=hidden.device), m.argmax(dim=1)]
    if mode == "last":  # the last real token
        positions = torch.arange(m.shape[1], device=hidden.device).float()
        return hidden[torch.arange(len(hidden), device=hidden.device), (m * positions).argmax(dim=1)]
    m3 = m.unsqueeze(-1)
    if mode == "max":
        return hidden.masked_fill(m3 == 0, torch.finfo(hidden.dtype).min).max(dim=1).values
    if mode == "weightedmean":  # position weights 1, 2, ... counted from the first real token
        weights = (m.cumsum(dim=1) * m).unsqueeze(-1)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
    summed, count = (hidden * m3).sum(dim=1), m3.sum(dim=1).clamp(min=1e-9)
    if mode == "mean":
        return summed / count
    if mode == "mean_sqrt_len":
        return summed / count.sqrt()
    raise ValueError(f"unknown pooling {mode!r}; expected one of {', '.join(POOLING_MODES)}")


def normalize(x: torch.Tensor) -> torch.Tensor:
    import torch

    return torch.nn.functional.normalize(x.float(), p=2, dim=-1)


def to_float32(x: torch.Tensor) -> np.ndarray:
    return x.detach().float().cpu().numpy().astype(np.float32, copy=False)

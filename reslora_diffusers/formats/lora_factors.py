"""One low-rank update of an ``nn.Linear`` (``LoRAFactors``) and the formula of its weight delta."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)  # eq on tensors would be ambiguous; identity is the honest equality
class LoRAFactors:
    """One low-rank update of an ``nn.Linear``: ``ΔW = (alpha / rank) · up @ down``."""

    down: torch.Tensor  # [rank, in_features]
    up: torch.Tensor  # [out_features, rank]
    alpha: float  # the real lora_alpha of this module

    def __post_init__(self):
        if not (isinstance(self.down, torch.Tensor) and isinstance(self.up, torch.Tensor)):
            raise ValueError("LoRAFactors.down and .up must be torch.Tensors")
        if self.down.ndim != 2 or self.up.ndim != 2:
            raise ValueError(
                f"LoRAFactors supports nn.Linear only: down must be [rank, in] and up [out, rank], "
                f"got down {tuple(self.down.shape)} and up {tuple(self.up.shape)}"
            )
        if self.up.shape[1] != self.down.shape[0]:
            raise ValueError(
                f"rank mismatch: down {tuple(self.down.shape)} has rank {self.down.shape[0]}, "
                f"up {tuple(self.up.shape)} has rank {self.up.shape[1]}"
            )
        if not (self.down.is_floating_point() and self.up.is_floating_point()):
            raise ValueError(f"LoRA factors must be floating point, got {self.down.dtype} and {self.up.dtype}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"alpha must be a positive finite number, got {self.alpha!r}")

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def lora_delta(f: LoRAFactors) -> torch.Tensor:
    """ΔW = (alpha / rank) · up @ down in fp32: the one place this formula lives."""
    return f.scale * (f.up.float() @ f.down.float())

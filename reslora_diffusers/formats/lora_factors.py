"""One low-rank update of an ``nn.Linear`` or ``nn.Conv2d`` (``LoRAFactors``) and the formula of its weight delta."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)  # eq on tensors would be ambiguous; identity is the honest equality
class LoRAFactors:
    """One low-rank update of a layer: ``ΔW = (alpha / rank) · up @ down``.

    An ``nn.Linear``'s factors are matrices; a ``nn.Conv2d``'s are LoCon's (kohya, LyCORIS, PEFT): ``down`` the
    [rank, in, kh, kw] kernel of a conv to rank channels, ``up`` a [out, rank, 1, 1] 1×1 conv, and ΔW the product
    of their flattenings reshaped to the conv weight's [out, in, kh, kw].
    """

    down: torch.Tensor  # [rank, in_features] or [rank, in_channels, kh, kw]
    up: torch.Tensor  # [out_features, rank] or [out_channels, rank, 1, 1]
    alpha: float  # the real lora_alpha of this module

    def __post_init__(self):
        if not (isinstance(self.down, torch.Tensor) and isinstance(self.up, torch.Tensor)):
            raise ValueError("LoRAFactors.down and .up must be torch.Tensors")
        linear = self.down.ndim == 2 and self.up.ndim == 2
        conv = self.down.ndim == 4 and self.up.ndim == 4 and tuple(self.up.shape[2:]) == (1, 1)
        if not (linear or conv):
            raise ValueError(
                "LoRAFactors holds an nn.Linear's (down [rank, in], up [out, rank]) or a Conv2d's LoCon factors "
                f"(down [rank, in, kh, kw], up [out, rank, 1, 1]), got down {tuple(self.down.shape)} and up {tuple(self.up.shape)}"
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

    @property
    def is_conv(self) -> bool:
        return self.down.ndim == 4

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """The shape of the layer's weight: [out, in] or [out, in, kh, kw]."""
        return (self.up.shape[0], *self.down.shape[1:])

    def matrices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(up [out, rank], down [rank, in·kh·kw]): the factors as matrices of the flattened weight."""
        return self.up.flatten(1), self.down.flatten(1)

    def with_matrices(self, up: torch.Tensor, down: torch.Tensor, alpha: float) -> "LoRAFactors":
        """Factors of the same layer from new matrices (e.g. of another rank), in this layer's file shapes."""
        if self.is_conv:
            up, down = locon_shapes(up, down, self.down.shape[1:])
        return LoRAFactors(down=down.contiguous(), up=up.contiguous(), alpha=alpha)


def locon_shapes(up: torch.Tensor, down: torch.Tensor, kernel: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Matrices (up [out, R], down [R, in·kh·kw]) as LoCon's tensors: up [out, R, 1, 1], down [R, in, kh, kw]
    (`kernel` = (in, kh, kw)); the flattening is the conv weight's own (`weight.reshape(out, -1)`)."""
    return up.reshape(*up.shape, 1, 1), down.reshape(down.shape[0], *kernel)


def lora_delta(f: LoRAFactors) -> torch.Tensor:
    """ΔW = (alpha / rank) · up @ down in fp32, in the layer weight's shape: the one place this formula lives."""
    up, down = f.matrices()
    return (f.scale * (up.float() @ down.float())).reshape(f.weight_shape)

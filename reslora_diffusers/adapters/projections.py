"""How a block's factors act on its layer's input: matrices on an `nn.Linear`'s features, or LoCon's pair of
convolutions on an `nn.Conv2d`'s channels (a k×k down-projection with the layer's stride / padding / dilation to
rank r, then a 1×1 up-projection).

A block stores A as [r, in·kh·kw] and B as [out, r] for both kinds. A conv LoRA *is* a linear LoRA of the conv
weight flattened to [out, in·kh·kw] (its im2col view, `rows`): ΔW = B·A reshaped to [out, in, kh, kw]. So every
formula of SPEC §1-3 (the variants' branches, `bs`'s concatenation, the α of `is` / `ms`, the calibrated fit) is the
same matrix algebra on convolutions, and only this module and the files (4-D LoCon tensors) see the kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from reslora_diffusers.formats.lora_factors import locon_shapes


@dataclass(frozen=True)
class LinearProjection:
    in_features: int
    out_features: int

    def down(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight)

    def up(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(h, weight)

    def dense(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """x through the flat weight change `delta` [out, in_features]."""
        return F.linear(x, delta)

    def positions(self, x: torch.Tensor) -> int:
        """How many times the layer applies its weight to `x` (tokens), for the cost of `bs`'s two paths."""
        return x.numel() // self.in_features

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """`x` as [positions, in_features]: what the flat weight multiplies (the calibrated merges' statistics)."""
        return x.reshape(-1, self.in_features)

    def file_factors(self, up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(up, down) in the shape files store: [out, r] and [r, in] for a Linear."""
        return up, down

    def to_dict(self) -> dict:
        return {}


@dataclass(frozen=True)
class ConvProjection:
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]

    @property
    def in_features(self) -> int:
        return self.in_channels * self.kernel_size[0] * self.kernel_size[1]

    @property
    def out_features(self) -> int:
        return self.out_channels

    def _kernel(self, flat: torch.Tensor, channels: int) -> torch.Tensor:
        return flat.view(flat.shape[0], channels, *self.kernel_size)

    def down(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        kernel = self._kernel(weight, self.in_channels)
        return F.conv2d(x, kernel, stride=self.stride, padding=self.padding, dilation=self.dilation)

    def up(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.conv2d(h, weight[:, :, None, None])  # 1×1: a matrix on the channels at every position

    def dense(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        kernel = self._kernel(delta, self.in_channels)
        return F.conv2d(x, kernel, stride=self.stride, padding=self.padding, dilation=self.dilation)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        sizes = []
        for size, k, s, p, d in zip((height, width), self.kernel_size, self.stride, self.padding, self.dilation):
            sizes.append((size + 2 * p - d * (k - 1) - 1) // s + 1)
        return sizes[0], sizes[1]

    def positions(self, x: torch.Tensor) -> int:
        height, width = self.output_size(*x.shape[-2:])
        return (x.numel() // (self.in_channels * x.shape[-2] * x.shape[-1])) * height * width

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        # unfold orders each patch channel-major, then kernel rows and columns: the order of weight.reshape(out, -1).
        patches = F.unfold(x, self.kernel_size, dilation=self.dilation, padding=self.padding, stride=self.stride)
        return patches.transpose(1, 2).reshape(-1, self.in_features)

    def file_factors(self, up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """LoCon's shapes: lora_up [out, r, 1, 1], lora_down [r, in, kh, kw]."""
        return locon_shapes(up, down, (self.in_channels, *self.kernel_size))

    def to_dict(self) -> dict:
        return {
            "conv": {
                "in_channels": self.in_channels,
                "kernel_size": list(self.kernel_size),
                "stride": list(self.stride),
                "padding": list(self.padding),
                "dilation": list(self.dilation),
            }
        }


Projection = LinearProjection | ConvProjection


def projection_of(layer: nn.Module, name: str) -> Projection:
    """The projection of a target layer; a conv a LoCon pair cannot reproduce is refused by name."""
    if isinstance(layer, nn.Linear):
        return LinearProjection(layer.in_features, layer.out_features)
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1 or layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            raise ValueError(
                f"{name}: conv adapters need groups=1, zero padding given as numbers (this Conv2d has groups="
                f"{layer.groups}, padding={layer.padding!r}, padding_mode={layer.padding_mode!r})"
            )
        return ConvProjection(
            layer.in_channels, layer.out_channels, tuple(layer.kernel_size), tuple(layer.stride),
            tuple(layer.padding), tuple(layer.dilation),
        )  # fmt: skip
    raise ValueError(f"{name}: adapters target nn.Linear and nn.Conv2d layers, not {type(layer).__name__}")


def projection_from_dict(in_features: int, out_features: int, data: dict) -> Projection:
    """Inverse of `to_dict` with the layer's flat shape (files written before conv adapters have no "conv")."""
    conv = data.get("conv")
    if conv is None:
        return LinearProjection(in_features, out_features)
    try:
        pairs = {key: tuple(int(v) for v in conv[key]) for key in ("kernel_size", "stride", "padding", "dilation")}
        return ConvProjection(int(conv["in_channels"]), out_features, **pairs)
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"a layer's \"conv\" entry is incomplete or malformed: {conv!r}") from None

"""Chains (SPEC §2): which blocks link to which, found once from a probe forward pass and saved with the adapter.

Blocks are numbered in forward-execution order, which a probe pass observes; `named_modules()` order is
not execution order (diffusers registers up_blocks before mid_block). A chain gathers the blocks of one
projection (e.g. every `to_q`, or every ResNet `conv1`) whose weights have the same shape (for a conv: the same
kernel, stride, padding and dilation too) and, for `is` / `ms`, whose inputs have the same shape at run time
(attention layers at different resolutions see different token counts).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from reslora_diffusers.adapters.projections import Projection, projection_from_dict, projection_of
from reslora_diffusers.adapters.variants import variant_of


@dataclass(frozen=True)
class ProbedLayer:
    """A target layer (Linear or Conv2d) as the probe pass saw it. `input_shape` excludes the batch dimension."""

    name: str
    target: str
    projection: Projection
    input_shape: tuple[int, ...]

    @property
    def in_features(self) -> int:
        return self.projection.in_features

    @property
    def out_features(self) -> int:
        return self.projection.out_features

    def to_dict(self) -> dict:
        return {
            "target": self.target,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "input_shape": list(self.input_shape),
            **self.projection.to_dict(),
        }

    @classmethod
    def from_dict(cls, name: str, data: dict) -> "ProbedLayer":
        projection = projection_from_dict(data["in_features"], data["out_features"], data)
        return cls(name, data["target"], projection, tuple(data["input_shape"]))


def run_with_pre_hooks(hooks: list[tuple[nn.Module, Callable]], run: Callable[[], object]) -> None:
    """Runs `run` once without gradients with each (module, forward pre-hook) installed, and removes them after."""
    handles = [module.register_forward_pre_hook(hook) for module, hook in hooks]
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()


def probe_execution_order(
    layers: dict[str, tuple[str, nn.Module]], run_forward: Callable[[], object]
) -> list[ProbedLayer]:
    """Runs `run_forward` once with hooks on `layers` ({name: (target, Linear or Conv2d)}); returns them in call order."""
    seen: dict[str, ProbedLayer] = {}

    def make_hook(name: str, target: str, projection: Projection):
        def hook(_module, args):
            if name not in seen:
                seen[name] = ProbedLayer(name, target, projection, tuple(args[0].shape[1:]))

        return hook

    hooks = [(layer, make_hook(name, target, projection_of(layer, name))) for name, (target, layer) in layers.items()]
    run_with_pre_hooks(hooks, run_forward)
    missing = sorted(set(layers) - set(seen))
    if missing:
        raise RuntimeError(f"the probe forward pass never called these adapter targets: {missing[:5]}")
    return list(seen.values())


def build_chains(probed: list[ProbedLayer], res_type: str) -> list[list[str]]:
    """Groups probed layers (in execution order) into chains; a chain lists block names, first to run first."""
    variant = variant_of(res_type)
    chains: dict[tuple, list[str]] = {}
    for layer in probed:
        key = (layer.target, layer.projection)
        if variant.reads_earlier_inputs:  # a block adds an earlier block's input or A·x: the shapes must match
            key += (layer.input_shape,)
        chains.setdefault(key, []).append(layer.name)
    return list(chains.values())


def predecessors(chain: list[str], position: int, res_type: str, pre_num: int) -> list[str]:
    """The earlier blocks that block `chain[position]` links to, nearest first (n-1, n-2, …)."""
    return variant_of(res_type).predecessors(chain[:position][::-1], pre_num)

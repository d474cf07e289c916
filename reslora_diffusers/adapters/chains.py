"""Chains (SPEC §2): which blocks link to which, found once from a probe forward pass and saved with the adapter.

Blocks are numbered in forward-execution order, which a probe pass observes; `named_modules()` order is
not execution order (diffusers registers up_blocks before mid_block). A chain gathers the blocks of one
projection (e.g. every `to_q`) whose weights have the same shape and, for `is` / `ms`, whose inputs have
the same shape at run time (attention layers at different resolutions see different token counts).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from reslora_diffusers.adapters.variants import variant_of


@dataclass(frozen=True)
class ProbedLayer:
    """A target linear layer as the probe pass saw it. `input_shape` excludes the batch dimension."""

    name: str
    target: str
    in_features: int
    out_features: int
    input_shape: tuple[int, ...]

    def to_dict(self) -> dict:
        return {
            "target": self.target,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "input_shape": list(self.input_shape),
        }


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
    layers: dict[str, tuple[str, nn.Linear]], run_forward: Callable[[], object]
) -> list[ProbedLayer]:
    """Runs `run_forward` once with hooks on `layers` ({name: (target, linear)}) and returns them in call order."""
    seen: dict[str, ProbedLayer] = {}

    def make_hook(name: str, target: str, linear: nn.Linear):
        def hook(_module, args):
            if name not in seen:
                seen[name] = ProbedLayer(name, target, linear.in_features, linear.out_features, tuple(args[0].shape[1:]))

        return hook

    hooks = [(linear, make_hook(name, target, linear)) for name, (target, linear) in layers.items()]
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
        key = (layer.target, layer.in_features, layer.out_features)
        if variant.reads_earlier_inputs:  # a block adds an earlier block's input or A·x: the shapes must match
            key += (layer.input_shape,)
        chains.setdefault(key, []).append(layer.name)
    return list(chains.values())


def predecessors(chain: list[str], position: int, res_type: str, pre_num: int) -> list[str]:
    """The earlier blocks that block `chain[position]` links to, nearest first (n-1, n-2, …)."""
    return variant_of(res_type).predecessors(chain[:position][::-1], pre_num)

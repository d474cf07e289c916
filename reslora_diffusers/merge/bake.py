"""Merged factors into the base weights (for a while, or for good), and their SVD re-compression to a lower rank."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from reslora_diffusers.adapters.adapter import ResLoRAAdapter
from reslora_diffusers.formats import LoRAFactors, lora_delta


def weight_updates(adapter: ResLoRAAdapter, factors: dict[str, LoRAFactors]) -> dict[str, torch.Tensor]:
    """What to add to each base weight to get the merged model (fp32); the base is never moved (Delta-LoRA too)."""
    return {name: lora_delta(f).to(adapter.base_layers[name].weight.device) for name, f in factors.items()}


@contextlib.contextmanager
def baked_weights(adapter: ResLoRAAdapter, factors: dict[str, LoRAFactors]) -> Iterator[None]:
    """Inside the block the model runs with merged weights and no branches; afterwards it is exactly as before."""
    updates = weight_updates(adapter, factors)
    saved = {name: adapter.base_layers[name].weight.detach().clone() for name in updates}
    try:
        with torch.no_grad():
            for name, update in updates.items():
                weight = adapter.base_layers[name].weight
                weight.copy_((weight.float() + update).to(weight.dtype))
        for block in adapter.blocks.values():
            block.active = False
        yield
    finally:
        with torch.no_grad():
            for name, weight in saved.items():
                adapter.base_layers[name].weight.copy_(weight)
        for block in adapter.blocks.values():
            block.active = True


@torch.no_grad()
def merge_into_base(adapter: ResLoRAAdapter, factors: dict[str, LoRAFactors]) -> None:
    """Bakes the factors into the base weights and takes the adapter out: the base costs what it cost before."""
    updates = weight_updates(adapter, factors)
    adapter.remove()
    for name, update in updates.items():
        weight = adapter.base_layers[name].weight
        weight.copy_((weight.float() + update).to(weight.dtype))


def truncate_rank(f: LoRAFactors, rank: int) -> tuple[LoRAFactors, float]:
    """The best rank-`rank` approximation of the factors' ΔW (truncated SVD) and the share of energy kept.

    Works on the factors (QR of each side, SVD of a small core): ΔW itself is never formed.
    """
    if rank <= 0:
        raise ValueError(f"export rank must be > 0, got {rank}")
    if f.rank <= rank:
        return f, 1.0
    flat_up, flat_down = f.matrices()  # a conv's LoCon factors as matrices of its flattened weight
    q_up, r_up = torch.linalg.qr(flat_up.double())
    q_down, r_down = torch.linalg.qr(flat_down.double().T)
    u, s, vh = torch.linalg.svd(f.scale * r_up @ r_down.T)
    energy = float((s[:rank].square().sum() / s.square().sum()).item()) if s.square().sum() > 0 else 1.0
    root = s[:rank].sqrt()
    up = (q_up @ u[:, :rank]) * root
    down = root[:, None] * (vh[:rank] @ q_down.T)
    # Scale 1: alpha equals the new rank.
    return f.with_matrices(up.float(), down.float(), alpha=float(rank)), energy


def truncate_all(factors: dict[str, LoRAFactors], rank: int) -> tuple[dict[str, LoRAFactors], dict[str, float]]:
    out, energies = {}, {}
    for name, f in factors.items():
        out[name], energies[name] = truncate_rank(f, rank)
    return out, energies

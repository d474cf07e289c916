"""The α of `is` / `ms` shortcuts (SPEC §3): a merged weight cannot see earlier blocks' inputs, so x_{n-k} ≈ α x_n.

`input` (paper: input-norm windows recorded in training), `weight` (paper: norms of already-merged weights) and
`lstsq` (ours: per-link least squares on calibration activations of real prompts). The joint and fitted merges
are in `calibration.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from reslora_diffusers.adapters.adapter import ResLoRAAdapter
from reslora_diffusers.adapters.blocks import ResLoRABlock
from reslora_diffusers.formats import lora_delta
from reslora_diffusers.merge.calibration import BlockStatistics

Alphas = dict[str, list[float]]  # block name -> [α*_{n,1}, …, α*_{n,m}], one per linked earlier block


def is_exact(adapter: ResLoRAAdapter) -> bool:
    """True when no block reads another block's input (`none`, `bs`, `is`/`ms` with pre_num 0 or shortcut scale 0)."""
    return not any(b.has_shortcut for b in adapter.blocks.values())


def shortcut_blocks(adapter: ResLoRAAdapter) -> Iterator[tuple[str, ResLoRABlock]]:
    for name, block in adapter.blocks.items():
        if block.has_shortcut:
            yield name, block


def exact_shared_input_alphas(adapter: ResLoRAAdapter, alphas: Alphas) -> Alphas:
    """α = 1 for every shortcut whose blocks all read the text embedding (see `reads_the_text_embedding`)."""
    out = dict(alphas)
    for name, block in shortcut_blocks(adapter):
        if all(adapter.reads_the_text_embedding(b.name) for b in (block, *block.previous)):
            out[name] = [1.0] * len(block.previous)
    return out


def input_based_alphas(adapter: ResLoRAAdapter) -> Alphas:
    """α*_{n,k} = f_{n-k} / f_n, f = mean Frobenius norm of the block's input over the training window."""
    alphas = {}
    for name, block in shortcut_blocks(adapter):
        norms = [block.mean_input_norm()] + [b.mean_input_norm() for b in block.previous]
        if any(n is None or n == 0 for n in norms):
            raise ValueError(
                f"the input-based merge needs input norms recorded during training, and {name} has none "
                "(was the adapter trained with this library?); use --merge_method lstsq or weight"
            )
        alphas[name] = [previous / norms[0] for previous in norms[1:]]
    return alphas


def weight_based_alphas(adapter: ResLoRAAdapter) -> Alphas:
    """α*_{n,k} = f*_{n-k-1} / f*_{n-1} with f*_j = ‖W*_j‖_F of the already-merged earlier blocks (1 if missing).

    For `is` (k = 1) this is the paper's α*_n = f*_{n-2} / f*_{n-1}. Chains are walked in order, so every
    W*_j a block needs is merged before it.
    """
    alphas: Alphas = {}
    merged_norm: dict[str, float] = {}
    for chains in adapter.chains.values():
        for chain in chains:
            for position, name in enumerate(chain):
                block = adapter.blocks[name]
                if block.has_shortcut:
                    alphas[name] = []
                    for k in range(1, len(block.previous) + 1):
                        if position - k - 1 < 0:
                            alphas[name].append(1.0)
                        else:
                            alphas[name].append(merged_norm[chain[position - k - 1]] / merged_norm[chain[position - 1]])
                weight = adapter.base_layers[name].weight.detach().float()
                merged = weight + lora_delta(block.merged_lora_factors(alphas.get(name))).to(weight.device)
                merged_norm[name] = float(merged.norm())
    return alphas


class ShortcutStatistics(BlockStatistics):
    """Accumulates, per linked pair (n, n-k), Σ⟨t, a⟩ and Σ‖a‖² with t = B·A·x_{n-k}, a = B·A·x_n over tokens.

    A is A_n for `is` and A_{n-k} for `ms`: t is the shortcut term, a the term α scales in its place.
    """

    def __init__(self, adapter: ResLoRAAdapter) -> None:
        super().__init__(adapter)
        self.cross = {name: [0.0] * len(b.previous) for name, b in self.blocks.items()}
        self.square = {name: [0.0] * len(b.previous) for name, b in self.blocks.items()}
        self.target_square = {name: [0.0] * len(b.previous) for name, b in self.blocks.items()}

    def accumulate(self, name: str, block: ResLoRABlock, x: torch.Tensor) -> None:
        up = block.lora_B.detach().float()
        for k, (previous, down) in enumerate(zip(block.previous, block.variant.link_downs(block))):
            target = (self.rows_of(previous) @ down.T) @ up.T
            approx = (x @ down.T) @ up.T
            self.cross[name][k] += float((target * approx).sum())
            self.square[name][k] += float(approx.square().sum())
            self.target_square[name][k] += float(target.square().sum())

    def check_reached(self) -> None:
        # Unreached blocks keep α = 1 (0/0); only a run that reached none of them is refused. (Reached blocks whose
        # branch is still zero, as before the first update, are fine: any α is exact there.)
        if self.blocks and not self.reached:
            raise ValueError("the calibration run never reached the adapter's shortcut blocks")

    def alphas(self) -> Alphas:
        # A block whose branch is still zero gives 0/0: any α is exact there, take 1.
        return {
            name: [c / s if s > 0 else 1.0 for c, s in zip(self.cross[name], self.square[name])] for name in self.cross
        }

    def objective(self, alphas: Alphas) -> dict[str, float]:
        """Σ_k Σ‖t − α a‖² per block: the quantity `lstsq` minimises, for any α."""
        return {
            name: sum(
                t2 - 2 * alpha * c + alpha * alpha * s
                for alpha, c, s, t2 in zip(alphas[name], self.cross[name], self.square[name], self.target_square[name])
            )
            for name in self.cross
        }


def collect_shortcut_statistics(adapter: ResLoRAAdapter, calibration: Callable[[], object]) -> ShortcutStatistics:
    return ShortcutStatistics.collect(adapter, calibration)


def alpha_statistics(alphas: Alphas) -> dict[str, float]:
    values = [a for per_block in alphas.values() for a in per_block]
    if not values:
        return {"count": 0}
    tensor = torch.tensor(values)
    return {
        "count": len(values),
        "mean": float(tensor.mean()),
        "min": float(tensor.min()),
        "max": float(tensor.max()),
        "std": float(tensor.std()) if len(values) > 1 else 0.0,
    }

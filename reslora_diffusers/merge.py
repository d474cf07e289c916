"""The merge step (SPEC §2-3): ResLoRA → plain LoRA factors → weights, and the fidelity of each way of merging.

`none`, `bs` and Delta-LoRA merge exactly (rank r, (m+1)·r, 2r). `is` / `ms` shortcuts read the inputs of
earlier blocks, which a merged weight cannot see, so they are approximated with x_{n-k} ≈ α x_n and
α is estimated three ways: `input` (paper: input-norm windows from training), `weight` (paper: norms of
already-merged weights) and `lstsq` (ours: least squares on calibration activations of real prompts, per
link). `lstsq_joint` (all links of a block at once) and `calibrated` (the merged down-projection fitted to
the unmerged branch) are in `merge_calibration.py`. A shortcut scale γ (annealing) scales the shortcut
terms; at γ = 0 every block is plain LoRA and the merge is exact.

Command line: `python -m reslora_diffusers.merge --help` (see `merge_cli.py`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from .adapter import ResLoRAAdapter
from .blocks import ResLoRABlock
from .config import MERGE_METHODS
from .formats import LoRAFactors, lora_delta
from .merge_calibration import alpha_merged_down, collect_layer_statistics, relative_layer_error, run_with_block_hooks

CALIBRATED_METHODS = ("lstsq", "lstsq_joint", "calibrated")  # need a calibration run

Alphas = dict[str, list[float]]  # block name -> [α*_{n,1}, …, α*_{n,m}], one per linked earlier block


@dataclass
class MergeResult:
    """Merged plain-LoRA factors per block (keys as in `adapter.blocks`), and how they were obtained."""

    factors: dict[str, LoRAFactors]
    method: str  # "exact" for none / bs / Delta-LoRA, else one of MERGE_METHODS
    alphas: Alphas = field(default_factory=dict)
    report: dict = field(default_factory=dict)


def is_exact(adapter: ResLoRAAdapter) -> bool:
    """True when no block reads another block's input (`none`, `bs`, `is`/`ms` with pre_num 0 or shortcut scale 0)."""
    return not any(b.has_shortcut for b in adapter.blocks.values())


# -- α estimators ---------------------------------------------------------------------------------------
def _shortcut_blocks(adapter: ResLoRAAdapter) -> Iterator[tuple[str, ResLoRABlock]]:
    for name, block in adapter.blocks.items():
        if block.has_shortcut:
            yield name, block


def _reads_the_text_embedding(adapter: ResLoRAAdapter, name: str) -> bool:
    """Cross-attention `to_k` / `to_v` read `encoder_hidden_states` itself: every block of such a chain sees the
    same tensor, so x_{n-k} = x_n exactly and α = 1 is exact (an estimator would only add noise)."""
    component, path = name.split(".", 1)
    attention_path, _, target = path.rpartition(".")
    if component != "unet" or target not in ("to_k", "to_v"):
        return False
    attention = adapter.unet.get_submodule(attention_path)
    return bool(getattr(attention, "is_cross_attention", False)) and not getattr(attention, "norm_cross", None)


def _exact_shared_input_alphas(adapter: ResLoRAAdapter, alphas: Alphas) -> Alphas:
    """α = 1 for every shortcut whose blocks all read the text embedding (see `_reads_the_text_embedding`)."""
    out = dict(alphas)
    for name, block in _shortcut_blocks(adapter):
        if all(_reads_the_text_embedding(adapter, b.name) for b in (block, *block.previous)):
            out[name] = [1.0] * len(block.previous)
    return out


def input_based_alphas(adapter: ResLoRAAdapter) -> Alphas:
    """α*_{n,k} = f_{n-k} / f_n, f = mean Frobenius norm of the block's input over the training window."""
    alphas = {}
    for name, block in _shortcut_blocks(adapter):
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
                merged = weight + lora_delta(_block_factors(adapter, name, alphas.get(name))).to(weight.device)
                merged_norm[name] = float(merged.norm())
    return alphas


class _ShortcutStatistics:
    """Accumulates, per linked pair (n, n-k), Σ⟨t, a⟩ and Σ‖a‖² with t = B·A·x_{n-k}, a = B·A·x_n over tokens.

    A is A_n for `is` and A_{n-k} for `ms`: t is the shortcut term, a the term α scales in its place.
    """

    def __init__(self, adapter: ResLoRAAdapter) -> None:
        self.adapter = adapter
        self.cross = {name: [0.0] * len(b.previous) for name, b in _shortcut_blocks(adapter)}
        self.square = {name: [0.0] * len(b.previous) for name, b in _shortcut_blocks(adapter)}
        self.target_square = {name: [0.0] * len(b.previous) for name, b in _shortcut_blocks(adapter)}
        self.inputs: dict[str, torch.Tensor] = {}
        self.reached: set[str] = set()  # shortcut blocks the calibration ran through

    def hook(self, name: str, block: ResLoRABlock):
        def record(_module, args):
            x = args[0].detach().float()
            self.inputs[name] = x
            if name not in self.cross:
                return
            self.reached.add(name)
            up = block.lora_B.detach().float()
            for k, (previous, down) in enumerate(zip(block.previous, block.variant.link_downs(block))):
                target = (self.inputs[previous.name] @ down.T) @ up.T
                approx = (x @ down.T) @ up.T
                self.cross[name][k] += float((target * approx).sum())
                self.square[name][k] += float(approx.square().sum())
                self.target_square[name][k] += float(target.square().sum())

        return record

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


def collect_shortcut_statistics(adapter: ResLoRAAdapter, calibration: Callable[[], object]) -> _ShortcutStatistics:
    """Runs `calibration` (forward passes of the unmerged model on real prompts) with recording hooks."""
    stats = _ShortcutStatistics(adapter)
    try:
        run_with_block_hooks(adapter, stats.hook, calibration)
    finally:
        stats.inputs.clear()
    # (Reached blocks whose branch is still zero, as before the first update, are fine: any α is exact there.)
    if stats.square and not stats.reached:
        raise ValueError("the calibration run never reached the adapter's shortcut blocks")
    return stats


# -- merged factors -------------------------------------------------------------------------------------
def _block_factors(adapter: ResLoRAAdapter, name: str, alphas: list[float] | None) -> LoRAFactors:
    """The merged plain-LoRA factors of one block; `alphas` only for `is` / `ms` blocks with a shortcut."""
    block = adapter.blocks[name]
    scaling = block.scaling
    up, down = block.variant.merged_factors(block, alphas) if block.has_shortcut else block.exact_factors()
    up, down = up.detach().float().cpu().contiguous(), down.detach().float().cpu().contiguous()
    # The file's scale is alpha / rank: keep the effective scale s whatever the merged rank.
    return LoRAFactors(down=down, up=up, alpha=scaling * down.shape[0])


def merge_adapter(
    adapter: ResLoRAAdapter, method: str = "input", calibration: Callable[[], object] | None = None
) -> MergeResult:
    """Merges every block into plain LoRA factors; `method` matters only for `is` / `ms` shortcuts.

    `calibration` runs the unmerged model on real prompts; `lstsq`, `lstsq_joint` and `calibrated` need it.
    Those two report the merged branches' relative error on the calibration tokens (`report`), before
    (`lstsq_joint`) and after the fit (`calibrated`).
    """
    if method not in MERGE_METHODS:
        raise ValueError(f"unknown merge method {method!r}; choose one of {MERGE_METHODS}")
    if is_exact(adapter):
        factors = {name: _block_factors(adapter, name, None) for name in adapter.blocks}
        return MergeResult(factors=factors, method="exact")
    if method in CALIBRATED_METHODS and calibration is None:
        raise ValueError(f"the {method} merge needs calibration prompts (a calibration run of the unmerged model)")
    report = {}
    if method == "input":
        alphas = input_based_alphas(adapter)
    elif method == "weight":
        alphas = weight_based_alphas(adapter)
    elif method == "lstsq":
        alphas = collect_shortcut_statistics(adapter, calibration).alphas()
    else:
        stats = collect_layer_statistics(adapter, calibration)
        alphas = stats.joint_alphas()
    alphas = _exact_shared_input_alphas(adapter, alphas)
    factors = {name: _block_factors(adapter, name, alphas.get(name)) for name in adapter.blocks}
    if method in ("lstsq_joint", "calibrated"):
        joint = {name: alpha_merged_down(block, alphas[name]) for name, block in stats.blocks.items()}
        report["layer_relative_error_lstsq_joint"] = relative_layer_error(stats, joint)
    if method == "calibrated":
        fitted = {name: stats.calibrated_down(name, joint[name]) for name in stats.blocks}
        for name, down in fitted.items():
            block = adapter.blocks[name]
            factors[name] = LoRAFactors(down=down.contiguous(), up=block.lora_B.detach().float().cpu().contiguous(), alpha=factors[name].alpha)
        report["layer_relative_error_calibrated"] = relative_layer_error(stats, fitted)
    return MergeResult(factors=factors, method=method, alphas=alphas, report=report)


# -- applying merged factors to the base weights -------------------------------------------------------
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


# -- re-compression -----------------------------------------------------------------------------------
def truncate_rank(f: LoRAFactors, rank: int) -> tuple[LoRAFactors, float]:
    """The best rank-`rank` approximation of the factors' ΔW (truncated SVD) and the share of energy kept.

    Works on the factors (QR of each side, SVD of a small core): ΔW itself is never formed.
    """
    if rank <= 0:
        raise ValueError(f"export rank must be > 0, got {rank}")
    scale = f.alpha / f.down.shape[0]
    if f.down.shape[0] <= rank:
        return f, 1.0
    q_up, r_up = torch.linalg.qr(f.up.double())
    q_down, r_down = torch.linalg.qr(f.down.double().T)
    u, s, vh = torch.linalg.svd(scale * r_up @ r_down.T)
    energy = float((s[:rank].square().sum() / s.square().sum()).item()) if s.square().sum() > 0 else 1.0
    root = s[:rank].sqrt()
    up = (q_up @ u[:, :rank]) * root
    down = root[:, None] * (vh[:rank] @ q_down.T)
    # Scale 1: alpha equals the new rank.
    return LoRAFactors(down=down.float().contiguous(), up=up.float().contiguous(), alpha=float(rank)), energy


def truncate_all(factors: dict[str, LoRAFactors], rank: int) -> tuple[dict[str, LoRAFactors], dict[str, float]]:
    out, energies = {}, {}
    for name, f in factors.items():
        out[name], energies[name] = truncate_rank(f, rank)
    return out, energies


# -- fidelity ---------------------------------------------------------------------------------------------
def relative_error(merged: torch.Tensor, unmerged: torch.Tensor) -> float:
    return float((merged.float() - unmerged.float()).norm() / unmerged.float().norm().clamp_min(1e-12))


def image_psnr(a, b) -> float:
    """PSNR in dB between two images (PIL or arrays in [0, 255]); inf when identical."""
    import numpy as np

    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mse = float(np.mean((x - y) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


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


def main(argv=None) -> int:
    """Entry point of `python -m reslora_diffusers.merge` and the `reslora-merge` console script."""
    from .merge_cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())

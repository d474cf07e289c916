"""`merge_adapter`: every block of an adapter as plain-LoRA factors, exactly or with estimated α (SPEC §2-3)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from reslora_diffusers.adapters.adapter import ResLoRAAdapter
from reslora_diffusers.adapters.config import MERGE_METHODS
from reslora_diffusers.formats import LoRAFactors
from reslora_diffusers.merge.alphas import (
    Alphas,
    collect_shortcut_statistics,
    exact_shared_input_alphas,
    input_based_alphas,
    is_exact,
    weight_based_alphas,
)
from reslora_diffusers.merge.calibration import alpha_merged_down, collect_layer_statistics, relative_layer_error

CALIBRATED_METHODS = ("lstsq", "lstsq_joint", "calibrated")  # need a calibration run


@dataclass
class MergeResult:
    """Merged plain-LoRA factors per block (keys as in `adapter.blocks`), and how they were obtained."""

    factors: dict[str, LoRAFactors]
    method: str  # "exact" for none / bs / Delta-LoRA, else one of MERGE_METHODS
    alphas: Alphas = field(default_factory=dict)
    report: dict = field(default_factory=dict)


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
        factors = {name: adapter.blocks[name].merged_lora_factors() for name in adapter.blocks}
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
    alphas = exact_shared_input_alphas(adapter, alphas)
    factors = {name: adapter.blocks[name].merged_lora_factors(alphas.get(name)) for name in adapter.blocks}
    if method in ("lstsq_joint", "calibrated"):
        errors = {name: stats.alpha_error(name, alphas[name]) for name in stats.blocks}
        report["layer_relative_error_lstsq_joint"] = relative_layer_error(errors.values())
    if method == "calibrated":
        kept = {name for name in stats.blocks if not stats.fits(name)}  # too wide to fit: the lstsq_joint merge
        for name, block in stats.blocks.items():
            if name not in kept:
                down = stats.calibrated_down(name, alpha_merged_down(block, alphas[name]))
                factors[name] = block.lora_factors(block.lora_B, down)
                errors[name] = stats.error(name, down)
        report["layer_relative_error_calibrated"] = relative_layer_error(errors.values())
        if kept:
            report["calibrated_blocks_merged_by_lstsq_joint"] = len(kept)
    return MergeResult(factors=factors, method=method, alphas=alphas, report=report)

"""The merge step (SPEC §2-3): ResLoRA → plain LoRA factors → weights, and the fidelity of each way of merging.

`none`, `bs` and Delta-LoRA merge exactly (rank r, (m+1)·r, 2r). `is` / `ms` shortcuts read the inputs of
earlier blocks, which a merged weight cannot see, so they are approximated with x_{n-k} ≈ α x_n and
α is estimated three ways: `input` (paper: input-norm windows from training), `weight` (paper: norms of
already-merged weights) and `lstsq` (ours: least squares on calibration activations of real prompts, per
link). `lstsq_joint` (all links of a block at once) and `calibrated` (the merged down-projection fitted to
the unmerged branch) are in `calibration.py`. A shortcut scale γ (annealing) scales the shortcut
terms; at γ = 0 every block is plain LoRA and the merge is exact.

Command line: `python -m reslora_diffusers.merge --help` (`cli.py`).

    alphas.py         the α estimators (input, weight, per-link lstsq) and their statistics pass
    calibration.py    joint lstsq and the fitted (`calibrated`) down-projection, from layer statistics
    merge_adapter.py  `merge_adapter`: every block as plain-LoRA factors, and how they were obtained
    bake.py           `baked_weights` / `merge_into_base`, SVD re-compression (`truncate_rank`)
    fidelity.py       relative error, image PSNR
    cli.py            the command line
"""

from reslora_diffusers.adapters.config import MERGE_METHODS
from reslora_diffusers.merge.alphas import (
    alpha_statistics,
    collect_shortcut_statistics,
    input_based_alphas,
    is_exact,
    weight_based_alphas,
)
from reslora_diffusers.merge.bake import baked_weights, merge_into_base, truncate_all, truncate_rank, weight_updates
from reslora_diffusers.merge.fidelity import image_psnr, relative_error
from reslora_diffusers.merge.merge_adapter import CALIBRATED_METHODS, MergeResult, merge_adapter

__all__ = [
    "CALIBRATED_METHODS",
    "MERGE_METHODS",
    "MergeResult",
    "alpha_statistics",
    "baked_weights",
    "collect_shortcut_statistics",
    "image_psnr",
    "input_based_alphas",
    "is_exact",
    "merge_adapter",
    "merge_into_base",
    "relative_error",
    "truncate_all",
    "truncate_rank",
    "weight_based_alphas",
    "weight_updates",
]

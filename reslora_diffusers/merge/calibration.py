"""Calibrated merges of `is` / `ms` shortcuts (SPEC §3, merge-aware training): fitted on calibration activations.

A shortcut block's branch is s·B_n z with z = A_n x_n + γ·(shortcut terms) (rank r). A merged block can only
compute s·B_n A* x_n. From one calibration run of the unmerged model we accumulate, per block and over all
tokens, Σxxᵀ, Σzxᵀ and Σzzᵀ, and from these solve in closed form:

- `lstsq_joint`: the α of every link at once, A* = A_n + γ Σ_k α_k A'_k (A'_k = A_{n-k} for `ms`, A_n for `is`),
  minimising Σ‖B_n (z − A* x_n)‖². For `is` this is the per-link `lstsq`; for `ms` it also accounts for the
  links' overlap, which the per-link solve ignores.
- `calibrated`: any A* (B_n kept), minimising the same error: A* = (Σzxᵀ + λ A₀)(Σxxᵀ + λ I)⁻¹. Since the target
  s·B_n z lies in B_n's column space, no rank-r (or any) weight change fits these tokens better. The ridge λ
  (1e-3 of Σxxᵀ's mean eigenvalue) pulls directions the calibration inputs never span to A₀ = the
  `lstsq_joint` merge instead of to zero.

Both are layer-wise: each block is fitted to the unmerged model's own inputs, one pass, no iterations.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from reslora_diffusers.adapters.adapter import ResLoRAAdapter
from reslora_diffusers.adapters.blocks import ResLoRABlock
from reslora_diffusers.adapters.chains import run_with_pre_hooks

RIDGE = 1e-3


class BlockStatistics:
    """One calibration pass of the unmerged model: a forward pre-hook on every block keeps its input (what later
    blocks' shortcut terms read) and hands each shortcut block's input to `accumulate`. Subclasses keep what their
    merge needs; `collect` runs the pass and checks that it reached the blocks."""

    def __init__(self, adapter: ResLoRAAdapter) -> None:
        self.blocks = {name: b for name, b in adapter.blocks.items() if b.has_shortcut}
        self.inputs: dict[str, torch.Tensor] = {}  # the latest input of every block (rows × in_features, fp32)
        self.reached: set[str] = set()  # shortcut blocks the calibration ran through

    def accumulate(self, name: str, block: ResLoRABlock, x: torch.Tensor) -> None:
        raise NotImplementedError

    def check_reached(self) -> None:
        missing = sorted(set(self.blocks) - self.reached)
        if missing:
            raise ValueError(f"the calibration run never reached these shortcut blocks: {missing[:3]}")

    def hook(self, name: str, block: ResLoRABlock):
        def record(_module, args):
            x = block.projection.rows(args[0].detach().float())  # tokens (a conv: patches) × in_features
            self.inputs[name] = x
            if name in self.blocks:
                self.reached.add(name)
                self.accumulate(name, block, x)

        return record

    @classmethod
    def collect(cls, adapter: ResLoRAAdapter, calibration: Callable[[], object]):
        """Runs `calibration` (forward passes of the unmerged model on real prompts) with the recording hooks."""
        stats = cls(adapter)
        try:
            run_with_block_hooks(adapter, stats.hook, calibration)
        finally:
            stats.inputs.clear()
        stats.check_reached()
        return stats


class LayerStatistics(BlockStatistics):
    """Σxxᵀ, Σzxᵀ, Σzzᵀ (float64, CPU) of every shortcut block of `adapter` over a calibration run."""

    def __init__(self, adapter: ResLoRAAdapter) -> None:
        super().__init__(adapter)
        self.xx: dict[str, torch.Tensor] = {}
        self.zx: dict[str, torch.Tensor] = {}
        self.zz: dict[str, torch.Tensor] = {}

    def accumulate(self, name: str, block: ResLoRABlock, x: torch.Tensor) -> None:
        links = zip(block.previous, block.variant.link_downs(block))
        shortcut = sum(self.inputs[previous.name] @ link_down.T for previous, link_down in links)
        z = x @ block.lora_A.detach().float().T + block.shortcut_scale * shortcut
        for store, value in ((self.xx, x.T @ x), (self.zx, z.T @ x), (self.zz, z.T @ z)):
            value = value.double().cpu()
            store[name] = store[name] + value if name in store else value

    def error(self, name: str, down: torch.Tensor) -> tuple[float, float]:
        """(Σ‖B(z − A x)‖², Σ‖B z‖²) of block `name` for a merged down-projection A (B_n kept)."""
        up = self.blocks[name].lora_B.detach().double().cpu()
        metric, down = up.T @ up, down.detach().double().cpu()
        zz, zx, xx = self.zz[name], self.zx[name], self.xx[name]
        residual = zz - zx @ down.T - down @ zx.T + down @ xx @ down.T
        return float(torch.trace(metric @ residual)), float(torch.trace(metric @ zz))

    def joint_alphas(self) -> dict[str, list[float]]:
        """The `lstsq_joint` α of every link of every shortcut block (1 where the block's branch is still zero)."""
        alphas = {}
        for name, block in self.blocks.items():
            gamma, up = block.shortcut_scale, block.lora_B.detach().double().cpu()
            metric, xx = up.T @ up, self.xx[name]
            own = block.lora_A.detach().double().cpu()
            terms = [d.double().cpu() for d in block.variant.link_downs(block)]
            residual = self.zx[name] - own @ xx  # Σ (z − A_n x) xᵀ = γ Σ shortcut·xᵀ
            gram = torch.tensor([[gamma**2 * float(torch.trace(metric @ a @ xx @ b.T)) for b in terms] for a in terms])
            cross = torch.tensor([gamma * float(torch.trace(metric @ residual @ a.T)) for a in terms])
            if float(gram.diagonal().sum()) <= 0:
                alphas[name] = [1.0] * len(terms)
                continue
            # gelsd (SVD): the default gelsy gave results that differ in the last bits from process to process on
            # the same input (measured on CPU), so two merges of one adapter wrote different files.
            alphas[name] = torch.linalg.lstsq(gram, cross.unsqueeze(1), driver="gelsd").solution.squeeze(1).tolist()
        return alphas

    def calibrated_down(self, name: str, prior: torch.Tensor) -> torch.Tensor:
        """The fitted A* of block `name`, pulled towards `prior` where the calibration inputs carry no signal."""
        xx = self.xx[name]
        ridge = RIDGE * float(torch.trace(xx)) / xx.shape[0] + 1e-12
        eye = torch.eye(xx.shape[0], dtype=xx.dtype)
        rhs = self.zx[name] + ridge * prior.detach().double().cpu()
        return torch.linalg.solve(xx + ridge * eye, rhs.T).T.float()


def alpha_merged_down(block: ResLoRABlock, alphas: list[float]) -> torch.Tensor:
    """A* = A_n + γ Σ_k α_k A'_k: the merged down-projection of an α-based merge, with B_n kept."""
    down = block.lora_A.detach().float() + block.shortcut_scale * sum(a * d for a, d in zip(alphas, block.variant.link_downs(block)))
    return down.cpu()


def run_with_block_hooks(adapter: ResLoRAAdapter, make_hook: Callable, calibration: Callable[[], object]) -> None:
    """Runs `calibration` without gradients, with the forward pre-hook `make_hook(name, block)` on every block."""
    run_with_pre_hooks([(block, make_hook(name, block)) for name, block in adapter.blocks.items()], calibration)


def collect_layer_statistics(adapter: ResLoRAAdapter, calibration: Callable[[], object]) -> LayerStatistics:
    return LayerStatistics.collect(adapter, calibration)


def relative_layer_error(stats: LayerStatistics, downs: dict[str, torch.Tensor]) -> float:
    """√(Σ_blocks Σ‖B(z − A*x)‖² / Σ_blocks Σ‖Bz‖²): the merged branches' error over all shortcut blocks."""
    errors = [stats.error(name, down) for name, down in downs.items()]
    total = sum(t for _, t in errors)
    return (sum(e for e, _ in errors) / total) ** 0.5 if total > 0 else 0.0

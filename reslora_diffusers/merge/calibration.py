"""Calibrated merges of `is` / `ms` shortcuts (SPEC §3, merge-aware training): fitted on calibration activations.

A shortcut block's branch is s·B_n z with z = A_n x_n + γ·(shortcut terms) (rank r). A merged block can only
compute s·B_n A* x_n. From one calibration run of the unmerged model we accumulate, per block and over all
tokens, Σxxᵀ, Σzxᵀ and Σzzᵀ (for wide blocks, convs above all, only rank-r statistics: `LayerStatistics`), and from
these solve in closed form:

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

from collections.abc import Callable, Iterable

import torch

from reslora_diffusers.adapters.adapter import ResLoRAAdapter
from reslora_diffusers.adapters.blocks import ResLoRABlock
from reslora_diffusers.adapters.chains import run_with_pre_hooks

RIDGE = 1e-3
# `calibrated` fits A* from Σxxᵀ, a float64 [in, in] matrix per block: up to 5,120 features (200 MB; every Linear of
# SD-1.5 / SDXL) it is kept. A conv block's features are in·k·k (SD-1.5's 1,280-channel 3×3 convs: 11,520, 1 GB
# each, 28 GB for one adapter), so wider blocks keep only rank-r statistics and are merged by `lstsq_joint`.
MAX_FITTED_FEATURES = 5120


class BlockStatistics:
    """One calibration pass of the unmerged model: a forward pre-hook on every block keeps the input of blocks whose
    input later blocks' shortcut terms read, and hands each shortcut block's input, as rows × in_features (a conv's
    patches), to `accumulate`. Subclasses keep what their merge needs; `collect` runs the pass and checks that it
    reached the blocks."""

    def __init__(self, adapter: ResLoRAAdapter) -> None:
        self.blocks = {name: b for name, b in adapter.blocks.items() if b.has_shortcut}
        # The latest input of every block that feeds later ones, as the block saw it (fp32; a conv's unfolded only
        # when read: its patches take k·k times the memory).
        self.inputs: dict[str, torch.Tensor] = {}
        self.reached: set[str] = set()  # shortcut blocks the calibration ran through

    def rows_of(self, block: ResLoRABlock) -> torch.Tensor:
        """The latest input of an earlier block as rows × in_features."""
        return block.projection.rows(self.inputs[block.name])

    def accumulate(self, name: str, block: ResLoRABlock, x: torch.Tensor) -> None:
        raise NotImplementedError

    def check_reached(self) -> None:
        missing = sorted(set(self.blocks) - self.reached)
        if missing:
            raise ValueError(f"the calibration run never reached these shortcut blocks: {missing[:3]}")

    def hook(self, name: str, block: ResLoRABlock):
        def record(_module, args):
            x = args[0].detach().float()
            if block.feeds_later_blocks:
                self.inputs[name] = x
            if name in self.blocks:
                self.reached.add(name)
                self.accumulate(name, block, block.projection.rows(x))

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
    """Per shortcut block of `adapter`, over a calibration run (float64, CPU): Σzzᵀ, and with s = z − A_n x (the
    shortcut terms) and u = [A'_1 x; …; A'_m x] (what each α scales) the rank-r statistics Σssᵀ, Σsuᵀ, Σuuᵀ that the
    `lstsq_joint` α and its error need; for blocks up to MAX_FITTED_FEATURES also Σxxᵀ and Σzxᵀ (the `calibrated` fit)."""

    def __init__(self, adapter: ResLoRAAdapter) -> None:
        super().__init__(adapter)
        self.sums: dict[str, dict[str, torch.Tensor]] = {}

    def fits(self, name: str) -> bool:
        """Whether `calibrated` fits block `name`'s A* (else it keeps the `lstsq_joint` merge there)."""
        return self.blocks[name].in_features <= MAX_FITTED_FEATURES

    def accumulate(self, name: str, block: ResLoRABlock, x: torch.Tensor) -> None:
        downs = block.variant.link_downs(block)
        shortcut = sum(self.rows_of(previous) @ down.T for previous, down in zip(block.previous, downs))
        s = block.shortcut_scale * shortcut
        z = x @ block.lora_A.detach().float().T + s
        u = torch.cat([x @ down.T for down in downs], dim=1)
        values = {"zz": z.T @ z, "ss": s.T @ s, "su": s.T @ u, "uu": u.T @ u}
        if self.fits(name):
            values.update(xx=x.T @ x, zx=z.T @ x)
        sums = self.sums.setdefault(name, {})
        for key, value in values.items():
            value = value.double().cpu()
            sums[key] = sums[key] + value if key in sums else value

    def _metric(self, name: str) -> torch.Tensor:
        up = self.blocks[name].lora_B.detach().double().cpu()
        return up.T @ up

    def error(self, name: str, down: torch.Tensor) -> tuple[float, float]:
        """(Σ‖B(z − A x)‖², Σ‖B z‖²) of block `name` for any merged down-projection A (B_n kept); fitted blocks only."""
        if not self.fits(name):
            raise ValueError(f"{name} has {self.blocks[name].in_features} input features: only its α merges are measured")
        sums, metric, down = self.sums[name], self._metric(name), down.detach().double().cpu()
        zz, zx, xx = sums["zz"], sums["zx"], sums["xx"]
        residual = zz - zx @ down.T - down @ zx.T + down @ xx @ down.T
        return float(torch.trace(metric @ residual)), float(torch.trace(metric @ zz))

    def alpha_error(self, name: str, alphas: list[float]) -> tuple[float, float]:
        """The same for the α merge A* = A_n + γ Σ α_k A'_k, from the rank-r statistics (any block)."""
        block, sums, metric = self.blocks[name], self.sums[name], self._metric(name)
        eye = torch.eye(block.rank, dtype=torch.float64)
        scaled = block.shortcut_scale * torch.cat([alpha * eye for alpha in alphas], dim=0)  # γ α_k I per link
        su_w = sums["su"] @ scaled
        residual = sums["ss"] - su_w - su_w.T + scaled.T @ sums["uu"] @ scaled  # Σ(s − γΣα_k u_k)(…)ᵀ
        return float(torch.trace(metric @ residual)), float(torch.trace(metric @ sums["zz"]))

    def joint_alphas(self) -> dict[str, list[float]]:
        """The `lstsq_joint` α of every link of every shortcut block (1 where the block's branch is still zero)."""
        alphas = {}
        for name, block in self.blocks.items():
            gamma, metric, sums, r = block.shortcut_scale, self._metric(name), self.sums[name], block.rank
            links = range(len(block.previous))
            part = lambda k, r=r: slice(k * r, (k + 1) * r)  # link k's columns of u
            # Σ (A'_a x)(A'_b x)ᵀ and Σ (z − A_n x)(A'_a x)ᵀ, weighted by BᵀB
            gram = torch.tensor([[gamma**2 * float(torch.trace(metric @ sums["uu"][part(a), part(b)])) for b in links] for a in links])
            cross = torch.tensor([gamma * float(torch.trace(metric @ sums["su"][:, part(a)])) for a in links])
            if float(gram.diagonal().sum()) <= 0:
                alphas[name] = [1.0] * len(block.previous)
                continue
            # gelsd (SVD): the default gelsy gave results that differ in the last bits from process to process on
            # the same input (measured on CPU), so two merges of one adapter wrote different files.
            alphas[name] = torch.linalg.lstsq(gram, cross.unsqueeze(1), driver="gelsd").solution.squeeze(1).tolist()
        return alphas

    def calibrated_down(self, name: str, prior: torch.Tensor) -> torch.Tensor:
        """The fitted A* of block `name`, pulled towards `prior` where the calibration inputs carry no signal."""
        xx, zx = self.sums[name]["xx"], self.sums[name]["zx"]
        ridge = RIDGE * float(torch.trace(xx)) / xx.shape[0] + 1e-12
        eye = torch.eye(xx.shape[0], dtype=xx.dtype)
        rhs = zx + ridge * prior.detach().double().cpu()
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


def relative_layer_error(errors: Iterable[tuple[float, float]]) -> float:
    """√(Σ_blocks Σ‖B(z − A*x)‖² / Σ_blocks Σ‖Bz‖²) from each block's (error, total): the merged branches' error."""
    errors = list(errors)
    total = sum(t for _, t in errors)
    return (sum(e for e, _ in errors) / total) ** 0.5 if total > 0 else 0.0

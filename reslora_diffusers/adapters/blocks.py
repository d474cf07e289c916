"""`ResLoRABlock`: one LoRA adapter on one frozen Linear or Conv2d layer (projections.py), linked to the earlier blocks of its chain (SPEC §1-2).

A block holds the factors, the links and the caches; what its branch computes is its variant's (variants.py). It
returns the adapter branch only; the caller (the UNet attention processor or the text-encoder hook) adds it to the
frozen layer's output. γ = `shortcut_scale` (SPEC §3, merge-aware training): 1 normally; shortcut annealing takes
it to 0, where every block is plain LoRA and merges exactly.

Delta-LoRA (`none` only, after step K) adds λ·s·(sg(B A) − B_K A_K) x: the frozen weight's move (delta_lora.py).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from reslora_diffusers.adapters.projections import LinearProjection, Projection
from reslora_diffusers.adapters.variants import Factors, variant_of
from reslora_diffusers.formats.lora_factors import LoRAFactors


class ForwardPassTracker:
    """Numbers the forward passes of one model, so a block can tell this pass's cached tensors from stale ones.

    A gradient-checkpointing recompute replays part of a pass during backward without starting a new one,
    so it reuses (and re-writes, with equal values) the caches of the pass it belongs to.
    """

    def __init__(self) -> None:
        self.pass_id = 0
        self.blocks: list[ResLoRABlock] = []
        # This pass's strength from diffusers' `cross_attention_kwargs={"scale": s}` (1 when not given).
        self.call_scale = 1.0

    def begin_pass(self, call_scale: float = 1.0) -> None:
        self.pass_id += 1
        self.call_scale = float(call_scale)
        self.release_caches()

    def release_caches(self, pass_id: int | None = None) -> None:
        """Drops the cached shortcut inputs (only if they still belong to pass `pass_id`, when given)."""
        if pass_id is not None and pass_id != self.pass_id:
            return
        for block in self.blocks:
            block.cached = None


class ResLoRABlock(nn.Module):
    """LoRA factors A (Kaiming-uniform) and B (zeros) for one layer, linked to earlier blocks of its chain.

    A is [r, in_features] and B [out, r] for a Linear and for a Conv2d alike (a conv's in_features = in·kh·kw:
    its weight flattened); `projection` applies them to the layer's input.

    `previous` holds the earlier blocks of the chain that take part, nearest first (n-1, n-2, ...). They are
    plain references, not submodules: each block is registered once, in its own layer.
    """

    def __init__(
        self,
        name: str,
        projection: Projection,
        *,
        rank: int,
        scaling: float,
        res_type: str,
        dropout: float,
        input_norm_window: int,
        tracker: ForwardPassTracker,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.name = name
        self.projection = projection
        self.rank, self.scaling, self.res_type = rank, scaling, res_type
        self.variant = variant_of(res_type)
        # Adapters are always fp32, whatever the base dtype: fp16 factors cannot be trained with a GradScaler.
        self.lora_A = nn.Parameter(torch.empty(rank, projection.in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(projection.out_features, rank, device=device, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # Sliding window of the Frobenius norm of this block's input, for the input-based merge (SPEC §2).
        self.register_buffer("input_norms", torch.zeros(input_norm_window, device=device))
        self.register_buffer("input_norm_count", torch.zeros((), dtype=torch.long, device=device))
        self.previous: list[ResLoRABlock] = []
        self.feeds_later_blocks = False
        # Off while merged weights are evaluated in place of the branch (see merge.baked_weights).
        self.active = True
        # γ of the shortcut terms (see the module docstring); set for a whole adapter by `set_shortcut_scale`.
        self.shortcut_scale = 1.0
        # The adapter strength (`ResLoRAAdapter.set_scale`): multiplies the whole added branch.
        self.scale = 1.0
        # Delta-LoRA: λ and the factors (B_K, A_K) at step K, set by delta_lora.DeltaLoRA once K is reached.
        self.delta_lora_ratio = 0.0
        self.delta_lora_start: tuple[torch.Tensor, torch.Tensor] | None = None
        self.tracker = tracker
        tracker.blocks.append(self)
        # (pass id, tensor, grad mode) that later blocks of the chain read in the same pass: the raw input for
        # `is`, the down-projection A·x (rank r, much smaller than x) for `ms`.
        self.cached: tuple[int, torch.Tensor, bool] | None = None
        self._norm_pass_id = -1

    @property
    def in_features(self) -> int:
        return self.projection.in_features

    @property
    def out_features(self) -> int:
        return self.projection.out_features

    @property
    def strength(self) -> float:
        """What the branch is multiplied by in this pass: the adapter scale times the call's `scale`."""
        return self.scale * self.tracker.call_scale

    @property
    def runs(self) -> bool:
        """Whether the branch is added at all; at strength 0 it is skipped, so the output is the base's bit for bit."""
        return self.active and self.strength != 0

    def extra_repr(self) -> str:
        kind = "" if isinstance(self.projection, LinearProjection) else f", conv {self.projection.kernel_size}"
        return f"{self.name}: in={self.in_features}, out={self.out_features}{kind}, r={self.rank}, res_type={self.res_type}"

    def link(self, previous: list[ResLoRABlock]) -> None:
        for block in previous:
            if block.projection != self.projection:
                raise ValueError(f"cannot link {self.name} to {block.name}: their weight shapes or convolutions differ")
            block.feeds_later_blocks = True
        self.previous = list(previous)

    def cached_from(self, block: ResLoRABlock, shape: torch.Size) -> torch.Tensor:
        entry = block.cached
        if entry is None or entry[0] != self.tracker.pass_id:
            raise RuntimeError(
                f"ResLoRA block {self.name} needs the input of {block.name} from the same forward pass, "
                "but that block did not run before it; the chains do not match this model's execution order"
            )
        _, tensor, written_with_grad = entry
        if torch.is_grad_enabled() and not written_with_grad:
            # Reentrant checkpointing ran the earlier block's segment under no_grad and recomputes this one
            # first in backward: the shortcut would get no gradient into the earlier blocks (wrong, silently).
            raise RuntimeError(
                f"ResLoRA {self.res_type!r} shortcut {block.name} -> {self.name} crosses an activation-checkpoint "
                "segment that ran without autograd: reentrant checkpointing (use_reentrant=True) cannot give its "
                "gradient. Use non-reentrant checkpointing: torch.utils.checkpoint.checkpoint(..., use_reentrant=False), "
                "diffusers' enable_gradient_checkpointing() default, transformers' "
                "gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})"
            )
        if tensor.shape != shape:
            raise RuntimeError(
                f"ResLoRA shortcut {block.name} -> {self.name}: shapes {tuple(tensor.shape)} and {tuple(shape)} differ "
                "at run time (chains were built for another input layout)"
            )
        return tensor

    def cache_for_later(self, tensor: torch.Tensor) -> None:
        """Keeps what later blocks of the chain read in this pass (the variant says which tensor)."""
        self.cached = (self.tracker.pass_id, tensor, torch.is_grad_enabled())

    @property
    def has_shortcut(self) -> bool:
        """Whether the branch reads earlier blocks' inputs (`is` / `ms` with a link and γ ≠ 0): no exact merge."""
        return self.variant.reads_earlier_inputs and bool(self.previous) and self.shortcut_scale != 0

    @property
    def records_input_norm(self) -> bool:
        """Only `is` / `ms` blocks on a shortcut need f_n (the input-based α); `none` and `bs` merge exactly."""
        return self.variant.reads_earlier_inputs and bool(self.previous or self.feeds_later_blocks)

    def _record_input_norm(self, x: torch.Tensor) -> None:
        # Once per forward pass (not again in a checkpoint recompute), without a host-device sync.
        if self._norm_pass_id == self.tracker.pass_id:
            return
        self._norm_pass_id = self.tracker.pass_id
        with torch.no_grad():
            slot = (self.input_norm_count % self.input_norms.numel()).view(1)
            norm = torch.linalg.vector_norm(x.detach(), dtype=torch.float32)  # no fp32 copy of x
            self.input_norms.index_copy_(0, slot, norm.view(1))
            self.input_norm_count += 1

    def mean_input_norm(self) -> float | None:
        """f_n of SPEC §2: the mean of the window, or None if the block never recorded one (see `records_input_norm`)."""
        count = int(self.input_norm_count)
        if count == 0:
            return None
        return float(self.input_norms[: min(count, self.input_norms.numel())].mean())

    def exact_factors(self) -> Factors:
        """(B*, A*) of the block's exact weight change s·B*A*: what every merge, export and test of a block without a
        shortcut reads. Delta-LoRA's is telescoped (SPEC §3): s·((1+λ)·B A − λ·B_K A_K), an exact rank-2r LoRA."""
        if self.has_shortcut:
            raise ValueError(f"{self.name}: res_type {self.res_type!r} has no exact weight change; use merge_adapter")
        up, down = self.variant.exact_factors(self)
        if self.delta_lora_start is not None:
            start_up, start_down = self.delta_lora_start
            ratio = self.delta_lora_ratio
            up = torch.cat([(1 + ratio) * self.lora_B, -ratio * start_up], dim=1)
            down = torch.cat([self.lora_A, start_down], dim=0)
        return up, down

    def merged_lora_factors(self, alphas: list[float] | None = None) -> LoRAFactors:
        """The block as plain-LoRA factors for a file (fp32, CPU): exact, or with the α of an `is` / `ms` shortcut.

        The file's scale is alpha / rank: `alpha` keeps the effective scale s whatever the merged rank.
        """
        up, down = self.variant.merged_factors(self, alphas) if self.has_shortcut else self.exact_factors()
        return self.lora_factors(up, down)

    def lora_factors(self, up: torch.Tensor, down: torch.Tensor) -> LoRAFactors:
        """Flat factors (up [out, R], down [R, in_features]) of this block at scale s, as a file holds them: fp32 on
        the CPU, 4-D LoCon tensors for a conv; `alpha` = s·R keeps the scale whatever the rank R."""
        up, down = self.projection.file_factors(up.detach().float().cpu(), down.detach().float().cpu())
        return LoRAFactors(down=down.contiguous(), up=up.contiguous(), alpha=self.scaling * down.shape[0])

    def _delta_lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(U, D) with U·D = λ·(B A − B_K A_K), detached: Delta-LoRA's weight move since step K over s, rank 2r."""
        start_up, start_down = self.delta_lora_start
        up = torch.cat([self.lora_B.detach(), -start_up], dim=1) * self.delta_lora_ratio
        return up, torch.cat([self.lora_A.detach(), start_down], dim=0)

    def branch_input(self, x: torch.Tensor) -> torch.Tensor:
        # Under autocast the matmuls pick their own dtype: casting x to fp32 here would only add a full-size copy.
        device = x.device.type
        if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
            return x
        return x.to(self.lora_A.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled() and self.records_input_norm:
            self._record_input_norm(x)
        dropped = self.dropout(self.branch_input(x))
        out = self.variant.branch(self, dropped, x)
        if self.delta_lora_start is not None:
            # Detached factors: the stop-gradient (W gets no gradient, so neither does its move); the gradient
            # still flows through x, as through a moved W. Autograd keeps only the factors.
            up, down = self._delta_lora_factors()
            out = out + self.projection.up(self.projection.down(dropped, down), up)
        return (out * (self.scaling * self.strength)).to(x.dtype)

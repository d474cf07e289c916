"""One object per ResLoRA variant (SPEC §1-2): what its branch computes, which earlier blocks it reads, how it merges.

A block (`blocks.ResLoRABlock`) holds the factors and the caches; its `variant` says what to do with them. Blocks,
chains, the merge and the calibrated merges ask the variant instead of switching on `res_type`, so a new variant is
one class here. The branch of block n, before the scale s:

    none: B_n A_n x_n                                  (also the host of Delta-LoRA: `blocks.ResLoRABlock`)
    is:   B_n A_n (x_n + γ x_{n-1})
    bs:   (B_n A_n + γ Σ_{k=1..m} B_{n-k} A_{n-k}) x_n  (one concatenated low-rank product, or the dense ΔW when the
                                                        chain is long: see `bs_dense_is_cheaper`)
    ms:   B_n (A_n x_n + γ Σ_{k=1..m} A_{n-k} x_{n-k})

`none` and `bs` are a plain LoRA of the frozen weight (`exact_factors`); `is` and `ms` read earlier blocks' inputs,
which a merged weight cannot, so their merge needs an α per link (merge.py, merge_calibration.py).

On a Conv2d (LoCon: A a k×k conv to rank r, B a 1×1 conv) every product above is the block's projection
(projections.py) and the algebra is unchanged, because a conv is linear in its flattened weight [out, in·k·k]:
`bs` is B*A* of the chain's concatenated factors, an exact LoCon of rank (m+1)·r (its blocks share kernel, stride,
padding and dilation: chains group by them); `is` adds x_{n-1} (same shape) before A_n's conv, `ms` adds the earlier
blocks' rank-r feature maps A_{n-k}*x_{n-k} (same shape: same input shape and convolution). Their merge replaces an
earlier input by α × this block's own, A* = A_n·(1+γα) or A_n + γΣα_k A_{n-k}: exact only where x_{n-k} = α x_n at
every position, so it is an estimate for convs as for attention, and its error is reported the same way.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch
from torch.utils.checkpoint import checkpoint

if TYPE_CHECKING:
    from reslora_diffusers.adapters.blocks import ResLoRABlock

Factors = tuple[torch.Tensor, torch.Tensor]  # (up, down): the weight change is s · up @ down


class Variant:
    """Plain LoRA (`none`); the other variants override what differs."""

    res_type = "none"
    # The branch reads earlier blocks' inputs (`is`, `ms`): chains then also group by input shape, blocks record
    # their input norms (the input-based α), and a merge needs α.
    reads_earlier_inputs = False

    def predecessors(self, earlier: list[str], pre_num: int) -> list[str]:
        """The earlier blocks of a chain a block links to, nearest first, from all of them (`earlier`)."""
        if pre_num == 0:
            return []
        return earlier if pre_num == -1 else earlier[:pre_num]

    def branch(self, block: ResLoRABlock, dropped: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The branch before the scale s, from the (dropped-out) input; caches what later blocks of the chain read."""
        projection = block.projection
        return projection.up(projection.down(dropped, block.lora_A), block.lora_B)

    def exact_factors(self, block: ResLoRABlock) -> Factors:
        """(B*, A*) with the weight change s·B*A* (for variants whose merge is exact)."""
        return block.lora_B, block.lora_A

    def link_downs(self, block: ResLoRABlock) -> list[torch.Tensor]:
        """A'_k of every link: the down-projection each shortcut term goes through (shortcut variants only)."""
        raise TypeError(f"res_type {self.res_type!r} has no shortcut terms")

    def merged_factors(self, block: ResLoRABlock, alphas: list[float]) -> Factors:
        """(up, down) of a shortcut block merged with one α per link: the shortcut input replaced by α × its own."""
        raise TypeError(f"res_type {self.res_type!r} merges exactly: use exact_factors")


class NoShortcut(Variant):
    res_type = "none"

    def predecessors(self, earlier: list[str], pre_num: int) -> list[str]:
        return []


class InputShortcut(Variant):
    """`is`: the previous block's input is added to this block's own, x_n + γ x_{n-1}."""

    res_type = "is"
    reads_earlier_inputs = True

    def predecessors(self, earlier: list[str], pre_num: int) -> list[str]:
        return earlier[:1] if pre_num != 0 else []

    def branch(self, block, dropped, x):
        projection = block.projection
        hidden = projection.down(dropped, block.lora_A)
        if block.has_shortcut:
            previous_input = block.cached_from(block.previous[0], x.shape)
            # A_n x_n + A_n x_{n-1}: two small products instead of a new full-size sum kept for backward.
            shortcut = projection.down(block.dropout(block.branch_input(previous_input)), block.lora_A)
            hidden = hidden + (shortcut if block.shortcut_scale == 1 else block.shortcut_scale * shortcut)
        if block.feeds_later_blocks:
            block.cache_for_later(x)
        return projection.up(hidden, block.lora_B)

    def link_downs(self, block):
        return [block.lora_A.detach().float()]

    def merged_factors(self, block, alphas):
        # B (x_n + γ α x_n): the up-projection scaled by (1 + γα).
        return (1 + block.shortcut_scale * alphas[0]) * block.lora_B, block.lora_A


class MiddleShortcut(Variant):
    """`ms`: earlier blocks' down-projections A_{n-k} x_{n-k} are added to this block's A_n x_n (rank r)."""

    res_type = "ms"
    reads_earlier_inputs = True

    def branch(self, block, dropped, x):
        projection = block.projection
        own = projection.down(dropped, block.lora_A)
        hidden = own
        if block.has_shortcut:
            earlier = sum(block.cached_from(previous, own.shape) for previous in block.previous)
            hidden = hidden + (earlier if block.shortcut_scale == 1 else block.shortcut_scale * earlier)
        if block.feeds_later_blocks:
            block.cache_for_later(own)  # the rank-r A·x, much smaller than x
        return projection.up(hidden, block.lora_B)

    def link_downs(self, block):
        return [previous.lora_A.detach().float() for previous in block.previous]

    def merged_factors(self, block, alphas):
        down = block.lora_A + block.shortcut_scale * sum(alpha * b.lora_A for alpha, b in zip(alphas, block.previous))
        return block.lora_B, down


class BlockShortcut(Variant):
    """`bs`: earlier blocks' whole products B_{n-k} A_{n-k} act on this block's input: one concatenated LoRA."""

    res_type = "bs"

    def branch(self, block, dropped, x):
        factors, projection = chain_parameters(block), block.projection
        tokens, chain_rank = projection.positions(dropped), block.rank * len(factors) // 2
        if bs_dense_is_cheaper(tokens, block.in_features, block.out_features, chain_rank):
            up, down = concatenated(*factors)
            return projection.dense(dropped, up @ down)
        low_rank = functools.partial(bs_low_rank, projection)
        if len(factors) > 2 and torch.is_grad_enabled():
            # Storing the tokens × (m+1)·r down-projection for backward would keep (m+1)× what a LoRA keeps:
            # recompute it in backward instead, from x (held anyway) and the parameters.
            return checkpoint(low_rank, dropped, *factors, use_reentrant=False, preserve_rng_state=False)
        return low_rank(dropped, *factors)

    def exact_factors(self, block):
        if block.previous and block.shortcut_scale != 0:
            return concatenated(*chain_parameters(block))
        return block.lora_B, block.lora_A


VARIANTS: dict[str, Variant] = {v.res_type: v for v in (NoShortcut(), InputShortcut(), BlockShortcut(), MiddleShortcut())}


def variant_of(res_type: str) -> Variant:
    try:
        return VARIANTS[res_type]
    except KeyError:
        raise ValueError(f"res_type must be one of {tuple(VARIANTS)}, got {res_type!r}") from None


# -- bs: the concatenated chain ---------------------------------------------------------------------------
def chain_parameters(block: ResLoRABlock) -> list[torch.Tensor]:
    """(A_n, B_n, A_{n-1}, γB_{n-1}, …) of a `bs` chain: what a checkpoint keeps instead of their concatenation."""
    gamma = block.shortcut_scale
    linked = block.previous if gamma != 0 else []  # γ = 0: plain LoRA, rank r
    earlier = [t for b in linked for t in (b.lora_A, b.lora_B if gamma == 1 else gamma * b.lora_B)]
    return [block.lora_A, block.lora_B, *earlier]


def concatenated(*factors: torch.Tensor) -> Factors:
    """([B_n … B_{n-m}], [A_n; …; A_{n-m}]) from factors (A_n, B_n, A_{n-1}, B_{n-1}, …)."""
    return torch.cat(factors[1::2], dim=1), torch.cat(factors[0::2], dim=0)


def bs_low_rank(projection, x: torch.Tensor, *factors: torch.Tensor) -> torch.Tensor:
    """B*(A* x) for factors (A_n, B_n, A_{n-1}, B_{n-1}, …), through the block's projection (Linear or conv)."""
    up, down = concatenated(*factors)
    return projection.up(projection.down(x, down), up)


def bs_dense_is_cheaper(tokens: int, in_features: int, out_features: int, rank: int) -> bool:
    """Whether one dense ΔW = B*A* costs fewer multiply-adds than the rank-R product B*(A*x).

    A `bs` block with many linked predecessors has a rank R = (m+1)·r that can reach the layer's width.
    The low-rank path then does more work per token than a dense matmul. The choice counts work, not
    memory: the dense path keeps ΔW (out × in) and the concatenated factors (R × (in + out)) for backward,
    the low-rank path recomputes and keeps nothing new (so at SDXL's 1024 px, where long chains go dense,
    `bs` keeps more than LoRA: BENCHMARKS.md). Same result up to rounding: an evaluation order, per call.
    """
    low_rank = tokens * rank * (in_features + out_features)
    dense = out_features * in_features * (rank + tokens)
    return dense < low_rank

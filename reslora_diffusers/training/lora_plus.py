"""LoRA+ (Hayou et al. 2024, arXiv 2402.12354): a higher learning rate for B than for A, same cost.

With B initialised at zero and A random, one learning rate for both is inefficient at large width; LoRA+
sets lr_B = ratio × lr_A (the paper's default ratio is 2^4 = 16). Works for every res_type and Delta-LoRA.
"""

from __future__ import annotations

from reslora_diffusers.adapters.adapter import ResLoRAAdapter


def lora_plus_param_groups(adapter: ResLoRAAdapter, lr: float, ratio: float = 1.0) -> list[dict]:
    """Optimizer parameter groups: every A at `lr`, every B at `ratio × lr`.

    Ratio 1 gives plain LoRA's one group, in `trainable_parameters()` order (optimizer states saved before
    LoRA+ existed still load).
    """
    if ratio <= 0:
        raise ValueError(f"the LoRA+ ratio must be > 0, got {ratio!r}")
    if ratio == 1:
        return [{"params": adapter.trainable_parameters(), "lr": lr}]
    blocks = list(adapter.blocks.values())
    return [
        {"params": [b.lora_A for b in blocks], "lr": lr, "name": "lora_A"},
        {"params": [b.lora_B for b in blocks], "lr": lr * ratio, "name": "lora_B"},
    ]

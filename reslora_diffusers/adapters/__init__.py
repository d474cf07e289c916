"""The adapter itself: what a ResLoRA / LoRA / Delta-LoRA block computes and how it is patched into SD.

    config.py      `ResLoRAConfig`: rank, targets, res_type, pre_num, Delta-LoRA and annealing options
    variants.py    one object per res_type (none, is, bs, ms): its forward term, merged factors, predecessors
    blocks.py      `ResLoRABlock`: the LoRA factors around a frozen linear, its exact weight change
    chains.py      the probe pass that orders blocks into chains, and each block's predecessors
    processor.py   `ResLoRAAttnProcessor` (a diffusers attention processor)
    adapter.py     `apply_reslora`, `ResLoRAAdapter`, the text-encoder hooks
    delta_lora.py  Delta-LoRA's step count and step-K factors
    annealing.py   the shortcut-annealing schedule γ(t)
    sdxl.py        SDXL conditioning (added conditions, two-encoder prompts)
    io.py          the native save / load (`save_adapter`, `load_adapter`)

Nothing is imported here: `from reslora_diffusers import apply_reslora` loads what it needs on first use.
"""

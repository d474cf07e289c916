"""ResLoRA (residual LoRA), LoRA and Delta-LoRA adapters for Stable Diffusion.

    adapter = apply_reslora(unet, ResLoRAConfig(res_type="bs", rank=8), text_encoder=None)
    ...train adapter.trainable_parameters(), calling adapter.step(global_step) after optimizer.step()...
    save_adapter(adapter, "out/"); adapter = load_adapter(fresh_unet, "out/")
"""

from .adapter import AdapterMismatchError, ResLoRAAdapter, apply_reslora
from .blocks import ResLoRABlock
from .config import ResLoRAConfig
from .io import load_adapter, save_adapter
from .processor import ResLoRAAttnProcessor

__all__ = [
    "AdapterMismatchError",
    "ResLoRAAdapter",
    "ResLoRABlock",
    "ResLoRAConfig",
    "ResLoRAAttnProcessor",
    "apply_reslora",
    "load_adapter",
    "save_adapter",
]

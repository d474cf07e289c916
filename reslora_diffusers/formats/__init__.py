"""Export formats for merged adapters: diffusers LoRA, kohya / A1111 / ComfyUI LoRA, single-file LDM checkpoint.

One module per concern: ``lora_factors`` (the factors and their delta), ``key_names`` (canonical and kohya
module names), ``ldm_names`` (diffusers <-> LDM names), ``diffusers_lora``, ``kohya_lora`` and ``single_file``
(the writers / readers). Every function goes from state to a file (or back); none of them modifies a model.
"""

from reslora_diffusers.formats.diffusers_lora import DIFFUSERS_LORA_WEIGHT_NAME, save_diffusers_lora
from reslora_diffusers.formats.key_names import (
    COMPONENTS,
    TEXT_COMPONENTS,
    canonical_key,
    is_sdxl_unet,
    kohya_name,
    kohya_name_to_key,
)
from reslora_diffusers.formats.kohya_lora import kohya_base_model_version, kohya_model_configs, load_kohya_lora, save_kohya_lora
from reslora_diffusers.formats.ldm_names import ldm_path_to_unet, unet_path_to_ldm
from reslora_diffusers.formats.lora_factors import LoRAFactors, lora_delta
from reslora_diffusers.formats.single_file import save_single_file_checkpoint, single_file_state_dict

__all__ = [
    "COMPONENTS",
    "TEXT_COMPONENTS",
    "DIFFUSERS_LORA_WEIGHT_NAME",
    "LoRAFactors",
    "canonical_key",
    "is_sdxl_unet",
    "kohya_base_model_version",
    "kohya_model_configs",
    "kohya_name",
    "kohya_name_to_key",
    "ldm_path_to_unet",
    "load_kohya_lora",
    "lora_delta",
    "save_diffusers_lora",
    "save_kohya_lora",
    "save_single_file_checkpoint",
    "single_file_state_dict",
    "unet_path_to_ldm",
]

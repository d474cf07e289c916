"""The diffusers / PEFT LoRA file that ``pipe.load_lora_weights(directory)`` reads."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import torch

from reslora_diffusers.formats.key_names import CLIP_WRAPPER, COMPONENTS, TEXT_COMPONENTS, canonical_factors
from reslora_diffusers.formats.lora_factors import LoRAFactors
from reslora_diffusers.formats.safetensors_files import atomic_save, check_string_metadata

DIFFUSERS_LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def save_diffusers_lora(
    factors: Mapping[str, LoRAFactors], directory, metadata: Mapping[str, str] | None = None
) -> Path:
    """Write ``<directory>/pytorch_lora_weights.safetensors`` for ``pipe.load_lora_weights(directory)``.

    PEFT keys (``unet.<path>.lora_A.weight`` / ``lora_B``; text encoder under ``text_encoder.text_model.``, the
    spelling diffusers, transformers 4 and ComfyUI all accept). The scale alpha/rank is folded into ``lora_B``
    and the adapter config says alpha == rank, so any PEFT-style loader applies the right strength whether or
    not it reads the ``lora_adapter_metadata`` header.
    """
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, dict[str, int]] = {c: {} for c in COMPONENTS}
    for (component, path), f in canonical_factors(factors).items():
        stored = (CLIP_WRAPPER + path) if component in TEXT_COMPONENTS else path
        tensors[f"{component}.{stored}.lora_A.weight"] = f.down
        tensors[f"{component}.{stored}.lora_B.weight"] = (f.scale * f.up.float()).to(f.up.dtype)
        ranks[component][path] = f.rank

    adapter_config = {}
    for component, module_ranks in ranks.items():
        if not module_ranks:
            continue
        r = Counter(module_ranks.values()).most_common(1)[0][0]
        pattern = {path: rank for path, rank in module_ranks.items() if rank != r}
        adapter_config.update(
            {
                f"{component}.r": r,
                f"{component}.lora_alpha": r,
                f"{component}.rank_pattern": pattern,
                f"{component}.alpha_pattern": pattern,
                f"{component}.target_modules": sorted(module_ranks),
            }
        )
    header = check_string_metadata(metadata)
    reserved = {"format", "lora_adapter_metadata"} & header.keys()
    if reserved:
        raise ValueError(f"metadata keys {sorted(reserved)} are written by save_diffusers_lora itself")
    header["format"] = "pt"
    header["lora_adapter_metadata"] = json.dumps(adapter_config, sort_keys=True)
    return atomic_save(tensors, Path(directory) / DIFFUSERS_LORA_WEIGHT_NAME, header)

"""kohya-style LoRA files (``lora_unet_*`` / ``lora_te_*``) for kohya sd-scripts, A1111, ComfyUI and diffusers.

``<name>.alpha`` is a 0-d tensor and the applied scale is ``alpha / lora_down.shape[0]``
(ComfyUI ``weight_adapter/lora.py`` and A1111 ``extensions-builtin/Lora`` use the same formula).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
from safetensors.torch import load_file

from .key_names import canonical_factors, kohya_name, kohya_name_to_key
from .lora_factors import LoRAFactors
from .safetensors_files import atomic_save, check_string_metadata, require_suffix


def save_kohya_lora(
    factors: Mapping[str, LoRAFactors],
    path,
    metadata: Mapping[str, str],
    *,
    base_model_version: Literal["sd_v1", "sd_v2"] = "sd_v1",
) -> Path:
    """Write a kohya-style LoRA (``lora_unet_*`` / ``lora_te_*``) for kohya sd-scripts, A1111, ComfyUI, diffusers.

    ``<name>.alpha`` is each module's real alpha, so a merged module of any rank keeps its strength.
    ``metadata`` (e.g. ``reslora_*`` keys, ``ss_output_name``) is added to the generated ``ss_*`` keys.
    """
    path = require_suffix(path, "kohya LoRA path")
    if base_model_version not in ("sd_v1", "sd_v2"):
        raise ValueError(f"base_model_version must be 'sd_v1' or 'sd_v2', got {base_model_version!r}")
    tensors: dict[str, torch.Tensor] = {}
    for (component, module_path), f in sorted(canonical_factors(factors).items()):
        name = kohya_name(f"{component}.{module_path}")
        tensors[f"{name}.lora_down.weight"] = f.down
        tensors[f"{name}.lora_up.weight"] = f.up
        tensors[f"{name}.alpha"] = torch.tensor(float(f.alpha), dtype=torch.float32)

    ranks = {f.rank for f in factors.values()}
    alphas = {float(f.alpha) for f in factors.values()}
    generated = {
        "ss_network_module": "networks.lora",
        # kohya's resize_lora writes "Dynamic" when modules have different ranks / alphas.
        "ss_network_dim": str(ranks.pop()) if len(ranks) == 1 else "Dynamic",
        "ss_network_alpha": str(alphas.pop()) if len(alphas) == 1 else "Dynamic",
        "ss_base_model_version": base_model_version,
        "ss_v2": str(base_model_version == "sd_v2"),
    }
    user = check_string_metadata(metadata)
    for key, value in user.items():
        if key in generated and value != generated[key]:
            raise ValueError(f"metadata {key}={value!r} contradicts the file, which holds {key}={generated[key]!r}")
    header = {"ss_output_name": path.stem, **user, **generated}
    return atomic_save(tensors, path, header)


def load_kohya_lora(path) -> dict[str, LoRAFactors]:
    """Read a kohya-style LoRA file into ``{"unet.<path>" | "text_encoder.<path>": LoRAFactors}``.

    A module without ``.alpha`` gets alpha = rank (kohya's rule for old files).
    """
    state = load_file(str(path))
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        name, _, part = key.partition(".")
        if part not in ("lora_down.weight", "lora_up.weight", "alpha"):
            raise ValueError(
                f"{path}: key {key!r} is not a plain LoRA tensor (lora_down.weight / lora_up.weight / alpha)"
            )
        grouped.setdefault(name, {})[part] = tensor
    out = {}
    for name, parts in grouped.items():
        if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
            raise ValueError(f"{path}: module {name!r} lacks lora_down.weight or lora_up.weight")
        down, up = parts["lora_down.weight"], parts["lora_up.weight"]
        alpha = float(parts["alpha"].item()) if "alpha" in parts else float(down.shape[0])
        out[kohya_name_to_key(name)] = LoRAFactors(down=down, up=up, alpha=alpha)
    return out

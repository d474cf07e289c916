"""kohya-style LoRA files (``lora_unet_*`` / ``lora_te*_*``) for kohya sd-scripts, A1111, ComfyUI and diffusers.

``<name>.alpha`` is a 0-d tensor and the applied scale is ``alpha / lora_down.shape[0]``
(ComfyUI ``weight_adapter/lora.py`` and A1111 ``extensions-builtin/Lora`` use the same formula).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file

from reslora_diffusers.formats.key_names import (
    canonical_factors,
    canonical_layer_key,
    is_sdxl_unet,
    kohya_name,
    kohya_name_to_key,
)
from reslora_diffusers.formats.ldm_names import config_get
from reslora_diffusers.formats.lora_factors import LoRAFactors
from reslora_diffusers.formats.safetensors_files import atomic_save, check_string_metadata, require_suffix

BASE_MODEL_VERSIONS = ("sd_v1", "sd_v2", "sdxl_base_v1-0")  # sd-scripts' ss_base_model_version values


def kohya_base_model_version(unet_config, text_encoder_config=None) -> str:
    """sd-scripts' ``ss_base_model_version`` of a base: SDXL from its added conditions, SD-2 from its OpenCLIP encoder.

    SD-1.x's text encoder is CLIP ViT-L (``quick_gelu``); SD-2.x's is OpenCLIP ViT-H (``gelu``, 1024 wide).
    """
    if is_sdxl_unet(unet_config):
        return "sdxl_base_v1-0"
    if text_encoder_config is not None:
        return "sd_v2" if config_get(text_encoder_config, "hidden_act") != "quick_gelu" else "sd_v1"
    return "sd_v2" if config_get(unet_config, "cross_attention_dim") == 1024 else "sd_v1"


def kohya_model_configs(model) -> dict:
    """``unet_config`` / ``text_encoder_config`` of a pipeline or adapter, for :func:`save_kohya_lora`."""
    configs = {}
    for name in ("unet", "text_encoder"):
        module = getattr(model, name, None)
        if module is not None:
            configs[f"{name}_config"] = module.config
    return configs


OPEN_CLIP_ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")


def _complete_open_clip_attention(canonical: dict) -> dict:
    """SDXL's second (OpenCLIP) text encoder: AUTOMATIC1111 applies an attention layer's LoRA only when all four of
    q / k / v / out are in the file (it fuses them into OpenCLIP's in_proj), and silently skips the layer otherwise.
    The missing projections are added as zero LoRAs of the same shape, which change nothing and make it apply."""
    completed = dict(canonical)
    for (component, path), f in canonical.items():
        if component != "text_encoder_2" or not path.endswith(OPEN_CLIP_ATTENTION):
            continue
        layer = path.rsplit(".", 1)[0]
        for projection in OPEN_CLIP_ATTENTION:
            key = (component, f"{layer}.{projection}")
            if key not in completed:
                completed[key] = LoRAFactors(down=torch.zeros_like(f.down), up=torch.zeros_like(f.up), alpha=f.alpha)
    return completed


def save_kohya_lora(
    factors: Mapping[str, LoRAFactors],
    path,
    metadata: Mapping[str, str],
    *,
    unet_config=None,
    text_encoder_config=None,
    base_model_version: str | None = None,
) -> Path:
    """Write a kohya-style LoRA for kohya sd-scripts, A1111, ComfyUI and diffusers.

    Module names follow sd-scripts: SD-1.x / 2.x ``lora_unet_<diffusers path>`` / ``lora_te_...``; SDXL (when
    ``unet_config`` is an SDXL UNet's) ``lora_unet_<LDM path>`` / ``lora_te1_...`` / ``lora_te2_...``. Conv
    modules are LoCon's (``lora_down`` [r, in, kh, kw], ``lora_up`` [out, r, 1, 1]), as sd-scripts' ``conv_dim`` and
    LyCORIS write them.
    Every module gets the same ``.alpha`` and its own scale folded into ``lora_up``: diffusers applies one
    alpha to every module of a kohya file, so per-module alphas (a ``bs`` merge's rank grows along each chain)
    would reach it at the wrong strength; with one alpha every loader applies the exact delta.
    ``base_model_version`` defaults to what the configs say (:func:`kohya_base_model_version`; ``sd_v1``
    without configs). ``metadata`` (e.g. ``reslora_*`` keys, ``ss_output_name``) is added to the ``ss_*`` keys.
    """
    path = require_suffix(path, "kohya LoRA path")
    if base_model_version is None:
        base_model_version = "sd_v1" if unet_config is None else kohya_base_model_version(unet_config, text_encoder_config)
    if base_model_version not in BASE_MODEL_VERSIONS:
        raise ValueError(f"base_model_version must be one of {BASE_MODEL_VERSIONS}, got {base_model_version!r}")
    if (base_model_version == "sdxl_base_v1-0") != is_sdxl_unet(unet_config):
        raise ValueError(f"base_model_version {base_model_version!r} needs the UNet config of that model for its names")
    canonical = canonical_factors(factors)
    if base_model_version == "sdxl_base_v1-0":
        canonical = _complete_open_clip_attention(canonical)
    alpha = Counter(float(f.alpha) for f in canonical.values()).most_common(1)[0][0]
    tensors: dict[str, torch.Tensor] = {}
    for (component, module_path), f in sorted(canonical.items()):
        name = kohya_name(f"{component}.{module_path}", unet_config)
        tensors[f"{name}.lora_down.weight"] = f.down
        up = f.up if f.alpha == alpha else (f.up.float() * (f.alpha / alpha)).to(f.up.dtype)
        tensors[f"{name}.lora_up.weight"] = up
        tensors[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)

    # kohya's resize_lora writes "Dynamic" when modules have different ranks; conv (LoCon) modules have their own.
    linear_ranks = {f.rank for f in canonical.values() if not f.is_conv}
    conv_ranks = {f.rank for f in canonical.values() if f.is_conv}
    generated = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": _rank_label(linear_ranks or conv_ranks),
        "ss_network_alpha": str(alpha),
        "ss_base_model_version": base_model_version,
        "ss_v2": str(base_model_version == "sd_v2"),
    }
    if conv_ranks:  # sd-scripts records conv_dim / conv_alpha in its network args
        generated["ss_network_args"] = json.dumps({"conv_dim": _rank_label(conv_ranks), "conv_alpha": str(alpha)})
    user = check_string_metadata(metadata)
    for key, value in user.items():
        if key in generated and value != generated[key]:
            raise ValueError(f"metadata {key}={value!r} contradicts the file, which holds {key}={generated[key]!r}")
    header = {"ss_output_name": path.stem, **user, **generated}
    return atomic_save(tensors, path, header)


def _rank_label(ranks: set[int]) -> str:
    return str(next(iter(ranks))) if len(ranks) == 1 else "Dynamic"


def load_kohya_lora(path, unet_config=None) -> dict[str, LoRAFactors]:
    """Read a kohya-style LoRA file into ``{"<component>.<path>": LoRAFactors}``.

    A module without ``.alpha`` gets alpha = rank (kohya's rule for old files). SDXL files name UNet modules
    in LDM naming: pass the UNet config to map them back.
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
        try:
            factors = LoRAFactors(down=down, up=up, alpha=alpha)
            key = kohya_name_to_key(name, unet_config)
            canonical_layer_key(key, factors)
        except ValueError as err:
            raise ValueError(f"{path}: module {name!r}: {err}") from None
        out[key] = factors
    return out

"""Single-file LDM checkpoints (``model.diffusion_model.*``, ...) for ``from_single_file``, A1111 and ComfyUI."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from .key_names import CLIP_WRAPPER
from .ldm_names import config_get, prefix_table, translate, unet_blocks, vae_blocks
from .safetensors_files import atomic_save, require_suffix

_LDM_PREFIX = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder": "cond_stage_model.transformer.text_model.",
}


def _components(pipe_or_components) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
    def get(name):
        if isinstance(pipe_or_components, Mapping):
            return pipe_or_components.get(name)
        return getattr(pipe_or_components, name, None)

    found = tuple(get(name) for name in ("unet", "vae", "text_encoder"))
    missing = [n for n, m in zip(("unet", "vae", "text_encoder"), found) if not isinstance(m, torch.nn.Module)]
    if missing:
        raise ValueError(f"a single-file checkpoint needs the unet, vae and text_encoder modules; missing: {missing}")
    return found


def single_file_state_dict(pipe_or_components, half: bool = False) -> dict[str, torch.Tensor]:
    """The LDM-layout state dict of an SD-1.x pipeline (``model.diffusion_model.*``, ``first_stage_model.*``, ...)."""
    unet, vae, text_encoder = _components(pipe_or_components)
    states = {"unet": unet.state_dict(), "vae": vae.state_dict(), "text_encoder": text_encoder.state_dict()}
    for component, state in states.items():
        leftover = [k for k in state if "lora_" in k or ".base_layer." in k]
        if leftover:
            raise ValueError(
                f"{component} still holds LoRA adapter weights (e.g. {leftover[0]!r}); fuse and unload them first"
            )
    if config_get(text_encoder.config, "hidden_act") != "quick_gelu":
        raise ValueError(
            "the text encoder is not SD-1.x's CLIP ViT-L (hidden_act 'quick_gelu'); SD-2's OpenCLIP encoder "
            "needs the cond_stage_model.model.* layout, which this writer does not produce"
        )

    sd: dict[str, torch.Tensor] = {}
    unet_table = prefix_table(unet_blocks(unet.config), to_ldm=True)
    for key, value in states["unet"].items():
        sd[_LDM_PREFIX["unet"] + translate(key, unet_table, "diffusers UNet")] = value

    vae_table = prefix_table(vae_blocks(vae.config), to_ldm=True)
    for key, value in states["vae"].items():
        ldm_key = translate(key, vae_table, "diffusers VAE")
        if ".mid.attn_1." in ldm_key and ldm_key.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")):
            value = value.reshape(*value.shape, 1, 1)  # LDM's VAE attention projections are 1x1 convs
        sd[_LDM_PREFIX["vae"] + ldm_key] = value

    for key, value in states["text_encoder"].items():
        sd[_LDM_PREFIX["text_encoder"] + key.removeprefix(CLIP_WRAPPER)] = value
    # transformers keeps position_ids as a non-persistent buffer; SD-1.x checkpoints store them (int64).
    num_positions = config_get(text_encoder.config, "max_position_embeddings")
    sd[_LDM_PREFIX["text_encoder"] + "embeddings.position_ids"] = torch.arange(num_positions).unsqueeze(0)

    if half:
        sd = {k: (v.half() if v.is_floating_point() else v) for k, v in sd.items()}
    return sd


def save_single_file_checkpoint(pipe_or_components, path, half: bool = False) -> Path:
    """Write a merged SD-1.x pipeline as one LDM ``.safetensors`` (``from_single_file``, A1111, ComfyUI)."""
    path = require_suffix(path, "single-file checkpoint path")
    return atomic_save(single_file_state_dict(pipe_or_components, half=half), path, {"format": "pt"})

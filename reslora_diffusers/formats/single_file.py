"""Single-file checkpoints (LDM layout for SD-1.x, SGM layout for SDXL) for ``from_single_file``, A1111 and ComfyUI."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

from reslora_diffusers.formats.key_names import CLIP_WRAPPER, is_sdxl_unet
from reslora_diffusers.formats.ldm_names import config_get, prefix_table, translate, unet_blocks, vae_blocks
from reslora_diffusers.formats.safetensors_files import atomic_save, require_suffix

_LDM_PREFIX = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder": "cond_stage_model.transformer.text_model.",
}
# SDXL's single file (Stability's SGM layout): CLIP ViT-L in transformers' layout, OpenCLIP ViT-bigG in its own.
_SGM_TEXT_ENCODER = "conditioner.embedders.0.transformer.text_model."
_SGM_TEXT_ENCODER_2 = "conditioner.embedders.1.model."


def _get(pipe_or_components, name):
    if isinstance(pipe_or_components, Mapping):
        return pipe_or_components.get(name)
    return getattr(pipe_or_components, name, None)


def _components(pipe_or_components) -> dict[str, torch.nn.Module]:
    names = ["unet", "vae", "text_encoder"]
    unet = _get(pipe_or_components, "unet")
    if isinstance(unet, torch.nn.Module) and is_sdxl_unet(unet.config):
        names.append("text_encoder_2")
    found = {name: _get(pipe_or_components, name) for name in names}
    missing = [n for n, m in found.items() if not isinstance(m, torch.nn.Module)]
    if missing:
        raise ValueError(f"a single-file checkpoint needs the {', '.join(names)} modules; missing: {missing}")
    return found


def _clip_position_ids(text_encoder) -> torch.Tensor:
    # transformers keeps position_ids as a non-persistent buffer; LDM / SGM checkpoints store them (int64).
    return torch.arange(config_get(text_encoder.config, "max_position_embeddings")).unsqueeze(0)


def _open_clip_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ``CLIPTextModelWithProjection`` state dict in OpenCLIP naming, by diffusers' own table.

    The inverse of ``single_file_utils.convert_open_clip_checkpoint``: the renames of
    ``DIFFUSERS_TO_LDM_MAPPING["openclip"]``, q / k / v joined into ``attn.in_proj_*``, the projection transposed.
    """
    table = DIFFUSERS_TO_LDM_MAPPING["openclip"]
    layer_renames = [(new, old) for new, old in table["transformer"].items() if new.startswith((".", "layer_norm", "text_model.encoder"))]
    state = {k if k.startswith((CLIP_WRAPPER, "text_projection")) else CLIP_WRAPPER + k: v for k, v in state.items()}
    out: dict[str, torch.Tensor] = {}
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key in table["layers"]:
            ldm_key = table["layers"][key]
            out[ldm_key] = value.T.contiguous() if ldm_key == "text_projection" else value
            continue
        if not key.startswith(CLIP_WRAPPER + "encoder.layers."):
            continue  # position_ids: a buffer OpenCLIP does not store
        ldm_key = key
        for new, old in layer_renames:
            ldm_key = ldm_key.replace(new, old)
        for projection in ("q_proj", "k_proj", "v_proj"):
            if f".{projection}." in ldm_key:
                head, _, kind = ldm_key.rpartition(f".{projection}.")
                pending.setdefault(f"transformer.{head}.in_proj_{kind}", {})[projection] = value
                break
        else:
            out["transformer." + ldm_key] = value
    for key, parts in pending.items():
        out[key] = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]], dim=0)
    return out


def _check_no_adapter(states: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    for component, state in states.items():
        leftover = [k for k in state if "lora_" in k or ".base_layer." in k]
        if leftover:
            raise ValueError(
                f"{component} still holds LoRA adapter weights (e.g. {leftover[0]!r}); fuse and unload them first"
            )


def single_file_state_dict(pipe_or_components, half: bool = False) -> dict[str, torch.Tensor]:
    """The single-file state dict of an SD-1.x pipeline (LDM layout) or an SDXL pipeline (SGM layout)."""
    models = _components(pipe_or_components)
    states = {name: model.state_dict() for name, model in models.items()}
    _check_no_adapter(states)
    unet, vae, text_encoder = models["unet"], models["vae"], models["text_encoder"]
    sdxl = "text_encoder_2" in models
    if not sdxl and config_get(text_encoder.config, "hidden_act") != "quick_gelu":
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

    prefix = _SGM_TEXT_ENCODER if sdxl else _LDM_PREFIX["text_encoder"]
    for key, value in states["text_encoder"].items():
        sd[prefix + key.removeprefix(CLIP_WRAPPER)] = value
    sd[prefix + "embeddings.position_ids"] = _clip_position_ids(text_encoder)
    if sdxl:
        for key, value in _open_clip_state(states["text_encoder_2"]).items():
            sd[_SGM_TEXT_ENCODER_2 + key] = value

    if half:
        sd = {k: (v.half() if v.is_floating_point() else v) for k, v in sd.items()}
    return sd


def save_single_file_checkpoint(pipe_or_components, path, half: bool = False) -> Path:
    """Write a merged SD-1.x / SDXL pipeline as one ``.safetensors`` (``from_single_file``, A1111, ComfyUI)."""
    path = require_suffix(path, "single-file checkpoint path")
    return atomic_save(single_file_state_dict(pipe_or_components, half=half), path, {"format": "pt"})

"""The native adapter format: `reslora_adapter.safetensors` (tensors) + `reslora_config.json` (config, chains, layers).

Only safetensors is read, never a pickle. Files are written atomically (temp file, then rename), so a crash
never leaves a half-written adapter that looks complete.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from reslora_diffusers.adapters.adapter import AdapterMismatchError, ResLoRAAdapter, apply_reslora
from reslora_diffusers.adapters.chains import ProbedLayer, build_chains
from reslora_diffusers.adapters.config import ResLoRAConfig
from reslora_diffusers.adapters.sdxl import is_sdxl_unet
from reslora_diffusers.atomic import atomic_write, atomic_write_text

WEIGHTS_NAME = "reslora_adapter.safetensors"
CONFIG_NAME = "reslora_config.json"
FORMAT_VERSION = 1


def adapter_metadata(adapter: ResLoRAAdapter) -> dict[str, Any]:
    """What `reslora_config.json` holds: everything but tensors, readable by people and by `load_adapter`."""
    return {
        "format": "reslora_diffusers",
        "format_version": FORMAT_VERSION,
        "config": adapter.config.to_dict(),
        "base_family": base_family(adapter.unet),
        "chains": adapter.chains,
        "layers": {name: layer.to_dict() for name, layer in adapter.layers.items()},
        "input_norm_means": adapter.input_norm_means(),
        # γ of the shortcut terms (annealing ends at 0: a plain LoRA); files without it were trained at 1.
        "shortcut_scale": adapter.shortcut_scale,
        "delta_lora_started": bool(adapter.delta_lora and adapter.delta_lora.started),
    }


def base_family(unet: nn.Module) -> str:
    """"sdxl" for a UNet with SDXL's added conditions, else "sd" (Stable Diffusion 1.x / 2.x)."""
    return "sdxl" if is_sdxl_unet(unet.config) else "sd"


_FAMILY_NAMES = {"sdxl": "SDXL", "sd": "Stable Diffusion 1.x / 2.x"}


def check_base_family(metadata: dict[str, Any], unet: nn.Module) -> None:
    """Refuses an SD-1.x / 2.x adapter on an SDXL UNet and vice versa, naming both."""
    saved = metadata.get("base_family") or ("sdxl" if "text_encoder_2" in metadata.get("chains", {}) else "sd")
    here = base_family(unet)
    if saved != here:
        raise AdapterMismatchError(
            f"this adapter was trained on {_FAMILY_NAMES.get(saved, saved)}, but the UNet given is "
            f"{_FAMILY_NAMES[here]}: load it onto the kind of base it was trained on"
        )


def save_adapter(adapter: ResLoRAAdapter, directory: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
    """Writes the adapter into `directory` (created if needed); `extra` is stored in the JSON under "extra"."""
    directory = Path(directory)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in adapter.state_dict().items()}
    metadata = adapter_metadata(adapter)
    if extra:
        metadata["extra"] = extra
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write_text(directory / CONFIG_NAME, json.dumps(metadata, indent=2))
    return directory


def read_adapter(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Reads (metadata, tensors) of a saved adapter, with one clear error for anything missing or corrupt."""
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not directory.is_dir():
        raise FileNotFoundError(f"adapter folder not found: {directory}")
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{directory} is not a ResLoRA adapter folder: {path.name} is missing")
    try:
        metadata = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{config_path} is not valid JSON: {error}") from None
    if metadata.get("format") != "reslora_diffusers":
        raise ValueError(f"{config_path} is not a reslora_diffusers adapter config")
    if metadata.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{config_path} has format version {metadata['format_version']}; this library reads ≤ {FORMAT_VERSION}")
    try:
        tensors = load_file(weights_path)
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{weights_path} is not a readable safetensors file: {unreadable_reason(weights_path, error)}") from None
    return metadata, tensors


# How the files most often mistaken for safetensors begin.
_PICKLE_START = b"\x80"  # pickle protocol 2+ (torch.save before 1.6, .ckpt, .bin)
_ZIP_START = b"PK\x03\x04"  # torch.save's zip container (.pt, .pth, .bin)


def unreadable_reason(path: Path, error: Exception) -> str:
    """Why safetensors could not read `path`, named by what the file is rather than by the parser's symptom."""
    with open(path, "rb") as file:
        start = file.read(8)
    if start.startswith(_PICKLE_START) or start.startswith(_ZIP_START):
        return "it is a pickled PyTorch file (torch.save / .ckpt), which is never loaded here (unpickling can run code)"
    if len(start) < 8:
        return f"it is truncated ({len(start)} bytes)"
    return str(error)


def _check_chains_match_config(metadata: dict[str, Any], config: ResLoRAConfig, config_path: Path) -> None:
    """The saved chains were built for the saved res_type; a config edited to another one no longer describes them."""
    by_component: dict[str, list[ProbedLayer]] = {}
    for name, layer in metadata.get("layers", {}).items():
        by_component.setdefault(name.split(".", 1)[0], []).append(ProbedLayer.from_dict(name, layer))
    for component, layers in by_component.items():
        expected = sorted(map(tuple, build_chains(layers, config.res_type)))
        if expected != sorted(map(tuple, metadata["chains"].get(component, []))):
            raise ValueError(
                f"{config_path} is inconsistent: its chains were not built for its res_type {config.res_type!r} "
                "(was the config edited?); restore the file written with the adapter"
            )


def load_adapter(
    unet: nn.Module,
    directory: str | os.PathLike,
    text_encoder: nn.Module | None = None,
    text_encoder_2: nn.Module | None = None,
) -> ResLoRAAdapter:
    """Restores a saved adapter onto a fresh base model; refuses an adapter whose layers or chains don't fit.

    A `text_encoder` (SDXL: and `text_encoder_2`) is needed exactly when the adapter has blocks there; one
    passed for an adapter without them is left untouched. An SDXL adapter on an SD-1.x / 2.x UNet, or the
    reverse, is refused by name.
    """
    metadata, tensors = read_adapter(directory)
    check_base_family(metadata, unet)
    config = ResLoRAConfig.from_dict(metadata["config"])
    _check_chains_match_config(metadata, config, Path(directory) / CONFIG_NAME)
    chains = metadata["chains"]
    if "text_encoder" not in chains:
        text_encoder = None
    if "text_encoder_2" not in chains:
        text_encoder_2 = None
    adapter = apply_reslora(unet, config, text_encoder=text_encoder, chains=chains, text_encoder_2=text_encoder_2)
    try:
        adapter.load_state_dict(tensors)
        adapter.set_shortcut_scale(float(metadata.get("shortcut_scale", 1.0)))
    except (AdapterMismatchError, ValueError):
        adapter.remove()
        raise
    return adapter

"""Export formats for merged adapters: diffusers LoRA, kohya / A1111 / ComfyUI LoRA, single-file LDM checkpoint.

Every function here goes from state to a file (or back); none of them modifies a model.

Naming conventions (read from the loaders themselves):
- kohya sd-scripts ``networks/lora.py``: ``lora_name = "lora_unet" + "." + module path``, then ``"." -> "_"``;
  the SD-1.x text encoder is a transformers-4 ``CLIPTextModel`` whose paths start with ``text_model.``;
  ``<name>.alpha`` is a 0-d tensor and the applied scale is ``alpha / lora_down.shape[0]``
  (ComfyUI ``weight_adapter/lora.py`` and A1111 ``extensions-builtin/Lora`` use the same formula).
- LDM / single-file: the block numbering of ``diffusers.loaders.single_file_utils.convert_ldm_unet_checkpoint``
  and ComfyUI ``comfy.utils.unet_to_diffusers``, computed here from the UNet config.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file

from .atomic import atomic_write

DIFFUSERS_LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"

COMPONENTS = ("unet", "text_encoder")
_KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
# transformers >= 5 flattened CLIPTextModel (no `text_model.`); kohya, ComfyUI, A1111 and LDM names keep it.
_CLIP_WRAPPER = "text_model."
_LDM_PREFIX = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder": "cond_stage_model.transformer.text_model.",
}

# Linear layers a LoRA may target, in the canonical (diffusers / transformers-5) naming.
_UNET_LINEAR = re.compile(
    r"(?:down_blocks\.\d+|up_blocks\.\d+|mid_block)\.attentions\.\d+\.transformer_blocks\.\d+\."
    r"(?:attn[12]\.(?:to_q|to_k|to_v|to_out\.0)|ff\.net\.0\.proj|ff\.net\.2)"
)
_TE_LINEAR = re.compile(r"encoder\.layers\.\d+\.(?:self_attn\.(?:q_proj|k_proj|v_proj|out_proj)|mlp\.fc[12])")
_LINEAR_PATTERN = {"unet": _UNET_LINEAR, "text_encoder": _TE_LINEAR}
# Every name segment of those paths that itself contains "_", so a kohya name can be split back into segments.
_KOHYA_SEGMENTS = sorted(
    {
        "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out",
        "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj",
    },
    key=len,
    reverse=True,
)


@dataclass(frozen=True, eq=False)  # eq on tensors would be ambiguous; identity is the honest equality
class LoRAFactors:
    """One low-rank update of an ``nn.Linear``: ``ΔW = (alpha / rank) · up @ down``."""

    down: torch.Tensor  # [rank, in_features]
    up: torch.Tensor  # [out_features, rank]
    alpha: float  # the real lora_alpha of this module

    def __post_init__(self):
        if not (isinstance(self.down, torch.Tensor) and isinstance(self.up, torch.Tensor)):
            raise ValueError("LoRAFactors.down and .up must be torch.Tensors")
        if self.down.ndim != 2 or self.up.ndim != 2:
            raise ValueError(
                f"LoRAFactors supports nn.Linear only: down must be [rank, in] and up [out, rank], "
                f"got down {tuple(self.down.shape)} and up {tuple(self.up.shape)}"
            )
        if self.up.shape[1] != self.down.shape[0]:
            raise ValueError(
                f"rank mismatch: down {tuple(self.down.shape)} has rank {self.down.shape[0]}, "
                f"up {tuple(self.up.shape)} has rank {self.up.shape[1]}"
            )
        if not (self.down.is_floating_point() and self.up.is_floating_point()):
            raise ValueError(f"LoRA factors must be floating point, got {self.down.dtype} and {self.up.dtype}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"alpha must be a positive finite number, got {self.alpha!r}")

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def lora_delta(f: LoRAFactors) -> torch.Tensor:
    """ΔW = (alpha / rank) · up @ down in fp32: the one place this formula lives."""
    return f.scale * (f.up.float() @ f.down.float())


# ----------------------------------------------------------------------------------------------------------
# Module names


def canonical_key(key: str) -> tuple[str, str]:
    """Split ``"<component>.<module path>"`` into (component, path); text-encoder paths lose ``text_model.``."""
    component, _, path = key.partition(".")
    if component not in COMPONENTS or not path:
        raise ValueError(f"LoRA key {key!r} must look like 'unet.<module path>' or 'text_encoder.<module path>'")
    if component == "text_encoder":
        path = path.removeprefix(_CLIP_WRAPPER)
    if not _LINEAR_PATTERN[component].fullmatch(path):
        raise ValueError(
            f"LoRA key {key!r}: {path!r} is not a supported Linear layer of the {component} "
            f"(expected a path matching {_LINEAR_PATTERN[component].pattern!r})"
        )
    return component, path


def kohya_name(key: str) -> str:
    """kohya's module name: ``unet.a.b`` -> ``lora_unet_a_b``; ``text_encoder.a.b`` -> ``lora_te_text_model_a_b``."""
    component, path = canonical_key(key)
    if component == "text_encoder":
        path = _CLIP_WRAPPER + path
    return _KOHYA_PREFIX[component] + path.replace(".", "_")


def kohya_name_to_key(name: str) -> str:
    """Inverse of :func:`kohya_name`; returns the canonical ``"<component>.<path>"`` (no ``text_model.``)."""
    for component, prefix in _KOHYA_PREFIX.items():
        if name.startswith(prefix):
            rest = name[len(prefix):]
            break
    else:
        raise ValueError(f"kohya LoRA name {name!r} starts with neither 'lora_unet_' nor 'lora_te_'")
    segments = []
    while rest:
        segment = next((s for s in _KOHYA_SEGMENTS if rest == s or rest.startswith(s + "_")), None)
        if segment is None:
            segment = rest.split("_", 1)[0]
        segments.append(segment)
        rest = rest[len(segment) + 1:]
    key = f"{component}." + ".".join(segments)
    try:
        component, path = canonical_key(key)
    except ValueError as err:
        raise ValueError(f"kohya LoRA name {name!r} does not name a supported Linear layer ({err})") from None
    return f"{component}.{path}"


_UNET_RESNET_TO_LDM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_RESNET_TO_LDM = {
    "norm1": "norm1",
    "conv1": "conv1",
    "norm2": "norm2",
    "conv2": "conv2",
    "conv_shortcut": "nin_shortcut",
}
_VAE_ATTENTION_TO_LDM = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


@dataclass(frozen=True)
class _Block:
    diffusers: str  # prefix in diffusers naming
    ldm: str  # the same block in LDM naming
    renames: Mapping[str, str] | None = None  # diffusers -> LDM names of the block's children; None: unchanged


def _config_get(config, name, default=None):
    return config.get(name, default) if isinstance(config, Mapping) else getattr(config, name, default)


def _unet_blocks(config) -> list[_Block]:
    """The diffusers <-> LDM block table of an SD-1.x-shaped UNet, with block counts from its config."""
    down_types = list(_config_get(config, "down_block_types"))
    up_types = list(_config_get(config, "up_block_types"))
    mid_type = _config_get(config, "mid_block_type", "UNetMidBlock2DCrossAttn")
    layers = _config_get(config, "layers_per_block")
    layers = [layers] * len(down_types) if isinstance(layers, int) else list(layers)
    if not (set(down_types) <= {"CrossAttnDownBlock2D", "DownBlock2D"}) or not (
        set(up_types) <= {"CrossAttnUpBlock2D", "UpBlock2D"}
    ):
        raise ValueError(f"not an SD-1.x-shaped UNet: down blocks {down_types}, up blocks {up_types}")
    if mid_type != "UNetMidBlock2DCrossAttn":
        raise ValueError(f"not an SD-1.x-shaped UNet: mid block {mid_type!r}")
    if len(up_types) != len(down_types) or len(layers) != len(down_types):
        raise ValueError(
            f"UNet config has {len(down_types)} down blocks, {len(up_types)} up blocks, layers_per_block {layers}"
        )

    blocks = [
        _Block("conv_in", "input_blocks.0.0"),
        _Block("time_embedding.linear_1", "time_embed.0"),
        _Block("time_embedding.linear_2", "time_embed.2"),
        _Block("conv_norm_out", "out.0"),
        _Block("conv_out", "out.2"),
        _Block("mid_block.resnets.0", "middle_block.0", _UNET_RESNET_TO_LDM),
        _Block("mid_block.attentions.0", "middle_block.1"),
        _Block("mid_block.resnets.1", "middle_block.2", _UNET_RESNET_TO_LDM),
    ]
    n = 1
    for b, (block_type, num_layers) in enumerate(zip(down_types, layers)):
        for i in range(num_layers):
            blocks.append(_Block(f"down_blocks.{b}.resnets.{i}", f"input_blocks.{n}.0", _UNET_RESNET_TO_LDM))
            if block_type == "CrossAttnDownBlock2D":
                blocks.append(_Block(f"down_blocks.{b}.attentions.{i}", f"input_blocks.{n}.1"))
            n += 1
        if b < len(down_types) - 1:
            blocks.append(_Block(f"down_blocks.{b}.downsamplers.0.conv", f"input_blocks.{n}.0.op"))
            n += 1
    n = 0
    for b, (block_type, num_layers) in enumerate(zip(up_types, reversed(layers))):
        has_attention = block_type == "CrossAttnUpBlock2D"
        for i in range(num_layers + 1):
            blocks.append(_Block(f"up_blocks.{b}.resnets.{i}", f"output_blocks.{n}.0", _UNET_RESNET_TO_LDM))
            if has_attention:
                blocks.append(_Block(f"up_blocks.{b}.attentions.{i}", f"output_blocks.{n}.1"))
            if i == num_layers and b < len(up_types) - 1:
                slot = 2 if has_attention else 1
                blocks.append(_Block(f"up_blocks.{b}.upsamplers.0.conv", f"output_blocks.{n}.{slot}.conv"))
            n += 1
    return blocks


def _vae_blocks(config) -> list[_Block]:
    """The diffusers <-> LDM block table of an ``AutoencoderKL``; LDM numbers decoder up blocks in reverse."""
    num_down = len(_config_get(config, "down_block_types"))
    num_up = len(_config_get(config, "up_block_types"))
    layers = _config_get(config, "layers_per_block")
    blocks = [_Block("quant_conv", "quant_conv"), _Block("post_quant_conv", "post_quant_conv")]
    for part in ("encoder", "decoder"):
        blocks += [
            _Block(f"{part}.conv_in", f"{part}.conv_in"),
            _Block(f"{part}.conv_out", f"{part}.conv_out"),
            _Block(f"{part}.conv_norm_out", f"{part}.norm_out"),
            _Block(f"{part}.mid_block.resnets.0", f"{part}.mid.block_1", _VAE_RESNET_TO_LDM),
            _Block(f"{part}.mid_block.resnets.1", f"{part}.mid.block_2", _VAE_RESNET_TO_LDM),
            _Block(f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", _VAE_ATTENTION_TO_LDM),
        ]
    for b in range(num_down):
        for i in range(layers):
            blocks.append(
                _Block(f"encoder.down_blocks.{b}.resnets.{i}", f"encoder.down.{b}.block.{i}", _VAE_RESNET_TO_LDM)
            )
        if b < num_down - 1:
            blocks.append(_Block(f"encoder.down_blocks.{b}.downsamplers.0.conv", f"encoder.down.{b}.downsample.conv"))
    for b in range(num_up):
        ldm_b = num_up - 1 - b
        for i in range(layers + 1):
            blocks.append(
                _Block(f"decoder.up_blocks.{b}.resnets.{i}", f"decoder.up.{ldm_b}.block.{i}", _VAE_RESNET_TO_LDM)
            )
        if b < num_up - 1:
            blocks.append(_Block(f"decoder.up_blocks.{b}.upsamplers.0.conv", f"decoder.up.{ldm_b}.upsample.conv"))
    return blocks


def _prefix_table(blocks: list[_Block], to_ldm: bool) -> dict[str, tuple[str, Mapping[str, str] | None]]:
    """source block prefix -> (target block prefix, renames of its children in that direction)."""
    table = {}
    for blk in blocks:
        if to_ldm:
            table[blk.diffusers] = (blk.ldm, blk.renames)
        else:
            inverse = None if blk.renames is None else {v: k for k, v in blk.renames.items()}
            table[blk.ldm] = (blk.diffusers, inverse)
    return table


def _translate(path: str, table: dict[str, tuple[str, Mapping[str, str] | None]], what: str) -> str:
    """Rename ``path`` (a module path or a state-dict key) through its longest block prefix in ``table``."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        if ".".join(parts[:cut]) in table:
            head, renames = table[".".join(parts[:cut])]
            rest = parts[cut:]
            break
    else:
        raise ValueError(f"{what} name {path!r} is not part of an SD-1.x-shaped model with this config")
    if renames is not None and rest:
        for width in (2, 1):
            if ".".join(rest[:width]) in renames:
                rest = renames[".".join(rest[:width])].split(".") + rest[width:]
                break
        else:
            raise ValueError(f"{what} name {path!r}: unknown child {rest[0]!r} of block {head!r}")
    return ".".join([head, *rest])


def unet_path_to_ldm(path: str, unet_config) -> str:
    """diffusers UNet module path or key -> LDM name (relative to ``model.diffusion_model.``)."""
    return _translate(path, _prefix_table(_unet_blocks(unet_config), to_ldm=True), "diffusers UNet")


def ldm_path_to_unet(path: str, unet_config) -> str:
    """LDM UNet name (relative to ``model.diffusion_model.``) -> diffusers UNet module path or key."""
    return _translate(path, _prefix_table(_unet_blocks(unet_config), to_ldm=False), "LDM UNet")


# ----------------------------------------------------------------------------------------------------------
# Writing files


def _check_string_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    metadata = dict(metadata or {})
    bad = [k for k, v in metadata.items() if not (isinstance(k, str) and isinstance(v, str))]
    if bad:
        raise ValueError(f"safetensors metadata must map str to str; offending keys: {bad}")
    return metadata


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> Path:
    """Write a .safetensors file via a temp file in the same directory, so readers never see half a file."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def _require_suffix(path, what: str) -> Path:
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{what} must be a .safetensors file, got {str(path)!r}")
    return path


def _canonical_factors(factors: Mapping[str, LoRAFactors]) -> dict[tuple[str, str], LoRAFactors]:
    if not factors:
        raise ValueError("no LoRA factors to save")
    out = {}
    for key, f in factors.items():
        if not isinstance(f, LoRAFactors):
            raise ValueError(f"factors[{key!r}] is a {type(f).__name__}, expected LoRAFactors")
        canonical = canonical_key(key)
        if canonical in out:
            raise ValueError(f"LoRA key {key!r} names the same module as another key")
        out[canonical] = f
    return out


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
    for (component, path), f in _canonical_factors(factors).items():
        stored = (_CLIP_WRAPPER + path) if component == "text_encoder" else path
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
    header = _check_string_metadata(metadata)
    reserved = {"format", "lora_adapter_metadata"} & header.keys()
    if reserved:
        raise ValueError(f"metadata keys {sorted(reserved)} are written by save_diffusers_lora itself")
    header["format"] = "pt"
    header["lora_adapter_metadata"] = json.dumps(adapter_config, sort_keys=True)
    return _atomic_save(tensors, Path(directory) / DIFFUSERS_LORA_WEIGHT_NAME, header)


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
    path = _require_suffix(path, "kohya LoRA path")
    if base_model_version not in ("sd_v1", "sd_v2"):
        raise ValueError(f"base_model_version must be 'sd_v1' or 'sd_v2', got {base_model_version!r}")
    tensors: dict[str, torch.Tensor] = {}
    for (component, module_path), f in sorted(_canonical_factors(factors).items()):
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
    user = _check_string_metadata(metadata)
    for key, value in user.items():
        if key in generated and value != generated[key]:
            raise ValueError(f"metadata {key}={value!r} contradicts the file, which holds {key}={generated[key]!r}")
    header = {"ss_output_name": path.stem, **user, **generated}
    return _atomic_save(tensors, path, header)


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
    if _config_get(text_encoder.config, "hidden_act") != "quick_gelu":
        raise ValueError(
            "the text encoder is not SD-1.x's CLIP ViT-L (hidden_act 'quick_gelu'); SD-2's OpenCLIP encoder "
            "needs the cond_stage_model.model.* layout, which this writer does not produce"
        )

    sd: dict[str, torch.Tensor] = {}
    unet_table = _prefix_table(_unet_blocks(unet.config), to_ldm=True)
    for key, value in states["unet"].items():
        sd[_LDM_PREFIX["unet"] + _translate(key, unet_table, "diffusers UNet")] = value

    vae_table = _prefix_table(_vae_blocks(vae.config), to_ldm=True)
    for key, value in states["vae"].items():
        ldm_key = _translate(key, vae_table, "diffusers VAE")
        if ".mid.attn_1." in ldm_key and ldm_key.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")):
            value = value.reshape(*value.shape, 1, 1)  # LDM's VAE attention projections are 1x1 convs
        sd[_LDM_PREFIX["vae"] + ldm_key] = value

    for key, value in states["text_encoder"].items():
        sd[_LDM_PREFIX["text_encoder"] + key.removeprefix(_CLIP_WRAPPER)] = value
    # transformers keeps position_ids as a non-persistent buffer; SD-1.x checkpoints store them (int64).
    num_positions = _config_get(text_encoder.config, "max_position_embeddings")
    sd[_LDM_PREFIX["text_encoder"] + "embeddings.position_ids"] = torch.arange(num_positions).unsqueeze(0)

    if half:
        sd = {k: (v.half() if v.is_floating_point() else v) for k, v in sd.items()}
    return sd


def save_single_file_checkpoint(pipe_or_components, path, half: bool = False) -> Path:
    """Write a merged SD-1.x pipeline as one LDM ``.safetensors`` (``from_single_file``, A1111, ComfyUI)."""
    path = _require_suffix(path, "single-file checkpoint path")
    return _atomic_save(single_file_state_dict(pipe_or_components, half=half), path, {"format": "pt"})

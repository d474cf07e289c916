"""diffusers <-> LDM (single-file) names of the UNet and VAE (SD-1.x / 2.x and SDXL), computed from their configs.

The fixed layers (``conv_in``, time / added-condition embeddings, ``conv_out``) come from diffusers' own
table ``single_file_utils.DIFFUSERS_TO_LDM_MAPPING``. The numbered blocks follow the numbering of
``single_file_utils.convert_ldm_unet_checkpoint`` / ``convert_ldm_vae_checkpoint`` and ComfyUI
``comfy.utils.unet_to_diffusers``; diffusers ships only the LDM -> diffusers direction of those, and its
converters find the block structure by reading the LDM keys, so they cannot produce LDM names that do not
exist yet. The tests check every name here against diffusers' converters (``from_single_file``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

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


def config_get(config, name, default=None):
    return config.get(name, default) if isinstance(config, Mapping) else getattr(config, name, default)


def _fixed_blocks(mapping: Mapping[str, str]) -> list[_Block]:
    """Module-level blocks from one of diffusers' key-level tables (``conv_in.weight`` -> ``input_blocks.0.0.weight``)."""
    pairs = {(d.rsplit(".", 1)[0], l.rsplit(".", 1)[0]) for d, l in mapping.items()}
    return [_Block(d, l) for d, l in sorted(pairs)]


def unet_blocks(config) -> list[_Block]:
    """The diffusers <-> LDM block table of an SD-1.x / 2.x / SDXL-shaped UNet, with block counts from its config."""
    down_types = list(config_get(config, "down_block_types"))
    up_types = list(config_get(config, "up_block_types"))
    mid_type = config_get(config, "mid_block_type", "UNetMidBlock2DCrossAttn")
    layers = config_get(config, "layers_per_block")
    layers = [layers] * len(down_types) if isinstance(layers, int) else list(layers)
    if not (set(down_types) <= {"CrossAttnDownBlock2D", "DownBlock2D"}) or not (
        set(up_types) <= {"CrossAttnUpBlock2D", "UpBlock2D"}
    ):
        raise ValueError(f"not an SD-1.x / SDXL-shaped UNet: down blocks {down_types}, up blocks {up_types}")
    if mid_type != "UNetMidBlock2DCrossAttn":
        raise ValueError(f"not an SD-1.x / SDXL-shaped UNet: mid block {mid_type!r}")
    if len(up_types) != len(down_types) or len(layers) != len(down_types):
        raise ValueError(
            f"UNet config has {len(down_types)} down blocks, {len(up_types)} up blocks, layers_per_block {layers}"
        )

    unsupported = {
        name: config_get(config, name)
        for name in ("class_embed_type", "num_class_embeds")
        if config_get(config, name) is not None
    }
    addition = config_get(config, "addition_embed_type")
    if addition not in (None, "text_time"):
        unsupported["addition_embed_type"] = addition
    if unsupported:
        raise ValueError(f"not an SD-1.x / SDXL-shaped UNet: {unsupported}")

    blocks = _fixed_blocks(DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"])
    if addition == "text_time":  # SDXL: the pooled-text / size embedding
        blocks += _fixed_blocks(DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"])
    blocks += [
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


def vae_blocks(config) -> list[_Block]:
    """The diffusers <-> LDM block table of an ``AutoencoderKL``; LDM numbers decoder up blocks in reverse."""
    num_down = len(config_get(config, "down_block_types"))
    num_up = len(config_get(config, "up_block_types"))
    layers = config_get(config, "layers_per_block")
    blocks = _fixed_blocks(DIFFUSERS_TO_LDM_MAPPING["vae"])  # conv_in / conv_out / norm_out, quant convs
    for part in ("encoder", "decoder"):
        blocks += [
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


def prefix_table(blocks: list[_Block], to_ldm: bool) -> dict[str, tuple[str, Mapping[str, str] | None]]:
    """source block prefix -> (target block prefix, renames of its children in that direction)."""
    table = {}
    for blk in blocks:
        if to_ldm:
            table[blk.diffusers] = (blk.ldm, blk.renames)
        else:
            inverse = None if blk.renames is None else {v: k for k, v in blk.renames.items()}
            table[blk.ldm] = (blk.diffusers, inverse)
    return table


def translate(path: str, table: dict[str, tuple[str, Mapping[str, str] | None]], what: str) -> str:
    """Rename ``path`` (a module path or a state-dict key) through its longest block prefix in ``table``."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        if ".".join(parts[:cut]) in table:
            head, renames = table[".".join(parts[:cut])]
            rest = parts[cut:]
            break
    else:
        raise ValueError(f"{what} name {path!r} is not part of an SD-1.x / SDXL-shaped model with this config")
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
    return translate(path, prefix_table(unet_blocks(unet_config), to_ldm=True), "diffusers UNet")


def ldm_path_to_unet(path: str, unet_config) -> str:
    """LDM UNet name (relative to ``model.diffusion_model.``) -> diffusers UNet module path or key."""
    return translate(path, prefix_table(unet_blocks(unet_config), to_ldm=False), "LDM UNet")


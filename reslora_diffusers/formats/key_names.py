"""Names of the layers a LoRA targets (attention / feed-forward Linears, ResNet and sampler Conv2ds): canonical ``"<component>.<path>"`` keys and kohya names.

kohya sd-scripts ``networks/lora.py``: ``lora_name = prefix + "." + module path``, then ``"." -> "_"``. Its
text encoders are transformers-4 CLIP models whose paths start with ``text_model.``. For SD-1.x / 2.x the
UNet paths are diffusers' (``lora_unet_down_blocks_...``) and the text encoder is ``lora_te_``; for SDXL
sd-scripts uses its own LDM-named UNet (``lora_unet_input_blocks_4_1_...``) and ``lora_te1_`` / ``lora_te2_``.
ComfyUI (``comfy/lora.py`` ``model_lora_keys_unet`` / ``model_lora_keys_clip``) reads ``lora_unet_`` + the LDM
key with "." -> "_", and ``lora_te1_text_model_encoder_layers_{i}_...`` / ``lora_te2_...`` for SDXL.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from reslora_diffusers.formats.ldm_names import config_get, ldm_path_to_unet, unet_path_to_ldm
from reslora_diffusers.formats.lora_factors import LoRAFactors

TEXT_COMPONENTS = ("text_encoder", "text_encoder_2")
COMPONENTS = ("unet", *TEXT_COMPONENTS)
KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
SDXL_KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
# transformers >= 5 flattened CLIPTextModel (no `text_model.`); kohya, ComfyUI, A1111 and LDM names keep it.
CLIP_WRAPPER = "text_model."

# Layers a LoRA may target, in the canonical (diffusers / transformers-5) naming: the UNet's attention and
# feed-forward Linears, and (LoCon) its ResNet blocks' and samplers' Conv2ds.
_UNET_LAYER = re.compile(
    r"(?:down_blocks\.\d+|up_blocks\.\d+|mid_block)\.attentions\.\d+\.transformer_blocks\.\d+\."
    r"(?:attn[12]\.(?:to_q|to_k|to_v|to_out\.0)|ff\.net\.0\.proj|ff\.net\.2)"
    r"|(?:down_blocks\.\d+|up_blocks\.\d+|mid_block)\.resnets\.\d+\.(?:conv1|conv2|conv_shortcut)"
    r"|down_blocks\.\d+\.downsamplers\.0\.conv|up_blocks\.\d+\.upsamplers\.0\.conv"
)
_UNET_CONV = re.compile(r".*\.(?:resnets\.\d+\.(?:conv1|conv2|conv_shortcut)|(?:down|up)samplers\.0\.conv)")
_TE_LINEAR = re.compile(r"encoder\.layers\.\d+\.(?:self_attn\.(?:q_proj|k_proj|v_proj|out_proj)|mlp\.fc[12])")
_LAYER_PATTERN = {"unet": _UNET_LAYER, "text_encoder": _TE_LINEAR, "text_encoder_2": _TE_LINEAR}
# Every name segment of those paths (diffusers and LDM UNet names) that itself contains "_", so a kohya
# name can be split back into segments.
_KOHYA_SEGMENTS = sorted(
    {
        "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out",
        "conv_shortcut", "input_blocks", "middle_block", "output_blocks", "in_layers", "out_layers", "skip_connection",
        "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj",
    },
    key=len,
    reverse=True,
)


def is_sdxl_unet(unet_config) -> bool:
    """SDXL's UNet takes pooled text embeddings and size / crop ids as added conditions."""
    return unet_config is not None and config_get(unet_config, "addition_embed_type") == "text_time"


def canonical_key(key: str) -> tuple[str, str]:
    """Split ``"<component>.<module path>"`` into (component, path); text-encoder paths lose ``text_model.``."""
    component, _, path = key.partition(".")
    if component not in COMPONENTS or not path:
        raise ValueError(
            f"LoRA key {key!r} must look like 'unet.<module path>', 'text_encoder.<module path>' "
            "or 'text_encoder_2.<module path>'"
        )
    if component in TEXT_COMPONENTS:
        path = path.removeprefix(CLIP_WRAPPER)
    if not _LAYER_PATTERN[component].fullmatch(path):
        raise ValueError(
            f"LoRA key {key!r}: {path!r} is not a supported layer of the {component} "
            f"(expected a path matching {_LAYER_PATTERN[component].pattern!r})"
        )
    return component, path


def kohya_name(key: str, unet_config=None) -> str:
    """kohya's module name of ``key``; SDXL naming when ``unet_config`` is an SDXL UNet's config.

    SD-1.x / 2.x: ``unet.a.b`` -> ``lora_unet_a_b``; ``text_encoder.a.b`` -> ``lora_te_text_model_a_b``.
    SDXL: the UNet path in LDM naming, ``lora_te1_text_model_...`` and ``lora_te2_text_model_...``.
    """
    component, path = canonical_key(key)
    sdxl = is_sdxl_unet(unet_config)
    if component == "text_encoder_2" and not sdxl:
        raise ValueError(f"LoRA key {key!r}: a second text encoder needs an SDXL UNet config for its kohya name")
    if component in TEXT_COMPONENTS:
        path = CLIP_WRAPPER + path
    elif sdxl:
        path = unet_path_to_ldm(path, unet_config)
    return (SDXL_KOHYA_PREFIX if sdxl else KOHYA_PREFIX)[component] + path.replace(".", "_")


def _split_segments(rest: str) -> str:
    segments = []
    while rest:
        segment = next((s for s in _KOHYA_SEGMENTS if rest == s or rest.startswith(s + "_")), None)
        if segment is None:
            segment = rest.split("_", 1)[0]
        segments.append(segment)
        rest = rest[len(segment) + 1:]
    return ".".join(segments)


def kohya_name_to_key(name: str, unet_config=None) -> str:
    """Inverse of :func:`kohya_name`; returns the canonical ``"<component>.<path>"`` (no ``text_model.``).

    LDM-named UNet modules (SDXL files) need ``unet_config`` to be mapped back to diffusers paths.
    """
    prefixes = [*KOHYA_PREFIX.items(), *SDXL_KOHYA_PREFIX.items()]
    for component, prefix in prefixes:
        if name.startswith(prefix):
            path = _split_segments(name[len(prefix):])
            break
    else:
        raise ValueError(f"kohya LoRA name {name!r} starts with none of 'lora_unet_', 'lora_te_', 'lora_te1_', 'lora_te2_'")
    if component == "unet" and path.split(".", 1)[0] in ("input_blocks", "middle_block", "output_blocks"):
        if unet_config is None:
            raise ValueError(f"kohya LoRA name {name!r} uses LDM UNet names: pass the UNet config to map it")
        try:
            path = ldm_path_to_unet(path, unet_config)
        except ValueError as err:
            raise ValueError(f"kohya LoRA name {name!r} does not name a module of this UNet ({err})") from None
    try:
        component, path = canonical_key(f"{component}.{path}")
    except ValueError as err:
        raise ValueError(f"kohya LoRA name {name!r} does not name a supported layer ({err})") from None
    return f"{component}.{path}"


def canonical_layer_key(key: str, f: LoRAFactors) -> tuple[str, str]:
    """`canonical_key`, and the factors' kind checked against the layer's: a Conv2d's must be LoCon's (4-D), a
    Linear's matrices (loaders would otherwise refuse or misapply them)."""
    component, path = canonical_key(key)
    conv = component == "unet" and bool(_UNET_CONV.fullmatch(path))
    if conv != f.is_conv:
        want = "LoCon factors (down [rank, in, kh, kw], up [out, rank, 1, 1])" if conv else "2-D Linear factors"
        raise ValueError(f"LoRA key {key!r} names a {'Conv2d' if conv else 'Linear'} layer: it needs {want}")
    return component, path


def canonical_factors(factors: Mapping[str, LoRAFactors]) -> dict[tuple[str, str], LoRAFactors]:
    """Check a ``{key: LoRAFactors}`` mapping and key it by (component, canonical path)."""
    if not factors:
        raise ValueError("no LoRA factors to save")
    out = {}
    for key, f in factors.items():
        if not isinstance(f, LoRAFactors):
            raise ValueError(f"factors[{key!r}] is a {type(f).__name__}, expected LoRAFactors")
        canonical = canonical_layer_key(key, f)
        if canonical in out:
            raise ValueError(f"LoRA key {key!r} names the same module as another key")
        out[canonical] = f
    return out

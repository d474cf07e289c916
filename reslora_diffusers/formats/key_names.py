"""Names of the Linear layers a LoRA targets: canonical ``"<component>.<path>"`` keys and kohya names.

kohya sd-scripts ``networks/lora.py``: ``lora_name = "lora_unet" + "." + module path``, then ``"." -> "_"``;
the text encoder is a transformers-4 ``CLIPTextModel`` whose paths start with ``text_model.``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from .lora_factors import LoRAFactors

COMPONENTS = ("unet", "text_encoder")
KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
# transformers >= 5 flattened CLIPTextModel (no `text_model.`); kohya, ComfyUI, A1111 and LDM names keep it.
CLIP_WRAPPER = "text_model."

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


def canonical_key(key: str) -> tuple[str, str]:
    """Split ``"<component>.<module path>"`` into (component, path); text-encoder paths lose ``text_model.``."""
    component, _, path = key.partition(".")
    if component not in COMPONENTS or not path:
        raise ValueError(f"LoRA key {key!r} must look like 'unet.<module path>' or 'text_encoder.<module path>'")
    if component == "text_encoder":
        path = path.removeprefix(CLIP_WRAPPER)
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
        path = CLIP_WRAPPER + path
    return KOHYA_PREFIX[component] + path.replace(".", "_")


def kohya_name_to_key(name: str) -> str:
    """Inverse of :func:`kohya_name`; returns the canonical ``"<component>.<path>"`` (no ``text_model.``)."""
    for component, prefix in KOHYA_PREFIX.items():
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


def canonical_factors(factors: Mapping[str, LoRAFactors]) -> dict[tuple[str, str], LoRAFactors]:
    """Check a ``{key: LoRAFactors}`` mapping and key it by (component, canonical path)."""
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

"""The `reslora_*` metadata every merged export carries (safetensors string metadata), built in one place."""

from __future__ import annotations


def export_metadata(config, merge_method: str, base_model: str | None = None) -> dict[str, str]:
    """What a merged file says about its adapter: res_type, pre_num, how it was merged, the full config, its base."""
    metadata = {
        "reslora_res_type": config.res_type,
        "reslora_pre_num": str(config.pre_num),
        "reslora_merge_method": merge_method,
        "reslora_config": config.to_json(),
    }
    if base_model is not None:
        metadata["reslora_base_model"] = base_model
    return metadata

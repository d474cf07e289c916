"""What keeps a training run's outputs trustworthy: nothing non-finite is written, an output folder holds one run,
and a resume continues the run its checkpoint came from.

Light on purpose (no torch import at module level): the training script runs these checks before its heavy imports.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path

# What a training run writes into its --output_dir; `--overwrite_output_dir` removes exactly these, nothing else.
RUN_OUTPUT_FILES = (
    "reslora_adapter.safetensors",
    "reslora_config.json",
    "pytorch_lora_weights.safetensors",
    "training_summary.json",
    "metrics.jsonl",
    "README.md",
)
RUN_OUTPUT_FOLDERS = ("kohya", "validation", "logs")
CHECKPOINT_GLOB = "checkpoint-*"


class NonFiniteError(ValueError):
    """Tensors about to be written hold NaN or ±inf."""


def non_finite_names(tensors: Mapping[str, object]) -> list[str]:
    """Names of the floating-point tensors that hold a NaN or an infinity."""
    import torch

    return [name for name, t in tensors.items() if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all())]


def require_finite(tensors: Mapping[str, object], what: str) -> None:
    """Raises `NonFiniteError` naming how many of `what`'s tensors are not finite (and the first one)."""
    bad = non_finite_names(tensors)
    if bad:
        raise NonFiniteError(f"{len(bad)} of {len(tensors)} tensors of {what} are not finite (first: {bad[0]})")


def optimizer_tensors(optimizer) -> dict[str, object]:
    """The optimizer's state tensors (Adam moments) by a readable name, for `require_finite`."""
    return {f"optimizer.{i}.{key}": value for i, state in enumerate(optimizer.state.values()) for key, value in state.items()}


def factor_tensors(factors: Mapping[str, object]) -> dict[str, object]:
    """The up / down tensors of merged `LoRAFactors` by name, for `require_finite`."""
    return {f"{name}.{side}": getattr(f, side) for name, f in factors.items() for side in ("down", "up")}


# -- one run per output folder ----------------------------------------------------------------------------------
def previous_run_outputs(output_dir: Path) -> list[str]:
    """Names in `output_dir` that another training run wrote (checkpoints, the adapter, its exports)."""
    if not output_dir.is_dir():
        return []
    found = sorted(p.name for p in output_dir.glob(CHECKPOINT_GLOB))
    found += [name for name in ("reslora_adapter.safetensors", "pytorch_lora_weights.safetensors") if (output_dir / name).exists()]
    return found


def ownership_error(output_dir: Path, resuming: bool, overwrite: bool) -> str | None:
    """Why a new run may not start in `output_dir` (None when it may). A resume continues the folder's own run."""
    if resuming or overwrite:
        return None
    found = previous_run_outputs(output_dir)
    if not found:
        return None
    shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
    return (
        f"{output_dir} holds another training run ({shown}); pass --resume_from_checkpoint latest to continue it, "
        "--overwrite_output_dir to replace it, or another --output_dir"
    )


def clear_run_outputs(output_dir: Path) -> None:
    """Removes a previous run's outputs (`--overwrite_output_dir`); files the script did not write stay."""
    if not output_dir.is_dir():
        return
    for folder in [*output_dir.glob(CHECKPOINT_GLOB), *(output_dir / name for name in RUN_OUTPUT_FOLDERS)]:
        if folder.is_dir():
            shutil.rmtree(folder)
    for name in RUN_OUTPUT_FILES:
        (output_dir / name).unlink(missing_ok=True)


# -- a resume continues the same run ----------------------------------------------------------------------------
def _location(value: str | None) -> str | None:
    """A local path as an absolute path (the same folder named from another working directory is the same), else as given."""
    if value is None:
        return None
    path = Path(value)
    return str(path.resolve()) if path.exists() else value


def run_settings(args) -> dict[str, object]:
    """What defines a run's model and data; a checkpoint records it and a resume must match it."""
    settings = {
        "adapter": args.adapter_config.to_dict(),
        "train_text_encoder": args.train_text_encoder,
        "base_model": _location(args.pretrained_model_name_or_path),
        "base_config": _location(args.base_config),
        "revision": args.revision,
        "variant": args.variant,
        "dataset": _location(args.dataset_name or args.train_data_dir),
        "dataset_config_name": args.dataset_config_name,
        "image_column": args.image_column,
        "caption_column": args.caption_column,
        "max_train_samples": args.max_train_samples,
        "seed": args.seed,
    }
    # What the data flags change in the batches (caches do not: a cached run repeats an uncached one).
    for name in ("caption_source", "missing_caption", "caption_dropout_rate", "shuffle_caption", "keep_tokens",
                 "enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps"):
        if hasattr(args, name):
            settings[name] = getattr(args, name)
    if args.resolution is not None:  # None until the base VAE gives the default
        settings["resolution"] = args.resolution
    return settings


def settings_mismatch(saved: Mapping[str, object], current: Mapping[str, object]) -> list[str]:
    """'name: saved → current' for every setting both record with different values."""
    differences = []
    for key in sorted(set(saved) & set(current)):
        if key == "adapter":
            differences += [
                f"{name}: {saved[key].get(name)!r} → {value!r}"
                for name, value in current[key].items()
                if saved[key].get(name) != value
            ]
        elif saved[key] != current[key]:
            differences.append(f"{key}: {saved[key]!r} → {current[key]!r}")
    return differences


def resume_error(checkpoint: Path, marker_name: str, current: Mapping[str, object]) -> str | None:
    """Why `checkpoint` cannot be resumed with the current settings (None when it can)."""
    try:
        marker = json.loads((checkpoint / marker_name).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        return f"cannot resume from {checkpoint}: {marker_name} is unreadable ({error})"
    saved = marker.get("settings")
    if not isinstance(saved, dict):
        return None  # a checkpoint from before settings were recorded: the adapter config is still checked on load
    differences = settings_mismatch(saved, current)
    if differences:
        return (
            f"cannot resume from {checkpoint}: it belongs to a run with other settings ({'; '.join(differences)}); "
            "pass the same flags, or start a new run with --overwrite_output_dir or another --output_dir"
        )
    return None

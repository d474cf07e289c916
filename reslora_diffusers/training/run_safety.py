"""What keeps a training run's outputs trustworthy: nothing non-finite is written, and a resume continues the run its
checkpoint came from with the settings its state was built with (who owns the output folder: `run_folder.py`).

Light on purpose (no torch import at module level): the training script runs these checks before its heavy imports.
"""

from __future__ import annotations

import errno
import json
from collections.abc import Mapping
from pathlib import Path

from reslora_diffusers.adapters.config import ResLoRAConfig

# OS errors that mean "this cannot be written here" (reported in one line) rather than a bug.
WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR, errno.EFBIG}


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
        "mask_data_dir": _location(getattr(args, "mask_data_dir", None)),
        "reg_data_dir": _location(getattr(args, "reg_data_dir", None)),
        "dataset_config_name": args.dataset_config_name,
        "image_column": args.image_column,
        "caption_column": args.caption_column,
        "max_train_samples": args.max_train_samples,
        "seed": args.seed,
    }
    # What the data flags change in the batches (caches do not: a cached run repeats an uncached one).
    for name in ("caption_source", "missing_caption", "caption_dropout_rate", "shuffle_caption", "keep_tokens",
                 "enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps", "masked_loss", "alpha_mask",
                 "prior_loss_weight"):
        if hasattr(args, name):
            settings[name] = getattr(args, name)
    if args.resolution is not None:  # None until the base VAE gives the default
        settings["resolution"] = args.resolution
    # As parsed: the script later scales the learning rate (--scale_lr) and fills in the step count from epochs.
    settings.update(args.optimizer_settings)
    return settings


# The schedule's length matters only to schedules that depend on it: a constant one may train on for longer.
CONSTANT_SCHEDULES = ("constant", "constant_with_warmup")


def optimizer_settings(args) -> dict[str, object]:
    """What the checkpoint's optimizer and learning-rate scheduler state was built with (call it on the flags as parsed).

    accelerate restores both from the checkpoint (the scheduler's base learning rate included), so a resume with
    another value would keep the old one while the records said the new one: such a resume is refused instead.
    """
    settings = {
        "learning_rate": args.learning_rate,
        "scale_lr": args.scale_lr,
        "lr_scheduler": args.lr_scheduler,
        "lr_warmup_steps": args.lr_warmup_steps,
        "lora_plus_ratio": args.lora_plus_ratio,
        "optimizer": args.optimizer,
        "adam_beta1": args.adam_beta1,
        "adam_beta2": args.adam_beta2,
        "adam_weight_decay": args.adam_weight_decay,
        "adam_epsilon": args.adam_epsilon,
    }
    if args.scale_lr:  # the learning rate then depends on the batch layout
        settings["train_batch_size"] = args.train_batch_size
        settings["gradient_accumulation_steps"] = args.gradient_accumulation_steps
    if args.lr_scheduler not in CONSTANT_SCHEDULES or args.shortcut_anneal_fraction > 0:
        settings["max_train_steps"] = args.max_train_steps
        if args.max_train_steps is None:
            settings["num_train_epochs"] = args.num_train_epochs
    return settings


ADAPTER_DEFAULTS = ResLoRAConfig().to_dict()


def settings_mismatch(saved: Mapping[str, object], current: Mapping[str, object]) -> list[str]:
    """'name: saved → current' for every setting both record with different values."""
    differences = []
    for key in sorted(set(saved) & set(current)):
        if key == "adapter":
            # A field a checkpoint predates (e.g. conv_rank) was at its default then: off, as it is by default now.
            recorded = {**ADAPTER_DEFAULTS, **saved[key]}
            differences += [
                f"{name}: {recorded.get(name)!r} → {value!r}"
                for name, value in current[key].items()
                if recorded.get(name) != value
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


class TrainingStopped(Exception):
    """Training cannot go on (a non-finite loss, data that broke mid-run); the message says why and what is kept."""


def require_finite_state(adapter, optimizer, global_step: int) -> None:
    """Stops the run (TrainingStopped) when the adapter or the optimizer state is not finite: it is never written."""
    try:
        require_finite(adapter.state_dict(), "the adapter")
        require_finite(optimizer_tensors(optimizer), "the optimizer state")
    except NonFiniteError as error:
        raise TrainingStopped(
            f"the weights became non-finite at step {global_step} ({error}); training stopped without saving them "
            "(try a lower --learning_rate, or --mixed_precision bf16 instead of fp16)"
        ) from None

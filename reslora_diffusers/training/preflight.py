"""Every check of a training command line that needs no model: it runs in seconds, before torch, diffusers and
accelerate load (slow on a busy machine), and before anything is written."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from reslora_diffusers.cli import exit_with_error
from reslora_diffusers.pipeline_io import hub_access_error
from reslora_diffusers.training.checkpoints import CHECKPOINT_MARKER, find_resume_checkpoint, incomplete_checkpoint_error
from reslora_diffusers.training.optimizers import OptimizerUnavailable, check_installed
from reslora_diffusers.training.run_folder import nested_output_error, ownership_error
from reslora_diffusers.training.run_safety import resume_error, run_settings

PIPELINE_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def preflight(args) -> None:
    """The base path, the output folder's owner, the resume's settings, optional packages, the network."""
    check_base(args)
    resume_from = find_resume_checkpoint(args) if args.resume_from_checkpoint else None
    for flag, folder in (("--output_dir", args.output_dir), ("--data_cache_dir", args.data_cache_dir)):
        error = writable_folder_error(flag, folder)
        if error:
            exit_with_error(error)
    error = output_error(args, resume_from)
    if error:
        exit_with_error(error)
    if resume_from is not None:
        error = incomplete_checkpoint_error(resume_from) or resume_error(resume_from, CHECKPOINT_MARKER, run_settings(args))
        if error:
            exit_with_error(error)
    try:
        check_installed(args.optimizer)
    except OptimizerUnavailable as error:
        exit_with_error(str(error))
    if args.report_to in ("tensorboard", "all"):
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            exit_with_error("--report_to tensorboard needs the tensorboard package (pip install tensorboard), or pass --report_to none")
    for name in (args.pretrained_model_name_or_path, args.base_config):
        if name is not None and not Path(name).exists() and is_hub_id(name):
            error = hub_access_error(name, revision=args.revision, cache_dir=args.cache_dir)
            if error:
                exit_with_error(error)


def check_base(args) -> None:
    """Fails early on a base model path that cannot work."""
    path = Path(args.pretrained_model_name_or_path)
    if path.is_file():
        if path.suffix != ".safetensors":
            exit_with_error(f"{path}: a single-file base must be a .safetensors checkpoint (pickled .ckpt files are unsafe)")
        if args.base_config is not None and not Path(args.base_config).exists() and not is_hub_id(args.base_config):
            exit_with_error(f"--base_config not found: {args.base_config}")
        return
    if path.is_dir():
        index = path / "model_index.json"
        if not index.is_file():
            exit_with_error(f"{path} is not a Stable Diffusion pipeline folder: it has no model_index.json")
        try:
            components = json.loads(index.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            exit_with_error(f"{index} is not valid JSON: {error}")
        missing = [c for c in PIPELINE_COMPONENTS if not (isinstance(components.get(c), list) and components[c][0])]
        missing += [c for c in PIPELINE_COMPONENTS if c not in missing and not (path / c).is_dir()]
        if missing:
            exit_with_error(f"{path} is not a Stable Diffusion pipeline folder: it lacks {', '.join(missing)}")
        return
    if not is_hub_id(args.pretrained_model_name_or_path):
        exit_with_error(f"base model not found: {path}")


def is_hub_id(name: str) -> bool:
    return re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None and not name.startswith((".", "/"))


def output_error(args, resume_from: Path | None) -> str | None:
    """Why this run may not write into --output_dir (see run_folder.py), or None."""
    output_dir = Path(args.output_dir)
    data = args.dataset_name if args.dataset_name and Path(args.dataset_name).is_dir() else args.train_data_dir
    protected = {"the training data": data, "the base model": args.pretrained_model_name_or_path,
                 "the base config": args.base_config, "the VAE": args.pretrained_vae_model_name_or_path,
                 "the validation data": args.validation_data_dir, "the masks": getattr(args, "mask_data_dir", None),
                 "the regularisation images": getattr(args, "reg_data_dir", None)}
    error = nested_output_error(output_dir, protected, contains=False)
    if error:
        return error.replace(f"{output_dir} ", f"--output_dir {output_dir} ", 1)
    # A resume continues its own folder's run; `latest` without a checkpoint starts a new run.
    resuming = resume_from is not None and resume_from.resolve().parent == output_dir.resolve()
    return ownership_error(output_dir, args.logging_dir, resuming=resuming, overwrite=args.overwrite_output_dir)


def writable_folder_error(flag: str, folder: str | None) -> str | None:
    """Why `folder` (to be created if missing) cannot be written, checked before any work is done."""
    if folder is None:
        return None
    path = Path(folder)
    if path.exists() and not path.is_dir():
        return f"{flag} {folder} is a file, not a folder"
    existing = next((p for p in [path, *path.resolve().parents] if p.exists()), None)
    if existing is not None and not existing.is_dir():
        return f"{flag} {folder} cannot be created: {existing} is a file"
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        return f"{flag} {folder} cannot be written: {existing} is read-only"
    return None

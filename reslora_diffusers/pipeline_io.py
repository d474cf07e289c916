"""Loading a Stable Diffusion base (diffusers folder or single-file `.safetensors`) with clear errors."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .cli import first_line


class UserInputError(ValueError):
    """Bad input from the command line: reported as one line, without a traceback."""


def quiet_libraries() -> None:
    """Command lines print their own progress: silence diffusers' / transformers' loading bars and notices."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def load_pipeline(base: str | os.PathLike, base_config: str | os.PathLike | None = None, torch_dtype=torch.float32):
    """A `StableDiffusionPipeline` from a diffusers folder or a single-file checkpoint, offline.

    A single file needs `base_config`, a diffusers folder (or Hub-style config folder) describing the model,
    unless diffusers recognises it as a standard SD-1.x / 2.x checkpoint. Pickled `.ckpt` files are refused.
    """
    from diffusers import StableDiffusionPipeline

    path = Path(base)
    if not path.exists():
        raise UserInputError(f"base model not found: {path}")
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise UserInputError(f"{path} is not a diffusers Stable Diffusion folder (it has no model_index.json)")
        try:
            return StableDiffusionPipeline.from_pretrained(
                path, dtype=torch_dtype, safety_checker=None, requires_safety_checker=False, local_files_only=True
            )
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise UserInputError(f"could not load the Stable Diffusion pipeline in {path}: {first_line(error)}") from None
    if path.suffix != ".safetensors":
        raise UserInputError(f"{path}: only .safetensors single-file checkpoints are loaded (pickled files are unsafe)")
    if base_config is not None and not Path(base_config).is_dir():
        raise UserInputError(f"base config folder not found: {base_config}")
    try:
        return StableDiffusionPipeline.from_single_file(
            str(path),
            config=str(base_config) if base_config is not None else None,
            dtype=torch_dtype,
            local_files_only=True,
            safety_checker=None,
            requires_safety_checker=False,
        )
    except Exception as error:  # diffusers raises many kinds here; all mean "this file can't be used"
        hint = "" if base_config is not None else " (pass the diffusers folder it was made from as the base config)"
        raise UserInputError(f"could not load the single-file checkpoint {path}: {first_line(error)}{hint}") from None

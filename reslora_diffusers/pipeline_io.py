"""Loading a Stable Diffusion base (diffusers folder or single-file `.safetensors`) with clear errors."""

from __future__ import annotations

import json
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


SDXL_PIPELINE = "StableDiffusionXLPipeline"
_SGM_TEXT_ENCODER_2 = "conditioner.embedders.1.model."  # only SDXL single files hold a second text encoder


def _is_sdxl(folder: Path | None, single_file: Path | None = None) -> bool:
    """SDXL when the folder's model_index.json names the SDXL pipeline, or the single file holds SDXL's encoders."""
    if folder is not None and (folder / "model_index.json").is_file():
        try:
            return json.loads((folder / "model_index.json").read_text()).get("_class_name") == SDXL_PIPELINE
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
            raise UserInputError(f"{folder / 'model_index.json'} is not valid JSON: {error}") from None
    if single_file is not None:
        from safetensors import safe_open

        try:
            with safe_open(str(single_file), "pt") as f:
                return any(key.startswith(_SGM_TEXT_ENCODER_2) for key in f.keys())
        except Exception as error:  # safetensors raises several kinds for a file it cannot read
            raise UserInputError(f"{single_file} is not a readable safetensors file: {first_line(error)}") from None
    return False


def pipeline_class(sdxl: bool):
    """`StableDiffusionXLPipeline` for SDXL bases, `StableDiffusionPipeline` for SD-1.x / 2.x."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline


def load_pipeline(base: str | os.PathLike, base_config: str | os.PathLike | None = None, torch_dtype=torch.float32):
    """A `StableDiffusionPipeline` or, for an SDXL base, a `StableDiffusionXLPipeline`, offline.

    The base is a diffusers folder or a single-file checkpoint. A single file needs `base_config`, a diffusers
    folder (or Hub-style config folder) describing the model, unless diffusers recognises it as a standard
    SD-1.x / 2.x / SDXL checkpoint. Pickled `.ckpt` files are refused.
    """
    path = Path(base)
    if not path.exists():
        raise UserInputError(f"base model not found: {path}")
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise UserInputError(f"{path} is not a diffusers Stable Diffusion folder (it has no model_index.json)")
        sdxl = _is_sdxl(path)
        no_safety_checker = {} if sdxl else {"safety_checker": None, "requires_safety_checker": False}
        try:
            return pipeline_class(sdxl).from_pretrained(path, dtype=torch_dtype, local_files_only=True, **no_safety_checker)
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise UserInputError(f"could not load the Stable Diffusion pipeline in {path}: {first_line(error)}") from None
    if path.suffix != ".safetensors":
        raise UserInputError(f"{path}: only .safetensors single-file checkpoints are loaded (pickled files are unsafe)")
    if base_config is not None and not Path(base_config).is_dir():
        raise UserInputError(f"base config folder not found: {base_config}")
    sdxl = _is_sdxl(Path(base_config) if base_config is not None else None, single_file=path)
    no_safety_checker = {} if sdxl else {"safety_checker": None, "requires_safety_checker": False}
    try:
        return pipeline_class(sdxl).from_single_file(
            str(path),
            config=str(base_config) if base_config is not None else None,
            dtype=torch_dtype,
            local_files_only=True,
            **no_safety_checker,
        )
    except Exception as error:  # diffusers raises many kinds here; all mean "this file can't be used"
        hint = "" if base_config is not None else " (pass the diffusers folder it was made from as the base config)"
        raise UserInputError(f"could not load the single-file checkpoint {path}: {first_line(error)}{hint}") from None

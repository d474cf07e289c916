"""Base models under the models roots: diffusers folders (`model_index.json`) and single-file checkpoints.

A single-file checkpoint (LDM keys, `model.diffusion_model.…`) is loaded with `from_single_file`; its configs
come from `--base_config`, or else the diffusers folder the app started with (the usual case: a merged export of
the model the adapters were trained on).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import runs as run_folders
from paths import resolve_inside, walk_inside
from safetensors import SafetensorError, safe_open

from reslora_diffusers.pipeline_io import UserInputError

MODEL_INDEX = "model_index.json"
DIFFUSERS_FOLDER, SINGLE_FILE = "diffusers folder", "single file"


@dataclass(frozen=True)
class ModelSource:
    path: Path
    label: str
    kind: str  # DIFFUSERS_FOLDER or SINGLE_FILE

    @property
    def choice_label(self) -> str:
        return f"{self.label} ({self.kind})"


def is_checkpoint_file(path: Path) -> bool:
    """A `.safetensors` holding a whole Stable Diffusion UNet in LDM layout (header read only)."""
    try:
        with safe_open(str(path), framework="pt") as opened:
            return any(key.startswith("model.diffusion_model.") for key in opened.keys())
    except (SafetensorError, OSError, ValueError):
        return False


def discover_models(roots: list[Path]) -> list[ModelSource]:
    found: dict[Path, ModelSource] = {}
    for root in roots:
        for folder, subdirs, files in walk_inside(root):
            label = run_folders.label_of(folder, [Path(root).resolve()])
            if MODEL_INDEX in files:
                found[folder] = ModelSource(folder, label, DIFFUSERS_FOLDER)
                subdirs.clear()  # its unet/, vae/… are parts, not models
                continue
            for name in files:
                path = folder / name
                if name.endswith(".safetensors") and not name.startswith(".") and is_checkpoint_file(path):
                    found[path] = ModelSource(path, run_folders.label_of(path, [Path(root).resolve()]), SINGLE_FILE)
    return sorted(found.values(), key=lambda model: model.label)


def model_at(path: str, roots: list[Path]) -> Path:
    """A base model inside the models roots: a diffusers folder or a single-file checkpoint, else `UserInputError`."""
    resolved = resolve_inside(path, roots, "model")
    if resolved.is_dir():
        if not (resolved / MODEL_INDEX).is_file():
            raise UserInputError(f"{path} is not a diffusers Stable Diffusion folder (it has no {MODEL_INDEX})")
        return resolved
    if resolved.suffix != ".safetensors" or not is_checkpoint_file(resolved):
        raise UserInputError(f"{path} is not a single-file Stable Diffusion checkpoint (.safetensors with LDM UNet keys)")
    return resolved

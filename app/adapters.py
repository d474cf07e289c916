"""The adapters the app can draw with, of three kinds, and how each is put on the pipeline at a strength.

- native: a run folder of this project (`reslora_config.json` + `reslora_adapter.safetensors`): LoRA, ResLoRA
  (`is` / `bs` / `ms`) or Delta-LoRA, unmerged or merged (α estimated as chosen).
- kohya: a `.safetensors` LoRA with `lora_unet_…` / `lora_te_…` modules (kohya sd-scripts, A1111, ComfyUI, and
  this project's `--format kohya` export);
- diffusers: a `pytorch_lora_weights.safetensors` (PEFT keys), or the folder holding one.

Users' files are loaded by diffusers itself (`pipe.load_lora_weights`, PEFT layers, strength through
`set_adapters`), exactly as a user's own script would; only native adapters go through this project's code.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import runs as run_folders
from paths import resolve_inside, walk_inside
from safetensors import SafetensorError, safe_open

from reslora_diffusers.adapters.io import CONFIG_NAME, WEIGHTS_NAME
from reslora_diffusers.cli import first_line
from reslora_diffusers.pipeline_io import UserInputError

DIFFUSERS_LORA_NAME = "pytorch_lora_weights.safetensors"
NATIVE, KOHYA, DIFFUSERS = "native", "kohya", "diffusers"
PEFT_ADAPTER_NAME = "app_lora"  # the name the app's one loaded users' file has in diffusers / PEFT


@dataclass(frozen=True)
class AdapterSource:
    """One adapter found under the adapter roots: `path` is a run folder (native) or a `.safetensors` file."""

    path: Path
    label: str  # `<root name>/<path inside the root>`
    kind: str  # NATIVE, KOHYA or DIFFUSERS
    method: str  # what it is: "LoRA", "ResLoRA is", "Delta-LoRA", "kohya LoRA", "diffusers LoRA"
    config: dict | None = None  # the native adapter's config

    @property
    def is_native(self) -> bool:
        return self.kind == NATIVE

    @property
    def choice_label(self) -> str:
        rank = f", rank {self.config.get('rank')}" if self.config else ""
        return f"{self.label} ({self.method}{rank})"


def lora_file_kind(path: Path) -> str | None:
    """KOHYA or DIFFUSERS for a LoRA `.safetensors` file, None for anything else (a checkpoint, a native adapter).

    Only the header is read; a file safetensors cannot open is not a LoRA file either.
    """
    try:
        with safe_open(str(path), framework="pt") as opened:
            keys = list(opened.keys())
    except (SafetensorError, OSError, ValueError):
        return None
    if any(key.startswith(("lora_unet_", "lora_te_", "lora_te1_")) for key in keys):
        return KOHYA
    if any(key.startswith(("unet.", "text_encoder.")) and ".lora" in key for key in keys):
        return DIFFUSERS
    return None


def _file_source(path: Path, roots: list[Path]) -> AdapterSource | None:
    kind = lora_file_kind(path)
    if kind is None:
        return None
    return AdapterSource(path, run_folders.label_of(path, roots), kind, f"{kind} LoRA")


def _native_source(run: run_folders.Run) -> AdapterSource:
    return AdapterSource(run.path, run.label, NATIVE, run.method, run.config)


def discover_adapters(roots: list[Path]) -> list[AdapterSource]:
    """Native run folders and LoRA files under `roots` (hidden and `checkpoint-*` folders skipped), by label."""
    found = [_native_source(run) for run in run_folders.discover_runs(roots, adapters_only=True)]
    for root in roots:
        for folder, _subdirs, files in walk_inside(root):
            for name in files:
                if name.endswith(".safetensors") and name != WEIGHTS_NAME and not name.startswith("."):
                    source = _file_source(folder / name, [Path(root).resolve()])
                    if source is not None:
                        found.append(source)
    unique = {source.path: source for source in found}
    return sorted(unique.values(), key=lambda source: source.label)


def adapter_at(path: str, roots: list[Path]) -> AdapterSource:
    """The adapter at `path` (inside the roots): a native run folder, a LoRA file, or a folder holding a diffusers LoRA."""
    resolved = resolve_inside(path, roots, "adapter")
    if resolved.is_dir():
        if (resolved / CONFIG_NAME).is_file():
            return _native_source(run_folders.run_at(resolved, roots))
        if (resolved / DIFFUSERS_LORA_NAME).is_file():
            resolved = resolved / DIFFUSERS_LORA_NAME
        else:
            raise UserInputError(f"{path} is not an adapter folder (it has no {CONFIG_NAME} and no {DIFFUSERS_LORA_NAME})")
    if resolved.suffix != ".safetensors":
        raise UserInputError(f"{path}: only .safetensors LoRA files are read (pickled files are unsafe)")
    source = _file_source(resolved, roots)
    if source is None:
        raise UserInputError(f"{path} is not a LoRA file (no kohya lora_unet_/lora_te_ nor diffusers unet./text_encoder. LoRA keys)")
    return source


@contextlib.contextmanager
def users_lora(pipe, source: AdapterSource, strength: float) -> Iterator[None]:
    """A kohya / diffusers LoRA file on `pipe` through diffusers' own loader, at `strength`; taken off afterwards."""
    try:
        pipe.load_lora_weights(str(source.path), adapter_name=PEFT_ADAPTER_NAME)
    except (ValueError, KeyError, OSError, RuntimeError) as error:
        with contextlib.suppress(Exception):
            pipe.unload_lora_weights()
        raise UserInputError(f"diffusers could not load {source.label} on this base model: {first_line(error)}") from None
    try:
        pipe.set_adapters([PEFT_ADAPTER_NAME], adapter_weights=[strength])
        yield
    finally:
        pipe.unload_lora_weights()

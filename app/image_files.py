"""Images the app hands out: named after what they show and carrying their settings.

The settings go into the PNG text chunk `parameters`, in the layout AUTOMATIC1111 writes (prompt, a
`Negative prompt:` line, then `Key: value, ...`), so the usual tools (A1111's PNG Info, ComfyUI, exiftool)
show how an image was made. The file name holds the prompt, seed and adapter.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from PIL import Image, PngImagePlugin

from reslora_diffusers.atomic import atomic_write

PARAMETERS_KEY = "parameters"
KEEP_FILES = 500  # the images folder keeps this many of the newest files


def parameters_text(prompt: str, negative_prompt: str, settings: Mapping[str, object]) -> str:
    """A1111's `parameters` text: prompt, negative prompt, then `Key: value` pairs on one line."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{key}: {_value(value)}" for key, value in settings.items()))
    return "\n".join(lines)


def _value(value: object) -> str:
    text = f"{value:g}" if isinstance(value, float) else str(value)
    # A1111 quotes values holding its separators so that the line can be parsed back.
    return f'"{text}"' if any(c in text for c in ',:\n"') else text


def slug(text: str, limit: int = 40) -> str:
    """Lower-case letters, digits and dashes only: safe in a file name on every system."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].strip("-") or "image"


def image_name(prompt: str, seed: int, adapter: str, strength: float | None = None) -> str:
    name = f"{slug(prompt)}-seed{seed}-{slug(adapter, 60)}"
    if strength is not None:
        name += f"-x{strength:g}"
    return name + ".png"


def save_png(image: Image.Image, folder: Path, name: str, parameters: str) -> Path:
    """Writes `image` atomically as `folder/name` (a number added when taken) with its `parameters` chunk."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    stem, count = path.stem, 1
    while path.exists():
        count += 1
        path = folder / f"{stem}-{count}.png"
    info = PngImagePlugin.PngInfo()
    info.add_text(PARAMETERS_KEY, parameters)
    atomic_write(path, lambda temporary: image.save(temporary, format="PNG", pnginfo=info))
    _prune(folder)
    return path


def _prune(folder: Path) -> None:
    files = sorted(folder.glob("*.png"), key=lambda p: p.stat().st_mtime)
    for old in files[:-KEEP_FILES]:
        old.unlink(missing_ok=True)


def read_parameters(path: str | Path) -> str | None:
    with Image.open(path) as image:
        return image.info.get(PARAMETERS_KEY)

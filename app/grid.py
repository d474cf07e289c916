"""Grids: prompts × seeds down, adapter settings across, as one labelled image (`reslora_diffusers.image_grid`);
and the difference view."""

from __future__ import annotations

import itertools

import numpy as np
from PIL import Image


def parse_list(text: str, cast, name: str) -> list:
    """Comma- or newline-separated values (`"0, 1"`) as a list; `ValueError` naming the field for a bad one."""
    items = [item.strip() for item in str(text or "").replace("\n", ",").split(",") if item.strip()]
    try:
        return [cast(item) for item in items]
    except ValueError:
        raise ValueError(f"{name}: cannot read {text!r} as a comma-separated list of numbers") from None


def settings_product(adapters: list[str], strengths: list[float], weights: list[str], methods: list[str]) -> list[tuple]:
    """(adapter, strength, merged, method) for every combination that draws something different.

    The base model ("") has no strength nor weights; the α estimator matters only for merged weights.
    """
    out: list[tuple] = []
    for adapter, strength, weight in itertools.product(adapters, strengths or [1.0], weights or ["unmerged"]):
        merged = weight == "merged"
        if not adapter:
            candidates = [("", 1.0, False, "input")]
        elif merged:
            candidates = [(adapter, strength, True, method) for method in methods or ["input"]]
        else:
            candidates = [(adapter, strength, False, "input")]
        out.extend(c for c in candidates if c not in out)
    return out


def difference_image(a: Image.Image, b: Image.Image, gain: float) -> tuple[Image.Image, float]:
    """(|a − b| × gain as an image, the mean |a − b| in 0..255): where two settings draw differently."""
    x = np.asarray(a.convert("RGB"), dtype=np.float64)
    y = np.asarray(b.convert("RGB"), dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"the two images differ in size: {x.shape[:2]} and {y.shape[:2]}")
    difference = np.abs(x - y)
    return Image.fromarray(np.clip(difference * gain, 0, 255).astype(np.uint8)), float(difference.mean())

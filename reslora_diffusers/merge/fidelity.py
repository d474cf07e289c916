"""How close a merged model is to the unmerged one: relative error of outputs, PSNR of images."""

from __future__ import annotations

import math

import torch


def relative_error(merged: torch.Tensor, unmerged: torch.Tensor) -> float:
    return float((merged.float() - unmerged.float()).norm() / unmerged.float().norm().clamp_min(1e-12))


def image_psnr(a, b) -> float:
    """PSNR in dB between two images (PIL or arrays in [0, 255]); inf when identical."""
    import numpy as np

    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mse = float(np.mean((x - y) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)

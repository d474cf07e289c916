"""How well the embedded emoji base draws what it is asked for: the nearest-Noto-image retrieval measure.

Each generated image is resized to 32 px and compared (pixel L2) with all 1,911 Noto images of
``assets/tiny-emoji-sd-eval/noto_reference.npz``; its rank is the number of Noto images nearer to it than
the prompted one (0 = the prompted emoji is the nearest). Chance: top-1 1/1911, median rank ~955.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from reslora_diffusers.examples.emoji_data import sample_order_key

REFERENCE = Path(__file__).resolve().parents[2] / "assets" / "tiny-emoji-sd-eval" / "noto_reference.npz"


@dataclass(frozen=True)
class NotoReference:
    images: np.ndarray  # N×32×32×3 float32
    texts: list[str]
    splits: list[str]

    def prompts(self, split: str, count: int) -> list[str]:
        """The first `count` captions of a split in the fixed sample order (the same for every run)."""
        return sorted((t for t, s in zip(self.texts, self.splits) if s == split), key=sample_order_key)[:count]


def load_reference(path: str | os.PathLike = REFERENCE) -> NotoReference:
    ref = np.load(path)
    return NotoReference(ref["images"].astype(np.float32), list(ref["texts"]), list(ref["splits"]))


def retrieval_ranks(images: list[Image.Image], prompts: list[str], reference: NotoReference) -> np.ndarray:
    """Rank of each prompt's own Noto image among all reference images, by pixel distance to the generated one."""
    size = reference.images.shape[1]
    gen = np.stack([np.asarray(im.convert("RGB").resize((size, size), Image.BOX), dtype=np.float32) for im in images])
    flat_ref = reference.images.reshape(len(reference.images), -1)
    dist = ((gen.reshape(len(gen), 1, -1) - flat_ref[None]) ** 2).sum(-1)
    return np.array([(dist[i] < dist[i, reference.texts.index(p)]).sum() for i, p in enumerate(prompts)])


def summarize_ranks(ranks: np.ndarray) -> dict:
    return {"prompts": int(len(ranks)), "top1": int((ranks == 0).sum()), "top5": int((ranks < 5).sum()),
            "median_rank": float(np.median(ranks))}


def reconstruction_psnr(vae, images_u8, device="cpu", batch: int = 64) -> float:
    """Mean PSNR (dB, 0-255 range) of decode(encoder mean) over uint8 images N×3×H×W (a torch tensor)."""
    import torch

    psnrs = []
    with torch.no_grad():
        for i in range(0, len(images_u8), batch):
            x = (images_u8[i:i + batch].float() / 127.5 - 1.0).to(device)
            recon = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
            mse = ((recon - x) * 127.5).pow(2).mean(dim=(1, 2, 3))
            psnrs.append(10 * torch.log10(255.0 ** 2 / mse.clamp_min(1e-8)))
    return float(torch.cat(psnrs).mean())

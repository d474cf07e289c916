"""Cached VAE latents and text embeddings for `train_text_to_image.py` (`--cache_latents`, `--cache_text_embeddings`).

Latents: the cache keeps the VAE posterior of every image — its mean and log-variance, the `parameters` of
diffusers' `DiagonalGaussianDistribution` — not one sample of it, and each step draws a fresh sample exactly
as the uncached path does (`vae.encode(x).latent_dist.sample()`). So caching changes the cost, not the
training: a cached and an uncached run with the same seed give the same losses. A random flip is cached both
ways; a random crop cannot be cached (the caller refuses it where an image has pixels to spare). Loss masks
(`--masked_loss`) are kept beside the latents, with the same crop and flip.

Text embeddings: one per distinct caption (with caption dropout, also the empty caption), from the frozen text
encoder. A shuffled caption has too many forms to cache.

On disk (`cache_dir`), every entry is one safetensors file named by a hash of everything it depends on (the
VAE's or text encoder's config and weights, the image's bytes, its bucket size, crop, flip, resize filter and
dtype; the caption's token ids): a changed model, image, resolution, bucket or caption gets a new name and is
encoded again, never read stale. Entries nothing refers to any more stay until the folder is deleted.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from reslora_diffusers.atomic import atomic_write
from reslora_diffusers.data.dataset import DECODE_VERSION, Augmentation, DatasetError, Example, ImageTransform, Size

logger = logging.getLogger(__name__)


def module_fingerprint(module: torch.nn.Module) -> str:
    """A hash of a model's config and weights: any change to either gives another fingerprint."""
    digest = hashlib.blake2b(digest_size=16)
    config = getattr(module, "config", None)
    if config is not None:
        config = dict(config) if not hasattr(config, "to_dict") else config.to_dict()
        config = {k: v for k, v in config.items() if k not in ("_name_or_path", "_commit_hash")}  # where, not what
        digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def image_fingerprint(example: Example) -> str:
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"decode-{DECODE_VERSION}:".encode())
    if isinstance(example.image, Path):
        digest.update(example.image.read_bytes())
    else:
        digest.update(f"{example.image.mode}:{example.image.size}".encode())
        digest.update(example.image.tobytes())
    return digest.hexdigest()


def _key(*parts) -> str:
    return hashlib.blake2b(json.dumps(parts, default=str).encode(), digest_size=20).hexdigest()


class _EntryStore:
    """Entries in memory, and in `<cache_dir>/<kind>/<key>.safetensors` when a cache folder is given."""

    def __init__(self, cache_dir: str | Path | None, kind: str) -> None:
        self.folder = Path(cache_dir) / kind if cache_dir is not None else None
        self.read = 0

    def load(self, key: str) -> torch.Tensor | None:
        if self.folder is None or not (self.folder / f"{key}.safetensors").is_file():
            return None
        try:
            tensor = load_file(self.folder / f"{key}.safetensors")["value"]
        except (OSError, SafetensorError, KeyError) as error:
            logger.warning("re-encoding an unreadable cache entry %s (%s)", key, error)
            return None
        self.read += 1
        return tensor

    def save(self, key: str, tensor: torch.Tensor) -> None:
        if self.folder is not None:
            atomic_write(self.folder / f"{key}.safetensors", lambda tmp: save_file({"value": tensor.contiguous()}, tmp))


def _encode_missing(
    keys: Sequence[str], store: _EntryStore, encode: Callable[[list[int]], torch.Tensor], group_of, batch_size: int,
    label: str, show_progress: bool,
) -> list[torch.Tensor]:
    """Each key's entry: read from the store, or encoded (`encode(positions)`, in batches of one group) and stored."""
    entries: list[torch.Tensor | None] = [store.load(key) for key in keys]
    # An entry read back must have the shape and dtype a fresh encoding has (one fresh entry per group says
    # which); one that does not (a file written by other code, or edited) is re-encoded, never trained on.
    reference: dict[object, torch.Tensor] = {}
    for position, entry in enumerate(entries):
        group = group_of(position)
        if entry is not None and group not in reference:
            reference[group] = encode([position])[0].cpu()
        if entry is not None and (entry.shape != reference[group].shape or entry.dtype != reference[group].dtype):
            logger.warning("re-encoding cache entry %s: it holds %s %s, not %s %s", keys[position], entry.dtype,
                           tuple(entry.shape), reference[group].dtype, tuple(reference[group].shape))
            entries[position] = None
            store.read -= 1
    missing: dict[object, list[int]] = {}
    for position, entry in enumerate(entries):
        if entry is None:
            missing.setdefault(group_of(position), []).append(position)
    batches = [ps[i : i + batch_size] for ps in missing.values() for i in range(0, len(ps), batch_size)]
    for batch in tqdm(batches, desc=f"caching {label}", disable=not show_progress or not batches):
        for position, tensor in zip(batch, encode(batch)):
            entries[position] = tensor.cpu().clone()
            store.save(keys[position], entries[position])
    encoded = sum(len(batch) for batch in batches)
    where = f" ({store.read} read from {store.folder})" if store.folder is not None else " (in memory)"
    logger.info("%s cache: %d entries, %d encoded%s", label, len(keys), encoded, where)
    return entries


def _centre(transform: ImageTransform, size: Size, target: Size, flip: bool) -> Augmentation:
    """The one crop a cache keeps: the centre."""
    width, height = transform.resized_size(size, target)
    return Augmentation((width - target[0]) // 2, (height - target[1]) // 2, flip)


class LatentCache:
    """The VAE posterior parameters of each example (and of its mirror image when flips are on)."""

    def __init__(self, entries: dict[tuple[Example, bool], torch.Tensor], sizes: dict[Example, Size],
                 masks: dict[tuple[Example, bool], torch.Tensor] | None = None) -> None:
        self.entries, self.sizes, self.masks = entries, sizes, masks or {}
        self.encoded = 0

    def mask(self, example: Example, flip: bool) -> torch.Tensor:
        """The example's loss mask with the crop and flip of its cached latent (1×H×W in [0, 1])."""
        return self.masks[(example, flip)].float() / 255.0

    def image_size(self, example: Example) -> Size:
        return self.sizes[example]

    def get(self, example: Example, flip: bool) -> torch.Tensor:
        return self.entries[(example, flip)]

    @classmethod
    def build(
        cls,
        examples: Sequence[Example],
        targets: Sequence[Size],
        transform: ImageTransform,
        encode: Callable[[torch.Tensor], torch.Tensor],
        fingerprint: str,
        dtype: torch.dtype,
        batch_size: int,
        cache_dir: str | Path | None = None,
        show_progress: bool = True,
    ) -> LatentCache:
        """`encode(pixels)` returns the posterior parameters of a batch (e.g. `vae.encode(x).latent_dist.parameters`);
        `fingerprint` identifies the VAE (`module_fingerprint`)."""
        sizes = {example: example.size for example in examples}
        if not transform.center_crop:
            for example, target in zip(examples, targets):
                if transform.resized_size(sizes[example], target) != tuple(target):
                    raise DatasetError(
                        f"--cache_latents keeps one crop per image, but {example.name} would be cropped at random "
                        "(its aspect ratio differs from its target's): pass --center_crop, or leave out --cache_latents"
                    )
        flips = (False, True) if transform.random_flip else (False,)
        jobs = [(example, target, flip) for example, target in zip(examples, targets) for flip in flips]
        image_keys = {example: image_fingerprint(example) for example in examples} if cache_dir is not None else {}
        keys = [
            _key("latent", fingerprint, image_keys.get(example, id(example)), target, transform.center_crop,
                 transform.interpolation, flip, str(dtype))
            for example, target, flip in jobs
        ]

        def encode_jobs(positions: list[int]) -> torch.Tensor:
            pixels = []
            for position in positions:
                example, target, flip = jobs[position]
                pixels.append(transform.apply(example.open(), target, _centre(transform, sizes[example], target, flip)))
            return encode(torch.stack(pixels))

        store = _EntryStore(cache_dir, "latents")
        entries = _encode_missing(keys, store, encode_jobs, lambda p: tuple(jobs[p][1]), batch_size, "latent", show_progress)
        # Loss masks need no model: they are made again from their files (in memory, as 8-bit) rather than stored.
        masks = {}
        for example, target in zip(examples, targets):
            if example.mask is not None:
                opened = example.open_mask()  # once for both flips
                for flip in flips:
                    mask = transform.apply_mask(opened, target, _centre(transform, sizes[example], target, flip))
                    masks[(example, flip)] = (mask * 255).round().to(torch.uint8)
        cache = cls({(example, flip): entry for (example, _, flip), entry in zip(jobs, entries)}, sizes, masks)
        cache.encoded = len(keys) - store.read
        return cache


class TextEmbeddingCache:
    """The frozen text encoder's output for each distinct caption."""

    def __init__(self, entries: dict[str, torch.Tensor]) -> None:
        self.entries = entries
        self.encoded = 0

    def stack(self, captions: Sequence[str]) -> torch.Tensor:
        return torch.stack([self.entries[caption] for caption in captions])

    @classmethod
    def build(
        cls,
        captions: Sequence[str],
        tokenize: Callable[[list[str]], torch.Tensor],
        encode: Callable[[torch.Tensor], torch.Tensor],
        fingerprint: str,
        batch_size: int,
        cache_dir: str | Path | None = None,
        show_progress: bool = True,
    ) -> TextEmbeddingCache:
        """`tokenize(captions)` gives token ids, `encode(ids)` the embeddings; `fingerprint` identifies the encoder."""
        captions = sorted(set(captions))
        ids = tokenize(captions)
        keys = [_key("text", fingerprint, row.tolist()) for row in ids]
        store = _EntryStore(cache_dir, "text")
        entries = _encode_missing(keys, store, lambda positions: encode(ids[positions]), lambda p: 0, batch_size, "text embedding", show_progress)
        cache = cls(dict(zip(captions, entries)))
        cache.encoded = len(keys) - store.read
        return cache

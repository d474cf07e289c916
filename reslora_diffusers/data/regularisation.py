"""Regularisation images (`--reg_data_dir`, `--prior_loss_weight`): kohya's reg images, diffusers' prior preservation.

Every training batch is joined by as many regularisation images, at the batch's size (its bucket), and the loss
is `instance loss + prior_loss_weight × prior loss` (diffusers' DreamBooth scripts; kohya weighs reg images the
same way). The regularisation images are dealt out in their own random order, one pass after another, and every
random draw of theirs (crop, flip, caption, VAE sample, noise, timestep) comes from their own generators, seeded
by (seed, batch number, process): the training images meet exactly the noise they meet without regularisation,
so `--prior_loss_weight 0` trains as a run without it, and a resumed run joins the same images to each batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from reslora_diffusers.data.dataset import (
    CaptionOptions,
    DatasetError,
    EpochShuffleSampler,
    Example,
    ImageCaptionDataset,
    ImageTransform,
)

_SEED_OFFSET = 7_919  # their order and draws never repeat the training images' (same seed, other stream)


class RegularisationImages:
    def __init__(self, examples: Sequence[Example], transform: ImageTransform, caption_options: CaptionOptions, seed: int,
                 collate: Callable[[list[dict]], dict], process_index: int = 0, num_processes: int = 1) -> None:
        if not examples:
            raise DatasetError("--reg_data_dir holds no regularisation images")
        self.dataset = ImageCaptionDataset(examples, transform, seed=seed + _SEED_OFFSET, caption_options=caption_options)
        self.seed, self.collate = seed + _SEED_OFFSET, collate
        self.process_index, self.num_processes = process_index, num_processes
        self.sampler = EpochShuffleSampler(len(self.dataset), self.seed)
        self._order: tuple[int, list[int]] | None = None

    def _pass_order(self, number: int) -> list[int]:
        """Pass `number`'s order: an epoch order of the training images' kind, from this stream's seed."""
        if self._order is None or self._order[0] != number:
            self.sampler.set_epoch(number)
            self._order = (number, list(self.sampler))
        return self._order[1]

    def for_batch(self, batch_number: int, batch: dict, device) -> tuple[dict, torch.Generator]:
        """The regularisation batch joined to training batch `batch_number` (counted from the run's start, the same
        on every process): as many images, at its size, and the generator of their VAE samples, noise and
        timesteps."""
        count = len(batch["input_ids"])
        start = (batch_number * self.num_processes + self.process_index) * count
        items = []
        for position in range(start, start + count):
            number, offset = divmod(position, len(self.dataset))
            self.dataset.set_epoch(number)
            items.append(self.dataset.item(self._pass_order(number)[offset], batch["image_size"]))
        seed = int(np.random.SeedSequence([self.seed, batch_number, self.process_index]).generate_state(1)[0])
        return self.collate(items), torch.Generator(device=device).manual_seed(seed)

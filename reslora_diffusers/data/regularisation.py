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

from reslora_diffusers.data.dataset import CaptionOptions, DatasetError, Example, ImageCaptionDataset, ImageTransform, Size

_SEED_OFFSET = 7_919  # their order and draws never repeat the training images' (same seed, other stream)


class RegularisationImages:
    def __init__(self, examples: Sequence[Example], transform: ImageTransform, caption_options: CaptionOptions, seed: int,
                 collate: Callable[[list[dict]], dict], process_index: int = 0, num_processes: int = 1) -> None:
        if not examples:
            raise DatasetError("--reg_data_dir holds no regularisation images")
        self.dataset = ImageCaptionDataset(examples, transform, seed=seed + _SEED_OFFSET, caption_options=caption_options)
        self.seed, self.collate = seed + _SEED_OFFSET, collate
        self.process_index, self.num_processes = process_index, num_processes
        self._order: tuple[int, list[int]] | None = None

    def __len__(self) -> int:
        return len(self.dataset)  # repeats counted

    def _pass_order(self, number: int) -> list[int]:
        if self._order is None or self._order[0] != number:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + number)
            self._order = (number, torch.randperm(len(self.dataset), generator=generator).tolist())
        return self._order[1]

    def batch(self, batch_number: int, count: int, size: Size) -> dict:
        """The `count` regularisation images joined to training batch `batch_number` (counted from the run's start,
        the same on every process), at `size` (width, height)."""
        start = (batch_number * self.num_processes + self.process_index) * count
        items = []
        for position in range(start, start + count):
            number, offset = divmod(position, len(self.dataset))
            self.dataset.set_epoch(number)
            items.append(self.dataset.item(self._pass_order(number)[offset], size))
        return self.collate(items)

    def generator(self, batch_number: int, device) -> torch.Generator:
        """The generator of batch `batch_number`'s VAE samples, noise and timesteps."""
        seed = int(np.random.SeedSequence([self.seed, batch_number, self.process_index]).generate_state(1)[0])
        return torch.Generator(device=device).manual_seed(seed)

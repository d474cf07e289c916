"""The validation loss: the training loss on held-out images, with everything random fixed once.

Each held-out image is centre-cropped to the training resolution, encoded to the mean of its VAE posterior and
paired with its first caption; it is then noised at `timesteps_per_image` timesteps spread over the whole schedule
(a different offset per image), with noise drawn from a generator seeded by (seed, image, timestep). So two runs
with the same seed and held-out set — whatever their method — see the same batches, and a run's curve moves only
because its weights do. The global random state is never touched: a run with validation trains exactly as one
without.

Under data parallelism the batches are dealt out round-robin; each process puts its per-item losses into a
vector of zeros and the vectors are summed across processes (adding zeros is exact), so every process gets the
same loss, bit for bit the one a single process computes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr

from reslora_diffusers.data.dataset import Augmentation, Example, ImageTransform
from reslora_diffusers.merge import baked_weights, is_exact

# Per (held-out image, timestep) item: the noise depends on nothing else.
_NOISE_SEED_STRIDE = 1_000_003


def diffusion_loss(noise_scheduler, model_pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor,
                   snr_gamma: float | None, per_example: bool = False, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The training loss: MSE to the noise (or velocity), Min-SNR-weighted with `snr_gamma` (arXiv 2303.09556, §3.4,
    adapted to the prediction type). The batch mean, or (`per_example`) one value per example.

    `mask` (N×1×H×W in [0, 1], at pixel resolution; --masked_loss) weighs each latent cell by the share of its
    pixels the mask keeps, so what lies outside the mask gets no gradient. As in kohya's trainer, the mean stays
    over the whole image: a small mask gives a small loss."""
    if snr_gamma is None and not per_example and mask is None:
        return F.mse_loss(model_pred.float(), target.float(), reduction="mean")
    loss = F.mse_loss(model_pred.float(), target.float(), reduction="none")
    if mask is not None:
        loss = loss * latent_mask(mask, model_pred.shape[-2:]).to(loss.device)
    loss = loss.mean(dim=list(range(1, model_pred.ndim)))
    if snr_gamma is not None:
        snr = compute_snr(noise_scheduler, timesteps)
        weights = torch.clamp(snr, max=snr_gamma)
        weights = weights / snr if noise_scheduler.config.prediction_type == "epsilon" else weights / (snr + 1)
        loss = loss * weights
    return loss if per_example else loss.mean()


def latent_mask(mask: torch.Tensor, latent_size) -> torch.Tensor:
    """A pixel mask averaged over each latent cell's pixels (the VAE's downsampling is a whole factor)."""
    return F.interpolate(mask.float(), size=tuple(latent_size), mode="area")


def loss_target(noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet is trained to predict: the noise (epsilon) or the velocity (v-prediction)."""
    if noise_scheduler.config.prediction_type == "epsilon":
        return noise
    return noise_scheduler.get_velocity(latents, noise, timesteps)


def spread_timesteps(image: int, images: int, per_image: int, num_train_timesteps: int) -> list[int]:
    """`per_image` timesteps evenly over [0, T), offset by the image's place so the set covers the schedule finely."""
    return [int((step + (image + 0.5) / images) / per_image * num_train_timesteps) for step in range(per_image)]


@dataclass
class _Batch:
    items: list[int]  # positions in the flat (image, timestep) list
    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    captions: list[str]


class ValidationLoss:
    """The held-out set, encoded once; `evaluate(predict, ...)` gives the mean loss of a model on it."""

    def __init__(
        self,
        examples: Sequence[Example],
        *,
        resolution: int,
        interpolation: str,
        encode: Callable[[torch.Tensor], torch.Tensor],
        noise_scheduler,
        seed: int,
        timesteps_per_image: int,
        batch_size: int,
        snr_gamma: float | None,
    ) -> None:
        """`encode(pixels)` gives scaled latents (the VAE posterior's mean × scaling factor)."""
        if not examples:
            raise ValueError("the validation set is empty")
        self.noise_scheduler, self.snr_gamma = noise_scheduler, snr_gamma
        self.names = [e.name for e in examples]
        transform = ImageTransform(resolution, center_crop=True, random_flip=False, interpolation=interpolation)
        target = (resolution, resolution)
        steps = noise_scheduler.config.num_train_timesteps
        latents = []
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            pixels = []
            for example in chunk:
                image = example.open()
                width, height = transform.resized_size(image.size, target)
                pixels.append(transform.apply(image, target, Augmentation((width - resolution) // 2, (height - resolution) // 2, False)))
            latents.append(encode(torch.stack(pixels)).float().cpu())
        latents = torch.cat(latents)
        items = [(i, t) for i in range(len(examples)) for t in spread_timesteps(i, len(examples), timesteps_per_image, steps)]
        self.size = len(items)
        self.batches = []
        for start in range(0, len(items), batch_size):
            chunk = list(range(start, min(start + batch_size, len(items))))
            noise = [torch.randn(latents.shape[1:], generator=torch.Generator().manual_seed(seed * _NOISE_SEED_STRIDE + p))
                     for p in chunk]
            self.batches.append(_Batch(
                items=chunk,
                latents=latents[[items[p][0] for p in chunk]],
                noise=torch.stack(noise),
                timesteps=torch.tensor([items[p][1] for p in chunk], dtype=torch.long),
                captions=[examples[items[p][0]].captions[0] for p in chunk],
            ))

    @torch.no_grad()
    def evaluate(self, predict: Callable[[torch.Tensor, torch.Tensor, list[str]], torch.Tensor], *, device,
                 dtype: torch.dtype, process_index: int = 0, num_processes: int = 1,
                 reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> float:
        """The mean per-item loss. `predict(noisy_latents, timesteps, captions)` runs the model (in eval mode);
        with several processes `reduce` sums a tensor across them (e.g. `accelerator.reduce(t, "sum")`)."""
        losses = torch.zeros(self.size, dtype=torch.float64, device=device)
        for batch in self.batches[process_index::num_processes]:
            latents = batch.latents.to(device, dtype=dtype)
            noise = batch.noise.to(device, dtype=dtype)
            timesteps = batch.timesteps.to(device)
            noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
            target = loss_target(self.noise_scheduler, latents, noise, timesteps)
            model_pred = predict(noisy, timesteps, batch.captions)
            item_losses = diffusion_loss(self.noise_scheduler, model_pred, target, timesteps, self.snr_gamma, per_example=True)
            losses[batch.items] = item_losses.double()
        if num_processes > 1:
            losses = reduce(losses)
        return float(losses.sum() / self.size)


def trained_and_merged_losses(validation: ValidationLoss, adapter, predict, *, merged_factors: Callable[[], dict],
                              models: Sequence[torch.nn.Module], **evaluate_options) -> tuple[float, float]:
    """(loss of the training-time model, loss after the merge) on the validation set.

    The merged model is the one users deploy: `merged_factors()` (e.g. `merge_adapter(...).factors`; under data
    parallelism the main process's merge, shared with the others, since each process's input-norm windows end
    with its own last batch) baked into the base weights for the second pass (`merge.baked_weights`, undone
    exactly afterwards). For exact merges the two are the same model (one pass); for `is` / `ms` their difference
    is the merge gap. `models` are set to eval mode for the passes (no dropout, no input-norm recording) and given back
    their modes after.
    """
    modes = [(model, model.training) for model in models]
    for model in models:
        model.eval()
    try:
        trained = validation.evaluate(predict, **evaluate_options)
        if is_exact(adapter) or all(not block.lora_B.any() for block in adapter.blocks.values()):
            # An exact merge (LoRA, bs, annealed to γ = 0) is the same model, so the second pass is skipped; with
            # every B still zero (before the first step) every merge is the base model itself, and the input-based
            # α could not be estimated yet (its input norms are recorded by the training steps).
            return trained, trained
        with baked_weights(adapter, merged_factors()):
            merged = validation.evaluate(predict, **evaluate_options)
    finally:
        for model, mode in modes:
            model.train(mode)
    return trained, merged

"""One batch's training loss: encode, noise, predict, compare (diffusers' text-to-image step), with the loss mask
(`--masked_loss`) and the regularisation images (`--reg_data_dir`) joined in."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from reslora_diffusers.data.loader import latent_distribution
from reslora_diffusers.training.validation_loss import diffusion_loss, loss_target


@dataclass
class Noised:
    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    noisy_latents: torch.Tensor


def noised(models, batch: dict, device, noise_offset: float, generator: torch.Generator | None = None) -> Noised:
    """The batch's latents (a fresh sample of each VAE posterior), noise and timesteps; from the global random state,
    or (regularisation images) from `generator`, which leaves the global state as it was."""
    vae, noise_scheduler = models.vae, models.noise_scheduler
    with torch.no_grad():
        latents = latent_distribution(vae, batch, device, models.vae_dtype).sample(generator=generator)
    latents = (latents * vae.config.scaling_factor).to(models.weight_dtype)

    # Sample noise that we'll add to the latents
    if generator is None:
        noise = torch.randn_like(latents)
    else:
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if noise_offset:
        # https://www.crosslabs.org//blog/diffusion-with-offset-noise
        noise += noise_offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1), device=latents.device, generator=generator)
    # Sample a random timestep for each image
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device,
                              generator=generator).long()
    # Add noise to the latents according to the noise magnitude at each timestep (the forward diffusion process)
    return Noised(latents, noise, timesteps, noise_scheduler.add_noise(latents, noise, timesteps))


def _joined(first: dict, second: dict) -> dict:
    """Two batches as one (tensors and lists end to end), for the keys both have."""
    return {key: torch.cat([first[key], second[key].to(first[key].device)]) if torch.is_tensor(first[key]) else first[key] + second[key]
            for key in first if key in second}


@dataclass
class BatchLoss:
    loss: torch.Tensor  # what is backpropagated
    instance: torch.Tensor  # the training images' loss
    prior: torch.Tensor | None  # the regularisation images' loss (before --prior_loss_weight)


def batch_loss(args, models, batch: dict, device, regularisation: tuple[dict, torch.Generator] | None = None) -> BatchLoss:
    """The loss of one batch (Min-SNR-weighted with --snr_gamma, masked with --masked_loss; the validation loss
    uses the same function), with its regularisation batch in the same UNet call."""
    unet, noise_scheduler = models.unet, models.noise_scheduler
    batches, parts = [batch], [noised(models, batch, device, args.noise_offset)]
    if regularisation is not None:
        reg_batch, generator = regularisation
        batches.append(reg_batch)
        parts.append(noised(models, reg_batch, device, args.noise_offset, generator))

    # Get the text embedding for conditioning (SDXL: and its pooled embedding, size / crop ids)
    conditioning_batch = batch if regularisation is None else _joined(batch, reg_batch)
    encoder_hidden_states, added_cond_kwargs = models.conditioning(conditioning_batch, device, args.train_text_encoder)
    # Predict the noise residual (or velocity, by the prediction type) and compute the loss
    model_pred = unet(
        torch.cat([p.noisy_latents for p in parts]), torch.cat([p.timesteps for p in parts]), encoder_hidden_states,
        added_cond_kwargs=added_cond_kwargs, return_dict=False,
    )[0]
    losses = [
        diffusion_loss(noise_scheduler, prediction, loss_target(noise_scheduler, p.latents, p.noise, p.timesteps), p.timesteps,
                       args.snr_gamma, mask=part_batch.get("mask"))
        for prediction, p, part_batch in zip(model_pred.split([len(p.timesteps) for p in parts]), parts, batches)
    ]
    if regularisation is None:
        return BatchLoss(losses[0], losses[0], None)
    return BatchLoss(losses[0] + args.prior_loss_weight * losses[1], losses[0], losses[1])

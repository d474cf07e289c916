"""What a run measures while it trains: validation grids, the held-out loss of the training-time and merged model,
and the calibration prompts of the export's merge — all through one pipeline that runs the live adapter."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import broadcast_object_list
from diffusers import DPMSolverMultistepScheduler

from reslora_diffusers.adapters.sdxl import encode_prompt
from reslora_diffusers.atomic import atomic_write
from reslora_diffusers.image_grid import labelled_grid
from reslora_diffusers.merge import merge_adapter
from reslora_diffusers.training.optimizers import evaluation_weights
from reslora_diffusers.training.validation_loss import ValidationLoss, trained_and_merged_losses


def validation_pipeline(accelerator, unet, text_encoder, vae, tokenizer, noise_scheduler, sdxl=None):
    """The base pipeline running through the live adapter (no copy), with a fast DPM-Solver sampler."""
    # Imported here, once transformers' logging is quiet: the pipeline module pulls in image processors that
    # warn about optional backends the training never uses.
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    scheduler = DPMSolverMultistepScheduler.from_config(noise_scheduler.config)
    if sdxl is not None:
        # The VAE may be kept fp32 (fp16 overflow) while the UNet's latents come out fp16, and the pipeline
        # hands them to the VAE as they are (it casts only a VAE it upcasts itself): its first layer casts them.
        first = vae.post_quant_conv if getattr(vae, "post_quant_conv", None) is not None else vae.decoder
        first.register_forward_pre_hook(lambda module, args: (args[0].to(vae.dtype), *args[1:]))
        pipeline = StableDiffusionXLPipeline(
            vae=vae, text_encoder=accelerator.unwrap_model(text_encoder), text_encoder_2=accelerator.unwrap_model(sdxl.text_encoder_2),
            tokenizer=tokenizer, tokenizer_2=sdxl.tokenizer_2, unet=accelerator.unwrap_model(unet), scheduler=scheduler,
        )
    else:
        pipeline = StableDiffusionPipeline(
            vae=vae, text_encoder=accelerator.unwrap_model(text_encoder), tokenizer=tokenizer, unet=accelerator.unwrap_model(unet),
            scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


class RunValidation:
    """The run's validation grids, held-out loss and merge calibration (one instance per run, on every process)."""

    def __init__(self, args, accelerator, adapter, optimizer, pipeline, sdxl, *, noise_scheduler, held_out, vae_dtype, weight_dtype):
        self.args, self.accelerator, self.adapter, self.optimizer = args, accelerator, adapter, optimizer
        self.pipeline, self.sdxl, self.weight_dtype = pipeline, sdxl, weight_dtype
        self.draws_grids = args.num_validation_images > 0 and bool(args.validation_prompt)
        self.grids: list[Path] = []
        self.loss_seconds = 0.0
        self.held_out, self.loss_every = None, None
        if held_out is not None:
            # Fixed noise, timesteps and captions (validation_loss.py); through the pipeline's unwrapped models, so no
            # process waits on another inside a forward pass.
            vae = pipeline.vae
            with torch.no_grad():
                self.held_out = ValidationLoss(
                    held_out, resolution=args.resolution, interpolation=args.image_interpolation_mode,
                    encode=lambda pixels: vae.encode(pixels.to(accelerator.device, dtype=vae_dtype)).latent_dist.mean * vae.config.scaling_factor,
                    noise_scheduler=noise_scheduler, seed=args.seed,
                    timesteps_per_image=args.validation_loss_timesteps, batch_size=args.train_batch_size, snr_gamma=args.snr_gamma,
                )
            self.loss_every = args.validation_loss_steps or max(1, args.max_train_steps // 5)

    # -- the merge's calibration -------------------------------------------------------------------------------
    def calibration(self) -> None:
        """The lstsq / calibrated merge's calibration run: the unmerged model (in eval mode) on the validation prompts."""
        for model in (self.pipeline.unet, self.pipeline.text_encoder):
            model.eval()
        self.pipeline(list(self.args.validation_prompt), num_inference_steps=8, height=self.args.resolution,
                      width=self.args.resolution, generator=torch.Generator().manual_seed(self.args.seed), output_type="latent")

    def merged_factors(self) -> dict:
        """The export's merge, computed once (the main process's adapter, as exported) and shared with the others."""
        accelerator = self.accelerator
        factors = None
        if accelerator.is_main_process:
            factors = merge_adapter(self.adapter, method=self.args.merge_method, calibration=self.calibration).factors
        return broadcast_object_list([factors])[0] if accelerator.num_processes > 1 else factors

    # -- the held-out loss ---------------------------------------------------------------------------------------
    def loss_due(self, step: int) -> bool:
        return self.held_out is not None and (step % self.loss_every == 0 or step == self.args.max_train_steps)

    def _predict_held_out(self, noisy_latents, timesteps, captions):
        pipeline, sdxl, args, device = self.pipeline, self.sdxl, self.args, self.accelerator.device
        ids = pipeline.tokenizer(captions, max_length=pipeline.tokenizer.model_max_length, padding="max_length",
                                 truncation=True, return_tensors="pt").input_ids.to(device)
        added = None
        with self.accelerator.autocast():
            if sdxl is None:
                hidden = pipeline.text_encoder(ids, return_dict=False)[0]
            else:
                hidden, pooled = encode_prompt(pipeline.text_encoder, pipeline.text_encoder_2, ids, sdxl.tokenize(captions).to(device))
                sizes = [(args.resolution, args.resolution)] * len(captions)
                added = sdxl.added_conditions(pooled, sizes, [(0, 0)] * len(captions), sizes)
            return pipeline.unet(noisy_latents.to(self.weight_dtype), timesteps, hidden, added_cond_kwargs=added, return_dict=False)[0]

    def losses(self, step: int) -> dict:
        """{"validation_loss", "validation_loss_merged"} at `step`, logged to the trackers; the same on every process."""
        accelerator, pipeline = self.accelerator, self.pipeline
        started = time.perf_counter()
        models = [pipeline.unet, pipeline.text_encoder] + ([pipeline.text_encoder_2] if self.sdxl is not None else [])
        with evaluation_weights(self.optimizer, self.adapter.trainable_parameters()):
            trained, merged = trained_and_merged_losses(
                self.held_out, self.adapter, self._predict_held_out, merged_factors=self.merged_factors, models=models,
                device=accelerator.device, dtype=self.weight_dtype, process_index=accelerator.process_index,
                num_processes=accelerator.num_processes, reduce=lambda losses: accelerator.reduce(losses, "sum"),
            )
        self.loss_seconds += time.perf_counter() - started
        record = {"validation_loss": trained, "validation_loss_merged": merged}
        accelerator.log(record, step=step)
        return record

    # -- validation grids ----------------------------------------------------------------------------------------
    def grid(self, step: int) -> None:
        """One grid on the main process, with the optimizer's evaluation weights; every process waits for it."""
        if self.accelerator.is_main_process:
            with evaluation_weights(self.optimizer, self.adapter.trainable_parameters()):
                self.grids.append(log_validation(self.pipeline, self.accelerator, self.args, step))
        self.accelerator.wait_for_everyone()


def log_validation(pipeline, accelerator, args, step: int) -> Path:
    """One grid (a row per prompt, the same seeds every time) saved as PNG and sent to TensorBoard."""
    unet, text_encoder = pipeline.unet, pipeline.text_encoder
    was_training = unet.training, text_encoder.training
    unet.eval()
    text_encoder.eval()
    rows = []
    with accelerator.autocast():
        for prompt in args.validation_prompt:
            generators = [torch.Generator(device="cpu").manual_seed(args.seed + i) for i in range(args.num_validation_images)]
            rows.append(
                pipeline(
                    prompt, num_images_per_prompt=args.num_validation_images, num_inference_steps=args.validation_inference_steps,
                    guidance_scale=args.validation_guidance_scale, height=args.resolution, width=args.resolution, generator=generators,
                ).images
            )
    unet.train(was_training[0])
    text_encoder.train(was_training[1])
    # A row per prompt, labelled with it; a column per seed (the same seeds at every validation).
    grid = labelled_grid(rows, list(args.validation_prompt), [f"seed {args.seed + i}" for i in range(args.num_validation_images)])
    path = Path(args.output_dir) / "validation" / f"step-{step:06d}.png"
    atomic_write(path, lambda tmp: grid.save(tmp, format="PNG"))
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("validation", np.asarray(grid), step, dataformats="HWC")
    return path

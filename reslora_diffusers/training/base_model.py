"""The frozen base a run trains on: a diffusers folder, a Hub id or a single-file checkpoint, SD-1.x / 2.x or SDXL."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from reslora_diffusers.adapters.adapter import apply_reslora
from reslora_diffusers.adapters.sdxl import SDXLConditioning
from reslora_diffusers.cli import exit_with_error, first_line
from reslora_diffusers.pipeline_io import PIPELINE_FACTOR, SDXL_PIPELINE, UserInputError, load_pipeline

LOAD_ERRORS = (OSError, ValueError, KeyError, TypeError, RuntimeError)


def load_base(args):
    """(tokenizer, noise scheduler, text encoder, vae, unet, sdxl); `sdxl` is None for SD-1.x / 2.x, and for an SDXL
    base (detected from the model) holds the second tokenizer and text encoder."""
    name = args.pretrained_model_name_or_path
    if Path(name).is_file():
        try:
            pipe = load_pipeline(name, args.base_config)
        except UserInputError as error:
            exit_with_error(str(error))
        scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        sdxl = SDXLConditioning(pipe.tokenizer_2, pipe.text_encoder_2) if hasattr(pipe, "text_encoder_2") else None
        return pipe.tokenizer, scheduler, pipe.text_encoder, load_vae(args, pipe.vae), pipe.unet, sdxl
    common = {"revision": args.revision, "cache_dir": args.cache_dir}
    try:
        tokenizer = CLIPTokenizer.from_pretrained(name, subfolder="tokenizer", **common)
        scheduler = DDPMScheduler.from_pretrained(name, subfolder="scheduler", **common)
        text_encoder = CLIPTextModel.from_pretrained(name, subfolder="text_encoder", variant=args.variant, **common)
        vae = load_vae(args, None) or AutoencoderKL.from_pretrained(name, subfolder="vae", variant=args.variant, **common)
        unet = UNet2DConditionModel.from_pretrained(name, subfolder="unet", variant=args.variant, **common)
        sdxl = None
        if diffusers.DiffusionPipeline.load_config(name, **common).get("_class_name") == SDXL_PIPELINE:
            sdxl = SDXLConditioning(
                CLIPTokenizer.from_pretrained(name, subfolder="tokenizer_2", **common),
                CLIPTextModelWithProjection.from_pretrained(name, subfolder="text_encoder_2", variant=args.variant, **common),
            )
    except LOAD_ERRORS as error:
        exit_with_error(f"cannot load the Stable Diffusion model {name}: {first_line(error)}")
    return tokenizer, scheduler, text_encoder, vae, unet, sdxl


def load_vae(args, default):
    """The VAE of --pretrained_vae_model_name_or_path (a folder holding the VAE, or a Hub id), else `default`."""
    name = args.pretrained_vae_model_name_or_path
    if name is None:
        return default
    subfolder = "vae" if (Path(name) / "vae").is_dir() else None  # a whole pipeline folder, or the VAE alone
    try:
        return AutoencoderKL.from_pretrained(name, subfolder=subfolder, revision=args.revision, cache_dir=args.cache_dir)
    except LOAD_ERRORS as error:
        exit_with_error(f"cannot load the VAE {name}: {first_line(error)}")


@dataclass
class Models:
    """The frozen base on the run's device, in its dtypes, with the adapter patched in."""

    tokenizer: object
    noise_scheduler: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    sdxl: SDXLConditioning | None
    adapter: object
    weight_dtype: torch.dtype
    vae_dtype: torch.dtype

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return [self.text_encoder] if self.sdxl is None else [self.text_encoder, self.sdxl.text_encoder_2]

    def conditioning(self, batch: dict, device, train_text_encoder: bool) -> tuple[torch.Tensor, dict | None]:
        """(encoder_hidden_states, added_cond_kwargs) of a training batch: the text encoder's last hidden state, or
        for SDXL both encoders' penultimate states plus the pooled embedding and size / crop ids."""
        if "encoder_hidden_states" in batch:  # --cache_text_embeddings (SD 1.x / 2.x only)
            return batch["encoder_hidden_states"].to(device), None
        with torch.set_grad_enabled(train_text_encoder):
            input_ids = batch["input_ids"].to(device)
            if self.sdxl is None:
                return self.text_encoder(input_ids, return_dict=False)[0], None
            hidden, pooled = self.sdxl.encode(self.text_encoder, input_ids, batch["input_ids_2"].to(device))
            added = self.sdxl.added_conditions(pooled, batch["original_sizes"], batch["crop_top_lefts"], batch["target_sizes"])
            return hidden, added


def set_up_models(args, accelerator, logger) -> Models:
    """Loads the base, checks the flags that depend on it, freezes it in the mixed-precision dtype and adds the
    adapter blocks (fp32) to the UNet's attention projections (and the text encoders' with --train_text_encoder)."""
    tokenizer, noise_scheduler, text_encoder, vae, unet, sdxl = load_base(args)
    if args.prediction_type is not None:
        noise_scheduler.register_to_config(prediction_type=args.prediction_type)
    if noise_scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
        exit_with_error(f"the base scheduler predicts {noise_scheduler.config.prediction_type!r}; pass --prediction_type epsilon or v_prediction")
    vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if args.resolution is None:
        args.resolution = int(vae.config.sample_size)
    factor = math.lcm(vae_scale_factor, PIPELINE_FACTOR)
    if args.resolution % factor:
        exit_with_error(f"--resolution must be a multiple of {factor} (the VAE downsamples by {vae_scale_factor}, and "
                        f"diffusers' pipelines need multiples of {PIPELINE_FACTOR}), got {args.resolution}")

    # The frozen base runs in the mixed-precision dtype (the adapters stay fp32; Delta-LoRA never writes W).
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    # SDXL's VAE overflows to NaN in fp16 (diffusers' SDXL scripts keep it in fp32 unless a fixed VAE is given).
    vae_dtype = weight_dtype
    if sdxl is not None and weight_dtype == torch.float16 and args.pretrained_vae_model_name_or_path is None:
        vae_dtype = torch.float32
        logger.info("SDXL: the VAE runs in fp32 (its fp16 activations overflow); --pretrained_vae_model_name_or_path takes a fixed VAE")
    vae.requires_grad_(False)
    vae.to(accelerator.device, dtype=vae_dtype)
    unet.to(accelerator.device, dtype=weight_dtype)
    text_encoders = [text_encoder] if sdxl is None else [text_encoder, sdxl.text_encoder_2]
    for model in text_encoders:
        model.to(accelerator.device, dtype=weight_dtype)
        model.requires_grad_(False)

    trained_encoders = {}
    if args.train_text_encoder:
        trained_encoders = {"text_encoder": text_encoder}
        if sdxl is not None:
            trained_encoders["text_encoder_2"] = sdxl.text_encoder_2
    adapter = apply_reslora(unet, args.adapter_config, **trained_encoders)
    logger.info(f"{adapter}: {sum(p.numel() for p in adapter.trainable_parameters()):,} trainable parameters")
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if args.train_text_encoder:
            for model in text_encoders:
                model.gradient_checkpointing_enable()
    return Models(tokenizer, noise_scheduler, text_encoder, vae, unet, sdxl, adapter, weight_dtype, vae_dtype)

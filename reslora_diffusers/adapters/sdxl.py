"""SDXL conditioning: the added conditions its UNet takes and the prompt encoding of its two text encoders.

SDXL's UNet (``addition_embed_type == "text_time"``) takes, besides the text embedding, the pooled
embedding of the second text encoder (``text_embeds``) and six size / crop numbers (``time_ids``), as
diffusers' ``StableDiffusionXLPipeline`` and ``train_text_to_image_lora_sdxl.py`` pass them.
"""

from __future__ import annotations

import torch
from torch import nn

from reslora_diffusers.formats.key_names import is_sdxl_unet

__all__ = ["SDXLConditioning", "added_conditions", "encode_prompt", "is_sdxl_unet", "probe_added_conditions", "time_ids"]

NUM_TIME_IDS = 6  # original (h, w), crop top-left (y, x), target (h, w)


def time_ids(original_size, crop_top_left, target_size, dtype=torch.float32, device=None) -> torch.Tensor:
    """``[orig_h, orig_w, crop_top, crop_left, target_h, target_w]`` for one image (SDXL micro-conditioning)."""
    values = [*original_size, *crop_top_left, *target_size]
    if len(values) != NUM_TIME_IDS:
        raise ValueError(f"time ids need (h, w) sizes and a (top, left) crop, got {values}")
    return torch.tensor(values, dtype=dtype, device=device)


def added_conditions(pooled_embeds: torch.Tensor, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The ``added_cond_kwargs`` of an SDXL UNet call."""
    return {"text_embeds": pooled_embeds, "time_ids": ids}


def probe_added_conditions(unet: nn.Module, batch: int, device, dtype) -> dict[str, torch.Tensor] | None:
    """Zero added conditions of the right shapes for a probe pass; None for a UNet without them."""
    config = unet.config
    if not is_sdxl_unet(config):
        return None
    pooled_dim = config.projection_class_embeddings_input_dim - NUM_TIME_IDS * config.addition_time_embed_dim
    if pooled_dim <= 0:
        raise ValueError(f"SDXL UNet config: projection_class_embeddings_input_dim {config.projection_class_embeddings_input_dim} "
                         f"leaves no room for the pooled text embedding")
    return added_conditions(
        torch.zeros(batch, pooled_dim, device=device, dtype=dtype),
        torch.zeros(batch, NUM_TIME_IDS, device=device, dtype=dtype),
    )


def encode_prompt(text_encoder: nn.Module, text_encoder_2: nn.Module, input_ids, input_ids_2) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt embeddings, pooled embeddings) as ``StableDiffusionXLPipeline.encode_prompt`` computes them.

    Each encoder's penultimate hidden state, concatenated on the feature axis; the pooled embedding is the
    second encoder's projected output.
    """
    hidden = text_encoder(input_ids, output_hidden_states=True).hidden_states[-2]
    output_2 = text_encoder_2(input_ids_2, output_hidden_states=True)
    pooled = output_2.text_embeds if hasattr(output_2, "text_embeds") else output_2[0]
    return torch.cat([hidden, output_2.hidden_states[-2]], dim=-1), pooled


class SDXLConditioning:
    """What training an SDXL UNet adds to SD-1's loop: the second tokenizer / text encoder, the pooled
    embedding and the size / crop ids, as diffusers' ``train_text_to_image_lora_sdxl.py`` computes them."""

    def __init__(self, tokenizer_2, text_encoder_2: nn.Module) -> None:
        self.tokenizer_2, self.text_encoder_2 = tokenizer_2, text_encoder_2

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        tokenizer = self.tokenizer_2
        return tokenizer(
            captions, max_length=tokenizer.model_max_length, padding="max_length", truncation=True, return_tensors="pt"
        ).input_ids

    def encode(self, text_encoder: nn.Module, input_ids, input_ids_2) -> tuple[torch.Tensor, torch.Tensor]:
        return encode_prompt(text_encoder, self.text_encoder_2, input_ids, input_ids_2)

    @staticmethod
    def added_conditions(pooled: torch.Tensor, original_sizes, crop_top_lefts, target_sizes) -> dict[str, torch.Tensor]:
        """``added_cond_kwargs`` for a batch: its pooled embeddings and one row of time ids per image.
        `target_sizes`: one (height, width) per image (aspect-ratio buckets), or an int for squares of that side."""
        if isinstance(target_sizes, int):
            target_sizes = [(target_sizes, target_sizes)] * len(original_sizes)
        ids = torch.stack(
            [
                time_ids(tuple(size), tuple(crop), tuple(target), dtype=pooled.dtype, device=pooled.device)
                for size, crop, target in zip(original_sizes, crop_top_lefts, target_sizes, strict=True)
            ]
        )
        return added_conditions(pooled, ids)

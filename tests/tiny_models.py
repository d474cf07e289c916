"""Tiny diffusers / transformers models built from configs (no download), shared by the tests."""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

CROSS_DIM = 32
MAX_TOKENS = 12  # tiny_text_encoder's max_position_embeddings


def tiny_unet(seed: int = 0, dtype: torch.dtype = torch.float32) -> UNet2DConditionModel:
    """Two resolution levels with attention, a mid block, self- and cross-attention: 56 adapter targets."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CROSS_DIM,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    return unet if dtype == torch.float32 else unet.to(dtype)


def sd15_shaped_unet(seed: int = 0) -> UNet2DConditionModel:
    """SD-1.5's layout in miniature: 3 cross-attention down blocks + DownBlock2D, mid, UpBlock2D + 3 up blocks.

    As in SD-1.5, the last two levels have the same channel count, so the 3rd down level and the mid
    block have equal weight shapes but different token counts.
    """
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32, 64, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CROSS_DIM,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def _tiny_text_config(layers: int, hidden_size: int = CROSS_DIM, **overrides) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=100,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_attention_heads=4,
        num_hidden_layers=layers,
        max_position_embeddings=MAX_TOKENS,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        **overrides,
    )


def tiny_text_encoder(seed: int = 0, layers: int = 4) -> CLIPTextModel:
    torch.manual_seed(seed)
    return CLIPTextModel(_tiny_text_config(layers))


def unet_inputs(batch: int = 2, size: int = 8, seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(batch, 4, size, size, generator=generator),
        "timestep": torch.randint(0, 1000, (batch,), generator=generator),
        "encoder_hidden_states": torch.randn(batch, 12, CROSS_DIM, generator=generator),
    }


def token_ids(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(2, 100, (batch, length), generator=generator)


def perturb_adapter(adapter, std: float = 0.1, seed: int = 3) -> None:
    """Moves every B (and A) away from its initial value, so merges and shortcuts are really exercised."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in adapter.blocks.values():
            block.lora_B.copy_(torch.randn(block.lora_B.shape, generator=generator) * std)
            block.lora_A.add_(torch.randn(block.lora_A.shape, generator=generator) * std)


def tiny_vae(num_blocks: int = 2, seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * num_blocks,
        up_block_types=("UpDecoderBlock2D",) * num_blocks,
        block_out_channels=(8, 16, 16, 16)[:num_blocks],
        layers_per_block=2 if num_blocks == 4 else 1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    )


def tiny_tokenizer() -> CLIPTokenizer:
    """Letters as BPE symbols, no merges: ids 2..53, within tiny_text_encoder's vocabulary."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for letter in "abcdefghijklmnopqrstuvwxyz":
        vocab[letter] = len(vocab)
        vocab[letter + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=MAX_TOKENS)


def tiny_pipeline() -> StableDiffusionPipeline:
    """An SD-1.x pipeline in miniature; the UNet mixes attention and plain blocks, so both upsampler slots occur."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CROSS_DIM,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, steps_offset=1
    )
    return StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=tiny_text_encoder(layers=2),
        tokenizer=tiny_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


SDXL_POOLED_DIM = 16  # tiny_sdxl_pipeline's text_encoder_2 projection_dim
SDXL_TIME_EMBED_DIM = 8
# The encoders differ in width, as CLIP-L (768) and OpenCLIP bigG (1280) do: diffusers' single-file loader
# tells them apart by it.
SDXL_TEXT_2_DIM = 48
SDXL_CONTEXT_DIM = CROSS_DIM + SDXL_TEXT_2_DIM


def tiny_sdxl_unet(seed: int = 0) -> UNet2DConditionModel:
    """SDXL's layout in miniature: a plain first level, then cross-attention with 2 transformer blocks per
    attention (SDXL: 2 and 10), linear projections, and the text_time added conditions."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        cross_attention_dim=SDXL_CONTEXT_DIM,  # both encoders' hidden states, concatenated
        addition_embed_type="text_time",
        addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=SDXL_POOLED_DIM + 6 * SDXL_TIME_EMBED_DIM,
        norm_num_groups=8,
    )


def tiny_sdxl_pipeline() -> StableDiffusionXLPipeline:
    """An SDXL pipeline in miniature: CLIP-L-like text_encoder (quick_gelu) and a CLIPTextModelWithProjection
    text_encoder_2 (gelu, as OpenCLIP bigG, 48 wide), so the UNet's context is 80 wide."""
    unet = tiny_sdxl_unet()
    torch.manual_seed(1)
    text_encoder = CLIPTextModel(_tiny_text_config(2))
    text_encoder_2 = CLIPTextModelWithProjection(
        _tiny_text_config(3, hidden_size=SDXL_TEXT_2_DIM, hidden_act="gelu", projection_dim=SDXL_POOLED_DIM)
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading"
    )
    return StableDiffusionXLPipeline(
        vae=tiny_vae(),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tiny_tokenizer(),
        tokenizer_2=tiny_tokenizer(),
        unet=unet,
        scheduler=scheduler,
    )


def sdxl_unet_inputs(batch: int = 2, size: int = 8, seed: int = 1) -> dict:
    """UNet inputs for tiny_sdxl_unet: latents, timesteps, an 80-wide context and the added conditions."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(batch, 4, size, size, generator=generator),
        "timestep": torch.randint(0, 1000, (batch,), generator=generator),
        "encoder_hidden_states": torch.randn(batch, MAX_TOKENS, SDXL_CONTEXT_DIM, generator=generator),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(batch, SDXL_POOLED_DIM, generator=generator),
            "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * batch),
        },
    }

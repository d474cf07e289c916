"""`ResLoRAAttnProcessor`: a diffusers attention processor that adds ResLoRA branches to an attention's projections.

It follows diffusers' `AttnProcessor2_0` step by step (same `scaled_dot_product_attention` kernel) and only
routes `to_q`, `to_k`, `to_v` and `to_out.0` through `project()`. The frozen linear layers stay where they
are, so the UNet's own weights and their state-dict keys are untouched; the blocks hang under
`<attention>.processor.blocks` so that DDP, `.to()` and `state_dict()` see them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from torch import nn

from reslora_diffusers.adapters.blocks import ResLoRABlock

# What installs diffusers' processors, so the error names the call that replaced ours.
_INSTALLED_BY = {
    "SlicedAttnProcessor": "unet.set_attention_slice() / pipe.enable_attention_slicing()",
    "SlicedAttnAddedKVProcessor": "unet.set_attention_slice() / pipe.enable_attention_slicing()",
    "FusedAttnProcessor2_0": "unet.fuse_qkv_projections() / pipe.fuse_qkv_projections()",
    "XFormersAttnProcessor": "enable_xformers_memory_efficient_attention()",
    "IPAdapterAttnProcessor2_0": "pipe.load_ip_adapter()",
    "IPAdapterAttnProcessor": "pipe.load_ip_adapter()",
}


class ProcessorsReplacedError(RuntimeError):
    """The UNet's ResLoRA processors were swapped out: running on would silently drop the adapter."""


def replaced_processor_error(attention_path: str, processor: object) -> ProcessorsReplacedError:
    kind = type(processor).__name__
    by = _INSTALLED_BY.get(kind, "unet.set_attn_processor() / set_default_attn_processor() or a pipeline method calling it")
    return ProcessorsReplacedError(
        f"the UNet's ResLoRA attention processors were replaced ({attention_path} now runs {kind}, installed by "
        f"{by}), so the adapter would silently not run. Attention slicing, fused QKV projections, xformers and "
        "other processors cannot run an unmerged ResLoRA adapter (its processor already uses PyTorch's "
        "memory-efficient scaled_dot_product_attention). Call adapter.remove() before swapping processors and "
        "apply the adapter again afterwards, or bake it into the base first (reslora_diffusers.merge.merge_into_base)."
    )


def _module_key(target: str) -> str:
    # ModuleDict keys may not contain "."; "to_out.0" becomes "to_out_0".
    return target.replace(".", "_")


class ResLoRAAttnProcessor(nn.Module):
    def __init__(self, blocks: dict[str, ResLoRABlock]) -> None:
        super().__init__()
        self.blocks = nn.ModuleDict({_module_key(target): block for target, block in blocks.items()})

    def project(self, target: str, linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
        block = self.blocks[_module_key(target)] if _module_key(target) in self.blocks else None
        if block is None or not block.runs:
            return linear(x)
        return linear(x) + block(x)

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        # Image-shaped input (B, C, H, W) becomes a token sequence (B, H*W, C).
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch_size, sequence_length, _ = context.shape

        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = self.project("to_q", attn.to_q, hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = self.project("to_k", attn.to_k, encoder_hidden_states)
        value = self.project("to_v", attn.to_v, encoder_hidden_states)

        # Split heads: (B, L, heads*dim) -> (B, heads, L, dim).
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
        )
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        # Output projection, then the attention's output dropout.
        hidden_states = self.project("to_out.0", attn.to_out[0], hidden_states)
        hidden_states = attn.to_out[1](hidden_states)

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

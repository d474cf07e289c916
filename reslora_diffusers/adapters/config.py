"""`ResLoRAConfig`: every setting of an adapter, validated on construction and saved as JSON beside the weights."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

ResType = Literal["none", "is", "bs", "ms"]
RES_TYPES: tuple[str, ...] = get_args(ResType)
# How an `is` / `ms` shortcut's earlier input is estimated when merging (merge.py); here so that command lines
# can offer the choice without importing torch.
MERGE_METHODS: tuple[str, ...] = ("input", "weight", "lstsq", "lstsq_joint", "calibrated")

DEFAULT_UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
DEFAULT_TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
# Conv2d layers of the UNet's ResNet blocks that get a LoCon adapter when conv_rank > 0 (kohya's conv_dim targets
# their 3×3 convs); "conv_shortcut" (1×1) and "conv" (the down- / upsamplers' 3×3) may be added, at conv_rank too
# (sd-scripts trains the 1×1 conv_shortcut at its network_dim instead).
DEFAULT_CONV_TARGETS = ("conv1", "conv2")
CONV_TARGETS = ("conv1", "conv2", "conv_shortcut", "conv")


@dataclass(frozen=True)
class ResLoRAConfig:
    res_type: ResType = field(
        default="is",
        metadata={"help": "'none' = plain LoRA; 'is' input shortcut, 'bs' block shortcut, 'ms' middle shortcut (SPEC §2)."},
    )
    pre_num: int = field(
        default=-1,
        metadata={"help": "How many previous blocks of a chain take part (m); -1 = all previous blocks. 'is' always uses one."},
    )
    rank: int = field(default=8, metadata={"help": "LoRA rank r of every block."})
    lora_alpha: float = field(default=8.0, metadata={"help": "LoRA alpha; the branch is scaled by lora_alpha / rank."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA branch input (must be 0 with Delta-LoRA)."})
    unet_targets: tuple[str, ...] = field(
        default=DEFAULT_UNET_TARGETS,
        metadata={"help": "Attention projections of the UNet that get an adapter (names inside diffusers' Attention)."},
    )
    conv_rank: int = field(
        default=0,
        metadata={"help": "Rank of the LoCon adapters on the UNet's ResNet convolutions (kohya's conv_dim); 0 = none."},
    )
    conv_alpha: float | None = field(
        default=None,
        metadata={"help": "Alpha of the conv adapters (their branch is scaled by conv_alpha / conv_rank); None = conv_rank."},
    )
    conv_targets: tuple[str, ...] = field(
        default=DEFAULT_CONV_TARGETS,
        metadata={"help": f"Conv2d layers that get a conv adapter when conv_rank > 0, by name: any of {CONV_TARGETS}."},
    )
    text_encoder_targets: tuple[str, ...] = field(
        default=DEFAULT_TEXT_ENCODER_TARGETS,
        metadata={"help": "Attention projections of the CLIP text encoder that get an adapter."},
    )
    delta_lora_ratio: float = field(
        default=0.0,
        metadata={"help": "Delta-LoRA lambda: after step K the model adds lambda * s * (BA - B_K A_K), W's move (W is never written). 0 = off."},
    )
    delta_lora_start: int = field(default=500, metadata={"help": "Delta-LoRA K: the optimizer step after which W starts moving."})
    input_norm_window: int = field(
        default=100,
        metadata={"help": "Sliding window of per-block input Frobenius norms kept for the input-based merge."},
    )
    cross_attention_shortcuts: bool = field(
        default=True,
        metadata={
            "help": "Link the UNet's cross-attention to_k / to_v blocks too (they all read the same text embedding, "
            "so there a shortcut only enlarges the branch). False: those blocks are plain LoRA."
        },
    )

    def __post_init__(self) -> None:
        # Lists from JSON or argparse become tuples, so the frozen config stays hashable and comparable.
        object.__setattr__(self, "unet_targets", tuple(self.unet_targets))
        object.__setattr__(self, "text_encoder_targets", tuple(self.text_encoder_targets))
        object.__setattr__(self, "conv_targets", tuple(self.conv_targets))
        if self.res_type not in RES_TYPES:
            raise ValueError(f"res_type must be one of {RES_TYPES}, got {self.res_type!r}")
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"rank must be a positive integer, got {self.rank!r}")
        if not 0 < self.lora_alpha < math.inf:
            raise ValueError(f"lora_alpha must be > 0 and finite, got {self.lora_alpha!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if not isinstance(self.pre_num, int) or self.pre_num < -1:
            raise ValueError(f"pre_num must be -1 (all previous blocks) or >= 0, got {self.pre_num!r}")
        if isinstance(self.conv_rank, bool) or not isinstance(self.conv_rank, int) or self.conv_rank < 0:
            raise ValueError(f"conv_rank must be a whole number >= 0 (0: no conv adapters), got {self.conv_rank!r}")
        if self.conv_alpha is not None and not 0 < self.conv_alpha < math.inf:
            raise ValueError(f"conv_alpha must be > 0 and finite, got {self.conv_alpha!r}")
        if self.conv_alpha is not None and not self.conv_rank:
            raise ValueError("conv_alpha is the scale of the conv adapters: set conv_rank > 0 too")
        unknown = sorted(set(self.conv_targets) - set(CONV_TARGETS))
        if unknown:
            raise ValueError(f"conv_targets must be among {CONV_TARGETS}, got {unknown}")
        if self.conv_rank and not self.conv_targets:
            raise ValueError("conv_rank > 0 needs at least one conv target")
        if not self.unet_targets and not self.text_encoder_targets and not self.conv_rank:
            raise ValueError("at least one of unet_targets / text_encoder_targets / conv_rank must be non-empty")
        if self.delta_lora_ratio < 0:
            raise ValueError(f"delta_lora_ratio must be >= 0, got {self.delta_lora_ratio!r}")
        if self.delta_lora_start < 0:
            raise ValueError(f"delta_lora_start must be >= 0, got {self.delta_lora_start!r}")
        if self.delta_lora and self.res_type != "none":
            raise ValueError("Delta-LoRA (delta_lora_ratio > 0) is defined for plain LoRA only: use res_type='none'")
        if self.delta_lora and self.lora_dropout:
            raise ValueError("Delta-LoRA removes dropout from the LoRA branch: set lora_dropout=0")
        if self.input_norm_window <= 0:
            raise ValueError(f"input_norm_window must be > 0, got {self.input_norm_window!r}")

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.rank

    @property
    def conv_scaling(self) -> float:
        """The conv adapters' scale conv_alpha / conv_rank (conv_alpha defaults to conv_rank: scale 1)."""
        return (self.conv_alpha if self.conv_alpha is not None else self.conv_rank) / self.conv_rank

    @property
    def delta_lora(self) -> bool:
        return self.delta_lora_ratio > 0

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ResLoRAConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ResLoRAConfig fields: {unknown}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ResLoRAConfig":
        return cls.from_dict(json.loads(text))

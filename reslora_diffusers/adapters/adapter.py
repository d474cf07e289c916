"""`apply_reslora`: patches ResLoRA blocks into a diffusers UNet (attention processors; forward hooks on the ResNet
convolutions when `conv_rank` > 0) and a CLIP text encoder (forward hooks).

Block names are `<component>.<module path>`: `unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`,
`unet.down_blocks.0.resnets.0.conv1`,
`text_encoder.encoder.layers.0.self_attn.q_proj` (transformers ≥ 5 module paths, no `text_model.`), and for
SDXL's second encoder `text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj`.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator

import torch
from diffusers.models.attention_processor import Attention
from diffusers.models.downsampling import Downsample2D
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.upsampling import Upsample2D
from torch import nn

from reslora_diffusers.adapters.blocks import ForwardPassTracker, ResLoRABlock
from reslora_diffusers.adapters.chains import ProbedLayer, build_chains, predecessors, probe_execution_order
from reslora_diffusers.adapters.config import ResLoRAConfig
from reslora_diffusers.adapters.delta_lora import DeltaLoRA
from reslora_diffusers.adapters.processor import ResLoRAAttnProcessor, replaced_processor_error
from reslora_diffusers.adapters.projections import LinearProjection, Projection
from reslora_diffusers.adapters.sdxl import probe_added_conditions

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
DEFAULT_TEXT_LENGTH = 77
_APPLIED_MARK = "_reslora_adapter_applied"  # set on a model while an adapter is installed in it


class AdapterMismatchError(ValueError):
    """An adapter (its chains, layers or shapes) does not fit the base model it is applied to."""


def _matches(module_path: str, target: str) -> bool:
    return module_path == target or module_path.endswith("." + target)


def _unet_targets(unet: nn.Module, targets: tuple[str, ...]) -> dict[str, tuple[str, str, nn.Linear]]:
    """{block name: (attention path, target, linear)} for every target projection of every diffusers Attention."""
    found = {}
    for path, module in unet.named_modules():
        if not isinstance(module, Attention):
            continue
        for target in targets:
            try:
                linear = module.get_submodule(target)
            except AttributeError:
                continue
            if isinstance(linear, nn.Linear):
                found[f"unet.{path}.{target}"] = (path, target, linear)
    return found


# The UNet modules whose Conv2d children conv adapters target: ResNet blocks (conv1, conv2, conv_shortcut) and the
# down- / upsamplers (conv), as kohya's LoCon does.
_CONV_HOSTS = (ResnetBlock2D, Downsample2D, Upsample2D)


def _unet_conv_targets(unet: nn.Module, config: ResLoRAConfig) -> dict[str, tuple[str, nn.Conv2d]]:
    """{block name: (target, conv)} for the `conv_targets` of every ResNet block / sampler (none when conv_rank is 0)."""
    found = {}
    if not config.conv_rank:
        return found
    for path, module in unet.named_modules():
        if not isinstance(module, _CONV_HOSTS):
            continue
        for target in config.conv_targets:
            conv = getattr(module, target, None)
            if isinstance(conv, nn.Conv2d):
                found[f"unet.{path}.{target}"] = (target, conv)
    return found


def _text_encoder_targets(
    text_encoder: nn.Module, targets: tuple[str, ...], component: str = "text_encoder"
) -> dict[str, tuple[str, nn.Linear]]:
    found = {}
    for path, module in text_encoder.named_modules():
        if isinstance(module, nn.Linear):
            target = next((t for t in targets if _matches(path, t)), None)
            if target is not None:
                found[f"{component}.{path}"] = (target, module)
    return found


def _read_by_sdxl(text_encoder: nn.Module, targets: dict[str, tuple[str, nn.Linear]]) -> dict[str, tuple[str, nn.Linear]]:
    """SDXL reads its first text encoder's penultimate hidden state only: a block in the last layer would get no
    gradient (exported with B = 0, and DDP stops on the unused parameters), so that layer gets none."""
    last = text_encoder.config.num_hidden_layers - 1
    in_last_layer = re.compile(rf"(^|\.)encoder\.layers\.{last}\.")
    return {name: value for name, value in targets.items() if not in_last_layer.search(name)}


def _probe_unet(unet: nn.Module, text_length: int) -> None:
    config = unet.config
    if not isinstance(config.cross_attention_dim, int):
        raise ValueError("only UNets with one integer cross_attention_dim (Stable Diffusion 1.x / 2.x, SDXL) are supported")
    sample_size = config.sample_size if isinstance(config.sample_size, int) else max(config.sample_size)
    # The smallest latent that keeps every resolution level distinct is enough to see the execution order.
    size = min(sample_size, 2 ** len(config.down_block_types))
    param = next(unet.parameters())
    sample = torch.zeros(1, config.in_channels, size, size, device=param.device, dtype=param.dtype)
    context = torch.zeros(1, text_length, config.cross_attention_dim, device=param.device, dtype=param.dtype)
    added = probe_added_conditions(unet, 1, param.device, param.dtype)  # SDXL: pooled text and size ids
    unet(sample, torch.ones(1, device=param.device, dtype=torch.long), encoder_hidden_states=context, added_cond_kwargs=added)


def _probe_text_encoder(text_encoder: nn.Module) -> None:
    device = next(text_encoder.parameters()).device
    length = text_encoder.config.max_position_embeddings
    text_encoder(torch.zeros(1, length, dtype=torch.long, device=device))


class ResLoRAAdapter:
    """The handle `apply_reslora` returns: the blocks, their chains, and the adapter state.

    `blocks` maps block names to blocks, in forward-execution order per component; `chains` maps each
    component to its chains (lists of block names, first to run first).
    """

    def __init__(
        self, config: ResLoRAConfig, unet: nn.Module, text_encoder: nn.Module | None, text_encoder_2: nn.Module | None = None
    ) -> None:
        self.config = config
        self.unet, self.text_encoder, self.text_encoder_2 = unet, text_encoder, text_encoder_2
        self.blocks: dict[str, ResLoRABlock] = {}
        self.layers: dict[str, ProbedLayer] = {}
        self.chains: dict[str, list[list[str]]] = {}
        self.base_layers: dict[str, nn.Linear] = {}
        self.delta_lora: DeltaLoRA | None = None
        self._undo: list = []

    # -- inspection ---------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for block in self.blocks.values() for p in (block.lora_A, block.lora_B)]

    def named_blocks(self, component: str | None = None) -> Iterator[tuple[str, ResLoRABlock]]:
        for name, block in self.blocks.items():
            if component is None or name.split(".", 1)[0] == component:
                yield name, block

    def reads_the_text_embedding(self, name: str) -> bool:
        """Whether block `name` (`unet.<attention>.to_k`, …) reads the text embedding itself (see the function)."""
        component, path = name.split(".", 1)
        attention_path, _, target = path.rpartition(".")
        return component == "unet" and reads_the_text_embedding(self.unet, attention_path, target)

    @property
    def shortcut_scale(self) -> float:
        """γ of the shortcut terms (SPEC §3): 1 = ResLoRA as trained, 0 = plain LoRA that merges exactly."""
        return next(iter(self.blocks.values())).shortcut_scale if self.blocks else 1.0

    def set_shortcut_scale(self, scale: float) -> None:
        """Scales every block's shortcut terms by γ = `scale` in [0, 1] (shortcut annealing, see annealing.py)."""
        if not 0.0 <= scale <= 1.0:
            raise ValueError(f"the shortcut scale must be in [0, 1], got {scale!r}")
        for block in self.blocks.values():
            block.shortcut_scale = float(scale)
    def components(self) -> list[str]:
        """The models this adapter has blocks in ("unet", "text_encoder"), in the order they were patched."""
        return list(dict.fromkeys(name.split(".", 1)[0] for name in self.blocks))

    # -- strength -----------------------------------------------------------------------------------
    def set_scale(self, scale: float, component: str | None = None) -> None:
        """Multiplies each block's whole added branch (LoRA, shortcut and Delta-LoRA terms) by `scale`.

        `component` is "unet", "text_encoder", "text_encoder_2" (SDXL) or None (all). 0 runs the base alone, bit for bit. diffusers'
        `cross_attention_kwargs={"scale": s}` multiplies the UNet's scale for one call. A runtime knob only:
        merges and exports always write the adapter at strength 1.
        """
        scale = float(scale)
        if not math.isfinite(scale):
            raise ValueError(f"the adapter scale must be a finite number, got {scale}")
        components = self.components()
        if component is not None and component not in components:
            raise ValueError(f"this adapter has no {component!r} blocks; its components are {components}")
        for _, block in self.named_blocks(component):
            block.scale = scale

    @property
    def scale(self) -> float | dict[str, float]:
        """The scale set by `set_scale`: one float, or {component: scale} when the components differ."""
        scales = {c: next(b.scale for _, b in self.named_blocks(c)) for c in self.components()}
        values = set(scales.values())
        return values.pop() if len(values) == 1 else scales

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Runs the base model alone inside the block (every branch off); the scales are restored afterwards."""
        saved = {name: block.scale for name, block in self.blocks.items()}
        try:
            self.set_scale(0.0)
            yield
        finally:
            for name, scale in saved.items():
                self.blocks[name].scale = scale

    def input_norm_means(self) -> dict[str, float | None]:
        return {name: block.mean_input_norm() for name, block in self.blocks.items()}

    def __repr__(self) -> str:
        shown = COMPONENTS if self.text_encoder_2 is not None else COMPONENTS[:2]  # SD-1.x: no second encoder
        counts = {c: sum(1 for _ in self.named_blocks(c)) for c in shown}
        conv = f", conv_rank={self.config.conv_rank}" if self.config.conv_rank else ""
        return f"ResLoRAAdapter(res_type={self.config.res_type!r}, rank={self.config.rank}{conv}, blocks={counts})"

    # -- state --------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor of the adapter: factors, input-norm windows and the Delta-LoRA step-K factors."""
        tensors = {}
        for name, block in self.blocks.items():
            tensors[f"{name}.lora_A"] = block.lora_A.detach()
            tensors[f"{name}.lora_B"] = block.lora_B.detach()
            tensors[f"{name}.input_norms"] = block.input_norms
            tensors[f"{name}.input_norm_count"] = block.input_norm_count
        if self.delta_lora is not None:
            tensors.update(self.delta_lora.state_tensors())
        return tensors

    @torch.no_grad()
    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Loads tensors from `state_dict()`; checks that every block's tensors are there with the right shapes."""
        for name, block in self.blocks.items():
            for attr in ("lora_A", "lora_B", "input_norms", "input_norm_count"):
                key = f"{name}.{attr}"
                if key not in tensors:
                    raise AdapterMismatchError(f"the adapter has no tensor {key!r}: it was trained for another model")
                target = getattr(block, attr)
                if tensors[key].shape != target.shape:
                    raise AdapterMismatchError(
                        f"{key}: adapter shape {tuple(tensors[key].shape)} does not fit this model's {tuple(target.shape)}"
                    )
                target.copy_(tensors[key])
        extra = {k.rsplit(".", 1)[0] for k in tensors if k.endswith(".lora_A")} - set(self.blocks)
        if extra:
            raise AdapterMismatchError(f"the adapter has blocks this model lacks, e.g. {sorted(extra)[0]!r}")
        if self.delta_lora is not None:
            self.delta_lora.restore(tensors)

    # -- training hooks -----------------------------------------------------------------------------
    def step(self, global_step: int) -> None:
        """Sets Delta-LoRA's optimizer-step count (nothing for other methods).

        Optional: an optimizer-step hook already counts the steps of every optimizer holding the factors.
        Call it after `optimizer.step()` when the count must follow yours (after a resume, with several
        optimizers over the factors).
        """
        if self.delta_lora is not None:
            self.delta_lora.step(global_step)

    def remove(self) -> None:
        """Takes every block, processor and hook out again: the base model is as it was, bit for bit."""
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()
        self.blocks.clear()


def _checkpointing(model: nn.Module) -> bool:
    # transformers ≥ 5 renamed the flag (the old name warns); diffusers keeps `is_gradient_checkpointing`.
    for flag in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), flag):
            return bool(getattr(model, flag))
    return False


def _tensor_requiring_grad(output) -> torch.Tensor | None:
    """The first tensor of a model output (tensor, tuple or ModelOutput dict) that backward will reach."""
    if isinstance(output, torch.Tensor):
        return output if output.requires_grad else None
    values = output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list)) else ()
    return next((t for t in map(_tensor_requiring_grad, values) if t is not None), None)


def _track_forward_passes(model: nn.Module, tracker: ForwardPassTracker, undo: list) -> None:
    def before(_module, _args, kwargs):
        # diffusers' LoRA strength: the UNet's forward pops it (for PEFT layers) before processors see it.
        call_kwargs = kwargs.get("cross_attention_kwargs") or {}
        tracker.begin_pass(call_kwargs.get("scale", 1.0))

    def after(module, _args, output):
        # A gradient-checkpointing recompute still needs this pass's cached inputs during backward:
        # then they are released when that backward ends.
        tensor = _tensor_requiring_grad(output) if _checkpointing(module) else None
        if tensor is None:
            tracker.release_caches()
            return
        pass_id = tracker.pass_id

        def release_after_backward(grad):
            torch.autograd.Variable._execution_engine.queue_callback(lambda: tracker.release_caches(pass_id))
            return grad

        tensor.register_hook(release_after_backward)

    handles = [model.register_forward_pre_hook(before, with_kwargs=True), model.register_forward_hook(after)]
    undo.append(lambda: [h.remove() for h in handles])


def _add_blocks(adapter: ResLoRAAdapter, layers: dict[str, nn.Module], tracker: ForwardPassTracker) -> None:
    """One block per layer ({name: Linear or Conv2d}, in execution order, probed): conv blocks get conv_rank / conv_alpha."""
    for name, layer in layers.items():
        adapter.blocks[name] = _new_block(name, layer, adapter.layers[name].projection, adapter.config, tracker)
        adapter.base_layers[name] = layer


def _new_block(name: str, layer: nn.Module, projection: Projection, config: ResLoRAConfig, tracker: ForwardPassTracker) -> ResLoRABlock:
    linear = isinstance(projection, LinearProjection)
    return ResLoRABlock(
        name,
        projection,
        rank=config.rank if linear else config.conv_rank,
        scaling=config.scaling if linear else config.conv_scaling,
        res_type=config.res_type,
        dropout=config.lora_dropout,
        input_norm_window=config.input_norm_window,
        tracker=tracker,
        device=layer.weight.device,
    )


def _patch_unet(adapter: ResLoRAAdapter, unet: nn.Module, targets: dict) -> None:
    """Installs a ResLoRA processor in every Attention with blocks (`targets`: {name: (attention path, target, _)})."""
    by_attention: dict[str, dict[str, ResLoRABlock]] = {}
    for name, (attention_path, target, _linear) in targets.items():
        by_attention.setdefault(attention_path, {})[target] = adapter.blocks[name]
    original = dict(unet.attn_processors)
    processors = {}
    for key, processor in original.items():
        attention_path = key.removesuffix(".processor")
        blocks = by_attention.get(attention_path)
        processors[key] = ResLoRAAttnProcessor(blocks) if blocks else processor
    unet.set_attn_processor(processors)
    adapter._undo.append(lambda: unet.set_attn_processor(original))
    attentions = [unet.get_submodule(path) for path in by_attention]
    installed = {path: (attention, attention.processor) for path, attention in zip(by_attention, attentions)}

    def check_processors(_module, _args):
        # diffusers swaps processors in many places (slicing, fused QKV, xformers, IP-Adapter): refuse to run without ours.
        for path, (attention, processor) in installed.items():
            if attention.processor is not processor:
                raise replaced_processor_error(path, attention.processor)

    handle = unet.register_forward_pre_hook(check_processors)
    adapter._undo.append(handle.remove)


def _hook_layers(adapter: ResLoRAAdapter, names: list[str]) -> None:
    """Adds each block's branch to its layer's output with a forward hook (text encoders, UNet convolutions)."""

    def add_branch(layer, args, output):
        return output + layer.reslora(args[0]) if layer.reslora.runs else output

    for name in names:
        layer = adapter.base_layers[name]
        layer.add_module("reslora", adapter.blocks[name])
        handle = layer.register_forward_hook(add_branch)

        def undo(layer=layer, handle=handle):
            handle.remove()
            del layer.reslora

        adapter._undo.append(undo)


def apply_reslora(
    unet: nn.Module,
    config: ResLoRAConfig,
    text_encoder: nn.Module | None = None,
    chains: dict[str, list[list[str]]] | None = None,
    text_encoder_2: nn.Module | None = None,
) -> ResLoRAAdapter:
    """Freezes `unet` (and the text encoders), adds a ResLoRA block to every target projection, links the chains.

    For SDXL pass both encoders (`text_encoder`, a `CLIPTextModel`, and `text_encoder_2`, a
    `CLIPTextModelWithProjection`); the UNet's probe pass then feeds its added conditions, and each
    component gets its own chains.

    Chains come from one probe forward pass of each model; when `chains` is given (a saved adapter), the
    probe must agree with it, else `AdapterMismatchError`. Call this after moving the base to its device
    and dtype: blocks are created in fp32 beside their layer, and `model.to(dtype)` later would cast them.
    """
    for model in (unet, text_encoder, text_encoder_2):
        if getattr(model, _APPLIED_MARK, False):
            raise RuntimeError(
                f"this {type(model).__name__} already carries a ResLoRA adapter: call .remove() on that adapter "
                "before applying another one (a second adapter would silently replace the first one's blocks)"
            )
    adapter = ResLoRAAdapter(config, unet, text_encoder, text_encoder_2)
    unet_targets = _unet_targets(unet, config.unet_targets)
    conv_targets = _unet_conv_targets(unet, config)
    encoders = {"text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
    encoders = {component: model for component, model in encoders.items() if model is not None}
    text_targets = {
        component: _text_encoder_targets(model, config.text_encoder_targets, component)
        for component, model in encoders.items()
    }
    if text_encoder is not None and text_encoder_2 is not None and "text_encoder" in text_targets:
        text_targets["text_encoder"] = _read_by_sdxl(text_encoder, text_targets["text_encoder"])
    text_targets = {component: targets for component, targets in text_targets.items() if targets}
    if config.conv_rank and not conv_targets:
        raise ValueError(f"conv_rank is {config.conv_rank}, but this UNet has no Conv2d named {config.conv_targets} in its ResNet blocks")
    if not unet_targets and not conv_targets and not text_targets:
        raise ValueError(f"no adapter targets found: unet_targets={config.unet_targets}, text_encoder_targets={config.text_encoder_targets}")

    text_length = text_encoder.config.max_position_embeddings if text_encoder is not None else DEFAULT_TEXT_LENGTH
    probed = {}
    unet_layers = {name: (target, linear) for name, (_path, target, linear) in unet_targets.items()}
    unet_layers.update(conv_targets)
    if unet_layers:
        probed["unet"] = probe_execution_order(unet_layers, lambda: _probe_unet(unet, text_length))
    for component, targets in text_targets.items():
        model = encoders[component]
        probed[component] = probe_execution_order(targets, lambda model=model: _probe_text_encoder(model))

    for component, layers in probed.items():
        adapter.layers.update({layer.name: layer for layer in layers})
        adapter.chains[component] = build_chains(layers, config.res_type)
    if chains is not None:
        _check_saved_chains(adapter.chains, chains)
    for model in (unet, text_encoder, text_encoder_2):
        if model is not None:
            _freeze(model, adapter._undo)

    # Blocks are created in execution order, so `adapter.blocks` iterates in that order.
    if "unet" in probed:
        tracker = ForwardPassTracker()
        _add_blocks(adapter, {layer.name: unet_layers[layer.name][1] for layer in probed["unet"]}, tracker)
        _patch_unet(adapter, unet, {name: unet_targets[name] for name in adapter.blocks if name in unet_targets})
        _hook_layers(adapter, [name for name in adapter.blocks if name in conv_targets])
        _track_forward_passes(unet, tracker, adapter._undo)
    for component, targets in text_targets.items():  # chains per component: one tracker per model
        tracker = ForwardPassTracker()
        ordered = [layer.name for layer in probed[component]]
        _add_blocks(adapter, {name: targets[name][1] for name in ordered}, tracker)
        _hook_layers(adapter, ordered)
        _track_forward_passes(encoders[component], tracker, adapter._undo)
    unlinked = set() if config.cross_attention_shortcuts else {
        name for name, (path, target, _linear) in unet_targets.items() if reads_the_text_embedding(unet, path, target)
    }
    for component_chains in adapter.chains.values():
        for chain in component_chains:
            for position, name in enumerate(chain):
                earlier = predecessors(chain, position, config.res_type, config.pre_num)
                if name in unlinked:
                    earlier = []
                adapter.blocks[name].link([adapter.blocks[n] for n in earlier if n not in unlinked])

    if config.delta_lora:
        adapter.delta_lora = DeltaLoRA(dict(adapter.blocks), config.delta_lora_ratio, config.delta_lora_start)
        adapter._undo.append(adapter.delta_lora.remove)
    return adapter


def reads_the_text_embedding(unet: nn.Module, attention_path: str, target: str) -> bool:
    """A cross-attention `to_k` / `to_v` without `norm_cross` reads `encoder_hidden_states` itself: every such block
    sees the same tensor. An `is` shortcut there only doubles the branch (a larger step, not a shortcut), so
    `cross_attention_shortcuts=False` leaves them unlinked; and where they are linked, x_{n-k} = x_n exactly, so
    the merge's α = 1 is exact."""
    if target not in ("to_k", "to_v"):
        return False
    attention = unet.get_submodule(attention_path)
    return bool(getattr(attention, "is_cross_attention", False)) and getattr(attention, "norm_cross", None) is None


def _freeze(model: nn.Module, undo: list) -> None:
    """Freezes the model and marks it adapted; the undo restores each parameter's `requires_grad` as found."""
    found = [(p, p.requires_grad) for p in model.parameters()]
    model.requires_grad_(False)
    setattr(model, _APPLIED_MARK, True)

    def restore():
        for parameter, requires_grad in found:
            parameter.requires_grad_(requires_grad)
        delattr(model, _APPLIED_MARK)

    undo.append(restore)


def _check_saved_chains(probed: dict[str, list[list[str]]], saved: dict[str, list[list[str]]]) -> None:
    # A model not passed is named before any chain comparison: without text_encoder_2 an SDXL adapter's first
    # encoder is read as SD-1's (its last layer included), and that mismatch would hide the real cause.
    missing = sorted(set(saved) - set(probed))
    if missing:
        component = missing[0]
        what = {"text_encoder": "a text encoder", "text_encoder_2": "the second text encoder (text_encoder_2)"}.get(component, "a UNet")
        raise AdapterMismatchError(f"the adapter has {component} blocks: pass {what} to load it")
    for component in sorted(probed):
        if component not in saved:
            raise AdapterMismatchError(f"the adapter has no {component} blocks, but this model's {component} has targets")
        if sorted(map(tuple, probed[component])) != sorted(map(tuple, saved[component])):
            ours = sum(len(c) for c in probed[component])
            theirs = sum(len(c) for c in saved[component])
            raise AdapterMismatchError(
                f"the adapter's {component} chains do not fit this model ({theirs} adapter blocks in "
                f"{len(saved[component])} chains vs {ours} layers in {len(probed[component])} chains here): "
                "it was trained on a different base model"
            )

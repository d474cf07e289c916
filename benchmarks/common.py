"""Shared by `speed.py` and `convergence.py`: the methods compared, attaching / detaching them, timing and memory.

Method keys (as given to `--methods`):

    floor      the frozen base: forward + backward to the input sample, no adapter (speed only)
    peft       PEFT's LoRA through `unet.add_adapter(LoraConfig(...))`, as diffusers' own LoRA script (speed only)
    lora       our plain LoRA (res_type "none")
    is         ResLoRA input shortcut
    bs, ms     ResLoRA block / middle shortcut over all previous blocks of a chain (pre_num = -1)
    bs_mK      the same with pre_num = K (a small value, e.g. bs_m1); likewise ms_mK
    delta      Delta-LoRA on plain LoRA

Variants (suffixes, for our adapters): `_nokv` leaves the cross-attention to_k / to_v blocks
unlinked (is / ms / bs); `_anneal` anneals the shortcut terms to 0 over the end of training (is / ms / bs,
see reslora_diffusers/adapters/annealing.py), so the trained model merges exactly; a final `+` trains with LoRA+
(B at a higher learning rate than A); `_conv` adds LoCon adapters on the UNet's ResNet 3×3 convolutions (at
`AdapterSettings.conv_rank`, default the rank; the shortcut, if any, on their chains too). E.g. `lora+`, `ms+`,
`is_nokv`, `ms_anneal`, `ms_nokv_anneal+`, `lora_conv`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import platform
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from reslora_diffusers import ResLoRAAdapter, ResLoRAConfig, apply_reslora
from reslora_diffusers.training.lora_plus import lora_plus_param_groups

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
_SHORTCUT_KEY = re.compile(r"^(bs|ms)_m(\d+)$")


@dataclass(frozen=True)
class Method:
    key: str
    label: str
    kind: str  # "floor", "peft" or "ours"
    res_type: str = "none"
    pre_num: int = -1
    delta: bool = False
    lora_plus: bool = False
    anneal: bool = False
    cross_attention_shortcuts: bool = True
    conv: bool = False  # LoCon adapters on the ResNet convolutions too

    @property
    def parent(self) -> str:
        """The key without `_nokv` / `_anneal`: the method whose learning rate a variant shares."""
        return self.key.replace("_nokv", "").replace("_anneal", "").replace("_conv", "")


_VARIANTS = {"+": " + LoRA+", "_anneal": " annealed", "_nokv": " (no cross-attn k/v links)", "_conv": " + conv (LoCon)"}


def method(key: str) -> Method:
    """The method a `--methods` key names (with variant suffixes); a concise error for an unknown key."""
    base, options = key, {}
    while True:
        suffix = next((s for s in _VARIANTS if base.endswith(s)), None)
        if suffix is None:
            break
        if suffix in options:
            raise ValueError(f"method {key!r} repeats the variant {suffix!r}")
        options[suffix] = True
        base = base.removesuffix(suffix)
    found = _base_method(base, key)
    if options and found.kind != "ours":
        raise ValueError(f"method {key!r}: variants apply to our adapters only")
    if ("_anneal" in options or "_nokv" in options) and found.res_type == "none":
        raise ValueError(f"method {key!r}: _anneal / _nokv need a ResLoRA shortcut (is, bs, ms)")
    label = found.label + "".join(_VARIANTS[suffix] for suffix in sorted(options, key=key.rfind))
    return dataclasses.replace(
        found, key=key, label=label, lora_plus="+" in options, anneal="_anneal" in options,
        cross_attention_shortcuts="_nokv" not in options, conv="_conv" in options,
    )  # fmt: skip


def _base_method(key: str, full_key: str) -> Method:
    fixed = {
        "floor": Method("floor", "frozen base fwd+bwd (floor)", "floor"),
        "peft": Method("peft", "PEFT LoRA", "peft"),
        "lora": Method("lora", "LoRA (ours)", "ours"),
        "is": Method("is", "ResLoRA is", "ours", res_type="is"),
        "bs": Method("bs", "ResLoRA bs (m=all)", "ours", res_type="bs"),
        "ms": Method("ms", "ResLoRA ms (m=all)", "ours", res_type="ms"),
        "delta": Method("delta", "Delta-LoRA", "ours", delta=True),
    }
    if key in fixed:
        return fixed[key]
    match = _SHORTCUT_KEY.match(key)
    if match:
        res_type, pre_num = match.group(1), int(match.group(2))
        return Method(key, f"ResLoRA {res_type} (m={pre_num})", "ours", res_type=res_type, pre_num=pre_num)
    raise ValueError(
        f"unknown method {full_key!r}: use floor, peft, lora, is, bs, ms, bs_mK, ms_mK (K >= 1) or delta, "
        "optionally with _nokv, _anneal, _conv and a final +"
    )


def parse_methods(text: str) -> list[Method]:
    keys = [k.strip() for k in text.split(",") if k.strip()]
    if not keys:
        raise ValueError("--methods is empty")
    if len(set(keys)) != len(keys):
        raise ValueError(f"--methods lists a method twice: {text}")
    return [method(k) for k in keys]


@dataclass
class Attached:
    """A method attached to a UNet: its trainable parameters, and how to take it out again."""

    method: Method
    params: list[nn.Parameter]
    adapter: ResLoRAAdapter | None = None
    detach: Callable[[], None] = lambda: None

    def param_groups(self, lr: float, lora_plus_ratio: float) -> list[dict]:
        """Optimizer groups: LoRA+ (B at `lora_plus_ratio` × lr) where the method asks for it, else one group."""
        if self.method.lora_plus:
            return lora_plus_param_groups(self.adapter, lr, lora_plus_ratio)
        return [{"params": self.params, "lr": lr}]

    def after_optimizer_step(self, global_step: int) -> None:
        if self.adapter is not None:
            self.adapter.step(global_step)


@dataclass(frozen=True)
class AdapterSettings:
    rank: int
    lora_alpha: float
    delta_lora_ratio: float = 0.5
    delta_lora_start: int = 0
    conv_rank: int = 0  # of `_conv` methods; 0: the rank


def attach(m: Method, unet: nn.Module, settings: AdapterSettings) -> Attached:
    """Attaches method `m` to `unet` (frozen first); `detach()` leaves the UNet exactly as it was.

    Delta-LoRA moves the frozen weights in place, so its detach restores them from a CPU copy (kept
    off the accelerator, so it does not count in peak memory).
    """
    unet.requires_grad_(False)
    if m.kind == "floor":
        return Attached(m, [])
    if m.kind == "peft":
        from peft import LoraConfig

        unet.add_adapter(LoraConfig(r=settings.rank, lora_alpha=settings.lora_alpha, target_modules=list(UNET_TARGETS)))
        params = [p for p in unet.parameters() if p.requires_grad]
        # As diffusers' train_text_to_image_lora.py (cast_training_params): trainable LoRA weights in fp32.
        for p in params:
            p.data = p.data.float()
        return Attached(m, params, detach=unet.unload_lora)
    config = ResLoRAConfig(
        res_type=m.res_type,
        pre_num=m.pre_num,
        rank=settings.rank,
        lora_alpha=settings.lora_alpha,
        delta_lora_ratio=settings.delta_lora_ratio if m.delta else 0.0,
        delta_lora_start=settings.delta_lora_start,
        unet_targets=UNET_TARGETS,
        cross_attention_shortcuts=m.cross_attention_shortcuts,
        conv_rank=(settings.conv_rank or settings.rank) if m.conv else 0,
    )
    adapter = apply_reslora(unet, config)
    saved = {}
    if m.delta:
        saved = {name: layer.weight.detach().to("cpu", copy=True) for name, layer in adapter.base_layers.items()}

    def detach() -> None:
        layers = dict(adapter.base_layers)
        adapter.remove()
        with torch.no_grad():
            for name, weight in saved.items():
                layers[name].weight.copy_(weight)

    return Attached(m, adapter.trainable_parameters(), adapter=adapter, detach=detach)


# -- timing ---------------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn: Callable[[], object], iterations: int) -> float:
    """Seconds per call of `fn`, averaged over `iterations` calls, with the device synchronised around them."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(iterations):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / iterations


def release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def autocast(device: torch.device, precision: str):
    """bf16 autocast (CUDA or CPU) for precision 'bf16'; no autocast for 'fp32'."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# -- memory -----------------------------------------------------------------------------------------------
def _storage_key(tensor: torch.Tensor) -> int | tuple[str, int]:
    # The storage's identity: views of one tensor share it. A fake tensor has no data pointer; its storage
    # object stands for it (alive as long as a tensor on it is, which saved tensors are while recording).
    if isinstance(tensor, FakeTensor):
        return ("fake", tensor.untyped_storage()._cdata)
    return tensor.untyped_storage().data_ptr()


@dataclass
class SavedTensorBytes:
    """Bytes of the distinct storages autograd keeps for backward, not counting `exclude` (the model's weights).

    Deterministic, unlike process RSS: it is the activation memory a training step holds at the end of
    its forward pass, whatever the allocator does. Parameters that are saved (e.g. a frozen weight for
    the input gradient) are resident anyway and are excluded; cast copies of them (autocast) count.

    With `fake_mode` (a `FakeTensorMode` the forward runs under), the forward computes nothing: the
    bytes come from the shapes and dtypes of the fake tensors autograd saves, which are the same as a
    real run's (tests/test_benchmarks.py checks this). The weights stay real; the mode's fake copies of
    them are excluded too (views of them, e.g. a linear layer's transposed weight, are fake).
    """

    exclude: Iterable[nn.Module]
    fake_mode: FakeTensorMode | None = None
    total: int = 0
    _seen: set = field(default_factory=set)
    _excluded: set = field(default_factory=set)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        key = _storage_key(tensor)
        if key not in self._seen and key not in self._excluded:
            self._seen.add(key)
            self.total += tensor.untyped_storage().nbytes()
        return tensor

    @contextlib.contextmanager
    def recording(self):
        weights = [t for module in self.exclude for t in (*module.parameters(), *module.buffers())]
        # Held for the recording: the mode reuses these conversions only while they are alive.
        fakes = [self.fake_mode.from_tensor(t) for t in weights] if self.fake_mode is not None else []
        self._excluded = {_storage_key(t) for t in (*weights, *fakes)}
        self._seen, self.total = set(), 0
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor):
            yield self


def optimizer_state_bytes(params: list[nn.Parameter]) -> int:
    """Parameter + gradient + AdamW's two moments, at the parameters' own dtype."""
    return sum(4 * p.numel() * p.element_size() for p in params)


# -- reporting --------------------------------------------------------------------------------------------
def machine_info(device: torch.device) -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        import diffusers
        import peft

        info["diffusers"], info["peft"] = diffusers.__version__, peft.__version__
    except ImportError:
        pass
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def fmt(value, digits=2, suffix="") -> str:
    """A table cell: the number with `digits` decimals, "-" where there is none."""
    return "-" if value is None else f"{value:.{digits}f}{suffix}"


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    """A Markdown table whose columns line up in a terminal too."""
    widths = [max(len(str(x)) for x in column) for column in zip(headers, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])

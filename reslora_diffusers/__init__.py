"""ResLoRA (residual LoRA), LoRA and Delta-LoRA adapters for Stable Diffusion.

    adapter = apply_reslora(unet, ResLoRAConfig(res_type="bs", rank=8), text_encoder=None)
    ...train adapter.trainable_parameters(), calling adapter.step(global_step) after optimizer.step()...
    save_adapter(adapter, "out/"); adapter = load_adapter(fresh_unet, "out/")
"""

from importlib import import_module

# Names are imported on first use (PEP 562): a command line importing a light submodule (`adapters.config`, `cli`,
# `training.run_safety`) checks its arguments before torch and diffusers load, which takes seconds to a minute.
_EXPORTS = {
    "AdapterMismatchError": "adapters.adapter",
    "ResLoRAAdapter": "adapters.adapter",
    "apply_reslora": "adapters.adapter",
    "ResLoRABlock": "adapters.blocks",
    "ResLoRAConfig": "adapters.config",
    "load_adapter": "adapters.io",
    "save_adapter": "adapters.io",
    "ResLoRAAttnProcessor": "adapters.processor",
    "ProcessorsReplacedError": "adapters.processor",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))

"""Delta-LoRA (SPEC §3) without touching the frozen weight.

The paper moves W after every optimizer step past K by λ·s·(B_{t+1}A_{t+1} − B_t A_t). That telescopes to
W_t = W_0 + λ·s·(B_t A_t − B_K A_K), so the same model is

    W_0 x + s·B A x + λ·s·(sg(B A) − B_K A_K) x        (sg: stop-gradient)

which each block computes from the factors at step K (`ResLoRABlock.delta_lora_start`). W is never written:
the model is exact on a 16-bit base, `remove()` gives the base back bit for bit, and the trained model is
an exact rank-2r LoRA relative to W_0.

The step count that decides when K is reached comes from the optimizer itself: a global optimizer-step hook
counts the steps of any optimizer that holds the adapter's factors, so forgetting `adapter.step()` cannot
silently turn Delta-LoRA into plain LoRA. `adapter.step(global_step)` sets the count (after a resume, or
with several optimizers over the factors).
"""

from __future__ import annotations

import weakref

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from reslora_diffusers.adapters.blocks import ResLoRABlock

STEPS_KEY = "delta_lora_steps"


class DeltaLoRA:
    def __init__(self, blocks: dict[str, ResLoRABlock], ratio: float, start_step: int):
        self.blocks, self.ratio, self.start_step = blocks, ratio, start_step
        self.steps = 0  # optimizer steps of the factors so far
        # Factors (B_K, A_K) at step K, per block: empty until K is reached.
        self.start: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._factor_ids = {id(p) for block in blocks.values() for p in (block.lora_A, block.lora_B)}
        self_ref = weakref.ref(self)

        def count_step(optimizer, _args, _kwargs):
            delta = self_ref()
            if delta is not None and delta._steps_factors(optimizer):
                delta.step(delta.steps + 1)

        handle = register_optimizer_step_post_hook(count_step)
        self.remove_hook = weakref.finalize(self, handle.remove)
        if start_step == 0:
            self._snapshot_start()

    @property
    def started(self) -> bool:
        return bool(self.start)

    def _steps_factors(self, optimizer: torch.optim.Optimizer) -> bool:
        return any(id(p) in self._factor_ids for group in optimizer.param_groups for p in group["params"])

    def _set_start(self, start: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.start = start
        for name, block in self.blocks.items():
            block.delta_lora_ratio = self.ratio
            block.delta_lora_start = start[name]

    def _snapshot_start(self) -> None:
        self._set_start({name: (b.lora_B.detach().clone(), b.lora_A.detach().clone()) for name, b in self.blocks.items()})

    def step(self, global_step: int) -> None:
        """Sets the optimizer-step count; at step K the factors B_K, A_K are kept (the optimizer hook calls this)."""
        self.steps = int(global_step)
        if self.steps >= self.start_step and not self.started:
            self._snapshot_start()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {STEPS_KEY: torch.tensor(self.steps, dtype=torch.long)}
        for name, (up, down) in self.start.items():
            out[f"{name}.delta_lora_B_start"] = up
            out[f"{name}.delta_lora_A_start"] = down
        return out

    @torch.no_grad()
    def restore(self, tensors: dict[str, torch.Tensor]) -> None:
        """Loads the step count and the step-K factors (if K was reached)."""
        if STEPS_KEY in tensors:
            self.steps = int(tensors[STEPS_KEY])
        if not any(key.endswith(".delta_lora_A_start") for key in tensors):
            return
        self._set_start(
            {
                name: (
                    tensors[f"{name}.delta_lora_B_start"].to(block.lora_B).clone(),
                    tensors[f"{name}.delta_lora_A_start"].to(block.lora_A).clone(),
                )
                for name, block in self.blocks.items()
            }
        )

    def remove(self) -> None:
        self.remove_hook()
        for block in self.blocks.values():
            block.delta_lora_start = None

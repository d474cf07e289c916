"""Delta-LoRA (SPEC §3): after step K the frozen weight W moves by λ·s·(B^{t+1}A^{t+1} − B^t A^t).

W gets no gradient and no optimizer state: the move is applied in place, by `step()`, after `optimizer.step()`.
By telescoping, W_T = W_0 + λ·s·(B_T A_T − B_K A_K), so keeping the factors at step K (`start`) is enough to
rebuild W from the base model and to export the trained model as an exact rank-2r LoRA.
"""

from __future__ import annotations

import torch
from torch import nn

from .blocks import ResLoRABlock


class DeltaLoRA:
    def __init__(self, blocks: dict[str, ResLoRABlock], weights: dict[str, nn.Parameter], ratio: float, start_step: int):
        self.blocks, self.weights = blocks, weights
        self.ratio, self.start_step = ratio, start_step
        # Factors at step K, and at the last step (to form the change of the product).
        self.start: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.last: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        if start_step == 0:
            self._snapshot_start()

    @property
    def started(self) -> bool:
        return bool(self.start)

    @staticmethod
    def _factors(block: ResLoRABlock) -> tuple[torch.Tensor, torch.Tensor]:
        return block.lora_B.detach().clone(), block.lora_A.detach().clone()

    def _snapshot_start(self) -> None:
        self.start = {name: self._factors(block) for name, block in self.blocks.items()}
        self.last = {name: (up.clone(), down.clone()) for name, (up, down) in self.start.items()}

    @torch.no_grad()
    def step(self, global_step: int) -> None:
        """Call once after each optimizer step; `global_step` counts the optimizer steps done so far."""
        if global_step < self.start_step:
            return
        if not self.started:
            self._snapshot_start()
            return
        for name, block in self.blocks.items():
            last_up, last_down = self.last[name]
            change = block.scaling * (block.lora_B @ block.lora_A - last_up @ last_down)
            weight = self.weights[name]
            weight.add_((self.ratio * change).to(weight.dtype))
            self.last[name] = self._factors(block)

    def total_weight_change(self, name: str) -> torch.Tensor:
        """λ·s·(B_T A_T − B_K A_K) in fp32: what W has moved by since step K (zero before K)."""
        block = self.blocks[name]
        if not self.started:
            return torch.zeros(block.out_features, block.in_features, device=block.lora_A.device)
        start_up, start_down = self.start[name]
        return self.ratio * block.scaling * (block.lora_B @ block.lora_A - start_up @ start_down).detach()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, (up, down) in self.start.items():
            out[f"{name}.delta_lora_B_start"] = up
            out[f"{name}.delta_lora_A_start"] = down
        return out

    @torch.no_grad()
    def restore(self, tensors: dict[str, torch.Tensor], move_weights: bool) -> None:
        """Loads the step-K factors; with `move_weights`, brings fresh base weights W_0 to W_T (telescoping)."""
        if not any(key.endswith(".delta_lora_A_start") for key in tensors):
            return
        self.start = {
            name: (tensors[f"{name}.delta_lora_B_start"].to(block.lora_B), tensors[f"{name}.delta_lora_A_start"].to(block.lora_A))
            for name, block in self.blocks.items()
        }
        self.last = {name: self._factors(block) for name, block in self.blocks.items()}
        if move_weights:
            for name, weight in self.weights.items():
                weight.add_(self.total_weight_change(name).to(weight.dtype))

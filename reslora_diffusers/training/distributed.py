"""Data-parallel runs: every process stops together, replicas are checked, and the process group ends in order."""

from __future__ import annotations

import gc

import torch


def any_process_failed(accelerator, error: str | None) -> bool:
    """True on every process when any of them has an `error`, so that all stop together instead of one waiting."""
    if accelerator.num_processes == 1:
        return error is not None
    flag = torch.tensor([0.0 if error is None else 1.0], device=accelerator.device)
    return bool(accelerator.gather(flag).sum() > 0)


def adapter_replica_difference(accelerator, adapter) -> float:
    """Largest difference between this process's adapter and any other's (0.0: all replicas identical)."""
    flat = torch.cat([p.detach().float().flatten() for p in adapter.trainable_parameters()])
    gathered = accelerator.gather(flat.unsqueeze(0))
    return float((gathered - gathered[0]).abs().max())


def shut_down(accelerator) -> None:
    """Ends a run so that every process exits, in order: trackers flushed, models freed, then the process group.

    The caller drops its own references to the prepared models first. A data-parallel model holds the process
    group; destroyed at interpreter exit instead, gloo's destructor could wait forever for a peer that had
    already gone (2 of 8 CPU runs hung after writing every output).
    """
    accelerator.wait_for_everyone()
    accelerator.free_memory()  # drops the accelerator's references to the prepared (DDP-wrapped) models
    gc.collect()
    accelerator.wait_for_everyone()  # every process has freed its wrappers before any destroys the group
    accelerator.end_training()  # finishes the trackers and destroys the process group

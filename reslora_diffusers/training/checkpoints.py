"""Checkpoints of a training run: finding a complete one, writing one atomically, restoring one.

A checkpoint is `accelerator.save_state` plus this library's files. What accelerate writes: `optimizer.bin`
and `scheduler.bin` (torch pickles, read back with `weights_only`) and `random_states_<process>.pkl` (RNG
states); what the hooks below write instead of the models: the adapter as `reslora_adapter.safetensors`
(factors, input-norm windows, Delta-LoRA's step-K factors), never the frozen base, which is reloaded from
--pretrained_model_name_or_path. `reslora_checkpoint.json` is written last: a folder without it is incomplete.

Light imports only: the command line's checks use the first half before torch and diffusers load.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from reslora_diffusers.atomic import atomic_write_text, swap_in_folder
from reslora_diffusers.cli import exit_with_error, first_line
from reslora_diffusers.training.run_safety import NonFiniteError, require_finite, run_settings

CHECKPOINT_MARKER = "reslora_checkpoint.json"
CHECKPOINT_PATTERN = re.compile(r"checkpoint-(\d+)")
# What save_state writes for this script besides the marker (random_states_<process>.pkl, one per process).
CHECKPOINT_FILES = ("reslora_adapter.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl")


def complete_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint, oldest first. Folders still being written have another name."""
    if not output_dir.is_dir():
        return []
    found = []
    for child in output_dir.iterdir():
        match = CHECKPOINT_PATTERN.fullmatch(child.name)
        if match and (child / CHECKPOINT_MARKER).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def find_resume_checkpoint(args) -> Path | None:
    """The checkpoint --resume_from_checkpoint names (`latest`: the newest complete one, None if there is none)."""
    output_dir = Path(args.output_dir)
    if args.resume_from_checkpoint == "latest":
        checkpoints = complete_checkpoints(output_dir)
        return checkpoints[-1][1] if checkpoints else None
    path = Path(args.resume_from_checkpoint)
    if not path.exists():
        path = output_dir / path.name
    if not (path / CHECKPOINT_MARKER).is_file():
        exit_with_error(f"{args.resume_from_checkpoint} is not a complete checkpoint of this script (no {CHECKPOINT_MARKER})")
    return path


def incomplete_checkpoint_error(checkpoint: Path) -> str | None:
    missing = [name for name in CHECKPOINT_FILES if not (checkpoint / name).is_file()]
    if missing:
        return (f"cannot resume from {checkpoint}: it lacks {', '.join(missing)} (deleted or never written); "
                "resume from an earlier checkpoint")
    return None


def finished_at(output_dir: Path) -> int | None:
    """The step whose exports a run completed in `output_dir` (its training summary, written last), else None."""
    try:
        return json.loads((output_dir / "training_summary.json").read_text())["global_step"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save_checkpoint(accelerator, args, global_step: int, epoch: int) -> Path:
    """`accelerator.save_state` into a temporary folder, renamed to `checkpoint-<step>` once every file is there.

    A crash while writing leaves only `checkpoint-<step>.tmp`, which `latest` never picks (and the next save removes);
    an interrupt (Ctrl-C, the app's Cancel) removes it on the way out, so a cancelled run leaves complete checkpoints only.
    """
    output_dir = Path(args.output_dir)
    final = output_dir / f"checkpoint-{global_step}"
    staging = output_dir / f"checkpoint-{global_step}.tmp"
    if accelerator.is_main_process and staging.exists():
        shutil.rmtree(staging)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(staging))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            marker = {"global_step": global_step, "epoch": epoch, "num_processes": accelerator.num_processes, "settings": run_settings(args)}
            atomic_write_text(staging / CHECKPOINT_MARKER, json.dumps(marker, indent=2))
            # The same step saved before a resume is replaced only now that the new one is complete.
            swap_in_folder(staging, final)
    except BaseException:
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    if accelerator.is_main_process:
        # Older checkpoints go only after the new one is complete.
        if args.checkpoints_total_limit is not None:
            for _, folder in complete_checkpoints(output_dir)[: -args.checkpoints_total_limit]:
                shutil.rmtree(folder)
    accelerator.wait_for_everyone()
    return final


def register_adapter_hooks(accelerator, adapter, base_model: str) -> None:
    """Checkpoints hold the adapter as safetensors instead of the models (see the module's docstring)."""
    from reslora_diffusers.adapters.io import read_adapter, save_adapter  # torch and diffusers: not for the light half

    def save_model_hook(models, weights, checkpoint_dir):
        if accelerator.is_main_process:
            save_adapter(adapter, checkpoint_dir, extra={"base_model": base_model})
        weights.clear()

    def load_model_hook(models, checkpoint_dir):
        models.clear()
        try:
            metadata, tensors = read_adapter(checkpoint_dir)
            if metadata["config"] != adapter.config.to_dict():
                raise ValueError(f"it was trained with other adapter settings ({metadata['config']}); pass the same flags to resume")
            adapter.load_state_dict(tensors)
        except (ValueError, FileNotFoundError) as error:  # AdapterMismatchError is a ValueError
            exit_with_error(f"cannot resume from {checkpoint_dir}: {error}")

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)


def restore_checkpoint(accelerator, adapter, checkpoint: Path) -> int:
    """Loads `checkpoint` into the prepared objects and returns its global step; any problem is one line."""
    marker = json.loads((checkpoint / CHECKPOINT_MARKER).read_text())
    saved_processes = marker.get("num_processes", accelerator.num_processes)
    if saved_processes != accelerator.num_processes:
        # accelerate steps the scheduler once per process and splits each batch over the processes: another
        # count would restore the learning rate at another point of its schedule and change the data order.
        exit_with_error(f"cannot resume from {checkpoint}: it was trained on {saved_processes} process(es), this run has "
                        f"{accelerator.num_processes}; launch it with --num_processes {saved_processes}")
    accelerator.print(f"Resuming from checkpoint {checkpoint}")
    try:
        accelerator.load_state(str(checkpoint))
    except SystemExit:
        raise
    except Exception as error:  # a truncated optimizer.bin / scheduler.bin / RNG state: torch raises many types
        exit_with_error(f"cannot resume from {checkpoint}: {first_line(error)} (a file of it is damaged); "
                        "resume from an earlier checkpoint")
    try:  # a checkpoint is checked when written; one from an older version of this script may not have been
        require_finite(adapter.state_dict(), f"the adapter in {checkpoint}")
    except NonFiniteError as error:
        exit_with_error(f"cannot resume: {error}; resume from an earlier checkpoint")
    return marker["global_step"]

"""The end of a training run (main process): the native adapter, the merged exports, the last validation grid,
`training_summary.json` (written last: a run whose summary exists finished), the model card and where it all went."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from reslora_diffusers.adapters.io import WEIGHTS_NAME, save_adapter
from reslora_diffusers.atomic import atomic_write_text
from reslora_diffusers.formats import kohya_model_configs, save_diffusers_lora, save_kohya_lora
from reslora_diffusers.formats.metadata import export_metadata
from reslora_diffusers.merge import merge_adapter
from reslora_diffusers.training.model_card import model_card
from reslora_diffusers.training.run_safety import factor_tensors, require_finite
from reslora_diffusers.training.validation import log_validation


@dataclass
class RunFacts:
    """How the run went, as the summary and the model card report it."""

    global_step: int
    start_step: int
    resumed_from: Path | None
    last_checkpoint: Path | None
    train_seconds: float
    total_seconds: float  # including set-up, validation and checkpoints
    total_batch_size: int
    base_dtype: str
    prediction_type: str
    replica_difference: float
    sdxl: bool

    @property
    def steps_this_run(self) -> int:
        return self.global_step - self.start_step

    @property
    def images_per_second(self) -> float:
        return round(self.steps_this_run * self.total_batch_size / max(self.train_seconds, 1e-9), 2)


def export_merged(adapter, args, calibration) -> tuple[str, Path, Path]:
    """Merges the adapter into plain LoRA factors and writes the diffusers and kohya files (NonFiniteError: none)."""
    result = merge_adapter(adapter, method=args.merge_method, calibration=calibration)
    require_finite(factor_tensors(result.factors), f"the {result.method} merge")
    output_dir = Path(args.output_dir)
    metadata = export_metadata(adapter.config, result.method, base_model=args.pretrained_model_name_or_path)
    diffusers_file = save_diffusers_lora(result.factors, output_dir, metadata=metadata)
    name = re.sub(r"[^\w.-]+", "_", output_dir.resolve().name) or "reslora"
    kohya_file = save_kohya_lora(
        result.factors, output_dir / "kohya" / f"{name}.safetensors", metadata, **kohya_model_configs(adapter)
    )
    return result.method, Path(diffusers_file), Path(kohya_file)


def write_outputs(accelerator, args, adapter, validation, records: list[dict], facts: RunFacts) -> None:
    """Everything a finished run leaves in --output_dir; NonFiniteError when the merge is not finite (nothing merged
    is written then; the native adapter is)."""
    output_dir = Path(args.output_dir)
    final_loss = next((r["loss"] for r in reversed(records) if "loss" in r), None)
    final_validation = next((r for r in reversed(records) if "validation_loss" in r), {})
    save_adapter(adapter, output_dir, extra={"base_model": args.pretrained_model_name_or_path, "global_step": facts.global_step})
    if validation.draws_grids:  # the weights are the exported ones by now (schedule-free: its averaged weights)
        validation.grids.append(log_validation(validation.pipeline, accelerator, args, facts.global_step))
    merge, diffusers_file, kohya_file = export_merged(adapter, args, validation.calibration)

    summary = {
        "global_step": facts.global_step,
        "steps_this_run": facts.steps_this_run,
        "resumed_from": str(facts.resumed_from) if facts.resumed_from else None,
        "train_seconds": round(facts.train_seconds, 1),
        "images_per_second": facts.images_per_second,
        "final_loss": final_loss,
        "num_processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "base_dtype": facts.base_dtype,
        "adapter_dtypes": sorted({str(p.dtype) for p in adapter.trainable_parameters()}),
        "replica_max_difference": facts.replica_difference,
        "merge": merge,
    }
    if final_validation:
        summary.update(
            validation_loss=final_validation["validation_loss"],
            validation_loss_merged=final_validation["validation_loss_merged"],
            validation_loss_step=final_validation["step"],
            validation_loss_seconds=round(validation.loss_seconds, 1),
            validation_loss_share_of_training=round(validation.loss_seconds / max(facts.total_seconds, 1e-9), 4),
        )
    atomic_write_text(output_dir / "training_summary.json", json.dumps(summary, indent=2))
    card = model_card(
        output_dir=output_dir,
        base_model=args.pretrained_model_name_or_path,
        dataset=args.dataset_name or args.train_data_dir,
        config=adapter.config,
        merge_method=args.merge_method,
        settings={
            "resolution": args.resolution,
            "batch size (total)": facts.total_batch_size,
            "optimizer steps": facts.global_step,
            "learning rate / schedule / warm-up": f"{args.learning_rate:g} / {args.lr_scheduler} / {args.lr_warmup_steps}",
            "prediction type": facts.prediction_type,
            "snr_gamma": args.snr_gamma,
            "mixed precision": accelerator.mixed_precision,
            "processes": accelerator.num_processes,
            "seed": args.seed,
            **({"masked loss": "alpha channel" if args.alpha_mask else f"masks from `{args.mask_data_dir}`"} if args.masked_loss else {}),
            **({"regularisation images / prior_loss_weight": f"`{args.reg_data_dir}` / {args.prior_loss_weight:g}"}
               if args.reg_data_dir else {}),
        },
        results={
            "final loss": f"{final_loss:.4f}" if final_loss is not None else "n/a",
            "training time": f"{facts.train_seconds:.0f} s ({facts.images_per_second} images/s)",
            "merge": merge,
            **({"validation loss (training-time / merged)": f"{final_validation['validation_loss']:.5f} / "
                f"{final_validation['validation_loss_merged']:.5f} at step {final_validation['step']}"} if final_validation else {}),
        },
        kohya_file=kohya_file,
        validation_grids=validation.grids,
        validation_prompts=list(args.validation_prompt),
        trained_text_encoder=args.train_text_encoder,
        resolved_config=args.resolved_config,
        sdxl=facts.sdxl,
        repo_id=(args.hub_model_id or output_dir.resolve().name) if args.push_to_hub else None,
    )
    atomic_write_text(output_dir / "README.md", card)
    if args.push_to_hub:
        push_to_hub(args, output_dir)

    # A final summary of where everything went.
    where = [
        ("native adapter", output_dir / WEIGHTS_NAME),
        ("diffusers LoRA", diffusers_file),
        ("kohya / A1111 / ComfyUI LoRA", kohya_file),
        ("model card", output_dir / "README.md"),
        ("validation grids", output_dir / "validation" if validation.grids else "off"),
        ("metrics", output_dir / "metrics.jsonl"),
        ("tensorboard", f"tensorboard --logdir {output_dir / args.logging_dir}" if args.report_to != "none" else "off"),
        ("last checkpoint", facts.last_checkpoint),
    ]
    loss_text = f"final loss {final_loss:.4f}" if final_loss is not None else "no step run"
    accelerator.print(
        f"\nTrained {adapter} for {facts.steps_this_run} steps in {facts.train_seconds:.0f} s "
        f"({facts.images_per_second} images/s, {loss_text}, merge: {merge})."
    )
    for label, value in where:
        accelerator.print(f"  {label:<30} {value}")


def push_to_hub(args, output_dir: Path) -> None:
    import logging

    from huggingface_hub import create_repo, upload_folder

    try:
        repo_id = create_repo(args.hub_model_id or output_dir.resolve().name, exist_ok=True, token=args.hub_token).repo_id
        upload_folder(repo_id=repo_id, folder_path=output_dir, ignore_patterns=["checkpoint-*", "checkpoint-*/**"], token=args.hub_token)
    except Exception as error:  # the upload is the last step: the files are all on disk whatever happens here
        logging.getLogger(__name__).warning(f"upload to the Hub failed: {error}")

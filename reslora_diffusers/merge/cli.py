"""`python -m reslora_diffusers.merge` / `reslora-merge`: base + native adapter → a file other SD tools load.

    python -m reslora_diffusers.merge --base assets/tiny-emoji-sd --adapter outputs/reslora \
        --format kohya --merge_method lstsq --output outputs/reslora_kohya.safetensors

Every merge prints a fidelity table (merged vs unmerged UNet / text-encoder output, and image PSNR for the
same seed) for each way of estimating α, and writes it as JSON beside the output.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from reslora_diffusers.adapters.io import load_adapter
from reslora_diffusers.atomic import atomic_write_folder, atomic_write_text
from reslora_diffusers.cli import OneLineErrorParser, add_threads_argument, default_threads, set_threads
from reslora_diffusers.formats.diffusers_lora import DIFFUSERS_LORA_WEIGHT_NAME
from reslora_diffusers.formats.metadata import export_metadata
from reslora_diffusers.merge import (
    MERGE_METHODS,
    alpha_statistics,
    baked_weights,
    collect_shortcut_statistics,
    image_psnr,
    is_exact,
    merge_adapter,
    merge_into_base,
    relative_error,
    truncate_all,
)
from reslora_diffusers.merge.calibration import MAX_FITTED_FEATURES
from reslora_diffusers.pipeline_io import UserInputError, load_pipeline, quiet_libraries
from reslora_diffusers.training.run_folder import nested_output_error
from reslora_diffusers.training.run_safety import WRITE_ERRORS, factor_tensors, require_finite

FORMATS = ("diffusers-lora", "kohya", "diffusers", "single-file")
DEFAULT_PROMPTS = ("fish", "french fries", "red heart", "smiling face with sunglasses", "flag: japan", "cat face")


def parse_args(argv=None) -> argparse.Namespace:
    parser = OneLineErrorParser(
        prog="python -m reslora_diffusers.merge",
        description="Merge a ResLoRA / LoRA / Delta-LoRA adapter and export it for diffusers, kohya, A1111, ComfyUI.")
    parser.add_argument("--base", required=True, help="Base model: a diffusers folder or a single-file .safetensors checkpoint.")
    parser.add_argument("--base_config", default=None, help="Diffusers folder describing a single-file base (its config).")
    parser.add_argument("--adapter", required=True, help="Folder written by save_adapter / the training script.")
    parser.add_argument("--format", required=True, nargs="+", choices=FORMATS,
                        help="What to write (see README); several formats are written from one and the same merge, "
                        f"into the --output folder as {', '.join(f'{n}' for n in MULTI_FORMAT_NAMES.values())}.")
    parser.add_argument("--merge_method", default="calibrated", choices=MERGE_METHODS,
                        help="How is / ms shortcuts are estimated (calibrated: as the training script's exports).")
    parser.add_argument("--output", required=True,
                        help="Output file (kohya, single-file) or folder (diffusers-lora: the folder gets its one file; "
                        "diffusers: the whole folder); with several formats, the folder they go into.")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing output (never the adapter or the base).")
    parser.add_argument("--export_rank", type=int, default=None, help="Re-compress every merged LoRA to this rank (truncated SVD).")
    parser.add_argument("--half", action="store_true", help="single-file / diffusers: store weights in fp16.")
    parser.add_argument("--calibration_prompts", nargs="+", default=list(DEFAULT_PROMPTS), help="Prompts for lstsq and the report.")
    parser.add_argument("--num_inference_steps", type=int, default=20, help="Denoising steps of the report's images.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the report's images.")
    parser.add_argument("--skip_images", action="store_true", help="Leave image PSNR out of the report (faster on big models).")
    parser.add_argument("--report", default=None, help="Where the JSON report goes (default: beside the output).")
    add_threads_argument(parser, default=default_threads())
    args = parser.parse_args(argv)
    if args.export_rank is not None and args.export_rank <= 0:
        parser.error(f"--export_rank must be > 0, got {args.export_rank}")
    if args.num_inference_steps <= 0 or args.num_inference_steps > 1000:
        parser.error("--num_inference_steps must be in 1..1000")
    args.format = list(dict.fromkeys(args.format))  # each format once, in the order given
    args.outputs = output_paths(args.format, Path(args.output))
    if len(args.format) == 1 and args.format[0] in ("kohya", "single-file") and Path(args.output).suffix != ".safetensors":
        parser.error(f"--format {args.format[0]} writes one .safetensors file; --output must end in .safetensors")
    if len(args.format) > 1 and Path(args.output).is_file():
        parser.error(f"several formats go into one folder, but --output {args.output} is a file")
    for output in args.outputs.values():
        # A merge reads the adapter and the base until it writes: an output that replaces either would destroy them.
        error = nested_output_error(output, {"--adapter": args.adapter, "--base": args.base, "--base_config": args.base_config})
        if error:
            parser.error(error)
        if output.exists() and not args.overwrite:
            parser.error(f"{output} exists; pass --overwrite to replace it")
    if args.report is not None:
        report = Path(args.report)
        if report.is_dir():
            parser.error(f"--report {args.report} is a folder; name the JSON file to write")
        error = nested_output_error(report, {"--adapter": args.adapter, "--base": args.base})
        if error:
            parser.error(error)
    return args


# With several formats, each is written into the --output folder under these names.
MULTI_FORMAT_NAMES = {
    "diffusers-lora": DIFFUSERS_LORA_WEIGHT_NAME,
    "kohya": "kohya_lora.safetensors",
    "single-file": "merged_model.safetensors",
    "diffusers": "merged_diffusers",
}


def output_paths(formats: list[str], output: Path) -> dict[str, Path]:
    """Where each format goes: `output` itself for one format (a diffusers-lora folder gets its one file), else
    `output/<name>` (MULTI_FORMAT_NAMES)."""
    if len(formats) == 1:
        only = formats[0]
        return {only: output / DIFFUSERS_LORA_WEIGHT_NAME if only == "diffusers-lora" else output}
    return {name: output / MULTI_FORMAT_NAMES[name] for name in formats}


class Progress:
    """One line per phase of a merge, with the seconds since the start: a big merge takes minutes."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self, text: str) -> None:
        print(f"[{time.perf_counter() - self.start:7.1f} s] {text}", flush=True)


class _UNetCallRecorder:
    """Keeps the UNet inputs of a generation run, to compare merged and unmerged outputs on real inputs."""

    def __init__(self, unet):
        self.calls = []
        self.handle = unet.register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, _module, args, kwargs):
        self.calls.append((tuple(a.detach().clone() if torch.is_tensor(a) else a for a in args), dict(kwargs)))

    def close(self):
        self.handle.remove()


def _generate(pipe, prompts, args):
    generator = torch.Generator().manual_seed(args.seed)
    return pipe(list(prompts), num_inference_steps=args.num_inference_steps, generator=generator).images


TEXT_ENCODERS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}  # SDXL has both


def _outputs(pipe, unet_calls, token_ids: dict):
    with torch.no_grad():
        unet = [pipe.unet(*a, **k)[0] for a, k in unet_calls]
        text = {name: getattr(pipe, name)(ids).last_hidden_state for name, ids in token_ids.items()}
    return unet, text


def fidelity_report(pipe, adapter, args, progress=lambda text: None) -> tuple[dict, dict]:
    """Merges with every applicable method, measures each one, and returns (report, the chosen MergeResult)."""
    prompts = args.calibration_prompts
    token_ids = {}
    for encoder, tokenizer in TEXT_ENCODERS.items():
        if any(name.startswith(encoder + ".") for name in adapter.blocks):
            tokenize = getattr(pipe, tokenizer)
            token_ids[encoder] = tokenize(list(prompts), padding="max_length", truncation=True, return_tensors="pt").input_ids

    progress("unmerged reference: UNet and text-encoder outputs" + ("" if args.skip_images else ", images"))
    recorder = _UNetCallRecorder(pipe.unet)
    try:
        reference_images = _generate(pipe, prompts[:2], args) if not args.skip_images else None
        if args.skip_images:
            pipe(list(prompts[:2]), num_inference_steps=2, generator=torch.Generator().manual_seed(args.seed), output_type="latent")
    finally:
        recorder.close()
    unet_calls = recorder.calls[:: max(1, len(recorder.calls) // 8)]  # a handful of timesteps is enough
    reference_unet, reference_text = _outputs(pipe, unet_calls, token_ids)

    def calibration():
        pipe(list(prompts), num_inference_steps=min(8, args.num_inference_steps), generator=torch.Generator().manual_seed(args.seed + 1), output_type="latent")

    methods = ["exact"] if is_exact(adapter) else list(MERGE_METHODS)
    if methods != ["exact"]:
        progress("shortcut statistics on the calibration prompts")
    stats = None if methods == ["exact"] else collect_shortcut_statistics(adapter, calibration)
    report = {"res_type": adapter.config.res_type, "pre_num": adapter.config.pre_num, "chosen": None, "methods": {}}
    chosen = None
    for number, method in enumerate(methods, 1):
        progress(f"merging and measuring: {method} ({number}/{len(methods)})")
        result = merge_adapter(adapter, args.merge_method if method == "exact" else method, calibration)
        entry = {"alpha": alpha_statistics(result.alphas), **result.report}
        if stats is not None and method != "calibrated":  # the α objective; calibrated factors are not α-based
            entry["calibration_objective"] = sum(stats.objective(result.alphas).values())
        with baked_weights(adapter, result.factors):
            merged_unet, merged_text = _outputs(pipe, unet_calls, token_ids)
            merged_images = _generate(pipe, prompts[:2], args) if not args.skip_images else None
        entry["unet_relative_error"] = max(relative_error(m, r) for m, r in zip(merged_unet, reference_unet))
        for encoder, reference in reference_text.items():
            entry[f"{encoder}_relative_error"] = relative_error(merged_text[encoder], reference)
        if reference_images is not None:
            entry["image_psnr_db"] = min(image_psnr(m, r) for m, r in zip(merged_images, reference_images))
        report["methods"][method] = entry
        if method in ("exact", args.merge_method):
            chosen = result
            report["chosen"] = method
    return report, chosen


def print_report(report: dict) -> None:
    print(f"merge fidelity ({report['res_type']}, pre_num {report['pre_num']}; merged vs unmerged, same inputs and seed)")
    print(f"{'method':<11} {'alpha mean [min, max]':<26} {'UNet rel.err':>12} {'text rel.err':>12} {'image PSNR':>11}")
    for method, entry in report["methods"].items():
        alpha = entry["alpha"]
        alpha_text = f"{alpha['mean']:.3f} [{alpha['min']:.3f}, {alpha['max']:.3f}]" if alpha["count"] else "-"
        text_errors = [entry[f"{e}_relative_error"] for e in TEXT_ENCODERS if f"{e}_relative_error" in entry]
        text_error = max(text_errors) if text_errors else None  # SDXL: the worse of its two encoders
        psnr = entry.get("image_psnr_db")
        mark = " *" if method == report["chosen"] else ""
        print(
            f"{method:<11} {alpha_text:<26} {entry['unet_relative_error']:>12.2e} "
            f"{'-' if text_error is None else f'{text_error:.2e}':>12} "
            f"{'-' if psnr is None else ('inf' if math.isinf(psnr) else f'{psnr:.1f} dB'):>11}{mark}"
        )
    kept = report["methods"].get("calibrated", {}).get("calibrated_blocks_merged_by_lstsq_joint")
    if kept:
        print(f"calibrated: {kept} blocks wider than {MAX_FITTED_FEATURES} input features (convs) keep the lstsq_joint merge")


# LoRA files first: the merged formats bake the factors into the base, once, for all of them.
WRITE_ORDER = ("diffusers-lora", "kohya", "single-file", "diffusers")


def write_outputs(pipe, adapter, factors, args, metadata: dict[str, str], progress) -> dict[str, Path]:
    """Writes every requested format from the same merged factors; returns where each went."""
    from reslora_diffusers.formats import kohya_model_configs, save_diffusers_lora, save_kohya_lora, save_single_file_checkpoint

    written, baked = {}, False
    for name in sorted(args.format, key=WRITE_ORDER.index):
        output = args.outputs[name]
        progress(f"writing {name} to {output}")
        if name == "kohya":
            written[name] = save_kohya_lora(factors, output, metadata, **kohya_model_configs(pipe))
        elif name == "diffusers-lora":  # only its own file: the folder may hold a training run or other files
            written[name] = save_diffusers_lora(factors, output.parent, metadata)
        else:
            if not baked:
                merge_into_base(adapter, factors)
                baked = True
                if args.half:
                    pipe.to(torch.float16)
            if name == "single-file":
                written[name] = save_single_file_checkpoint(pipe, output, half=args.half)
            else:
                written[name] = atomic_write_folder(output, lambda folder: pipe.save_pretrained(folder, safe_serialization=True))
    return written


def run(args: argparse.Namespace) -> dict:
    progress = Progress()
    progress(f"loading the base {args.base}")
    pipe = load_pipeline(args.base, args.base_config)
    pipe.set_progress_bar_config(disable=True)
    adapter = load_adapter(
        pipe.unet, args.adapter, text_encoder=pipe.text_encoder, text_encoder_2=getattr(pipe, "text_encoder_2", None)
    )
    progress(f"loaded {adapter} from {args.adapter}")
    report, result = fidelity_report(pipe, adapter, args, progress)
    factors = result.factors
    if args.export_rank is not None:
        progress(f"re-compressing to rank {args.export_rank}")
        merged_rank = max(f.down.shape[0] for f in factors.values())
        factors, energies = truncate_all(factors, args.export_rank)
        values = list(energies.values())
        report["export_rank"] = {
            "requested": args.export_rank,
            "rank": max(f.down.shape[0] for f in factors.values()),  # the largest rank written
            "merged_rank": merged_rank,
            "energy_kept_min": min(values),
            "energy_kept_mean": sum(values) / len(values),
        }
    # A non-finite merge is never written (an adapter trained into NaN, or an α estimate that blew up).
    require_finite(factor_tensors(factors), f"the {report['chosen']} merge of {args.adapter}")
    written = write_outputs(pipe, adapter, factors, args, export_metadata(adapter.config, report["chosen"]), progress)
    report["outputs"] = {name: str(path) for name, path in written.items()}
    report["format"] = args.format
    output = Path(args.output)
    folder = output if len(args.format) > 1 else output.parent  # several formats: inside their folder
    report_path = Path(args.report) if args.report else folder / f"{output.name}.merge_report.json"
    atomic_write_text(report_path, json.dumps(report, indent=2))
    print_report(report)
    if "export_rank" in report:
        e = report["export_rank"]
        if e["rank"] < e["merged_rank"]:
            print(f"re-compressed to rank {e['rank']}: energy kept min {e['energy_kept_min']:.4f}, mean {e['energy_kept_mean']:.4f}")
        else:
            print(f"--export_rank {e['requested']} is not below the merged rank ({e['merged_rank']}): written at rank {e['rank']}, unchanged")
    for name, path in written.items():
        print(f"wrote {name} to {path}")
    print(f"report: {report_path}")
    return report


def main(argv=None) -> int:
    args = parse_args(argv)
    set_threads(args.threads)
    quiet_libraries()
    try:
        run(args)
    except (UserInputError, ValueError, FileNotFoundError) as error:  # NonFiniteError is a ValueError
        sys.stderr.write(f"error: {error}\n")
        return 2
    except OSError as error:  # a full disk, a read-only folder: nothing half-written is left (atomic writes)
        if error.errno not in WRITE_ERRORS:
            raise
        sys.stderr.write(f"error: cannot write {error.filename or 'the output'}: {error.strerror}; nothing was replaced\n")
        return 1
    return 0

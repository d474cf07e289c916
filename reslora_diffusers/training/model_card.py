"""The model card (`README.md`) that `train_text_to_image.py` writes beside a trained adapter."""

from __future__ import annotations

import json
import os
from pathlib import Path

from reslora_diffusers.adapters.config import ResLoRAConfig

METHOD_NAMES = {
    "none": "LoRA",
    "is": "ResLoRA, input shortcut (`is`)",
    "bs": "ResLoRA, block shortcut (`bs`)",
    "ms": "ResLoRA, middle shortcut (`ms`)",
}


def method_name(config: ResLoRAConfig) -> str:
    if config.delta_lora:
        return f"Delta-LoRA (λ = {config.delta_lora_ratio:g}, K = {config.delta_lora_start})"
    return METHOD_NAMES[config.res_type]


def _relative(path: Path, root: Path) -> str:
    return Path(os.path.relpath(path, root)).as_posix()


def _reference(name: str, output_dir: Path) -> str:
    """A local path as seen from the card's folder (a card moves with its folder; an absolute path would not), else a Hub id."""
    return _relative(Path(name), output_dir) if Path(name).exists() else name


def _shown_config(resolved_config: dict, output_dir: Path) -> dict:
    """The flags with absolute local paths made relative to the card's folder, like the card's other paths."""
    return {
        name: _reference(value, output_dir) if isinstance(value, str) and Path(value).is_absolute() else value
        for name, value in resolved_config.items()
    }


def model_card(
    *,
    output_dir: Path,
    base_model: str,
    dataset: str,
    config: ResLoRAConfig,
    merge_method: str,
    settings: dict[str, object],
    results: dict[str, object],
    kohya_file: Path,
    validation_grids: list[Path],
    validation_prompts: list[str],
    trained_text_encoder: bool,
    resolved_config: dict | None = None,
    sdxl: bool = False,
    repo_id: str | None = None,
) -> str:
    """The card's Markdown: what was trained on what, with which settings, and how to load each file.

    Local paths (base model, data) are written relative to `output_dir`; the adapter is "." (the card's own
    folder) or `repo_id` when it is uploaded to the Hub.
    """
    base_model = _reference(base_model, output_dir)
    dataset = _reference(dataset, output_dir)
    adapter_location = repo_id or "."
    kohya = _relative(kohya_file, output_dir)
    lora_name = kohya_file.stem
    merge_note = (
        "exactly (no approximation)"
        if results.get("merge") == "exact"
        else f"approximately: a merged weight cannot see the shortcut's earlier input x_(n-1), which is estimated as α·x_n "
        f"with the `{merge_method}` method (ResLoRA, arXiv 2402.18039)"
    )
    text_encoder_note = "UNet and CLIP text encoder" if trained_text_encoder else "UNet"
    if sdxl and trained_text_encoder:
        text_encoder_note = "UNet and both CLIP text encoders"
    pipeline_class = "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline"
    encoders = ", text_encoder=pipe.text_encoder, text_encoder_2=pipe.text_encoder_2)" if sdxl else ", text_encoder=pipe.text_encoder)"
    lines = [
        "---",
        f"base_model: {base_model}",
        "library_name: diffusers",
        "tags:",
        "- stable-diffusion",
        "- text-to-image",
        "- lora",
        "- reslora",
        "- diffusers",
        "---",
        "",
        f"# {method_name(config)} adapter for `{base_model}`",
        "",
        f"Trained with `train_text_to_image.py` (reslora_diffusers) on `{dataset}`; adapters on the attention "
        f"projections of the {text_encoder_note}"
        + (" and on the UNet's ResNet convolutions (LoCon)." if config.conv_rank else "."),
        "",
        "## Settings",
        "",
        "| setting | value |",
        "|---|---|",
        f"| method | {method_name(config)} |",
        f"| res_type / pre_num | `{config.res_type}` / {config.pre_num} |",
        f"| rank / lora_alpha / dropout | {config.rank} / {config.lora_alpha:g} / {config.lora_dropout:g} |",
    ]
    if config.conv_rank:
        conv_alpha = config.conv_alpha if config.conv_alpha is not None else config.conv_rank
        lines.append(f"| conv adapters (LoCon): conv_rank / conv_alpha / targets | {config.conv_rank} / {conv_alpha:g} / "
                     f"{', '.join(config.conv_targets)} |")  # fmt: skip
    lines += [f"| {key} | {value} |" for key, value in settings.items()]
    if resolved_config is not None:
        lines += [
            "",
            "<details><summary>Every flag of this run (<code>resolved_config.json</code>; rerun with "
            "<code>--config resolved_config.json</code>; local paths shown relative to this folder)</summary>",
            "",
            "```json",
            json.dumps(_shown_config(resolved_config, output_dir), indent=2),
            "```",
            "",
            "</details>",
        ]
    lines += ["", "## Results", "", "| | |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in results.items()]
    if validation_grids:
        lines += ["", "## Validation images", "", "Rows: " + ", ".join(f"“{p}”" for p in validation_prompts) + "; same seeds in every grid.", ""]
        for grid in validation_grids:
            lines.append(f"![{grid.stem}]({_relative(grid, output_dir)})")
    lines += [
        "",
        "## Files",
        "",
        "| file | what | for |",
        "|---|---|---|",
        "| `reslora_adapter.safetensors` + `reslora_config.json` | the native adapter (unmerged, with its chains) | `reslora_diffusers.load_adapter`, further training, `python -m reslora_diffusers.merge` |",
        "| `pytorch_lora_weights.safetensors` | merged plain LoRA, diffusers / PEFT keys | `pipe.load_lora_weights` |",
        f"| `{kohya}` | merged plain LoRA, kohya keys; one alpha, each module's own scale folded into its lora_up | AUTOMATIC1111, ComfyUI, kohya sd-scripts |",
        "| `validation/` | validation image grids | |",
        "| `metrics.jsonl`, `logs/` | loss, learning rate and speed per step; TensorBoard logs | `tensorboard --logdir logs` |",
        "",
        f"The merged files were made {merge_note}; the exact model is the native adapter. "
        "`python -m reslora_diffusers.merge --help` measures the fidelity of every merge method and exports a merged "
        "full model (diffusers folder or single-file checkpoint).",
        "",
        "## How to use",
        "",
        "diffusers (merged LoRA):",
        "",
        "```python",
        f"from diffusers import {pipeline_class}",
        "",
        f'pipe = {pipeline_class}.from_pretrained("{base_model}")',
        f'pipe.load_lora_weights("{adapter_location}")' + ("" if repo_id else "  # this folder"),
        f'image = pipe("{validation_prompts[0] if validation_prompts else "a photo"}").images[0]',
        "```",
        "",
        "diffusers (native adapter, exactly as trained):",
        "",
        "```python",
        f"from diffusers import {pipeline_class}",
        "from reslora_diffusers import load_adapter",
        "",
        f'pipe = {pipeline_class}.from_pretrained("{base_model}")',
        f'adapter = load_adapter(pipe.unet, "{adapter_location}"'
        + (encoders if trained_text_encoder else ")")
        + ("" if repo_id else "  # this folder"),
        f'image = pipe("{validation_prompts[0] if validation_prompts else "a photo"}").images[0]',
        "```",
        "",
        f"AUTOMATIC1111: copy `{kohya}` into `models/Lora/` and write `<lora:{lora_name}:1>` in the prompt.",
        "",
        f"ComfyUI: copy `{kohya}` into `models/loras/` and load it with a *LoraLoader* node (strength 1.0) "
        "between the checkpoint loader and the sampler.",
        "",
    ]
    return "\n".join(lines)

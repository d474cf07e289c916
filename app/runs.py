"""Run folders under the adapter roots: finding them, refusing paths outside the roots, reading what training wrote.

A run folder holds a native adapter (`reslora_config.json` + `reslora_adapter.safetensors`) and, when it came from
`train_text_to_image.py` or `scripts/train_demo_adapters.py`, its `metrics.jsonl`, `training_summary.json` and
one or more `*.merge_report.json` fidelity reports (the format of `reslora_diffusers.merge.cli`).
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from paths import resolve_inside, walk_inside

from reslora_diffusers.adapters.io import CONFIG_NAME
from reslora_diffusers.pipeline_io import UserInputError

logger = logging.getLogger(__name__)

METRICS_NAME = "metrics.jsonl"
SUMMARY_NAME = "training_summary.json"
TRAINING_ARGS_NAME = "training_args.json"
REPORT_SUFFIX = ".merge_report.json"
METHOD_NAMES = {"none": "LoRA", "is": "ResLoRA is", "bs": "ResLoRA bs", "ms": "ResLoRA ms"}


@dataclass(frozen=True)
class Run:
    """One run folder: `label` is what the UI shows (the root's name, then the path inside it)."""

    path: Path
    label: str
    config: dict[str, Any] | None  # the "config" of reslora_config.json; None when the folder has no adapter

    @property
    def has_adapter(self) -> bool:
        return self.config is not None

    @property
    def method(self) -> str:
        if self.config is None:
            return "no adapter yet"
        if self.config.get("delta_lora_ratio", 0) > 0:
            return "Delta-LoRA"
        return METHOD_NAMES.get(self.config.get("res_type"), str(self.config.get("res_type")))

    @property
    def choice_label(self) -> str:
        if self.config is None:
            return f"{self.label} ({self.method})"
        return f"{self.label} ({self.method}, rank {self.config.get('rank')})"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        logger.warning("skipping %s: %s", path, error)
        return None


def _adapter_config(folder: Path) -> dict[str, Any] | None:
    metadata = _read_json(folder / CONFIG_NAME) if (folder / CONFIG_NAME).is_file() else None
    if isinstance(metadata, dict) and isinstance(metadata.get("config"), dict):
        return metadata["config"]
    return None


def discover_runs(roots: list[Path], adapters_only: bool = False) -> list[Run]:
    """Every folder under `roots` with an adapter or a `metrics.jsonl`, sorted by label.

    Hidden folders (half-written temp folders) and `checkpoint-*` folders are not listed.
    """
    runs: dict[Path, Run] = {}
    for root in roots:
        for folder, _subdirs, files in walk_inside(root):
            if CONFIG_NAME not in files and METRICS_NAME not in files:
                continue
            run = Run(folder, label_of(folder, [Path(root).resolve()]), _adapter_config(folder))
            if run.has_adapter or not adapters_only:
                runs.setdefault(folder, run)
    return sorted(runs.values(), key=lambda run: run.label)


def label_of(folder: Path, roots: list[Path]) -> str:
    """`<root name>/<path inside the root>` for the first root holding `folder`, else the full path."""
    for root in roots:
        root = Path(root).resolve()
        if folder.is_relative_to(root):
            inside = folder.relative_to(root).as_posix()
            return root.name if inside == "." else f"{root.name}/{inside}"
    return str(folder)


def run_at(path: str | os.PathLike, roots: list[Path]) -> Run:
    """The run folder at `path`, which must lie inside one of `roots`."""
    folder = resolve_inside(path, roots, "run")
    if not folder.is_dir():
        raise UserInputError(f"{path} is not a folder")
    return Run(folder, label_of(folder, roots), _adapter_config(folder))


def read_metrics(folder: Path) -> list[dict[str, Any]]:
    """The `metrics.jsonl` records that have a numeric step and loss; a line being written or broken is skipped."""
    path = folder / METRICS_NAME
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict):
            continue
        step, loss = record.get("step"), record.get("loss")
        if isinstance(step, (int, float)) and isinstance(loss, (int, float)) and math.isfinite(loss):
            records.append(record)
    return records


def smooth(values: list[float], weight: float) -> list[float]:
    """Exponential moving average with TensorBoard's debiasing, so the first points are not pulled to zero."""
    out, average = [], 0.0
    for count, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight**count) if weight > 0 else value)
    return out


def loss_rows(runs: list[Run], smoothing: float) -> list[dict[str, Any]]:
    """Rows {step, loss, run} of every run's (smoothed) loss curve, for one plot."""
    rows = []
    for run in runs:
        records = read_metrics(run.path)
        losses = smooth([float(r["loss"]) for r in records], smoothing)
        rows.extend({"step": r["step"], "loss": loss, "run": run.label} for r, loss in zip(records, losses))
    return rows


def _flat(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_flat(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return str(value)


def run_settings(run: Run) -> dict[str, str]:
    """What a run was trained with and how it went: adapter config, training flags, summary, last metrics."""
    settings: dict[str, str] = {}
    metadata = _read_json(run.path / CONFIG_NAME) if run.has_adapter else None
    if isinstance(metadata, dict):
        for key, value in metadata.get("config", {}).items():
            settings[f"adapter: {key}"] = _flat(value)
        for key, value in (metadata.get("extra") or {}).items():
            settings[f"adapter: {key}"] = _flat(value)
    for name, prefix in ((TRAINING_ARGS_NAME, "training"), (SUMMARY_NAME, "summary")):
        data = _read_json(run.path / name) if (run.path / name).is_file() else None
        if isinstance(data, dict):
            for key, value in data.items():
                settings[f"{prefix}: {key}"] = _flat(value)
    records = read_metrics(run.path)
    if records:
        settings["metrics: logged steps"] = str(len(records))
        settings["metrics: last step"] = _flat(records[-1]["step"])
        settings["metrics: last loss"] = _flat(float(records[-1]["loss"]))
    return settings


def settings_table(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    """(headers, rows): one row per setting, one column per run; the settings where the runs differ come first."""
    per_run = [run_settings(run) for run in runs]
    keys: list[str] = []
    for settings in per_run:
        keys.extend(k for k in settings if k not in keys)
    rows = [[key] + [settings.get(key, "") for settings in per_run] for key in keys]
    rows.sort(key=lambda row: len(set(row[1:])) == 1)  # stable: otherwise in file order
    return ["setting"] + [run.label for run in runs], rows


def merge_reports(run: Run) -> list[tuple[str, dict[str, Any]]]:
    reports = []
    for path in sorted(run.path.glob(f"*{REPORT_SUFFIX}")):
        report = _read_json(path)
        if isinstance(report, dict) and isinstance(report.get("methods"), dict):
            reports.append((path.name, report))
    return reports


def _number(value: Any, fmt: str) -> str:
    if not isinstance(value, (int, float)):
        return "-"
    return "inf" if math.isinf(value) else format(value, fmt)


REPORT_HEADERS = ["run", "report", "merge", "α mean [min, max]", "UNet rel. err", "text rel. err", "image PSNR (dB)"]


def report_table(runs: list[Run]) -> list[list[str]]:
    """One row per run × merge method of every fidelity report; the method the export used is marked ★."""
    rows = []
    for run in runs:
        for name, report in merge_reports(run):
            for method, entry in report["methods"].items():
                if not isinstance(entry, dict):
                    continue
                alpha = entry.get("alpha") or {}
                alpha_text = "-"
                if alpha.get("count"):
                    alpha_text = f"{alpha['mean']:.3f} [{alpha['min']:.3f}, {alpha['max']:.3f}]"
                mark = " ★" if method == report.get("chosen") else ""
                rows.append([
                    run.label,
                    name.removesuffix(REPORT_SUFFIX),
                    f"{method}{mark}",
                    alpha_text,
                    _number(entry.get("unet_relative_error"), ".2e"),
                    _number(entry.get("text_encoder_relative_error"), ".2e"),
                    _number(entry.get("image_psnr_db"), ".1f"),
                ])
    return rows


def validation_images(run: Run, limit: int = 8) -> list[tuple[str, str]]:
    """(path, caption) of the newest validation grids the training script wrote (`validation/step-*.png`)."""
    images = sorted((run.path / "validation").glob("step-*.png"))[-limit:]
    return [(str(path), path.stem) for path in reversed(images)]

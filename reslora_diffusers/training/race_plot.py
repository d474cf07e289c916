"""The validation-loss curves of training runs, and one figure of them: "is ResLoRA faster than LoRA on my data?"

A run's `metrics.jsonl` (from `train_text_to_image.py` with `--validation_split` or `--validation_data_dir`) gives
two curves: the training-time model (solid) and the model after the run's merge (dashed), the one users deploy;
the figure shows them against optimizer steps and against the run's wall time. Runs with the same seed and
held-out images are comparable point for point: they see the same validation batches. Used by
`scripts/plot_race.py` and the app's race.
"""

from __future__ import annotations

import json
from pathlib import Path


def race_curves(run: Path) -> dict[str, list[float]]:
    """{'step', 'seconds', 'trained', 'merged'} of the run's validation records, in order; empty lists if it has none
    yet (seconds: the run's wall time at that step, 0 before the first)."""
    curves = {"step": [], "seconds": [], "trained": [], "merged": []}
    metrics = Path(run) / "metrics.jsonl"
    if not metrics.is_file():
        return curves
    for line in metrics.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line being written
        if isinstance(record, dict) and "validation_loss" in record:
            curves["step"].append(record["step"])
            curves["seconds"].append(record.get("seconds", 0.0))
            curves["trained"].append(record["validation_loss"])
            curves["merged"].append(record["validation_loss_merged"])
    return curves


def method_label(run: Path) -> str:
    """'LoRA' or 'ResLoRA <type>' from the run's adapter config (or its resolved flags while it trains); '' if unknown."""
    for name, read in (("reslora_config.json", lambda d: d["config"]["res_type"]), ("resolved_config.json", lambda d: d["res_type"])):
        try:
            res_type = read(json.loads((Path(run) / name).read_text()))
            return "LoRA" if res_type == "none" else f"ResLoRA {res_type}"
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return ""


def race_figure(runs: list[tuple[str, Path]]):
    """A matplotlib figure of the (label, run folder) pairs' curves: by step (left) and by wall time (right)."""
    # A Figure outside pyplot: nothing global keeps it, so the app's refreshes do not pile figures up.
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 3.6))
    by_step, by_time = figure.subplots(1, 2, sharey=True)
    for index, (label, run) in enumerate(runs):
        curves, colour = race_curves(run), f"C{index}"
        for axis, x in ((by_step, curves["step"]), (by_time, curves["seconds"])):
            axis.plot(x, curves["trained"], color=colour, marker=".", label=f"{label}: training-time")
            axis.plot(x, curves["merged"], color=colour, linestyle="--", marker=".", label=f"{label}: merged")
    by_step.set_xlabel("optimizer step")
    by_time.set_xlabel("wall time (s)")
    by_step.set_ylabel("validation loss")
    if runs:
        by_step.legend(fontsize=7)
    figure.tight_layout()
    return figure

"""Plot the validation losses of training runs side by side: "is ResLoRA faster than LoRA on my data?"

    python scripts/plot_race.py outputs/race-none outputs/race-is --output race.png

Solid: the training-time model; dashed: the model after the run's merge (the one users deploy); left against
optimizer steps, right against wall time (`reslora_diffusers/training/race_plot.py`). Prints the last point of each run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from reslora_diffusers.cli import exit_with_error  # noqa: E402
from reslora_diffusers.training.race_plot import method_label, race_curves, race_figure  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="training output folders")
    parser.add_argument("--output", type=Path, default=Path("race.png"), help="the PNG to write (default race.png)")
    args = parser.parse_args(argv)
    labelled = []
    for run in args.runs:
        curves = race_curves(run)
        if not curves["step"]:
            exit_with_error(f"{run} has no validation loss in its metrics.jsonl: train with --validation_split or --validation_data_dir")
        label = f"{run.name} ({method_label(run) or '?'})"
        labelled.append((label, run))
        print(f"{label:<40} step {curves['step'][-1]:>6}  training-time {curves['trained'][-1]:.5f}  merged {curves['merged'][-1]:.5f}")
    try:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        race_figure(labelled).savefig(args.output, dpi=110)
    except OSError as error:
        exit_with_error(f"cannot write {args.output}: {error.strerror}")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()

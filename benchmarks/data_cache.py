"""Step time of `train_text_to_image.py` with and without `--cache_latents`, side by side in one run (CPU).

Runs the training script on the embedded default (no data or model flags) alternately without and with
`--cache_latents`, `--repeats` times each, one thread per run; a run's step time is the median of
its per-step times from `metrics.jsonl` (the first two steps left out), and the figures are medians over the
repeats, with the median of the per-repeat (paired) ratios beside them. Writes
benchmarks/results/data_cache_cpu.json.

    python benchmarks/data_cache.py --steps 30 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from reslora_diffusers.atomic import atomic_write_text  # noqa: E402

VARIANTS = {"uncached": [], "cache_latents": ["--cache_latents"], "cache_latents+text": ["--cache_latents", "--cache_text_embeddings"]}


def step_seconds(steps: int, extra: list[str]) -> float:
    """The median step time of one short training run of the embedded default."""
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, str(ROOT / "train_text_to_image.py"), "--output_dir", out,
                   "--max_train_steps", str(steps), "--checkpointing_steps", str(steps), "--num_validation_images", "0",
                   "--report_to", "none", *extra]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            sys.exit(f"error: the training run failed: {result.stderr.strip().splitlines()[-1]}")
        seconds = [json.loads(line)["seconds"] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(b - a for a, b in zip(seconds[1:], seconds[2:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="Optimizer steps per run.")
    parser.add_argument("--repeats", type=int, default=5, help="Runs per variant, interleaved.")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "data_cache_cpu.json")
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for repeat in range(args.repeats):
        for name, extra in VARIANTS.items():
            times[name].append(step_seconds(args.steps, extra))
            print(f"repeat {repeat + 1}/{args.repeats} {name}: {times[name][-1] * 1000:.0f} ms/step", flush=True)
    medians = {name: statistics.median(values) for name, values in times.items()}
    # Each repeat's runs ran back to back, so their ratio cancels most of the machine's drift between repeats.
    paired = {name: [v / u for v, u in zip(values, times["uncached"])] for name, values in times.items()}
    result = {
        "what": "train_text_to_image.py on the embedded default, batch 8, 1 thread, median step time (ms)",
        "steps_per_run": args.steps,
        "repeats": args.repeats,
        "median_ms": {name: round(value * 1000, 1) for name, value in medians.items()},
        "per_run_ms": {name: [round(v * 1000, 1) for v in values] for name, values in times.items()},
        "ratio_to_uncached": {name: round(value / medians["uncached"], 3) for name, value in medians.items()},
        "paired_ratio_median": {name: round(statistics.median(r), 3) for name, r in paired.items()},
        "paired_ratio_range": {name: [round(min(r), 3), round(max(r), 3)] for name, r in paired.items()},
        "load_average": os.getloadavg()[0],
    }
    atomic_write_text(args.output, json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["median_ms"]), json.dumps(result["ratio_to_uncached"]), json.dumps(result["paired_ratio_median"]))


if __name__ == "__main__":
    main()

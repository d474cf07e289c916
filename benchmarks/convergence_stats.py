"""The statistics of `convergence.py`: seed means, sample std, paired differences to LoRA with a
95 % t-interval, monotone-smoothed curves and steps-to-target measures robust to one noisy evaluation."""

from __future__ import annotations

import statistics

from benchmarks.common import fmt, format_table

# Two-sided 95 % Student-t quantiles by degrees of freedom (seeds − 1).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def describe(values: list[float]) -> dict:
    """Mean, sample std (n − 1) and the 95 % t-interval half-width of the mean; std / CI None for one value."""
    n = len(values)
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if n > 1 else None
    half = T95.get(n - 1, 1.96) * std / n**0.5 if std is not None else None
    return {"mean": mean, "std": std, "ci95": half, "n": n, "values": values}


def monotone(curve: list[float]) -> list[float]:
    """The closest non-increasing curve in least squares (pool-adjacent-violators): a loss curve without its wiggles."""
    blocks: list[list[float]] = []  # [sum, count]
    for value in curve:
        blocks.append([value, 1])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] < blocks[-1][0] / blocks[-1][1]:
            total, count = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += count
    return [s / c for s, c in blocks for _ in range(c)]


def crossing_step(steps: list[int], curve: list[float], target: float) -> float | None:
    """The first step at which `curve` reaches `target`, linearly interpolated between evaluations; None if never."""
    if curve[0] <= target:
        return float(steps[0])
    for i in range(1, len(curve)):
        if curve[i] <= target:
            frac = (curve[i - 1] - target) / (curve[i - 1] - curve[i])
            return steps[i - 1] + frac * (steps[i] - steps[i - 1])
    return None


def mean_curve(runs: list[dict]) -> list[float]:
    return [statistics.fmean(values) for values in zip(*(r["heldout_loss"] for r in runs))]


def steps_to_lora(steps: list[int], lora_curve: list[float], curve: list[float]) -> dict:
    """Unmerged: steps each smoothed (monotone) seed-mean curve needs to reach LoRA's smoothed final loss."""
    lora, own = monotone(lora_curve), monotone(curve)
    target = lora[-1]
    lora_steps, own_steps = crossing_step(steps, lora, target), crossing_step(steps, own, target)
    return {"target_loss": target, "lora_steps": lora_steps, "steps": own_steps,
            "speedup": lora_steps / own_steps if own_steps else None}  # fmt: skip


def lora_equivalent_steps(steps: list[int], lora_curve: list[float], paired_difference: float) -> dict:
    """Merged: the steps LoRA's smoothed curve needs to reach where the merged model ends.

    The merged model's end point is LoRA's smoothed final plus the seeds' mean paired difference (merged −
    LoRA at the last step, same batches and noise), so the evaluation wiggle both share cancels. Above 1×:
    LoRA needs more steps than the method had; below: the method is behind. None: the method ends below
    LoRA's whole curve (more than 1×, not measurable within the run).
    """
    lora = monotone(lora_curve)
    target = lora[-1] + paired_difference
    reached = crossing_step(steps, lora, target)
    return {"target_loss": target, "lora_steps": reached, "x_steps": reached / steps[-1] if reached is not None else None}


def _final(run: dict, estimator: str | None) -> float:
    return run["heldout_loss"][-1] if estimator is None else run["merged"][estimator]["heldout"]


def summarise(runs: list[dict], args, steps: list[int]) -> dict:
    keys = [m.key for m in args.methods]
    parents = {m.key: m.parent for m in args.methods}
    first = args.seeds[0]
    summary: dict = {"lr_selection": {}, "methods": {}}
    for key in keys:
        if parents[key] != key and parents[key] in keys:
            continue  # a variant: it takes its parent's lr
        sweep = {r["lr"]: r for r in runs if r["method"] == key and r["seed"] == first}
        if not sweep:
            continue
        best_lr = min(sweep, key=lambda lr: sweep[lr]["merged_val_best"])
        lrs = sorted(sweep)
        summary["lr_selection"][key] = {
            "val_merged_best": {str(lr): sweep[lr]["merged_val_best"] for lr in lrs},
            "val_unmerged": {str(lr): sweep[lr]["val_loss"] for lr in lrs},
            "heldout_merged_best": {str(lr): sweep[lr]["merged"][sweep[lr]["best_estimator"]]["heldout"] for lr in lrs},
            "heldout_unmerged": {str(lr): sweep[lr]["heldout_loss"][-1] for lr in lrs},
            "best_lr": best_lr,
            "best_at_grid_edge": len(lrs) > 1 and best_lr in (lrs[0], lrs[-1]),
        }
    chosen_lr = {}
    for key in keys:
        own = summary["lr_selection"].get(key)
        if key != parents[key] and parents[key] in summary["lr_selection"]:
            chosen_lr[key] = summary["lr_selection"][parents[key]]["best_lr"]
        elif own is not None:
            chosen_lr[key] = own["best_lr"]
    if "lora" not in chosen_lr:
        return summary
    lora_runs = {r["seed"]: r for r in runs if r["method"] == "lora" and r["lr"] == chosen_lr["lora"]}
    lora_curve_all = mean_curve(list(lora_runs.values()))
    for key in keys:
        if key not in chosen_lr:
            continue
        mine = sorted((r for r in runs if r["method"] == key and r["lr"] == chosen_lr[key]), key=lambda r: r["seed"])
        seeds = [r["seed"] for r in mine if r["seed"] in lora_runs]
        if not seeds:
            continue
        paired = [r for r in mine if r["seed"] in lora_runs]
        estimators = [e for e in mine[0]["merged"] if all(e in r["merged"] for r in mine)]
        # The deployed estimator: the lowest mean validation loss over the seeds (never chosen on held-out names).
        chosen = min(estimators, key=lambda e: statistics.fmean(r["merged"][e]["val"] for r in mine))
        lora_estimator = next(iter(lora_runs[seeds[0]]["merged"]))
        lora_final = [_final(lora_runs[r["seed"]], lora_estimator) for r in paired]
        merged_diff = [_final(r, chosen) - lf for r, lf in zip(paired, lora_final)]
        unmerged = describe([_final(r, None) for r in mine])
        merged = {e: describe([_final(r, e) for r in mine]) for e in estimators}
        lora_curve = mean_curve([lora_runs[s] for s in seeds])
        gain = statistics.fmean(lf - _final(r, None) for r, lf in zip(paired, lora_final))
        gap = merged[chosen]["mean"] - unmerged["mean"]
        merged_vs_lora = describe(merged_diff)
        row = {
            "lr": chosen_lr[key],
            "lr_from": key if key in summary["lr_selection"] else parents[key],
            "seeds": [r["seed"] for r in mine],
            "mean_curve": mean_curve(mine),
            "smoothed_curve": monotone(mean_curve(mine)),
            "unmerged": unmerged,
            "merged": merged,
            "chosen_estimator": chosen,
            "merged_best": merged[chosen],
            "unmerged_vs_lora": describe([_final(r, None) - lf for r, lf in zip(paired, lora_final)]),
            "merged_vs_lora": merged_vs_lora,
            "gain_over_lora_unmerged": gain,
            "merge_gap": gap,
            # The bar: the merge keeps at least 90 % of the gain, and the merged model is not above LoRA.
            "merge_keeps_90pct_of_gain": gain > 0 and gap <= 0.1 * gain,
            "merged_at_or_below_lora": merged_vs_lora["mean"] <= 0,
            "steps_to_lora_final_unmerged": steps_to_lora(steps, lora_curve, mean_curve(paired)),
            "lora_equivalent_steps_merged": lora_equivalent_steps(steps, lora_curve, merged_vs_lora["mean"]),
            "train_seconds_mean": statistics.fmean(r["train_seconds"] for r in mine),
        }
        for name in ("image_metrics", "image_metrics_merged"):
            metrics = [r[name] for r in mine if r.get(name)]
            if metrics:
                row[name] = {k: describe([mm[k] for mm in metrics]) for k in metrics[0]}
        summary["methods"][key] = row
    summary["lora_mean_curve"] = lora_curve_all
    return summary


def _pm(d: dict | None, digits: int = 5) -> str:
    if not d:
        return "-"
    return fmt(d["mean"], digits) + (f" ± {d['std']:.{digits}f}" if d.get("std") is not None else "")


def _ci(d: dict, digits: int = 5) -> str:
    text = f"{d['mean']:+.{digits}f}"
    return text + (f" [{d['mean'] - d['ci95']:+.{digits}f}, {d['mean'] + d['ci95']:+.{digits}f}]" if d.get("ci95") is not None else "")


def print_tables(summary: dict, references: dict, args, labels: dict) -> None:
    methods = summary["methods"]
    if not methods:
        print("no finished comparison yet")
        return
    seeds = ",".join(map(str, args.seeds))
    print(f"\n## The merged (deployed) model: held-out loss after {args.steps} steps, seeds {seeds} (mean ± sample std); "
          "Δ vs LoRA = paired difference, [95 % CI]")  # fmt: skip
    headers = ["method", "lr", "unmerged", "merged", "estimator", "merge gap", "merged Δ vs LoRA", "LoRA-equivalent steps",
               "keeps ≥ 90 % of gain", "≤ LoRA"]  # fmt: skip
    rows = []
    for key, row in methods.items():
        eq = row["lora_equivalent_steps_merged"]
        eq_text = f"{eq['lora_steps']:.0f} ({eq['x_steps']:.2f}x)" if eq["lora_steps"] is not None else f"> {args.steps} (below LoRA's curve)"
        rows.append([labels[key], f"{row['lr']:g}" + ("" if row["lr_from"] == key else f" (of {row['lr_from']})"), _pm(row["unmerged"]),
                     _pm(row["merged_best"]), row["chosen_estimator"], f"{row['merge_gap']:+.5f}", _ci(row["merged_vs_lora"]), eq_text,
                     "yes" if row["merge_keeps_90pct_of_gain"] else "no", "yes" if row["merged_at_or_below_lora"] else "no"])  # fmt: skip
    print(format_table(headers, rows))

    estimators = ["exact", "input", "weight", "lstsq", "lstsq_joint", "calibrated"]
    print("\n## Merged held-out loss by estimator (mean over seeds; exact = LoRA / bs / annealed, merged without error)")
    rows = [[labels[k], _pm(r["unmerged"]), *(fmt(r["merged"][e]["mean"], 5) if e in r["merged"] else "-" for e in estimators)]
            for k, r in methods.items()]  # fmt: skip
    print(format_table(["method", "unmerged", *estimators], rows))

    print("\n## Steps to LoRA's final loss, unmerged (monotone-smoothed seed-mean curves)")
    rows = []
    for key, row in methods.items():
        s = row["steps_to_lora_final_unmerged"]
        rows.append([labels[key], fmt(s["steps"], 0), fmt(s["lora_steps"], 0), fmt(s["speedup"], 2)])
    print(format_table(["method", "steps", "LoRA's steps", "speed-up"], rows))

    if summary["lr_selection"]:
        lrs = sorted({lr for s in summary["lr_selection"].values() for lr in s["val_merged_best"]}, key=float)
        print(f"\n## Learning rate (seed {args.seeds[0]}): merged validation loss; * = chosen; held-out merged loss below it")
        rows = []
        for key, s in summary["lr_selection"].items():
            cells = []
            for lr in lrs:
                v, h = s["val_merged_best"].get(lr), s["heldout_merged_best"].get(lr)
                cells.append("-" if v is None else f"{v:.5f}{'*' if float(lr) == s['best_lr'] else ''} / {h:.5f}")
            rows.append([labels[key], *cells, "edge!" if s["best_at_grid_edge"] else "inside"])
        print(format_table(["method", *(f"lr {float(lr):g} (val / held-out)" for lr in lrs), "optimum"], rows))

    print("\n## Images of held-out prompts (mean ± sample std over seeds): unmerged → merged")
    rows = []
    for key, row in methods.items():
        u, m = row.get("image_metrics", {}), row.get("image_metrics_merged", {})
        rows.append([labels[key], *(f"{_pm(u.get(k), 3)} → {_pm(m.get(k), 3)}" for k in ("psnr", "ssim", "p_twemoji"))])
    for name in ("base", "vae_roundtrip"):
        ref = references[f"image_metrics_{name}"]
        rows.append([f"{name} (reference)", *(f"{ref[k]:.3f}" for k in ("psnr", "ssim", "p_twemoji"))])
    print(format_table(["method", "PSNR dB", "SSIM", "P(Twemoji)"], rows))

"""What does an adapter cost? Training-step time and memory of every method, and merged-model inference time.

    python benchmarks/speed.py --size tiny                      # CPU: the tiny emoji UNet (random init)
    python benchmarks/speed.py --size sd15 --json benchmarks/results/speed_sd15_h100.json   # GPU: SD-1.5 UNet, bf16
    python benchmarks/speed.py --size sd15 --device cpu --precision bf16 --batch 1 --latent_size 32 --memory_only
    python benchmarks/speed.py --size sdxl --device cpu --precision bf16 --batch 1 --fake_tensors   # seconds per method
    python benchmarks/speed.py --size sd15 --device cpu --methods floor,lora,lora_conv,is,is_conv --batch 1 --latent_size 32
                                                                # what conv (LoCon) adapters cost beside attention-only

All methods run in one process on one base UNet: each measurement attaches a method, warms it up,
times `--steps` training steps, and takes the method out again; methods are interleaved round-robin
(in a rotated order) over `--repeats`; times are medians, ratios are medians of the ratios within a round. A training step is forward, MSE loss,
backward, AdamW step and `adapter.step()` (Delta-LoRA's weight move, which starts at step 0 here).
The floor is the frozen base's forward + backward to the input sample: no adapter can be cheaper.

Memory: peak `torch.cuda.max_memory_allocated` over the timed steps on a GPU (weights, optimizer state
and activations), and on every device the bytes autograd saves for backward (`saved_tensors_hooks`,
deterministic), plus the adapter's parameter + gradient + AdamW state bytes. `--fake_tensors` counts
the same bytes from shapes alone (the forward runs under torch's FakeTensorMode and computes nothing):
nine methods at SDXL size take 80 s on one CPU core instead of 4 (512 px) or 16 (1024 px) minutes.
Inference: the base UNet's forward against the same UNet with the adapter unmerged, and merged into
the weights (`merge_adapter` + `merge_into_base`), interleaved pairwise.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import (  # noqa: E402
    AdapterSettings,
    SavedTensorBytes,
    attach,
    autocast,
    fmt,
    format_table,
    machine_info,
    optimizer_state_bytes,
    parse_methods,
    release_memory,
    timed,
)
from reslora_diffusers.adapters.sdxl import probe_added_conditions  # noqa: E402
from reslora_diffusers.merge import merge_adapter, merge_into_base  # noqa: E402

DEFAULT_METHODS = "floor,peft,lora,is,bs,bs_m1,ms,ms_m1,delta"
TINY_CONFIG_PATH = Path(__file__).resolve().parents[1] / "assets" / "tiny-emoji-sd" / "unet" / "config.json"

# The embedded base's UNet (scripts/pretrain_base.py), used when its saved config is not there.
TINY_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64, 128), cross_attention_dim=128, attention_head_dim=4, norm_num_groups=16,
)  # fmt: skip
# Stable Diffusion 1.5's UNet (859.5 M parameters).
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
)  # fmt: skip
# Stable Diffusion XL base's UNet (2.57 B parameters): 2 and 10 transformer blocks per attention, added conditions.
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
    use_linear_projection=True, cross_attention_dim=2048, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)  # fmt: skip
SIZES = {
    # name: (text length, default batch)
    "tiny": (20, 32),
    "sd15": (77, 4),
    "sdxl": (77, 1),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="tiny", help="tiny: the emoji base UNet; sd15: SD-1.5's UNet; sdxl: SDXL's UNet")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--precision", choices=("bf16", "fp32"), default=None,
                   help="bf16: bf16 base weights + bf16 autocast, adapters fp32 (default on cuda); fp32 (default on cpu)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: 32 tiny, 4 sd15)")
    p.add_argument("--latent_size", type=int, default=None,
                   help="side of the latent sample (default: 16 tiny = its 64 px images; 64 sd15 = 512 px)")
    p.add_argument("--methods", default=DEFAULT_METHODS, help="comma-separated method keys (see benchmarks/common.py)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank r of every method")
    p.add_argument("--lora_alpha", type=float, default=None, help="LoRA alpha (default: = rank)")
    p.add_argument("--conv_rank", type=int, default=None, help="rank of the conv adapters of `_conv` methods (default: = rank)")
    p.add_argument("--delta_lora_ratio", type=float, default=0.5, help="Delta-LoRA lambda")
    p.add_argument("--repeats", type=int, default=7, help="round-robin rounds over all methods; medians are reported")
    p.add_argument("--steps", type=int, default=5, help="timed training steps per measurement")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after attaching a method")
    p.add_argument("--infer_repeats", type=int, default=None, help="rounds of the inference comparison (default: --repeats)")
    p.add_argument("--no_inference", action="store_true", help="skip the merged / unmerged inference comparison")
    p.add_argument("--memory_only", action="store_true",
                   help="only the saved-activation accounting (one forward + backward per method), no timing")
    p.add_argument("--fake_tensors", action="store_true",
                   help="the accounting from shapes only: the forward runs on fake tensors and computes nothing "
                        "(same bytes as a real forward; implies --memory_only)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random base weights and inputs")
    p.add_argument("--json", default=None, help="write the results as JSON to this path")
    args = p.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.precision is None:
        args.precision = "fp32" if args.device == "cpu" else "bf16"
    text_length, default_batch = SIZES[args.size]
    args.text_length = text_length
    args.batch = args.batch or default_batch
    args.latent_size = args.latent_size or (16 if args.size == "tiny" else 64)
    args.lora_alpha = args.lora_alpha or float(args.rank)
    args.infer_repeats = args.infer_repeats or args.repeats
    args.memory_only = args.memory_only or args.fake_tensors
    args.conv_rank = args.conv_rank or args.rank
    for flag in ("batch", "latent_size", "repeats", "steps", "rank", "infer_repeats", "conv_rank"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    try:
        args.methods = parse_methods(args.methods)
    except ValueError as error:
        p.error(str(error))
    return args


def build_unet(size: str, device: torch.device, dtype: torch.dtype, seed: int):
    from diffusers import UNet2DConditionModel

    config, source = {
        "sd15": (SD15_UNET, "SD-1.5 config"),
        "sdxl": (SDXL_UNET, "SDXL base config"),
    }.get(size, (TINY_UNET, "pretrain_base.py config"))
    if size == "tiny" and TINY_CONFIG_PATH.is_file():
        config, source = UNet2DConditionModel.load_config(TINY_CONFIG_PATH), str(TINY_CONFIG_PATH)
    torch.manual_seed(seed)
    # Built directly in the target dtype: an fp32 SDXL UNet alone would take 10 GB of RAM.
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            unet = UNet2DConditionModel.from_config(config)
    finally:
        torch.set_default_dtype(default_dtype)
    return unet, source


def make_inputs(unet, args, device, dtype) -> dict[str, torch.Tensor]:
    side = args.latent_size
    generator = torch.Generator().manual_seed(args.seed + 1)
    shape = (args.batch, unet.config.in_channels, side, side)
    inputs = {
        "sample": torch.randn(shape, generator=generator),
        "timestep": torch.randint(0, 1000, (args.batch,), generator=generator),
        "encoder_hidden_states": torch.randn(args.batch, args.text_length, unet.config.cross_attention_dim, generator=generator),
        "target": torch.randn(shape, generator=generator),
    }
    added = probe_added_conditions(unet, args.batch, "cpu", torch.float32)  # SDXL: pooled text, size ids
    if added is not None:
        inputs.update({k: torch.randn(v.shape, generator=generator) for k, v in added.items()})
    return {k: v.to(device, dtype if v.is_floating_point() and k != "target" else v.dtype) for k, v in inputs.items()}


def unet_forward(unet, sample, inputs):
    """The UNet on one batch of `make_inputs`, with SDXL's added conditions when it takes them."""
    added = {k: inputs[k] for k in ("text_embeds", "time_ids") if k in inputs} or None
    return unet(sample, inputs["timestep"], encoder_hidden_states=inputs["encoder_hidden_states"], added_cond_kwargs=added).sample


class Trainer:
    """One method attached to the base UNet, with its optimizer; `step()` is one full training step."""

    def __init__(self, m, unet, inputs, settings, device, precision):
        self.unet, self.inputs, self.device, self.precision = unet, inputs, device, precision
        self.attached = attach(m, unet, settings)
        self.optimizer = torch.optim.AdamW(self.attached.params, lr=1e-4) if self.attached.params else None
        self.sample = inputs["sample"].detach().clone().requires_grad_(m.kind == "floor")
        self.global_step = 0
        unet.train()

    def forward_backward(self) -> None:
        with autocast(self.device, self.precision):
            pred = unet_forward(self.unet, self.sample, self.inputs)
        F.mse_loss(pred.float(), self.inputs["target"]).backward()

    def step(self) -> None:
        self.forward_backward()
        if self.optimizer is None:
            self.sample.grad = None
            return
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        self.attached.after_optimizer_step(self.global_step)

    def close(self) -> None:
        self.optimizer = None
        self.attached.detach()
        release_memory(self.device)


def measure_training(m, unet, inputs, settings, args, device) -> dict:
    trainer = Trainer(m, unet, inputs, settings, device, args.precision)
    try:
        for _ in range(args.warmup):
            trainer.step()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds = timed(device, trainer.step, args.steps)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    finally:
        trainer.close()
    return {"seconds": seconds, "peak_bytes": peak}


def account_memory(m, unet, inputs, settings, args, device) -> dict:
    """Bytes autograd saves in one training step of method `m`, and its adapter state (computed, not measured)."""
    trainer = Trainer(m, unet, inputs, settings, device, args.precision)
    # Real weights and adapters (attached above), fake inputs and activations: nothing is computed, so no
    # backward. The inputs are made fake too, so a view of one shares its storage as in a real run.
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True) if args.fake_tensors else None
    sample = trainer.sample
    if fake_mode is not None:
        inputs = {k: fake_mode.from_tensor(v) for k, v in inputs.items()}
        sample = fake_mode.from_tensor(sample)
    try:
        with fake_mode or contextlib.nullcontext(), SavedTensorBytes(exclude=[unet], fake_mode=fake_mode).recording() as saved:
            with autocast(device, args.precision):
                pred = unet_forward(unet, sample, inputs)
        if fake_mode is None:
            F.mse_loss(pred.float(), inputs["target"]).backward()
        del pred
        params = trainer.attached.params
        return {
            "saved_bytes": saved.total,
            "adapter_state_bytes": optimizer_state_bytes(params),
            "trainable_parameters": sum(p.numel() for p in params),
        }
    finally:
        if trainer.optimizer is not None:
            trainer.optimizer.zero_grad(set_to_none=True)
        trainer.sample.grad = None
        trainer.close()


def measure_inference(m, unet, inputs, settings, args, device) -> dict:
    """Base forward vs the adapted copy, unmerged and (our methods) merged into the weights, interleaved pairwise."""
    adapted = copy.deepcopy(unet)
    trainer = Trainer(m, adapted, inputs, settings, device, args.precision)
    trainer.step()  # B leaves zero and the input-norm windows fill, so the merge does real work
    trainer.optimizer = None

    def forward(model):
        def run():
            with torch.no_grad(), autocast(device, args.precision):
                unet_forward(model, inputs["sample"], inputs)

        return run

    def compare(model) -> tuple[list[float], list[float]]:
        model.eval()
        base_times, times = [], []
        for fn in (forward(unet), forward(model)):
            fn()  # warm-up
        for _ in range(args.infer_repeats):
            base_times.append(timed(device, forward(unet), args.steps))
            times.append(timed(device, forward(model), args.steps))
        return base_times, times

    unet.eval()
    result = {}
    base_times, unmerged = compare(adapted)
    result["unmerged"] = paired(base_times, unmerged)
    if trainer.attached.adapter is not None:
        merged = merge_adapter(trainer.attached.adapter, "input")
        merge_into_base(trainer.attached.adapter, merged.factors)
        same_processors = [type(p) for p in adapted.attn_processors.values()] == [type(p) for p in unet.attn_processors.values()]
        same_parameters = sum(p.numel() for p in adapted.parameters()) == sum(p.numel() for p in unet.parameters())
        base_times, merged_times = compare(adapted)
        result["merged"] = {
            **paired(base_times, merged_times),
            "merge_method": merged.method,
            "same_architecture_as_base": same_processors and same_parameters,
        }
    del adapted, trainer
    release_memory(device)
    return result


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def ratio(a, b):
    return a / b if a is not None and b else None


def paired_ratio(values, references):
    """Median of the ratios of measurements taken side by side (same round): slow drifts of the machine cancel."""
    if not references or any(v is None for v in [*values, *references]):
        return None
    return statistics.median(v / r for v, r in zip(values, references))


def paired(base_times: list[float], times: list[float]) -> dict:
    return {"base_s": statistics.median(base_times), "seconds": statistics.median(times), "x_base": paired_ratio(times, base_times)}


def summarise(args, methods, timings, memory, inference) -> dict:
    rows = {}
    step = {m.key: median(timings[m.key]["seconds"]) for m in methods}
    peak = {m.key: median(timings[m.key]["peak_bytes"]) for m in methods}
    for m in methods:
        mem = memory[m.key]
        extra = mem["saved_bytes"] + mem["adapter_state_bytes"]
        rows[m.key] = {
            "label": m.label,
            "step_s_median": step[m.key],
            "step_s_all": timings[m.key]["seconds"],
            # Ratios: medians over rounds of the ratio within a round (see paired_ratio).
            **{f"x_{ref}": paired_ratio(timings[m.key]["seconds"], timings.get(ref, {}).get("seconds")) for ref in ("floor", "lora", "peft")},
            "peak_bytes": peak[m.key],
            "peak_x_lora": ratio(peak[m.key], peak.get("lora")),
            **mem,
            "training_extra_bytes": extra,
        }
    lora_extra = rows["lora"]["training_extra_bytes"] if "lora" in rows else None
    floor_saved = rows["floor"]["saved_bytes"] if "floor" in rows else None
    for row in rows.values():
        row["training_extra_x_lora"] = ratio(row["training_extra_bytes"], lora_extra)
        # What the method adds to the frozen base's own training memory (independent of the attention kernel).
        row["added_vs_floor_bytes"] = None if floor_saved is None else row["training_extra_bytes"] - floor_saved
    inference_rows = {}
    for key, result in inference.items():
        row = {"unmerged_x_base": result["unmerged"]["x_base"], **result}
        if "merged" in result:
            row["merged_x_base"] = result["merged"]["x_base"]
        inference_rows[key] = row
    return {"training": rows, "inference": inference_rows, "targets": check_targets(rows, inference_rows)}


def check_targets(rows, inference_rows) -> list[dict]:
    """The issue's cost targets that the measured methods allow checking, each with the measured ratio."""
    targets = []

    def add(what, value, limit):
        if value is not None:  # None: a method it needs was not run, or nothing was timed (--memory_only)
            targets.append({"target": what, "limit": limit, "value": value, "met": value <= limit})

    # Conv variants adapt more layers than LoRA on attention: their cost is reported (x LoRA), not held to a target.
    shortcut = [k for k, r in rows.items() if k not in ("floor", "peft", "lora", "delta") and "_conv" not in k]
    for key in shortcut:
        add(f"{key} step <= 1.10x our LoRA", rows[key]["x_lora"], 1.10)
    add("our LoRA step <= 1.00x PEFT LoRA", rows.get("lora", {}).get("x_peft"), 1.00)
    add("our LoRA step <= 1.15x floor", rows.get("lora", {}).get("x_floor"), 1.15)
    for key in shortcut:
        if rows[key]["peak_x_lora"] is not None:
            add(f"{key} peak memory <= 1.05x LoRA (GPU peak)", rows[key]["peak_x_lora"], 1.05)
        add(f"{key} saved activations + adapter state <= 1.05x LoRA", rows[key]["training_extra_x_lora"], 1.05)
    for key, row in inference_rows.items():
        if "merged_x_base" in row:
            # "1.00x": the merged model is the base architecture; 2 % allows for timer noise.
            add(f"{key} merged inference <= 1.02x base", row["merged_x_base"], 1.02)
    return targets


def mib(value) -> str:
    return "-" if value is None else f"{value / 2**20:.1f}"


def print_tables(args, summary, device_info) -> None:
    print(f"\n## Training step: {args.size} UNet, batch {args.batch}, {args.latent_size}x{args.latent_size} latents, {args.precision}, "
          f"rank {args.rank}, on {device_info}; "
          + ("memory accounting only" + (" (fake tensors: from shapes, nothing computed)" if args.fake_tensors else "")
             if args.memory_only else f"median of {args.repeats} x {args.steps} steps"))  # fmt: skip
    headers = ["method", "step ms", "x floor", "x LoRA", "x PEFT", "peak MiB", "peak x LoRA",
               "saved act. MiB", "adapter state MiB", "extra x LoRA", "added vs floor MiB", "trainable params"]  # fmt: skip
    rows = []
    for key, r in summary["training"].items():
        rows.append([
            r["label"], fmt(r["step_s_median"] and r["step_s_median"] * 1e3, 1), fmt(r["x_floor"]), fmt(r["x_lora"]),
            fmt(r["x_peft"]), mib(r["peak_bytes"]), fmt(r["peak_x_lora"]), mib(r["saved_bytes"]),
            mib(r["adapter_state_bytes"]), fmt(r["training_extra_x_lora"]), mib(r["added_vs_floor_bytes"]),
            f"{r['trainable_parameters']:,}",
        ])  # fmt: skip
    print(format_table(headers, rows))
    if summary["inference"]:
        print(f"\n## Inference (forward, no grad), median of {args.infer_repeats} x {args.steps} forwards, paired with the base")
        headers = ["method", "base ms", "unmerged ms", "unmerged x base", "merged ms", "merged x base", "merged = base arch."]
        rows = []
        for key, r in summary["inference"].items():
            merged = r.get("merged", {})
            rows.append([
                summary["training"][key]["label"], fmt(r["unmerged"]["base_s"] * 1e3, 2), fmt(r["unmerged"]["seconds"] * 1e3, 2),
                fmt(r["unmerged_x_base"]), fmt(merged.get("seconds") and merged["seconds"] * 1e3, 2),
                fmt(r.get("merged_x_base")), str(merged.get("same_architecture_as_base", "-")),
            ])  # fmt: skip
        print(format_table(headers, rows))
    print("\n## Targets")
    rows = [[t["target"], fmt(t["value"], 3), "met" if t["met"] else "NOT met"] for t in summary["targets"]]
    print(format_table(["target", "measured", ""], rows))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    unet, config_source = build_unet(args.size, device, dtype, args.seed)
    inputs = make_inputs(unet, args, device, dtype)
    settings = AdapterSettings(rank=args.rank, lora_alpha=args.lora_alpha, delta_lora_ratio=args.delta_lora_ratio, delta_lora_start=0,
                               conv_rank=args.conv_rank)
    methods = args.methods
    print(f"{args.size} UNet ({config_source}): {sum(p.numel() for p in unet.parameters()) / 1e6:.1f} M parameters; "
          f"methods: {', '.join(m.key for m in methods)}", flush=True)  # fmt: skip

    memory = {}
    for i, m in enumerate(methods, 1):
        started = time.perf_counter()
        memory[m.key] = account_memory(m, unet, inputs, settings, args, device)
        print(f"memory accounting {i}/{len(methods)}: {m.key} ({time.perf_counter() - started:.0f} s)", flush=True)
    timings = {m.key: {"seconds": [], "peak_bytes": []} for m in methods}
    inference = {}
    if not args.memory_only:
        for r in range(args.repeats):
            # Rotate the order every round, so no method always runs right after the same other one.
            for m in methods[r % len(methods):] + methods[: r % len(methods)]:
                result = measure_training(m, unet, inputs, settings, args, device)
                timings[m.key]["seconds"].append(result["seconds"])
                timings[m.key]["peak_bytes"].append(result["peak_bytes"])
            print(f"round {r + 1}/{args.repeats} done", flush=True)
        if not args.no_inference:
            for m in methods:
                if m.kind != "floor":
                    inference[m.key] = measure_inference(m, unet, inputs, settings, args, device)
    else:
        for m in methods:
            timings[m.key] = {"seconds": [None], "peak_bytes": [None]}

    summary = summarise(args, methods, timings, memory, inference)
    info = machine_info(device)
    print_tables(args, summary, info.get("gpu", info["cpu"]) + f" ({info['torch_threads']} threads)")
    if args.json:
        out = {
            "command": " ".join(["python", "benchmarks/speed.py", *(argv if argv is not None else sys.argv[1:])]),
            "machine": info,
            "settings": {k: v for k, v in vars(args).items() if k not in ("methods", "json")}
            | {"methods": [m.key for m in methods], "unet_config": config_source},
            **summary,
        }
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=2) + "\n")
        print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Step time of the embedded base's pretraining (UNet + text encoder, v-prediction, AdamW) for a few ways of running it.

    python benchmarks/pretrain_throughput.py --threads 1 --variants eager,channels_last,compile

Builds the UNet and text encoder of `scripts/pretrain_base.py` with random weights (the step time does not depend on
them) and times optimizer steps on random 8×8×4 latents, the variants measured in turns (round-robin), so that a
change in the machine's load hits all of them alike. Prints the median step time of each variant, its samples/s and
its ratio to the first variant; `compile` also reports its compile time and after how many steps it pays back.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--variants", default="eager,channels_last,compile", help="comma-separated: eager, channels_last, compile")
    p.add_argument("--unet_channels", default="32,64,128")
    p.add_argument("--attention_levels", default="1,1,0")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--latent_size", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5, help="timed rounds; each round times --steps steps of every variant")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--output", default=None, help="also write the results as JSON here")
    return p.parse_args(argv)


class Variant:
    def __init__(self, name: str, args, vocab: int):
        from pretrain_base import make_text_encoder, make_unet

        class Tokens:  # what make_text_encoder reads of a tokenizer
            bos_token_id, eos_token_id, pad_token_id = vocab - 2, vocab - 1, vocab - 1

            def __len__(self):
                return vocab

        torch.manual_seed(0)
        channels = tuple(int(c) for c in args.unet_channels.split(","))
        levels = tuple(int(a) for a in args.attention_levels.split(","))
        self.name = name
        self.unet = make_unet(channels, 128, args.latent_size, 4, levels)
        self.text_encoder = make_text_encoder(Tokens(), 128, 3, 20)
        if name == "channels_last":
            self.unet = self.unet.to(memory_format=torch.channels_last)
        self.params = list(self.unet.parameters()) + list(self.text_encoder.parameters())
        self.opt = torch.optim.AdamW(self.params, lr=1e-4)
        self.forward = torch.compile(self.unet) if name == "compile" else self.unet
        gen = torch.Generator().manual_seed(1)
        self.latents = torch.randn(args.batch_size, 4, args.latent_size, args.latent_size, generator=gen)
        self.ids = torch.randint(0, vocab - 2, (args.batch_size, 20), generator=gen)
        self.t = torch.randint(0, 1000, (args.batch_size,), generator=gen)
        self.times: list[float] = []
        self.compile_seconds = None

    def step(self) -> None:
        pred = self.forward(self.latents, self.t, self.text_encoder(self.ids)[0]).sample
        loss = F.mse_loss(pred, self.latents)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    variants = [Variant(name, args, vocab=2264) for name in args.variants.split(",")]
    for v in variants:  # warm-up; for `compile` this is the compilation
        start = time.perf_counter()
        for _ in range(3):
            v.step()
        if v.name == "compile":
            v.compile_seconds = time.perf_counter() - start
    for _ in range(args.rounds):
        for v in variants:
            start = time.perf_counter()
            for _ in range(args.steps):
                v.step()
            v.times.append((time.perf_counter() - start) / args.steps)
    first = statistics.median(variants[0].times)
    results = {}
    for v in variants:
        median = statistics.median(v.times)
        results[v.name] = {"median_step_ms": round(median * 1000, 1), "samples_per_second": round(args.batch_size / median, 1),
                           "ratio_to_first": round(median / first, 3)}
        line = f"{v.name:<14} {median * 1000:8.1f} ms/step  {args.batch_size / median:7.1f} samples/s  ×{median / first:.3f}"
        if v.compile_seconds is not None:
            saved = first - median
            results[v.name]["compile_seconds"] = round(v.compile_seconds, 1)
            payback = f"pays back after {v.compile_seconds / saved:.0f} steps" if saved > 0 else "never pays back"
            line += f"  (compile + 3 steps: {v.compile_seconds:.0f} s; {payback})"
        print(line, flush=True)
    if args.output:
        Path(args.output).write_text(json.dumps({"args": vars(args), "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

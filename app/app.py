"""The Gradio app: what the base model, a LoRA and a ResLoRA adapter draw for the same prompt and seed, side by side,
and how their training went.

    python app/app.py                 # embedded tiny emoji model + the demo adapters, on http://127.0.0.1:7860
    python app/app.py --base path/to/sd-folder --adapter_root outputs --port 7861

Adapters are the run folders (`reslora_config.json` + `reslora_adapter.safetensors`) found under the adapter
roots; the path fields accept nothing outside them. Requests are queued: one comparison runs at a time.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(1, str(REPO))  # `reslora_diffusers` from this checkout; this folder is sys.path[0]
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home: the app must work offline
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gradio as gr  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from reslora_diffusers.cli import OneLineErrorParser, first_line  # noqa: E402
from reslora_diffusers.merge import MERGE_METHODS  # noqa: E402
from reslora_diffusers.pipeline_io import UserInputError, load_pipeline  # noqa: E402

import runs as run_folders  # noqa: E402  (this folder)
from generation import MODEL_DEFAULT, Comparer, Limits, Panel, Request  # noqa: E402

logger = logging.getLogger("reslora_app")

DEFAULT_BASE = REPO / "assets" / "tiny-emoji-sd"
DEFAULT_ROOTS = [REPO / "assets" / "demo-adapters", REPO / "outputs"]
SLOTS = ("base", "LoRA", "ResLoRA")
MAX_DEFAULT_RUNS = 6
CSS = """
.pixelated img { image-rendering: pixelated; object-fit: contain !important; width: 100% !important; height: 100% !important; }
"""
# System fonts only: the default theme would fetch web fonts, and the app must look right offline.
THEME = gr.themes.Soft(
    font=("ui-sans-serif", "system-ui", "sans-serif"), font_mono=("ui-monospace", "SFMono-Regular", "monospace")
)
INTRO = """# LoRA vs ResLoRA, side by side
Same prompt, same seed, **same initial noise**: the base model, a plain LoRA adapter and a ResLoRA adapter draw one image
each. *Merged* folds each adapter into the weights first (no extra branches at inference); ResLoRA's `is` / `ms`
shortcuts are then approximated with a scale α, estimated as chosen (`input`, `weight`, or `lstsq` on this prompt).
"""


def parse_args(argv=None) -> argparse.Namespace:
    parser = OneLineErrorParser(description="Compare base, LoRA and ResLoRA images side by side in the browser (Gradio).")
    parser.add_argument("--base", default=str(DEFAULT_BASE), help="Base model: a diffusers folder or a single-file .safetensors checkpoint.")
    parser.add_argument("--base_config", default=None, help="Diffusers folder describing a single-file base (its config).")
    parser.add_argument(
        "--adapter_root",
        action="append",
        default=None,
        help="Folder searched for adapters (repeat for several); the app reads no adapter outside these. "
        "Default: assets/demo-adapters and outputs.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="Address to listen on; the default serves this machine only.")
    parser.add_argument("--port", type=int, default=7860, help="Port to listen on.")
    parser.add_argument("--share", action="store_true", help="Also open a temporary public gradio.live link (off unless asked).")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device of the pipeline.")
    parser.add_argument("--max_steps", type=int, default=Limits.max_steps, help="Largest number of denoising steps a request may ask for.")
    parser.add_argument("--max_size", type=int, default=Limits.max_size, help="Largest image side (px) a request may ask for.")
    parser.add_argument("--queue_size", type=int, default=16, help="Requests that may wait in the queue; more are turned away.")
    args = parser.parse_args(argv)
    if not 1 <= args.port <= 65535:
        parser.error(f"--port must be in 1..65535, got {args.port}")
    if args.max_steps < 1 or args.max_size < 8 or args.queue_size < 1:
        parser.error("--max_steps, --queue_size must be >= 1 and --max_size >= 8")
    args.adapter_root = [Path(root) for root in (args.adapter_root or DEFAULT_ROOTS)]
    return args


# -- generation tab ------------------------------------------------------------------------------------------
def adapter_choices(roots: list[Path]) -> tuple[list[tuple[str, str]], str | None, str | None]:
    """(dropdown choices, default LoRA, default ResLoRA): the first plain LoRA and the first adapter that is not."""
    found = run_folders.discover_runs(roots, adapters_only=True)
    choices = [(run.choice_label, str(run.path)) for run in found]
    lora = next((str(r.path) for r in found if r.config.get("res_type") == "none" and not r.config.get("delta_lora_ratio")), None)
    reslora = next((str(r.path) for r in found if r.config.get("res_type") != "none"), None)
    return choices, lora, reslora


def _seconds(value: float) -> str:
    return f"{value:.2f} s" if value >= 0.1 else f"{value * 1000:.0f} ms"


def summary_markdown(request: Request, panels: list[Panel], roots: list[Path]) -> str:
    lines = [
        f"**{request.prompt}**" + (f" (negative: *{request.negative_prompt}*)" if request.negative_prompt else "")
        + f" · seed {request.seed} · {request.steps} steps · guidance {request.guidance:g} · {request.size} px · "
        f"scheduler {request.scheduler} · the same initial noise for every image",
        "",
        "| image | adapter | time | adapter load / merge | mean \\|Δ\\| vs base |",
        "|---|---|---|---|---|",
    ]
    for panel in panels:
        adapter = run_folders.label_of(Path(panel.adapter), roots) if panel.adapter else "-"
        setup = _seconds(panel.setup_seconds) if panel.adapter else "-"
        difference = f"{panel.mean_difference:.1f} / 255" if panel.mean_difference is not None else "-"
        title = f"{panel.title}, {panel.weights}" if panel.weights else panel.title
        lines.append(f"| {title} | `{adapter}` | {_seconds(panel.seconds)} | {setup} | {difference} |")
    return "\n".join(lines)


def caption(panel: Panel | None, title: str) -> str:
    if panel is None:
        return f"**{title}**: no adapter chosen"
    weights = f" ({panel.weights})" if panel.weights else ""
    return f"**{title}**{weights} · {_seconds(panel.seconds)}"


def make_generate(comparer: Comparer, roots: list[Path]):
    def generate(
        prompt, negative_prompt, seed, steps, guidance, size, scheduler,
        lora, lora_path, reslora, reslora_path, weights, merge_method,
        progress=gr.Progress(),  # noqa: B008  (how Gradio asks for a progress bar)
    ):
        request = Request(
            prompt=prompt,
            negative_prompt=negative_prompt,
            seed=seed,
            steps=steps,
            guidance=guidance,
            size=size,
            scheduler=scheduler or MODEL_DEFAULT,
            lora=(lora_path or "").strip() or (lora or ""),
            reslora=(reslora_path or "").strip() or (reslora or ""),
            merged=weights == "merged",
            merge_method=merge_method,
        )

        def on_progress(done: int, total: int, title: str) -> None:
            progress((done, total), desc=f"drawing {title}", unit="steps")

        try:
            request, panels = comparer.compare(request, on_progress)
        except (UserInputError, ValueError, FileNotFoundError) as error:
            # The library's errors say what is wrong (AdapterMismatchError is a ValueError): show them as they are.
            raise gr.Error(first_line(error), title="Cannot draw this", print_exception=False) from None
        except Exception as error:
            logger.exception("generation failed")
            raise gr.Error(f"generation failed: {first_line(error)} (the server log has the details)", print_exception=False) from None
        by_title = {panel.title: panel for panel in panels}
        images = [by_title[title].image if title in by_title else None for title in SLOTS]
        captions = [caption(by_title.get(title), title) for title in SLOTS]
        return *images, *captions, summary_markdown(request, panels, roots)

    return generate


# -- training tab -----------------------------------------------------------------------------------------------
def run_choices(roots: list[Path]) -> tuple[list[tuple[str, str]], list[str]]:
    found = run_folders.discover_runs(roots)
    with_metrics = [str(run.path) for run in found if (run.path / run_folders.METRICS_NAME).is_file()]
    return [(run.choice_label, str(run.path)) for run in found], with_metrics[:MAX_DEFAULT_RUNS]


def make_show_runs(roots: list[Path]):
    def show_runs(paths, smoothing):
        try:
            chosen = [run_folders.run_at(path, roots) for path in paths or []]
        except UserInputError as error:
            raise gr.Error(str(error), print_exception=False) from None
        rows = run_folders.loss_rows(chosen, float(smoothing))
        frame = pd.DataFrame(rows, columns=["step", "loss", "run"])
        headers, settings = run_folders.settings_table(chosen)
        reports = run_folders.report_table(chosen)
        notes = []
        for run in chosen:
            missing = [name for name, ok in (
                ("metrics.jsonl", (run.path / run_folders.METRICS_NAME).is_file()),
                ("merge report", bool(run_folders.merge_reports(run))),
            ) if not ok]
            if missing:
                notes.append(f"- `{run.label}` has no {' and no '.join(missing)}")
        if not chosen:
            notes.append("Choose one or more runs above.")
        return (
            frame,
            pd.DataFrame(settings, columns=headers),
            pd.DataFrame(reports, columns=run_folders.REPORT_HEADERS),
            "\n".join(notes),
        )

    return show_runs


# -- the page ---------------------------------------------------------------------------------------------------
def build_demo(comparer: Comparer, roots: list[Path], base_name: str) -> gr.Blocks:
    choices, default_lora, default_reslora = adapter_choices(roots)
    runs, default_runs = run_choices(roots)
    limits = comparer.limits
    with gr.Blocks(title="LoRA vs ResLoRA", analytics_enabled=False) as demo:
        gr.Markdown(INTRO)
        gr.Markdown(f"Base model: `{base_name}` · adapter folders: " + ", ".join(f"`{root}`" for root in roots))
        with gr.Tab("Generate"):
            with gr.Row():
                with gr.Column(scale=2, min_width=320):
                    prompt = gr.Textbox(label="Prompt", value="fish", lines=2, elem_id="prompt")
                    negative = gr.Textbox(label="Negative prompt", lines=1, elem_id="negative-prompt")
                    generate_button = gr.Button("Generate", variant="primary", elem_id="generate")
                    with gr.Row():
                        seed = gr.Number(label="Seed", value=0, precision=0, info="-1: a random one", elem_id="seed")
                        steps = gr.Number(label="Steps", value=20, precision=0, info=f"1 to {limits.max_steps}", elem_id="steps")
                    with gr.Row():
                        guidance = gr.Slider(0, limits.max_guidance, value=3.0, step=0.5, label="Guidance scale", elem_id="guidance")
                        size = gr.Number(
                            label="Size (px)", value=comparer.native_size, precision=0,
                            info=f"multiple of {comparer.size_multiple}, up to {limits.max_size}", elem_id="size",
                        )
                    scheduler = gr.Dropdown(comparer.scheduler_choices, value=MODEL_DEFAULT, label="Scheduler", elem_id="scheduler")
                    with gr.Group():
                        lora = gr.Dropdown(choices, value=default_lora, label="LoRA adapter", allow_custom_value=True, elem_id="lora")
                        lora_path = gr.Textbox(label="…or a LoRA folder path (inside the adapter folders)", elem_id="lora-path")
                        reslora = gr.Dropdown(choices, value=default_reslora, label="ResLoRA adapter", allow_custom_value=True, elem_id="reslora")
                        reslora_path = gr.Textbox(label="…or a ResLoRA folder path (inside the adapter folders)", elem_id="reslora-path")
                        refresh = gr.Button("Rescan adapter folders", size="sm")
                    with gr.Row():
                        weights = gr.Radio(["unmerged", "merged"], value="unmerged", label="Adapter weights", elem_id="weights")
                        merge_method = gr.Dropdown(list(MERGE_METHODS), value="input", label="Merge α estimate (is / ms)", elem_id="merge-method")
                with gr.Column(scale=3):
                    images, captions = [], []
                    with gr.Row(equal_height=True):
                        for title in SLOTS:
                            with gr.Column(min_width=160):
                                images.append(gr.Image(
                                    label=title, type="pil", format="png", height=240, interactive=False,
                                    elem_id=f"image-{title.lower()}", elem_classes=["pixelated"], buttons=["download", "fullscreen"],
                                ))
                                captions.append(gr.Markdown(f"**{title}**", elem_id=f"caption-{title.lower()}"))
                    summary = gr.Markdown(elem_id="summary")
        with gr.Tab("Training"):
            with gr.Row():
                run_box = gr.CheckboxGroup(runs, value=default_runs, label="Runs", scale=4, elem_id="runs")
                smoothing = gr.Slider(0, 0.99, value=0.9, step=0.01, label="Loss smoothing (EMA)", scale=1)
            show = gr.Button("Show", variant="primary")
            plot = gr.LinePlot(x="step", y="loss", color="run", title="Training loss", height=360, elem_id="loss-plot")
            notes = gr.Markdown()
            gr.Markdown(
                "### Settings\nThe adapter config, the training flags and summary, the last logged metrics; "
                "the settings where the chosen runs differ come first."
            )
            settings = gr.Dataframe(interactive=False, wrap=True, elem_id="settings")
            gr.Markdown(
                "### Merge fidelity\nMerged vs unmerged model on the same inputs and seed, for each way of estimating α "
                "(★: the one the export used). `exact` merges (LoRA, `bs`) have no error beyond rounding."
            )
            report = gr.Dataframe(headers=run_folders.REPORT_HEADERS, interactive=False, wrap=True, elem_id="merge-report")

        inputs = [prompt, negative, seed, steps, guidance, size, scheduler, lora, lora_path, reslora, reslora_path, weights, merge_method]
        generate_event = {"fn": make_generate(comparer, roots), "inputs": inputs, "outputs": [*images, *captions, summary], "concurrency_limit": 1}
        generate_button.click(api_name="generate", **generate_event)
        prompt.submit(api_name=False, **generate_event)

        def rescan():
            new_choices, _, _ = adapter_choices(roots)
            new_runs, _ = run_choices(roots)
            return gr.Dropdown(choices=new_choices), gr.Dropdown(choices=new_choices), gr.CheckboxGroup(choices=new_runs)

        refresh.click(rescan, outputs=[lora, reslora, run_box], api_name="rescan")
        show_runs = {"fn": make_show_runs(roots), "inputs": [run_box, smoothing], "outputs": [plot, settings, report, notes], "concurrency_limit": 4}
        show.click(api_name="runs", **show_runs)
        smoothing.release(api_name=False, **show_runs)
        demo.load(api_name=False, **show_runs)
    return demo


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        pipe = load_pipeline(args.base, args.base_config)
    except UserInputError as error:
        hint = " (build it with scripts/pretrain_base.py, or pass --base)" if Path(args.base) == DEFAULT_BASE else ""
        sys.stderr.write(f"error: {error}{hint}\n")
        return 2
    pipe.to(args.device)
    pipe.set_progress_bar_config(disable=True)
    limits = Limits(max_steps=args.max_steps, max_size=args.max_size)
    comparer = Comparer(pipe, args.adapter_root, limits)
    demo = build_demo(comparer, comparer.roots, args.base)
    demo.queue(default_concurrency_limit=1, max_size=args.queue_size)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, theme=THEME, css=CSS, footer_links=["api"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

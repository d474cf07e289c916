"""The page: Generate (base | A | B | difference), Grid, Train and Runs tabs, wired to the app's workers.

Handlers never blank what is on the page: a refused or failed request shows its message in the status line and
leaves the last good images (`gr.skip()`); a cancelled one says so. Every path the page sends is checked against
the roots it belongs to (adapters, models, data, runs) before anything is read.
"""

from __future__ import annotations

import functools
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import adapters as adapter_sources
import gradio as gr
import pandas as pd
import runs as run_folders
from generation import MODEL_DEFAULT, Cancelled, Comparer, Sampling, Setting
from grid import difference_image, parse_list, settings_product
from image_files import image_name, parameters_text, save_png, slug
from models import discover_models, model_at
from paths import resolve_inside
from training_jobs import METHODS, TrainingQueue, TrainingSettings, log_tail

from reslora_diffusers.cli import first_line
from reslora_diffusers.data.caption_folder import is_training_folder
from reslora_diffusers.image_grid import labelled_grid
from reslora_diffusers.merge import MERGE_METHODS
from reslora_diffusers.pipeline_io import UserInputError
from reslora_diffusers.training.race_plot import race_curves, race_figure

logger = logging.getLogger("reslora_app")
PROGRESS_INTERVAL_S = 0.25  # at most four progress updates a second reach the page
CANCEL_WAIT_S = 10.0  # a cancelled job stops at its next denoising step: well under a second on the CPU
CANCELLED = "Cancelled: what was on the page stays."

BASE_CHOICE = "(base model)"
MAX_DEFAULT_RUNS = 6
CSS = """
.pixelated img { image-rendering: pixelated; object-fit: contain !important; width: 100% !important; height: 100% !important; }
"""
# System fonts only: the default theme would fetch web fonts, and the app must look right offline.
THEME = gr.themes.Soft(font=("ui-sans-serif", "system-ui", "sans-serif"), font_mono=("ui-monospace", "SFMono-Regular", "monospace"))
INTRO = """# LoRA vs ResLoRA, side by side
Same prompt, same seed, **same initial noise** for the base model and every adapter. *Strength* scales an adapter's
change (0: the base model, 1: as trained). *Merged* folds a native adapter into the weights first; ResLoRA's
`is` / `ms` shortcuts are then approximated with a scale α (`input`, `weight`, or `lstsq` on this prompt).
kohya and diffusers LoRA files run through diffusers' own LoRA loader.
"""


@dataclass
class Folders:
    """The roots every path input is confined to, and the app's own folder (uploads, images, training runs)."""

    adapters: list[Path]
    models: list[Path]
    data: list[Path]
    workdir: Path

    @property
    def uploads(self) -> Path:
        return self.workdir / "uploads"

    @property
    def images(self) -> Path:
        return self.workdir / "images"

    @property
    def runs(self) -> Path:
        return self.workdir / "runs"


def _seconds(value: float) -> str:
    return f"{value:.2f} s" if value >= 0.1 else f"{value * 1000:.0f} ms"


def _error(error: BaseException) -> str:
    return f"**error:** {first_line(error)}"


# -- choices ----------------------------------------------------------------------------------------------
def adapter_choices(folders: Folders) -> tuple[list[tuple[str, str]], str | None, str | None]:
    """(dropdown choices, default A, default B): the first plain LoRA and the first ResLoRA adapter."""
    found = adapter_sources.discover_adapters(folders.adapters)
    choices = [(source.choice_label, str(source.path)) for source in found]
    lora = next((str(s.path) for s in found if s.is_native and s.method == "LoRA"), None)
    reslora = next((str(s.path) for s in found if s.method.startswith("ResLoRA")), None)
    return choices, lora, reslora


def model_choices(folders: Folders) -> list[tuple[str, str]]:
    return [(model.choice_label, str(model.path)) for model in discover_models(folders.models)]


def data_choices(folders: Folders) -> list[tuple[str, str]]:
    """Training folders (imagefolder metadata or kohya-style caption files) up to three levels below each data root;
    the folders inside a found one (its `N_name` concept folders) are not listed again."""
    found = []

    def visit(folder: Path, depth: int) -> None:
        if is_training_folder(folder):
            found.append(folder)
        elif depth < 3:
            for child in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
                visit(child, depth + 1)

    for root in folders.data:
        visit(root, 0)
    return [(run_folders.label_of(folder, folders.data), str(folder)) for folder in dict.fromkeys(found)]


def run_choices(folders: Folders) -> tuple[list[tuple[str, str]], list[str]]:
    found = run_folders.discover_runs(folders.adapters)
    with_metrics = [str(run.path) for run in found if (run.path / run_folders.METRICS_NAME).is_file()]
    return [(run.choice_label, str(run.path)) for run in found], with_metrics[:MAX_DEFAULT_RUNS]


# -- generate and grid ------------------------------------------------------------------------------------
def cell_parameters(sampling: Sampling, cell, base_label: str) -> str:
    settings = {"Steps": sampling.steps, "Sampler": sampling.scheduler, "CFG scale": sampling.guidance, "Seed": sampling.seed,
                "Size": f"{sampling.size}x{sampling.size}", "Model": base_label}
    if cell.source is not None:
        settings.update({"Adapter": cell.source.label, "Adapter kind": cell.source.method, "Strength": cell.setting.strength,
                         "Weights": cell.weights})
    return parameters_text(sampling.prompt, sampling.negative_prompt, settings)


def cell_title(cell) -> str:
    if cell.source is None:
        return "base model"
    return f"{cell.source.label} ({cell.source.method}) × {cell.setting.strength:g}, {cell.weights}"


def grid_label(cell) -> str:
    """A grid column's header: adapter, kind and strength, weights (one line each)."""
    if cell.source is None:
        return "base model"
    return f"{cell.source.label}\n{cell.source.method}, strength {cell.setting.strength:g}\n{cell.weights}"


def save_cell(folders: Folders, sampling: Sampling, cell, base_label: str) -> str:
    adapter = cell.source.label.removesuffix(".safetensors") if cell.source else "base"
    strength = cell.setting.strength if cell.source else None
    name = image_name(sampling.prompt, sampling.seed, adapter, strength)
    return str(save_png(cell.image, folders.images, name, cell_parameters(sampling, cell, base_label)))


def keeps_the_page(outputs: int, what: str):
    """A cancelled or failed job leaves its `outputs` as they are (`gr.skip()`) and says why in the status line."""

    def wrap(handler):
        @functools.wraps(handler)  # Gradio reads the signature (its progress argument) through __wrapped__
        def guarded(*args, **kwargs):
            keep = [gr.skip()] * outputs
            try:
                return handler(*args, **kwargs)
            except Cancelled:
                return *keep, CANCELLED
            except (UserInputError, ValueError, FileNotFoundError) as error:
                return *keep, _error(error)
            except Exception as error:
                logger.exception("%s failed", what)
                return *keep, f"{_error(error)} (the server log has the details)"

        return guarded

    return wrap


class Handlers:
    """The page's event handlers, around one `Comparer` (generation) and one `TrainingQueue`."""

    def __init__(self, comparer: Comparer, folders: Folders, queue: TrainingQueue):
        self.comparer, self.folders, self.queue = comparer, folders, queue
        self.running_session: str | None = None

    def _base(self, base: str) -> Path:
        return model_at(base, self.folders.models) if (base or "").strip() else self.comparer.base

    def _base_label(self) -> str:
        return run_folders.label_of(self.comparer.base, self.folders.models)

    def _compare(self, samplings, settings, base, progress, request: gr.Request | None):
        last_sent = 0.0

        def on_progress(done: int, total: int, title: str) -> None:
            # At most a few updates a second: a small model draws dozens of steps a second, and a browser on a
            # busy machine that must render every one of them shows the result (or "Cancelled") seconds late.
            nonlocal last_sent
            now = time.monotonic()
            if now - last_sent >= PROGRESS_INTERVAL_S or done == total:
                last_sent = now
                progress((done, total), desc=f"drawing {title}", unit="steps")

        self.running_session = getattr(request, "session_hash", None)
        try:
            return self.comparer.compare(samplings, settings, self._base(base), on_progress)
        finally:
            self.running_session = None

    def closed(self, request: gr.Request):
        """A closed or reloaded tab cancels the job it started: nobody is waiting for those images."""
        if request is not None and request.session_hash is not None and request.session_hash == self.running_session:
            self.comparer.cancel()

    @keeps_the_page(outputs=9, what="images")
    def generate(self, base, prompt, negative, seed, steps, guidance, size, scheduler, adapter_a, strength_a, adapter_b,
                 strength_b, weights, merge_method, gain, request: gr.Request, progress=gr.Progress()):  # noqa: B008  (Gradio's progress bar)
        sampling = Sampling(prompt, negative, seed, steps, guidance, size, scheduler or MODEL_DEFAULT)
        slots = [(a, s) for a, s in ((adapter_a, strength_a), (adapter_b, strength_b))]
        settings = [Setting(a if a != BASE_CHOICE else "", s, weights == "merged", merge_method) for a, s in slots if a]
        samplings, bases, cells = self._compare([sampling], settings, base, progress, request)
        sampling, row, base_label = samplings[0], cells[0], self._base_label()
        by_slot = iter(row)
        shown = [bases[0]] + [next(by_slot) if a else None for a, _ in slots]
        files = [save_cell(self.folders, sampling, cell, base_label) if cell else None for cell in shown]
        captions = [f"**{title}**" + (f": {cell_title(cell)} · {_seconds(cell.seconds)}" if cell else ": none chosen")
                    for title, cell in zip(("Base", "A", "B"), shown)]
        difference, note = None, "choose two adapters for the difference view"
        if shown[1] is not None and shown[2] is not None:
            image, mean = difference_image(shown[1].image, shown[2].image, float(gain))
            difference = str(save_png(image, self.folders.images, image_name(sampling.prompt, sampling.seed, "difference-a-b"),
                                      f"|A - B| x {gain:g} of:\n{cell_parameters(sampling, shown[1], base_label)}"))
            note = f"**|A − B| × {gain:g}** · mean |A − B| {mean:.1f} / 255"
        summary = summary_markdown(sampling, base_label, [c for c in shown if c is not None])
        return *files, difference, *captions, note, summary, "Done."

    @keeps_the_page(outputs=2, what="grid")
    def grid(self, base, prompts, seeds, adapters, strengths, weights, methods, negative, steps, guidance, size, scheduler,
             request: gr.Request, progress=gr.Progress()):  # noqa: B008
        prompt_list = [p.strip() for p in str(prompts or "").splitlines() if p.strip()]
        seed_list = parse_list(seeds, int, "seeds")
        strength_list = parse_list(strengths, float, "strengths")
        if not prompt_list or not seed_list or not adapters:
            raise UserInputError("a grid needs at least one prompt, one seed and one adapter setting")
        combos = settings_product([a if a != BASE_CHOICE else "" for a in adapters], strength_list, weights or [], methods or [])
        settings = [Setting(a, s, m, method) for a, s, m, method in combos]
        samplings = [Sampling(p, negative, seed, steps, guidance, size, scheduler or MODEL_DEFAULT) for p in prompt_list for seed in seed_list]
        samplings, _bases, cells = self._compare(samplings, settings, base, progress, request)
        row_labels = [f"{s.prompt} · seed {s.seed}" for s in samplings]
        column_labels = [grid_label(cell) for cell in cells[0]]
        image = labelled_grid([[cell.image for cell in row] for row in cells], row_labels, column_labels)
        first = samplings[0]
        text = parameters_text(first.prompt, first.negative_prompt, {
            "Grid": f"{len(samplings)} rows x {len(column_labels)} columns", "Prompts": " | ".join(prompt_list),
            "Seeds": " ".join(str(s.seed) for s in samplings[:len(seed_list)]), "Columns": " | ".join(cell_title(cell) for cell in cells[0]), "Steps": first.steps,
            "Sampler": first.scheduler, "CFG scale": first.guidance, "Size": f"{first.size}x{first.size}", "Model": self._base_label()})
        path = save_png(image, self.folders.images, f"grid-{slug(prompt_list[0])}-{len(samplings)}x{len(column_labels)}.png", text)
        table = pd.DataFrame(
            [[r + 1, c + 1, s.prompt, s.seed, cell_title(cell), round(cell.seconds, 3),
              None if cell.mean_difference is None else round(cell.mean_difference, 2)]
             for r, (s, row) in enumerate(zip(samplings, cells)) for c, cell in enumerate(row)],
            columns=["row", "column", "prompt", "seed", "setting", "time (s)", "mean |Δ| vs base (/255)"],
        )
        return str(path), table, f"Done: {len(samplings)} × {len(column_labels)} images."

    def cancel(self):
        """Waits (briefly) for the job to stop and says what the job's own reply says: whichever of the two replies the
        browser shows last, the status line ends as "Cancelled", never stuck at "Cancelling…"."""
        if not self.comparer.busy:
            return gr.skip()  # nothing running: the last status ("Done.", an error) stays
        if self.comparer.cancel(wait_s=CANCEL_WAIT_S) or not self.comparer.busy:  # stopped, or just after the wait
            return CANCELLED
        return "Cancelling…"  # the job's own reply, "Cancelled", comes after this one

    def upload(self, file):
        try:
            if not file:
                raise UserInputError("no file")
            name = Path(str(file)).name
            if not name.endswith(".safetensors"):
                raise UserInputError(f"{name}: only .safetensors LoRA files are accepted (pickled files are unsafe)")
            if adapter_sources.lora_file_kind(Path(file)) is None:
                raise UserInputError(f"{name} is not a LoRA file (no kohya nor diffusers LoRA keys)")
            target = self.folders.uploads / (slug(Path(name).stem, 80) + ".safetensors")
            count = 1
            while target.exists():
                count += 1
                target = self.folders.uploads / f"{slug(Path(name).stem, 80)}-{count}.safetensors"
            self.folders.uploads.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.folders.uploads, prefix=".upload.", delete=False) as temporary:
                shutil.copyfile(file, temporary.name)
            Path(temporary.name).replace(target)
        except (UserInputError, OSError) as error:
            return gr.skip(), gr.skip(), gr.skip(), _error(error)
        choices, _, _ = adapter_choices(self.folders)
        grid_choices = [(BASE_CHOICE, BASE_CHOICE), *choices]
        return (gr.Dropdown(choices=choices, value=str(target)), gr.Dropdown(choices=choices), gr.Dropdown(choices=grid_choices),
                f"Saved as `{run_folders.label_of(target, self.folders.adapters)}` (kind: {adapter_sources.lora_file_kind(target)} LoRA).")

    # -- training -----------------------------------------------------------------------------------------
    def _training_folder(self, data) -> Path:
        folder = resolve_inside(data, self.folders.data, "data")
        if not is_training_folder(folder):
            raise UserInputError(f"{data} is not a training folder: it has no metadata.jsonl / metadata.csv and no "
                                 "images with caption files (.txt / .caption) beside them")
        return folder

    def start_training(self, data, method, rank, steps, learning_rate, seed, checkpointing, validation, name, masked_loss=False,
                       conv_rank=0):
        try:
            settings = TrainingSettings(self._training_folder(data), method, rank, steps, learning_rate, seed, checkpointing,
                                        validation, name or "", masked_loss=bool(masked_loss), conv_rank=conv_rank or 0)
            job = self.queue.submit(settings)
        except (UserInputError, ValueError) as error:
            return gr.skip(), _error(error)
        return gr.Dropdown(choices=self.job_choices(), value=job.number), f"Queued {job.label}."

    def start_race(self, data, methods, rank, steps, learning_rate, seed, checkpointing, validation, name, held_out, loss_every,
                   masked_loss=False, conv_rank=0):
        """One run per chosen method, otherwise the same (data, seed, steps, held-out images), trained side by side."""
        try:
            settings = TrainingSettings(self._training_folder(data), "none", rank, steps, learning_rate, seed, checkpointing,
                                        validation, name or "", validation_split=held_out, validation_loss_steps=loss_every,
                                        masked_loss=bool(masked_loss), conv_rank=conv_rank or 0)
            jobs = self.queue.submit_race(settings, list(methods or []))
        except (UserInputError, ValueError) as error:
            return gr.skip(), _error(error)
        return (gr.Dropdown(choices=self.job_choices(), value=jobs[0].number),
                f"Race {jobs[0].settings.race} queued: " + ", ".join(job.label for job in jobs) + ".")

    def race_view(self):
        """The newest race: its validation-loss figure and each run's newest validation grid, side by side."""
        jobs = self.queue.race_jobs()
        if not jobs:
            return None, []
        figure = race_figure([(f"#{j.number} {j.settings.method}", j.output) for j in jobs])
        images = []
        for job in jobs:
            newest = run_folders.validation_images(run_folders.Run(job.output, job.label, None), limit=1)
            images.extend((path, f"#{job.number} {job.settings.method}: {caption}") for path, caption in newest)
        return figure, images

    def job_choices(self) -> list[tuple[str, int]]:
        return [(f"{job.label} ({job.status})", job.number) for job in self.queue.jobs()]

    def cancel_training(self, number):
        try:
            if number is None:
                raise UserInputError("choose a run first")
            job = self.queue.cancel(int(number))
        except UserInputError as error:
            return _error(error)
        return f"Stopping {job.label}; its last checkpoint stays usable (`--resume_from_checkpoint latest`)."

    def training_status(self, number):
        jobs = self.queue.jobs()
        table = pd.DataFrame([[j.number, j.output.name, j.settings.method, j.settings.steps, j.status,
                               len(run_folders.read_metrics(j.output))] for j in jobs],
                             columns=["#", "run folder", "method", "steps", "status", "steps logged"])
        job = next((j for j in jobs if j.number == number), jobs[-1] if jobs else None)
        if job is None:
            return table, pd.DataFrame(columns=["step", "loss", "run"]), [], "", gr.Dropdown(choices=[]), None, []
        run = run_folders.Run(job.output, job.label, None)
        frame = pd.DataFrame(run_folders.loss_rows([run], 0.0), columns=["step", "loss", "run"])
        return (table, frame, run_folders.validation_images(run), log_tail(job), gr.Dropdown(choices=self.job_choices(), value=job.number),
                *self.race_view())


def summary_markdown(sampling: Sampling, base_label: str, cells) -> str:
    lines = [
        f"**{sampling.prompt}**" + (f" (negative: *{sampling.negative_prompt}*)" if sampling.negative_prompt else "")
        + f" · seed {sampling.seed} · {sampling.steps} steps · guidance {sampling.guidance:g} · {sampling.size} px · "
        f"scheduler {sampling.scheduler} · base `{base_label}` · the same initial noise for every image",
        "",
        "| image | adapter | kind | strength | weights | time | adapter load / merge | mean \\|Δ\\| vs base |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for cell in cells:
        if cell.source is None:
            lines.append(f"| base | - | - | - | - | {_seconds(cell.seconds)} | - | - |")
            continue
        lines.append(
            f"| {cell.source.label} | `{cell.source.label}` | {cell.source.method} | {cell.setting.strength:g} | {cell.weights} | "
            f"{_seconds(cell.seconds)} | {_seconds(cell.setup_seconds)} | {cell.mean_difference:.1f} / 255 |"
        )
    return "\n".join(lines)


def show_runs_handler(folders: Folders):
    def show_runs(paths, smoothing):
        try:
            chosen = [run_folders.run_at(path, folders.adapters) for path in paths or []]
        except UserInputError as error:
            raise gr.Error(str(error), print_exception=False) from None
        rows = run_folders.loss_rows(chosen, float(smoothing))
        headers, settings = run_folders.settings_table(chosen)
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
        with_validation = [(run.label, run.path) for run in chosen if race_curves(run.path)["step"]]
        return (pd.DataFrame(rows, columns=["step", "loss", "run"]), pd.DataFrame(settings, columns=headers),
                pd.DataFrame(run_folders.report_table(chosen), columns=run_folders.REPORT_HEADERS), "\n".join(notes),
                race_figure(with_validation) if with_validation else None)

    return show_runs


# -- the page ---------------------------------------------------------------------------------------------------
def _image(label: str, elem_id: str, height: int = 220) -> gr.Image:
    return gr.Image(label=label, type="filepath", format="png", height=height, interactive=False, elem_id=elem_id,
                    elem_classes=["pixelated"], buttons=["download", "fullscreen"])


def build_demo(handlers: Handlers) -> gr.Blocks:
    comparer, folders = handlers.comparer, handlers.folders
    choices, default_a, default_b = adapter_choices(folders)
    grid_choices = [(BASE_CHOICE, BASE_CHOICE), *choices]
    runs, default_runs = run_choices(folders)
    limits = comparer.limits
    with gr.Blocks(title="LoRA vs ResLoRA", analytics_enabled=False) as demo:
        gr.Markdown(INTRO)
        with gr.Row():
            base = gr.Dropdown(model_choices(folders), value=str(comparer.base), label="Base model (diffusers folder or single file)",
                               allow_custom_value=True, scale=4, elem_id="base-model")
            refresh = gr.Button("Rescan folders", size="sm", scale=1)
        gr.Markdown("Adapter folders: " + ", ".join(f"`{root}`" for root in folders.adapters), elem_id="roots")
        with gr.Tab("Generate", id="generate"):
            with gr.Row():
                with gr.Column(scale=2, min_width=320):
                    prompt = gr.Textbox(label="Prompt", value="fish", lines=2, elem_id="prompt")
                    negative = gr.Textbox(label="Negative prompt", lines=1, elem_id="negative-prompt")
                    with gr.Row():
                        generate_button = gr.Button("Generate", variant="primary", elem_id="generate")
                        cancel_button = gr.Button("Cancel", variant="stop", elem_id="cancel")
                    with gr.Row():
                        seed = gr.Number(label="Seed", value=0, precision=0, info="-1: a random one", elem_id="seed")
                        steps = gr.Number(label="Steps", value=20, precision=0, info=f"1 to {comparer.max_steps}", elem_id="steps")
                    with gr.Row():
                        guidance = gr.Slider(0, limits.max_guidance, value=3.0, step=0.5, label="Guidance scale", elem_id="guidance")
                        size = gr.Number(label="Size (px)", value=comparer.native_size, precision=0,
                                         info=f"multiple of {comparer.size_multiple}, up to {limits.max_size}", elem_id="size")
                    scheduler = gr.Dropdown(comparer.scheduler_choices, value=MODEL_DEFAULT, label="Scheduler", elem_id="scheduler")
                    with gr.Group():
                        adapter_a = gr.Dropdown(choices, value=default_a, label="Adapter A (empty: none; a path inside the adapter folders may be typed)",
                                                allow_custom_value=True, elem_id="adapter-a")
                        strength_a = gr.Slider(-1, 2, value=1.0, step=0.05, label="Strength A", elem_id="strength-a")
                        adapter_b = gr.Dropdown(choices, value=default_b, label="Adapter B", allow_custom_value=True, elem_id="adapter-b")
                        strength_b = gr.Slider(-1, 2, value=1.0, step=0.05, label="Strength B", elem_id="strength-b")
                    with gr.Row():
                        weights = gr.Radio(["unmerged", "merged"], value="unmerged", label="Native adapters' weights", elem_id="weights")
                        merge_method = gr.Dropdown(list(MERGE_METHODS), value="input", label="Merge α estimate (is / ms)", elem_id="merge-method")
                    upload = gr.File(label="Add a LoRA file (kohya or diffusers .safetensors; saved in the app's folder)",
                                     file_types=[".safetensors"], type="filepath", elem_id="upload")
                with gr.Column(scale=3):
                    status = gr.Markdown(elem_id="status")
                    images, captions = [], []
                    with gr.Row(equal_height=True):
                        for title, key in (("Base", "base"), ("A", "a"), ("B", "b")):
                            with gr.Column(min_width=140):
                                images.append(_image(title, f"image-{key}"))
                                captions.append(gr.Markdown(f"**{title}**", elem_id=f"caption-{key}"))
                        with gr.Column(min_width=140):
                            difference = _image("|A − B|", "image-difference")
                            gain = gr.Slider(1, 20, value=4, step=1, label="Difference gain", elem_id="gain")
                            difference_note = gr.Markdown(elem_id="difference-note")
                    summary = gr.Markdown(elem_id="summary")
        with gr.Tab("Grid", id="grid"):
            with gr.Row():
                with gr.Column(scale=2, min_width=320):
                    prompts = gr.Textbox(label="Prompts (one per line)", value="fish\nred heart", lines=3, elem_id="grid-prompts")
                    seeds = gr.Textbox(label="Seeds (comma-separated)", value="0, 1", elem_id="grid-seeds")
                    grid_adapters = gr.Dropdown(grid_choices, value=[v for v in (default_a, default_b) if v], multiselect=True,
                                                allow_custom_value=True, label="Adapters (columns)", elem_id="grid-adapters")
                    strengths = gr.Textbox(label="Strengths (comma-separated)", value="1", elem_id="grid-strengths")
                    grid_weights = gr.CheckboxGroup(["unmerged", "merged"], value=["unmerged"], label="Native adapters' weights", elem_id="grid-weights")
                    grid_methods = gr.CheckboxGroup(list(MERGE_METHODS), value=["input"], label="α estimators (merged is / ms)", elem_id="grid-methods")
                    with gr.Row():
                        grid_button = gr.Button("Draw grid", variant="primary", elem_id="draw-grid")
                        grid_cancel = gr.Button("Cancel", variant="stop", elem_id="grid-cancel")
                    gr.Markdown("The sampling settings (steps, guidance, size, scheduler, negative prompt) are the Generate tab's.")
                with gr.Column(scale=3):
                    grid_status = gr.Markdown(elem_id="grid-status")
                    grid_image = gr.Image(label="Grid", type="filepath", format="png", interactive=False, elem_id="grid-image",
                                          buttons=["download", "fullscreen"])
                    grid_table = gr.Dataframe(interactive=False, wrap=True, elem_id="grid-table")
        with gr.Tab("Train", id="train"):
            with gr.Row():
                with gr.Column(scale=2, min_width=320):
                    data_list = data_choices(folders)
                    data = gr.Dropdown(data_list, value=data_list[0][1] if data_list else None, allow_custom_value=True,
                                       label="Training images (a folder with metadata.jsonl or kohya-style caption files, inside the data folders)", elem_id="train-data")
                    method = gr.Radio(list(METHODS), value="is", label="Method (none: plain LoRA)", elem_id="train-method")
                    with gr.Row():
                        rank = gr.Number(label="Rank", value=4, precision=0, elem_id="train-rank")
                        conv_rank = gr.Number(label="Conv rank (LoCon on the ResNet convs; 0: attention only)", value=0, precision=0,
                                              elem_id="train-conv-rank")
                        train_steps = gr.Number(label="Steps", value=100, precision=0, elem_id="train-steps")
                        learning_rate = gr.Number(label="Learning rate", value=1e-3, elem_id="train-lr")
                    with gr.Row():
                        train_seed = gr.Number(label="Seed", value=0, precision=0, elem_id="train-seed")
                        checkpointing = gr.Number(label="Checkpoint every", value=50, precision=0, elem_id="train-checkpointing")
                        validation = gr.Number(label="Validate every", value=50, precision=0, elem_id="train-validation")
                    run_name = gr.Textbox(label="Name (optional)", elem_id="train-name")
                    masked_loss = gr.Checkbox(label="Masked loss: train only the opaque pixels (each image's alpha channel)",
                                              value=False, elem_id="train-masked-loss")
                    with gr.Row():
                        start = gr.Button("Queue run", variant="primary", elem_id="train-start")
                        stop = gr.Button("Cancel run", variant="stop", elem_id="train-cancel")
                    with gr.Group():
                        gr.Markdown("**Race**: the run above once per method chosen, trained side by side on the same data, "
                                    "seed and steps, each with a validation loss on the same held-out images.")
                        race_methods = gr.CheckboxGroup(list(METHODS), value=["none", "is"], label="Methods", elem_id="race-methods")
                        with gr.Row():
                            held_out = gr.Number(label="Held-out fraction", value=0.1, elem_id="race-held-out")
                            loss_every = gr.Number(label="Validation loss every", value=10, precision=0, elem_id="race-loss-every")
                        race_start = gr.Button("Start race", elem_id="race-start")
                    train_status = gr.Markdown(elem_id="train-status")
                with gr.Column(scale=3):
                    job = gr.Dropdown([], label="Run", allow_custom_value=True, elem_id="train-job")
                    jobs_table = gr.Dataframe(interactive=False, elem_id="train-jobs")
                    live_plot = gr.LinePlot(x="step", y="loss", color="run", title="Loss", height=260, elem_id="train-loss")
                    gallery = gr.Gallery(label="Validation images", columns=4, height=200, elem_id="train-validation-images")
                    log = gr.Textbox(label="Log (last lines)", lines=8, max_lines=8, elem_id="train-log")
                    race_plot = gr.Plot(label="Race: validation loss (solid: training-time, dashed: merged)", elem_id="race-plot")
                    race_images = gr.Gallery(label="Race: each run's newest validation images", columns=4, height=200,
                                             elem_id="race-images")
            timer = gr.Timer(2.0)
        with gr.Tab("Runs", id="runs"):
            with gr.Row():
                run_box = gr.CheckboxGroup(runs, value=default_runs, label="Runs", scale=4, elem_id="runs")
                smoothing = gr.Slider(0, 0.99, value=0.9, step=0.01, label="Loss smoothing (EMA)", scale=1)
            show = gr.Button("Show", variant="primary", elem_id="show-runs")
            plot = gr.LinePlot(x="step", y="loss", color="run", title="Training loss", height=360, elem_id="loss-plot")
            notes = gr.Markdown()
            gr.Markdown("### Settings\nThe adapter config, the training flags and summary, the last logged metrics; "
                        "the settings where the chosen runs differ come first.")
            settings = gr.Dataframe(interactive=False, wrap=True, elem_id="settings")
            gr.Markdown("### Merge fidelity\nMerged vs unmerged model on the same inputs and seed, for each way of estimating α "
                        "(★: the one the export used). `exact` merges (LoRA, `bs`) have no error beyond rounding.")
            report = gr.Dataframe(headers=run_folders.REPORT_HEADERS, interactive=False, wrap=True, elem_id="merge-report")
            runs_validation = gr.Plot(label="Validation loss of the runs that logged one (solid: training-time, dashed: merged)",
                                      elem_id="runs-validation-plot")

        generate_inputs = [base, prompt, negative, seed, steps, guidance, size, scheduler, adapter_a, strength_a, adapter_b,
                           strength_b, weights, merge_method, gain]
        generate_event = {"fn": handlers.generate, "inputs": generate_inputs,
                          "outputs": [*images, difference, *captions, difference_note, summary, status],
                          "concurrency_limit": 1, "concurrency_id": "model", "show_progress_on": [status]}
        generate_button.click(api_name="generate", **generate_event)
        prompt.submit(api_name=False, **generate_event)
        cancel_button.click(handlers.cancel, outputs=[status], queue=False, api_name="cancel")
        grid_button.click(handlers.grid, inputs=[base, prompts, seeds, grid_adapters, strengths, grid_weights, grid_methods, negative, steps,
                                                 guidance, size, scheduler],
                          outputs=[grid_image, grid_table, grid_status], concurrency_limit=1, concurrency_id="model",
                          show_progress_on=[grid_status], api_name="grid")
        grid_cancel.click(handlers.cancel, outputs=[grid_status], queue=False, api_name=False)
        upload.upload(handlers.upload, inputs=[upload], outputs=[adapter_a, adapter_b, grid_adapters, status], api_name="upload")

        start.click(handlers.start_training, inputs=[data, method, rank, train_steps, learning_rate, train_seed, checkpointing, validation, run_name,
                                                     masked_loss, conv_rank],
                    outputs=[job, train_status], api_name="train")
        race_start.click(handlers.start_race, inputs=[data, race_methods, rank, train_steps, learning_rate, train_seed, checkpointing,
                                                      validation, run_name, held_out, loss_every, masked_loss, conv_rank],
                         outputs=[job, train_status], api_name="race")
        stop.click(handlers.cancel_training, inputs=[job], outputs=[train_status], api_name="train_cancel")
        status_event = {"fn": handlers.training_status, "inputs": [job], "outputs": [jobs_table, live_plot, gallery, log, job, race_plot, race_images],
                        "show_progress": "hidden"}
        timer.tick(api_name=False, **status_event)
        job.select(api_name="train_status", **status_event)

        def rescan():
            new_choices, _, _ = adapter_choices(folders)
            new_runs, _ = run_choices(folders)
            return (gr.Dropdown(choices=new_choices), gr.Dropdown(choices=new_choices),
                    gr.Dropdown(choices=[(BASE_CHOICE, BASE_CHOICE), *new_choices]), gr.CheckboxGroup(choices=new_runs),
                    gr.Dropdown(choices=model_choices(folders)), gr.Dropdown(choices=data_choices(folders)))

        refresh.click(rescan, outputs=[adapter_a, adapter_b, grid_adapters, run_box, base, data], api_name="rescan")
        show_runs = {"fn": show_runs_handler(folders), "inputs": [run_box, smoothing], "outputs": [plot, settings, report, notes, runs_validation],
                     "concurrency_limit": 4}
        show.click(api_name="runs", **show_runs)
        smoothing.release(api_name=False, **show_runs)
        demo.load(api_name=False, **show_runs)
        demo.unload(handlers.closed)
    return demo

"""The Gradio app: compare what the base model, LoRA and ResLoRA adapters (and users' LoRA files) draw for the same
prompts and seeds, draw labelled grids, and train adapters from the page.

    python app/app.py                 # embedded tiny emoji model + the demo adapters, on http://127.0.0.1:7860
    python app/app.py --base path/to/sd-folder --adapter_root outputs --port 7861 --threads 4

Every path the page accepts lies inside the folders given here (--adapter_root, --models_root, --data_root, and
the app's own --workdir for uploads, saved images and training runs). The port and these folders are checked
before the model is loaded; bad ones stop the app with one `error:` line.
"""

from __future__ import annotations

import argparse
import errno
import os
import shlex
import socket
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(1, str(REPO))  # `reslora_diffusers` from this checkout; this folder is sys.path[0]
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home: the app must work offline
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from paths import check_root  # noqa: E402  (light: the heavy imports wait until the arguments are known good)

from reslora_diffusers.cli import OneLineErrorParser, default_threads, exit_with_error  # noqa: E402
from reslora_diffusers.pipeline_io import UserInputError  # noqa: E402

DEFAULT_BASE = REPO / "assets" / "tiny-emoji-sd"
DEFAULT_ADAPTER_ROOTS = [REPO / "assets" / "demo-adapters", REPO / "outputs"]
DEFAULT_MODELS_ROOTS = [REPO / "assets", REPO / "outputs"]
DEFAULT_DATA_ROOTS = [REPO / "assets"]
DEFAULT_WORKDIR = REPO / "outputs" / "app"


def parse_args(argv=None) -> argparse.Namespace:
    parser = OneLineErrorParser(description="Compare base, LoRA and ResLoRA images side by side in the browser (Gradio).")
    parser.add_argument("--base", default=str(DEFAULT_BASE), help="Base model at start: a diffusers folder or a single-file .safetensors.")
    parser.add_argument("--base_config", default=None, help="Diffusers folder describing single-file bases (default: --base if it is a folder).")
    parser.add_argument("--adapter_root", action="append", default=None,
                        help="Folder searched for adapters and LoRA files (repeat for several). Default: assets/demo-adapters and outputs.")
    parser.add_argument("--models_root", action="append", default=None,
                        help="Folder searched for base models the page may switch to (repeat for several). Default: assets and outputs.")
    parser.add_argument("--data_root", action="append", default=None,
                        help="Folder searched for training image folders (repeat for several). Default: assets.")
    parser.add_argument("--workdir", default=str(DEFAULT_WORKDIR),
                        help="The app's own folder: uploads, saved images and training runs (created; an adapter root). Default: outputs/app.")
    parser.add_argument("--host", default="127.0.0.1", help="Address to listen on; the default serves this machine only.")
    parser.add_argument("--port", type=int, default=7860, help="Port to listen on.")
    parser.add_argument("--share", action="store_true", help="Also open a temporary public gradio.live link (off unless asked).")
    parser.add_argument("--device", default="auto", help="torch device of the pipeline (auto: cuda when available, else cpu).")
    parser.add_argument("--threads", type=int, default=default_threads(),
                        help="CPU threads for torch here and for training runs (default: OMP_NUM_THREADS, else half the cores, at most 4; %(default)s here).")
    parser.add_argument("--train_args", default="",
                        help="Extra flags for every training run started from the page, e.g. \"--train_batch_size 4 --resolution 64\".")
    parser.add_argument("--max_steps", type=int, default=150, help="Largest number of denoising steps a request may ask for.")
    parser.add_argument("--max_size", type=int, default=512, help="Largest image side (px) a request may ask for.")
    parser.add_argument("--queue_size", type=int, default=16, help="Requests that may wait in the queue; more are turned away.")
    args = parser.parse_args(argv)
    if not 1 <= args.port <= 65535:
        parser.error(f"--port must be in 1..65535, got {args.port}")
    if args.max_steps < 1 or args.max_size < 8 or args.queue_size < 1 or args.threads < 1:
        parser.error("--max_steps, --queue_size and --threads must be >= 1 and --max_size >= 8")
    try:
        args.train_args = shlex.split(args.train_args)
    except ValueError as error:
        parser.error(f"--train_args: {error}")
    return args


def check_port(host: str, port: int) -> None:
    """Refuses a port another program holds, before minutes go into loading the model."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        try:
            probe.bind((host, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise UserInputError(f"port {port} on {host} is already in use; choose another with --port") from None
            raise UserInputError(f"cannot listen on {host}:{port}: {error.strerror}; check --host and --port") from None


def check_folders(args) -> dict[str, list[Path]]:
    """The roots, each an existing folder. Given roots must exist; missing default ones are skipped."""
    folders = {}
    for flag, given, defaults in (("--adapter_root", args.adapter_root, DEFAULT_ADAPTER_ROOTS),
                                  ("--models_root", args.models_root, DEFAULT_MODELS_ROOTS),
                                  ("--data_root", args.data_root, DEFAULT_DATA_ROOTS)):
        if given:
            folders[flag] = [check_root(path, flag) for path in given]
        else:
            folders[flag] = [path.resolve() for path in defaults if path.is_dir()]
    workdir = Path(args.workdir).expanduser()
    if workdir.exists() and not workdir.is_dir():
        raise UserInputError(f"--workdir {args.workdir} is not a folder")
    return folders


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        check_port(args.host, args.port)
        roots = check_folders(args)
        workdir = Path(args.workdir).expanduser()
        workdir.mkdir(parents=True, exist_ok=True)
        workdir = workdir.resolve()
        if not Path(args.base).exists():  # in seconds, not after the heavy imports
            hint = " (build it with scripts/pretrain_base.py, or pass --base)" if Path(args.base).resolve() == DEFAULT_BASE else ""
            raise UserInputError(f"base model not found: {Path(args.base).resolve()}{hint}")
    except (UserInputError, OSError) as error:
        exit_with_error(str(error))

    import logging

    import torch
    from generation import Comparer, Limits
    from page import CSS, THEME, Folders, Handlers, build_demo
    from training_jobs import TrainingQueue

    from reslora_diffusers.pipeline_io import load_pipeline, quiet_libraries

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    quiet_libraries()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    base = Path(args.base).resolve()
    base_config = Path(args.base_config).resolve() if args.base_config else (base if base.is_dir() else None)

    def load(path: Path):
        pipe = load_pipeline(path, base_config if path.is_file() else None)
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    try:
        pipe = load(base)
    except UserInputError as error:
        hint = " (build it with scripts/pretrain_base.py, or pass --base)" if base == DEFAULT_BASE else ""
        exit_with_error(f"{error}{hint}")
    folders = Folders(
        adapters=[*roots["--adapter_root"], workdir] if not any(workdir.is_relative_to(r) for r in roots["--adapter_root"]) else roots["--adapter_root"],
        models=[*roots["--models_root"], base] if not any(base.is_relative_to(r) for r in roots["--models_root"]) else roots["--models_root"],
        data=roots["--data_root"],
        workdir=workdir,
    )
    comparer = Comparer(pipe, base, folders.adapters, Limits(max_steps=args.max_steps, max_size=args.max_size), loader=load)
    queue = TrainingQueue(folders.runs, base, args.threads, base_config if base.is_file() else None, args.train_args)
    demo = build_demo(Handlers(comparer, folders, queue))
    demo.queue(default_concurrency_limit=1, max_size=args.queue_size)
    try:
        # The Train tab's gallery shows validation grids from the app's own runs folder; Gradio serves only files in
        # its allowed paths (by default the working directory and /tmp, which a --workdir need not be in).
        demo.launch(server_name=args.host, server_port=args.port, share=args.share, theme=THEME, css=CSS, footer_links=["api"],
                    allowed_paths=[str(folders.runs)])
    except OSError as error:  # taken between the check and now
        exit_with_error(f"cannot listen on {args.host}:{args.port}: {error}; choose another with --port")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

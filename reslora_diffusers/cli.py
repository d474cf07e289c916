"""What every command line here does with bad input: one `error:` line on stderr, no traceback, exit code 2."""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn


def exit_with_error(message: str, code: int = 2) -> NoReturn:
    """Prints `error: <message>` and exits. Under a multi-process launch only the first local process prints,
    but every process exits, so none waits on another."""
    if os.environ.get("LOCAL_RANK", "0") == "0":
        _close_progress_bars()  # a bar left open would share its line with the error
        sys.stderr.write(f"error: {message}\n")
        sys.stderr.flush()
    sys.exit(code)


def _close_progress_bars() -> None:
    tqdm = sys.modules.get("tqdm")
    bars = getattr(getattr(tqdm, "tqdm", None), "_instances", None)
    for bar in list(bars or []):
        bar.close()


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type name if it has none): enough for a one-line error."""
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


class OneLineErrorParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (argparse prints the whole usage block by default)."""

    def error(self, message: str) -> NoReturn:
        exit_with_error(f"{message} (see --help)")


def default_threads() -> int:
    """torch CPU threads for a long command: OMP_NUM_THREADS when set, else half the usable cores, at most 4.

    Not all cores: on a shared 2-core machine a merge took 192-215 s with 2 threads and 27-29 s with 1 (the
    threads spin-wait on each other whenever another process holds a core); the small matrices here gain
    little from more than 4.
    """
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        return int(os.environ["OMP_NUM_THREADS"])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, cores // 2))


def add_threads_argument(parser: argparse.ArgumentParser, default: int | None = None, help: str | None = None) -> None:
    """`--threads N` (checked > 0); apply it with `set_threads(args.threads)`."""

    def positive(text: str) -> int:
        if not text.isdigit() or int(text) <= 0:
            raise argparse.ArgumentTypeError(f"must be a whole number > 0, got {text!r}")
        return int(text)

    parser.add_argument(
        "--threads",
        type=positive,
        default=default,
        help=help or f"torch CPU threads (default here: {default}; OMP_NUM_THREADS when set, else half the cores, at most 4).",
    )


def set_threads(threads: int | None) -> None:
    """Sets torch's intra-op threads (None: leave torch's default)."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)

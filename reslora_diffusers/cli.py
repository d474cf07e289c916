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
        sys.stderr.write(f"error: {message}\n")
        sys.stderr.flush()
    sys.exit(code)


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type name if it has none): enough for a one-line error."""
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


class OneLineErrorParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (argparse prints the whole usage block by default)."""

    def error(self, message: str) -> NoReturn:
        exit_with_error(f"{message} (see --help)")

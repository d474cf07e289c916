"""`metrics.jsonl`: one JSON line per optimizer step (loss, learning rate, speed, validation losses)."""

from __future__ import annotations

import json
from pathlib import Path

from reslora_diffusers.atomic import atomic_write_text


class MetricsFile:
    """Appends one line per step. On resume, lines after the checkpoint's step are dropped first."""

    def __init__(self, path: Path, resume_step: int) -> None:
        self.path = path
        kept = []
        if resume_step > 0 and path.is_file():
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= resume_step:
                        kept.append(line)
                except (json.JSONDecodeError, KeyError, TypeError):
                    break  # a line cut by a crash
        atomic_write_text(path, "".join(line + "\n" for line in kept))
        self.file = path.open("a")

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> list[dict]:
        """Closes the file and returns every record in it."""
        self.file.close()
        return [json.loads(line) for line in self.path.read_text().splitlines()]

"""Training runs started from the page: `accelerate launch train_text_to_image.py …` subprocesses, one at a time —
or, for a race, the runs of one race side by side, each with its share of the threads.

Runs wait in a queue and start in order; each writes into its own new folder under the runs folder (an adapter
root, so a finished run is listed in the Generate tab). Cancel sends SIGINT to the run's process group, as
Ctrl-C would, then SIGTERM / SIGKILL if it does not stop: checkpoints are written atomically
(`checkpoint-<step>` appears complete or not at all), so the last one stays usable
(`--resume_from_checkpoint latest`).
"""

from __future__ import annotations

import datetime
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path

from reslora_diffusers.pipeline_io import UserInputError

REPO = Path(__file__).resolve().parents[1]
METHODS = ("none", "is", "bs", "ms")
LOG_NAME = "train.log"
QUEUED, RUNNING, FINISHED, FAILED, CANCELLED = "queued", "running", "finished", "failed", "cancelled"
STOP_SECONDS = 20  # after SIGINT, then after SIGTERM, before the next signal


@dataclass(frozen=True)
class TrainingSettings:
    data: Path  # an imagefolder inside the data roots (checked by the page)
    method: str = "is"
    rank: int = 4
    steps: int = 100
    learning_rate: float = 1e-3
    seed: int = 0
    checkpointing_steps: int = 50
    validation_steps: int = 50
    name: str = ""
    validation_split: float = 0.0  # > 0: hold out this fraction for the validation loss
    validation_loss_steps: int = 10
    race: int | None = None  # runs of one race train at the same time
    masked_loss: bool = False  # train only where each image's alpha channel is opaque
    conv_rank: int = 0  # > 0: LoCon adapters on the ResNet convolutions too (kohya's conv_dim)


    def check(self) -> TrainingSettings:
        if self.method not in METHODS:
            raise UserInputError(f"method must be one of {list(METHODS)}, got {self.method!r}")
        for name, value, low in (("rank", self.rank, 1), ("steps", self.steps, 1), ("checkpointing steps", self.checkpointing_steps, 1),
                                 ("validation steps", self.validation_steps, 1), ("seed", self.seed, 0), ("conv rank", self.conv_rank, 0)):
            if not isinstance(value, (int, float)) or int(value) != value or value < low:
                raise UserInputError(f"{name} must be a whole number >= {low}, got {value!r}")
        if not isinstance(self.learning_rate, (int, float)) or not 0 < self.learning_rate <= 1:
            raise UserInputError(f"learning rate must be in (0, 1], got {self.learning_rate!r}")
        if not isinstance(self.validation_split, (int, float)) or not 0 <= self.validation_split < 1:
            raise UserInputError(f"held-out fraction must be in [0, 1), got {self.validation_split!r}")
        if not isinstance(self.validation_loss_steps, (int, float)) or int(self.validation_loss_steps) != self.validation_loss_steps \
                or self.validation_loss_steps < 1:
            raise UserInputError(f"validation loss steps must be a whole number >= 1, got {self.validation_loss_steps!r}")
        return self


@dataclass
class Job:
    number: int
    settings: TrainingSettings
    output: Path
    status: str = QUEUED
    return_code: int | None = None
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def log(self) -> Path:
        return self.output.parent / f"{self.output.name}.{LOG_NAME}"

    @property
    def label(self) -> str:
        return f"#{self.number} {self.output.name}"


class TrainingQueue:
    """Runs jobs one after another in a worker thread; `submit`, `cancel` and `jobs` are safe from any thread."""

    def __init__(self, runs_root: Path, base: Path, threads: int, base_config: Path | None = None, extra_args: list[str] | None = None):
        self.runs_root = Path(runs_root)
        self.base, self.base_config = Path(base), base_config
        self.threads = threads
        self.extra_args = list(extra_args or [])
        self._jobs: list[Job] = []
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        threading.Thread(target=self._work, name="training-queue", daemon=True).start()

    def jobs(self) -> list[Job]:
        with self._lock:
            return list(self._jobs)

    def submit(self, settings: TrainingSettings) -> Job:
        settings.check()
        with self._lock:
            number = len(self._jobs) + 1
            stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
            name = settings.name.strip() or f"{'lora' if settings.method == 'none' else 'reslora-' + settings.method}-r{settings.rank}"
            safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in name)[:60]
            job = Job(number, settings, self.runs_root / f"{stamp}-{number:02d}-{safe}")
            self._jobs.append(job)
            self._wake.notify()
        return job

    def submit_race(self, settings: TrainingSettings, methods: list[str]) -> list[Job]:
        """One run per method, identical otherwise (data, seed, steps, held-out images), started together."""
        methods = list(dict.fromkeys(methods))
        if len(methods) < 2:
            raise UserInputError("a race needs at least two methods")
        if not settings.validation_split > 0:
            raise UserInputError("a race compares validation losses: hold out a fraction of the images (> 0)")
        with self._lock:
            race = 1 + max((j.settings.race or 0 for j in self._jobs), default=0)
        base_name = settings.name.strip() or "race"
        return [self.submit(replace(settings, method=method, race=race, name=f"{base_name}{race}-{method}")) for method in methods]

    def race_jobs(self, race: int | None = None) -> list[Job]:
        """The jobs of race `race` (default: the newest race)."""
        jobs = self.jobs()
        races = [j.settings.race for j in jobs if j.settings.race is not None]
        if not races:
            return []
        race = race if race is not None else max(races)
        return [j for j in jobs if j.settings.race == race]

    def cancel(self, number: int) -> Job:
        with self._lock:
            job = next((j for j in self._jobs if j.number == number), None)
            if job is None:
                raise UserInputError(f"no training run #{number}")
            if job.status == QUEUED:
                job.status = CANCELLED
                return job
            process = job.process if job.status == RUNNING else None
        if process is not None:
            job.status = CANCELLED
            threading.Thread(target=self._stop, args=(process,), daemon=True).start()
        return job

    @staticmethod
    def _stop(process: subprocess.Popen) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                return
            try:
                process.wait(timeout=STOP_SECONDS)
                return
            except subprocess.TimeoutExpired:
                continue

    def command(self, job: Job) -> list[str]:
        s = job.settings
        command = [
            sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no",
            str(REPO / "train_text_to_image.py"),
            "--pretrained_model_name_or_path", str(self.base), "--train_data_dir", str(s.data),
            "--res_type", s.method, "--rank", str(int(s.rank)), "--max_train_steps", str(int(s.steps)),
            "--learning_rate", f"{s.learning_rate:g}", "--seed", str(int(s.seed)),
            "--checkpointing_steps", str(int(s.checkpointing_steps)), "--validation_steps", str(int(s.validation_steps)),
            "--output_dir", str(job.output), "--report_to", "none",
        ]
        if s.validation_split > 0:
            command += ["--validation_split", f"{s.validation_split:g}", "--validation_loss_steps", str(int(s.validation_loss_steps))]
        if s.masked_loss:
            command += ["--masked_loss", "--alpha_mask"]
        if s.conv_rank:
            command += ["--conv_rank", str(int(s.conv_rank))]
        if self.base_config is not None:
            command += ["--base_config", str(self.base_config)]
        return command + self.extra_args

    def _work(self) -> None:
        while True:
            with self._lock:
                while not any(j.status == QUEUED for j in self._jobs):
                    self._wake.wait()
                first = next(j for j in self._jobs if j.status == QUEUED)
                # A race starts all its runs at once; the threads are shared out so that they do not oversubscribe.
                group = [j for j in self._jobs if j.status == QUEUED and first.settings.race is not None
                         and j.settings.race == first.settings.race] or [first]
                threads = max(1, self.threads // len(group))
                for job in group:
                    self._start(job, threads)
            for job in group:
                code = job.process.wait()
                with self._lock:
                    job.return_code = code
                    if job.status != CANCELLED:
                        job.status = FINISHED if code == 0 else FAILED

    def _start(self, job: Job, threads: int) -> None:
        job.status = RUNNING
        job.output.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
               "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        with open(job.log, "w") as log:
            # Its own process group: Cancel signals the launcher and the training process together.
            job.process = subprocess.Popen(self.command(job), stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                           env=env, start_new_session=True)


def log_tail(job: Job, lines: int = 40) -> str:
    try:
        text = job.log.read_text(errors="replace")
    except OSError:
        return ""
    # Progress bars rewrite their line with carriage returns: keep the last state of each line.
    return "\n".join(line.rsplit("\r", 1)[-1] for line in text.splitlines()[-lines:])

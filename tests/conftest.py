import os
import sys
from pathlib import Path

# Tests never reach a model hub; the tiny models they need are built from configs.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

# Under pytest-xdist (the README's `-n 2`: one worker per core) each worker, and every process a test starts, keeps
# to one thread: two workers of two torch threads each on two cores run several times slower than one thread each.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


def worker_threads(wanted: int) -> int:
    """`wanted` threads when the suite runs alone, one per worker when it runs on every core."""
    return 1 if os.environ.get("PYTEST_XDIST_WORKER") else wanted


import pytest


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    """The tiny SD pipeline (tiny_models.tiny_pipeline) saved once per test module, for loaders that read folders."""
    from tiny_models import tiny_pipeline

    directory = tmp_path_factory.mktemp("tiny_sd")
    tiny_pipeline().save_pretrained(directory)
    return directory

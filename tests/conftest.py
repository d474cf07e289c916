import os
import sys
from pathlib import Path

# Tests never reach a model hub; the tiny models they need are built from configs.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

"""Write a tiny, randomly initialised SDXL-shaped pipeline folder (two text encoders, text_time UNet).

    python scripts/make_tiny_sdxl.py outputs/tiny-sdxl

It is the one the tests build (``tests/tiny_models.py``): a few MB, for trying the SDXL code paths of the
training script, the merge command and the exports on a CPU in seconds. It draws noise, not pictures.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from reslora_diffusers.atomic import atomic_write_folder  # noqa: E402
from reslora_diffusers.cli import OneLineErrorParser  # noqa: E402


def main(argv=None) -> int:
    parser = OneLineErrorParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", help="Folder to create (a diffusers StableDiffusionXLPipeline).")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing folder.")
    args = parser.parse_args(argv)
    output = Path(args.output_dir)
    if output.exists() and not args.overwrite:
        parser.error(f"{output} exists; pass --overwrite to replace it")

    from tiny_models import tiny_sdxl_pipeline

    pipe = tiny_sdxl_pipeline()
    atomic_write_folder(output, lambda folder: pipe.save_pretrained(folder))
    print(f"wrote a tiny SDXL pipeline to {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Loading a Stable Diffusion base (diffusers folder or single-file `.safetensors`) with clear errors."""

from __future__ import annotations

import functools
import json
import os
import socket
import threading
from pathlib import Path
from urllib.parse import urlsplit

from reslora_diffusers.cli import first_line

PIPELINE_FACTOR = 8  # diffusers' pipelines refuse heights and widths that are not multiples of 8
HUB_TIMEOUT_S = 5.0


class UserInputError(ValueError):
    """Bad input from the command line: reported as one line, without a traceback."""


def quiet_libraries() -> None:
    """Command lines print their own progress: silence diffusers' / transformers' loading bars and notices."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


SDXL_PIPELINE = "StableDiffusionXLPipeline"
_SGM_TEXT_ENCODER_2 = "conditioner.embedders.1.model."  # only SDXL single files hold a second text encoder


def _is_sdxl(folder: Path | None, single_file: Path | None = None) -> bool:
    """SDXL when the folder's model_index.json names the SDXL pipeline, or the single file holds SDXL's encoders."""
    if folder is not None and (folder / "model_index.json").is_file():
        try:
            return json.loads((folder / "model_index.json").read_text()).get("_class_name") == SDXL_PIPELINE
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
            raise UserInputError(f"{folder / 'model_index.json'} is not valid JSON: {error}") from None
    if single_file is not None:
        from safetensors import safe_open

        try:
            with safe_open(str(single_file), "pt") as f:
                return any(key.startswith(_SGM_TEXT_ENCODER_2) for key in f.keys())
        except Exception as error:  # safetensors raises several kinds for a file it cannot read
            raise UserInputError(f"{single_file} is not a readable safetensors file: {first_line(error)}") from None
    return False


def pipeline_class(sdxl: bool):
    """`StableDiffusionXLPipeline` for SDXL bases, `StableDiffusionPipeline` for SD-1.x / 2.x."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline


@functools.lru_cache(maxsize=None)
def _reachable(host: str, port: int, timeout: float) -> bool:
    """Whether a TCP connection to host:port opens within `timeout` seconds (name lookup included)."""
    opened = []

    def connect():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            opened.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=connect, daemon=True)  # a hung name lookup must not hold the command
    thread.start()
    thread.join(timeout)
    return bool(opened)


def hub_access(repo_id: str, revision: str | None = None, cache_dir: str | None = None) -> bool:
    """Whether `repo_id` can be used from the Hub, checked in seconds: True to download, False to use the local cache.

    Raises UserInputError "cannot download <id>: no network; ..." when it is not cached and the Hub cannot be
    reached (HF_HUB_OFFLINE set, or no connection to the endpoint or proxy within HUB_TIMEOUT_S) — instead of
    minutes of retries ending in a message about a missing file.
    """
    from huggingface_hub import constants, try_to_load_from_cache

    cached = isinstance(try_to_load_from_cache(repo_id, "model_index.json", cache_dir=cache_dir, revision=revision), str)
    if constants.HF_HUB_OFFLINE:
        if cached:
            return False
        raise UserInputError(f"cannot download {repo_id}: no network (HF_HUB_OFFLINE is set); pass a local folder")
    endpoint = urlsplit(constants.ENDPOINT)
    proxy_variables = ("HTTPS_PROXY", "https_proxy") if endpoint.scheme == "https" else ("HTTP_PROXY", "http_proxy")
    proxy = next((os.environ[v] for v in proxy_variables if os.environ.get(v)), None)
    target = urlsplit(proxy if "://" in (proxy or "") else f"http://{proxy}") if proxy else endpoint
    port = target.port or (443 if target.scheme == "https" else 80)
    if _reachable(target.hostname or "", port, HUB_TIMEOUT_S):
        return True
    if cached:
        return False
    raise UserInputError(
        f"cannot download {repo_id}: no network ({target.hostname}:{port} unreachable within {HUB_TIMEOUT_S:g} s); pass a local folder"
    )


def hub_access_error(repo_id: str, revision: str | None = None, cache_dir: str | None = None) -> str | None:
    """`hub_access`'s refusal as a message (None when the id can be used)."""
    try:
        hub_access(repo_id, revision, cache_dir)
    except UserInputError as error:
        return str(error)
    return None


def load_pipeline(base: str | os.PathLike, base_config: str | os.PathLike | None = None, torch_dtype=None):
    """A `StableDiffusionPipeline` or, for an SDXL base, a `StableDiffusionXLPipeline`, offline.

    The base is a diffusers folder or a single-file checkpoint. A single file needs `base_config`, a diffusers
    folder (or Hub-style config folder) describing the model, unless diffusers recognises it as a standard
    SD-1.x / 2.x / SDXL checkpoint. Pickled `.ckpt` files are refused.
    """
    import torch

    torch_dtype = torch_dtype or torch.float32
    path = Path(base)
    if not path.exists():
        raise UserInputError(f"base model not found: {path}")
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise UserInputError(f"{path} is not a diffusers Stable Diffusion folder (it has no model_index.json)")
        sdxl = _is_sdxl(path)
        no_safety_checker = {} if sdxl else {"safety_checker": None, "requires_safety_checker": False}
        try:
            return pipeline_class(sdxl).from_pretrained(path, dtype=torch_dtype, local_files_only=True, **no_safety_checker)
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise UserInputError(f"could not load the Stable Diffusion pipeline in {path}: {first_line(error)}") from None
    if path.suffix != ".safetensors":
        raise UserInputError(f"{path}: only .safetensors single-file checkpoints are loaded (pickled files are unsafe)")
    if base_config is not None and not Path(base_config).is_dir():
        raise UserInputError(f"base config folder not found: {base_config}")
    sdxl = _is_sdxl(Path(base_config) if base_config is not None else None, single_file=path)
    no_safety_checker = {} if sdxl else {"safety_checker": None, "requires_safety_checker": False}
    try:
        return pipeline_class(sdxl).from_single_file(
            str(path),
            config=str(base_config) if base_config is not None else None,
            dtype=torch_dtype,
            local_files_only=True,
            **no_safety_checker,
        )
    except Exception as error:  # diffusers raises many kinds here; all mean "this file can't be used"
        hint = "" if base_config is not None else " (pass the diffusers folder it was made from as the base config)"
        raise UserInputError(f"could not load the single-file checkpoint {path}: {first_line(error)}{hint}") from None

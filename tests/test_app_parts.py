"""The app's parts without a server: confinement of paths, start-up checks, grids, image files, kinds of adapters."""

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "app"))
import adapters as adapter_sources  # noqa: E402
import grid as grids  # noqa: E402
import image_files  # noqa: E402
import models as base_models  # noqa: E402
import runs as run_folders  # noqa: E402
from paths import check_root, resolve_inside  # noqa: E402

from reslora_diffusers import image_grid  # noqa: E402
from reslora_diffusers.pipeline_io import UserInputError  # noqa: E402


@pytest.fixture
def roots(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "run").mkdir(parents=True)
    (root / "run" / "reslora_config.json").write_text(json.dumps({"config": {"res_type": "is", "rank": 4}}))
    (outside / "lora").mkdir(parents=True)
    return root, outside


# -- paths -----------------------------------------------------------------------------------------------------
def test_paths_inside_are_resolved_and_outside_refused(roots):
    root, outside = roots
    assert resolve_inside("run", [root]) == (root / "run").resolve()
    assert resolve_inside(str(root / "run"), [root]) == (root / "run").resolve()
    for path in ("/", str(root / ".." / "outside" / "lora"), "../outside/lora", "../../etc", str(outside)):
        with pytest.raises(UserInputError, match="outside the adapter folders"):
            resolve_inside(path, [root])
    link = root / "escape"
    link.symlink_to(outside, target_is_directory=True)
    with pytest.raises(UserInputError, match="outside"):
        resolve_inside(str(link / "lora"), [root])
    with pytest.raises(UserInputError, match="no model path given"):
        resolve_inside("  ", [root], "model")


def test_a_missing_relative_path_is_reported_missing_not_outside(roots):
    root, _ = roots
    with pytest.raises(UserInputError, match=r"^runn not found in the adapter folders"):
        resolve_inside("runn", [root])
    with pytest.raises(UserInputError, match=r"not found$"):
        resolve_inside(str(root / "nope"), [root])


def test_roots_must_be_existing_folders(tmp_path):
    assert check_root(tmp_path, "--data_root") == tmp_path.resolve()
    with pytest.raises(UserInputError, match="--adapter_root .* does not exist"):
        check_root(tmp_path / "nope", "--adapter_root")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserInputError, match="--models_root .* is not a folder"):
        check_root(tmp_path / "file", "--models_root")


# -- start-up checks: one error line, before the model is loaded ----------------------------------------------
def run_app(*args, timeout=120):
    start = time.time()
    result = subprocess.run([sys.executable, str(REPO / "app" / "app.py"), *map(str, args)], capture_output=True, text=True,
                            timeout=timeout, cwd=REPO, check=False)
    return result, time.time() - start


def test_startup_refuses_a_busy_port_and_bad_roots_before_loading(tmp_path):
    missing_base = tmp_path / "no-base"  # never reached: each check below comes before the model is loaded
    (tmp_path / "file").write_text("x")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            free = probe.getsockname()[1]
        cases = [
            (["--port", port], f"error: port {port} on 127.0.0.1 is already in use; choose another with --port"),
            (["--port", free, "--adapter_root", tmp_path / "nope"], "error: --adapter_root"),
            (["--port", free, "--models_root", tmp_path / "file"], "is not a folder"),
            (["--port", free, "--workdir", tmp_path / "file"], "error: --workdir"),
            (["--port", free, "--threads", 0], "--threads must be >= 1"),
        ]
        for args, message in cases:
            result, _ = run_app("--base", missing_base, *args)
            assert result.returncode == 2, (args, result.stderr)
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and message in lines[0] and "base model not found" not in lines[0], (args, result.stderr)


def test_missing_base_is_one_line_error(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result, _ = run_app("--base", tmp_path / "nope", "--port", port, "--workdir", tmp_path / "work")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: base model not found: {tmp_path / 'nope'}"]


def test_default_threads_do_not_oversubscribe(monkeypatch):
    import app as app_module
    from reslora_diffusers import cli

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    for cores, expected in ((1, 1), (2, 1), (4, 2), (64, 4)):
        monkeypatch.setattr(cli.os, "sched_getaffinity", lambda _pid, n=cores: set(range(n)))
        assert app_module.parse_args([]).threads == expected


# -- grids, image files ----------------------------------------------------------------------------------------
def test_grid_settings_skip_combinations_that_draw_the_same():
    combos = grids.settings_product(["", "a", "b"], [0.5, 1.0], ["unmerged", "merged"], ["input", "lstsq"])
    assert combos.count(("", 1.0, False, "input")) == 1
    assert ("a", 0.5, False, "input") in combos and ("a", 1.0, True, "lstsq") in combos
    assert len(combos) == 1 + 2 * 2 * (1 + 2)
    assert grids.parse_list("1, 2\n3", int, "seeds") == [1, 2, 3]
    with pytest.raises(ValueError, match="seeds: cannot read"):
        grids.parse_list("1, x", int, "seeds")


def test_labelled_grid_layout_and_difference():
    red, blue = Image.new("RGB", (32, 32), (255, 0, 0)), Image.new("RGB", (32, 32), (0, 0, 255))
    grid = image_grid.labelled_grid([[red, blue], [blue, red]], ["row 1", "row 2"], ["first\nsecond", "third"])
    header = image_grid.HEADER_LINES * (image_grid.FONT_SIZE + 2) + 8
    assert grid.size == (image_grid.LABEL_WIDTH + 2 * (128 + 4), header + 2 * (128 + 4))
    assert grid.getpixel((image_grid.LABEL_WIDTH + 10, header + 10)) == (255, 0, 0)
    assert grid.getpixel((image_grid.LABEL_WIDTH + 132 + 10, header + 10)) == (0, 0, 255)
    image, mean = grids.difference_image(red, blue, 0.5)
    assert mean == pytest.approx(170.0) and image.getpixel((0, 0)) == (127, 0, 127)


def test_saved_png_carries_a1111_parameters_and_a_safe_name(tmp_path):
    text = image_files.parameters_text("red heart", "blurry", {"Steps": 20, "CFG scale": 7.5, "Adapter": "runs/a, b"})
    assert text == 'red heart\nNegative prompt: blurry\nSteps: 20, CFG scale: 7.5, Adapter: "runs/a, b"'
    name = image_files.image_name("../../Red Heart!", 7, "adapters/res lora", 0.5)
    assert name == "red-heart-seed7-adapters-res-lora-x0.5.png"
    first = image_files.save_png(Image.new("RGB", (4, 4)), tmp_path, name, text)
    second = image_files.save_png(Image.new("RGB", (4, 4)), tmp_path, name, text)
    assert first != second and second.parent == tmp_path
    assert image_files.read_parameters(second) == text


# -- kinds of adapters and models -------------------------------------------------------------------------------
def test_adapter_and_model_kinds(tmp_path):
    lora = {"down": torch.zeros(2, 8), "up": torch.zeros(8, 2)}
    save_file({"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": lora["down"],
               "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": lora["up"]}, tmp_path / "kohya.safetensors")
    (tmp_path / "run").mkdir()
    save_file({"unet.mid_block.attentions.0.proj_in.lora_A.weight": lora["down"],
               "unet.mid_block.attentions.0.proj_in.lora_B.weight": lora["up"]}, tmp_path / "run" / "pytorch_lora_weights.safetensors")
    save_file({"model.diffusion_model.out.0.weight": torch.zeros(4)}, tmp_path / "checkpoint.safetensors")
    (tmp_path / "pickle.safetensors").write_bytes(b"\x80\x04K\x01.")
    assert adapter_sources.lora_file_kind(tmp_path / "kohya.safetensors") == "kohya"
    assert adapter_sources.lora_file_kind(tmp_path / "run" / "pytorch_lora_weights.safetensors") == "diffusers"
    assert adapter_sources.lora_file_kind(tmp_path / "checkpoint.safetensors") is None
    assert adapter_sources.lora_file_kind(tmp_path / "pickle.safetensors") is None
    found = {s.label: s.method for s in adapter_sources.discover_adapters([tmp_path])}
    name = tmp_path.name
    assert found == {f"{name}/kohya.safetensors": "kohya LoRA", f"{name}/run/pytorch_lora_weights.safetensors": "diffusers LoRA"}
    assert adapter_sources.adapter_at("run", [tmp_path]).kind == "diffusers"  # a folder holding a diffusers LoRA
    with pytest.raises(UserInputError, match="is not a LoRA file"):
        adapter_sources.adapter_at("checkpoint.safetensors", [tmp_path])
    assert [m.kind for m in base_models.discover_models([tmp_path])] == ["single file"]
    with pytest.raises(UserInputError, match="is not a single-file"):
        base_models.model_at("kohya.safetensors", [tmp_path])
    with pytest.raises(UserInputError, match="is not a diffusers"):
        base_models.model_at("run", [tmp_path])


def test_validation_images_newest_first(tmp_path):
    (tmp_path / "validation").mkdir()
    for step in (0, 2, 4):
        Image.new("RGB", (4, 4)).save(tmp_path / "validation" / f"step-{step:06d}.png")
    run = run_folders.Run(tmp_path, "run", None)
    assert [caption for _, caption in run_folders.validation_images(run)] == ["step-000004", "step-000002", "step-000000"]


def test_the_train_tab_lists_imagefolders_and_kohya_caption_folders(tmp_path):
    import page as page_parts

    image = Image.new("RGB", (8, 8))
    (tmp_path / "imagefolder").mkdir()
    image.save(tmp_path / "imagefolder" / "a.png")
    (tmp_path / "imagefolder" / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "a"}\n')
    concept = tmp_path / "projects" / "kohya" / "10_sks dog"  # a data set whose captions sit in an `N_name` folder
    concept.mkdir(parents=True)
    image.save(concept / "b.png")
    (concept / "b.txt").write_text("sks dog")
    (tmp_path / "flat").mkdir()  # captioned images directly in the folder
    image.save(tmp_path / "flat" / "c.png")
    (tmp_path / "flat" / "c.caption").write_text("c")
    (tmp_path / "unreadable").mkdir()  # listed; the training run reports the caption file in one line
    image.save(tmp_path / "unreadable" / "e.png")
    (tmp_path / "unreadable" / "e.txt").write_bytes(b"\xff\xfe\xfa")
    (tmp_path / "uncaptioned").mkdir()
    image.save(tmp_path / "uncaptioned" / "d.png")
    folders = page_parts.Folders(adapters=[], models=[], data=[tmp_path], workdir=tmp_path / "work")
    listed = sorted(Path(path).relative_to(tmp_path).as_posix() for _, path in page_parts.data_choices(folders))
    assert listed == ["flat", "imagefolder", "projects/kohya", "unreadable"]  # not the concept folder on its own, not `uncaptioned`


# -- cancel ----------------------------------------------------------------------------------------------------
def test_cancel_replies_cancelled_once_the_job_stopped_so_the_status_never_sticks_at_cancelling():
    """The job's own reply and the cancel button's reply both set the status line, in whichever order the browser
    gets them; the cancel reply used to be "Cancelling…", which stuck when it came second (CI's browser test)."""
    import threading

    import gradio as gr
    from generation import Comparer
    from page import CANCELLED, Handlers

    comparer = object.__new__(Comparer)  # only the job lock and the cancel flag: no pipeline needed
    comparer.lock, comparer.cancel_requested = threading.Lock(), threading.Event()
    handlers = Handlers(comparer, folders=None, queue=None)
    assert isinstance(handlers.cancel(), type(gr.skip())), "with nothing running the last status stays"

    started = threading.Event()

    def job():  # a generation that notices the cancel at its next step, a little later
        with comparer.lock:
            started.set()
            comparer.cancel_requested.wait(timeout=30)
            time.sleep(0.3)
            comparer.cancel_requested.clear()

    thread = threading.Thread(target=job)
    thread.start()
    started.wait(timeout=10)
    try:
        assert handlers.cancel() == CANCELLED
        assert not comparer.busy
    finally:
        comparer.cancel_requested.set()
        thread.join()

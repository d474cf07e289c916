"""The Gradio app (`app/app.py`), started as users start it, on a tiny pipeline and tiny adapters built here.

Through `gradio_client`: three valid, distinct images from the same noise; merged LoRA equals unmerged; readable
messages for bad input; queued concurrent requests; the training tab's curves, settings and merge report.
In a real headless browser (Debian's chromium driven by Playwright, no browser download): type a prompt,
click Generate, wait for the three images, save a screenshot.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import perturb_adapter, tiny_pipeline, tiny_unet

from reslora_diffusers import ResLoRAConfig, apply_reslora, save_adapter

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "app"))
import runs as run_folders  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
]
STARTUP_SECONDS = 150
SIZE = 32  # tiny_pipeline: 16 latent px × VAE factor 2


def save_tiny_adapter(pipe, folder: Path, res_type: str, seed: int, with_report: bool = True) -> None:
    """A perturbed adapter (so it changes the image) with input norms, a metrics.jsonl and a merge report."""
    adapter = apply_reslora(pipe.unet, ResLoRAConfig(res_type=res_type, rank=4, lora_alpha=4.0))
    perturb_adapter(adapter, std=0.3, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.enable_grad():  # blocks record their input norms (for the input-based merge) in training passes
        pipe.unet(
            torch.randn(1, 4, 16, 16, generator=generator),
            torch.tensor([500]),
            encoder_hidden_states=torch.randn(1, 12, pipe.text_encoder.config.hidden_size, generator=generator),
        )
    save_adapter(adapter, folder, extra={"base_model": "tiny", "global_step": 30})
    adapter.remove()
    lines = [json.dumps({"step": s, "loss": 1.0 / s + 0.01 * seed, "lr": 1e-3, "seconds": s * 0.1}) for s in range(1, 31)]
    (folder / run_folders.METRICS_NAME).write_text("\n".join(lines) + "\n{broken line")
    if with_report:
        method = "exact" if res_type == "none" else "input"
        report = {
            "res_type": res_type, "pre_num": -1, "chosen": method,
            "methods": {method: {"alpha": {"count": 0}, "unet_relative_error": 1e-7, "image_psnr_db": float("inf")}},
        }
        (folder / "pytorch_lora_weights.safetensors.merge_report.json").write_text(json.dumps(report))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """{base, root, outside}: a saved tiny pipeline, an adapter root with lora / reslora / mismatch, one adapter outside."""
    tmp = tmp_path_factory.mktemp("app")
    pipe = tiny_pipeline()
    pipe.save_pretrained(tmp / "base")
    root = tmp / "adapters"
    save_tiny_adapter(pipe, root / "lora", "none", seed=1)
    save_tiny_adapter(pipe, root / "reslora", "is", seed=2)
    save_tiny_adapter(pipe, tmp / "outside" / "lora", "none", seed=3)
    other = apply_reslora(tiny_unet(), ResLoRAConfig(res_type="none", rank=4))  # trained for another base model
    save_adapter(other, root / "mismatch")
    (root / ".half-written").mkdir()
    (root / ".half-written" / "reslora_config.json").write_text("{")
    return {"base": tmp / "base", "root": root, "outside": tmp / "outside"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(setup, tmp_path_factory):
    """`python app/app.py` on a free localhost port; yields its URL."""
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "app.log"
    # One thread: the tiny model gains nothing from more, and a busy CI machine loses a lot to oversubscription.
    env = {"OMP_NUM_THREADS": "1", **os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    command = [
        sys.executable, str(REPO / "app" / "app.py"), "--base", str(setup["base"]), "--adapter_root", str(setup["root"]),
        "--port", str(port), "--max_steps", "50", "--device", "cpu",
    ]
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + STARTUP_SECONDS
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"the app exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail(f"the app did not answer within {STARTUP_SECONDS} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def client(server, tmp_path_factory):
    from gradio_client import Client

    return Client(server, verbose=False, analytics_enabled=False, download_files=str(tmp_path_factory.mktemp("downloads")))


def request(setup, **changes) -> dict:
    args = {
        "prompt": "fish", "negative_prompt": "", "seed": 7, "steps": 4, "guidance": 5.0, "size": SIZE,
        "scheduler": "model default", "lora": str(setup["root"] / "lora"), "lora_path": "",
        "reslora": str(setup["root"] / "reslora"), "reslora_path": "", "weights": "unmerged", "merge_method": "input",
    }
    args.update(changes)
    return args


def generate(client, args: dict):
    *files, _base_caption, _lora_caption, _reslora_caption, summary = client.predict(*args.values(), api_name="/generate")
    return [np.asarray(Image.open(f).convert("RGB"), dtype=np.float64) for f in files], files, summary


def test_client_gets_three_valid_distinct_images(client, setup):
    images, files, summary = generate(client, request(setup))
    assert len(images) == 3
    for path, image in zip(files, images):
        with Image.open(path) as opened:
            opened.verify()
        assert image.shape == (SIZE, SIZE, 3)
        assert image.std() > 0, "a blank image"
    base, lora, reslora = images
    for a, b in ((base, lora), (base, reslora), (lora, reslora)):
        assert np.abs(a - b).mean() > 0.5, "two of the images are the same"
    assert "seed 7" in summary and "lora" in summary and "reslora" in summary


def test_same_noise_and_merged_lora_equals_unmerged(client, setup):
    unmerged, _, _ = generate(client, request(setup))
    merged, _, summary = generate(client, request(setup, weights="merged"))
    assert np.array_equal(unmerged[0], merged[0]), "the base image changed: not the same noise, or an adapter leaked into the base"
    assert np.abs(unmerged[1] - merged[1]).max() <= 2, "a plain LoRA merges exactly"
    # The merged `is` ResLoRA is an approximation (α·x_n for x_{n-1}): the adapter's effect stays, not exactly.
    assert np.abs(merged[2] - merged[0]).mean() > 0.5
    assert "merged (exact)" in summary and "merged (input)" in summary


def test_scheduler_path_field_and_an_empty_slot(client, setup):
    args = request(setup, scheduler="Euler ancestral", lora="", lora_path="lora", reslora="")
    base, lora, reslora, _, _, reslora_caption, summary = client.predict(*args.values(), api_name="/generate")
    assert Image.open(base).size == Image.open(lora).size == (SIZE, SIZE)
    assert reslora is None and "no adapter chosen" in reslora_caption
    assert "Euler ancestral" in summary and "adapters/lora" in summary


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"prompt": "   "}, "Type a prompt"),
        ({"steps": 100000}, "steps must be between 1 and 50"),
        ({"steps": 0}, "steps must be between 1 and 50"),
        ({"size": 100000}, "size must be a multiple of 4 between 4 and 512"),
        ({"size": 30}, "size must be a multiple of 4"),
        ({"guidance": 1e9}, "greater than maximum value 30"),  # the slider checks its range itself
        ({"lora": "MISMATCH"}, "trained on a different base model"),
        ({"lora_path": "../outside/lora"}, "outside the adapter folders"),
        ({"reslora_path": "/etc"}, "outside the adapter folders"),
        ({"reslora_path": "."}, "is not an adapter folder"),
    ],
)
def test_bad_input_gives_a_readable_message(client, setup, changes, message):
    from gradio_client.exceptions import AppError

    if changes.get("lora") == "MISMATCH":
        changes = {"lora": str(setup["root"] / "mismatch")}
    with pytest.raises(AppError) as error:
        client.predict(*request(setup, **changes).values(), api_name="/generate")
    assert message in str(error.value)
    assert "Traceback" not in str(error.value)


def test_a_refused_adapter_leaves_the_model_as_it_was(client, setup):
    from gradio_client.exceptions import AppError

    before, _, _ = generate(client, request(setup))
    with pytest.raises(AppError):
        client.predict(*request(setup, reslora=str(setup["root"] / "mismatch")).values(), api_name="/generate")
    after, _, _ = generate(client, request(setup))
    assert all(np.array_equal(a, b) for a, b in zip(before, after))


def test_concurrent_requests_are_queued(client, setup):
    jobs = [client.submit(*request(setup, seed=seed).values(), api_name="/generate") for seed in (11, 12)]
    results = [job.result(timeout=120) for job in jobs]
    for result in results:
        files = result[:3]
        assert all(Image.open(f).size == (SIZE, SIZE) for f in files)
    assert not np.array_equal(np.asarray(Image.open(results[0][0])), np.asarray(Image.open(results[1][0])))


def test_training_tab_shows_curves_settings_and_reports(client, setup):
    root = setup["root"]
    plot, settings, report, notes = client.predict([str(root / "lora"), str(root / "reslora")], 0.5, api_name="/runs")
    runs = {row["run"] for row in plot["value"]["data"]} if "value" in plot else {row[2] for row in plot["data"]}
    assert runs == {"adapters/lora", "adapters/reslora"}
    assert settings["headers"] == ["setting", "adapters/lora", "adapters/reslora"]
    res_type = next(row for row in settings["data"] if row[0] == "adapter: res_type")
    assert res_type[1:] == ["none", "is"]
    assert [row[2] for row in report["data"]] == ["exact ★", "input ★"]
    assert notes == ""


def test_training_tab_refuses_folders_outside_the_roots(client, setup):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="not in the list of choices"):
        client.predict([str(setup["outside"] / "lora")], 0.5, api_name="/runs")


def test_rescan_finds_a_run_added_while_the_app_runs(client, setup):
    new_run = setup["root"] / "later" / "run"
    new_run.mkdir(parents=True)
    shutil.copy(setup["root"] / "reslora" / run_folders.METRICS_NAME, new_run)
    _lora_choices, _reslora_choices, run_choices = client.predict(api_name="/rescan")
    assert str(new_run) in [value for _label, value in run_choices["choices"]]
    _plot, _settings, _report, notes = client.predict([str(new_run)], 0.0, api_name="/runs")
    assert "adapters/later/run` has no merge report" in notes


def test_browser_generates_three_images(server, tmp_path):
    if not CHROMIUM.is_file():
        (pytest.fail if os.environ.get("CI") else pytest.skip)(f"{CHROMIUM} is missing: apt-get install chromium")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(server)
            page.locator("#prompt textarea").fill("red heart")
            page.locator("#generate").click()
            for slot in ("base", "lora", "reslora"):
                image = page.locator(f"#image-{slot} img")
                image.wait_for(state="visible", timeout=60_000)
                assert image.evaluate("img => img.complete && img.naturalWidth") == SIZE
            sync_api.expect(page.locator("#summary")).to_contain_text("red heart", timeout=10_000)
            screenshot = tmp_path / "app.png"
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    assert Image.open(screenshot).size[0] >= 1400
    if os.environ.get("APP_SCREENSHOT"):
        shutil.copy(screenshot, os.environ["APP_SCREENSHOT"])


# -- run folders, without the server ---------------------------------------------------------------------------
def test_discovery_lists_adapters_and_skips_half_written_folders(setup):
    found = run_folders.discover_runs([setup["root"]], adapters_only=True)
    assert [run.label for run in found] == ["adapters/lora", "adapters/mismatch", "adapters/reslora"]
    assert [run.method for run in found] == ["LoRA", "LoRA", "ResLoRA is"]


def test_paths_outside_the_roots_are_refused(setup, tmp_path):
    root = setup["root"]
    assert run_folders.resolve_inside("lora", [root]) == (root / "lora").resolve()
    assert run_folders.resolve_inside(str(root / "reslora"), [root]) == (root / "reslora").resolve()
    for path in ("/", str(root / ".." / "outside" / "lora"), "../../etc", ""):
        with pytest.raises(ValueError):
            run_folders.resolve_inside(path, [root])
    link = root / "escape"
    link.symlink_to(setup["outside"], target_is_directory=True)
    try:
        with pytest.raises(ValueError, match="outside"):
            run_folders.resolve_inside(str(link / "lora"), [root])
    finally:
        link.unlink()


def test_metrics_reading_and_smoothing(setup):
    records = run_folders.read_metrics(setup["root"] / "reslora")
    assert [r["step"] for r in records] == list(range(1, 31))  # the broken last line is skipped
    assert run_folders.smooth([2.0, 2.0, 2.0], 0.9) == pytest.approx([2.0, 2.0, 2.0])
    assert run_folders.smooth([1.0, 3.0], 0.0) == [1.0, 3.0]


def test_missing_base_is_one_line_error(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "app" / "app.py"), "--base", str(tmp_path / "nope"), "--port", str(free_port())],
        capture_output=True, text=True, timeout=120, cwd=REPO, check=False,
    )
    assert result.returncode == 2
    assert "base model not found" in result.stderr and "Traceback" not in result.stderr

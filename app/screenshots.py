"""Screenshots of each tab of the real page, for the README: starts the app on the embedded model and demo adapters,
drives it in headless chromium (Playwright with Debian's /usr/bin/chromium) and writes small PNGs.

    python app/screenshots.py --output docs/screenshots
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
WIDTH = 900  # px of the saved PNGs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def save_small(page, path: Path) -> None:
    page.screenshot(path=str(path))
    with Image.open(path) as image:
        small = image.convert("RGB").resize((WIDTH, round(image.height * WIDTH / image.width)), Image.Resampling.LANCZOS)
    small.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(REPO / "docs" / "screenshots"))
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    from playwright.sync_api import expect, sync_playwright

    port = free_port()
    with tempfile.TemporaryDirectory() as work:
        command = [sys.executable, str(REPO / "app" / "app.py"), "--port", str(port), "--workdir", work, "--threads", "1",
                   "--train_args", "--num_validation_images 2 --validation_inference_steps 8"]
        server = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            url = f"http://127.0.0.1:{port}/"
            for _ in range(600):
                try:
                    urllib.request.urlopen(url, timeout=5)
                    break
                except OSError:
                    time.sleep(1)
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=args.chromium, headless=True, args=["--no-sandbox"])
                page = browser.new_page(viewport={"width": 1400, "height": 1050})
                page.goto(url)
                page.locator("#prompt textarea").fill("red heart")
                page.locator("#generate").click()
                expect(page.locator("#status")).to_contain_text("Done.", timeout=300_000)
                save_small(page, output / "generate.png")

                page.locator("#steps input").first.fill("8")
                page.get_by_role("tab", name="Grid").click()
                page.locator("#draw-grid").click()
                expect(page.locator("#grid-status")).to_contain_text("Done", timeout=1_200_000)
                save_small(page, output / "grid.png")

                page.get_by_role("tab", name="Train").click()
                page.locator("#train-steps input").first.fill("30")
                page.locator("#train-validation input").first.fill("10")
                page.locator("#train-start").click()
                expect(page.locator("#train-jobs")).to_contain_text("running", timeout=60_000)
                page.locator("#train-validation-images img").nth(1).wait_for(timeout=900_000)
                save_small(page, output / "train.png")
                page.locator("#train-cancel").click()

                page.get_by_role("tab", name="Runs").click()
                page.locator("#show-runs").click()
                page.wait_for_timeout(3000)
                save_small(page, output / "runs.png")
                browser.close()
        finally:
            server.terminate()
            server.wait(timeout=60)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

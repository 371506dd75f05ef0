"""Screenshots of the research inspector's views of issue 36 for docs/ui.md (docs/screenshots.py takes the
README's): `python app.py` on the tiny random model in headless Chromium (Playwright), one answer per view, each
view cut out of the page and saved small (a palette PNG) as docs/images/inspector-*.png.

    .venv/bin/python docs/inspector_screenshots.py       # needs /usr/bin/chromium and the playwright package
    .venv/bin/python docs/inspector_screenshots.py --out /tmp/shots

The model's weights are random, so its answers are noise and so are its maps: the pictures show what the views
look like, not what the real model attends to.
"""
from __future__ import annotations

import argparse
import io
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "assets"
MAX_BYTES = 150_000


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--model", default=None, help="default: a tiny random model with the real Qwen vocabulary "
                                                      "(its noise reads as words), written once to the app's cache")
    args = parser.parse_args(argv)
    args.model = args.model or str(tiny_qwen_model())
    from playwright.sync_api import sync_playwright

    args.out.mkdir(parents=True, exist_ok=True)
    server, url = start_app(args.model)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=args.chromium,
                                                 args=["--headless", "--no-sandbox", "--disable-gpu"])
            take_all(browser, url, args.out)
            browser.close()
    finally:
        server.terminate()
        server.wait(10)
    return 0


def tiny_qwen_model() -> Path:
    sys.path.insert(0, str(ROOT))
    from llava_ui.checkpoints.random import write_random_checkpoint
    from llava_ui.config import app_home

    folder = app_home() / "tiny-random-qwen-vocab"
    if not (folder / "config.json").exists():
        write_random_checkpoint(folder, "paddlenlp", "tiny", vocab="qwen")
    return folder


def start_app(model: str):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    server = subprocess.Popen([sys.executable, "app.py", "--model", model, "--dtype", "float32", "--port", str(port),
                               "--frames", "6", "--eager"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"app.py exited with {server.returncode}")
        try:
            urllib.request.urlopen(url + "/", timeout=2)
            return server, url
        except OSError:
            time.sleep(0.5)
    server.kill()
    raise SystemExit("app.py did not serve the page within 180 s")


def take_all(browser, url: str, out: Path) -> None:
    page = ask(browser, url, "compare <image> and <image>", ["shapes_before.png", "shapes_after.png"],
               ["#token-probabilities-toggle", "#attention-toggle", "#image-effect-toggle"])
    save(page, ["#token-probabilities"], out / "inspector-token-probabilities.png")
    save(page, ["#look-token", "#attention-shares"], out / "inspector-attention-two-images.png")
    save(page, ["#image-effect"], out / "inspector-image-effect.png")
    page.close()
    page = ask(browser, url, "what is in this chart?", ["chart_sales_2023.png"], ["#attention-toggle"])
    save(page, ["#look-token", "#attention-shares"], out / "inspector-attention-anyres.png")
    page.close()
    page = ask(browser, url, "In what order do the lights turn on?", ["traffic_light.webm"], ["#attention-toggle"])
    save(page, ["#attention-shares"], out / "inspector-attention-video-frames.png")
    page.close()


def ask(browser, url: str, text: str, files: list[str], toggles: list[str]):
    """A fresh page: the toggles checked, a short greedy answer to `text` about `files`, the inspector filled."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(url)
    page.locator("#chat-input textarea").wait_for()
    page.locator("#status .status.ready").wait_for(timeout=180_000)
    page.locator("#settings").get_by_text("Settings").first.click()
    for label, value in (("Max new tokens", 12), ("Temperature", 0)):
        box = page.locator(f"#settings input[aria-label='number input for {label}']").first
        box.fill(str(value))
        box.press("Tab")
    for toggle in toggles:
        page.locator(f"{toggle} input[type=checkbox]").check()
    page.locator("#chat-input input[type=file]").set_input_files([str(ASSETS / f) for f in files])
    page.wait_for_function(f"() => document.querySelectorAll('#chat-input .thumbnail-item').length == {len(files)}")
    page.locator("#chat-input textarea").fill(text)
    page.locator("#chat-input textarea").press("Enter")
    page.locator("#inspector-summary").get_by_text("Last answer").wait_for(timeout=300_000)
    if "#attention-toggle" in toggles:
        page.locator("#heatmaps img").first.wait_for()
        page.wait_for_timeout(500)  # the thumbnails finish loading
    return page


def save(page, selectors: list[str], path: Path) -> None:
    """The page's region from the first selector's element to the last's, as a small PNG."""
    page.evaluate("window.scrollTo(0, 0)")  # bounding boxes are relative to the viewport, the clip to the page
    page.wait_for_timeout(200)
    top, bottom = (page.locator(s).first.bounding_box() for s in (selectors[0], selectors[-1]))
    clip = {"x": min(top["x"], bottom["x"]) - 4, "y": top["y"] - 4,
            "width": max(top["width"], bottom["width"]) + 8,
            "height": bottom["y"] + bottom["height"] - top["y"] + 8}
    image = Image.open(io.BytesIO(page.screenshot(full_page=True, clip=clip))).convert("RGB")
    for scale in (1.0, 0.85, 0.7, 0.6, 0.5):
        shown = image.resize((round(image.width * scale), round(image.height * scale)), Image.LANCZOS)
        data = io.BytesIO()
        shown.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(data, format="PNG", optimize=True)
        if data.tell() <= MAX_BYTES:
            break
    path.write_bytes(data.getvalue())
    print(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}: {shown.width}x{shown.height}, "
          f"{data.tell() / 1000:.0f} KB")


if __name__ == "__main__":
    raise SystemExit(main())

"""Retake the README's screenshots from the real app: `python docs/screenshots.py`.

Starts `app.py --model tiny-random` (a random-weight model made locally: its answers are noise, and the status bar
says so) on a free port, asks one question about two images in headless Chromium, and writes docs/images/chat.png
(the chat) and docs/images/inspector.png (the research inspector after that answer), each reduced to a 256-colour
palette so it stays small. Needs Chromium (CHROMIUM, default /usr/bin/chromium) and the playwright package, as the
browser tests do.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from PIL import Image
from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "docs" / "images"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
QUESTION = "Here is the first chart <image> and the second <image>. Which one has a higher blue bar?"
CHARTS = [ROOT / "assets" / "chart_sales_2023.png", ROOT / "assets" / "chart_sales_2024.png"]
MAX_BYTES = 150_000


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_app(port: int, log) -> subprocess.Popen:
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    server = subprocess.Popen([sys.executable, "app.py", "--model", "tiny-random", "--port", str(port),
                               "--eager"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"app.py exited with {server.returncode}; its output is in {log.name}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
            return server
        except OSError:
            time.sleep(0.5)
    server.kill()
    raise SystemExit(f"app.py did not serve the page within 180 s; its output is in {log.name}")


def ask(page) -> None:
    """Settings for a short, repeatable answer with token probabilities, then the question with both charts."""
    page.locator("#status").get_by_text("Ready").wait_for(timeout=180_000)
    page.locator("#settings").get_by_text("Settings").first.click()
    for label, value in (("Max new tokens", 24), ("Temperature", 0)):
        box = page.locator(f"#settings input[aria-label='number input for {label}']").first
        box.fill(str(value))
        box.press("Tab")
    page.locator("#seed textarea, #seed input").first.fill("1")
    page.locator("#settings").get_by_text("Settings").first.click()  # closed again: the picture shows the chat
    page.locator("#token-probabilities-toggle input[type=checkbox]").check()
    page.locator("#chat-input input[type=file]").set_input_files([str(chart) for chart in CHARTS])
    page.wait_for_function("() => document.querySelectorAll('#chat-input .thumbnail-item').length == 2")
    page.locator("#chat-input textarea").fill(QUESTION)
    page.locator("#chat-input textarea").press("Enter")
    page.locator("#token-probabilities span.token").first.wait_for(timeout=120_000)
    page.wait_for_timeout(500)


def box_around(page, *selectors: str, top: str | None = None) -> dict:
    """The smallest page rectangle holding all these elements (from the top of `top` down), with a margin."""
    boxes = [page.locator(selector).first.bounding_box() for selector in selectors]
    left = min(b["x"] for b in boxes) - 8
    top = (page.locator(top).first.bounding_box() if top else min(boxes, key=lambda b: b["y"]))["y"] - 8
    right, bottom = max(b["x"] + b["width"] for b in boxes) + 8, max(b["y"] + b["height"] for b in boxes) + 8
    return {"x": max(left, 0), "y": max(top, 0), "width": right - max(left, 0), "height": bottom - max(top, 0)}


def save_small(page, clip: dict, name: str) -> Path:
    """A screenshot of part of the page, as a palette PNG."""
    path = IMAGES / name
    page.screenshot(path=str(path), clip=clip, full_page=True)
    Image.open(path).convert("RGB").quantize(colors=256).save(path, optimize=True)
    if path.stat().st_size > MAX_BYTES:
        print(f"warning: {path} is {path.stat().st_size // 1000} KB (over {MAX_BYTES // 1000} KB)", file=sys.stderr)
    return path


def main() -> None:
    IMAGES.mkdir(parents=True, exist_ok=True)
    port = free_port()
    with tempfile.NamedTemporaryFile("w+", prefix="llava-ui-screenshots-", suffix=".log", delete=False) as log:
        server = start_app(port, log)
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                page.goto(f"http://127.0.0.1:{port}")
                ask(page)
                page.add_style_tag(content="#chatbot { height: 700px !important; } "
                                           "#chatbot img { max-height: 160px !important; width: auto !important; }")
                page.evaluate("window.scrollTo(0, 0)")  # bounding boxes are relative to the viewport
                page.wait_for_timeout(300)
                chat = box_around(page, "#header", "#chatbot", "#stats")
                inspector = box_around(page, "#inspector")
                for path in (save_small(page, chat, "chat.png"), save_small(page, inspector, "inspector.png")):
                    print(f"{path.relative_to(ROOT)}: {path.stat().st_size // 1000} KB")
                browser.close()
        finally:
            server.terminate()
            server.wait(10)


if __name__ == "__main__":
    main()

"""The web chat in a real headless Chromium (Debian's /usr/bin/chromium) against `python app.py` with a tiny random
model: streaming, Stop, Regenerate, Undo, video frames in the inspector, and a corrupt upload.

Screenshots of every step go to test-artifacts/screenshots/ for a person to look at.
"""
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
SHOTS = ROOT / "test-artifacts" / "screenshots"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TOKEN_DELAY_S = "0.02"  # test-only pacing (LLAVA_UI_TEST_TOKEN_DELAY) so streaming and Stop can be watched

if not os.path.exists(CHROMIUM):
    pytest.skip("needs Chromium at /usr/bin/chromium (apt-get install -y chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright Python package")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tiny_dir, tmp_path_factory):
    port = _free_port()
    log = open(tmp_path_factory.mktemp("app") / "app.log", "w+")
    env = {**os.environ, "LLAVA_UI_TEST_TOKEN_DELAY": TOKEN_DELAY_S, "GRADIO_ANALYTICS_ENABLED": "False"}
    # fp32: the seeds below were chosen for the tiny random model's fp32 answers (bf16 rounds them differently)
    server = subprocess.Popen([sys.executable, "app.py", "--model", str(tiny_dir), "--dtype", "float32",
                               "--port", str(port), "--frames", "3", "--max-upload-mb", "5"],
                              cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            log.seek(0)
            pytest.fail(f"app.py exited with {server.returncode}:\n{log.read()[-3000:]}")
        try:
            urllib.request.urlopen(url + "/", timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    else:
        server.kill()
        pytest.fail("app.py did not serve the page within 120 s")
    yield url
    server.terminate()
    try:
        server.wait(10)
    except subprocess.TimeoutExpired:
        server.kill()
    log.close()


@pytest.fixture(scope="module")
def browser():
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, app_url):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(app_url)
    page.locator("#chat-input textarea").wait_for()
    yield page
    page.close()


def shot(page, name: str) -> None:
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def bot_text(page) -> str:
    bots = page.locator("#chatbot [data-testid=bot]")
    return bots.last.inner_text() if bots.count() else ""


def stats(page) -> str:
    return page.locator("#stats [data-testid=markdown]").inner_text().strip()


def set_settings(page, **values) -> None:
    """Open Settings and type into the sliders' number boxes, e.g. max_new_tokens=400."""
    if not page.locator("#settings input[type=number]").first.is_visible():
        page.locator("#settings").get_by_text("Settings").first.click()
    boxes = {"max_new_tokens": "#settings input[aria-label='number input for Max new tokens']",
             "temperature": "#settings input[aria-label='number input for Temperature']",
             "seed": "#seed textarea, #seed input"}
    for key, value in values.items():
        box = page.locator(boxes[key]).first
        box.fill(str(value))
        box.press("Tab")
        if key != "seed":  # the slider follows its number box once the page took the value: only then send
            slider = box.locator("xpath=ancestor::*[.//input[@type='range']][1]//input[@type='range']")
            page.wait_for_function("([el, v]) => Number(el.value) === v", arg=[slider.element_handle(), value])


def send(page, text: str, files=()) -> str:
    """Attach files, type, press Enter; returns the stats line as it was before (to spot the next answer)."""
    before = stats(page)
    if files:
        page.locator("#chat-input input[type=file]").set_input_files([str(f) for f in files])
        page.wait_for_function(f"() => document.querySelectorAll('#chat-input .thumbnail-item').length == {len(files)}")
    page.locator("#chat-input textarea").fill(text)
    page.locator("#chat-input textarea").press("Enter")
    return before


def wait_for_answer(page, before: str, timeout_s: float = 60) -> str:
    """The stats line changes when an answer is complete."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        now = stats(page)
        if now and now != before:
            return now
        page.wait_for_timeout(100)
    raise AssertionError(f"no finished answer within {timeout_s} s (stats: {stats(page)!r})")


def test_chat_streams_stops_regenerates_and_undoes(page):
    page.locator("#status .status").wait_for()
    status = page.locator("#status").inner_text()
    assert any(state in status for state in ("Model not loaded yet", "Loading", "Ready")), status
    shot(page, "01-start")
    # with the tiny random weights this seed writes all 400 tokens (other seeds hit a stop token early),
    # ~6 s with the test pacing: time enough to watch it grow and to press Stop
    set_settings(page, max_new_tokens=400, temperature=0.3, seed=2)
    send(page, "first <image> then <image>: which has the taller blue bar?",
         [ROOT / "assets/chart_sales_2023.png", ROOT / "assets/chart_sales_2024.png"])

    # the bubble may first hold a "model is loading" note (a busy machine loads slowly); the answer then
    # replaces it, so look for the last run of growing lengths
    lengths, run = [], []
    deadline = time.monotonic() + 60
    while len(set(run)) < 4 and time.monotonic() < deadline:
        lengths.append(len(bot_text(page)))
        run = run + [lengths[-1]] if run and lengths[-1] >= run[-1] else [lengths[-1]]
        page.wait_for_timeout(150)
    assert len(set(run)) >= 4 and run[-1] > run[0], f"the answer should grow on screen: {lengths}"
    shot(page, "02-streaming")
    user = page.locator("#chatbot [data-testid=user]").all_inner_texts()
    assert "first <image 1> then <image 2>: which has the taller blue bar?" in user  # where each image went
    assert page.locator("#chatbot [data-testid=user] img").count() == 2  # the numbered pictures

    page.locator("#stop-button").click()
    line = wait_for_answer(page, "", timeout_s=20)
    assert "stopped by you" in line
    stopped = bot_text(page)
    page.wait_for_timeout(800)
    assert bot_text(page) == stopped, "nothing is added after Stop"
    assert int(line.split(" tokens")[0]) < 400
    shot(page, "03-stopped")
    assert "random weights" in page.locator("#status").inner_text()

    set_settings(page, seed=1)  # a short answer this time
    page.locator("#regenerate-button").click()
    page.wait_for_timeout(300)
    regenerated = wait_for_answer(page, line, timeout_s=60)
    assert "stopped by you" not in regenerated
    assert page.locator("#chatbot [data-testid=bot]").count() == 1
    shot(page, "04-regenerated")
    assert page.locator("#prompt-view").is_visible()

    page.locator("#undo-button").click()
    page.wait_for_function("() => !document.querySelector('#chatbot [data-testid=user]')")
    assert page.locator("#chat-input textarea").input_value().startswith("first <image> then <image>")
    shot(page, "05-undone")


def test_video_frames_appear_in_the_inspector(page):
    set_settings(page, max_new_tokens=8)
    before = send(page, "In what order do the lights turn on?", [ROOT / "assets/traffic_light.webm"])
    wait_for_answer(page, before, timeout_s=90)
    gallery = page.locator("#frames")
    gallery.wait_for()
    assert gallery.locator("img").count() == 3
    captions = gallery.inner_text()
    assert "frame 0 @ 0.00 s" in captions and "frame 35 @ 3.50 s" in captions
    shot(page, "06-video-frames")


def test_a_corrupt_file_shows_an_error_and_the_chat_keeps_working(page, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(os.urandom(4096))
    send(page, "what is in this picture?", [broken])
    toast = page.locator("[data-testid=toast-body]").filter(has_text="not a readable image")
    toast.wait_for(timeout=15000)
    shot(page, "07-corrupt-file-error")
    assert page.locator("#chatbot [data-testid=user]").count() == 0

    page.locator("#chat-input [aria-label='Remove file']").first.click()
    set_settings(page, max_new_tokens=8)
    before = send(page, "then just text, please")
    wait_for_answer(page, before, timeout_s=60)
    assert page.locator("#chatbot [data-testid=bot]").count() == 1
    shot(page, "08-after-error")


def test_editing_an_earlier_message_drops_later_turns_and_answers_again(page):
    set_settings(page, max_new_tokens=8)
    wait_for_answer(page, send(page, "how many stars? <image>", [ROOT / "assets/stars_two.png"]))
    second = wait_for_answer(page, send(page, "and now?"))
    assert page.locator("#chatbot [data-testid=bot]").count() == 2
    page.locator("#chatbot button[aria-label=Edit]").first.click()
    box = page.locator("#chatbot textarea").first
    assert box.input_value() == "how many stars? `<image 1>`"
    box.fill("count the stars in `<image 1>`")
    page.locator("#chatbot button[aria-label=Submit]").first.click()
    wait_for_answer(page, second)
    texts = page.locator("#chatbot [data-testid=user]").all_inner_texts()
    assert "count the stars in <image 1>" in texts and "and now?" not in texts
    assert page.locator("#chatbot [data-testid=bot]").count() == 1
    shot(page, "09-edited")


def test_token_probabilities_shade_the_answer_and_show_alternatives(page):
    set_settings(page, max_new_tokens=12, temperature=0)
    page.locator("#token-probabilities-toggle input[type=checkbox]").check()
    wait_for_answer(page, send(page, "what is in it? <image>", [ROOT / "assets/stars_two.png"]))
    view = page.locator("#token-probabilities")
    view.wait_for()
    tokens = view.locator("span.token")
    assert tokens.count() == 12
    title = tokens.first.get_attribute("title")
    assert title.count("%") == 6  # the token's probability, then its five alternatives'
    assert "rgba(220, 38, 38" in tokens.first.get_attribute("style")
    tokens.first.hover()
    shot(page, "10-token-probabilities")


def test_where_the_model_looked_shows_a_heat_map_and_shares_for_a_chosen_token(page):
    set_settings(page, max_new_tokens=6, temperature=0)
    page.locator("#attention-toggle input[type=checkbox]").check()
    page.locator("#image-effect-toggle input[type=checkbox]").check()
    wait_for_answer(page, send(page, "compare <image> and <image>",
                               [ROOT / "assets/stars_two.png", ROOT / "assets/stars_three.png"]))
    heatmaps = page.locator("#heatmaps")
    heatmaps.locator("img").first.wait_for()
    assert heatmaps.locator("img").count() == 2  # one heat map per image
    shares = page.locator("#attention-shares")
    whole = shares.inner_text()
    assert "Share of all attention per image" in whole and shares.locator(".share-row").count() == 2  # one bar each
    assert shares.locator(".share-value").count() == 3  # the two images and the text
    assert "not an explanation" in whole
    page.locator("#look-token input").click()
    page.get_by_role("option").nth(2).click()  # the answer's second token
    page.wait_for_function("(before) => document.querySelector('#attention-shares').innerText !== before", arg=whole)
    assert heatmaps.locator("img").count() == 2
    one_token = shares.inner_text()
    band = page.locator("#look-last-layer input[type=number]")
    band.fill("1")  # the band: layer 1 alone
    band.press("Tab")
    page.wait_for_function("(before) => document.querySelector('#attention-shares').innerText !== before",
                           arg=one_token)
    captions = heatmaps.inner_text()
    assert "image 1: stars_two.png" in captions and "% of the attention" in captions
    assert page.locator("#image-effect span.token").count() == 6  # the images' effect on every token
    shot(page, "11-where-the-model-looked")

"""Leaving or stopping frees the server, at the REAL model dimensions, in a real headless Chromium.

`python app.py` serves a random checkpoint with LLaVA-NeXT-Interleave's real sizes (Qwen 24 layers x 1024, SigLIP
so400m); a 40-frame video sampled to 8 frames keeps the engine busy for a minute or more before the first token
(vision one frame per step, then the ~6k-token prompt in chunks). While the chat shows
the engine's progress text we close the tab (test A) or press Stop during the prefill (test B) and watch the server
process's CPU time with psutil: the work must end (the process goes idle) instead of running on for nobody.
Afterwards the API still answers.

The engine honours a stop between two layers of the running model step (one vision view is seconds of work at
real size on a 2-core CPU, one prefill chunk too), so the work ends within about a layer: A asserts the server is
idle within CLOSE_IDLE_S of the close and that a 5 s window after it uses < 0.5 CPU-s; B asserts idle within
STOP_IDLE_S of Stop. Both print what they measured, next to the step that was running.

Slow (minutes: loading ~3.5 GB of weights on a 2-core CPU, then real-size steps); run with
    python -m pytest -m slow tests/test_served_browser.py -s
`-s` shows the measured numbers. Screenshots go to test-artifacts/screenshots/served-*.png.
"""
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.browser]

ROOT = Path(__file__).resolve().parents[1]
FRAMES = 8
LOAD_TIMEOUT_S = 600
PROGRESS_WORDS = ("encoding frame", "reading the prompt")

SAMPLE_S = 0.25  # CPU sampling interval
IDLE_SHARE = 0.10  # an interval using less than this share of one core counts as idle
QUIET_SAMPLES = 2  # ... and this many such intervals in a row as "the server went idle"
CLOSE_IDLE_S = 2.0  # after a close: the browser's disconnect reaches the server, then one layer ends
GRACE_S = CLOSE_IDLE_S  # after a close, time allowed before the idle window starts
WINDOW_S = 5.0  # the window whose CPU use must be that of an idle server
WINDOW_MAX_CPU_S = 0.5
STOP_IDLE_S = 1.5  # after Stop, the server must be idle within this (the click's round trip, then one layer)

# the shared headless Chromium (skips this module where there is none, or no playwright)
from test_browser import SHOTS, browser  # noqa: E402,F401
psutil = pytest.importorskip("psutil")
cv2 = pytest.importorskip("cv2")
np = pytest.importorskip("numpy")


# ---------------------------------------------------------------- the server, the browser
# (the checkpoint: conftest's real_checkpoint, LLAVA_UI_REAL_CHECKPOINT or the benchmark's real-size one)

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str, timeout: float = 5):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


class Server:
    def __init__(self, url: str, popen: subprocess.Popen, log_path: Path):
        self.url, self.popen, self.log_path = url, popen, log_path
        self.process = psutil.Process(popen.pid)

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]


@pytest.fixture(scope="module")
def server(real_checkpoint, tmp_path_factory):
    port = _free_port()
    log_path = tmp_path_factory.mktemp("served") / "app.log"
    log = open(log_path, "w")
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    env.pop("LLAVA_UI_TEST_TOKEN_DELAY", None)  # real pacing
    popen = subprocess.Popen([sys.executable, "app.py", "--model", str(real_checkpoint), "--eager",
                              "--port", str(port), "--frames", str(FRAMES)],
                             cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    served = Server(f"http://127.0.0.1:{port}", popen, log_path)
    began = time.monotonic()
    state = None
    while time.monotonic() - began < LOAD_TIMEOUT_S:
        if popen.poll() is not None:
            pytest.fail(f"app.py exited with {popen.returncode}:\n{served.log_tail()}")
        try:
            card = _get_json(served.url + "/v1/models")["data"][0]["llava_ui"]
            state = card["state"]
            if state == "ready":
                break
            if state == "failed":
                pytest.fail(f"the model failed to load: {card.get('error')}\n{served.log_tail()}")
        except (OSError, ValueError, KeyError, IndexError):
            pass
        time.sleep(1)
    else:
        popen.kill()
        pytest.fail(f"the model was not ready within {LOAD_TIMEOUT_S} s (state {state!r}):\n{served.log_tail()}")
    print(f"\n[served] real-size model ready after {time.monotonic() - began:.1f} s "
          f"(pid {popen.pid}, {served.url})", flush=True)
    yield served
    popen.terminate()
    try:
        popen.wait(20)
    except subprocess.TimeoutExpired:
        popen.kill()
        popen.wait(10)
    log.close()


def open_page(browser, server):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(server.url)
    page.locator("#chat-input textarea").wait_for()
    return page


def make_video(path: Path, seed: int, seconds: float = 4.0, fps: int = 10, size=(320, 240)) -> Path:
    """A 4 s, 40-frame mp4 of coloured shapes moving across a changing background (every frame differs)."""
    width, height = size
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    assert writer.isOpened(), "OpenCV cannot write mp4v here"
    rng = np.random.default_rng(seed)
    colours = [tuple(int(c) for c in rng.integers(40, 256, 3)) for _ in range(3)]
    count = int(seconds * fps)
    for i in range(count):
        t = i / count
        frame = np.full((height, width, 3), (int(60 * t) + seed * 7 % 60, 30, int(90 - 60 * t)), dtype=np.uint8)
        cv2.circle(frame, (int(20 + t * (width - 40)), height // 3), 24, colours[0], -1)
        cv2.rectangle(frame, (int(width - 60 - t * (width - 80)), 2 * height // 3 - 20),
                      (int(width - 20 - t * (width - 80)), 2 * height // 3 + 20), colours[1], -1)
        cv2.line(frame, (0, int(t * height)), (width, height - int(t * height)), colours[2], 5)
        writer.write(frame)
    writer.release()
    assert path.stat().st_size > 1000
    return path


# ---------------------------------------------------------------- page helpers (as in test_browser.py)

def shot(page, name: str) -> None:
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def bot_text(page) -> str:
    bots = page.locator("#chatbot [data-testid=bot]")
    return bots.last.inner_text() if bots.count() else ""


def send(page, text: str, files=()) -> None:
    if files:
        page.locator("#chat-input input[type=file]").set_input_files([str(f) for f in files])
        page.wait_for_function(f"() => document.querySelectorAll('#chat-input .thumbnail-item').length == {len(files)}",
                               timeout=60000)
    page.locator("#chat-input textarea").fill(text)
    page.locator("#chat-input textarea").press("Enter")


def wait_for_progress(page, words=PROGRESS_WORDS, timeout_s: float = 300) -> str:
    """Until the assistant bubble shows the engine's progress text (one of `words`); returns that text."""
    deadline = time.monotonic() + timeout_s
    seen = []
    while time.monotonic() < deadline:
        text = bot_text(page)
        if not seen or seen[-1] != text:
            seen.append(text)
        if any(word in text for word in words):
            return text
        page.wait_for_timeout(200)
    raise AssertionError(f"no progress text {words} within {timeout_s} s; the bubble showed {seen[-8:]}")


# ---------------------------------------------------------------- CPU measurement

def cpu_seconds(process) -> float:
    """User + system CPU time of the whole server process (all its threads)."""
    times = process.cpu_times()
    return times.user + times.system


def thread_cpu(process) -> dict:
    """{thread id: (name, CPU seconds)} for the server's threads."""
    out = {}
    for thread in process.threads():
        try:
            name = Path(f"/proc/{process.pid}/task/{thread.id}/comm").read_text().strip()
        except OSError:
            name = "?"
        out[thread.id] = (name, thread.user_time + thread.system_time)
    return out


def thread_use(before: dict, after: dict) -> str:
    """Which threads used CPU between two thread_cpu snapshots (evidence when the server does not go idle)."""
    rows = sorted(((after[tid][1] - before.get(tid, (None, 0.0))[1], tid, after[tid][0]) for tid in after),
                  reverse=True)
    return ", ".join(f"{name}[{tid}] {used:.2f}s" for used, tid, name in rows[:6] if used > 0.005) or "none"


def busy_threads(process, seconds: float = 1.0) -> str:
    before = thread_cpu(process)
    time.sleep(seconds)
    return thread_use(before, thread_cpu(process))


class CpuTrace:
    """CPU seconds of the server sampled every SAMPLE_S from a start time."""

    def __init__(self, process):
        self.process = process
        self.start = time.monotonic()
        self.samples = [(0.0, cpu_seconds(process))]

    def sample_until(self, seconds_since_start: float) -> None:
        while self.samples[-1][0] < seconds_since_start:
            next_at = self.start + self.samples[-1][0] + SAMPLE_S
            time.sleep(max(0.0, next_at - time.monotonic()))
            self.samples.append((time.monotonic() - self.start, cpu_seconds(self.process)))

    def idle_after(self) -> float | None:
        """Seconds from the start until the first run of QUIET_SAMPLES intervals each below IDLE_SHARE of a core
        (the start of that run); None when there is none yet."""
        quiet = 0
        for i in range(1, len(self.samples)):
            (t0, c0), (t1, c1) = self.samples[i - 1], self.samples[i]
            quiet = quiet + 1 if (c1 - c0) < IDLE_SHARE * (t1 - t0) else 0
            if quiet == QUIET_SAMPLES:
                return self.samples[i - QUIET_SAMPLES][0]
        return None

    def sample_until_idle(self, timeout_s: float) -> float | None:
        while self.idle_after() is None and self.samples[-1][0] < timeout_s:
            self.sample_until(self.samples[-1][0] + SAMPLE_S)
        return self.idle_after()

    def used(self, t0: float, t1: float) -> float:
        """CPU seconds between the samples nearest t0 and t1 (both taken)."""
        def at(t):
            return min(self.samples, key=lambda s: abs(s[0] - t))[1]
        return at(t1) - at(t0)

    def busy_share(self) -> str:
        """The per-interval use as shares of one core, for the report."""
        shares = [(c1 - c0) / max(t1 - t0, 1e-6) for (t0, c0), (t1, c1) in zip(self.samples, self.samples[1:])]
        return " ".join(f"{s:.2f}" for s in shares)


def settle_server(server, timeout_s: float = 300) -> None:
    """Before a test: the server idle (nothing left from loading or an earlier test)."""
    trace = CpuTrace(server.process)
    idle = trace.sample_until_idle(timeout_s)
    assert idle is not None, (f"the server did not go idle within {timeout_s} s before the test; busy threads: "
                              f"{busy_threads(server.process)}\n{server.log_tail()}")


def assert_still_answers(server) -> None:
    body = json.dumps({"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 2,
                       "temperature": 0}).encode()
    request = urllib.request.Request(server.url + "/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    began = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            status, reply = response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        raise AssertionError(f"/v1/chat/completions answered {err.code}: {err.read()[:500]!r}") from None
    assert status == 200, status
    assert reply["choices"][0]["message"]["role"] == "assistant"
    assert reply["usage"]["completion_tokens"] <= 2
    print(f"[served] text-only /v1/chat/completions (max_tokens 2): 200 in {time.monotonic() - began:.1f} s, "
          f"finish_reason {reply['choices'][0].get('finish_reason')!r}", flush=True)


# ---------------------------------------------------------------- the tests

def wait_for_change(page, text: str, timeout_s: float = 120) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        now = bot_text(page)
        if now != text:
            return now
        page.wait_for_timeout(50)
    raise AssertionError(f"the bubble stayed at {text!r} for {timeout_s} s")


def test_closing_the_tab_mid_work_stops_the_server(browser, server, tmp_path):
    video = make_video(tmp_path / "shapes-a.mp4", seed=1)
    settle_server(server)
    page = open_page(browser, server)
    send(page, "What moves in this video, and in which direction?", [video])
    began = time.monotonic()
    progress = wait_for_progress(page)
    shown = time.monotonic()
    print(f"\n[served] progress shown {shown - began:.1f} s after Enter: {progress!r}", flush=True)
    shot(page, "served-progress")
    assert "encoding frame 1 of 8" in progress, progress  # --frames 8 reached the chat; vision comes first
    # one model step here: the first frame's view through the real-size vision tower (the bubble then moves on)
    progress = wait_for_change(page, progress)
    step_s = time.monotonic() - shown
    assert "encoding frame 2 of 8" in progress, progress
    # The engine honours a stop between two layers: the step running when the tab closes ends within a layer.
    grace = GRACE_S
    print(f"[served] one vision step (frame 1 of 8) took {step_s:.1f} s; closing the tab while frame 2 is "
          f"encoded; grace before the idle window: {grace:.1f} s", flush=True)

    page.close()
    trace = CpuTrace(server.process)  # baseline right after the close
    trace.sample_until(grace)
    threads_before = thread_cpu(server.process)
    trace.sample_until(grace + WINDOW_S)
    evidence = thread_use(threads_before, thread_cpu(server.process))
    idle = trace.idle_after() if trace.idle_after() is not None else trace.sample_until_idle(120)
    window = trace.used(grace, grace + WINDOW_S)
    print(f"[served] after closing the tab: idle after {idle if idle is None else round(idle, 2)} s; "
          f"{window:.3f} CPU-s used in the {WINDOW_S:.0f} s window starting {grace:.1f} s after the close "
          f"(limit {WINDOW_MAX_CPU_S}); threads busy in the window: {evidence}", flush=True)
    print(f"[served] per-{SAMPLE_S}s core shares from the close: {trace.busy_share()}", flush=True)
    assert window < WINDOW_MAX_CPU_S, (
        f"the server kept computing after the tab was closed: {window:.2f} CPU-s in {WINDOW_S} s "
        f"(from {grace:.1f} s after the close); idle after {idle} s; busy threads: {evidence}\n{server.log_tail()}")
    assert idle is not None and idle <= CLOSE_IDLE_S, (
        f"idle only {idle} s after the close (limit {CLOSE_IDLE_S} s; a whole vision step here: {step_s:.1f} s)")
    assert_still_answers(server)


def test_stop_during_the_prefill_frees_the_server_within_about_a_second(browser, server, tmp_path):
    video = make_video(tmp_path / "shapes-b.mp4", seed=2)  # other frames: vision runs again, then the prefill
    settle_server(server)
    page = open_page(browser, server)
    try:
        send(page, "Describe what happens in this video.", [video])
        began = time.monotonic()
        progress = wait_for_progress(page, words=("reading the prompt",))
        shown = time.monotonic()
        print(f"\n[served] prefill progress shown {shown - began:.1f} s after Enter: {progress!r}", flush=True)
        # one prefill chunk, measured on the page; the Stop then lands between two layers of the next
        progress = wait_for_change(page, progress)
        chunk_s = time.monotonic() - shown
        assert "reading the prompt" in progress, progress
        print(f"[served] one prefill chunk took {chunk_s:.1f} s; pressing Stop at {progress!r}", flush=True)
        shot(page, "served-prefill-progress")

        page.locator("#stop-button").click()
        trace = CpuTrace(server.process)
        threads_before = thread_cpu(server.process)
        trace.sample_until(STOP_IDLE_S)
        evidence = thread_use(threads_before, thread_cpu(server.process))
        idle = trace.idle_after() if trace.idle_after() is not None else trace.sample_until_idle(60)
        print(f"[served] after Stop: idle after {idle if idle is None else round(idle, 2)} s "
              f"(limit {STOP_IDLE_S} s; one prefill chunk here: {chunk_s:.1f} s); threads busy in the first "
              f"{STOP_IDLE_S:.0f} s: {evidence}", flush=True)
        print(f"[served] per-{SAMPLE_S}s core shares from Stop: {trace.busy_share()}", flush=True)

        # the chat shows the (empty) stopped answer in place of the progress text
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(w in bot_text(page) for w in PROGRESS_WORDS):
            page.wait_for_timeout(100)
        answer = bot_text(page)
        shot(page, "served-stopped")
        stats = page.locator("#stats [data-testid=markdown]").inner_text()
        print(f"[served] bubble after Stop: {answer!r}; stats line: {stats.strip()!r}", flush=True)
        assert not any(word in answer for word in PROGRESS_WORDS), answer
        assert "stopped before any text" in answer, answer
        assert idle is not None and idle <= STOP_IDLE_S, (
            f"the server was not idle within {STOP_IDLE_S} s of Stop (idle after {idle} s; one prefill chunk takes "
            f"{chunk_s:.1f} s here and the stop waits for the running one); busy threads: {evidence}")
    finally:
        page.close()
    assert_still_answers(server)

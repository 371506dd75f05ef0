"""Many users, stop at any moment, long sessions and a model that fails to load: nothing crashes, nothing leaks.

- 8 chat sessions at once through the real app (gradio_client against app.create_app with the tiny model), 5 turns
  each with an image: every answer equals that session's answer run alone (greedy), none is lost, and requests
  beyond --concurrency wait in the queue with their rank reported.
- Stop during the vision step, the prefill and the decode: the model stops within one step; the next request works.
- 30 turns with images in one session: the caches stay within their bounds, resident memory stops growing after
  warm-up, and the oldest turns are dropped once the history no longer fits the context.
- A checkpoint that is missing or corrupt: the UI shows the reason, the API answers 503 with it; once the files are
  fixed a retry loads the model.
"""
from __future__ import annotations

import gc
import json
import re
import shutil
import struct
import threading
import time
from html import unescape
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
from fastapi import FastAPI
from PIL import Image
from servers import serve

import app as app_module
from llava_ui.engine import Engine
from llava_ui.chat.conversation import Conversation, Picture
from llava_ui.chat.media import load_image
from llava_ui.config import GenerationSettings
from llava_ui.model import qwen2 as language
from llava_ui.openai import server as api_module
from llava_ui.openai.server import create_api_router
from llava_ui.web import handlers as ui_chat
from llava_ui.web.handlers import ChatHandlers

SESSIONS, TURNS, MAX_NEW = 8, 5, 8
GREEDY_UI = ("", 0, 1.0, 0, 1.0, MAX_NEW, "0", "", False, False, False)  # respond: system, temperature, top-p/k,
# penalty, max, seed, mode, and the inspector's toggles (token probabilities, attention, image effect) off


def gradient(seed: int, size=(40, 28)) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size[1], 0:size[0]]
    return Image.fromarray(((rng.integers(0, 256, 3) + x[..., None] * rng.integers(1, 6)
                             + y[..., None] * rng.integers(1, 6)) % 256).astype(np.uint8))


@pytest.fixture
def warnings(monkeypatch):
    shown = []
    monkeypatch.setattr(ui_chat, "warn", lambda message: shown.append(str(message)))
    return shown


# --- many users ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def scripts(tmp_path_factory):
    """Per session, its 5 turns: (text, image path); every image differs."""
    folder = tmp_path_factory.mktemp("sessions")
    out = []
    for k in range(SESSIONS):
        turns = []
        for t in range(TURNS):
            path = folder / f"s{k}t{t}.png"
            gradient(100 * k + t).save(path)
            turns.append((f"Session {k}, turn {t}: what is in <image>?", str(path)))
        out.append(turns)
    return out


@pytest.fixture(scope="module")
def served_app(tiny_dir):
    """The real app (UI + API, default --concurrency 4 and --queue-size 32) on 127.0.0.1."""
    args = app_module.parse_args(["--model", str(tiny_dir)])
    fastapi_app, _, backend = app_module.create_app(args)
    with serve(fastapi_app, lifespan="on") as root:
        yield root, backend, args


def answer_alone(engine, turns) -> list[tuple[str, list[int]]]:
    """(answer, generated ids) per turn: the session run by itself on the engine, as the UI's respond runs it."""
    conversation, out = Conversation(), []
    settings = GenerationSettings(max_new_tokens=MAX_NEW, temperature=0, seed=0)
    for text, path in turns:
        conversation.add_user(text, [Picture(load_image(path), path.rsplit("/", 1)[-1])])
        record = engine.generate(conversation, settings)
        out.append((record.text, record.token_ids))
    return out


@pytest.mark.parametrize("turns", [2, pytest.param(TURNS, marks=pytest.mark.slow)], ids=lambda n: f"{SESSIONS}x{n}")
def test_eight_sessions_at_once_each_get_their_own_answers_and_wait_their_turn(served_app, scripts, turns):
    from gradio_client import Client, handle_file
    from gradio_client.utils import Status, StatusUpdate

    root, engine, args = served_app
    engine.load()
    alone_started = time.perf_counter()
    scripts = [script[:turns] for script in scripts]
    expected = [answer_alone(engine, script) for script in scripts]
    alone = time.perf_counter() - alone_started
    got = [None] * SESSIONS
    statuses, failures = [], []
    barrier = threading.Barrier(SESSIONS)

    def run(k):
        client = None
        try:
            client = Client(root, verbose=False)
            for text, path in scripts[k]:
                barrier.wait(timeout=120)  # every session asks at the same moment: 8 answers for 4 slots
                client.predict({"text": text, "files": [handle_file(path)]}, 2, api_name="/send")
                job = client.submit(*GREEDY_UI, api_name="/respond")
                job.result(timeout=120)
                updates = job.communicator.updates  # every status message the server sent for this job
                while not updates.empty():
                    update = updates.get_nowait()
                    if isinstance(update, StatusUpdate):
                        statuses.append(update)
            exported = client.predict(api_name="/export")  # the inspector's export: exact answers and token ids
            export = json.loads(Path(exported["value"] if isinstance(exported, dict) else exported).read_text())
            got[k] = [(turn["answer"], turn["output"]["token_ids"]) for turn in export["turns"]]
        except Exception as err:  # reported below; the barrier is broken so the others stop too
            failures.append(f"session {k}: {type(err).__name__}: {err}")
            barrier.abort()
        finally:
            if client is not None:
                client.close()  # ends its heartbeat stream, so the server can shut down at once

    started = time.perf_counter()
    threads = [threading.Thread(target=run, args=(k,)) for k in range(SESSIONS)]
    [t.start() for t in threads]
    [t.join(300) for t in threads]
    elapsed = time.perf_counter() - started
    assert not failures, failures
    assert all(session is not None and len(session) == turns for session in got), "a request was lost"
    assert got == expected, "a session's answers differ from the same session run alone"
    queued = [s for s in statuses if s.code == Status.IN_QUEUE and s.rank is not None]
    assert max(s.rank for s in queued) >= 1 and max(s.queue_size or 0 for s in queued) >= 2, \
        "requests beyond --concurrency wait in the queue and are told their rank"
    assert args.concurrency == 4 and args.queue_size == 32
    print(f"\n{SESSIONS} sessions x {turns} turns: {elapsed:.1f} s at once through the app, {alone:.1f} s one by one "
          f"on the engine; deepest queue rank seen {max(s.rank for s in queued)} of "
          f"{max(s.queue_size or 0 for s in queued)}")


def test_two_tabs_exporting_in_the_same_second_each_get_their_own_file(engine, monkeypatch):
    """The export's file name has one-second resolution and every tab shares one folder: found by the test above,
    where one session downloaded another's half-written export."""
    from llava_ui.web import inspector as ui_inspector

    monkeypatch.setattr(ui_inspector.time, "strftime", lambda *args: "20260101-000000")
    chat = ChatHandlers(engine)
    paths = []
    for text in ("first tab", "second tab"):
        _, _, session = chat.send({"text": text, "files": []}, None)
        list(chat.respond(session, "", 0, 1.0, 0, 1.0, 2, "0", ""))
        paths.append(chat.export(session)["value"])
    assert paths[0] != paths[1]
    assert [json.loads(Path(p).read_text())["turns"][0]["text"] for p in paths] == ["first tab", "second tab"]


API_CLIENTS, CHAT_CLIENTS, LOAD_SLOTS, LOAD_QUEUE = 32, 8, 2, 8
QUESTIONS = ["Name a colour.", "Count to three.", "Say something about cats.", "What is rain?"]


@pytest.fixture(scope="module")
def crowded_app(tiny_dir):
    """The real app with a small admission queue (--concurrency 2, --queue-size 8), for more clients than that."""
    args = app_module.parse_args(["--model", str(tiny_dir), "--concurrency", str(LOAD_SLOTS),
                                  "--queue-size", str(LOAD_QUEUE)])
    fastapi_app, _, backend = app_module.create_app(args)
    with serve(fastapi_app, lifespan="on") as root:
        yield root, backend


def api_answer(root: str, k: int, model: str) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": QUESTIONS[k % len(QUESTIONS)]}],
            "max_tokens": MAX_NEW, "temperature": 0}
    return httpx.post(root + "/v1/chat/completions", json=body, timeout=300)


def chat_answer(root: str, k: int) -> str | None:
    """One browser-like session (gradio_client): send + respond as the page calls them; the answer the
    inspector's export holds, or None when the message was not answered."""
    from gradio_client import Client

    client = Client(root, verbose=False)
    try:
        client.predict({"text": QUESTIONS[k % len(QUESTIONS)], "files": []}, 2, api_name="/send")
        client.predict(*GREEDY_UI, api_name="/respond")
        exported = client.predict(api_name="/export")  # an update without a file when nothing was answered
        path = exported.get("value") if isinstance(exported, dict) else exported
        turns = json.loads(Path(path).read_text())["turns"] if path else []
        return turns[0]["answer"] if turns and turns[0]["answer"] is not None else None
    finally:
        client.close()


def test_32_api_requests_and_8_chats_at_once_only_get_answers_or_busy_and_memory_stays_bounded(crowded_app,
                                                                                               warnings):
    """Forty clients at once, two slots and eight places in line, every front end sharing them: each admitted
    request gets the answer it gets alone (greedy), each refused one a 429 with Retry-After (API) or "the server
    is busy" (chat); never more answers computed at once than slots, nor more waiting than the queue holds."""
    root, engine = crowded_app
    engine.load()
    model = engine.status()["model"]
    alone_api = [api_answer(root, k, model).json()["choices"][0]["message"]["content"] for k in range(len(QUESTIONS))]
    alone_chat = [chat_answer(root, k) for k in range(len(QUESTIONS))]
    assert all(alone_chat)
    seen = {"active": 0, "waiting": 0}
    done = threading.Event()

    def watch():  # the admission queue's occupancy while the crowd is served
        while not done.is_set():
            status = engine.admission.status()
            seen["active"], seen["waiting"] = max(seen["active"], status["active"]), max(seen["waiting"],
                                                                                         status["waiting"])
            time.sleep(0.002)

    rss_before = psutil.Process().memory_info().rss
    barrier = threading.Barrier(API_CLIENTS + CHAT_CLIENTS)
    api, chat, failures = [None] * API_CLIENTS, [None] * CHAT_CLIENTS, []

    def run(kind, k):
        try:
            barrier.wait(timeout=60)
            if kind == "api":
                api[k] = api_answer(root, k, model)
            else:
                chat[k] = chat_answer(root, k)
        except Exception as err:
            failures.append(f"{kind} {k}: {type(err).__name__}: {err}")

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    threads = [threading.Thread(target=run, args=("api", k)) for k in range(API_CLIENTS)]
    threads += [threading.Thread(target=run, args=("chat", k)) for k in range(CHAT_CLIENTS)]
    [t.start() for t in threads]
    [t.join(300) for t in threads]
    done.set()
    watcher.join()
    assert not failures, failures
    codes = [r.status_code for r in api]
    assert set(codes) <= {200, 429}, [(r.status_code, r.text) for r in api if r.status_code not in (200, 429)]
    for k, response in enumerate(api):
        if response.status_code == 200:
            assert response.json()["choices"][0]["message"]["content"] == alone_api[k % len(QUESTIONS)]
        else:
            assert int(response.headers["Retry-After"]) >= 5
            assert response.json()["error"]["code"] == "server_busy"
    answered = [k for k, answer in enumerate(chat) if answer is not None]
    for k in answered:
        assert chat[k] == alone_chat[k % len(QUESTIONS)]
    busy = [m for m in warnings if "the server is busy" in m]
    assert len(busy) == CHAT_CLIENTS - len(answered), warnings
    assert 429 in codes and codes.count(200) >= LOAD_SLOTS  # the crowd was larger than the line, some got in
    assert seen["active"] <= LOAD_SLOTS and seen["waiting"] <= LOAD_QUEUE
    assert seen["active"] == LOAD_SLOTS  # the slots were used
    growth = psutil.Process().memory_info().rss - rss_before
    assert growth < 300 * 2**20, f"resident memory grew {growth / 2**20:.0f} MB under the crowd"
    print(f"\n{API_CLIENTS} API + {CHAT_CLIENTS} chat clients at once: {codes.count(200)} API answers, "
          f"{codes.count(429)} refused (429); {len(answered)} chat answers, {len(busy)} told the server is busy; "
          f"at most {seen['active']} computing and {seen['waiting']} waiting; RSS {growth / 2**20:+.0f} MB")


# --- stop -----------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine(tiny_dir):
    return Engine(str(tiny_dir), dtype="float32").load()


class StepSpy:
    """Wraps model.forward_hidden and model.decode_batch (the engine's decode steps): counts prefill (many
    positions) and decode (one position) steps, and runs `on_prefill` / `on_decode(n)` inside the step, as a
    user's click would arrive while the model computes."""

    def __init__(self, model, on_prefill=None, on_decode=None):
        self.real, self.on_prefill, self.on_decode = model.forward_hidden, on_prefill, on_decode
        self.real_batch = model.decode_batch
        self.prefills = self.decodes = 0
        self.after_stop = 0
        self.stop: threading.Event | None = None

    def __call__(self, embeds, cache=None, start=0, should_stop=None):
        if self.stop is not None and self.stop.is_set():
            self.after_stop += 1
        out = self.real(embeds, cache, start, should_stop)
        if embeds.shape[1] > 1:
            self.prefills += 1
            if self.on_prefill:
                self.on_prefill()
        else:
            self._decoded()
        return out

    def decode_batch(self, tokens, caches, positions):
        if self.stop is not None and self.stop.is_set():
            self.after_stop += 1
        out = self.real_batch(tokens, caches, positions)
        self._decoded()
        return out

    def _decoded(self):
        self.decodes += 1
        if self.on_decode:
            self.on_decode(self.decodes)


def press_stop(chat, session, pressed: dict):
    """The Stop button from another thread (Gradio runs it beside the answer); returns once it is down."""
    pressed["at"] = time.perf_counter()
    thread = threading.Thread(target=chat.stop, args=(session,))
    thread.start()
    session.stop.wait(5)
    pressed["thread"] = thread


@pytest.mark.parametrize("when", ["vision", "prefill", "decode"])
def test_stop_pressed_while_the_model_computes_ends_within_one_step(engine, monkeypatch, when):
    chat = ChatHandlers(engine, frames=2)
    session, pressed = None, {}
    spy = StepSpy(engine.model, on_prefill=(lambda: press_stop(chat, session, pressed)) if when == "prefill" else None,
                  on_decode=(lambda n: n == 3 and press_stop(chat, session, pressed)) if when == "decode" else None)
    monkeypatch.setattr(engine.model, "forward_hidden", spy)
    monkeypatch.setattr(engine.model, "decode_batch", spy.decode_batch)
    real_encode = engine.model.encode_views

    def encode_then_stop(pixels, should_stop=None):
        features = real_encode(pixels, should_stop)
        press_stop(chat, session, pressed)
        return features

    if when == "vision":
        monkeypatch.setattr(engine.model, "encode_views", encode_then_stop)
    paths = []
    for i in (1, 2):
        path = f"{chat.files_dir}/stop-{when}-{i}.png"
        gradient(500 + i + 10 * len(when)).save(path)  # new images: the vision tower must run
        paths.append(path)
    _, _, session = chat.send({"text": "describe <image> and <image>", "files": paths}, None)
    spy.stop = session.stop
    list(chat.respond(session, "", 0, 1.0, 0, 1.0, 500, "0", ""))
    done = time.perf_counter()
    pressed["thread"].join(10)
    record = session.turns[-1].record
    assert record.finish_reason == "stopped"
    generated = record.stats.generated_tokens
    if when == "vision":  # stopped before the prompt was computed: no prefill, no token
        assert spy.prefills == 0 and generated == 0
    elif when == "prefill":  # the prompt spans several prefill chunks: the next one never starts, no token
        assert record.stats.prompt_tokens > language.PREFILL_CHUNK
        assert spy.prefills == 1 and spy.decodes == 0 and generated == 0
    else:  # pressed during decode step 3: that step finishes, nothing after it
        assert spy.decodes == 3 and generated <= 4  # the 4th token was sampled from step 3 (unless it ended the turn)
    assert spy.after_stop == 0, "a model step started after Stop was pressed"
    print(f"\nstop during {when}: answer settled {1000 * (done - pressed['at']):.1f} ms after Stop")
    monkeypatch.undo()
    _, _, session = chat.send({"text": "and now a normal question", "files": []}, session)
    list(chat.respond(session, "", 0, 1.0, 0, 1.0, 4, "0", ""))
    assert session.turns[-1].record.finish_reason in ("stop", "length")


# --- long sessions --------------------------------------------------------------------------------------------------

def rss_mb() -> float:
    gc.collect()
    return psutil.Process().memory_info().rss / 2**20


def test_thirty_turns_with_images_stay_within_memory_and_context(tiny_dir, tmp_path, warnings):
    """Context 2,048 tokens (two image turns), feature cache 1 MB (five of this model's images): both bounds are
    reached within the 30 turns; after 10 warm-up turns resident memory stops growing."""
    small = Engine(str(tiny_dir), dtype="float32", context_length=2048, feature_cache_mb=1).load()
    chat = ChatHandlers(small, frames=2)
    session, rss, records = None, [], []
    for turn in range(30):
        path = tmp_path / f"turn{turn}.png"
        gradient(1000 + turn, (64, 48)).save(path)
        _, _, session = chat.send({"text": f"turn {turn}: what changed in <image>?", "files": [str(path)]}, session)
        list(chat.respond(session, "", 0, 1.0, 0, 1.0, 8, "0", ""))
        assert not warnings, warnings
        records.append(session.turns[-1].record)
        rss.append(rss_mb())
        assert small.features.bytes <= 1 << 20 and len(small.prefixes) <= 4
        assert sum(entry[3] for entry in small.prefixes._entries) <= small.prefixes.max_bytes
    assert all(r.finish_reason in ("stop", "length") for r in records)
    assert all(r.stats.prompt_tokens + r.stats.generated_tokens <= 2048 for r in records)
    first_drop = next(i for i, r in enumerate(records) if r.dropped_turns)
    assert 1 <= first_drop <= 3
    last = records[-1]
    kept = 30 - last.dropped_turns
    assert last.prompt.count("<image>") == kept and "turn 29:" in last.prompt and "turn 0:" not in last.prompt
    assert len(session.conversation.turns) == 30  # the chat keeps every turn; only the prompt drops the oldest
    growth = max(rss[10:]) - rss[9]
    print(f"\nRSS after turn 10: {rss[9]:.0f} MB; growth over turns 11-30: {growth:+.1f} MB; "
          f"first dropped turn at turn {first_drop + 1}; last prompt keeps {kept} turns")
    assert growth < 24, f"resident memory grew {growth:.1f} MB over 20 turns: {[round(r) for r in rss]}"


# --- a model that fails to load -------------------------------------------------------------------------------------

def _truncate_pdparams(folder):
    path = folder / "model_state.pdparams"
    path.write_bytes(path.read_bytes()[:4096])


def _bad_safetensors_header(folder):
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", 64) + b'{"model.x": not json at all' + b" " * 40)


def _no_weights(folder):
    (folder / "model_state.pdparams").unlink()


def _no_config(folder):
    (folder / "config.json").unlink()


@pytest.mark.parametrize("fault, reason, retry_from", [
    (_no_weights, "has no model_state.pdparams or \\*.safetensors weights", "ui"),
    (_no_config, "has no config.json", "api"),
    (_truncate_pdparams, "could not read the weights .*model_state.pdparams", "ui"),
    (_bad_safetensors_header, "could not read the weights .*JSONDecodeError", "api"),
], ids=["missing_weights", "missing_config", "truncated_pdparams", "safetensors_bad_header"])
def test_a_model_that_fails_to_load_keeps_the_app_up_and_can_be_retried(tiny_dir, tmp_path, monkeypatch, warnings,
                                                                          fault, reason, retry_from):
    folder = tmp_path / "model"
    shutil.copytree(tiny_dir, folder)
    fault(folder)
    broken = Engine(str(folder))
    chat = ChatHandlers(broken)
    app = FastAPI()
    app.include_router(create_api_router(broken))
    request = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}
    with serve(app) as root:
        for _ in range(100):  # the first request starts the load; it fails at once
            response = httpx.post(root + "/v1/chat/completions", json=request)
            if response.json()["error"]["code"] == "model_load_failed":
                break
            time.sleep(0.05)
        assert response.status_code == 503 and response.headers["Retry-After"] == "30"
        assert re.search(reason, response.json()["error"]["message"]), response.json()
        html, button, _ = chat.status()
        assert "failed to load" in html and re.search(reason, unescape(html)), html
        assert button["visible"] and button["value"] == "Retry load"
        _, _, session = chat.send({"text": "hello", "files": []}, None)
        *_, box = list(chat.respond(session, "", 0, 1.0, 0, 1.0, 2, "0", ""))[-1]
        assert "failed to load" in warnings[-1] and box == {"text": "hello", "files": []}
        assert httpx.get(root + "/v1/models").json()["data"][0]["llava_ui"]["state"] == "failed"  # still serving

        for name in ("config.json", "model_state.pdparams"):  # fix the checkpoint
            shutil.copy(tiny_dir / name, folder / name)
        (folder / "model.safetensors").unlink(missing_ok=True)
        if retry_from == "ui":
            chat.load()  # the Retry load button
            for _ in range(200):
                if broken.status()["state"] != "loading":
                    break
                time.sleep(0.05)
        else:
            monkeypatch.setattr(api_module, "FAILED_RETRY_S", 0)  # a request after the pause starts a new attempt
        for _ in range(200):
            response = httpx.post(root + "/v1/chat/completions", json=request)
            if response.status_code != 503:
                break
            time.sleep(0.05)
        assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] >= 1
    assert "Ready" in chat.status()[0]
    _, _, session = chat.send({"text": "hello", "files": []}, session)
    list(chat.respond(session, "", 0, 1.0, 0, 1.0, 2, "0", ""))
    assert session.turns[-1].record.finish_reason in ("stop", "length")

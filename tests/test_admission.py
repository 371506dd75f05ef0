"""One bounded admission queue for every front end: answers beyond the slots wait in line (and say so), beyond the
queue the API answers 429 with Retry-After and the web chat says the server is busy."""
import contextlib
import threading

import httpx
import pytest
from servers import serve_api

from llava_ui.backends.admission import Admission, ServerBusy
from llava_ui.backends.base import Progress, Result
from llava_ui.engine import Engine
from llava_ui.chat.conversation import Conversation
from llava_ui.config import GenerationSettings
from llava_ui.web.handlers import ChatHandlers
from llava_ui.web.render import progress_text

SHORT = GenerationSettings(max_new_tokens=4, temperature=0)


@pytest.fixture(scope="module")
def engine(tiny_dir):
    return Engine(str(tiny_dir), dtype="float32").load()


@contextlib.contextmanager
def sizes(engine, slots: int, waiting: int):
    engine.admission.configure(slots, waiting)
    try:
        yield
    finally:
        engine.admission.configure(4, 32)


def question(text="hello there"):
    conversation = Conversation()
    conversation.add_user(text)
    return conversation


def test_slots_then_a_line_in_arrival_order_then_busy():
    admission = Admission(slots=1, waiting=2)
    first, second, third = admission.join(), admission.join(), admission.join()
    assert first.admitted and not second.admitted and admission.position(third) == (2, 2)
    with pytest.raises(ServerBusy) as busy:
        admission.join()
    assert busy.value.http_status == 429 and busy.value.retry_after_s >= 5
    assert not admission.wait(third, 0.05)  # second is ahead
    admission.leave()
    assert admission.wait(second, 1) and not admission.wait(third, 0.05)
    admission.cancel(second)  # done: its slot goes to the next in line
    assert admission.wait(third, 1)
    admission.cancel(third)
    assert admission.status() == {"active": 0, "waiting": 0, "slots": 1, "queue_size": 2}


def test_a_waiting_answer_reports_its_place_then_runs(engine):
    with sizes(engine, 1, 4):
        held = engine.admission.join()
        events = []
        waiter = threading.Thread(target=lambda: events.extend(engine.stream(question(), SHORT)))
        waiter.start()
        threading.Event().wait(1.2)
        assert any(isinstance(e, Progress) and e.stage == "queued" and e.done == 1 for e in events)
        assert not any(isinstance(e, Result) for e in events)
        engine.admission.cancel(held)
        waiter.join(30)
    assert isinstance(events[-1], Result) and events[-1].finish_reason in ("stop", "length")
    assert progress_text(Progress("queued", 2, 3)) == "*the server is busy: waiting for a free slot (2nd in line)*"


def test_a_stopped_waiting_answer_leaves_the_line(engine):
    with sizes(engine, 1, 4):
        held = engine.admission.join()
        stop = threading.Event()
        events = []
        waiter = threading.Thread(target=lambda: events.extend(engine.stream(question(), SHORT, stop_event=stop)))
        waiter.start()
        threading.Event().wait(0.7)
        stop.set()
        waiter.join(10)
        assert events[-1].finish_reason == "stopped" and engine.admission.status()["waiting"] == 0
        engine.admission.cancel(held)
    assert engine.admission.status()["active"] == 0


def test_beyond_the_queue_the_api_answers_429_with_retry_after(engine):
    with sizes(engine, 1, 0), contextlib.ExitStack() as stack:
        held = engine.admission.join()
        stack.callback(engine.admission.cancel, held)
        url = stack.enter_context(serve_api(engine))
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        for stream in (False, True):
            response = httpx.post(url + "/chat/completions", json={**body, "stream": stream}, timeout=30)
            assert response.status_code == 429, response.text
            assert int(response.headers["Retry-After"]) >= 5
            assert response.json()["error"]["code"] == "server_busy"


def test_beyond_the_queue_the_web_chat_says_the_server_is_busy(engine, monkeypatch):
    import llava_ui.web.handlers as handlers

    shown = []
    monkeypatch.setattr(handlers, "warn", lambda message: shown.append(str(message)))
    chat = ChatHandlers(engine, frames=2)
    with sizes(engine, 1, 0):
        held = engine.admission.join()
        try:
            _, _, session = chat.send({"text": "hello", "files": []}, None)
            list(chat.respond(session, "", 0, 1.0, 0, 1.0, 4, "0", ""))
        finally:
            engine.admission.cancel(held)
    assert any("the server is busy" in message for message in shown), shown

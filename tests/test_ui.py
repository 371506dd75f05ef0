"""The web chat's handlers with a tiny random engine, and the stateless /chat endpoint through gradio_client."""

import argparse
import json
import os
import threading
from pathlib import Path

import pytest

from llava_ui.engine import Engine
from llava_ui.chat.conversation import Conversation, Picture
from llava_ui.chat.media import load_image
from llava_ui.config import GenerationSettings
from llava_ui.web import handlers as ui_chat
from llava_ui.web.handlers import ChatHandlers
from llava_ui.web.inspector import status_html

ASSETS = Path(__file__).resolve().parents[1] / "assets"
CHART_A, CHART_B = str(ASSETS / "chart_sales_2023.png"), str(ASSETS / "chart_sales_2024.png")
VIDEO = str(ASSETS / "traffic_light.webm")
GREEDY = dict(temperature=0, top_p=1.0, top_k=0, repetition_penalty=1.0, seed=7)


@pytest.fixture(scope="module")
def engine(tiny_dir):
    # fp32: the tests below rely on the tiny random model's fp32 answers (at these seeds long, with no stop token);
    # bf16 rounds them differently (tests/test_bf16.py covers that path)
    return Engine(str(tiny_dir), dtype="float32").load()


@pytest.fixture
def chat(engine, monkeypatch):
    monkeypatch.setattr(ui_chat, "REFRESH_S", 0)  # every token reaches the screen, so the tests can count updates
    return ChatHandlers(engine, frames=2, max_files=3, max_upload_mb=5)


@pytest.fixture
def warnings(monkeypatch):
    shown = []
    monkeypatch.setattr(ui_chat, "warn", lambda message: shown.append(str(message)))
    return shown


def send(chat, text, files=(), session=None):
    chatbot, box, session = chat.send({"text": text, "files": list(files)}, session, 2)
    return session, box


def answer(chat, session, max_new_tokens=24, **settings):
    values = {**GREEDY, **settings}
    return list(chat.respond(session, "", values["temperature"], values["top_p"], values["top_k"],
                             values["repetition_penalty"], max_new_tokens, values["seed"], ""))


def bot_texts(updates):
    return [u[0][-1]["content"] for u in updates if u[0] and u[0][-1]["role"] == "assistant"]


def value(update):
    return update["value"] if isinstance(update, dict) and "__type__" in update else update


def test_answer_streams_token_by_token_and_fills_the_inspector(chat):
    session, box = send(chat, "first <image> then <image>: which has more blue?", [CHART_A, CHART_B])
    assert box is None  # the input box is emptied once the message is taken
    updates = answer(chat, session, max_new_tokens=40, temperature=1.0, seed=1)  # random weights: sampled text
    texts = bot_texts(updates)
    assert len(texts) > 2 and len(set(texts)) > 2, "the answer reaches the screen piece by piece"
    record = session.turns[0].record
    assert record.finish_reason in ("stop", "length")
    assert session.conversation.turns[0].answer == record.text
    chatbot, _, stats, summary, spans, prompt, gallery, probabilities, *attention_views, effect, box = updates[-1]
    assert "tokens/s" in stats and "first token" in stats
    assert "Context used" in summary and "/ 32,768" in summary and "Time to first token" in summary
    assert "chart_sales_2023.png" in summary and "Prefix cache" in summary
    assert prompt == record.prompt and prompt.count("<image>") == 2
    assert not value(gallery)
    assert not value(probabilities) and not probabilities["visible"]  # not asked for
    assert not any(view["visible"] for view in attention_views) and not effect["visible"]


def test_markers_place_images_and_the_ui_shows_where_each_went(chat):
    session, _ = send(chat, "before <image> middle <image> after", [CHART_A, CHART_B])
    attachments, text = chat.views(session)[0]
    first, second = attachments["content"]
    assert [first["alt_text"], second["alt_text"]] == ["Image 1: chart_sales_2023.png", "Image 2: chart_sales_2024.png"]
    assert first["path"].endswith("-1.png") and second["path"].endswith("-2.png")  # previews with a number badge
    assert text == {"role": "user", "content": "before `<image 1>` middle `<image 2>` after"}
    updates = answer(chat, session, max_new_tokens=2)
    spans = value(updates[-1][4])
    tagged = [(text, label) for text, label in spans if label]
    assert [label.split(" · ")[0] for _, label in tagged] == ["#1 image 1: chart_sales_2023.png",
                                                               "#2 image 2: chart_sales_2024.png"]
    plain = "".join(text if label is None else "|" for text, label in spans)
    assert "before | middle | after" in plain


def test_without_markers_images_come_first(chat):
    session, _ = send(chat, "compare these", [CHART_A, CHART_B])
    answer(chat, session, max_new_tokens=2)
    assert "user\n<image><image>\ncompare these" in session.turns[0].record.prompt


def test_stop_mid_answer_keeps_the_partial_answer_and_the_chat_goes_on(chat):
    session, _ = send(chat, "tell me a long story")
    updates = chat.respond(session, "", 1.0, 1.0, 0, 1.0, 400, 2, "")  # seed 2: a long answer here
    for _ in range(5):
        next(updates)
    stopper = threading.Thread(target=chat.stop, args=(session,))
    stopper.start()
    rest = list(updates)
    stopper.join(10)
    record = session.turns[0].record
    assert record.finish_reason == "stopped"
    assert 0 < len(record.token_ids) < 400
    assert session.conversation.turns[0].answer == record.text == bot_texts(rest)[-1]
    session, _ = send(chat, "and now?", session=session)
    answer(chat, session, max_new_tokens=3)
    assert session.conversation.turns[1].answer is not None and len(session.turns) == 2


def test_a_cancelled_answer_keeps_what_was_written(chat):
    """Gradio's `cancels=` closes the handler mid-answer: the text so far stays and the next message works."""
    session, _ = send(chat, "hello")
    updates = chat.respond(session, "", 1.0, 1.0, 0, 1.0, 400, 1, "")
    for _ in range(6):
        next(updates)
    updates.close()
    assert not session.busy
    kept = session.conversation.turns[0].answer
    assert kept and kept == session.partial
    session, _ = send(chat, "again", session=session)
    assert len(session.conversation.turns) == 2


def test_regenerate_rewrites_the_last_answer(chat):
    session, _ = send(chat, "hi")
    answer(chat, session, seed=3, temperature=1.0)
    first = session.turns[0].record
    chat.regenerate(session)
    assert session.conversation.turns[0].answer is None and session.turns[0].record is None
    answer(chat, session, seed=3, temperature=1.0)
    assert session.turns[0].record.token_ids == first.token_ids  # same seed, same answer
    answer_count = len(session.conversation.turns)
    chat.regenerate(session, message_index=1)  # the Chatbot's retry on the answer's message
    answer(chat, session, seed=4, temperature=1.0)
    assert len(session.conversation.turns) == answer_count == 1


def test_undo_removes_the_exchange_and_gives_the_message_back(chat):
    session, _ = send(chat, "one")
    answer(chat, session, max_new_tokens=2)
    session, _ = send(chat, "two <image>", [CHART_A], session)
    answer(chat, session, max_new_tokens=2)
    *views, box = chat.undo(session)
    assert box == {"text": "two <image>", "files": [CHART_A]}
    assert [t.text for t in session.conversation.turns] == ["one"] and len(session.turns) == 1
    assert len(views[0]) == 2


def test_editing_a_past_message_drops_later_turns_and_answers_again(chat, warnings):
    session, _ = send(chat, "first <image>", [CHART_A])
    answer(chat, session, max_new_tokens=2)
    session, _ = send(chat, "second", session=session)
    answer(chat, session, max_new_tokens=2)
    chat.edit(session, 1, "edited `<image 1>` question")  # message 1: the text under the image; shown text back
    assert [t.text for t in session.conversation.turns] == ["edited <image> question"]
    assert session.conversation.turns[0].answer is None and len(session.turns) == 1
    answer(chat, session, max_new_tokens=2)
    assert session.turns[0].record.prompt.count("<image>") == 1
    chat.edit(session, 1, "now two markers <image> <image>")
    assert warnings and "marker" in warnings[-1]
    assert session.conversation.turns[0].text == "edited <image> question"


def test_clear_starts_a_fresh_conversation(chat):
    session, _ = send(chat, "hi")
    answer(chat, session, max_new_tokens=2)
    chatbot, fresh, stats, summary, *_ = chat.clear(session)
    assert chatbot == [] and fresh is not session and not fresh.conversation.turns and stats == ""


def test_clear_during_an_answer_stops_it_and_the_old_chat_never_comes_back(chat):
    session, _ = send(chat, "hi")
    updates = chat.respond(session, "", 1.0, 1.0, 0, 1.0, 400, 1, "")
    next(updates), next(updates)
    chat.clear(session)
    rest = list(updates)
    assert rest and all(update == (ui_chat.gr.skip(),) * (ui_chat.VIEWS + 1) for update in rest)  # nothing touched
    assert session.turns[0].record.finish_reason == "stopped"


@pytest.mark.parametrize("files, limit, says", [
    ([CHART_A] * 4, 5, "4 files; the limit is 3"),
    ([CHART_A], 0.001, "the limit is 0.001 MB"),
    ([VIDEO, VIDEO], 5, "at most one video"),
])
def test_upload_limits_are_enforced_with_a_clear_message(engine, warnings, files, limit, says):
    chat = ChatHandlers(engine, frames=2, max_files=3, max_upload_mb=limit)
    chatbot, box, session = chat.send({"text": "look", "files": files}, None, 2)
    assert says in warnings[-1]
    assert not session.conversation.turns and chatbot == []
    assert box is not None  # the message stays in the box to be fixed


def test_unsupported_and_corrupt_files_give_a_visible_error_and_the_chat_keeps_working(chat, warnings, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    chat.send({"text": "read this", "files": [str(notes)]}, None, 2)
    assert ".txt is not supported" in warnings[-1]
    broken = tmp_path / "broken.png"
    broken.write_bytes(os.urandom(2048))
    chatbot, box, session = chat.send({"text": "what is this?", "files": [str(broken)]}, None, 2)
    assert "broken.png is not a readable image" in warnings[-1]
    assert not session.conversation.turns
    session, _ = send(chat, "fine, just text", session=session)
    answer(chat, session, max_new_tokens=2)
    assert session.conversation.turns[0].answer is not None


def test_video_frames_show_in_the_inspector_with_timestamps(chat):
    session, _ = send(chat, "what happens?", [VIDEO])
    clip, sheet = chat.views(session)[0][0]["content"]
    assert clip["path"] == VIDEO and sheet["path"].endswith(".png")  # the clip and a sheet of the frames it gave
    updates = answer(chat, session, max_new_tokens=2)
    frames = value(updates[-1][6])
    assert len(frames) == 2
    assert [caption for _, caption in frames] == ["frame 0 @ 0.00 s", "frame 35 @ 3.50 s"]
    assert updates[-1][5].count("<image>") == 2


def test_a_message_sent_while_the_model_loads_waits_and_says_so(tiny_dir, monkeypatch):
    class SlowLoad(Engine):
        release = threading.Event()

        def _load(self):
            self.release.wait(30)
            super()._load()

    monkeypatch.setattr(ui_chat, "REFRESH_S", 0)
    slow = SlowLoad(str(tiny_dir))
    chat = ChatHandlers(slow, frames=2)
    session, _ = send(chat, "hi")
    updates = chat.respond(session, "", 0, 1.0, 0, 1.0, 4, 1, "")
    assert next(updates)[0][-1]["content"] == "…"  # at once: the answer has begun
    assert "The model is loading" in next(updates)[0][-1]["content"]
    assert "Loading" in chat.status()[0]
    slow.release.set()
    list(updates)
    assert session.conversation.turns[0].answer is not None


def test_a_failed_load_explains_itself_and_offers_a_retry(tmp_path, warnings):
    broken = Engine(str(tmp_path / "no-such-model"))
    chat = ChatHandlers(broken)
    broken.load_in_background().join(10)
    html, button, timer = chat.status()
    assert "failed to load" in html and "Retry load" in html
    assert button["visible"] and button["value"] == "Retry load" and timer["active"]
    session, _ = send(chat, "hi")
    *_, box = list(chat.respond(session, "", 0.2, 1.0, 0, 1.0, 4, None, ""))[-1]
    assert "failed to load" in warnings[-1]
    assert box == {"text": "hi", "files": []} and not session.conversation.turns


def test_status_shows_device_precision_and_a_random_weights_badge(chat):
    html, button, timer = chat.status()
    assert "Ready" in html and "cpu" in html and "fp32" in html
    assert "bf16 on oneDNN (AMX)" in status_html({"state": "ready", "model": "m", "device": "cpu", "dtype": "bfloat16",
                                                  "precision": "bf16 on oneDNN (AMX)"})
    assert "random weights — output is meaningless" in html
    assert not button["visible"] and not timer["active"]
    assert "Load now" in status_html({"state": "not_loaded", "model": "m"})


def test_export_replays_to_the_same_answers_through_the_cli(chat, tiny_dir):
    from llava_ui.commands.main import main

    session, _ = send(chat, "first <image> second <image>", [CHART_A, CHART_B])
    answer(chat, session, max_new_tokens=12)
    session, _ = send(chat, "and the video?", [VIDEO], session)
    answer(chat, session, max_new_tokens=12)
    path = chat.export(session)["value"]
    export = json.loads(Path(path).read_text())
    assert len(export["turns"]) == 2 and export["turns"][1]["video"]["frames"]
    assert export["dtype"] == "float32"  # the chat's precision: the replay computes in it too, whatever the default
    export["model"] = str(tiny_dir)  # the engine was built from this folder
    Path(path).write_text(json.dumps(export))
    assert main(["replay", path]) == 0  # 0: every answer came out the same
    export["turns"][1]["answer"] = "something else"
    Path(path).write_text(json.dumps(export))
    assert main(["replay", path]) == 1


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(engine):
    from llava_ui.web.page import build_demo

    args = argparse.Namespace(frames=2, max_files=4, max_upload_mb=5)
    demo = build_demo(engine, args)
    demo.queue().launch(server_name="127.0.0.1", server_port=_free_port(), prevent_thread_lock=True, quiet=True)
    yield demo.local_url
    demo.close()


def test_chat_endpoint_streams_and_ends_with_the_greedy_answer(served, engine):
    from gradio_client import Client, handle_file

    client = Client(served, verbose=False)
    assert "/chat" in client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    job = client.submit("hi <image> and <image>", [handle_file(CHART_A), handle_file(CHART_B)], "", 0, 1.0, 0, 1.0,
                        150, 2, 5, "", api_name="/chat")
    final = job.result(timeout=120)
    outputs = job.outputs()
    assert len(outputs) > 1 and outputs[-1] == final
    assert all(later.startswith(earlier) for earlier, later in zip(outputs, outputs[1:]))

    conversation = Conversation()
    conversation.add_user("hi <image> and <image>", [Picture(load_image(p), Path(p).name) for p in (CHART_A, CHART_B)])
    expected = engine.generate(conversation, GenerationSettings(max_new_tokens=150, temperature=0, seed=5))
    assert final == expected.text


def test_chat_endpoint_defaults_and_errors(served):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    client = Client(served, verbose=False)
    assert isinstance(client.predict("hello", [], max_new_tokens=4, api_name="/chat"), str)
    with pytest.raises(AppError, match="marker"):
        client.predict("two markers <image> <image>", [handle_file(CHART_A)], api_name="/chat")


def test_an_empty_seed_is_random_and_a_bad_one_is_explained(chat, warnings):
    session, _ = send(chat, "hi")
    seeds = []
    for _ in range(2):
        chat.regenerate(session)
        list(chat.respond(session, "", 1.0, 1.0, 0, 1.0, 2, "", ""))
        seeds.append(session.turns[0].record.seed)
    assert all(isinstance(seed, int) for seed in seeds) and seeds[0] != seeds[1]
    session, _ = send(chat, "again", session=session)
    *_, box = list(chat.respond(session, "", 0.2, 1.0, 0, 1.0, 2, "12abc", ""))[-1]
    assert "seed must be a whole number" in warnings[-1] and box == {"text": "again", "files": []}

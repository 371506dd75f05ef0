"""Remote mode: a RemoteEngine (B) in front of another instance's API (A) answers exactly as A does, and stops A."""

import base64
import io
import threading
import time
from pathlib import Path

import openai
import pytest
from fastapi import FastAPI
from PIL import Image
from servers import BlockedEngine, RecordingEngine, serve

from llava_ui.backends.base import Delta, Result
from llava_ui.backends.remote import RemoteEngine
from llava_ui.chat.conversation import Conversation
from llava_ui.chat.media import Frame, Video
from llava_ui.config import GenerationSettings
from llava_ui.errors import UserError
from llava_ui.openai.server import create_api_router

KEY = "a-key"
RED, BLUE = Image.new("RGB", (40, 30), (200, 30, 30)), Image.new("RGB", (30, 50), (20, 40, 220))


def api_app(backend, **options) -> FastAPI:
    app = FastAPI()
    app.include_router(create_api_router(backend, **options))
    return app


@pytest.fixture(scope="module")
def engine_a(tiny_dir):
    return RecordingEngine(str(tiny_dir), dtype="float32").load()


@pytest.fixture(scope="module")
def url_a(engine_a):
    with serve(api_app(engine_a, api_key=KEY)) as root:
        yield root + "/v1"


@pytest.fixture(scope="module")
def remote(url_a):
    return RemoteEngine(url_a, api_key=KEY)


def chat(text, pictures=(), video=None, history=(), system=None):
    conversation = Conversation(system=system)
    for question, answer in history:
        conversation.add_user(question)
        conversation.turns[-1].answer = answer
    conversation.add_user(text, list(pictures), video)
    return conversation


def both(engine_a, remote, conversation, image_mode=None, **settings):
    """(A's own answer, B's answer through A's API) for the same conversation and settings."""
    settings = GenerationSettings(**settings)
    direct = engine_a.generate(conversation.copy(), settings, image_mode=image_mode)
    through = remote.generate(conversation, settings, image_mode=image_mode)
    return direct, through


def test_load_picks_the_served_model_and_shows_it_is_random(remote, engine_a):
    remote.load()
    status = remote.status()
    assert status["state"] == "ready" and status["model"] == engine_a.status()["model"]
    assert status["random_weights"] is True and status["context_length"] == engine_a.status()["context_length"]
    assert status["image_mode"] == engine_a.status()["image_mode"]


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=1.0, seed=5, top_k=40, top_p=0.9,
                                                                 repetition_penalty=1.3)], ids=["greedy", "sampled"])
def test_remote_answers_exactly_as_the_engine_behind_it(engine_a, remote, sampling):
    conversation = chat("look <image> and <image> now", [RED, BLUE], history=[("hello", "hi there")], system="Terse.")
    direct, through = both(engine_a, remote, conversation, max_new_tokens=12, **sampling)
    assert through.text == direct.text and through.finish_reason == direct.finish_reason == "length"
    assert through.prompt == direct.prompt
    assert through.stats.prompt_tokens == direct.stats.prompt_tokens
    assert through.stats.generated_tokens == 12
    assert through.visual_tokens_per_image == direct.visual_tokens_per_image
    assert conversation.turns[-1].answer == direct.text


def test_video_frames_and_image_mode_travel_to_the_remote(engine_a, remote):
    frames = [Frame(Image.new("RGB", (32, 24), (i * 60, 90, 200 - i * 50)), i * 10, i / 3) for i in range(3)]
    clip = Video(frames=frames, total_frames=30, fps=30.0, name="clip.mp4")
    direct, through = both(engine_a, remote, chat("what happens in <video> ?", video=clip), image_mode="flat",
                           max_new_tokens=6, temperature=0)
    assert through.text == direct.text and through.image_mode == direct.image_mode == "flat"
    assert through.stats.prompt_tokens == direct.stats.prompt_tokens
    assert through.visual_tokens_per_image == direct.visual_tokens_per_image == [729] * 3


def test_streaming_through_the_remote_arrives_in_pieces(engine_a, remote):
    conversation = chat("a <image> b", [RED])
    direct = engine_a.generate(conversation.copy(), GenerationSettings(max_new_tokens=10, temperature=0))
    events = list(remote.stream(conversation, GenerationSettings(max_new_tokens=10, temperature=0)))
    deltas = [e.text for e in events if isinstance(e, Delta)]
    assert len(deltas) > 1 and "".join(deltas) == events[-1].text == direct.text
    assert events[-1].stats.ttft_s > 0 and events[-1].seed is not None


@pytest.mark.parametrize("how", ["stop_event", "close"])
def test_stopping_the_remote_stops_the_engine_behind_it(engine_a, remote, how):
    before, stop = len(engine_a.finals), threading.Event()
    events = remote.stream(chat("talk for a long time"), GenerationSettings(max_new_tokens=3000, temperature=0),
                           stop_event=stop)
    deltas = 0
    for event in events:
        deltas += isinstance(event, Delta)
        if deltas == 3:
            if how == "close":
                events.close()
                break
            stop.set()
        if isinstance(event, Result):
            assert event.finish_reason == "stopped"
    for _ in range(200):
        if len(engine_a.finals) > before:
            break
        time.sleep(0.05)
    assert engine_a.finals[-1].finish_reason == "stopped"
    assert engine_a.finals[-1].stats.generated_tokens < 1000


def test_the_remote_reports_what_the_server_refuses(remote):
    tiny = Image.new("RGB", (8, 8), "white")
    with pytest.raises(UserError, match="context holds"):
        remote.generate(chat("<image>" * 50, [tiny] * 50), GenerationSettings(max_new_tokens=1))


def test_unreachable_wrong_key_or_wrong_model_fail_loading_clearly(url_a):
    with serve(FastAPI()) as root:
        nothing = root + "/v1"
    failures = {"cannot reach": RemoteEngine(nothing), "HTTP 401": RemoteEngine(url_a, api_key="wrong"),
                "not 'other-model'": RemoteEngine(url_a, "other-model", api_key=KEY)}
    for words, backend in failures.items():
        with pytest.raises(UserError, match=words):
            backend.load()
        assert backend.status()["state"] == "failed" and words in backend.status()["error"]


def test_the_remote_waits_while_the_other_instance_loads(tiny_dir):
    blocked = BlockedEngine(str(tiny_dir), dtype="float32")
    with serve(api_app(blocked)) as root:
        remote = RemoteEngine(root + "/v1")
        loading = remote.load_in_background()
        time.sleep(0.5)
        assert remote.status()["state"] == "loading" and "loading" in remote.status()["message"]
        blocked.release.set()
        loading.join(60)
        assert remote.status()["state"] == "ready"
        assert remote.generate(chat("hi"), GenerationSettings(max_new_tokens=2)).finish_reason == "length"


def test_an_api_over_a_remote_engine_answers_like_the_engine(engine_a, remote):
    with serve(api_app(remote)) as root:
        client = openai.OpenAI(base_url=root + "/v1", api_key="none", max_retries=0)
        png = io.BytesIO()
        RED.save(png, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
        reply = client.chat.completions.create(model=remote.status()["model"], max_tokens=8, temperature=0,
                                               messages=[{"role": "user", "content": [
                                                   {"type": "text", "text": "x "},
                                                   {"type": "image_url", "image_url": {"url": url}}]}])
    direct = engine_a.generate(chat("x <image>", [RED]), GenerationSettings(max_new_tokens=8, temperature=0))
    assert reply.choices[0].message.content == direct.text
    assert reply.usage.prompt_tokens == direct.stats.prompt_tokens


def test_a_ui_instance_in_remote_mode_chats_like_the_engine(engine_a, url_a, tmp_path):
    from gradio_client import Client, handle_file

    import app as entry

    args = entry.parse_args(["--backend", "remote", "--base-url", url_a, "--remote-api-key", KEY])
    ui_app, _, backend = entry.create_app(args)
    image = tmp_path / "red.png"
    RED.save(image)
    with serve(ui_app, lifespan="on") as root:
        client = Client(root + "/", verbose=False)
        job = client.submit("look at <image> please", [handle_file(str(image))], "", 0, 1.0, 0, 1.0, 12, 4, 1, "",
                            api_name="/chat")
        answer = job.result(timeout=120)
    direct = engine_a.generate(chat("look at <image> please", [RED]), GenerationSettings(max_new_tokens=12,
                                                                                          temperature=0, seed=1))
    assert backend.status()["state"] == "ready" and backend.status()["model"] == engine_a.status()["model"]
    assert answer == direct.text and len(job.outputs()) >= 1


def test_the_vllm_chat_template_in_the_docs_builds_this_apps_prompt():
    import jinja2

    from llava_ui.backends.remote import openai_messages
    from llava_ui.chat.prompt import render_prompt

    docs = (Path(__file__).resolve().parents[1] / "docs" / "deploy.md").read_text()
    template = jinja2.Environment().from_string(docs.split("```jinja\n")[1].split("```")[0])
    conversation = chat("two: <image> and\n<image>!", [RED, BLUE], history=[("hello", "hi")])
    messages = openai_messages(conversation, lambda image, digest: "data:,")
    for message in messages:  # vLLM hands image parts to the template as {"type": "image"}
        if isinstance(message["content"], list):
            message["content"] = [p if p["type"] == "text" else {"type": "image"} for p in message["content"]]
    rendered = template.render(messages=messages, add_generation_prompt=True)
    assert rendered == render_prompt(conversation.system, conversation.messages())

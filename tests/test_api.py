"""The OpenAI-compatible API, driven by the official openai client against a real server on 127.0.0.1."""

import base64
import io
import time

import httpx
import openai
import pytest
from fastapi import FastAPI
from PIL import Image
from servers import BlockedEngine, RecordingEngine, serve

from llava_ui.engine import Engine
from llava_ui.chat.conversation import Conversation
from llava_ui.config import GenerationSettings
from llava_ui.openai.server import create_api_router

KEY = "test-key"


def data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


RED, BLUE = Image.new("RGB", (40, 30), (200, 30, 30)), Image.new("RGB", (30, 50), (20, 40, 220))


def interleaved(*parts):
    """A user message from strings and PIL images, in order."""
    return {"role": "user", "content": [{"type": "text", "text": p} if isinstance(p, str) else
                                        {"type": "image_url", "image_url": {"url": data_url(p)}} for p in parts]}


@pytest.fixture(scope="module")
def engines(tiny_dir):
    main = RecordingEngine(str(tiny_dir), dtype="float32")
    main.load()
    return {"main": main, "blocked": BlockedEngine(str(tiny_dir), dtype="float32"), "broken": Engine("/nonexistent/llava-checkpoint")}


@pytest.fixture(scope="module")
def urls(engines):
    app = FastAPI()
    app.include_router(create_api_router(engines["main"], api_key=KEY))
    for name, backend, files in (("open", engines["main"], True), ("blocked", engines["blocked"], False),
                                 ("broken", engines["broken"], False)):
        sub = FastAPI()
        sub.include_router(create_api_router(backend, allow_file_urls=files))
        app.mount(f"/{name}", sub)
    with serve(app) as root:
        yield {"main": root + "/v1", "open": root + "/open/v1", "blocked": root + "/blocked/v1",
               "broken": root + "/broken/v1"}
    engines["blocked"].release.set()


@pytest.fixture(scope="module")
def client(urls):
    return openai.OpenAI(base_url=urls["main"], api_key=KEY, max_retries=0)


def engine_answer(engine, text, pictures, **settings):
    conversation = Conversation()
    conversation.add_user(text, pictures)
    return engine.generate(conversation, GenerationSettings(**settings))


def test_models_lists_the_served_model(client, engines):
    models = client.models.list().data
    assert [m.id for m in models] == [engines["main"].status()["model"]]


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=1.0, seed=7)], ids=["greedy", "seeded"])
def test_images_between_text_parts_answer_as_the_engine_does(client, engines, sampling):
    engine = engines["main"]
    expected = engine_answer(engine, "look <image> and <image> now", [RED, BLUE], max_new_tokens=12, **sampling)
    reply = client.chat.completions.create(model=engine.status()["model"], max_tokens=12, **sampling,
                                           messages=[interleaved("look ", RED, " and ", BLUE, " now")])
    assert engine.finals[-1].prompt.endswith("user\nlook <image> and <image> now<|im_end|>\n<|im_start|>assistant\n")
    assert reply.choices[0].message.content == expected.text
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.prompt_tokens == expected.stats.prompt_tokens > 2 * 729
    assert reply.usage.completion_tokens == expected.stats.generated_tokens == 12
    assert reply.model == engine.status()["model"] and reply.object == "chat.completion"


def test_streamed_answer_arrives_in_pieces_with_usage_last(client, engines):
    engine = engines["main"]
    expected = engine_answer(engine, "look <image> and <image> now", [RED, BLUE], max_new_tokens=10,
                             temperature=1.0, seed=3)
    chunks = list(client.chat.completions.create(
        model=engine.status()["model"], max_completion_tokens=10, temperature=1.0, seed=3, stream=True,
        stream_options={"include_usage": True}, messages=[interleaved("look ", RED, " and ", BLUE, " now")]))
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1 and "".join(pieces) == expected.text
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == expected.stats.prompt_tokens
    assert chunks[-1].usage.completion_tokens == 10
    assert len({c.id for c in chunks}) == 1


def test_leading_images_are_followed_by_a_newline_as_in_the_ui(client, engines):
    client.chat.completions.create(model="", max_tokens=1, messages=[interleaved(RED, "what is it?")])
    assert "user\n<image>\nwhat is it?<|im_end|>" in engines["main"].finals[-1].prompt


def test_history_and_system_prompt_shape_the_prompt(client, engines):
    client.chat.completions.create(model="", max_tokens=1, messages=[
        {"role": "system", "content": "Be brief."}, interleaved("hi ", RED), {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "again"}])
    prompt = engines["main"].finals[-1].prompt
    assert prompt.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert "user\nhi <image><|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n<|im_start|>user\nagain" in prompt


def test_a_stop_string_ends_the_answer_before_it(client, engines):
    full = client.chat.completions.create(model="", max_tokens=16, temperature=1.0, seed=11,
                                          messages=[{"role": "user", "content": "say something"}])
    text = full.choices[0].message.content
    stop = text[4:6]
    cut = client.chat.completions.create(model="", max_tokens=16, temperature=1.0, seed=11, stop=[stop, "\x00never"],
                                         messages=[{"role": "user", "content": "say something"}])
    assert cut.choices[0].message.content == text[:text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_a_bad_image_is_a_400_saying_why(client):
    junk = "data:image/png;base64," + base64.b64encode(b"not an image at all").decode()
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="", messages=[{"role": "user", "content": [
            {"type": "text", "text": "what?"}, {"type": "image_url", "image_url": {"url": junk}}]}])
    assert "not a readable image" in caught.value.body["message"]
    assert caught.value.body["param"] == "messages.0.content.1"


def test_one_request_cannot_hold_unbounded_images(client, monkeypatch):
    import llava_ui.openai.format as openai_format

    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="", messages=[interleaved("many", *[RED] * 65)])
    assert "65 images; the limit is 64" in caught.value.body["message"]
    monkeypatch.setattr(openai_format, "MAX_REQUEST_PIXELS", 2000)  # RED is 1,200 pixels: two exceed it
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="", messages=[interleaved("two", RED, RED)])
    assert "megapixels in all" in caught.value.body["message"]


@pytest.mark.parametrize("url, words", [("https://example.com/cat.png", "--allow-image-urls"),
                                        ("data:image/png;base64,@@@", "not valid base64")])
def test_unusable_image_urls_are_refused(client, url, words):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}]}])
    assert words in caught.value.body["message"]


def test_file_urls_only_when_allowed(client, urls, engines, tmp_path):
    path = tmp_path / "red.png"
    RED.save(path)
    message = {"role": "user", "content": [{"type": "text", "text": "see "},
                                           {"type": "image_url", "image_url": {"url": path.as_uri()}}]}
    with pytest.raises(openai.BadRequestError, match="allow-file-urls"):
        client.chat.completions.create(model="", messages=[message])
    allowed = openai.OpenAI(base_url=urls["open"], api_key="unused", max_retries=0)
    reply = allowed.chat.completions.create(model="", max_tokens=2, temperature=0, messages=[message])
    expected = engine_answer(engines["main"], "see <image>", [RED], max_new_tokens=2, temperature=0)
    assert reply.choices[0].message.content == expected.text
    assert reply.usage.prompt_tokens == expected.stats.prompt_tokens


def test_the_api_key_is_required_when_set(urls):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        response = httpx.get(urls["main"] + "/models", headers=headers)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=urls["main"], api_key="wrong", max_retries=0).models.list()
    assert httpx.get(urls["main"] + "/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


@pytest.mark.parametrize("body, status, words", [
    ({"messages": "hello"}, 400, "messages"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "seed": -5}, 400, "seed"),
    ({"messages": [{"role": "user", "content": "hi"}], "image_mode": "fancy"}, 400, "image_mode"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, 400, "last message"),
    ({"messages": [{"role": "tool", "content": "x"}]}, 400, "unsupported role"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}, 400, "input_audio"),
    ({"messages": [{"role": "user", "content": "two <image> markers <image>"}]}, 400, "marker"),
    ({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}, 404, "gpt-4o"),
])
def test_malformed_requests_get_openai_shaped_errors(urls, body, status, words):
    response = httpx.post(urls["open"] + "/chat/completions", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert words in error["message"] and set(error) == {"message", "type", "param", "code"}


def test_not_json_and_unknown_endpoints_are_openai_errors(urls):
    response = httpx.post(urls["open"] + "/chat/completions", content=b"{oops", headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]
    response = httpx.post(urls["open"] + "/completions", json={"prompt": "hi"})
    assert response.status_code == 404 and "chat/completions" in response.json()["error"]["message"]


def test_a_context_overflow_is_a_400(client):
    tiny = data_url(Image.new("RGB", (8, 8), "white"))
    content = [{"type": "image_url", "image_url": {"url": tiny}}] * 50 + [{"type": "text", "text": "all?"}]
    with pytest.raises(openai.BadRequestError, match="context holds"):
        client.chat.completions.create(model="", messages=[{"role": "user", "content": content}])


def test_503_with_retry_after_while_the_model_loads(urls, engines):
    request = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    response = httpx.post(urls["blocked"] + "/chat/completions", json=request)
    assert response.status_code == 503 and response.headers["Retry-After"]
    assert response.json()["error"]["code"] == "model_loading"
    assert engines["blocked"].status()["state"] == "loading"
    engines["blocked"].release.set()
    for _ in range(300):
        response = httpx.post(urls["blocked"] + "/chat/completions", json=request)
        if response.status_code != 503:
            break
        time.sleep(0.1)
    # served once loaded (random weights may sample a stop token first: 0 or 1 tokens)
    assert response.status_code == 200 and response.json()["choices"][0]["finish_reason"] in ("length", "stop")
    assert response.json()["usage"]["completion_tokens"] <= 1


def test_503_with_the_reason_when_loading_failed(urls):
    request = {"messages": [{"role": "user", "content": "hi"}]}
    for _ in range(100):
        response = httpx.post(urls["broken"] + "/chat/completions", json=request)
        if response.json()["error"]["code"] == "model_load_failed":
            break
        time.sleep(0.1)
    assert response.status_code == 503 and response.headers["Retry-After"]
    assert "does not exist" in response.json()["error"]["message"]


def wait_for_final(engine, count):
    for _ in range(200):
        if len(engine.finals) > count:
            return engine.finals[-1]
        time.sleep(0.05)
    raise AssertionError("the engine never finished the request")


def test_a_client_leaving_mid_stream_stops_the_generation(urls, engines, client):
    engine, before = engines["main"], len(engines["main"].finals)
    request = {"messages": [{"role": "user", "content": "talk for a long time"}], "max_tokens": 3000,
               "temperature": 0, "stream": True}
    with httpx.stream("POST", urls["open"] + "/chat/completions", json=request) as response:
        received = 0
        for line in response.iter_lines():
            received += line.startswith("data:")
            if received == 5:
                break  # leaving the block drops the connection mid-answer
    final = wait_for_final(engine, before)
    assert final.finish_reason == "stopped" and final.stats.generated_tokens < 1000


def test_a_client_leaving_a_plain_request_stops_the_generation(urls, engines):
    engine, before = engines["main"], len(engines["main"].finals)
    request = {"messages": [{"role": "user", "content": "talk for a long time"}], "max_tokens": 5000, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(urls["open"] + "/chat/completions", json=request, timeout=httpx.Timeout(5, read=1.0))
    final = wait_for_final(engine, before)
    assert final.finish_reason == "stopped" and final.stats.generated_tokens < 2500


def test_streaming_does_not_block_other_requests(urls, client):
    request = {"messages": [{"role": "user", "content": "talk"}], "max_tokens": 400, "temperature": 0, "stream": True}
    with httpx.stream("POST", urls["open"] + "/chat/completions", json=request) as response:
        next(response.iter_lines())
        started = time.perf_counter()
        assert client.models.list().data
        assert time.perf_counter() - started < 1.0

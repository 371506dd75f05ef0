"""The API's OpenAI contract beyond chat: fields it does not implement are refused (not ignored), a model can be
retrieved by id, and http(s) image URLs are fetched only when allowed, within limits, through safehttpx."""
import io
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import openai
import pytest
from PIL import Image
from servers import RecordingEngine, serve_api

from llava_ui.openai.fetch import URLPolicy

PNG = io.BytesIO()
Image.new("RGB", (40, 30), (200, 30, 30)).save(PNG, format="PNG")


@pytest.fixture(scope="module")
def engine(tiny_dir):
    return RecordingEngine(str(tiny_dir), dtype="float32").load()


@pytest.fixture(scope="module")
def image_host():
    """A local web server: /red.png, /big (over the limit), /slow (never finishes), /hop/N (redirects N times)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/red.png":
                self._send(PNG.getvalue())
            elif self.path == "/big":
                self._send(b"\0" * (300 << 10))
            elif self.path == "/slow":
                self.send_response(200)
                self.send_header("content-length", "1000")
                self.end_headers()
                self.wfile.write(b"\0")
                self.wfile.flush()
                threading.Event().wait(5)
            elif self.path.startswith("/hop/"):
                left = int(self.path.rsplit("/", 1)[1])
                self.send_response(302)
                self.send_header("location", f"/hop/{left - 1}" if left > 1 else "/red.png")
                self.end_headers()
            elif self.path == "/to-metadata":
                self.send_response(302)
                self.send_header("location", "http://169.254.169.254/latest/meta-data/")
                self.end_headers()
            else:
                self.send_response(404)
                self.end_headers()

        def _send(self, body):
            self.send_response(200)
            self.send_header("content-type", "image/png")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def ask(base_url, url=None, **fields):
    client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=60)
    content = [{"type": "text", "text": "what is it?"}]
    if url:
        content.append({"type": "image_url", "image_url": {"url": url}})
    return client.chat.completions.create(model="", messages=[{"role": "user", "content": content}], max_tokens=2,
                                          temperature=0, **fields)


@pytest.mark.parametrize("fields, param", [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"n": 2}, "n"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"frequency_penalty": 0.5}, "frequency_penalty"),
    ({"logit_bias": {"42": 5}}, "logit_bias"),
])
def test_fields_it_does_not_implement_are_a_400_naming_the_field(engine, fields, param):
    with serve_api(engine) as base_url, pytest.raises(openai.BadRequestError) as caught:
        ask(base_url, **fields)
    assert caught.value.body["param"] == param and "not supported" in caught.value.body["message"]


def test_neutral_values_of_those_fields_are_accepted(engine):
    with serve_api(engine) as base_url:
        reply = ask(base_url, n=1, presence_penalty=0, frequency_penalty=0, logprobs=False,
                    response_format={"type": "text"}, tool_choice="none", user="someone")
    assert reply.choices[0].message.content is not None


def test_a_model_is_retrieved_by_its_id(engine):
    with serve_api(engine) as base_url:
        client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0)
        served = client.models.list().data[0].id
        assert client.models.retrieve(served).id == served
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve("someone/else")


def test_image_urls_are_refused_unless_the_server_allows_them(engine, image_host):
    with serve_api(engine) as base_url, pytest.raises(openai.BadRequestError) as caught:
        ask(base_url, image_host + "/red.png")
    assert "--allow-image-urls" in caught.value.body["message"]


def test_an_allowed_image_url_is_fetched_and_answered_like_the_same_image_inline(engine, image_host):
    import base64

    policy = URLPolicy(trusted_hosts=("127.0.0.1",))
    inline = "data:image/png;base64," + base64.b64encode(PNG.getvalue()).decode()
    with serve_api(engine, image_urls=policy) as base_url:
        fetched = ask(base_url, image_host + "/hop/2", seed=1)
        direct = ask(base_url, inline, seed=1)
    assert fetched.choices[0].message.content == direct.choices[0].message.content
    assert fetched.usage.prompt_tokens == direct.usage.prompt_tokens  # the image's visual tokens are in the prompt


@pytest.mark.parametrize("path, policy, says", [
    ("/big", URLPolicy(max_bytes=100 << 10, trusted_hosts=("127.0.0.1",)), "larger than"),
    ("/slow", URLPolicy(timeout_s=0.5, trusted_hosts=("127.0.0.1",)), "longer than"),
    ("/hop/5", URLPolicy(max_redirects=3, trusted_hosts=("127.0.0.1",)), "redirects more than 3"),
    ("/nothing", URLPolicy(trusted_hosts=("127.0.0.1",)), "HTTP 404"),
    ("/red.png", URLPolicy(), "public internet host"),  # loopback, not trusted: safehttpx refuses it
    ("/to-metadata", URLPolicy(trusted_hosts=("127.0.0.1",)), "public internet host"),  # a redirect is checked too
])
def test_image_url_limits(engine, image_host, path, policy, says):
    with serve_api(engine, image_urls=policy) as base_url, pytest.raises(openai.BadRequestError) as caught:
        ask(base_url, image_host + path)
    assert says in caught.value.body["message"], caught.value.body["message"]
    assert caught.value.body["param"] == "messages.0.content.1"

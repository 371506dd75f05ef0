"""Nobody gets in: what the app exposes, and every attempt to make it read what it should not is refused.

The app under test is the real one (app.create_app: UI + API) with the tiny model, an API key, a 50 KB upload limit
and 2 files per message, served on 127.0.0.1.
"""
from __future__ import annotations

import os
import pickle
import shutil
import uuid
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image
from servers import serve

import app as app_module
from llava_ui.engine import Engine

ROOT = Path(__file__).resolve().parents[1]
KEY = "security-test-key"
CHART = ROOT / "assets" / "chart_sales_2023.png"


# --- where it listens -------------------------------------------------------------------------------------------------

@pytest.fixture
def no_llava_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("LLAVA_") or name in ("SPACE_ID", "GRADIO_SERVER_PORT"):
            monkeypatch.delenv(name)
    return monkeypatch


def test_binds_127_0_0_1_by_default_with_no_share_link(no_llava_env, tiny_dir):
    args = app_module.parse_args([])
    assert args.host == "127.0.0.1" and args.share is False and args.api_key is None and not args.allow_file_urls
    served = {}
    no_llava_env.setattr("uvicorn.run", lambda app, host, port, **kw: served.update(host=host, port=port))
    no_llava_env.setattr("gradio.Blocks.launch", lambda *a, **kw: pytest.fail("a share link was opened"))
    app_module.main(["--model", str(tiny_dir)])
    assert served == {"host": "127.0.0.1", "port": 7860}


def test_a_share_link_only_when_asked_and_it_keeps_the_upload_guard(no_llava_env, tiny_dir):
    from fastapi import FastAPI

    launched = {}

    def launch(demo, **options):
        launched.update(options)
        demo.app = FastAPI()

    no_llava_env.setattr("gradio.Blocks.launch", launch)
    no_llava_env.setattr("gradio.Blocks.block_thread", lambda demo: None)
    app_module.main(["--model", str(tiny_dir), "--share"])
    assert launched["share"] is True and launched["server_name"] == "127.0.0.1"
    assert [m.cls for m in launched["app_kwargs"]["middleware"]] == [app_module.UploadsOnly]


def test_binds_all_interfaces_only_on_a_space_or_when_asked(no_llava_env):
    no_llava_env.setenv("SPACE_ID", "someone/llava")
    assert app_module.parse_args([]).host == "0.0.0.0"
    no_llava_env.delenv("SPACE_ID")
    assert app_module.parse_args(["--host", "0.0.0.0"]).host == "0.0.0.0"
    no_llava_env.setenv("LLAVA_SHARE", "1")
    assert app_module.parse_args([]).share is True


# --- the running app ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def secret_image(tmp_path_factory):
    """A private image on the server's disk, outside any folder the app serves (in the system temp dir, which
    Gradio once served by default). Its name is unique, so any copy of it in Gradio's cache can be found."""
    path = tmp_path_factory.mktemp("private") / f"secret-{uuid.uuid4().hex}.png"
    Image.new("RGB", (16, 16), (1, 2, 3)).save(path)
    return path


@pytest.fixture(scope="module")
def site(tiny_dir):
    args = app_module.parse_args(["--model", str(tiny_dir), "--api-key", KEY, "--max-upload-mb", "0.05",
                                  "--max-files", "2"])
    fastapi_app, demo, backend = app_module.create_app(args)
    backend.load()
    with serve(fastapi_app, lifespan="on") as root:
        yield root, demo


def copies_in_the_upload_folder(name: str) -> list[Path]:
    from gradio.utils import get_upload_folder

    return list(Path(get_upload_folder()).rglob(name))


def test_v1_requires_the_api_key_and_the_page_is_open(site):
    root, _ = site
    assert httpx.get(root + "/v1/models").status_code == 401
    assert httpx.get(root + "/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
    bad = openai.OpenAI(base_url=root + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="", messages=[{"role": "user", "content": "hi"}])
    assert httpx.get(root + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert httpx.get(root + "/").status_code == 200  # documented: the key protects /v1 only


def test_uploads_over_the_size_limit_are_refused(site):
    root, _ = site
    big = httpx.post(root + "/gradio_api/upload", files={"files": ("big.png", b"\0" * 60_000)})
    assert big.status_code == 413 and "maximum allowed size" in big.text
    small = httpx.post(root + "/gradio_api/upload", files={"files": ("../../../small.png", b"\0" * 100)})
    from gradio.utils import get_upload_folder

    stored = Path(small.json()[0]).resolve()
    assert small.status_code == 200 and stored.is_relative_to(Path(get_upload_folder()).resolve())
    assert stored.name == "small.png"  # the ../ in the name is dropped


def test_more_files_than_the_limit_are_refused(site):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    client = Client(site[0], verbose=False)
    try:
        with pytest.raises(AppError, match="3 files; the limit is 2"):
            client.predict("hi", [handle_file(CHART)] * 3, api_name="/chat")
        assert isinstance(client.predict("hi", [handle_file(CHART)], max_new_tokens=2, api_name="/chat"), str)
    finally:
        client.close()


@pytest.mark.parametrize("route", [
    "/file=/etc/passwd",
    "/gradio_api/file=/etc/passwd",
    "/gradio_api/file=%2Fetc%2Fpasswd",
    "/gradio_api/file=/proc/self/environ",
    "/gradio_api/file=README.md",
    f"/gradio_api/file={ROOT}/README.md",
    f"/gradio_api/file={ROOT}/app.py",
    "/gradio_api/file=../../../../etc/passwd",
    "/gradio_api/file=/tmp/gradio/../../etc/passwd",
    "/gradio_api/file=/tmp/gradio/%2e%2e/%2e%2e/etc/passwd",
    "/static/../app.py",
    "/assets/../../README.md",
    "SECRET",
])
def test_the_file_route_serves_nothing_outside_the_upload_folder(site, secret_image, route):
    root, _ = site
    route = f"/gradio_api/file={secret_image}" if route == "SECRET" else route
    response = httpx.get(root + route)
    assert response.status_code in (403, 404), (route, response.status_code)
    assert "root:" not in response.text and "llava_ui" not in response.text


@pytest.mark.parametrize("url", ["https://evil.example/phish", "http://evil.example/x.png", "//evil.example/x",
                                 "https:%2F%2Fevil.example%2Fphish"])
def test_the_file_route_never_redirects_to_an_external_url(site, url):
    """Gradio <= 6.19 answered /gradio_api/file=<url> with a redirect to it: a link on this app's address that
    lands on anyone's page."""
    root, _ = site
    response = httpx.get(f"{root}/gradio_api/file={url}", follow_redirects=False, timeout=30)
    assert not response.is_redirect, (url, response.status_code, response.headers.get("location"))
    assert "evil.example" not in response.headers.get("location", "")
    assert response.status_code >= 400


def test_a_json_body_over_the_bound_is_refused_before_it_is_read_whole(site):
    root, _ = site
    response = httpx.post(root + "/gradio_api/call/chat", content=b'{"data": ["' + b"x" * (5 << 20) + b'"]}',
                          headers={"content-type": "application/json"}, timeout=60)
    assert response.status_code == 413 and "upload files instead" in response.json()["detail"]


def test_the_chat_endpoint_itself_takes_only_uploads(tmp_path):
    from gradio.utils import get_upload_folder

    from llava_ui.errors import UserError
    from llava_ui.web.uploads import uploaded_paths

    inside = Path(get_upload_folder()) / f"ok-{uuid.uuid4().hex}.png"
    inside.parent.mkdir(parents=True, exist_ok=True)
    inside.write_bytes(b"x")
    try:
        meta = {"_type": "gradio.FileData"}
        assert uploaded_paths([{"path": str(inside), "meta": meta}]) == [os.path.realpath(inside)]
        for bad in ({"path": "/etc/passwd", "meta": meta}, {"path": f"{inside.parent}/../../etc/passwd", "meta": meta},
                    {"path": str(inside)}, "/etc/passwd"):
            with pytest.raises(UserError):
                uploaded_paths([bad])
    finally:
        inside.unlink()


def _file(path) -> dict:
    return {"path": str(path), "meta": {"_type": "gradio.FileData"}}


def test_naming_a_server_file_as_an_input_is_refused(site, secret_image, tmp_path):
    """Raw Gradio API calls that name server paths instead of uploading: each one is a 403 before Gradio copies
    the file, and no copy of the secret image ever appears in the upload folder."""
    from gradio.utils import get_upload_folder

    root, _ = site
    link = Path(get_upload_folder()) / f"link-{uuid.uuid4().hex}.png"  # inside the folder, pointing out of it
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(secret_image)
    traversal = f"{get_upload_folder()}/{os.path.relpath(secret_image, get_upload_folder())}"  # .../gradio/../...
    assert ".." in traversal and Path(traversal).resolve() == secret_image.resolve()
    names = [secret_image, traversal, link, "/etc/passwd", ROOT / "README.md", CHART, "assets/chart_sales_2023.png",
             "http://127.0.0.1:1/x.png"]
    try:
        for name in names:
            requests = [
                ("/gradio_api/call/send", {"data": [{"text": "look", "files": [_file(name)]}, None, 2]}),
                ("/gradio_api/call/chat", {"data": ["hi", [_file(name)], "", 0.2, 1, 0, 1, 4, 2, -1, ""]}),
                ("/gradio_api/queue/join", {"data": ["hi", [_file(name)]], "fn_index": 0, "session_hash": "x"}),
            ]
            for route, body in requests:
                response = httpx.post(root + route, json=body)
                assert response.status_code == 403, (route, name, response.text)
                assert "was not uploaded to this server" in response.json()["detail"]
        assert not copies_in_the_upload_folder(secret_image.name)
    finally:
        link.unlink()


def test_gradio_client_with_a_plain_path_string_is_refused(site):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    client = Client(site[0], verbose=False)
    try:
        with pytest.raises(AppError, match="must be uploads"):  # a bare string is not an upload
            client.predict("hi", ["/etc/passwd"], api_name="/chat")
    finally:
        client.close()


def test_an_uploaded_file_still_works_through_the_guard(site):
    from gradio_client import Client, handle_file

    client = Client(site[0], verbose=False)
    try:
        chatbot, _ = client.predict({"text": "look", "files": [handle_file(CHART)]}, 2, api_name="/send")
        assert chatbot[0]["content"][0]["alt_text"] == "Image 1: chart_sales_2023.png"
    finally:
        client.close()


@pytest.mark.parametrize("url", [
    "file:///etc/passwd",
    "file:///tmp/../etc/passwd",
    "file://localhost/etc/passwd",
    f"file://{CHART}",  # a real image: still refused without --allow-file-urls
    f"file://{ROOT}/assets/../README.md",
    "http://127.0.0.1:1/metadata",
])
def test_the_api_refuses_file_and_network_urls_without_the_flag(site, url):
    client = openai.OpenAI(base_url=site[0] + "/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="", messages=[{"role": "user", "content": [
            {"type": "text", "text": "what is it?"}, {"type": "image_url", "image_url": {"url": url}}]}])
    assert "disabled on this server" in caught.value.body["message"] or "off on this server" in caught.value.body["message"]
    assert caught.value.body["param"] == "messages.0.content.1"


# --- the pickle -------------------------------------------------------------------------------------------------------

class Trap:
    """Unpickling this runs code: it writes a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path(self.marker).write_text, ("the pickle ran",))


def test_safetensors_are_preferred_and_the_pickle_is_never_opened(checkpoints, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(checkpoints("lmms", vocab="bytes"), folder)
    marker = tmp_path / "pickle-ran"
    (folder / "model_state.pdparams").write_bytes(pickle.dumps({"qwen2.embed_tokens.weight": Trap(marker)}))
    engine = Engine(str(folder), dtype="float32").load()
    assert engine.status()["state"] == "ready" and engine.status()["layout"] == "lmms"
    assert not marker.exists(), "model_state.pdparams was unpickled although safetensors exist"
    pickle.loads((folder / "model_state.pdparams").read_bytes())  # the trap is real: opening it runs code
    assert marker.exists()


def test_the_readme_says_pickles_load_only_from_the_configured_source():
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert "When both safetensors and `model_state.pdparams` are present, safetensors are used" in readme
    assert "a `.pdparams` file is a Python pickle, and it is only ever loaded from the model source you configured" \
        in readme

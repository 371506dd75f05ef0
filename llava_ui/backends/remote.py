"""A backend that is a remote OpenAI-compatible server (another instance of this app, vLLM, FastDeploy, ...), with the
local Engine's interface (docs/engine-api.md), so the UI can run as a light front end of a shared engine.

Images travel as data: URLs placed at their markers. Stopping closes the HTTP stream; the server sees the
disconnect and stops generating.
"""
from __future__ import annotations

import base64
import io
import json
import random
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from typing import Iterator

import httpx

from llava_ui.backends.base import Delta, Event, Progress, Result, TokenLogprob, TopLogprob, generate, timed_stats
from llava_ui.backends.rates import MAX_DEFAULT_FRAMES
from llava_ui.chat.conversation import Conversation
from llava_ui.chat.prompt import IMAGE_TOKEN, render_prompt
from llava_ui.config import DEFAULT_SYSTEM_PROMPT, GenerationSettings
from llava_ui.errors import UserError

CONNECT_TIMEOUT_S = 10.0
POLL_S = 1.0
PROGRESS_COMMENT = ": progress "  # SSE comment lines this app's API sends before the first token
IMAGE_URL_CACHE_CHARS = 64 << 20  # encoded images kept (history images are re-sent every turn)


class RemoteError(UserError):
    """The remote engine is unreachable or failed: the API serving this backend answers 502, not 400."""

    http_status = 502


class RemoteEngine:
    def __init__(self, base_url: str, model: str | None = None, api_key: str | None = None,
                 read_timeout_s: float = 600.0, load_timeout_s: float = 1800.0, image_format: str = "png"):
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key = api_key
        self.read_timeout_s, self.load_timeout_s = read_timeout_s, load_timeout_s
        self.image_format = image_format
        self.state = {"state": "not_loaded", "message": "", "error": ""}
        self.remote_info: dict = {}  # what another instance of this app says about its model
        self.same_app = False
        self._load_lock = threading.Lock()
        self._image_urls: OrderedDict[str, str] = OrderedDict()
        self._image_urls_lock = threading.Lock()

    def status(self) -> dict:
        info = self.remote_info
        return {**self.state, "model": self.model, "device": f"remote: {self.base_url}",
                "dtype": info.get("dtype") or "", "layout": "remote", "random_weights": bool(info.get("random_weights")),
                "image_mode": info.get("image_mode"), "context_length": info.get("context_length")}

    def load(self) -> "RemoteEngine":
        """Check the server's /models and pick the model; wait while another instance of this app loads it."""
        if self.state["state"] == "ready":
            return self
        with self._load_lock:
            if self.state["state"] == "ready":
                return self
            self.state = {"state": "loading", "message": f"connecting to {self.base_url}", "error": ""}
            try:
                self._connect()
            except UserError as err:
                self.state = {"state": "failed", "message": f"model failed to load: {err}", "error": str(err)}
                raise RemoteError(f"the model failed to load: {err}") from None
            self.state = {"state": "ready", "message": "ready", "error": ""}
        return self

    def load_in_background(self) -> threading.Thread:
        def load():
            try:
                self.load()
            except UserError:
                pass  # the failure is in status() for the front end to show

        thread = threading.Thread(target=load, name="remote-load", daemon=True)
        thread.start()
        return thread

    def _connect(self) -> None:
        deadline = time.monotonic() + self.load_timeout_s
        while True:
            cards = self._models()
            names = [card.get("id") for card in cards]
            if not names:
                raise UserError(f"{self.base_url} serves no model")
            if self.model is not None and self.model not in names:
                raise UserError(f"{self.base_url} serves {', '.join(map(repr, names))}, not {self.model!r} "
                                "(fix --remote-model, or leave it out to use the first)")
            card = cards[names.index(self.model)] if self.model is not None else cards[0]
            self.model = card["id"]
            self.same_app = isinstance(card.get("llava_ui"), dict)
            self.remote_info = card.get("llava_ui") or {"context_length": card.get("max_model_len")}
            remote_state = self.remote_info.get("state", "ready")
            if remote_state == "failed":
                raise UserError(f"the remote model failed to load: {self.remote_info.get('error')}")
            if remote_state == "ready":
                return
            if time.monotonic() > deadline:
                raise UserError(f"the remote model was still loading after {self.load_timeout_s:.0f} s")
            self.state["message"] = f"the remote server is loading the model: {self.remote_info.get('message')}"
            time.sleep(POLL_S)

    def _models(self) -> list[dict]:
        try:
            with self._client(read_timeout_s=CONNECT_TIMEOUT_S) as client:
                response = client.get(f"{self.base_url}/models")
        except httpx.HTTPError as err:
            raise UserError(f"cannot reach {self.base_url} ({type(err).__name__}: {err}); is the server running, "
                            "and does --base-url end with /v1?") from None
        if response.status_code != 200:
            raise UserError(f"{self.base_url}/models answered HTTP {response.status_code}: {_error_message(response)}")
        try:
            return list(response.json()["data"])
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{self.base_url}/models did not answer with an OpenAI model list") from None

    def _client(self, read_timeout_s: float | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        timeout = httpx.Timeout(CONNECT_TIMEOUT_S, read=read_timeout_s or self.read_timeout_s)
        return httpx.Client(headers=headers, timeout=timeout, trust_env=False)

    def stream(self, conversation: Conversation, settings: GenerationSettings | None = None,
               image_mode: str | None = None, stop_event: threading.Event | None = None) -> Iterator[Event]:
        started = time.perf_counter()
        settings = (settings or GenerationSettings()).validate()
        if settings.attention or settings.image_effect:
            raise UserError("attention maps and the images' effect are read from the model's weights: they need the local engine, not a "
                            "remote one")
        stop_event = stop_event or threading.Event()
        self.load()
        turn = conversation.pending()
        seed = settings.seed if settings.seed is not None else random.randrange(2**31)
        payload = self._payload(conversation, settings, seed, image_mode)
        prompt = render_prompt(conversation.system, conversation.messages())  # for the inspector; before the answer
        text, finish, usage, details, times = "", None, None, {}, []
        logprobs = [] if settings.logprobs is not None else None
        with self._open(payload, stop_event) as response:
            try:
                for chunk in _sse_events(response) if response is not None else ():
                    if isinstance(chunk, Progress):
                        yield chunk
                        continue
                    if "error" in chunk:
                        raise RemoteError(f"the remote engine failed: {_message(chunk)}")
                    usage = chunk.get("usage") or usage
                    details = chunk.get("llava_ui") or details
                    for choice in chunk.get("choices") or []:
                        delta = (choice.get("delta") or {}).get("content")
                        finish = choice.get("finish_reason") or finish
                        scored = _logprobs(choice) if logprobs is not None else None
                        if delta:
                            text += delta
                            times.append(time.perf_counter())
                        if delta or scored:
                            logprobs = None if scored is None else logprobs + scored
                            yield Delta(delta or "", scored)
                    if stop_event.is_set():
                        break
            finally:
                turn.answer = text  # a stopped answer is kept, as the local engine does
        if stop_event.is_set() and finish is None:
            finish = "stopped"
        elif finish is None:
            raise RemoteError("the remote engine ended the stream without finishing the answer")
        final = self._result(prompt, text, finish, seed, image_mode, usage, details, times, started)
        final.logprobs = logprobs
        yield final

    def default_frames(self) -> int:
        return MAX_DEFAULT_FRAMES  # the remote machine's speed is not known here

    def estimate(self, image_sizes, frames: int = 0, image_mode: str | None = None, text_tokens: int = 64):
        return None

    def generate(self, conversation: Conversation, settings: GenerationSettings | None = None, **kwargs) -> Result:
        return generate(self, conversation, settings, **kwargs)

    def _payload(self, conversation, settings: GenerationSettings, seed: int, image_mode) -> dict:
        payload = {"model": self.model, "messages": openai_messages(conversation, self._image_url), "stream": True,
                   "stream_options": {"include_usage": True}, "max_tokens": settings.max_new_tokens,
                   "temperature": settings.temperature, "top_p": settings.top_p, "seed": seed}
        if settings.stop:
            payload["stop"] = list(settings.stop)
        # extras vLLM also reads; image_mode only this app knows
        if settings.top_k:
            payload["top_k"] = settings.top_k
        if settings.repetition_penalty != 1.0:
            payload["repetition_penalty"] = settings.repetition_penalty
        if image_mode and self.same_app:
            payload["image_mode"] = image_mode
        if settings.logprobs is not None:  # OpenAI's own fields: a server without them refuses with a 400
            payload.update(logprobs=True, top_logprobs=settings.logprobs)
        return payload

    def _image_url(self, image, digest: str) -> str:
        with self._image_urls_lock:
            url = self._image_urls.get(digest)
            if url is not None:
                self._image_urls.move_to_end(digest)
                return url
        url = image_data_url(image, self.image_format)
        with self._image_urls_lock:
            self._image_urls[digest] = url
            while sum(map(len, self._image_urls.values())) > IMAGE_URL_CACHE_CHARS and len(self._image_urls) > 1:
                self._image_urls.popitem(last=False)
        return url

    @contextmanager
    def _open(self, payload: dict, stop_event: threading.Event):
        """The streaming response (None if stopped first); a 503 (model loading) is retried after its Retry-After."""
        deadline = time.monotonic() + self.load_timeout_s
        with self._client() as client:
            while True:
                if stop_event.is_set():
                    yield None
                    return
                request = client.build_request("POST", f"{self.base_url}/chat/completions", json=payload)
                try:
                    response = client.send(request, stream=True)
                except httpx.HTTPError as err:
                    raise RemoteError(f"cannot reach {self.base_url} ({type(err).__name__}: {err})") from None
                if response.status_code == 503 and time.monotonic() < deadline:
                    wait = _retry_after(response)
                    response.close()
                    stop_event.wait(wait)
                    continue
                try:
                    if response.status_code != 200:
                        response.read()
                        # the request's fault (400, 413, 422): a user error; anything else is the remote's
                        error = UserError if response.status_code in (400, 413, 422) else RemoteError
                        raise error(f"the remote engine answered HTTP {response.status_code}: "
                                    f"{_error_message(response)}")
                    yield response
                finally:
                    response.close()  # before the body ends, this drops the connection: the server stops
                return

    def _result(self, prompt, text, finish, seed, image_mode, usage, details, times, started) -> Result:
        """The remote's own numbers where it sent them (this app sends its stats), else what was seen here."""
        usage = usage or {}
        remote = details.get("stats") or {}
        generated = usage.get("completion_tokens")
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
        stats = timed_stats(started, times, (generated or len(times)) - 1, generated_tokens=generated,
                            prompt_tokens=usage.get("prompt_tokens"), visual_tokens=remote.get("visual_tokens"),
                            cached_prefix_tokens=cached if cached is not None else remote.get("cached_prefix_tokens"),
                            images_encoded=remote.get("images_encoded"),
                            images_from_cache=remote.get("images_from_cache"))
        return Result(text=text, finish_reason=finish, seed=seed, prompt=prompt,
                      image_mode=details.get("image_mode") or (image_mode if self.same_app else None),
                      dropped_turns=details.get("dropped_turns") or 0,
                      visual_tokens_per_image=details.get("visual_tokens_per_image") or [], stats=stats)


def _logprobs(choice: dict) -> list[TokenLogprob]:
    """A streamed choice's token records (OpenAI's shape carries no token ids)."""
    def entry(item: dict) -> dict:
        raw = item.get("bytes")
        return dict(token_id=None, token=item.get("token") or "", logprob=float(item.get("logprob", 0.0)),
                    bytes=list(raw) if raw is not None else list((item.get("token") or "").encode()))

    content = (choice.get("logprobs") or {}).get("content") or []
    return [TokenLogprob(**entry(item), top=[TopLogprob(**entry(alt)) for alt in item.get("top_logprobs") or []])
            for item in content]


def _sse_events(response: httpx.Response) -> Iterator[dict | Progress]:
    try:
        for line in response.iter_lines():
            if line.startswith(PROGRESS_COMMENT):  # this app's progress before the first token
                progress = _progress(line[len(PROGRESS_COMMENT):])
                if progress is not None:
                    yield progress
                continue
            if not line.startswith("data:"):
                continue  # blank separators, other comments, event names
            data = line[5:].strip()
            if data == "[DONE]":
                return
            try:
                yield json.loads(data)
            except ValueError:
                raise RemoteError(f"the remote engine sent an unreadable event: {data[:200]!r}") from None
    except httpx.HTTPError as err:
        raise RemoteError(f"the remote engine dropped the stream ({type(err).__name__}: {err})") from None


def _progress(text: str) -> Progress | None:
    try:
        fields = json.loads(text)
    except ValueError:
        return None  # a comment of another shape is ignored, as any SSE client ignores comments
    if not isinstance(fields, dict) or fields.get("stage") not in ("queued", "vision", "prefill"):
        return None
    return Progress(fields["stage"], fields.get("done") or 0, fields.get("total") or 0, fields.get("eta_s"))


def _retry_after(response: httpx.Response) -> float:
    try:
        return min(max(float(response.headers.get("retry-after", 5)), 0.5), 30.0)
    except ValueError:
        return 5.0


def _message(payload) -> str:
    if isinstance(payload, dict):
        error = payload.get("error")
        if isinstance(error, dict):
            return str(error.get("message") or error)
        if error or payload.get("detail") or payload.get("message"):
            return str(error or payload.get("detail") or payload.get("message"))
    return str(payload)[:300]


def _error_message(response: httpx.Response) -> str:
    try:
        return _message(response.json())
    except ValueError:
        return response.text[:300] or response.reason_phrase


def openai_messages(conversation: Conversation, image_url) -> list[dict]:
    """A conversation as OpenAI messages; `image_url(image, digest)` gives each image's URL. The system prompt is
    always sent, so servers without this app's default (vLLM with llava-hf's template) render the same prompt."""
    system = DEFAULT_SYSTEM_PROMPT if conversation.system is None else conversation.system
    messages = [{"role": "system", "content": system}]
    for turn in conversation.turns:
        media = turn.media()
        pieces = turn.content().split(IMAGE_TOKEN)
        parts = []
        for i, piece in enumerate(pieces):
            if i:
                parts.append({"type": "image_url", "image_url": {"url": image_url(*media[i - 1])}})
            if piece:
                parts.append({"type": "text", "text": piece})
        messages.append({"role": "user", "content": parts if media else turn.content()})
        if turn.answer is not None:
            messages.append({"role": "assistant", "content": turn.answer})
    return messages


def image_data_url(image, image_format: str = "png") -> str:
    """PNG keeps the pixels exact (same features on the remote side); JPEG is smaller."""
    buffer = io.BytesIO()
    if image_format == "jpeg":
        image.convert("RGB").save(buffer, format="JPEG", quality=95)
    else:
        image.save(buffer, format="PNG", compress_level=1)
    return f"data:image/{image_format};base64," + base64.b64encode(buffer.getvalue()).decode("ascii")

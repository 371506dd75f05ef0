"""The OpenAI chat format both ways: a request's messages → a Conversation (the API), and a Conversation → messages
with images as data: URLs (the remote engine). Images sit where their parts sit among the text parts."""
from __future__ import annotations

import base64
import binascii
import time
import uuid
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlparse

from pydantic import BaseModel, ConfigDict, Field

from llava_ui.backends.base import Result, TokenLogprob, TopLogprob
from llava_ui.chat.conversation import Conversation, Picture
from llava_ui.chat.media import load_image
from llava_ui.chat.prompt import IMAGE_TOKEN
from llava_ui.config import IMAGE_MODES, MAX_LOGPROBS, GenerationSettings
from llava_ui.errors import UserError

MAX_IMAGE_BYTES = 50 << 20  # one decoded data: URL; the pixel limit in media.py applies as well


class APIError(Exception):
    """An error with its HTTP status and OpenAI error fields; the API turns it into `{"error": {...}}`."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.code, self.param)


def error_body(message: str, type: str = "invalid_request_error", code: str | None = None, param: str | None = None):
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class ImageURL(BaseModel):
    url: str
    detail: str | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None
    image_url: ImageURL | str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    """The fields this server reads. OpenAI fields that would change the answer and that it does not implement
    (tools, structured output, n > 1, penalties, logit bias) are refused with a 400 rather than ignored;
    fields that change nothing here (user, metadata, store, ...) are accepted."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    seed: int | None = Field(default=None, ge=0)
    stop: str | list[str] | None = None
    n: int | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    image_mode: Literal[IMAGE_MODES] | None = None
    attention: bool = False  # extra: each token's attention over the images, in the `llava_ui` details
    image_effect: bool = False  # extra: each token's log-probability with minus without the images, the same
    tools: list | None = None
    tool_choice: str | dict | None = None
    functions: list | None = None
    function_call: str | dict | None = None
    response_format: dict | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict | None = None

    def settings(self) -> GenerationSettings:
        self.refuse_unsupported()
        default = GenerationSettings()
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        top_k = 0 if self.top_k in (None, -1) else self.top_k  # vLLM spells "off" as -1
        settings = GenerationSettings(
            max_new_tokens=self.max_completion_tokens or self.max_tokens or default.max_new_tokens,
            temperature=default.temperature if self.temperature is None else self.temperature,
            top_p=default.top_p if self.top_p is None else self.top_p,
            top_k=top_k, repetition_penalty=self.repetition_penalty or default.repetition_penalty,
            seed=self.seed, stop=stop, logprobs=self.wanted_logprobs(), attention=self.attention,
            image_effect=self.image_effect)
        return settings.validate()

    def wanted_logprobs(self) -> int | None:
        """How many alternatives per token the request asks for (None: no logprobs), as OpenAI checks it."""
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= MAX_LOGPROBS:
            raise APIError(400, f"top_logprobs must be between 0 and {MAX_LOGPROBS}", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None

    def refuse_unsupported(self) -> None:
        def refuse(param: str, what: str) -> None:
            raise APIError(400, f"{what} is not supported by this server", code="unsupported_parameter", param=param)

        if self.n not in (None, 1):
            refuse("n", "n > 1 (several choices per request)")
        if self.tools or self.functions:
            refuse("tools" if self.tools else "functions", "tool calling")
        for name in ("tool_choice", "function_call"):
            if getattr(self, name) not in (None, "none", "auto"):
                refuse(name, "tool calling")
        if self.response_format and self.response_format.get("type", "text") != "text":
            refuse("response_format", f"response_format {self.response_format.get('type')!r} (only text)")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                refuse(name, f"{name} (use repetition_penalty)")
        if self.logit_bias:
            refuse("logit_bias", "logit_bias")


class Reply:
    """The id, timestamps and shapes of one chat completion, streamed or not."""

    def __init__(self, model: str, include_usage: bool = False):
        self.id, self.created, self.model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), model
        self.include_usage = include_usage

    def _head(self, object_name: str) -> dict:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model}

    def chunk(self, delta: dict, finish_reason: str | None = None, final: Result | None = None,
              logprobs: list[TokenLogprob] | None = None) -> dict:
        """`logprobs`: the records of exactly the tokens this delta's text came from."""
        chunk = {**self._head("chat.completion.chunk"),
                 "choices": [{"index": 0, "delta": delta, "logprobs": logprobs_field(logprobs),
                              "finish_reason": finish_reason}]}
        if self.include_usage:
            chunk["usage"] = None
        if final is not None:
            chunk["llava_ui"] = details(final)
        return chunk

    def usage_chunk(self, final: Result) -> dict:
        return {**self._head("chat.completion.chunk"), "choices": [], "usage": usage(final)}

    def completion(self, final: Result) -> dict:
        message = {"role": "assistant", "content": final.text}
        return {**self._head("chat.completion"),
                "choices": [{"index": 0, "message": message, "logprobs": logprobs_field(final.logprobs),
                             "finish_reason": finish_reason(final)}],
                "usage": usage(final), "llava_ui": details(final)}


def logprobs_field(records: list[TokenLogprob] | None) -> dict | None:
    """A choice's `logprobs` in OpenAI's shape: {"content": [token, ...], "refusal": None}, or None."""
    if records is None:
        return None
    return {"content": [{**_scored(t), "top_logprobs": [_scored(alt) for alt in t.top]} for t in records],
            "refusal": None}


def _scored(token: TopLogprob) -> dict:
    # vLLM's floor for a probability that underflowed (JSON has no -Infinity)
    return {"token": token.token, "logprob": max(token.logprob, -9999.0), "bytes": token.bytes}


def finish_reason(final: Result) -> str:
    return "length" if final.finish_reason == "length" else "stop"


def usage(final: Result) -> dict:
    prompt = final.stats.prompt_tokens or 0
    completion = final.stats.generated_tokens or 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def details(final: Result) -> dict:
    """What this server adds for inspection (another instance's RemoteEngine reads it); clients may ignore it."""
    record = final.to_dict()
    found = {key: record[key] for key in ("seed", "image_mode", "dropped_turns", "visual_tokens_per_image", "stats")}
    found.update({key: record[key] for key in ("attention", "image_effect") if record[key] is not None})  # asked for
    return found


MAX_REQUEST_IMAGES = 64
MAX_REQUEST_PIXELS = 160_000_000  # decoded RGB ≈ 480 MB: one request cannot exhaust the server's memory


def conversation_from_messages(messages: list[ChatMessage], allow_file_urls: bool = False,
                               fetched: dict[str, bytes] | None = None) -> Conversation:
    """system/developer messages set the system prompt; user + assistant pairs become answered turns; the last
    message must come from the user. Consecutive user (or assistant) messages are joined by a newline. `fetched`
    holds the bytes of the http(s) image URLs the server downloaded (--allow-image-urls)."""
    parts = sum(1 for m in messages if isinstance(m.content, list) for p in m.content if p.type == "image_url")
    if parts > MAX_REQUEST_IMAGES:
        raise APIError(400, f"the request has {parts} images; the limit is {MAX_REQUEST_IMAGES} per request",
                       param="messages")
    system, turns = [], []  # turns: [text, pictures, answer or None]
    decoded = 0
    for i, message in enumerate(messages):
        if message.role in ("system", "developer"):
            system.append(_text_only(message, i))
        elif message.role == "user":
            text, pictures = user_content(message, i, allow_file_urls, fetched or {})
            decoded += sum(p.image.width * p.image.height for p in pictures)
            if decoded > MAX_REQUEST_PIXELS:
                raise APIError(400, f"the request's images hold more than {MAX_REQUEST_PIXELS // 1_000_000} "
                                    "megapixels in all; send fewer or smaller images", param=f"messages.{i}")
            if turns and turns[-1][2] is None:
                turns[-1][0] += "\n" + text
                turns[-1][1] += pictures
            else:
                turns.append([text, pictures, None])
        elif message.role == "assistant":
            if not turns:
                raise APIError(400, "an assistant message must follow a user message", param=f"messages.{i}")
            answer = _text_only(message, i)
            turns[-1][2] = answer if turns[-1][2] is None else turns[-1][2] + "\n" + answer
        else:
            raise APIError(400, f"unsupported role {message.role!r} (use system, user or assistant)",
                           param=f"messages.{i}.role")
    if not turns or turns[-1][2] is not None:
        raise APIError(400, "the last message must be a user message", param="messages")
    conversation = Conversation(system="\n\n".join(system) if system else None)
    for text, pictures, answer in turns:
        conversation.add_user(text, pictures)
        conversation.turns[-1].answer = answer
    return conversation


def user_content(message: ChatMessage, index: int, allow_file_urls: bool,
                 fetched: dict[str, bytes]) -> tuple[str, list[Picture]]:
    """The turn text with one <image> marker per image, and the images in marker order.

    Images go where their parts are. Images that all come before the text are followed by a newline (the
    reference's layout), unless the text starts with whitespace. Text that already holds <image> markers places
    the images itself (the counts must match)."""
    if isinstance(message.content, str) or message.content is None:
        return message.content or "", []
    pieces, pictures, last = [], [], None
    for j, part in enumerate(message.content):
        where = f"messages.{index}.content.{j}"
        if part.type == "text":
            pieces.append(("\n" if last == "text" else "") + (part.text or ""))
        elif part.type == "image_url":
            url = part.image_url.url if isinstance(part.image_url, ImageURL) else part.image_url
            if not url:
                raise APIError(400, "an image_url part needs a url", param=where)
            image = _load(fetched[url], where) if url in fetched else decode_image_url(url, allow_file_urls, where)
            pictures.append(Picture(image, name=f"image {len(pictures) + 1}"))
            pieces.append(IMAGE_TOKEN)
        else:
            raise APIError(400, f"unsupported content part type {part.type!r} (use text or image_url; send video "
                                "frames as consecutive images)", param=f"{where}.type")
        last = "image" if part.type == "image_url" else "text"
    texts = [p for p in pieces if p != IMAGE_TOKEN]
    written = "".join(texts)
    if IMAGE_TOKEN in written:
        return written, pictures  # markers in the text place the images; Conversation checks the count
    leading = pieces[:len(pictures)] == [IMAGE_TOKEN] * len(pictures)
    if pictures and leading and written and not written[0].isspace():
        return IMAGE_TOKEN * len(pictures) + "\n" + written, pictures
    if pictures and not written:
        return IMAGE_TOKEN * len(pictures) + "\n", pictures
    return "".join(pieces), pictures


def decode_image_url(url: str, allow_file_urls: bool, where: str = ""):
    """data: URLs always; file:// only when the server allows it; http(s) ones arrive already fetched, when the
    server allows them (openai/fetch.py)."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        header, _, payload = url.partition(",")
        if ";base64" not in header:
            raise APIError(400, "data: URLs must be base64-encoded (data:image/png;base64,...)", param=where)
        if len(payload) > MAX_IMAGE_BYTES * 4 // 3 + 4:
            raise APIError(400, f"the image is larger than {MAX_IMAGE_BYTES >> 20} MB", param=where)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise APIError(400, "the image's data: URL is not valid base64", param=where) from None
        return _load(data, where)
    if scheme == "file":
        if not allow_file_urls:
            raise APIError(400, "file:// image URLs are disabled on this server (start it with --allow-file-urls "
                                "to allow them); send the image as a data: URL", param=where)
        parsed = urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise APIError(400, "file:// URLs must name a local path (file:///path/to/image.png)", param=where)
        return _load(Path(unquote(parsed.path)), where)
    if scheme in ("http", "https"):
        raise APIError(400, "http(s) image URLs are off on this server (start it with --allow-image-urls to fetch "
                            "them); send the image as a data: URL (data:image/png;base64,...)", param=where)
    raise APIError(400, "image_url must be a data: URL (data:image/png;base64,...)", param=where)


def _load(source, where: str):
    try:
        return load_image(source, name=str(source) if isinstance(source, Path) else f"the image in {where}")
    except UserError as err:
        raise APIError(400, str(err), code="invalid_image", param=where) from None


def _text_only(message: ChatMessage, index: int) -> str:
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    if any(part.type != "text" for part in message.content):
        raise APIError(400, f"{message.role} messages can only hold text", param=f"messages.{index}.content")
    return "\n".join(part.text or "" for part in message.content)

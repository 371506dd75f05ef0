"""OpenAI-compatible endpoints served next to the UI: GET /v1/models, GET /v1/models/{id} and
POST /v1/chat/completions (SSE streaming).

The backend computes one step per next(); each step runs in a worker thread so the event loop keeps serving. A
client that goes away stops its generation: the stop event is set and the backend is drained (no more compute).
"""
from __future__ import annotations

import hmac
import json
import logging
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import asdict

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import ValidationError

from llava_ui.backends.base import Delta, Progress, Result
from llava_ui.errors import UserError
from llava_ui.openai.fetch import URLPolicy, fetch_images
from llava_ui.openai.format import APIError, ChatRequest, Reply, conversation_from_messages, finish_reason

logger = logging.getLogger(__name__)
LOADING_RETRY_S = 5
FAILED_RETRY_S = 30  # a failed load is tried again, on a request, at most this often
WATCH_S = 0.25  # how often a non-streaming request checks that its client is still there
_END = object()


class OpenAIRoute(APIRoute):
    """Errors leave every /v1 route as OpenAI-shaped JSON; an unexpected one as a 500 without a traceback."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def guarded(request: Request):
            try:
                return await handler(request)
            except APIError as err:
                return error_response(err)
            except UserError as err:
                return error_response(user_error(err))
            except Exception:
                logger.exception("unexpected error in %s %s", request.method, request.url.path)
                return error_response(APIError(500, "internal server error (details are in the server log)",
                                               "server_error", "internal_error"))

        return guarded


def user_error(err: UserError) -> APIError:
    """Something the request can fix (400), a full admission queue (429, with Retry-After), or a remote engine
    that failed (its http_status, 502)."""
    status = getattr(err, "http_status", 400)
    if status == 429:
        return APIError(429, str(err), "server_error", "server_busy",
                        headers={"Retry-After": str(getattr(err, "retry_after_s", 5))})
    return APIError(status, str(err), "server_error" if status >= 500 else "invalid_request_error")


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


class LoadGate:
    """Requests reach the backend only once it is ready; before that they start (or retry) loading and get a 503."""

    def __init__(self, backend):
        self.backend = backend
        self.lock = threading.Lock()
        self.started = None

    def warm(self) -> dict:
        status = self.backend.status()
        with self.lock:
            retry = status["state"] == "failed" and time.monotonic() - (self.started or 0) > FAILED_RETRY_S
            if status["state"] == "not_loaded" or retry:
                self.started = time.monotonic()
                self.backend.load_in_background()
                status = self.backend.status()
                if status["state"] == "not_loaded":  # the load thread has not begun yet
                    status = {**status, "state": "loading", "message": "starting"}
        return status

    def check(self) -> None:
        status = self.warm()
        if status["state"] == "ready":
            return
        if status["state"] == "failed":
            reason = status.get("error") or status.get("message") or "unknown reason"
            raise APIError(503, f"the model failed to load: {reason}", "server_error", "model_load_failed",
                           headers={"Retry-After": str(FAILED_RETRY_S)})
        raise APIError(503, f"the model is loading ({status.get('message') or 'starting'}); retry in a few seconds",
                       "server_error", "model_loading", headers={"Retry-After": str(LOADING_RETRY_S)})


def create_api_router(backend, api_key: str | None = None, allow_file_urls: bool = False,
                      image_urls: URLPolicy | None = None) -> APIRouter:
    """The /v1 routes on `backend`; `image_urls` set: http(s) image URLs are fetched within its limits."""
    router = APIRouter(prefix="/v1", route_class=OpenAIRoute, tags=["OpenAI-compatible API"])
    gate = LoadGate(backend)
    started = int(time.time())

    def authorize(request: Request) -> None:
        if not api_key:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "missing or wrong API key: send the header Authorization: Bearer <key>",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    @router.get("/models")
    async def list_models(request: Request):
        """The served model. Listing also starts loading it, so a client can warm the server up."""
        authorize(request)
        return {"object": "list", "data": [model_card(gate.warm(), started)]}

    @router.get("/models/{model_id:path}")
    async def retrieve_model(request: Request, model_id: str):
        authorize(request)
        card = model_card(gate.warm(), started)
        if model_id != card["id"]:
            raise APIError(404, f"the model {model_id!r} does not exist; this server serves {card['id']!r}",
                           code="model_not_found", param="model")
        return card

    @router.post("/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        body = await anyio.to_thread.run_sync(parse_request, await request.body())  # large images: off the loop
        settings = body.settings()
        served = backend.status().get("model")
        if body.model and served and body.model != served:
            raise APIError(404, f"the model {body.model!r} does not exist; this server serves {served!r}",
                           code="model_not_found", param="model")
        fetched = await fetch_images(body.messages, image_urls) if image_urls else {}
        conversation = await anyio.to_thread.run_sync(conversation_from_messages, body.messages, allow_file_urls,
                                                      fetched)
        gate.check()
        stop_event = threading.Event()
        events = backend.stream(conversation, settings, image_mode=body.image_mode, stop_event=stop_event)
        try:  # the first event comes before any header, so an overflowing context is still a plain 400
            async with watching(request, stop_event):
                first = await next_event(events)
        except UserError:
            gate.check()  # a load that failed meanwhile is a 503, not the request's fault
            raise
        except BaseException:
            stop_event.set()
            raise
        reply = Reply(served or body.model or "", body.stream_options is not None and body.stream_options.include_usage)
        if body.stream:
            return ClosingStreamingResponse(stream_chunks(reply, events, first, stop_event),
                                            media_type="text/event-stream",
                                            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        final, event = None, first
        async with watching(request, stop_event):
            while event is not _END:
                final = event if isinstance(event, Result) else final
                event = await next_event(events)
        if stop_event.is_set():
            logger.info("client left %s after %d tokens", reply.id, final.stats.generated_tokens)
        return reply.completion(final)

    @router.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
    async def unknown_endpoint(request: Request, path: str):
        authorize(request)
        raise APIError(404, f"no endpoint {request.method} /v1/{path}; this server offers GET /v1/models, "
                            "GET /v1/models/{id} and POST /v1/chat/completions", code="not_found")

    return router


def parse_request(raw: bytes) -> ChatRequest:
    try:
        payload = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise APIError(400, "the request body is not valid JSON") from None
    try:
        return ChatRequest.model_validate(payload)
    except ValidationError as err:
        problem = err.errors()[0]
        where = ".".join(str(p) for p in problem["loc"])
        raise APIError(400, f"{where}: {problem['msg']}" if where else problem["msg"], param=where or None) from None


def model_card(status: dict, created: int) -> dict:
    card = {"id": status.get("model") or "unknown", "object": "model", "created": created, "owned_by": "llava_ui"}
    if status.get("context_length"):
        card["max_model_len"] = status["context_length"]
    card["llava_ui"] = {key: status.get(key) for key in ("state", "message", "error", "image_mode", "random_weights",
                                                         "context_length", "device", "dtype", "precision", "layout",
                                                         "weight_layout", "options", "caches", "rates", "admission",
                                                         "last_decode_batch", "decode_steps")}
    return card


class ClosingStreamingResponse(StreamingResponse):
    """Closes its generator when the response ends, so a client that left stops the backend now, not at GC time."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def progress_comment(event: Progress) -> str:
    """An SSE comment (OpenAI clients skip comments): `: progress {"stage": ..., "done", "total", "eta_s"}`."""
    return f": progress {json.dumps(asdict(event))}\n\n"


async def stream_chunks(reply: Reply, events, first, stop_event: threading.Event):
    """Role chunk, content chunks, a finish chunk, the usage chunk if asked, then [DONE]. When the client goes away
    the server cancels this generator mid-await: the finally block stops the backend."""
    finished = False
    try:
        yield sse(reply.chunk({"role": "assistant", "content": ""}))
        final, event = None, first
        while event is not _END:
            if isinstance(event, Delta):
                yield sse(reply.chunk({"content": event.text}, logprobs=event.logprobs))
            elif isinstance(event, Progress):
                yield progress_comment(event)
            else:
                final = event
            event = await next_event(events)
        yield sse(reply.chunk({}, finish_reason(final), final))
        if reply.include_usage:
            yield sse(reply.usage_chunk(final))
        finished = True
    except Exception as err:  # headers are out: the error travels as an event, as vLLM does
        finished = True
        if not isinstance(err, UserError):
            logger.exception("generation failed mid-stream (%s)", reply.id)
        yield sse((user_error(err) if isinstance(err, UserError) else
                   APIError(500, "internal server error (details are in the server log)", "server_error")).body())
    finally:
        if not finished:
            stop_event.set()
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(drain, events, reply.id)
    yield "data: [DONE]\n\n"


async def next_event(events):
    """The backend's next event, computed in a worker thread (one model step at most)."""
    event = await anyio.to_thread.run_sync(_step, events)
    if isinstance(event, _Failed):
        raise event.error
    return event


@asynccontextmanager
async def watching(request: Request, stop_event: threading.Event):
    """While the body runs, a client that leaves sets stop_event (the backend stops at its next step)."""
    error = None
    async with anyio.create_task_group() as group:
        group.start_soon(_watch_disconnect, request, stop_event)
        try:
            yield
        except BaseException as err:  # raised as itself, not inside the task group's ExceptionGroup
            error = err
        group.cancel_scope.cancel()
    if error is not None:
        raise error


async def _watch_disconnect(request: Request, stop_event: threading.Event) -> None:
    while not stop_event.is_set():
        await anyio.sleep(WATCH_S)
        if await request.is_disconnected():
            stop_event.set()


class _Failed:
    """An exception carried out of the worker thread as a value (a task group would wrap it in a group)."""

    def __init__(self, error: Exception):
        self.error = error


def _step(events):
    try:
        return next(events)
    except StopIteration:
        return _END
    except Exception as err:
        return _Failed(err)


def drain(events, reply_id: str) -> None:
    """Run a stopped backend generator to its end: it computes nothing more, and records the partial answer."""
    try:
        for event in events:
            if isinstance(event, Result):
                logger.info("client left %s after %d tokens", reply_id, event.stats.generated_tokens or 0)
    except Exception:
        logger.warning("stopping %s failed", reply_id, exc_info=True)

"""Shared test helpers: engines that record or block, and serving an ASGI app on a free loopback port."""
import threading
import time
from contextlib import contextmanager

import uvicorn

from llava_ui.backends.base import Result
from llava_ui.engine import Engine


class RecordingEngine(Engine):
    """The local engine, keeping every final record (finish reason, token counts) for the tests to inspect."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.finals = []

    def stream(self, *args, **kwargs):
        for event in super().stream(*args, **kwargs):
            if isinstance(event, Result):
                self.finals.append(event)
            yield event


class BlockedEngine(Engine):
    """Loads only once `release` is set: the API must answer 503 meanwhile."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.release = threading.Event()

    def _load(self):
        self.release.wait(60)
        super()._load()


@contextmanager
def serve(app, lifespan="off"):
    """Serve `app` on a free 127.0.0.1 port in a thread; lifespan="on" for an app with Gradio mounted (its queue
    starts in the lifespan). Streams still open at the end (a gradio_client heartbeat) are cut after 1 s."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan=lifespan,
                                           timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@contextmanager
def serve_api(backend, **options):
    """The /v1 routes alone over `backend`, served on loopback: yields the base URL (…/v1)."""
    from fastapi import FastAPI

    from llava_ui.openai.server import create_api_router

    app = FastAPI()
    app.include_router(create_api_router(backend, **options))
    with serve(app) as root:
        yield root + "/v1"

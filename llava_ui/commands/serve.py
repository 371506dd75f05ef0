"""`serve` (and `python app.py`): the web chat and the OpenAI-compatible API in one process, on one backend."""
from __future__ import annotations

import argparse
import os
import sys

import gradio as gr
import uvicorn
from fastapi import FastAPI
from starlette.middleware import Middleware

from llava_ui.commands.common import (HelpFormatter, add_frames_argument, add_log_level, add_model_arguments,
                                      configure_logging, make_backend, option, switch, version_line)
from llava_ui.errors import UserError
from llava_ui.openai.fetch import URLPolicy
from llava_ui.openai.server import create_api_router
from llava_ui.web.page import build_demo, launch_options
from llava_ui.web.uploads import UploadsOnly

QUEUE_POLL_S = 0.02


def parse_args(argv=None) -> argparse.Namespace:
    on_space = bool(os.environ.get("SPACE_ID"))
    p = argparse.ArgumentParser(prog="llava-ui serve", formatter_class=HelpFormatter,
                                description="LLaVA-NeXT-Interleave chat (Gradio) + OpenAI-compatible API (also "
                                            "python app.py); each flag also reads the LLAVA_<NAME> shown with it")
    p.add_argument("--version", action="version", version=version_line())
    add_log_level(p)
    add_model_arguments(p)
    option(p, "--host", env_name="HOST", default="0.0.0.0" if on_space else "127.0.0.1", help="address to listen on")
    option(p, "--port", env_name="PORT", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)),
           help="port to listen on")
    add_frames_argument(p)
    option(p, "--queue-size", env_name="QUEUE_SIZE", type=int, default=32,
           help="requests waiting at most, all front ends together (beyond: the API answers 429, the chat says "
                "the server is busy)")
    option(p, "--concurrency", env_name="CONCURRENCY", type=int, default=4,
           help="chats generating at once: the decode steps of those decoding run as one batched step (the batch "
                "size limit); the others wait in the queue")
    option(p, "--max-upload-mb", env_name="MAX_UPLOAD_MB", type=float, default=50, help="largest upload")
    option(p, "--max-files", env_name="MAX_FILES", type=int, default=8, help="files per message")
    switch(p, "--share", "SHARE", False, "a public Gradio share link")
    switch(p, "--eager", "EAGER", on_space, "load the model at start instead of on the first request (on by "
                                             "default on a Space)")
    option(p, "--api-key", env_name="API_KEY", help="require this key on /v1 (Authorization: Bearer <key>)")
    switch(p, "--allow-file-urls", "ALLOW_FILE_URLS", False, "let API clients send file:// image URLs (files on "
                                                             "this server)")
    switch(p, "--allow-image-urls", "ALLOW_IMAGE_URLS", False, "let API clients send http(s) image URLs; the "
                                                               "server fetches them (public hosts only, size, time "
                                                               "and redirect limits)")
    return p.parse_args(argv)


def api_router(backend, args):
    """/v1 on `backend` with the flags' key and URL policies."""
    image_urls = URLPolicy(max_bytes=int(args.max_upload_mb * 2**20)) if args.allow_image_urls else None
    return create_api_router(backend, api_key=args.api_key, allow_file_urls=args.allow_file_urls,
                             image_urls=image_urls)


def serving_backend(args):
    try:  # a decode step carries up to --concurrency chats
        return make_backend(args, batch_slots=max(1, args.concurrency))
    except UserError as err:
        sys.exit(f"error: {err}")


def _backend_and_demo(args):
    backend = serving_backend(args)
    if hasattr(backend, "admission"):  # the local engine: one admission queue and batch limit for every front end
        backend.admission.configure(args.concurrency, args.queue_size)
    if args.eager:
        backend.load_in_background()
    demo = build_demo(backend, args)
    demo.queue(max_size=args.queue_size, default_concurrency_limit=args.concurrency)
    quiet_queue(demo)
    return backend, demo


def quiet_queue(demo) -> None:
    """Gradio's queue polls every 1 ms when idle (10 ms for progress), a steady share of a core taken from the
    model on a small CPU; 20 ms (50 ms) costs a request at most that much wait before it starts."""
    queue = getattr(demo, "_queue", None)
    if queue is not None and hasattr(queue, "sleep_when_free"):
        queue.sleep_when_free = max(queue.sleep_when_free, QUEUE_POLL_S)
        queue.progress_update_sleep_when_free = max(queue.progress_update_sleep_when_free, 2.5 * QUEUE_POLL_S)


def create_app(args):
    """The FastAPI app: /v1 (OpenAI-compatible) + the Gradio chat at /."""
    backend, demo = _backend_and_demo(args)
    app = FastAPI(title="llava_ui")
    app.add_middleware(UploadsOnly)
    app.include_router(api_router(backend, args))
    return gr.mount_gradio_app(app, demo, path="", max_file_size=int(args.max_upload_mb * 2**20),
                               allowed_paths=[], show_error=True, **launch_options()), demo, backend


def main(argv=None) -> None:
    args = parse_args(argv)
    configure_logging(args.log_level)
    if args.share:  # a share link needs Gradio's own launcher; the API routes join its app once it runs
        backend, demo = _backend_and_demo(args)
        demo.launch(server_name=args.host, server_port=args.port, share=True, prevent_thread_lock=True,
                    max_file_size=int(args.max_upload_mb * 2**20), app_kwargs={"middleware": [Middleware(UploadsOnly)]},
                    **launch_options())
        demo.app.include_router(api_router(backend, args))
        demo.block_thread()
        return
    app, _, _ = create_app(args)
    print(f"llava_ui: http://{args.host}:{args.port}  (API: http://{args.host}:{args.port}/v1)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info" if args.log_level == "debug" else "warning",
                log_config=None)  # uvicorn's records go through configure_logging's handler

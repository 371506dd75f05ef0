"""`serve` (and `python app.py`): the web chat and the OpenAI-compatible API in one process, on one backend."""
from __future__ import annotations

import argparse
import os
import sys

import gradio as gr
import uvicorn
from fastapi import FastAPI
from starlette.middleware import Middleware

from llava_ui.commands.common import add_model_arguments, env, make_backend
from llava_ui.errors import UserError
from llava_ui.openai.server import create_api_router
from llava_ui.web.page import build_demo, launch_options
from llava_ui.web.uploads import UploadsOnly

QUEUE_POLL_S = 0.02


def parse_args(argv=None) -> argparse.Namespace:
    on_space = bool(os.environ.get("SPACE_ID"))
    p = argparse.ArgumentParser(prog="python app.py", description="LLaVA-NeXT-Interleave chat (Gradio) + "
                                "OpenAI-compatible API; every flag also reads LLAVA_<FLAG>")
    add_model_arguments(p, from_env=True)
    p.add_argument("--host", default=env("HOST", "0.0.0.0" if on_space else "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(env("PORT", os.environ.get("GRADIO_SERVER_PORT", 7860))))
    p.add_argument("--frames", type=int, default=env("FRAMES") and int(env("FRAMES")),
                   help="video frames sampled (default: 16 on a GPU; on a CPU as many, up to 16, as give the first "
                        "token within about a minute at this machine's measured speed)")
    p.add_argument("--queue-size", type=int, default=int(env("QUEUE_SIZE", 32)), help="requests waiting at most")
    p.add_argument("--concurrency", type=int, default=int(env("CONCURRENCY", 4)),
                   help="chats generating at once (their model steps interleave)")
    p.add_argument("--max-upload-mb", type=float, default=float(env("MAX_UPLOAD_MB", 50)))
    p.add_argument("--max-files", type=int, default=int(env("MAX_FILES", 8)), help="files per message")
    p.add_argument("--share", action="store_true", default=env("SHARE", "") == "1", help="Gradio share link")
    p.add_argument("--eager", action="store_true", default=env("EAGER", "1" if on_space else "") == "1",
                   help="load the model at start instead of on the first request")
    p.add_argument("--api-key", default=env("API_KEY"), help="require this key on /v1 (also LLAVA_API_KEY)")
    p.add_argument("--allow-file-urls", action="store_true", default=env("ALLOW_FILE_URLS", "") == "1",
                   help="let API clients send file:// image URLs (local files; off by default)")
    return p.parse_args(argv)


def serving_backend(args):
    try:
        return make_backend(args)
    except UserError as err:
        sys.exit(f"error: {err}")


def _backend_and_demo(args):
    backend = serving_backend(args)
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
    app.include_router(create_api_router(backend, api_key=args.api_key, allow_file_urls=args.allow_file_urls))
    return gr.mount_gradio_app(app, demo, path="", max_file_size=int(args.max_upload_mb * 2**20),
                               allowed_paths=[], show_error=True, **launch_options()), demo, backend


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.share:  # a share link needs Gradio's own launcher; the API routes join its app once it runs
        backend, demo = _backend_and_demo(args)
        demo.launch(server_name=args.host, server_port=args.port, share=True, prevent_thread_lock=True,
                    max_file_size=int(args.max_upload_mb * 2**20), app_kwargs={"middleware": [Middleware(UploadsOnly)]},
                    **launch_options())
        demo.app.include_router(create_api_router(backend, api_key=args.api_key, allow_file_urls=args.allow_file_urls))
        demo.block_thread()
        return
    app, _, _ = create_app(args)
    print(f"llava_ui: http://{args.host}:{args.port}  (API: http://{args.host}:{args.port}/v1)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")

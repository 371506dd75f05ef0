"""Start the web chat and the OpenAI-compatible API in one process: `python app.py --help`.

Every flag also reads an environment variable (LLAVA_<FLAG>, e.g. LLAVA_MODEL, LLAVA_PORT) so a Hugging Face
Space can be configured from its settings page. On a Space the server binds 0.0.0.0 by itself.
"""
from __future__ import annotations

import argparse
import os
import sys

from llava_ui import DEFAULT_MODEL
from llava_ui.config import IMAGE_MODES


def env(name: str, default=None):
    return os.environ.get(f"LLAVA_{name}", default)


def parse_args(argv=None) -> argparse.Namespace:
    on_space = bool(os.environ.get("SPACE_ID"))
    p = argparse.ArgumentParser(description="LLaVA-NeXT-Interleave chat (Gradio) + OpenAI-compatible API")
    p.add_argument("--model", default=env("MODEL", DEFAULT_MODEL), help="checkpoint folder, hub id or tiny-random")
    p.add_argument("--host", default=env("HOST", "0.0.0.0" if on_space else "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(env("PORT", os.environ.get("GRADIO_SERVER_PORT", 7860))))
    p.add_argument("--device", default=env("DEVICE"), help="cpu, gpu or gpu:N (default: gpu when available)")
    p.add_argument("--dtype", default=env("DTYPE"), choices=[None, "float32", "float16", "bfloat16"])
    p.add_argument("--image-mode", default=env("IMAGE_MODE"), choices=[None, *IMAGE_MODES])
    p.add_argument("--context-length", type=int, default=env("CONTEXT_LENGTH") and int(env("CONTEXT_LENGTH")))
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
    p.add_argument("--backend", default=env("BACKEND", "local"), choices=["local", "remote"])
    p.add_argument("--base-url", default=env("BASE_URL"), help="remote OpenAI-compatible engine, e.g. http://h:8000/v1")
    p.add_argument("--remote-model", default=env("REMOTE_MODEL"), help="model name on the remote engine")
    p.add_argument("--remote-api-key", default=env("REMOTE_API_KEY"))
    return p.parse_args(argv)


def make_backend(args):
    if args.backend == "remote":
        from llava_ui.backends.remote import RemoteEngine

        if not args.base_url:
            sys.exit("error: --backend remote needs --base-url")
        return RemoteEngine(args.base_url, args.remote_model, api_key=args.remote_api_key)
    from llava_ui.backends.local import get_engine

    return get_engine(args.model, device=args.device, dtype=args.dtype, image_mode=args.image_mode,
                      context_length=args.context_length)


class UploadsOnly:
    """ASGI middleware: a request to the page's endpoints may name server files only inside Gradio's upload folder.

    Gradio copies every file a request names (`{"path": ..., "meta": {"_type": "gradio.FileData"}}`) into its cache
    before a handler runs. Its own check that the file was uploaded is skipped in Gradio 6.17 (the check finds no
    running Blocks while inputs are preprocessed), so without this a caller could name any image on the server's
    disk and get it back in the chat. Uploads, examples and everything the page serves live in that folder.
    """

    def __init__(self, app, folder: str | None = None):
        from gradio.utils import get_upload_folder

        self.app = app
        self.folder = os.path.realpath(folder or get_upload_folder())

    async def __call__(self, scope, receive, send):
        content_type = dict(scope.get("headers") or []).get(b"content-type", b"")
        if (scope["type"] != "http" or scope["method"] != "POST" or scope["path"].startswith("/v1/")
                or content_type.startswith(b"multipart/")):  # uploads stream through to the upload folder
            return await self.app(scope, receive, send)
        messages, more = [], True
        while more:
            message = await receive()
            messages.append(message)
            more = message.get("more_body", False) and message["type"] == "http.request"
        outside = self.outside(b"".join(m.get("body", b"") for m in messages))
        if outside:
            from starlette.responses import JSONResponse

            detail = f"{outside} was not uploaded to this server: upload files, do not name server paths"
            return await JSONResponse({"detail": detail, "error": detail}, status_code=403)(scope, receive, send)

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    def outside(self, body: bytes) -> str | None:
        """The first file path in a JSON body that is not inside the upload folder (None: all are, or no JSON)."""
        import json

        try:
            pending = [json.loads(body)]
        except ValueError:
            return None  # not JSON: the page's endpoints would not read it either
        while pending:
            value = pending.pop()
            if isinstance(value, dict):
                path = value.get("path")
                if isinstance(path, str) and not self.inside(path):
                    return path
                pending.extend(value.values())
            elif isinstance(value, list):
                pending.extend(value)
        return None

    def inside(self, path: str) -> bool:
        resolved = os.path.realpath(path)
        return os.path.commonpath([resolved, self.folder]) == self.folder


def create_app(args):
    """The FastAPI app: /v1 (OpenAI-compatible) + the Gradio chat at /."""
    import gradio as gr
    from fastapi import FastAPI

    from llava_ui.openai.server import create_api_router
    from llava_ui.web.page import build_demo, launch_options

    backend = make_backend(args)
    if args.eager:
        backend.load_in_background()
    demo = build_demo(backend, args)
    app = FastAPI(title="llava_ui")
    app.add_middleware(UploadsOnly)
    app.include_router(create_api_router(backend, api_key=args.api_key, allow_file_urls=args.allow_file_urls))
    demo.queue(max_size=args.queue_size, default_concurrency_limit=args.concurrency)
    return gr.mount_gradio_app(app, demo, path="", max_file_size=int(args.max_upload_mb * 2**20),
                               allowed_paths=[], show_error=True, **launch_options()), demo, backend


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.share:
        # a share link needs Gradio's own launcher; the API routes join its app once it runs
        from llava_ui.openai.server import create_api_router
        from llava_ui.web.page import build_demo, launch_options

        backend = make_backend(args)
        if args.eager:
            backend.load_in_background()
        demo = build_demo(backend, args)
        demo.queue(max_size=args.queue_size, default_concurrency_limit=args.concurrency)
        from starlette.middleware import Middleware

        demo.launch(server_name=args.host, server_port=args.port, share=True, prevent_thread_lock=True,
                    max_file_size=int(args.max_upload_mb * 2**20), app_kwargs={"middleware": [Middleware(UploadsOnly)]},
                    **launch_options())
        demo.app.include_router(create_api_router(backend, api_key=args.api_key, allow_file_urls=args.allow_file_urls))
        demo.block_thread()
        return
    import uvicorn

    app, _, _ = create_app(args)
    print(f"llava_ui: http://{args.host}:{args.port}  (API: http://{args.host}:{args.port}/v1)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()

"""A request to the page's endpoints may name server files only inside Gradio's upload folder: an ASGI middleware
for every endpoint, and the check the stateless /chat endpoint (gr.api, unprocessed inputs) runs itself."""
from __future__ import annotations

import json
import os

from gradio.utils import get_upload_folder
from starlette.responses import JSONResponse

from llava_ui.errors import UserError

MAX_JSON_BYTES = 4 << 20  # a message's text and settings; files never travel in these bodies


class UploadsOnly:
    """ASGI middleware: a request to the page's endpoints may name server files only inside Gradio's upload folder.

    Gradio copies every file a request names (`{"path": ..., "meta": {"_type": "gradio.FileData"}}`) into its cache
    before a handler runs. Its own check that the file was uploaded (`processing_utils._check_allowed`) returns
    early unless `blocks.has_launched` is set, which `Blocks.launch()` does and `gr.mount_gradio_app` (how this
    app is served, beside /v1) does not (still so in Gradio 6.31), so without this a caller could name any image
    on the server's disk and get it back in the chat. Uploads, examples and everything the page serves live in
    that folder. The page's JSON bodies hold no file bytes (files come as multipart uploads), so a body is read
    up to MAX_JSON_BYTES and a larger one refused (413).
    """

    def __init__(self, app, folder: str | None = None):
        self.app = app
        self.folder = os.path.realpath(folder or get_upload_folder())

    async def __call__(self, scope, receive, send):
        content_type = dict(scope.get("headers") or []).get(b"content-type", b"")
        if (scope["type"] != "http" or scope["method"] != "POST" or scope["path"].startswith("/v1/")
                or content_type.startswith(b"multipart/")):  # uploads stream through to the upload folder
            return await self.app(scope, receive, send)
        messages, more, size = [], True, 0
        while more:
            message = await receive()
            messages.append(message)
            size += len(message.get("body", b""))
            if size > MAX_JSON_BYTES:
                detail = f"the request body is larger than {MAX_JSON_BYTES >> 20} MB; upload files instead"
                return await JSONResponse({"detail": detail, "error": detail}, status_code=413)(scope, receive, send)
            more = message.get("more_body", False) and message["type"] == "http.request"
        outside = self.outside(b"".join(m.get("body", b"") for m in messages))
        if outside:
            detail = f"{outside} was not uploaded to this server: upload files, do not name server paths"
            return await JSONResponse({"detail": detail, "error": detail}, status_code=403)(scope, receive, send)

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    def outside(self, body: bytes) -> str | None:
        """The first file path in a JSON body that is not inside the upload folder (None: all are, or no JSON)."""
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


def uploaded_paths(files: list) -> list[str]:
    """The server paths of files a /chat call sent (FileData dicts, as gradio_client's handle_file makes them),
    each inside the upload folder, else a UserError."""
    folder = os.path.realpath(get_upload_folder())
    paths = []
    for file in files:
        path = file.get("path") if isinstance(file, dict) else getattr(file, "path", None)
        if not isinstance(path, str) or not file_meta_ok(file):
            raise UserError("files must be uploads (gradio_client: handle_file(path)), not bare paths")
        resolved = os.path.realpath(path)
        if os.path.commonpath([resolved, folder]) != folder:
            raise UserError(f"{path} was not uploaded to this server: upload files, do not name server paths")
        paths.append(resolved)
    return paths


def file_meta_ok(file) -> bool:
    meta = file.get("meta") if isinstance(file, dict) else getattr(file, "meta", None)
    return isinstance(meta, dict) and meta.get("_type") == "gradio.FileData"

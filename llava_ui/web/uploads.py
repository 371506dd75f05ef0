"""ASGI middleware for the page's endpoints: a request may name server files only inside Gradio's upload folder."""
from __future__ import annotations

import json
import os

from gradio.utils import get_upload_folder
from starlette.responses import JSONResponse


class UploadsOnly:
    """ASGI middleware: a request to the page's endpoints may name server files only inside Gradio's upload folder.

    Gradio copies every file a request names (`{"path": ..., "meta": {"_type": "gradio.FileData"}}`) into its cache
    before a handler runs. Its own check that the file was uploaded is skipped in Gradio 6.17 (the check finds no
    running Blocks while inputs are preprocessed), so without this a caller could name any image on the server's
    disk and get it back in the chat. Uploads, examples and everything the page serves live in that folder.
    """

    def __init__(self, app, folder: str | None = None):
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

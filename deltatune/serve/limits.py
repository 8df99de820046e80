"""The request body size limit, enforced while the body streams in (before FastAPI parses it).

A declared ``Content-Length`` above the limit is refused at once; a chunked body is counted as it arrives and
refused as soon as it passes the limit, so an oversized request never takes more than the limit in memory and
never reaches the model. (Raising from inside FastAPI's body reading would turn into its generic 400.)
"""

from __future__ import annotations

import json
from typing import Any

from .protocol import error_body


class BodySizeLimit:
    """ASGI middleware: 413 with a JSON error for bodies over ``max_bytes``."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send, int(declared))
            return
        body = bytearray()
        while True:  # read the body here (at most max_bytes of it), then hand it on in one piece
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                await self._refuse(send, len(body))
                return
            if not message.get("more_body", False):
                break
        delivered = False

        async def replay() -> dict:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # after the body: wait for a disconnect, as the server would

        await self.app(scope, replay, send)

    async def _refuse(self, send: Any, size: int) -> None:
        body = json.dumps(error_body(f"the request body has {size} bytes or more, above this server's limit of "
                                     f"{self.max_bytes} bytes (--max-body-bytes); send fewer or shorter inputs",
                                     "request_too_large")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

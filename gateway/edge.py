"""What every request body passes before a route sees it: a size limit, and JSON that is valid
UTF-8 (JSON's `\\ud800` escape decodes to a lone surrogate that no UTF-8 encoder accepts, so a
string holding one would fail wherever it is next written: a Redis stream, an export, a tokenizer).

A pure ASGI middleware: it reads the body once (refusing it as soon as it is too long), checks
it, and hands the same bytes on, so routes still read it as usual."""

from __future__ import annotations

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import error_body

# Routes that stream their own (larger) bodies to disk, with their own limit.
_OWN_LIMIT = ("/v1/files",)


class BodyGuard:
    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(_OWN_LIMIT):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._refuse(send, 413, self._too_large(), "request_too_large")
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                await self._refuse(send, 413, self._too_large(), "request_too_large")
                return
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        content_type = dict(scope["headers"]).get(b"content-type", b"")
        if body and b"json" in content_type:
            try:
                orjson.loads(body)  # rejects lone surrogates, which the json module lets through
            except orjson.JSONDecodeError:
                message_ = "The body is not valid JSON, or holds text that is not valid UTF-8."
                await self._refuse(send, 400, message_, "invalid_json")
                return
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _too_large(self) -> str:
        return f"The request body is larger than this server's limit of {self.max_body_bytes} bytes."

    @staticmethod
    async def _refuse(send: Send, status: int, message: str, code: str) -> None:
        payload = orjson.dumps(error_body(message, "invalid_request_error", None, code))
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})

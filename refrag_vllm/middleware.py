"""A request-body size limit for ``vllm serve``, refused before any JSON is parsed.

vLLM's OpenAI server parses a request's whole JSON body, on its event loop, before anything
else sees it, and every request beside it waits for that. This ASGI middleware answers an
oversized body with HTTP 413 first, without decoding it:

    vllm serve CKPT --middleware refrag_vllm.middleware.RequestSizeLimit ...

(``refrag-vllm serve`` adds it.) The limit is ``REFRAG_MAX_REQUEST_BYTES`` (default
:data:`DEFAULT_MAX_REQUEST_BYTES`, 32 MiB: 8,192 positions of client-sent float32 vectors
fit in it). A declared ``Content-Length`` over the limit is refused at once; a chunked body
is counted as it arrives and refused when it passes the limit. The answer goes out at once;
the server (uvicorn, under ``vllm serve``) then reads the rest of the body and drops it in its
parser, as it does for any request whose response is complete, so a client still writing
sees the answer, the connection stays usable, and no Python code of ours touches the rest of
the bytes (closing the connection instead would reset it under a client still writing, and
the client would lose the answer). Bodies that fit the limit go on unchanged; the renderer still refuses a prompt that cannot fit
``max_model_len`` before tokenizing it.
"""

from __future__ import annotations

import json

from .config import bytes_from_env

DEFAULT_MAX_REQUEST_BYTES = 32 << 20
MAX_REQUEST_BYTES_ENV = "REFRAG_MAX_REQUEST_BYTES"
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def max_request_bytes() -> int:
    """The limit: ``REFRAG_MAX_REQUEST_BYTES`` if set (a positive integer), else the default."""
    return bytes_from_env(MAX_REQUEST_BYTES_ENV, DEFAULT_MAX_REQUEST_BYTES)


class RequestSizeLimit:
    """ASGI middleware: HTTP 413 for a request body over ``max_bytes``, before it is parsed."""

    def __init__(self, app, max_bytes: int | None = None) -> None:
        self.app = app
        self.max_bytes = max_request_bytes() if max_bytes is None else int(max_bytes)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("method") not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or ())
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                length = -1
            if length > self.max_bytes:
                await self._refuse(send, f"{length} bytes")
                return
            await self.app(scope, receive, send)
            return
        # No declared length (chunked): count the body as it arrives, keeping what fits.
        messages, total = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            total += len(message.get("body", b""))
            if total > self.max_bytes:
                await self._refuse(send, f"more than {self.max_bytes} bytes")
                return
            if not message.get("more_body", False):
                break
        replay = iter(messages)

        async def replayed():
            return next(replay, None) or await receive()

        await self.app(scope, replayed, send)

    async def _refuse(self, send, size: str) -> None:
        message = (f"request body of {size} exceeds this server's limit of {self.max_bytes} bytes "
                   f"(set {MAX_REQUEST_BYTES_ENV} to change it)")
        body = json.dumps({"error": {"message": message, "type": "BadRequestError", "param": None,
                                     "code": 413}}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


SIZE_LIMIT_MIDDLEWARE = f"{RequestSizeLimit.__module__}.{RequestSizeLimit.__qualname__}"
"""What ``vllm serve --middleware`` takes to install :class:`RequestSizeLimit`."""


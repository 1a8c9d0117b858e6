"""The request-size limit, on a real Starlette app through httpx's ASGI transport: an
oversized body is refused with 413 before the app reads it, declared or chunked, and a body
that fits reaches the app byte for byte."""

import asyncio

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from refrag_vllm.middleware import DEFAULT_MAX_REQUEST_BYTES, RequestSizeLimit, max_request_bytes

LIMIT = 1000


def make_app(seen: list):
    async def echo(request: Request):
        body = await request.body()
        seen.append(body)
        return JSONResponse({"bytes": len(body)})

    app = Starlette(routes=[Route("/v1/chat/completions", echo, methods=["GET", "POST"])])
    app.add_middleware(RequestSizeLimit, max_bytes=LIMIT)
    return app


def post(app, **kwargs):
    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.request(kwargs.pop("method", "POST"), "/v1/chat/completions", **kwargs)

    return asyncio.run(go())


def chunks(total: int, size: int = 100):
    async def gen():
        for start in range(0, total, size):
            yield b"x" * min(size, total - start)

    return gen()


@pytest.mark.parametrize("size", [0, 1, LIMIT])
def test_body_that_fits_reaches_the_app_unchanged(size):
    seen = []
    body = bytes(range(256)) * (size // 256) + b"y" * (size % 256)
    resp = post(make_app(seen), content=body)
    assert resp.status_code == 200 and seen == [body]


def test_declared_oversized_body_is_refused_before_the_app_runs():
    seen = []
    resp = post(make_app(seen), content=b"{" * (LIMIT + 1))
    assert resp.status_code == 413
    assert seen == []
    err = resp.json()["error"]
    assert f"{LIMIT + 1} bytes" in err["message"] and "REFRAG_MAX_REQUEST_BYTES" in err["message"]


def test_chunked_body_is_counted_as_it_arrives():
    seen = []
    resp = post(make_app(seen), content=chunks(LIMIT))  # no Content-Length: transfer-encoding chunked
    assert resp.status_code == 200 and seen == [b"x" * LIMIT]
    resp = post(make_app(seen), content=chunks(50 * LIMIT))
    assert resp.status_code == 413 and len(seen) == 1
    assert f"more than {LIMIT} bytes" in resp.json()["error"]["message"]


def test_requests_without_a_body_pass():
    seen = []
    assert post(make_app(seen), method="GET").status_code == 200


def test_limit_from_environment(monkeypatch):
    monkeypatch.delenv("REFRAG_MAX_REQUEST_BYTES", raising=False)
    assert max_request_bytes() == DEFAULT_MAX_REQUEST_BYTES
    monkeypatch.setenv("REFRAG_MAX_REQUEST_BYTES", "12345")
    assert max_request_bytes() == 12345
    for bad in ("-1", "0", "1e6", "lots"):
        monkeypatch.setenv("REFRAG_MAX_REQUEST_BYTES", bad)
        with pytest.raises(ValueError, match="REFRAG_MAX_REQUEST_BYTES must be a positive integer"):
            max_request_bytes()


@pytest.fixture(scope="module")
def real_server():
    """The app behind a real uvicorn (httptools, as under ``vllm serve``) on a free port."""
    import socket
    import threading
    import time

    import uvicorn

    seen: list = []
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(make_app(seen), host="127.0.0.1", port=port, http="httptools",
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", seen
    server.should_exit = True
    thread.join(timeout=10)


@pytest.mark.parametrize("chunked", [False, True])
def test_over_a_real_socket_the_answer_reaches_a_client_still_writing(real_server, chunked):
    """The 413 goes out before the body is read; the server drops the rest, so a client that
    writes all 20 MB before reading gets the answer, and the same connection serves the next request."""
    url, seen = real_server
    big = 20 << 20

    def body():
        for _ in range(big // (1 << 20)):
            yield b"x" * (1 << 20)

    with httpx.Client(base_url=url, timeout=30) as client:
        resp = client.post("/v1/chat/completions", content=body() if chunked else b"x" * big)
        assert resp.status_code == 413, resp.text
        assert "exceeds this server's limit" in resp.json()["error"]["message"]
        before = len(seen)
        ok = client.post("/v1/chat/completions", content=b"y" * LIMIT)
        assert ok.status_code == 200 and seen[before:] == [b"y" * LIMIT]
        local = lambda r: r.extensions["network_stream"].get_extra_info("client_addr")  # noqa: E731
        assert local(ok) == local(resp)  # the same keep-alive connection
        assert client.get("/v1/chat/completions").status_code == 200

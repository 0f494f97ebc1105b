"""The connection cap's 503 says when to come back: Retry-After and a JSON error, as every other
refusal of the servers (uvicorn's own answer has neither), and only while the cap is full."""

import json
import socket
import threading
import time

import uvicorn
from raw_http import read_response

from asyncfl.config import ServerConfig
from asyncfl.server.connection import OVER_CAP_RETRY_AFTER_S
from asyncfl.server.limits import uvicorn_options
from asyncfl.server.testing import free_port

CAP = 4


async def ok_app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


def request(port: int) -> tuple[int, dict[str, str], bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        return read_response(s)


def test_over_the_cap_503_carries_retry_after_and_frees_with_the_connections():
    port = free_port()
    config = uvicorn.Config(
        ok_app, host="127.0.0.1", port=port, log_level="error", **uvicorn_options(ServerConfig(max_connections=CAP))
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.01)
        assert request(port)[0] == 200
        hogs = [socket.create_connection(("127.0.0.1", port)) for _ in range(CAP)]
        time.sleep(0.2)
        status, headers, body = request(port)
        assert status == 503
        assert headers["retry-after"] == str(OVER_CAP_RETRY_AFTER_S)
        assert headers["connection"] == "close"
        assert json.loads(body)["error"] == "overloaded"
        for hog in hogs:
            hog.close()
        time.sleep(0.2)
        assert request(port)[0] == 200
    finally:
        server.should_exit = True
        thread.join(timeout=10)

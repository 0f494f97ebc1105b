"""A request head (line and headers) is bounded: past MAX_HEAD_BYTES the server answers 431 and
closes, however the bytes are split; a body, even one that arrives with its head in a single
write, never counts against that bound."""

import json
import socket
import threading
import time

import pytest
import uvicorn
from raw_http import read_response

from asyncfl.config import ServerConfig
from asyncfl.server.connection import MAX_HEAD_BYTES
from asyncfl.server.limits import uvicorn_options
from asyncfl.server.testing import free_port


async def echo_length_app(scope, receive, send):
    """200 with the body's length, read whole."""
    if scope["type"] != "http":
        return
    size, more = 0, True
    while more:
        message = await receive()
        size += len(message.get("body", b""))
        more = message.get("more_body", False)
    body = str(size).encode()
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", str(len(body)).encode())]}
    )
    await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module")
def port():
    port = free_port()
    config = uvicorn.Config(
        echo_length_app, host="127.0.0.1", port=port, log_level="error", **uvicorn_options(ServerConfig())
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    yield port
    server.should_exit = True
    thread.join(timeout=10)


def head(pad: int, body_length: int = 0) -> bytes:
    return (f"POST /x HTTP/1.1\r\nHost: x\r\nX-Pad: {'a' * pad}\r\nContent-Length: {body_length}\r\n\r\n").encode()


@pytest.mark.parametrize("pieces", [1, 40])
def test_a_head_past_the_bound_is_refused_431_and_closed(port, pieces):
    data = head(MAX_HEAD_BYTES + 1024)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        step = -(-len(data) // pieces)
        for i in range(0, len(data), step):
            try:
                sock.sendall(data[i : i + step])
            except (BrokenPipeError, ConnectionResetError):
                break  # refused already: the rest is not read
            time.sleep(0.005)
        status, headers, body = read_response(sock)
        assert status == 431 and headers["connection"] == "close"
        assert json.loads(body)["error"] == "header_too_large"
        assert sock.recv(1) == b""  # closed


def test_a_head_within_the_bound_and_a_large_body_in_one_write_are_answered(port):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head(MAX_HEAD_BYTES - 200))
        assert read_response(sock)[:1] == (200,)
        body = b"b" * 300_000  # arrives with its head, several times the head bound
        sock.sendall(head(10, len(body)) + body)
        status, _, payload = read_response(sock)
        assert (status, payload) == (200, str(len(body)).encode())
        sock.sendall(head(10))  # the connection goes on: the next head counts from zero
        assert read_response(sock)[0] == 200

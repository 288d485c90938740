"""BackgroundServer: serves on a pre-bound socket, refuses a taken port, stops cleanly even mid-request."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from meterlake.local.serving import (
    BackgroundServer,
    PortInUseError,
    ServingError,
    abort_connection,
    bind_listening_socket,
)


async def _hello(_: Request) -> Response:
    return PlainTextResponse("hello")


async def _sleepy(_: Request) -> Response:
    await asyncio.sleep(30)
    return PlainTextResponse("too late")


class _Reset(Response):
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        abort_connection(scope)
        while (await receive())["type"] != "http.disconnect":
            pass


async def _reset(_: Request) -> Response:
    return _Reset()


APP = Starlette(routes=[Route("/hello", _hello), Route("/sleepy", _sleepy), Route("/reset", _reset, methods=["POST"])])


def test_serves_on_the_bound_port_and_stops() -> None:
    sock = bind_listening_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = BackgroundServer(APP, sock, name="test")
    with server:
        assert (server.port, server.url, server.running) == (port, f"http://127.0.0.1:{port}", True)
        assert httpx.get(server.url + "/hello").text == "hello"
    assert server.running is False
    server.close()  # idempotent
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/hello")


def test_a_taken_port_is_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(PortInUseError, match=f"port {port} on 127.0.0.1 is in use") as caught:
            bind_listening_socket("127.0.0.1", port)
        assert caught.value.port == port


def test_an_app_failing_at_startup_is_a_serving_error_and_frees_the_socket() -> None:
    async def failing(scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "lifespan"
        await receive()
        await send({"type": "lifespan.startup.failed", "message": "cannot start"})

    sock = bind_listening_socket("127.0.0.1", 0)
    with pytest.raises(ServingError, match="exited while starting"):
        BackgroundServer(failing, sock)
    assert sock.fileno() == -1


def test_stop_while_a_slow_request_is_in_flight_is_prompt_and_the_client_is_not_left_hanging() -> None:
    server = BackgroundServer(APP, bind_listening_socket("127.0.0.1", 0), graceful_shutdown_s=0.3)
    outcome: list[object] = []

    def call() -> None:
        try:
            outcome.append(httpx.get(server.url + "/sleepy", timeout=20).status_code)
        except httpx.TransportError as exc:
            outcome.append(exc)

    client = threading.Thread(target=call)
    client.start()
    time.sleep(0.3)  # the request is now sleeping inside the app
    started = time.monotonic()
    server.close(timeout=5)
    assert time.monotonic() - started < 3
    assert not server.running
    client.join(5)
    assert not client.is_alive()
    # The cancelled request is answered 500 with Connection: close, or its connection is dropped.
    [answer] = outcome
    assert answer == 500 or isinstance(answer, httpx.TransportError), answer


def test_abort_connection_resets_the_tcp_connection_without_an_answer() -> None:
    with BackgroundServer(APP, bind_listening_socket("127.0.0.1", 0)) as server:
        with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
            httpx.post(server.url + "/reset", content=b"x" * 1000)
        assert httpx.get(server.url + "/hello").text == "hello"  # the server itself is fine


def test_abort_connection_needs_the_extension() -> None:
    with pytest.raises(RuntimeError, match=r"meterlake\.abort_connection"):
        abort_connection({"type": "http", "extensions": {}})

"""BackgroundServer: serves on a pre-bound socket, refuses a taken port, stops cleanly even mid-request, and hands
requests over its limits (or not parseable) to the app instead of answering them itself."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from meterlake.local.serving import (
    BackgroundServer,
    PortInUseError,
    RequestLimits,
    RequestRejection,
    ServingError,
    abort_connection,
    bind_listening_socket,
    request_rejection,
    stop_signals,
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


# -- request limits: refused requests are handed to the app ----------------------------------------------------------

LIMITS = RequestLimits(max_target_bytes=64, max_header_bytes=256, max_body_bytes=1000)


def _echo_app(seen: list[dict[str, object]]) -> ASGIApp:
    """Answers every request with what the server told it: the rejection (if any), method and path."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        rejection = request_rejection(scope)
        seen.append({"rejection": rejection, "method": scope["method"], "path": scope["path"]})
        body = (rejection.value if rejection is not None else "ok").encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]})
        await send({"type": "http.response.body", "body": body})

    return app


def _exchange(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        received = b""
        while data := sock.recv(65536):
            received += data
    return received


@pytest.mark.parametrize(
    ("request_bytes", "rejection"),
    [
        (b"GET /" + b"a" * 64 + b" HTTP/1.1\r\nHost: x\r\n\r\n", RequestRejection.TARGET_TOO_LONG),
        (b"GET /x HTTP/1.1\r\nX-Big: " + b"b" * 250 + b"\r\n\r\n", RequestRejection.HEADERS_TOO_LARGE),
        (b"GET /x HTTP/1.1\r\nX-Big: " + b"b" * 3_000_000 + b"\r\n\r\n", RequestRejection.HEADERS_TOO_LARGE),
        (b"POST /x HTTP/1.1\r\nContent-Length: 1001\r\n\r\n", RequestRejection.BODY_TOO_LARGE),
        (b"GET /x HTTP/1.1\r\nX-A: a\x01b\r\n\r\n", RequestRejection.MALFORMED),
        (b"GET /x\x7f HTTP/1.1\r\n\r\n", RequestRejection.MALFORMED),
    ],
    ids=["target", "headers", "3 MB header", "body", "control character", "bad target"],
)
def test_a_refused_request_reaches_the_app_marked_and_the_client_reads_the_answer(
    request_bytes: bytes, rejection: RequestRejection
) -> None:
    """The app answers what uvicorn answered itself (or passed through whole); a client still sending gets it."""
    seen: list[dict[str, object]] = []
    with BackgroundServer(_echo_app(seen), bind_listening_socket("127.0.0.1", 0), limits=LIMITS) as server:
        answer = _exchange(server.port, request_bytes + b"GET /pipelined HTTP/1.1\r\n\r\n")
        assert httpx.get(server.url + "/next").text == "ok"
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"connection: close\r\n" in answer
    assert answer.endswith(b"\r\n\r\n" + rejection.value.encode())
    assert [s["rejection"] for s in seen] == [rejection, None]  # nothing after a refused request is parsed
    assert len(str(seen[0]["path"])) <= LIMITS.max_target_bytes


def test_a_method_the_parser_does_not_know_reaches_the_app_unmarked() -> None:
    seen: list[dict[str, object]] = []
    with BackgroundServer(_echo_app(seen), bind_listening_socket("127.0.0.1", 0), limits=LIMITS) as server:
        answer = _exchange(server.port, b"BREW /pot HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.endswith(b"\r\n\r\nok")
    assert seen == [{"rejection": None, "method": "BREW", "path": "/pot"}]


def test_without_limits_uvicorn_answers_bad_requests_itself() -> None:
    seen: list[dict[str, object]] = []
    with BackgroundServer(_echo_app(seen), bind_listening_socket("127.0.0.1", 0)) as server:
        answer = _exchange(server.port, b"GET /x HTTP/1.1\r\nX-A: a\x01b\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert answer.endswith(b"Invalid HTTP request received.")
    assert seen == []


# -- stop signals -----------------------------------------------------------------------------------------------------

#: Waits once per line of the wait's code (and of whatever Python it calls): the k-th time, SIGTERM is sent at the
#: k-th line it runs, so the handler runs wherever that line leaves the main thread, locks held included. When the
#: wait blocks before its k-th line, a timer sends the signal instead and the walk ends. A handler that takes a lock
#: the main thread may hold (threading.Event.set, the old way) hangs at one of these lines.
_SIGNAL_AT_EVERY_LINE = """
import os, signal, sys, threading
from meterlake.local.serving import stop_signals

positions = 0
for k in range(1, 500):
    lines, sent = 0, []

    def tracer(frame, event, arg):
        global lines
        if event == "line":
            lines += 1
            if lines == k:
                sent.append("line")
                os.kill(os.getpid(), signal.SIGTERM)
        return tracer

    def late():
        if not sent:
            sent.append("timer")
            os.kill(os.getpid(), signal.SIGTERM)

    with stop_signals() as wait_for_stop:
        timer = threading.Timer(0.3, late)
        timer.start()
        sys.settrace(tracer)
        caught = wait_for_stop()
        sys.settrace(None)
        timer.cancel()
        timer.join()
    assert caught == signal.SIGTERM, caught
    if sent == ["timer"]:
        break
    positions += 1
with stop_signals() as wait_for_stop:
    os.kill(os.getpid(), signal.SIGINT)  # before the wait: kept until it comes
    assert wait_for_stop() == signal.SIGINT
print(positions)
"""


def test_a_stop_signal_at_any_line_of_the_wait_ends_it_and_one_before_it_is_kept() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _SIGNAL_AT_EVERY_LINE], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) >= 2  # the walk reached lines inside the wait, not only the timer's signal


def test_stop_signals_restores_the_handlers_it_replaced() -> None:
    before = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    with stop_signals():
        assert signal.getsignal(signal.SIGTERM) is not before[signal.SIGTERM]
    assert {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)} == before


def test_stop_signals_off_the_main_thread_is_refused_and_leaves_no_socket_open() -> None:
    before = set(os.listdir("/proc/self/fd"))
    failures: list[BaseException] = []

    def enter() -> None:
        try:
            with stop_signals():
                pass
        except ValueError as exc:
            failures.append(exc)

    thread = threading.Thread(target=enter)
    thread.start()
    thread.join()
    assert len(failures) == 1
    assert set(os.listdir("/proc/self/fd")) <= before

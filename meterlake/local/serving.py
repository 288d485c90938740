"""Serve an ASGI app with uvicorn on a pre-bound socket in a background thread, and stop it cleanly.

The socket is bound before the app is built, so an app that must know its own URL (an issuer, a callback) can be
given the real port even when the port is ephemeral. Each HTTP request's scope also carries a server extension,
:data:`ABORT_CONNECTION_EXTENSION`, that lets the app drop the TCP connection with a reset instead of answering:
the closest an ASGI app can come to a crashed server or a broken load balancer.

Given :class:`RequestLimits`, the server also stops answering bad requests itself: uvicorn would answer a request
its parser refuses with its own plain-text 400, and would hand the app a header or URL of any size. Instead, a
request over a limit or not parseable as HTTP/1.1 is handed to the app marked with the
:data:`REQUEST_REJECTION_EXTENSION` (with as much of it as could be read, cut to the limits), so the app answers
it and records it like any other request; nothing of the connection is parsed after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import re
import signal
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, ClassVar, Literal

import httptools
import uvicorn
from starlette.types import ASGIApp, Scope
from uvicorn.config import Config as UvicornConfig
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.server import ServerState

#: Scope extension key; its value is ``{"abort": callable}``. See :func:`abort_connection`.
ABORT_CONNECTION_EXTENSION = "meterlake.abort_connection"
#: Scope extension key present on a request the server refused; its value is the :class:`RequestRejection`.
REQUEST_REJECTION_EXTENSION = "meterlake.request_rejection"

_POLL_SECONDS = 0.005
#: Room for the method, spaces, protocol version and line ends around the request target and the header lines, so
#: that the head-size backstop (:attr:`RequestLimits.max_head_bytes`) never cuts off a head within both limits.
_HEAD_SLACK_BYTES = 1024
_HEAD_END = b"\r\n\r\n"
#: What is kept of a method the parser refused, for the app and its logs.
_MAX_REFUSED_METHOD_CHARS = 32
#: RFC 9110 ``token`` (a method or a header name), a field value (no control characters but HTAB), a version.
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_FIELD_VALUE = re.compile(rb"[^\x00-\x08\x0a-\x1f\x7f]*")
_ORIGIN_FORM_TARGET = re.compile(rb"/[\x21-\x7e]*")
_HTTP_1_VERSION = re.compile(rb"HTTP/1\.([01])")


@contextlib.contextmanager
def stop_signals(
    signals: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM),
) -> Iterator[Callable[[], signal.Signals]]:
    """Catch ``signals`` for the block (main thread only) and give a function that waits for the first one caught,
    however early it came.

    The handlers take no lock: the interpreter writes each signal's number to a socket (``signal.set_wakeup_fd``) and
    the wait reads it. A handler calling ``threading.Event.set`` deadlocks when the signal lands while the main thread
    holds that event's lock, as it does entering ``Event.wait``: a SIGTERM right after ``meterlake serve`` printed
    its endpoint hung it for good.
    """
    wanted = {int(number) for number in signals}
    receive, send = socket.socketpair()
    with receive, send:
        send.setblocking(False)
        previous_fd = signal.set_wakeup_fd(send.fileno(), warn_on_full_buffer=False)  # ValueError off the main thread
        previous_handlers: dict[signal.Signals, Any] = {}
        try:
            for number in signals:
                previous_handlers[number] = signal.signal(number, _caught)

            def wait() -> signal.Signals:
                while True:
                    for number in receive.recv(64):
                        if number in wanted:
                            return signal.Signals(number)

            yield wait
        finally:
            for number, handler in previous_handlers.items():
                signal.signal(number, handler)
            signal.set_wakeup_fd(previous_fd)


def _caught(signum: int, frame: object) -> None:
    """A stop signal's Python handler: nothing to do, the wakeup socket already has its number (see stop_signals)."""


class ServingError(Exception):
    """The server cannot listen on its address, did not start, or did not stop."""


class PortInUseError(ServingError):
    """The requested port is already taken: pick another (or 0 for an ephemeral one)."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(f"port {port} on {host} is in use")
        self.host = host
        self.port = port


class RequestRejection(enum.Enum):
    """Why the server refused a request before the app could see all of it."""

    #: Not parseable as HTTP/1.x: a control character in a header, a bad header name or version, a raw non-ASCII
    #: byte in the target, or a method that is not a token.
    MALFORMED = "malformed"
    #: The request target (path and query) is longer than :attr:`RequestLimits.max_target_bytes`.
    TARGET_TOO_LONG = "target-too-long"
    #: The header lines add up to more than :attr:`RequestLimits.max_header_bytes`.
    HEADERS_TOO_LARGE = "headers-too-large"
    #: ``Content-Length`` declares more than :attr:`RequestLimits.max_body_bytes`.
    BODY_TOO_LARGE = "body-too-large"


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """The request limits a :class:`BackgroundServer` enforces before the app runs.

    A request over a limit still reaches the app, with :data:`REQUEST_REJECTION_EXTENSION` set, its target cut to
    ``max_target_bytes``, only the header lines that fit in ``max_header_bytes`` and no body, so the app can answer
    and record it. The connection is then closed: the server half-closes it once the answer is written and drops
    whatever the client still sends (a client still sending a 5 MB header reads the answer instead of a reset).
    """

    #: Longest request target (path and query string), in bytes.
    max_target_bytes: int
    #: Largest header section: each line's name, ``": "``, value and CRLF, summed.
    max_header_bytes: int
    #: Largest body a request may declare in ``Content-Length``.
    max_body_bytes: int

    @property
    def max_head_bytes(self) -> int:
        """Bytes of one request head the server reads before refusing it, whatever the parser made of it so far."""
        return self.max_target_bytes + self.max_header_bytes + _HEAD_SLACK_BYTES


def bind_listening_socket(host: str, port: int, *, backlog: int = 2048) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: ephemeral); read the real port from ``getsockname()``.

    Raises:
        PortInUseError: ``port`` is taken.
        ServingError: the address cannot be bound for another reason.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise PortInUseError(host, port) from None
        raise ServingError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock


def abort_connection(scope: Scope) -> None:
    """Reset the TCP connection of the request ``scope`` belongs to: the client gets an RST, no HTTP answer.

    The app should then return without sending anything; the server sends nothing more on that connection.

    Raises:
        RuntimeError: the app is not served by :class:`BackgroundServer` (the extension is missing).
    """
    extension = scope.get("extensions", {}).get(ABORT_CONNECTION_EXTENSION)
    if extension is None:
        raise RuntimeError(f"the server does not provide the {ABORT_CONNECTION_EXTENSION!r} extension")
    abort: Callable[[], None] = extension["abort"]
    abort()


def request_rejection(scope: Scope) -> RequestRejection | None:
    """Why the server refused the request of ``scope``; None for a request it handed over whole."""
    rejection: RequestRejection | None = scope.get("extensions", {}).get(REQUEST_REJECTION_EXTENSION)
    return rejection


@dataclass(frozen=True, slots=True)
class _RefusedHead:
    """What could be read of a request head the server refuses."""

    method: str
    target: bytes
    http_version: str
    headers: list[tuple[bytes, bytes]]
    rejection: RequestRejection | None


def _read_refused_head(raw: bytes, limits: RequestLimits) -> _RefusedHead:
    """Read a head the parser refused, leniently: as much of it as can be told, and why it is refused.

    ``rejection`` is None only for a well-formed head within the limits: the parser then refused nothing but the
    method, which the caller may hand over as an extension method.
    """
    end = raw.find(_HEAD_END)
    lines = (raw[:end] if end >= 0 else raw).split(b"\r\n")
    parts = lines[0].split(b" ")
    method, target = parts[0], parts[1] if len(parts) > 1 else b""
    version = _HTTP_1_VERSION.fullmatch(parts[2]) if len(parts) == 3 else None
    well_formed = (
        end >= 0
        and version is not None
        and _TOKEN.fullmatch(method) is not None
        and _ORIGIN_FORM_TARGET.fullmatch(target) is not None
    )
    headers: list[tuple[bytes, bytes]] = []
    header_bytes = 0
    declared_body = 0
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        value = value.strip(b" \t")
        if not colon or _TOKEN.fullmatch(name) is None or _FIELD_VALUE.fullmatch(value) is None:
            well_formed = False
            continue
        header_bytes += len(name) + len(value) + 4
        if header_bytes <= limits.max_header_bytes:
            headers.append((name.lower(), value))
        if name.lower() == b"content-length":
            declared_body = int(value) if value.isdigit() else -1
    rejection: RequestRejection | None = None
    if len(target) > limits.max_target_bytes:
        rejection = RequestRejection.TARGET_TOO_LONG
    elif header_bytes > limits.max_header_bytes:
        rejection = RequestRejection.HEADERS_TOO_LARGE
    elif not well_formed or declared_body < 0:
        rejection = RequestRejection.MALFORMED
    elif declared_body > limits.max_body_bytes:
        rejection = RequestRejection.BODY_TOO_LARGE
    return _RefusedHead(
        method=method[:_MAX_REFUSED_METHOD_CHARS].decode("latin-1") or "-",
        target=target[: limits.max_target_bytes],
        http_version=f"1.{version.group(1).decode()}" if version is not None else "1.1",
        headers=headers,
        rejection=rejection,
    )


class _HalfClosingTransport(asyncio.Transport):
    """The transport a refused request's answer is written to: closing it ends only the sending half.

    The client reads the whole answer and an EOF, while whatever it still sends is read and dropped, so it never
    meets the reset a close with unread input causes. The connection closes when the client closes its half, or
    when the keep-alive timer (armed once the answer is complete) fires.
    """

    def __init__(self, transport: asyncio.Transport) -> None:
        super().__init__()
        self._transport = transport

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._transport.write(data)

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def close(self) -> None:
        if self._transport.is_closing():
            return
        if self._transport.can_write_eof():
            self._transport.write_eof()
        else:
            self._transport.close()

    def abort(self) -> None:
        self._transport.abort()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)


class _HttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, adding :data:`ABORT_CONNECTION_EXTENSION` to every request scope.

    With ``request_limits`` set (see :func:`_protocol_for`), requests the parser refuses or that exceed a limit are
    handed to the app marked with :data:`REQUEST_REJECTION_EXTENSION` instead of answered by uvicorn.
    """

    request_limits: ClassVar[RequestLimits | None] = None

    def __init__(
        self,
        config: UvicornConfig,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        # Per request head: what the callbacks counted, and why the head is refused (first reason wins).
        self._rejection: RequestRejection | None = None
        self._target_bytes = 0
        self._header_bytes = 0
        # Where the parser is: no message begun since the last one completed, or inside a head.
        self._between_messages = True
        self._in_head = False
        # The raw bytes of the current head, kept (up to max_head_bytes) when it began at the start of a chunk, so a
        # head the parser refuses can still be read; None when it began inside a chunk (a pipelined request).
        self._head: bytearray | None = None
        self._chunk_starts_message = False
        self._head_received = 0
        # The parser refused the method before the rest of the head arrived: the head is being read to judge it.
        self._awaiting_head = False
        # A refused request was handed to the app: nothing after it on this connection is parsed.
        self._refused = False

    # -- input --------------------------------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        limits = self.request_limits
        if limits is None:
            super().data_received(data)
            return
        if self._refused:
            return  # dropped; the keep-alive timer, armed after the answer, ends the connection
        self._unset_keepalive_if_required()
        if self._awaiting_head:
            self._keep_head_bytes(data, limits)
            if _HEAD_END in self._head_bytes() or self._head_received > limits.max_head_bytes:
                self._refuse_from_head(limits, extension_method=True)
            return
        self._chunk_starts_message = self._between_messages
        if self._between_messages:
            self._head = bytearray()
            self._head_received = 0
        if self._between_messages or self._in_head:
            self._keep_head_bytes(data, limits)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
        except httptools.HttpParserError as exc:
            if not self._refused:
                self._refuse_unparsable(exc, limits)
            return
        if self._in_head and not self._refused and self._head_received > limits.max_head_bytes:
            self._refuse_from_parser(self._rejection or RequestRejection.HEADERS_TOO_LARGE)

    def _keep_head_bytes(self, data: bytes, limits: RequestLimits) -> None:
        self._head_received += len(data)
        if self._head is not None:
            self._head += data[: max(0, limits.max_head_bytes - len(self._head))]

    def _head_bytes(self) -> bytes:
        return bytes(self._head) if self._head is not None else b""

    # -- parser callbacks ---------------------------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._refused:
            return
        super().on_message_begin()
        extensions = self.scope.setdefault("extensions", {})
        extensions[ABORT_CONNECTION_EXTENSION] = {"abort": self._reset}
        if self.request_limits is None:
            return
        if self._chunk_starts_message:
            self._chunk_starts_message = False
        else:
            self._head = None  # began after another request inside this chunk: its raw bytes are not at hand
        self._between_messages = False
        self._in_head = True
        self._rejection = None
        self._target_bytes = self._header_bytes = 0

    def on_url(self, url: bytes) -> None:
        limits = self.request_limits
        if limits is None:
            super().on_url(url)
            return
        if self._refused:
            return
        self._target_bytes += len(url)
        if self._target_bytes > limits.max_target_bytes:
            self._rejection = self._rejection or RequestRejection.TARGET_TOO_LONG
        room = limits.max_target_bytes - len(self.url)
        if room > 0:
            self.url += url[:room]

    def on_header(self, name: bytes, value: bytes) -> None:
        limits = self.request_limits
        if limits is None:
            super().on_header(name, value)
            return
        if self._refused:
            return
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > limits.max_header_bytes:
            # Headers past the limit are dropped: neither the app nor its logs ever hold an oversized value.
            self._rejection = self._rejection or RequestRejection.HEADERS_TOO_LARGE
            return
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        limits = self.request_limits
        if limits is None:
            super().on_headers_complete()
            return
        if self._refused:
            return
        self._in_head = False
        rejection = self._rejection
        if rejection is None and self._declared_body_bytes() > limits.max_body_bytes:
            rejection = RequestRejection.BODY_TOO_LARGE
        if rejection is None:
            super().on_headers_complete()
        else:
            self._refuse_from_parser(rejection)

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        self._between_messages = True
        super().on_message_complete()

    def _declared_body_bytes(self) -> int:
        for name, value in self.headers:
            if name == b"content-length":
                return int(value)  # the parser accepts only digits here
        return 0

    # -- refusing -----------------------------------------------------------------------------------------------------

    def _refuse_unparsable(self, exc: httptools.HttpParserError, limits: RequestLimits) -> None:
        """The parser refused the input: hand the app what can be read of the request, or stop after the current one."""
        if not (self._between_messages or self._in_head):
            # The head was handed over and the body is broken: the app answers the request it has, then the
            # connection closes.
            self._refused = True
            self.cycle.keep_alive = False
            self.cycle.more_body = False
            self.cycle.transport = _HalfClosingTransport(self.transport)
            self.cycle.message_event.set()
            return
        extension_method = isinstance(exc, httptools.HttpParserInvalidMethodError)
        head = self._head_bytes()
        if extension_method and self._head is not None and _HEAD_END not in head:
            # The method may be one the parser does not know: judge it once the whole head is here.
            self._awaiting_head = True
            return
        self._refuse_from_head(limits, extension_method=extension_method)

    def _refuse_from_head(self, limits: RequestLimits, *, extension_method: bool) -> None:
        """Refuse the current request as read from its raw head (the parser's view when that is not at hand)."""
        self._awaiting_head = False
        if self._head is None:
            self._refuse_from_parser(RequestRejection.MALFORMED)
            return
        head = _read_refused_head(bytes(self._head), limits)
        rejection = head.rejection
        if rejection is None and not extension_method:
            rejection = RequestRejection.MALFORMED
        self._hand_over_refused(head.method, head.target, head.http_version, head.headers, rejection)

    def _refuse_from_parser(self, rejection: RequestRejection) -> None:
        """Refuse the current request as far as the parser read it."""
        try:
            method = self.parser.get_method().decode("latin-1")
        except httptools.HttpParserError:
            method = "-"
        version = self.parser.get_http_version()
        self._hand_over_refused(
            method, self.url, version if version in ("1.0", "1.1") else "1.1", list(self.headers), rejection
        )

    def _hand_over_refused(
        self,
        method: str,
        target: bytes,
        http_version: str,
        headers: list[tuple[bytes, bytes]],
        rejection: RequestRejection | None,
    ) -> None:
        """Run the app on the refused request (marked with ``rejection``), then close the connection.

        ``rejection`` is None for a well-formed request with a method the parser does not know: the app gets it
        unmarked, routes it as any other method, and the connection still closes (its body is never parsed).
        """
        self._refused = True
        raw_path, _, query = target.partition(b"?")
        extensions: dict[str, Any] = {ABORT_CONNECTION_EXTENSION: {"abort": self._reset}}
        if rejection is not None:
            extensions[REQUEST_REJECTION_EXTENSION] = rejection
        scope: dict[str, Any] = {
            "type": "http",
            "asgi": {"version": self.asgi_version, "spec_version": "2.3"},
            "http_version": http_version,
            "server": self.server,
            "client": self.client,
            "scheme": self.scheme,
            "root_path": self.root_path,
            "headers": headers,
            "state": self.app_state.copy(),
            "method": method,
            "path": self.root_path + urllib.parse.unquote(raw_path.decode("latin-1")),
            "raw_path": self.root_path.encode("ascii") + raw_path,
            "query_string": query,
            "extensions": extensions,
        }
        existing = self.cycle
        self.cycle = RequestResponseCycle(
            scope=scope,  # type: ignore[arg-type]
            transport=_HalfClosingTransport(self.transport),
            flow=self.flow,
            logger=self.logger,
            access_logger=self.access_logger,
            access_log=self.access_log,
            default_headers=self.server_state.default_headers,
            message_event=asyncio.Event(),
            expect_100_continue=False,
            keep_alive=False,
            on_response=self.on_response_complete,
        )
        self.cycle.more_body = False
        self.cycle.message_event.set()
        if existing is None or existing.response_complete:
            self._start_asgi_task(self.cycle, self.app)
        else:
            self.flow.pause_reading()
            self.pipeline.appendleft((self.cycle, self.app))

    def _reset(self) -> None:
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            # Linger on, timeout 0: closing sends RST instead of FIN, as a crashed peer's kernel would.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        self.transport.abort()


def _protocol_for(limits: RequestLimits | None) -> type[_HttpToolsProtocol]:
    """The protocol class for a server enforcing ``limits`` (None: uvicorn's own handling of bad requests)."""
    if limits is None:
        return _HttpToolsProtocol

    class _LimitedHttpToolsProtocol(_HttpToolsProtocol):
        request_limits = limits

    return _LimitedHttpToolsProtocol


class BackgroundServer:
    """``app`` served by uvicorn on ``sock`` from a daemon thread; running from construction until :meth:`close`.

    The server owns ``sock`` from construction on and closes it when it stops (or fails to start).
    """

    def __init__(
        self,
        app: ASGIApp,
        sock: socket.socket,
        *,
        name: str = "asgi",
        lifespan: Literal["auto", "on", "off"] = "on",
        graceful_shutdown_s: float = 5.0,
        startup_timeout_s: float = 10.0,
        limits: RequestLimits | None = None,
    ) -> None:
        """Start serving and wait until the server accepts connections.

        Args:
            app: the ASGI application.
            sock: a bound, listening socket (see :func:`bind_listening_socket`).
            name: names the thread, for logs and debuggers.
            lifespan: uvicorn's lifespan mode; ``"on"`` makes a failing app startup a :class:`ServingError`.
            graceful_shutdown_s: how long :meth:`close` lets in-flight requests finish before cancelling them.
            startup_timeout_s: how long to wait for the server to start.
            limits: request limits enforced before the app runs, refused requests handed to the app (see
                :class:`RequestLimits`); None leaves bad requests to uvicorn, which answers them itself.

        Raises:
            ServingError: the server exited while starting or did not start in time.
        """
        self._sock = sock
        try:
            address = sock.getsockname()
            self.host: str = address[0]
            self.port: int = address[1]
            authority = f"[{self.host}]" if ":" in self.host else self.host
            #: Base URL, e.g. ``http://127.0.0.1:8851``.
            self.url = f"http://{authority}:{self.port}"
            self._server = uvicorn.Server(
                uvicorn.Config(
                    app,
                    http=_protocol_for(limits),
                    log_config=None,
                    log_level="warning",
                    access_log=False,
                    # Nothing sits in front of a loopback server: no X-Forwarded-* to trust, and no middleware.
                    proxy_headers=False,
                    lifespan=lifespan,
                    # Annotated int, but only ever handed to asyncio.wait_for: a float works and lets tests be quick.
                    timeout_graceful_shutdown=graceful_shutdown_s,  # type: ignore[arg-type]
                )
            )
            self._failure: BaseException | None = None
            self._thread = threading.Thread(target=self._run, name=f"{name}-{self.port}", daemon=True)
            self._thread.start()
            self._wait_started(startup_timeout_s)
        except BaseException:
            sock.close()
            raise

    def _run(self) -> None:
        try:
            self._server.run(sockets=[self._sock])
        except BaseException as exc:  # uvicorn reports a failed startup with sys.exit(3)
            self._failure = exc

    def _wait_started(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive():
                raise ServingError(f"the server on {self.url} exited while starting ({self._failure!r}); see the log")
            if time.monotonic() > deadline:
                self._server.should_exit = True
                raise ServingError(f"the server on {self.url} did not start within {timeout} s")
            time.sleep(_POLL_SECONDS)

    @property
    def running(self) -> bool:
        """Whether the server thread is still serving (or shutting down)."""
        return self._thread.is_alive()

    def close(self, timeout: float = 10.0) -> None:
        """Stop accepting, let in-flight requests finish (up to the graceful timeout), stop the thread (idempotent).

        Raises:
            ServingError: the server thread did not stop within ``timeout`` seconds.
        """
        self._server.should_exit = True
        self._thread.join(timeout)
        self._sock.close()
        if self._thread.is_alive():
            raise ServingError(f"the server on {self.url} did not stop within {timeout} s")

    def __enter__(self) -> BackgroundServer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

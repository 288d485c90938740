"""Serve an ASGI app with uvicorn on a pre-bound socket in a background thread, and stop it cleanly.

The socket is bound before the app is built, so an app that must know its own URL (an issuer, a callback) can be
given the real port even when the port is ephemeral. Each HTTP request's scope also carries a server extension,
:data:`ABORT_CONNECTION_EXTENSION`, that lets the app drop the TCP connection with a reset instead of answering:
the closest an ASGI app can come to a crashed server or a broken load balancer.
"""

from __future__ import annotations

import errno
import socket
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Literal

import uvicorn
from starlette.types import ASGIApp, Scope
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

#: Scope extension key; its value is ``{"abort": callable}``. See :func:`abort_connection`.
ABORT_CONNECTION_EXTENSION = "meterlake.abort_connection"

_POLL_SECONDS = 0.005


class ServingError(Exception):
    """The server cannot listen on its address, did not start, or did not stop."""


class PortInUseError(ServingError):
    """The requested port is already taken: pick another (or 0 for an ephemeral one)."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(f"port {port} on {host} is in use")
        self.host = host
        self.port = port


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


class _AbortableHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, adding :data:`ABORT_CONNECTION_EXTENSION` to every request scope."""

    def on_message_begin(self) -> None:
        super().on_message_begin()
        extensions = self.scope.setdefault("extensions", {})
        extensions[ABORT_CONNECTION_EXTENSION] = {"abort": self._reset}

    def _reset(self) -> None:
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            # Linger on, timeout 0: closing sends RST instead of FIN, as a crashed peer's kernel would.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        self.transport.abort()


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
    ) -> None:
        """Start serving and wait until the server accepts connections.

        Args:
            app: the ASGI application.
            sock: a bound, listening socket (see :func:`bind_listening_socket`).
            name: names the thread, for logs and debuggers.
            lifespan: uvicorn's lifespan mode; ``"on"`` makes a failing app startup a :class:`ServingError`.
            graceful_shutdown_s: how long :meth:`close` lets in-flight requests finish before cancelling them.
            startup_timeout_s: how long to wait for the server to start.

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
                    http=_AbortableHttpToolsProtocol,
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

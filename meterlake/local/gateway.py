"""The local API gateway: plays Amazon API Gateway (REST API, one stage, Cognito authorizer) on loopback.

Every request to the API writes exactly one access-log line, rendered from ``meterlake.records`` as API Gateway
renders the stage's format. The user pool's JWKS document is served too but, like Cognito's, it is not part of the
metered API, so it is not access-logged.

Lines go through :class:`AccessLogWriter`, which hands them to the delivery stream in batches from one background
thread: the stream fsyncs, which must never happen on the event loop, let alone once per request.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import hashlib
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Protocol

import msgspec
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from meterlake.config import Config
from meterlake.demo_api import RANDOM_STRINGS_RESOURCE, BadParameterError, random_strings
from meterlake.local.auth import JWKS_PATH, IdTokenClaims, InvalidToken, UserPool, for_config
from meterlake.local.home import DataDir
from meterlake.local.serving import BackgroundServer, ServingError, bind_listening_socket
from meterlake.records import render_access_log_line

logger = logging.getLogger(__name__)

#: ``$context.apiId`` of the local REST API.
LOCAL_API_ID = "local"
#: API Gateway's response header carrying ``$context.requestId``.
REQUEST_ID_HEADER = "x-amzn-RequestId"
#: API Gateway's response header naming the error type of a request it refused itself.
ERROR_TYPE_HEADER = "x-amzn-ErrorType"

_EXCHANGE = "meterlake.exchange"
_JSON = "application/json"
_STARTUP_TIMEOUT_SECONDS = 10.0
_SHUTDOWN_TIMEOUT_SECONDS = 10.0
#: How long uvicorn lets in-flight requests finish on shutdown before cancelling them.
_GRACEFUL_SHUTDOWN_SECONDS = 5


class GatewayError(Exception):
    """The gateway cannot start (e.g. its port is taken) or did not stop."""


class AccessLogDeliveryError(Exception):
    """Access-log lines were not handed to the sink in time; they are still held in memory for retry."""

    def __init__(self, pending: int, last_error: BaseException | None) -> None:
        cause = f"; last sink error: {last_error!r}" if last_error is not None else ""
        super().__init__(f"{pending} access-log lines not yet delivered{cause}")
        self.pending = pending
        self.last_error = last_error


class AccessLogSink(Protocol):
    """Where access-log lines go: the local delivery stream (Firehose's PutRecordBatch in the cloud)."""

    def put_records(self, lines: Sequence[bytes]) -> None:
        """Durably accept ``lines``, or raise; may block (it fsyncs)."""


class AccessLogWriter:
    """Batches lines from the event loop and hands them to the sink from one background thread.

    A batch is sent when ``max_batch`` lines are waiting or ``max_delay`` seconds after its first line. A failing
    sink is logged and retried with backoff; its lines stay queued, in order, until it accepts them.
    """

    def __init__(self, sink: AccessLogSink, *, max_batch: int = 500, max_delay: float = 0.02) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self._sink = sink
        self._max_batch = max_batch
        self._max_delay = max_delay
        self._cond = threading.Condition()
        self._pending: collections.deque[bytes] = collections.deque()
        self._enqueued = 0
        self._delivered = 0
        self._hurry = 0  # number of drain() calls waiting: send without waiting for a batch to fill
        self._closing = False
        self._last_error: BaseException | None = None
        self._thread: threading.Thread | None = None

    @property
    def pending(self) -> int:
        """Lines enqueued but not yet accepted by the sink."""
        with self._cond:
            return self._enqueued - self._delivered

    def put(self, line: bytes) -> None:
        """Queue one line; never blocks on the sink.

        Raises:
            RuntimeError: the writer was closed.
        """
        with self._cond:
            if self._closing:
                raise RuntimeError("access-log writer is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="access-log-writer", daemon=True)
                self._thread.start()
            self._pending.append(line)
            self._enqueued += 1
            # Wake the thread only when it waits for a first line or a batch just filled: a wake-up per line
            # would hand the GIL back and forth with the event loop on every request.
            if len(self._pending) == 1 or len(self._pending) == self._max_batch:
                self._cond.notify_all()

    def drain(self, timeout: float) -> None:
        """Block until every line queued so far was accepted by the sink.

        Raises:
            AccessLogDeliveryError: not done within ``timeout`` seconds (the sink is failing or too slow).
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            target = self._enqueued
            self._hurry += 1
            self._cond.notify_all()
            try:
                while self._delivered < target:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise AccessLogDeliveryError(self._enqueued - self._delivered, self._last_error)
                    self._cond.wait(remaining)
            finally:
                self._hurry -= 1

    def close(self, timeout: float) -> None:
        """Refuse new lines, deliver the queued ones, stop the thread (idempotent).

        Raises:
            AccessLogDeliveryError: lines were still undelivered after ``timeout`` seconds; the thread keeps trying.
        """
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self.drain(timeout)
        thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def _run(self) -> None:
        backoff = 0.0
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._sink.put_records(batch)
            except Exception as exc:
                backoff = min(max(backoff * 2, 0.05), 2.0)
                logger.exception(
                    "access-log sink refused %d lines; keeping them and retrying in %.2f s", len(batch), backoff
                )
                with self._cond:
                    self._last_error = exc
                    self._pending.extendleft(reversed(batch))
                time.sleep(backoff)
                continue
            backoff = 0.0
            with self._cond:
                self._delivered += len(batch)
                self._last_error = None
                self._cond.notify_all()

    def _next_batch(self) -> list[bytes] | None:
        """Wait for lines, give a batch ``max_delay`` to fill, and take it; None once closed and empty."""
        with self._cond:
            while not self._pending:
                if self._closing:
                    return None
                self._cond.wait()
            deadline = time.monotonic() + self._max_delay
            while len(self._pending) < self._max_batch and not self._closing and not self._hurry:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            count = min(len(self._pending), self._max_batch)
            return [self._pending.popleft() for _ in range(count)]


class _Exchange:
    """One API request as the access log sees it; the routing and authorizer layers fill in what they learn."""

    __slots__ = (
        "claims",
        "integration_latency_ms",
        "request_id",
        "request_time_ms",
        "resource_path",
        "response_length",
        "started_ns",
        "status",
    )

    def __init__(self) -> None:
        self.request_time_ms = time.time_ns() // 1_000_000
        self.started_ns = time.perf_counter_ns()
        self.request_id = str(uuid.uuid4())
        self.claims: IdTokenClaims | None = None
        self.resource_path: str | None = None
        self.integration_latency_ms: int | None = None
        self.status: int | None = None
        self.response_length = 0


class AccessLogMiddleware:
    """Pure ASGI middleware writing exactly one access-log line per API request, once its response is complete.

    The line is queued just before the response's last body chunk goes to the server, so a client holding a
    response can rely on :meth:`AccessLogWriter.drain` covering it. The middleware is also the API's error
    boundary: an exception before the response started becomes API Gateway's 500 ``Internal server error``.
    """

    def __init__(self, app: ASGIApp, *, writer: AccessLogWriter, stage: str, unlogged_paths: Iterable[str]) -> None:
        self._app = app
        self._writer = writer
        self._stage = stage
        self._stage_root = f"/{stage}"
        self._unlogged_paths = frozenset(unlogged_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self._unlogged_paths:
            await self._app(scope, receive, send)
            return
        path = scope["path"]
        if path != self._stage_root and not path.startswith(self._stage_root + "/"):
            # A path outside the stage names a stage the API does not have: API Gateway answers 403 Forbidden,
            # and no stage writes an access-log line for it (the request reaches no stage).
            await _send_json(send, 403, {"message": "Forbidden"}, error_type="ForbiddenException")
            return
        exchange = _Exchange()
        scope[_EXCHANGE] = exchange
        request_id_header = (REQUEST_ID_HEADER.encode("latin-1"), exchange.request_id.encode("latin-1"))
        logged = False

        async def send_logged(message: Message) -> None:
            nonlocal logged
            if message["type"] == "http.response.start":
                exchange.status = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), request_id_header]}
            elif message["type"] == "http.response.body":
                exchange.response_length += len(message.get("body", b""))
                if not message.get("more_body", False) and not logged:
                    logged = True
                    self._log(scope, exchange)
            await send(message)

        failure: Exception | None = None
        response_started = False
        try:
            try:
                await self._app(scope, receive, send_logged)
            except Exception as exc:
                failure = exc
                logger.exception("request %s %s failed", scope["method"], scope["path"])
            response_started = exchange.status is not None
            if not response_started:
                await _send_json(send_logged, 500, {"message": "Internal server error"})
        finally:
            if not logged:  # the response never completed (failed midway, or the request was cancelled)
                self._log(scope, exchange)
        if failure is not None and response_started:
            # The response had started when the app failed: let the server abort the connection.
            raise failure

    def _log(self, scope: Scope, exchange: _Exchange) -> None:
        claims = exchange.claims
        line = render_access_log_line(
            {
                "request_id": exchange.request_id,
                "api_id": LOCAL_API_ID,
                "stage": self._stage,
                "tenant_id": claims.tenant_id if claims else None,
                "user": claims.user if claims else None,
                "client_id": claims.client_id if claims else None,
                "ip": scope["client"][0] if scope.get("client") else None,
                "user_agent": _header(scope, b"user-agent"),
                "request_time": exchange.request_time_ms,
                "http_method": scope["method"],
                "resource_path": exchange.resource_path,
                "path": scope.get("raw_path", scope["path"].encode()).decode("latin-1"),
                "status": exchange.status,
                "protocol": f"HTTP/{scope['http_version']}",
                "response_length": exchange.response_length,
                "response_latency_ms": (time.perf_counter_ns() - exchange.started_ns) // 1_000_000,
                "integration_latency_ms": exchange.integration_latency_ms,
            }
        )
        self._writer.put(line)


class _ApiResource(Route):
    """A REST API resource under the stage: answers only its own methods (no implicit HEAD), records its path."""

    methods: set[str]

    def __init__(self, *, stage: str, resource_path: str, endpoint: Callable[[Request], Awaitable[Response]]) -> None:
        super().__init__(f"/{stage}{resource_path}", endpoint, methods=["GET"])
        self.methods = {"GET"}
        self.resource_path = resource_path

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        # A method the resource does not have matches nothing, and API Gateway logs no resource path for it.
        if scope["method"] in self.methods:
            exchange: _Exchange = scope[_EXCHANGE]
            exchange.resource_path = self.resource_path
        await super().handle(scope, receive, send)


class GatewayApp(Starlette):
    """The gateway's Starlette app; ``access_log_writer`` is how its owner drains the access log."""

    access_log_writer: AccessLogWriter


def create_gateway_app(*, config: Config, user_pool: UserPool, access_log: AccessLogSink) -> GatewayApp:
    """Build the API (stage ``config.meterlake.api_stage``) and the pool's JWKS route, logging to ``access_log``.

    The writer's thread starts with the first request and is closed (drained) at lifespan shutdown.
    """
    stage = config.meterlake.api_stage
    writer = AccessLogWriter(access_log)
    jwks_path = f"/{config.meterlake.local.user_pool_id}{JWKS_PATH}"
    jwks_body = msgspec.json.encode(user_pool.jwks())

    async def jwks(_: Request) -> Response:
        return Response(jwks_body, media_type=_JSON)

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(writer.close, _SHUTDOWN_TIMEOUT_SECONDS)

    app = GatewayApp(
        routes=[
            _ApiResource(
                stage=stage,
                resource_path=RANDOM_STRINGS_RESOURCE,
                endpoint=_cognito_authorized(user_pool, _random_strings),
            ),
            Route(jwks_path, jwks, methods=["GET"]),
        ],
        middleware=[Middleware(AccessLogMiddleware, writer=writer, stage=stage, unlogged_paths=[jwks_path])],
        # Starlette's routing failures: 404 unknown path, 405 a method the resource does not have.
        exception_handlers={404: _missing_route, 405: _missing_route},
        lifespan=lifespan,
    )
    app.access_log_writer = writer
    return app


def _cognito_authorized(
    user_pool: UserPool, integration: Callable[[Request], Awaitable[Response]]
) -> Callable[[Request], Awaitable[Response]]:
    """Wrap an integration in a Cognito user-pool authorizer: a valid ID token in ``Authorization``, or 401."""

    async def authorized(request: Request) -> Response:
        exchange: _Exchange = request.scope[_EXCHANGE]
        token = _bearer_token(request.headers.get("authorization"))
        if token is None:
            logger.debug("401: no Authorization header")
            return _json_response(401, {"message": "Unauthorized"})
        try:
            exchange.claims = user_pool.verify_id_token(token)
        except InvalidToken as exc:
            logger.debug("401: %s", exc.reason)
            return _json_response(401, {"message": "Unauthorized"})
        started = time.perf_counter_ns()
        try:
            return await integration(request)
        finally:
            exchange.integration_latency_ms = (time.perf_counter_ns() - started) // 1_000_000

    return authorized


def _bearer_token(header: str | None) -> str | None:
    """The token from ``Authorization``: raw (as Cognito authorizers take it) or ``Bearer <token>``."""
    if header is None:
        return None
    value = header.strip()
    scheme, _, rest = value.partition(" ")
    if scheme.lower() == "bearer":
        value = rest.strip()
    return value or None


async def _random_strings(request: Request) -> Response:
    """The demo API, answered by the same logic as the AWS demo Lambda (``meterlake.demo_api``)."""
    try:
        strings = random_strings(request.query_params)
    except BadParameterError as exc:
        return _json_response(400, {"message": str(exc)})
    return Response(msgspec.json.encode(strings), media_type=_JSON)


async def _missing_route(request: Request, _: Exception) -> Response:
    """API Gateway's answer to a path or method the REST API does not have: a 403, never a 404 or 405.

    No authorizer runs, so the request has no claims. Modelled on what deployed REST APIs answer:
    without ``Authorization``, ``{"message":"Missing Authentication Token"}`` (AWS re:Post knowledge center,
    "api-gateway-authentication-token-errors": "a method or resource that does not exist"). With one, API Gateway
    parses it as a SigV4 signature, fails, and answers IncompleteSignature (awslabs/time-addressable-media-store#8,
    2025, for a method that does not exist). Reports up to 2021 show it quoting the header verbatim ("'<token>' not a
    valid key=value pair (missing equal-sign) in Authorization header: 'Bearer <token>'."); current ones quote it
    hashed, as here, so no token is echoed. Which bytes AWS hashes is undocumented; the header value is hashed here.
    An empty header counts as absent, as in the access log.
    """
    authorization = _header(request.scope, b"authorization")
    if authorization is None:
        error_type, message = "MissingAuthenticationTokenException", "Missing Authentication Token"
    else:
        digest = base64.b64encode(hashlib.sha256(authorization.encode("latin-1")).digest()).decode("ascii")
        error_type = "IncompleteSignatureException"
        message = (
            "Invalid key=value pair (missing equal-sign) in Authorization header "
            f"(hashed with SHA-256 and encoded with Base64): '{digest}'."
        )
    return _json_response(403, {"message": message}, headers={ERROR_TYPE_HEADER: error_type})


def _json_response(status: int, body: object, headers: Mapping[str, str] | None = None) -> Response:
    return Response(msgspec.json.encode(body), status_code=status, media_type=_JSON, headers=headers)


async def _send_json(send: Send, status: int, body: object, *, error_type: str | None = None) -> None:
    payload = msgspec.json.encode(body)
    headers = [(b"content-type", _JSON.encode()), (b"content-length", str(len(payload)).encode())]
    if error_type is not None:
        headers.append((ERROR_TYPE_HEADER.lower().encode(), error_type.encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


def _header(scope: Scope, name: bytes) -> str | None:
    """A request header's value; None when absent or empty, as API Gateway writes ``-`` for both."""
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1") or None
    return None


class GatewayServer:
    """The gateway served by uvicorn on a background thread; running from construction until :meth:`close`.

    The socket is bound first, so the user pool's issuer (and so every token) carries the real, possibly
    ephemeral, port.
    """

    def __init__(
        self, *, config: Config, data_dir: DataDir, access_log: AccessLogSink, port: int | None = None
    ) -> None:
        """Bind, build the user pool and app, and start serving.

        Raises:
            GatewayError: the address cannot be bound or the server did not start.
            SigningKeyError: the user pool's key file cannot be used.
        """
        local = config.meterlake.local
        try:
            sock = bind_listening_socket(local.host, local.port if port is None else port)
        except ServingError as exc:
            raise GatewayError(str(exc)) from None
        try:
            self.port: int = sock.getsockname()[1]
            self.user_pool = for_config(config, data_dir, port=self.port)
            self.issuer = self.user_pool.issuer
            self.app = create_gateway_app(config=config, user_pool=self.user_pool, access_log=access_log)
        except BaseException:
            sock.close()
            raise
        try:
            self._server = BackgroundServer(
                self.app, sock, name="gateway", graceful_shutdown_s=_GRACEFUL_SHUTDOWN_SECONDS
            )
        except ServingError as exc:
            raise GatewayError(f"the gateway did not start: {exc}") from None
        self.invoke_url = f"{self._server.url}/{config.meterlake.api_stage}"

    def drain(self, timeout: float) -> None:
        """Block until every access-log line of the requests answered so far was handed to the sink.

        Raises:
            AccessLogDeliveryError: the sink did not take them within ``timeout`` seconds.
        """
        self.app.access_log_writer.drain(timeout)

    def close(self, timeout: float = _SHUTDOWN_TIMEOUT_SECONDS) -> None:
        """Drain the access log, then stop serving (idempotent).

        Raises:
            AccessLogDeliveryError: lines were still undelivered (the server is stopped anyway).
            GatewayError: the server thread did not stop within ``timeout`` seconds.
        """
        try:
            self.drain(timeout)
        finally:
            try:
                self._server.close(timeout)
            except ServingError as exc:
                raise GatewayError(str(exc)) from None

    def __enter__(self) -> GatewayServer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

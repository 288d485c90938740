"""The local API gateway: plays Amazon API Gateway (REST API, one stage, Cognito authorizer) on loopback.

Every request to the API writes exactly one access-log line, rendered from ``meterlake.records`` as API Gateway
renders the stage's format. The user pool's JWKS document is served too but, like Cognito's, it is not part of the
metered API, so it is not access-logged.

Answered means metered: an answer leaves only once its access-log line is durable. The middleware holds each
response whole (API Gateway buffers an integration's response too), hands its line to :class:`AccessLogWriter` and
sends the response when the delivery stream's put covering that line has returned. The writer's one background
thread puts whatever lines are waiting in one call (one fsync), so concurrent requests share a put: a group commit.
If the line cannot be made durable (the stream raised, e.g. on a full disk), the client gets API Gateway's 503
instead of the success, the writer counts it and says so in the server log, and answers succeed again as soon as the
stream accepts lines.

The gateway also enforces API Gateway's own request limits (:data:`API_GATEWAY_REQUEST_LIMITS`) and answers requests
over them, or not parseable as HTTP/1.1, as API Gateway does; each such answer is access-logged like any other.
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
from dataclasses import dataclass
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
from meterlake.lake.home import DataDir
from meterlake.local.auth import JWKS_PATH, UserPool, for_config
from meterlake.local.authorizers import Authorizer, Refused, authorizer_for
from meterlake.local.serving import (
    BackgroundServer,
    RequestLimits,
    RequestRejection,
    ServingError,
    bind_listening_socket,
    request_rejection,
)
from meterlake.local.stream import RecordTooLargeError
from meterlake.records import FIELDS_BY_NAME, TENANT_FIELD, USER_FIELD, TenantSource, render_access_log_line

logger = logging.getLogger(__name__)

#: ``$context.apiId`` of the local REST API.
LOCAL_API_ID = "local"
#: API Gateway's response header carrying ``$context.requestId``.
REQUEST_ID_HEADER = "x-amzn-RequestId"
#: API Gateway's response header naming the error type of a request it refused itself.
ERROR_TYPE_HEADER = "x-amzn-ErrorType"

#: API Gateway REST's request limits, from "Quotas for configuring and running a REST API in API Gateway"
#: (docs.aws.amazon.com/apigateway/latest/developerguide/api-gateway-execution-service-limits-table.html), none of
#: which can be increased: "Length, in characters, of the URL for a Regional API: 10240" (the stacks deploy a
#: Regional API; the local gateway counts the request target, the part of the URL a request line carries); "Total
#: combined size of all header values, including header names, values, any line terminators, and whitespaces: 10240
#: Bytes"; "Payload size: 10 MB". The page lists no limit on the number of headers: the byte limit bounds it.
API_GATEWAY_REQUEST_LIMITS = RequestLimits(
    max_target_bytes=10_240, max_header_bytes=10_240, max_body_bytes=10 * 1024 * 1024
)

_EXCHANGE = "meterlake.exchange"
#: The access-log field an authorizer fills beside the tenant and the user.
_CLIENT_ID = "client_id"
_JSON = "application/json"
_STARTUP_TIMEOUT_SECONDS = 10.0
_SHUTDOWN_TIMEOUT_SECONDS = 10.0
#: How long uvicorn lets in-flight requests finish on shutdown before cancelling them.
_GRACEFUL_SHUTDOWN_SECONDS = 5
#: Retry backoff of the writer for lines nobody waits for, after a failed put: doubling from the first to the last.
_RETRY_BACKOFF_SECONDS = (0.05, 2.0)
#: How many distinct refusal reasons the server log explains at WARNING; past that, refusals are logged at DEBUG.
_EXPLAINED_REFUSALS_MAX = 100
#: Lines nobody waits for (answers already made unsuccessful, requests never answered) kept for retry at most; on a
#: long outage the oldest are dropped (counted and logged) rather than growing without bound.
_MAX_BACKLOG_LINES = 100_000


class GatewayError(Exception):
    """The gateway cannot start (e.g. its port is taken) or did not stop."""


class AccessLogDeliveryError(Exception):
    """Access-log lines were not handed to the sink in time; they are still held in memory for retry."""

    def __init__(self, pending: int, last_error: BaseException | None) -> None:
        cause = f"; last sink error: {last_error!r}" if last_error is not None else ""
        super().__init__(f"{pending} access-log lines not yet delivered{cause}")
        self.pending = pending
        self.last_error = last_error


class AccessLogNotDurableError(Exception):
    """A request's access-log line could not be made durable, so its answer must not claim success.

    ``cause`` is what the sink raised: a failure of the sink (it may accept lines again later) or a
    :class:`~meterlake.local.stream.RecordTooLargeError` for this very line (it never will).
    """

    def __init__(self, request_id: str, cause: BaseException) -> None:
        super().__init__(f"the access-log line of request {request_id} is not durable: {cause}")
        self.request_id = request_id
        self.cause = cause


class AccessLogSink(Protocol):
    """Where access-log lines go: the local delivery stream (Firehose's PutRecordBatch in the cloud)."""

    def put_records(self, lines: Sequence[bytes]) -> None:
        """Durably accept all of ``lines``, or raise having accepted none; may block (it fsyncs).

        Raises:
            RecordTooLargeError: ``lines[index]`` can never be accepted; the others may be put again without it.
            Exception: any other failure; the same lines may be put again later.
        """


@dataclass(frozen=True, slots=True)
class AccessLogStats:
    """What an :class:`AccessLogWriter` did since it started, in lines."""

    #: Accepted by the sink.
    delivered: int
    #: Refused by the sink for good (too large), set aside and logged at ERROR with their request id.
    refused: int
    #: Lines of answers that were withheld (answered 503 instead) because the sink failed.
    not_durable: int
    #: Lines nobody waited for that were dropped because the retry backlog was full.
    dropped: int
    #: Waiting: commits in flight and the retry backlog.
    pending: int


class _Entry:
    """One line in the writer, with the future of the request waiting for it (None: nobody waits)."""

    __slots__ = ("future", "line", "loop", "request_id", "seq")

    def __init__(
        self,
        line: bytes,
        request_id: str,
        future: asyncio.Future[None] | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.seq = 0  # order of arrival, set when queued
        self.line = line
        self.request_id = request_id
        self.future = future
        self.loop = loop


class AccessLogWriter:
    """Hands access-log lines to the sink from one background thread, in group commits.

    :meth:`commit` returns once the put covering its line returned: every line waiting when a put starts goes into
    that put, so concurrent requests share one fsync. A sink failure fails the commits of that put at once (their
    answers become 503s); lines nobody waits for (:meth:`put`) are kept in order and retried with backoff until the
    sink accepts them. A line the sink refuses for good (:class:`RecordTooLargeError` names it) is set aside, counted
    and logged with its request id, and the rest of its batch is put again without it: one line never blocks others.
    """

    def __init__(self, sink: AccessLogSink, *, max_batch: int = 500, max_backlog: int = _MAX_BACKLOG_LINES) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if max_backlog < 1:
            raise ValueError(f"max_backlog must be at least 1, got {max_backlog}")
        self._sink = sink
        self._max_batch = max_batch
        self._max_backlog = max_backlog
        self._cond = threading.Condition()
        self._commits: collections.deque[_Entry] = collections.deque()
        self._backlog: collections.deque[_Entry] = collections.deque()
        self._in_flight: list[_Entry] = []  # the batch being put
        self._retry_at = 0.0
        self._backoff = 0.0
        self._enqueued = 0
        self._settled = 0  # delivered + refused + not durable + dropped
        self._delivered = 0
        self._refused = 0
        self._not_durable = 0
        self._dropped = 0
        self._failing = False
        self._closing = False
        self._last_error: BaseException | None = None
        self._thread: threading.Thread | None = None

    @property
    def pending(self) -> int:
        """Lines handed to the writer and not yet settled (delivered, refused, withheld or dropped)."""
        with self._cond:
            return self._enqueued - self._settled

    def stats(self) -> AccessLogStats:
        """Counts of what the writer did so far."""
        with self._cond:
            return AccessLogStats(
                delivered=self._delivered,
                refused=self._refused,
                not_durable=self._not_durable,
                dropped=self._dropped,
                pending=self._enqueued - self._settled,
            )

    async def commit(self, line: bytes, request_id: str) -> None:
        """Return once ``line`` is durable: the sink's put that covered it returned.

        Raises:
            AccessLogNotDurableError: the sink raised for the put covering ``line``; nothing of it is durable.
            RuntimeError: the writer was closed.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._enqueue(_Entry(line, request_id, future, loop), self._commits)
        await future

    def put(self, line: bytes, request_id: str) -> None:
        """Queue a line nobody waits for; it is retried until the sink accepts it. Never blocks on the sink.

        Raises:
            RuntimeError: the writer was closed.
        """
        self._enqueue(_Entry(line, request_id), self._backlog)

    def drain(self, timeout: float) -> None:
        """Block until every line handed over so far is settled: delivered, or refused, withheld or dropped.

        Raises:
            AccessLogDeliveryError: not done within ``timeout`` seconds (the sink is failing or too slow).
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            target = self._enqueued
            while (oldest := self._oldest_unsettled()) is not None and oldest < target:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AccessLogDeliveryError(self._enqueued - self._settled, self._last_error)
                self._cond.wait(remaining)

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

    def _oldest_unsettled(self) -> int | None:
        """Arrival number of the oldest line not settled yet; None when all are. Called with the lock held."""
        heads = [queue[0].seq for queue in (self._commits, self._backlog) if queue]
        heads += [entry.seq for entry in self._in_flight[:1]]
        return min(heads, default=None)

    def _enqueue(self, entry: _Entry, queue: collections.deque[_Entry]) -> None:
        with self._cond:
            if self._closing:
                raise RuntimeError("access-log writer is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="access-log-writer", daemon=True)
                self._thread.start()
            entry.seq = self._enqueued
            queue.append(entry)
            self._enqueued += 1
            dropped = self._trim_backlog()
            self._cond.notify_all()
        _log_dropped(dropped, self._max_backlog)

    def _trim_backlog(self) -> list[_Entry]:
        """Drop the oldest backlog lines beyond ``max_backlog``; return them. Called with the lock held."""
        dropped = [self._backlog.popleft() for _ in range(len(self._backlog) - self._max_backlog)]
        self._dropped += len(dropped)
        self._settled += len(dropped)
        return dropped

    def _run(self) -> None:
        while True:
            with self._cond:
                batch = self._next_batch()
            if batch is None:
                return
            self._deliver(batch)

    def _next_batch(self) -> list[_Entry] | None:
        """Waiting commits, topped up with backlog lines once their backoff passed; None once closed and empty.

        Backlog lines ride along with commits rather than after them, so a steady stream of commits cannot starve
        them. Called with the lock held.
        """
        while True:
            backlog_due = bool(self._backlog) and time.monotonic() >= self._retry_at
            if self._commits or backlog_due:
                batch = self._take(self._commits, self._max_batch)
                if backlog_due:
                    batch += self._take(self._backlog, self._max_batch - len(batch))
                batch.sort(key=lambda entry: entry.seq)
                self._in_flight = batch
                return batch
            if self._backlog:
                self._cond.wait(self._retry_at - time.monotonic())
            elif self._closing:
                return None
            else:
                self._cond.wait()

    @staticmethod
    def _take(queue: collections.deque[_Entry], count: int) -> list[_Entry]:
        return [queue.popleft() for _ in range(min(len(queue), count))]

    def _deliver(self, batch: list[_Entry]) -> None:
        while batch:
            try:
                self._sink.put_records([entry.line for entry in batch])
            except RecordTooLargeError as exc:
                if not 0 <= exc.index < len(batch):
                    self._failed(batch, exc)
                    return
                self._set_aside(batch, exc)
                continue
            except Exception as exc:
                self._failed(batch, exc)
                return
            self._accepted(batch)
            return

    def _accepted(self, batch: list[_Entry]) -> None:
        with self._cond:
            self._delivered += len(batch)
            self._settled += len(batch)
            self._in_flight = []
            recovered, self._failing = self._failing, False
            self._backoff = self._retry_at = 0.0
            self._last_error = None
            withheld = self._not_durable
            self._cond.notify_all()
        if recovered:
            logger.warning(
                "access-log sink accepts lines again; %d answers so far were withheld (503) while lines failed",
                withheld,
            )
        _settle(batch, None)

    def _failed(self, batch: list[_Entry], exc: Exception) -> None:
        """Fail the commits of ``batch`` (their answers become 503s); put its other lines back for a retry."""
        waited_for = [entry for entry in batch if entry.future is not None]
        retried = [entry for entry in batch if entry.future is None]
        with self._cond:
            self._last_error = exc
            started, self._failing = not self._failing, True
            self._not_durable += len(waited_for)
            self._settled += len(waited_for)
            self._in_flight = []
            dropped: list[_Entry] = []
            if retried:
                self._backlog.extendleft(reversed(retried))
                dropped = self._trim_backlog()
                low, high = _RETRY_BACKOFF_SECONDS
                self._backoff = min(max(self._backoff * 2, low), high)
                self._retry_at = time.monotonic() + self._backoff
            self._cond.notify_all()
        _log_dropped(dropped, self._max_backlog)
        if started:
            logger.error(
                "access-log sink failed (%s): answering 503 until it accepts lines again; lines of requests already "
                "answered are kept and retried",
                exc,
            )
        else:
            logger.debug("access-log sink still failing (%s) for %d lines", exc, len(batch))
        _settle(waited_for, exc)

    def _set_aside(self, batch: list[_Entry], exc: RecordTooLargeError) -> None:
        """Take the line ``exc`` names out of ``batch`` (the batch in flight) for good."""
        with self._cond:
            entry = batch.pop(exc.index)
            self._refused += 1
            self._settled += 1
            self._cond.notify_all()
        logger.error(
            "access-log line of request %s refused for good by the sink (%s): set aside, the other lines go on",
            entry.request_id,
            exc,
        )
        _settle([entry], exc)


def _log_dropped(dropped: list[_Entry], max_backlog: int) -> None:
    for entry in dropped:
        logger.error(
            "access-log backlog full (%d lines): dropped the line of request %s", max_backlog, entry.request_id
        )


def _settle(entries: Iterable[_Entry], error: BaseException | None) -> None:
    """Resolve the futures of ``entries`` on their event loops: done, or failed with ``error``. Called off-loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list[_Entry]] = {}
    for entry in entries:
        if entry.loop is not None:
            by_loop.setdefault(entry.loop, []).append(entry)
    for loop, waiting in by_loop.items():
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(_resolve, waiting, error)


def _resolve(entries: list[_Entry], error: BaseException | None) -> None:
    for entry in entries:
        future = entry.future
        if future is None or future.done():  # cancelled: the request is gone
            continue
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(AccessLogNotDurableError(entry.request_id, error))


@dataclass(frozen=True, slots=True)
class _Answer:
    """A whole response as the gateway sends it: status, headers (the request id is added on sending), body."""

    status: int
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes


def _api_gateway_error(status: int, message: str, error_type: str | None = None) -> _Answer:
    """API Gateway's error answer: ``{"message": ...}`` as JSON, with ``x-amzn-ErrorType`` when it sends one."""
    body = msgspec.json.encode({"message": message})
    headers = [(b"content-type", _JSON.encode()), (b"content-length", str(len(body)).encode())]
    if error_type is not None:
        headers.append((ERROR_TYPE_HEADER.lower().encode(), error_type.encode()))
    return _Answer(status, tuple(headers), body)


#: API Gateway's answers to requests its front end refuses, before any resource, authorizer or gateway response of
#: the API runs (so without ``x-amzn-ErrorType``, which comes with an API's gateway responses):
#:
#: - headers over the limit: 431, as deployed REST APIs answered an oversized ``Cookie`` header (backbencher.dev,
#:   "SOLVED: 431 Status Code With Request Header Fields Too Large", 2023), with the message "HTTP header is larger
#:   than 10240 bytes." that users of API Gateway report (ntsblog.homedev.com.au, "AWS API Gateway - HTTP header is
#:   larger than 10240 bytes.", 2021);
#: - URL over the limit: "414 Request URI too long", the answer the quota page documents for a path over the
#:   method ARN's length;
#: - body over the limit: 413, the REQUEST_TOO_LARGE gateway response ("Gateway response types for API Gateway";
#:   it cannot be customised), with the message "Request Too Long" of AWS's own REST API emulator
#:   (aws/aws-lambda-dotnet, Amazon.Lambda.TestTool, ``ToHttpApiRequestTooLargeResponse``);
#: - not parseable as HTTP/1.1: no source shows API Gateway's answer; modelled as a bare 400 "Bad Request".
_REFUSALS: Mapping[RequestRejection, _Answer] = {
    RequestRejection.HEADERS_TOO_LARGE: _api_gateway_error(
        431, f"HTTP header is larger than {API_GATEWAY_REQUEST_LIMITS.max_header_bytes} bytes."
    ),
    RequestRejection.TARGET_TOO_LONG: _api_gateway_error(414, "Request URI too long"),
    RequestRejection.BODY_TOO_LARGE: _api_gateway_error(413, "Request Too Long"),
    RequestRejection.MALFORMED: _api_gateway_error(400, "Bad Request"),
}
#: API Gateway's answer to a path outside the stage: a stage the API does not have.
_FORBIDDEN = _api_gateway_error(403, "Forbidden", "ForbiddenException")
#: API Gateway's answer to a failure inside the API (the authorizer or the integration raised).
_INTERNAL_SERVER_ERROR = _api_gateway_error(500, "Internal server error")
#: The answer when a request's access-log line cannot be made durable: API Gateway's 503, ``{"message":"Service
#: Unavailable"}`` as a deployed API answered it (cortexlabs/cortex#1225, 2020). Its error type follows API Gateway's
#: naming of the errors it raises itself (``<Reason>Exception``); no source shows the header on a 503.
_SERVICE_UNAVAILABLE = _api_gateway_error(503, "Service Unavailable", "ServiceUnavailableException")


class _Exchange:
    """One API request as the access log sees it; the routing and authorizer layers fill in what they learn."""

    __slots__ = (
        "context",
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
        #: The ``$context`` variables the authorizer filled (none until it ran and let the request through).
        self.context: Mapping[str, str] = {}
        self.resource_path: str | None = None
        self.integration_latency_ms: int | None = None
        self.status: int | None = None
        self.response_length = 0


class _ResponseBuffer:
    """Collects an ASGI response whole, as API Gateway buffers an integration's response before answering."""

    def __init__(self) -> None:
        self.status: int | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = bytearray()
        self.complete = False

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            self.headers = list(message.get("headers", ()))
        elif message["type"] == "http.response.body" and self.status is not None and not self.complete:
            self.body += message.get("body", b"")
            self.complete = not message.get("more_body", False)

    def answer(self) -> _Answer | None:
        """The response, once the app sent all of it."""
        if self.status is None or not self.complete:
            return None
        return _Answer(self.status, tuple(self.headers), bytes(self.body))


class AccessLogMiddleware:
    """Pure ASGI middleware answering each API request only once its one access-log line is durable.

    The app's response is held whole; its line is committed through the :class:`AccessLogWriter`, then the response
    is sent. When the line cannot be made durable the client gets API Gateway's 503 instead, and the 503's own line
    is queued for retry. Requests the server refused (see :mod:`meterlake.local.serving`) are answered here as API
    Gateway's front end answers them, without running the API. The middleware is also the API's error boundary: an
    exception in the app becomes API Gateway's 500 ``Internal server error``.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        writer: AccessLogWriter,
        stage: str,
        unlogged_paths: Iterable[str],
        tenant_source: TenantSource,
    ) -> None:
        self._app = app
        self._writer = writer
        self._stage = stage
        self._source = tenant_source
        self._stage_root = f"/{stage}"
        self._unlogged_paths = frozenset(unlogged_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        rejection = request_rejection(scope)
        if rejection is None:
            if scope["path"] in self._unlogged_paths:
                await self._app(scope, receive, send)
                return
            path = scope["path"]
            if path != self._stage_root and not path.startswith(self._stage_root + "/"):
                # A path outside the stage names a stage the API does not have: API Gateway answers 403 Forbidden,
                # and no stage writes an access-log line for it (the request reaches no stage).
                await _send_answer(send, _FORBIDDEN)
                return
        exchange = _Exchange()
        scope[_EXCHANGE] = exchange
        line_queued = False
        try:
            answer = _REFUSALS[rejection] if rejection is not None else await self._integrate(scope, receive)
            exchange.status, exchange.response_length = answer.status, len(answer.body)
            line = self._line(scope, exchange)
            line_queued = True
            try:
                await self._writer.commit(line, exchange.request_id)
            except AccessLogNotDurableError as exc:
                logger.debug("request %s answered 503: %s", exchange.request_id, exc)
                answer = _SERVICE_UNAVAILABLE
                exchange.status, exchange.response_length = answer.status, len(answer.body)
                self._writer.put(self._line(scope, exchange), exchange.request_id)
            await _send_answer(send, answer, request_id=exchange.request_id)
        finally:
            if not line_queued:  # never answered (the request was cancelled): still one line, without a status
                self._writer.put(self._line(scope, exchange), exchange.request_id)

    async def _integrate(self, scope: Scope, receive: Receive) -> _Answer:
        """Run the API (authorizer and integration) and return its whole response, or API Gateway's 500."""
        buffer = _ResponseBuffer()
        try:
            await self._app(scope, receive, buffer.send)
        except Exception:
            logger.exception("request %s %s failed", scope["method"], scope["path"])
            return _INTERNAL_SERVER_ERROR
        answer = buffer.answer()
        if answer is None:
            logger.error("request %s %s: the app returned without a complete response", scope["method"], scope["path"])
            return _INTERNAL_SERVER_ERROR
        return answer

    def _line(self, scope: Scope, exchange: _Exchange) -> bytes:
        context = exchange.context
        return render_access_log_line(
            {
                "request_id": exchange.request_id,
                "api_id": LOCAL_API_ID,
                "stage": self._stage,
                TENANT_FIELD: context.get(self._source.tenant_variable),
                USER_FIELD: context.get(self._source.user_variable),
                _CLIENT_ID: context.get(FIELDS_BY_NAME[_CLIENT_ID].context_variable),
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


async def _send_answer(send: Send, answer: _Answer, *, request_id: str | None = None) -> None:
    headers = list(answer.headers)
    if request_id is not None:
        headers.append((REQUEST_ID_HEADER.encode("latin-1"), request_id.encode("latin-1")))
    await send({"type": "http.response.start", "status": answer.status, "headers": headers})
    await send({"type": "http.response.body", "body": answer.body})


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


def create_gateway_app(
    *, config: Config, user_pool: UserPool, access_log: AccessLogSink, authorizer: Authorizer | None = None
) -> GatewayApp:
    """Build the API (stage ``config.meterlake.api_stage``) and the pool's JWKS route, logging to ``access_log``.

    ``authorizer`` guards the API; None: the configured tenant source's (:func:`authorizer_for`).

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
                endpoint=_authorized(authorizer or authorizer_for(config, user_pool), _random_strings),
            ),
            Route(jwks_path, jwks, methods=["GET"]),
        ],
        middleware=[
            Middleware(
                AccessLogMiddleware,
                writer=writer,
                stage=stage,
                unlogged_paths=[jwks_path],
                tenant_source=config.meterlake.tenant_source.source(),
            )
        ],
        # Starlette's routing failures: 404 unknown path, 405 a method the resource does not have.
        exception_handlers={404: _missing_route, 405: _missing_route},
        lifespan=lifespan,
    )
    # API Gateway does not redirect: a path with a trailing slash is a resource the API does not have. Starlette's
    # redirect would also build its Location from the client's Host header.
    app.router.redirect_slashes = False
    app.access_log_writer = writer
    return app


def _authorized(
    authorizer: Authorizer, integration: Callable[[Request], Awaitable[Response]]
) -> Callable[[Request], Awaitable[Response]]:
    """Wrap an integration in the stage's authorizer: what it fills joins the request's ``$context``, or it refuses."""

    explained: set[str] = set()

    async def authorized(request: Request) -> Response:
        exchange: _Exchange = request.scope[_EXCHANGE]
        try:
            exchange.context = authorizer.authorize(request.headers)
        except Refused as refused:
            # The operator learns why (a token for another gateway's issuer, an expired one, ...) from the server log,
            # once per reason so a flood of refusals cannot flood the log; the client only gets API Gateway's answer.
            first = refused.reason not in explained and len(explained) < _EXPLAINED_REFUSALS_MAX
            if first:
                explained.add(refused.reason)
            logger.log(
                logging.WARNING if first else logging.DEBUG,
                "request %s answered %d: %s%s",
                exchange.request_id,
                refused.status,
                refused.reason,
                " (further requests refused for this reason are logged at DEBUG)" if first else "",
            )
            return _json_response(
                refused.status, {"message": refused.message}, headers={ERROR_TYPE_HEADER: refused.error_type}
            )
        started = time.perf_counter_ns()
        try:
            return await integration(request)
        finally:
            exchange.integration_latency_ms = (time.perf_counter_ns() - started) // 1_000_000

    return authorized


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
                self.app,
                sock,
                name="gateway",
                graceful_shutdown_s=_GRACEFUL_SHUTDOWN_SECONDS,
                limits=API_GATEWAY_REQUEST_LIMITS,
            )
        except ServingError as exc:
            raise GatewayError(f"the gateway did not start: {exc}") from None
        self.invoke_url = f"{self._server.url}/{config.meterlake.api_stage}"

    def access_log_stats(self) -> AccessLogStats:
        """What the access-log writer did so far: lines delivered, refused, withheld (503) and dropped."""
        return self.app.access_log_writer.stats()

    def drain(self, timeout: float) -> None:
        """Block until every access-log line handed over so far is settled (delivered, or refused or withheld).

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

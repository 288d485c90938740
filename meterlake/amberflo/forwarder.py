"""The Amberflo forwarder: POSTs batches of meter records to Amberflo's ingest API until each gets a final answer.

One forwarder for both runtimes (the local process and AWS Lambda). It speaks the contract in
``/work/shared/notes/amberflo-api.md`` directly rather than through Amberflo's SDK, which drops records when its
queue is full or its retries run out and sets no timeouts:

- at most 100 records per request, gzip-compressed JSON array, ``X-API-KEY`` header;
- bounded connect and read timeouts;
- HTTP through httpcore, httpx's transport, one keep-alive connection per sending thread (and the environment's
  proxy, as httpx would use it), with requests built once per batch: httpx's request/response models and httpcore's
  pool bookkeeping cost as much client CPU as the rest together;
- gzip through ISA-L (``isal``), a drop-in deflate three to four times faster than zlib at a smaller output;
- 429, 5xx, network errors and timeouts are transient: retried with full-jitter exponential backoff, waiting at
  least what ``Retry-After`` asks, for ``give_up_after_s`` (well past Amberflo's advised 20 s); then the batch is
  :class:`GaveUp` and stays with the caller to be tried again later, never dropped;
- 401 and 403 say the API key is wrong, not that the batch is: :class:`KeyRefused`, the batch stays with the caller
  (forwarding pauses and alerts) and a run starts no further batch;
- 400, 413 and 422 say some records are invalid, and Amberflo refuses the whole request for one of them: the batch
  is split to isolate them (:class:`RecordsRefused`), so one bad record never takes 99 good ones with it;
- any other 4xx (a wrong URL's 404, ...) is permanent and no record explains it: :class:`DeadLetter` carries
  Amberflo's status and body.

Isolation. A refused batch is split and each part sent again with its own retry budget; a part Amberflo refuses
again is split in turn, down to single records, and only a record Amberflo refuses on its own is refused for good.
When the answer names uniqueIds of the part (Amberflo's answers may or may not name the offending record), those
records are tried alone first and the others together; otherwise the part is halved. A wrong hint only costs a
request: the part refused again is split again. k bad records among n cost about 2 k log2(n) requests. Parts sent
before a transient failure or a key refusal interrupted the isolation are sent again with the whole batch later,
and their deterministic uniqueIds make Amberflo drop them as duplicates.

The forwarder does not decide what is sent twice: callers resend the same encoded batch, whose deterministic
uniqueIds let Amberflo drop the duplicates (see ``meterlake.amberflo.outbox``).
"""

from __future__ import annotations

import gzip
import logging
import queue
import random
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import urlsplit
from urllib.request import getproxies, proxy_bypass

import httpcore
import httpx
import msgspec
from isal import isal_zlib

from meterlake.amberflo.api import IngestRecord
from meterlake.amberflo.settings import AmberfloSettings

logger = logging.getLogger(__name__)

#: Every official Amberflo client sends at most this many records per request.
MAX_BATCH_RECORDS = 100
#: How much of a permanent refusal's body is kept with the dead letter.
ANSWER_LIMIT_CHARS = 4096
#: Amberflo refused the API key: forwarding pauses; the batch is not at fault.
KEY_REFUSED_STATUSES = frozenset({401, 403})
#: Amberflo refused the request's content (invalid records, too large): the batch is split to isolate the records.
RECORDS_REFUSED_STATUSES = frozenset({400, 413, 422})
#: ISA-L's level 1: a quarter of zlib level 1's CPU for a smaller body.
_GZIP_LEVEL = 1
#: zlib's ``wbits`` for a gzip container with a 32 KiB window.
_GZIP_WBITS = 31
_USER_AGENT = b"meterlake-forwarder"
#: A connection idle this long is checked (one poll) for a server-side close before it is used again.
_IDLE_CHECK_AFTER_S = 1.0
#: How often forward() looks at the caller's ``halt`` while it waits for answers.
_HALT_POLL_S = 0.05
_JSON_ENCODER = msgspec.json.Encoder()
_DEFAULT_PORTS = {b"http": 80, b"https": 443}

K = TypeVar("K")


class ForwarderClosedError(RuntimeError):
    """The forwarder was closed: it sends nothing more."""

    def __init__(self) -> None:
        super().__init__("the forwarder is closed")


class BatchTooLargeError(ValueError):
    """A batch holds more records than one Amberflo request may carry."""

    def __init__(self, records: int) -> None:
        super().__init__(f"a batch may hold at most {MAX_BATCH_RECORDS} records, got {records}")
        self.records = records


@dataclass(frozen=True, slots=True)
class EncodedBatch:
    """A request body ready to send: the records as a gzip-compressed JSON array, and how many there are."""

    body: bytes
    records: int

    def decode(self) -> list[dict[str, Any]]:
        """The records the body carries."""
        records: list[dict[str, Any]] = msgspec.json.decode(gzip.decompress(self.body))
        return records


def encode_batch(records: Sequence[Mapping[str, Any]] | Sequence[IngestRecord]) -> EncodedBatch:
    """Encode records (Amberflo's JSON shape: dicts, or typed records) as one request body.

    Raises:
        BatchTooLargeError: more than :data:`MAX_BATCH_RECORDS` records.
    """
    if len(records) > MAX_BATCH_RECORDS:
        raise BatchTooLargeError(len(records))
    body = isal_zlib.compress(_JSON_ENCODER.encode(records), _GZIP_LEVEL, _GZIP_WBITS)
    return EncodedBatch(body=body, records=len(records))


@dataclass(frozen=True, slots=True)
class Sent:
    """Amberflo accepted the batch (2xx)."""

    attempts: int


@dataclass(frozen=True, slots=True)
class RefusedRecord:
    """A record Amberflo refused when it was sent on its own: its place in the batch, the record and the answer."""

    index: int
    record: dict[str, Any]
    status: int
    body: str


@dataclass(frozen=True, slots=True)
class RecordsRefused:
    """Amberflo refused the batch's content (400, 413, 422); splitting it isolated the records it refuses on their
    own (``refused``, in batch order). Every other record of the batch was accepted.

    ``attempts`` counts the requests for the batch and all its parts.
    """

    refused: tuple[RefusedRecord, ...]
    attempts: int


@dataclass(frozen=True, slots=True)
class KeyRefused:
    """Amberflo refused the API key (401 or 403): the batch is not at fault and stays to be sent; pause and alert."""

    status: int
    body: str
    attempts: int


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Amberflo refused the batch for good with a 4xx no record explains (e.g. 404): its status and answer say why."""

    status: int
    body: str
    attempts: int


@dataclass(frozen=True, slots=True)
class GaveUp:
    """Transient failures lasted past the retry budget (or the caller halted): the batch is still to be sent."""

    last_error: str
    attempts: int


SendOutcome = Sent | RecordsRefused | KeyRefused | DeadLetter | GaveUp


@dataclass(frozen=True, slots=True)
class _Refusal:
    """A 4xx answer (other than 429) to one request, before send_batch decides what it means for the batch."""

    status: int
    body: str
    attempts: int


@dataclass(slots=True)
class ForwarderStats:
    """Counters since the forwarder was made: batches and records by outcome, retries by cause.

    ``sent_records`` counts every record Amberflo accepted, those of split batches too; ``dead_records`` the records
    refused for good (alone, or in a :class:`DeadLetter` batch); ``split_batches`` the batches split to isolate them.
    """

    sent_batches: int = 0
    sent_records: int = 0
    dead_batches: int = 0
    dead_records: int = 0
    split_batches: int = 0
    key_refusals: int = 0
    gave_up_batches: int = 0
    requests: int = 0
    #: Retries by cause: ``http_429``, ``http_503`` ..., ``timeout``, ``network``.
    retries: dict[str, int] = field(default_factory=dict)

    @property
    def retries_total(self) -> int:
        """All retries, whatever the cause."""
        return sum(self.retries.values())


class _Connection:
    """One sending thread's keep-alive connection to Amberflo (direct, or through the environment's proxy).

    Replaced by a fresh one once it closes (a network error, ``Connection: close``) or, after sitting idle for a
    second or more, once the server has closed it: a keep-alive connection an idle timeout ended (load balancers
    close them after tens of seconds) costs no failed attempt. A close within the second costs one retry.
    """

    def __init__(self, url: httpcore.URL, proxy: str | None, ssl_context: ssl.SSLContext | None) -> None:
        self._url = url
        self._proxy = proxy
        self._ssl_context = ssl_context
        self._connection = self._open()
        self._used_at = time.monotonic()

    def _open(self) -> httpcore.HTTPConnection | httpcore.HTTPProxy:
        if self._proxy is None:
            return httpcore.HTTPConnection(self._url.origin, ssl_context=self._ssl_context)
        return httpcore.HTTPProxy(proxy_url=self._proxy, ssl_context=self._ssl_context, max_connections=1)

    def _usable(self) -> httpcore.HTTPConnection | httpcore.HTTPProxy:
        connection = self._connection
        if isinstance(connection, httpcore.HTTPConnection) and (
            connection.is_closed()
            or (time.monotonic() - self._used_at > _IDLE_CHECK_AFTER_S and connection.has_expired())
        ):
            connection.close()
            connection = self._connection = self._open()
        return connection

    def post(
        self, headers: list[tuple[bytes, bytes]], body: bytes, timeouts: dict[str, float]
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """POST ``body``; the answer's status, headers and body."""
        request = httpcore.Request(b"POST", self._url, headers=headers, content=body, extensions={"timeout": timeouts})
        try:
            response = self._usable().handle_request(request)
            try:
                content = response.read()
            finally:
                response.close()
        finally:
            self._used_at = time.monotonic()
        return response.status, response.headers, content

    def close(self) -> None:
        """Close the connection."""
        self._connection.close()


class _Run:
    """One :meth:`Forwarder.forward` call as the sending threads see it: the batches to pull and where answers go."""

    def __init__(self, batches: Iterator[tuple[Any, EncodedBatch]], api_key: str, halt: threading.Event | None) -> None:
        self.batches = batches
        self.api_key = api_key
        self.halt = halt
        self.lock = threading.Lock()
        #: Set once the run stops: ends the retries of the batches in flight, as the caller's ``halt`` would.
        self.stopping = threading.Event()
        #: ``(key, batch, outcome)`` per answered batch, an exception a sending thread met, or None when one is done.
        self.answers: queue.SimpleQueue[tuple[Any, EncodedBatch, SendOutcome] | BaseException | None] = (
            queue.SimpleQueue()
        )
        self.exhausted = False

    @property
    def stopped(self) -> bool:
        """Whether the run was stopped (a batch gave up, an error, the caller's halt) before its batches ran out."""
        return self.stopping.is_set()

    def stop(self) -> None:
        """Start no further batch and end the retries of those in flight."""
        self.stopping.set()

    def next_batch(self) -> tuple[Any, EncodedBatch] | None:
        """The next batch to send, or None once the batches are exhausted or the run is stopped or halted."""
        with self.lock:
            if self.halt is not None and self.halt.is_set():
                self.stop()
            if self.stopped:
                return None
            item = next(self.batches, None)
            if item is None:
                self.exhausted = True
            return item


class Forwarder:
    """Sends encoded batches to Amberflo's ingest endpoint with retries; thread-safe; close it (or use ``with``)."""

    def __init__(self, settings: AmberfloSettings, *, rng: random.Random | None = None) -> None:
        self.settings = settings
        self._url = httpcore.URL(settings.ingest_url)
        self._host_header = host_header(self._url)
        self._rng = rng or random.Random()
        self._timeouts = {
            "connect": settings.connect_timeout_s,
            "read": settings.read_timeout_s,
            "write": settings.read_timeout_s,
            "pool": settings.connect_timeout_s + settings.read_timeout_s,
        }
        self._proxy = environment_proxy(settings.ingest_url)
        # Loading the CA bundle costs tens of milliseconds: only when TLS is spoken (to Amberflo or to a proxy).
        needs_tls = self._url.scheme == b"https" or (self._proxy or "").startswith("https:")
        self._ssl_context = httpx.create_ssl_context() if needs_tls else None
        self._local = threading.local()
        self._connections: list[_Connection] = []
        # Long-lived sending threads, started on the first forward(), each pulling batches from the run in hand: no
        # per-batch hand-over between threads beyond the answer coming back.
        self._runs: queue.SimpleQueue[_Run | None] = queue.SimpleQueue()
        self._senders: list[threading.Thread] = []
        self._closed = False
        self._lock = threading.Lock()
        self._stats = ForwarderStats()

    def _connection(self) -> _Connection:
        connection: _Connection | None = getattr(self._local, "connection", None)
        if connection is None:
            with self._lock:
                if self._closed:
                    raise ForwarderClosedError
                connection = self._local.connection = _Connection(self._url, self._proxy, self._ssl_context)
                self._connections.append(connection)
        return connection

    def close(self) -> None:
        """Stop the sending threads (after the runs handed to them) and close every thread's connection."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            senders, self._senders = self._senders, []
            # Queued after every run already handed over, under the lock forward() hands runs over with.
            for _ in senders:
                self._runs.put(None)
        for sender in senders:
            sender.join()
        with self._lock:
            connections, self._connections = self._connections, []
        for connection in connections:
            connection.close()

    def __enter__(self) -> Forwarder:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def stats(self) -> ForwarderStats:
        """A copy of the counters."""
        with self._lock:
            return ForwarderStats(
                sent_batches=self._stats.sent_batches,
                sent_records=self._stats.sent_records,
                dead_batches=self._stats.dead_batches,
                dead_records=self._stats.dead_records,
                split_batches=self._stats.split_batches,
                key_refusals=self._stats.key_refusals,
                gave_up_batches=self._stats.gave_up_batches,
                requests=self._stats.requests,
                retries=dict(self._stats.retries),
            )

    def send_batch(self, batch: EncodedBatch, *, api_key: str, halt: threading.Event | None = None) -> SendOutcome:
        """Send one batch until Amberflo gives a final answer for each record, or the retry budget (or ``halt``) ends
        the attempts. A batch Amberflo refuses as invalid is split to isolate the records it refuses (module doc).

        Raises:
            BatchTooLargeError: the batch holds more than :data:`MAX_BATCH_RECORDS` records.
        """
        if batch.records > MAX_BATCH_RECORDS:
            raise BatchTooLargeError(batch.records)
        answer = self._post_until_answered(batch, api_key=api_key, halt=halt)
        if isinstance(answer, _Refusal) and answer.status in RECORDS_REFUSED_STATUSES:
            outcome = self._isolate(batch, answer, api_key=api_key, halt=halt)
        else:
            outcome = self._final(answer)
        self._count_outcome(batch, outcome)
        return outcome

    def _final(self, answer: Sent | _Refusal | GaveUp, *, attempts: int | None = None) -> SendOutcome:
        """What an answer means for the whole batch (``attempts``: the batch's requests, if more than the answer's)."""
        if isinstance(answer, Sent | GaveUp):
            return answer if attempts is None else replace(answer, attempts=attempts)
        attempts = answer.attempts if attempts is None else attempts
        if answer.status in KEY_REFUSED_STATUSES:
            # The caller pauses and alerts once: a log line per batch would bury the one that matters.
            logger.debug("Amberflo refused the API key: %d %s", answer.status, answer.body)
            return KeyRefused(status=answer.status, body=answer.body, attempts=attempts)
        logger.error("Amberflo refused a batch for good: %d %s", answer.status, answer.body)
        return DeadLetter(status=answer.status, body=answer.body, attempts=attempts)

    def _isolate(
        self, batch: EncodedBatch, refusal: _Refusal, *, api_key: str, halt: threading.Event | None
    ) -> SendOutcome:
        """Split a batch Amberflo refused as invalid until the records it refuses on their own are found.

        Returns:
            RecordsRefused (every other record accepted); or, when a part met a key refusal, a 4xx no record explains
            or a transient failure past its budget, that outcome for the whole batch, which is then sent again whole.
        """
        records = batch.decode()
        attempts = refusal.attempts
        refused: list[RefusedRecord] = []
        # Parts Amberflo refused, each with the answer that refused it.
        suspects: list[tuple[list[int], _Refusal]] = [(list(range(len(records))), refusal)]
        while suspects:
            indexes, why = suspects.pop()
            if len(indexes) == 1:
                index = indexes[0]
                refused.append(RefusedRecord(index=index, record=records[index], status=why.status, body=why.body))
                continue
            for part in split_refused(indexes, records, why.body):
                answer = self._post_until_answered(encode_batch([records[i] for i in part]), api_key=api_key, halt=halt)
                attempts += answer.attempts
                if isinstance(answer, _Refusal) and answer.status in RECORDS_REFUSED_STATUSES:
                    suspects.append((part, answer))
                elif not isinstance(answer, Sent):
                    return self._final(answer, attempts=attempts)
        if not refused:  # Amberflo refused the batch but accepted every part of it: nothing is at fault
            logger.warning("Amberflo refused a batch (%d %s) but accepted all its parts", refusal.status, refusal.body)
            return Sent(attempts=attempts)
        refused.sort(key=lambda item: item.index)
        logger.warning(
            "Amberflo refused %d of a batch's %d records (isolated in %d requests; the others were accepted): %s",
            len(refused),
            len(records),
            attempts,
            "; ".join(f"{item.record.get('uniqueId')}: {item.status} {item.body[:200]}" for item in refused[:5]),
        )
        return RecordsRefused(refused=tuple(refused), attempts=attempts)

    def _post_until_answered(
        self, batch: EncodedBatch, *, api_key: str, halt: threading.Event | None
    ) -> Sent | _Refusal | GaveUp:
        """POST one body until an answer other than a transient failure, or the retry budget (or ``halt``) ends."""
        headers = [
            (b"Host", self._host_header),
            (b"X-API-KEY", api_key.encode()),
            (b"Content-Type", b"application/json"),
            (b"Content-Encoding", b"gzip"),
            (b"Content-Length", b"%d" % len(batch.body)),
            (b"User-Agent", _USER_AGENT),
        ]
        give_up_at = time.monotonic() + self.settings.give_up_after_s
        attempt = 0
        while True:
            attempt += 1
            retry_after: float | None = None
            try:
                status, answer_headers, content = self._connection().post(headers, batch.body, self._timeouts)
            except httpcore.TimeoutException as exc:
                cause, error = "timeout", f"{type(exc).__name__}: {exc}"
            except (httpcore.NetworkError, httpcore.ProtocolError, httpcore.UnsupportedProtocol) as exc:
                cause, error = "network", f"{type(exc).__name__}: {exc}"
            else:
                if 200 <= status < 300:
                    self._count(requests=1)
                    return Sent(attempts=attempt)
                if status != 429 and status < 500:
                    self._count(requests=1)
                    answer = content.decode("utf-8", "replace")[:ANSWER_LIMIT_CHARS]
                    return _Refusal(status=status, body=answer, attempts=attempt)
                cause, error = f"http_{status}", f"HTTP {status}: {content.decode('utf-8', 'replace')[:200]}"
                retry_after = parse_retry_after(_header(answer_headers, b"retry-after"))
            ceiling = min(self.settings.max_backoff_s, self.settings.min_backoff_s * 2 ** min(attempt - 1, 30))
            delay = self._rng.uniform(0, ceiling)
            if retry_after is not None:
                delay = max(delay, retry_after)
            if time.monotonic() + delay > give_up_at:
                self._count(requests=1)
                logger.warning("gave up on a batch after %d attempts: %s", attempt, error)
                return GaveUp(last_error=error, attempts=attempt)
            self._count(retry=cause, requests=1)
            logger.debug("retrying a batch in %.3f s (attempt %d): %s", delay, attempt, error)
            if halt is not None and halt.wait(delay):
                return GaveUp(last_error=f"halted while retrying ({error})", attempts=attempt)
            if halt is None:
                time.sleep(delay)

    def forward(
        self,
        batches: Iterable[tuple[K, EncodedBatch]],
        on_outcome: Callable[[K, EncodedBatch, SendOutcome], None],
        *,
        api_key: str,
        halt: threading.Event | None = None,
    ) -> bool:
        """Send ``(key, batch)`` pairs with ``settings.concurrency`` requests in flight, started in the order given.

        The sending threads pull the batches (so ``batches`` is iterated from them, one at a time); ``on_outcome`` is
        called in the calling thread as each batch is answered, so it may write to a store that only this thread
        uses. After a :class:`GaveUp` (Amberflo unreachable for the whole budget) or a :class:`KeyRefused` (every
        batch would be refused), or once ``halt`` is set, no further batch is started and the batches in flight stop
        retrying (they answer GaveUp). An exception from ``batches``, a sending thread or ``on_outcome`` stops the run
        the same way and is raised here once the batches in flight are answered.

        Returns:
            True if every batch got a final answer (Sent, RecordsRefused or DeadLetter); False if some were left
            unsent (GaveUp, KeyRefused).

        Raises:
            ForwarderClosedError: the forwarder was closed.
        """
        run = _Run(iter(batches), api_key, halt)
        senders = self._hand_over(run)
        complete = True
        error: BaseException | None = None
        try:
            while senders:
                answer = run.answers.get() if halt is None else self._answer_or_halt(run, halt)
                if answer is None:
                    senders -= 1
                    continue
                if isinstance(answer, BaseException):
                    error = error or answer
                    run.stop()
                    continue
                key, batch, outcome = answer
                if isinstance(outcome, GaveUp | KeyRefused):
                    complete = False
                if error is None:
                    try:
                        on_outcome(key, batch, outcome)
                    except BaseException as exc:  # re-raised below, once the senders are done
                        error = exc
                        run.stop()
        except BaseException:
            run.stop()  # interrupted while waiting: the senders start no further batch and stop retrying
            raise
        if error is not None:
            raise error
        return complete and run.exhausted and not run.stopped

    @staticmethod
    def _answer_or_halt(
        run: _Run, halt: threading.Event
    ) -> tuple[Any, EncodedBatch, SendOutcome] | BaseException | None:
        """The run's next answer; meanwhile a set ``halt`` stops the run (its senders then answer promptly)."""
        while True:
            try:
                return run.answers.get(timeout=_HALT_POLL_S)
            except queue.Empty:
                if halt.is_set():
                    run.stop()

    def _hand_over(self, run: _Run) -> int:
        """Give ``run`` to every sending thread (started on first use); how many there are.

        Raises:
            ForwarderClosedError: :meth:`close` was called.
        """
        with self._lock:
            if self._closed:
                raise ForwarderClosedError
            while len(self._senders) < self.settings.concurrency:
                sender = threading.Thread(target=self._send_runs, name=f"amberflo-{len(self._senders)}", daemon=True)
                sender.start()
                self._senders.append(sender)
            for _ in self._senders:
                self._runs.put(run)
            return len(self._senders)

    def _send_runs(self) -> None:
        """A sending thread: take each run handed over and send its batches until none is left for it."""
        while (run := self._runs.get()) is not None:
            try:
                while (item := run.next_batch()) is not None:
                    key, batch = item
                    outcome = self.send_batch(batch, api_key=run.api_key, halt=run.stopping)
                    if isinstance(outcome, GaveUp | KeyRefused):
                        run.stop()
                    run.answers.put((key, batch, outcome))
            except BaseException as exc:  # handed to the caller, which raises it
                run.answers.put(exc)
            finally:
                run.answers.put(None)

    def _count(self, *, retry: str | None = None, requests: int = 0) -> None:
        with self._lock:
            self._stats.requests += requests
            if retry is not None:
                self._stats.retries[retry] = self._stats.retries.get(retry, 0) + 1

    def _count_outcome(self, batch: EncodedBatch, outcome: SendOutcome) -> None:
        with self._lock:
            stats = self._stats
            if isinstance(outcome, Sent):
                stats.sent_batches += 1
                stats.sent_records += batch.records
            elif isinstance(outcome, RecordsRefused):
                stats.split_batches += 1
                stats.sent_records += batch.records - len(outcome.refused)
                stats.dead_records += len(outcome.refused)
            elif isinstance(outcome, DeadLetter):
                stats.dead_batches += 1
                stats.dead_records += batch.records
            elif isinstance(outcome, KeyRefused):
                stats.key_refusals += 1
            else:
                stats.gave_up_batches += 1


def split_refused(indexes: Sequence[int], records: Sequence[Mapping[str, Any]], answer: str) -> list[list[int]]:
    """How to split the records at ``indexes`` that Amberflo refused with ``answer``: the others, then each record
    whose uniqueId the answer names, alone; or, if it names none of them (or all), two halves.
    """
    named = [i for i in indexes if _named_in(records[i], answer)]
    if named and len(named) < len(indexes):
        alone = set(named)
        return [[i for i in indexes if i not in alone], *([i] for i in named)]
    half = len(indexes) // 2
    return [list(indexes[:half]), list(indexes[half:])]


def _named_in(record: Mapping[str, Any], answer: str) -> bool:
    unique_id = record.get("uniqueId")
    return isinstance(unique_id, str) and bool(unique_id) and unique_id in answer


def host_header(url: httpcore.URL) -> bytes:
    """The ``Host`` value for ``url``: IPv6 literals in brackets, the port only when it is not the scheme's default."""
    host = b"[" + url.host + b"]" if b":" in url.host else url.host
    if url.port is None or url.port == _DEFAULT_PORTS.get(url.scheme):
        return host
    return host + b":%d" % url.port


def environment_proxy(url: str) -> str | None:
    """The proxy the environment (HTTPS_PROXY, ALL_PROXY, ... less NO_PROXY) sets for ``url``, as httpx would use."""
    parts = urlsplit(url)
    if parts.hostname is None or proxy_bypass(parts.hostname):
        return None
    proxies = getproxies()
    return proxies.get(parts.scheme) or proxies.get("all")


def _header(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> str | None:
    """The first value of header ``name`` (lower case), decoded."""
    for key, value in headers:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def parse_retry_after(value: str | None) -> float | None:
    """Seconds a ``Retry-After`` header asks to wait (delay-seconds or an HTTP date); None if absent or unreadable."""
    if value is None:
        return None
    text = value.strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())

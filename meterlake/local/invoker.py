"""Invoking the delivery stream's transform as Firehose invokes its Lambda, in this process or in a worker process.

:class:`Invoker` cuts a piece of the spool into Lambda-sized events, calls the handler (retrying a failed invocation
``number_of_retries`` times), refuses a request or an answer over Lambda's limits as Lambda does, checks that the
answer answers every record exactly once, and sorts the answers into :class:`Transformed`: the Ok rows (decoded from
base64) of each destination table, the dropped count and the rejects.

:class:`TransformWorkers` runs the access-log transform in worker processes, so on a machine with two cores the
transform of one piece overlaps the deduplication and Iceberg commits of the stream's process, and its writer's puts:
the transform is pure Python and would otherwise share one interpreter lock with them. A worker is sent either a
piece's records or a request to read a range of the spool itself and decode the answers to Arrow
(``meterlake.local.rows``); it imports only the transform until it is sent the first such request (this module stays
free of pyarrow, pyiceberg and DuckDB).
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import fcntl
import itertools
import json
import logging
import operator
import os
import pickle
import queue
import struct
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Hashable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import IO, Any, Final, cast

import msgspec

from transform_lambda.handler import TransformSettings, make_encoded_handler
from transform_lambda.normalize import rejection_reason

logger = logging.getLogger(__name__)

#: A transform as the stream invokes it: a Firehose event in, the answer out, either as a document (JSON-encoded by
#: Lambda's runtime) or as the JSON bytes a handler may return itself (sent unchanged, as the AWS entry point does).
Handler = Callable[[dict[str, Any], Any], dict[str, Any] | bytes]

#: JSON around each record in an event ({"recordId": ..., "approximateArrivalTimestamp": ..., "data": ...}) and
#: around the event itself; generous so the real size stays below the estimate.
RECORD_JSON_OVERHEAD = 128
EVENT_JSON_OVERHEAD = 1024

#: Error output types (the value of ``!{firehose:error-output-type}``).
PROCESSING_FAILED = "processing-failed"
DELIVERY_FAILED = "iceberg-failed"
#: The only OTF operation the local stream applies.
SUPPORTED_OPERATION = "insert"

_RESULTS = frozenset({"Ok", "Dropped", "ProcessingFailed"})
_RESULT = operator.itemgetter("result")
_METADATA = operator.methodcaller("get", "metadata")
_RECORD_ID = operator.methodcaller("get", "recordId")
_DATA_OR_NONE = operator.methodcaller("get", "data")


class PayloadTooLargeError(Exception):
    """Lambda refused an invocation's request or the function's response for its size, as Lambda itself does."""

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(f"{error_type}: {message}")
        self.error_type = error_type


@dataclass(frozen=True, slots=True)
class Invocation:
    """How the stream invokes its transform.

    Attributes:
        arn: the delivery stream's ARN, as events carry it.
        attempts: invocations per event before its records are rejected (1 + ``number_of_retries``).
        event_raw_bytes: raw record bytes per event (Firehose's processor buffer).
        default_destination: the (database, table) of an Ok record whose metadata names none.
        request_limit: Lambda's limit on an invocation's request, in bytes.
        response_limit: Lambda's limit on a function's response, in bytes.
    """

    arn: str
    attempts: int
    event_raw_bytes: int
    default_destination: tuple[str, str]
    request_limit: int
    response_limit: int


@dataclass(slots=True)
class Transformed:
    """What the transform made of one piece of the spool; indices are positions in the piece.

    Attributes:
        invocations: handler calls, retries included.
        dropped: records the transform dropped.
        rejected: (index, error code, message, attempts, error output type) of each record bound for the error folder.
        rows: per destination (database, table), the indices of its Ok records and their transformed JSON rows.
    """

    invocations: int = 0
    dropped: int = 0
    rejected: list[tuple[int, str, str, int, str]] = field(default_factory=list)
    rows: dict[tuple[str, str], tuple[list[int], list[bytes]]] = field(default_factory=dict)


class DirectDelivery:
    """A stream without a transform, as a Firehose stream without a processing configuration delivers: every record
    goes to ``destination`` as it is (its JSON rows, one a line), with no Lambda invoked."""

    def __init__(self, destination: tuple[str, str]) -> None:
        self._destination = destination

    def transform(self, offsets: Sequence[int], arrivals_ms: Sequence[int], records: Sequence[bytes]) -> Transformed:
        """Every record of the piece, Ok, to the destination (the parameters are those of :meth:`Invoker.transform`)."""
        return Transformed(rows={self._destination: (list(range(len(records))), list(records))})


class Invoker:
    """Calls ``handler`` on a piece of the spool as Firehose calls the stream's Lambda (see the module docstring)."""

    def __init__(self, handler: Handler, invocation: Invocation) -> None:
        self._handler = handler
        self._invocation = invocation

    def transform(self, offsets: Sequence[int], arrivals_ms: Sequence[int], records: Sequence[bytes]) -> Transformed:
        """Transform one piece (parallel lists, as the spool reads them): every record ends up in exactly one of the
        outcome's rows, dropped count or rejects."""
        outcome = Transformed()
        invocation = self._invocation
        for event_range in event_ranges(records, invocation.event_raw_bytes, invocation.request_limit):
            self._transform_event(outcome, offsets, arrivals_ms, records, event_range)
        return outcome

    def _transform_event(
        self,
        outcome: Transformed,
        offsets: Sequence[int],
        arrivals_ms: Sequence[int],
        records: Sequence[bytes],
        event_range: range,
    ) -> None:
        answered, attempts, failure = self._invoke(offsets, arrivals_ms, records, event_range)
        outcome.invocations += attempts
        if answered is None:
            code, message = failure
            outcome.rejected.extend((i, code, message, attempts, PROCESSING_FAILED) for i in event_range)
            return
        # Whole-list passes in C (map, list.count, set) rather than one Python loop over every answer.
        results = answered.results
        oks = results.count("Ok")
        dropped = results.count("Dropped")
        outcome.dropped += dropped
        # An Ok record's data is never None: reading the answer checked it.
        ok_data: list[bytes]
        if oks == len(results):
            ok_indices, ok_keys, ok_data = list(event_range), answered.route_keys, cast("list[bytes]", answered.data)
        else:
            is_ok = [result == "Ok" for result in results]
            ok_indices = list(itertools.compress(event_range, is_ok))
            ok_keys = list(itertools.compress(answered.route_keys, is_ok))
            ok_data = cast("list[bytes]", list(itertools.compress(answered.data, is_ok)))
            if oks + dropped < len(results):
                for i, result in zip(event_range, results, strict=True):
                    if result == "ProcessingFailed":
                        reason = rejection_reason(records[i]) or "the transform rejected the record"
                        outcome.rejected.append((i, "Lambda.ProcessingFailed", reason, attempts, PROCESSING_FAILED))
        # The transform usually attaches the same metadata to every record: route each distinct one once.
        routes = {key: self._route(answered.metadata[key]) for key in set(ok_keys)}
        routed_rows: dict[tuple[str, str], tuple[list[int], list[bytes]]] = {}
        if len(routes) == 1:
            (routed,) = routes.values()
            if isinstance(routed, str):
                code = "Iceberg.UnsupportedOperation"
                outcome.rejected.extend((i, code, routed, attempts, DELIVERY_FAILED) for i in ok_indices)
            elif ok_indices:
                routed_rows[routed] = (ok_indices, ok_data)
        else:
            for i, key, data in zip(ok_indices, ok_keys, ok_data, strict=True):
                routed = routes[key]
                if isinstance(routed, str):
                    outcome.rejected.append((i, "Iceberg.UnsupportedOperation", routed, attempts, DELIVERY_FAILED))
                    continue
                rows = routed_rows.get(routed)
                if rows is None:
                    rows = routed_rows[routed] = ([], [])
                rows[0].append(i)
                rows[1].append(data)
        for destination, (indices, lines) in routed_rows.items():
            kept = outcome.rows.get(destination)
            if kept is None:
                outcome.rows[destination] = (indices, lines)
            else:
                kept[0].extend(indices)
                kept[1].extend(lines)

    def _invoke(
        self, offsets: Sequence[int], arrivals_ms: Sequence[int], records: Sequence[bytes], event_range: range
    ) -> tuple[_Answered | None, int, tuple[str, str]]:
        """Call the handler, retrying ``attempts - 1`` times: (the answers, attempts, the last failure), the answers
        None when every attempt failed."""
        chosen = slice(event_range.start, event_range.stop)
        record_ids = list(map(str, offsets[chosen]))
        # msgspec base64-encodes a whole list of bytes in one C call.
        encoded: list[str] = msgspec.to_builtins(records[chosen])
        event_records = [
            {"recordId": record_id, "approximateArrivalTimestamp": arrival, "data": data}
            for record_id, arrival, data in zip(record_ids, arrivals_ms[chosen], encoded, strict=True)
        ]
        # The request is measured exactly only when its upper bound (what cut the event) could exceed the limit.
        bound = EVENT_JSON_OVERHEAD + sum(map(len, encoded)) + RECORD_JSON_OVERHEAD * len(encoded)
        attempts = self._invocation.attempts
        request_limit, response_limit = self._invocation.request_limit, self._invocation.response_limit
        failure = ("Lambda.FunctionError", "not invoked")
        for attempt in range(1, attempts + 1):
            event = {
                "invocationId": str(uuid.uuid4()),
                "deliveryStreamArn": self._invocation.arn,
                "region": "local",
                "records": event_records,
            }
            try:
                request_size = oversized_payload(event, request_limit, as_sent=True) if bound > request_limit else None
                if request_size is not None:
                    raise PayloadTooLargeError(
                        "RequestTooLargeException",
                        f"Request must be smaller than {request_limit} bytes for the InvokeFunction "
                        f"operation ({request_size} bytes)",
                    )
                response = self._handler(event, None)
                response_size = (
                    (len(response) if len(response) > response_limit else None)
                    if isinstance(response, bytes)
                    else oversized_payload(response, response_limit)
                )
                if response_size is not None:
                    raise PayloadTooLargeError(
                        "Function.ResponseSizeTooLarge",
                        f"Response payload size ({response_size} bytes) exceeded maximum allowed payload size "
                        f"({response_limit} bytes).",
                    )
            except Exception as exc:  # a Lambda that raises is an invocation error, retried like Firehose does
                failure = ("Lambda.FunctionError", f"{type(exc).__name__}: {exc}")
                logger.warning("transform invocation failed (attempt %d/%d): %s", attempt, attempts, exc)
                continue
            answered = (
                _answered_from_json(response, record_ids)
                if isinstance(response, bytes)
                else _answered_from_document(response, record_ids)
            )
            if isinstance(answered, _Answered):
                return answered, attempt, failure
            failure = ("Lambda.InvalidResponse", answered)
            logger.warning("transform answer rejected (attempt %d/%d): %s", attempt, attempts, answered)
        return None, attempts, failure

    def _route(self, metadata: object) -> tuple[str, str] | str:
        """The (database, table) an Ok record with this ``metadata`` goes to, or why it cannot go anywhere."""
        default = self._invocation.default_destination
        otf = metadata.get("otfMetadata") if isinstance(metadata, dict) else None
        if not isinstance(otf, dict):
            return default
        operation = otf.get("operation", SUPPORTED_OPERATION)
        if operation != SUPPORTED_OPERATION:
            return f"operation {operation!r} is not supported locally (only {SUPPORTED_OPERATION!r})"
        database = otf.get("destinationDatabaseName", default[0])
        table = otf.get("destinationTableName", default[1])
        return (str(database), str(table))


def event_ranges(records: Sequence[bytes], event_raw_bytes: int, request_limit: int) -> Iterator[range]:
    """Cut records into events of at most ``event_raw_bytes`` raw bytes (the processor buffer), as Firehose does, and
    whose request stays below ``request_limit``, Lambda's (which only records far shorter than an access-log line could
    reach).

    An event holds at least one record. Cuts are found by bisection over running sums, not a loop over records: a
    record's base64 is at most (4 * length + 8) / 3 bytes, so the request of ``records[a:b]`` is at most
    ``_request_bound(raw bytes, b - a)``.
    """
    raw_sums = [0, *itertools.accumulate(map(len, records))]
    count = len(records)
    start = 0
    while start < count:
        base = raw_sums[start]
        stop = bisect.bisect_right(raw_sums, base + event_raw_bytes, lo=start + 1) - 1
        if _request_bound(raw_sums[stop] - base, stop - start) > request_limit:
            low, high = start, stop  # the request bound grows with stop: bisect for the last stop that fits
            while low < high:
                middle = (low + high + 1) // 2
                if _request_bound(raw_sums[middle] - base, middle - start) <= request_limit:
                    low = middle
                else:
                    high = middle - 1
            stop = low
        stop = max(stop, start + 1)
        yield range(start, stop)
        start = stop


def _request_bound(raw_bytes: int, records: int) -> int:
    """An upper bound of the request carrying ``records`` records of ``raw_bytes`` bytes in all."""
    return EVENT_JSON_OVERHEAD + (4 * raw_bytes + 8 * records) // 3 + RECORD_JSON_OVERHEAD * records


def oversized_payload(document: object, limit: int, *, as_sent: bool = False) -> int | None:
    """The size of ``document`` if its JSON exceeds ``limit`` bytes, else None.

    A response is counted as Lambda's Python runtime sends it (simplejson's default ``", "`` and ``": "``
    separators, non-ASCII as UTF-8); ``as_sent`` counts compact JSON, as this stream sends its requests. msgspec's
    compact encoding plus every comma and colon is an upper bound of the runtime's size (only those inside strings
    are over-counted), so the exact, slower count runs only for documents close to the limit.

    Raises:
        TypeError: the document is not JSON (the runtime cannot marshal it).
    """
    compact = msgspec.json.encode(document)
    if as_sent:
        return len(compact) if len(compact) > limit else None
    if len(compact) > limit:
        return len(json.dumps(document, ensure_ascii=False).encode())
    # Every comma or colon of compact JSON has a character on each side, so they are at most half of it: the runtime's
    # size is at most 1.5x the compact one, and only a document above two thirds of the limit needs counting.
    if len(compact) * 3 <= limit * 2 or len(compact) + compact.count(b",") + compact.count(b":") <= limit:
        return None
    size = len(json.dumps(document, ensure_ascii=False).encode())
    return size if size > limit else None


def _answers_in_order(response: object, record_ids: list[str]) -> list[dict[str, Any]] | str:
    """The answer's records in request order, or why the answer does not answer every record exactly once."""
    records = response.get("records") if isinstance(response, dict) else None
    if not isinstance(records, list):
        return "the answer has no records list"
    if any(kind is not dict for kind in set(map(type, records))):
        return "an answered record is not an object"
    answered = list(map(_RECORD_ID, records))
    if answered != record_ids:
        by_id: dict[object, dict[str, Any]] = {}
        for record_id, item in zip(answered, records, strict=True):
            if record_id in by_id:
                return f"recordId {record_id} is answered twice"
            by_id[record_id] = item
        missing = [record_id for record_id in record_ids if record_id not in by_id]
        if missing or len(by_id) != len(record_ids):
            unknown = len(by_id) - (len(record_ids) - len(missing))
            return f"{len(missing)} records unanswered (first {missing[:1]}), {unknown} unknown recordIds"
        records = [by_id[record_id] for record_id in record_ids]
    results = list(map(operator.methodcaller("get", "result"), records))
    kinds = set(results)
    if kinds == {"Ok"}:
        if set(map(type, map(_DATA_OR_NONE, records))) == {str}:
            return records
    elif kinds <= _RESULTS:
        oks = [item for item, result in zip(records, results, strict=True) if result == "Ok"]
        if set(map(type, map(_DATA_OR_NONE, oks))) <= {str}:
            return records
    for item, result in zip(records, results, strict=True):
        if result not in _RESULTS:
            return f"recordId {item['recordId']} has result {result!r}"
        if result == "Ok" and type(item.get("data")) is not str:
            return f"recordId {item['recordId']} is Ok without base64 data"
    raise AssertionError("unreachable: a bad result or data was found above")


@dataclass(slots=True)
class _Answered:
    """An answer that answers every record of the event once, in request order (parallel lists).

    Attributes:
        results: each record's result (Ok, Dropped or ProcessingFailed).
        route_keys: each record's key into ``metadata``.
        metadata: the distinct metadata documents of the answer, by key.
        data: each record's data, base64-decoded (an Ok record's row or rows; the others' are not used).
    """

    results: list[str]
    route_keys: list[Hashable]
    metadata: dict[Hashable, object]
    data: list[bytes | None]


class _AnsweredRecord(msgspec.Struct, gc=False):
    """One record of a JSON answer, as Firehose reads it: ``data`` base64-decoded, ``metadata`` kept as its JSON."""

    recordId: str  # noqa: N815 (Firehose's member name)
    result: str
    data: bytes | None = None
    metadata: msgspec.Raw = msgspec.Raw(b"null")


class _AnswerDocument(msgspec.Struct, gc=False):
    """A JSON answer: its records."""

    records: list[_AnsweredRecord]


_ANSWER_DECODER: Final = msgspec.json.Decoder(_AnswerDocument)
_ANSWERED_ID = operator.attrgetter("recordId")
_ANSWERED_RESULT = operator.attrgetter("result")
_ANSWERED_DATA = operator.attrgetter("data")
_ANSWERED_METADATA = operator.attrgetter("metadata")


#: What decoding a JSON answer (or part of one) can raise: not JSON, not UTF-8, or nested past the decoder's depth.
_JSON_ERRORS = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)


def _answered_from_json(answer: bytes, record_ids: list[str]) -> _Answered | str:
    """The answers of a handler that answered JSON bytes, or why they do not answer every record exactly once.

    A well-formed answer (every record once, in order, each result known, every Ok record with base64 data) is
    decoded by one typed msgspec call, base64 included; any other is read as a document and checked as one is, so
    both say the same about the same answer.
    """
    try:
        records = _ANSWER_DECODER.decode(answer).records
    except _JSON_ERRORS:
        records = None
    if records is not None and list(map(_ANSWERED_ID, records)) == record_ids:
        results: list[str] = list(map(_ANSWERED_RESULT, records))
        data: list[bytes | None] = list(map(_ANSWERED_DATA, records))
        kinds = set(results)
        ok_data = data if kinds == {"Ok"} else itertools.compress(data, [result == "Ok" for result in results])
        if kinds <= _RESULTS and None not in ok_data:
            raw: list[bytes] = list(map(bytes, map(_ANSWERED_METADATA, records)))
            try:
                metadata: dict[Hashable, object] = {key: msgspec.json.decode(key) for key in set(raw)}
            except _JSON_ERRORS:
                pass  # read as a document below, which names the problem
            else:
                return _Answered(results, list(raw), metadata, data)
    try:
        document = msgspec.json.decode(answer)
    except _JSON_ERRORS as exc:
        return f"the answer is not JSON ({type(exc).__name__}: {exc})"
    return _answered_from_document(document, record_ids)


def _answered_from_document(response: object, record_ids: list[str]) -> _Answered | str:
    """The answers of a handler that answered a document, or why they do not answer every record exactly once
    (including an Ok record whose data is not base64)."""
    records = _answers_in_order(response, record_ids)
    if isinstance(records, str):
        return records
    results: list[str] = list(map(_RESULT, records))
    is_ok = [result == "Ok" for result in results]
    encoded = list(itertools.compress(map(_DATA_OR_NONE, records), is_ok))
    try:
        # msgspec base64-decodes a whole list of strings in one C call.
        decoded = iter(msgspec.convert(encoded, type=list[bytes]))
    except msgspec.ValidationError:
        for item, data in zip(itertools.compress(records, is_ok), encoded, strict=True):
            try:
                msgspec.convert(data, type=bytes)
            except msgspec.ValidationError:
                return f"recordId {item['recordId']} is Ok with data that is not base64"
        raise AssertionError("unreachable: a datum that is not base64 was found above") from None
    documents = list(map(_METADATA, records))
    keys: list[Hashable] = list(map(id, documents))
    data = [next(decoded) if ok else None for ok in is_ok]
    return _Answered(results, keys, dict(zip(keys, documents, strict=True)), data)


# -- the worker process ---------------------------------------------------------------------------------------------

_FRAME_HEADER = struct.Struct("<Q")
#: The pipe capacity asked for (Linux's maximum for an unprivileged process by default): a piece of a few MB crosses in
#: a few reads, each of which waits for the interpreter lock again in the stream's process.
_PIPE_BYTES = 1024 * 1024


class WorkerStoppedError(Exception):
    """The transform worker process ended before it answered a piece (the caller transforms the piece itself)."""


class WorkerPieceError(Exception):
    """A worker could not read, transform or decode a piece it was to read itself (e.g. a damaged spool frame); the
    message names the worker's exception. The caller reads the piece itself, where the same failure raises the
    spool's own error."""


class _Connection:
    """One worker process and the two threads that talk to it over its stdin and stdout (pickled frames).

    A sender writes queued pieces in order and a receiver completes their futures in the same order, so the caller
    never blocks on a full pipe while the worker is busy, and the worker never waits for the caller to read.
    """

    def __init__(self, settings: TransformSettings, invocation: Invocation) -> None:
        environment = dict(os.environ, PYTHONPATH=os.pathsep.join(path for path in sys.path if path))
        self.process = subprocess.Popen(  # noqa: S603 (this interpreter, this module)
            [sys.executable, "-m", __name__], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=environment
        )
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None and hasattr(fcntl, "F_SETPIPE_SZ"):
                with contextlib.suppress(OSError):  # a smaller pipe only means more reads
                    fcntl.fcntl(pipe.fileno(), fcntl.F_SETPIPE_SZ, _PIPE_BYTES)
        self.broken = False
        self._outbox: queue.SimpleQueue[tuple[Future[Any], object] | None]
        self._outbox = queue.SimpleQueue()
        self._sent: collections.deque[Future[Any]] = collections.deque()
        self._lock = threading.Lock()
        self._sender = threading.Thread(target=self._send, args=(settings, invocation), daemon=True)
        self._receiver = threading.Thread(target=self._receive, daemon=True)
        self._sender.start()
        self._receiver.start()

    def submit(self, future: Future[Any], request: object) -> None:
        """Queue ``request`` (a piece, or a piece request the worker reads itself); its answer completes ``future``."""
        self._outbox.put((future, request))

    def _send(self, settings: TransformSettings, invocation: Invocation) -> None:
        stdin = self.process.stdin
        assert stdin is not None  # opened as a pipe
        try:
            _write_frame(stdin, (settings, invocation))
            while (item := self._outbox.get()) is not None:
                future, piece = item
                with self._lock:
                    if self.broken:
                        future.set_exception(WorkerStoppedError("the transform worker stopped"))
                        continue
                    if not future.set_running_or_notify_cancel():
                        continue  # cancelled before it was sent: the worker never sees it
                    self._sent.append(future)
                _write_frame(stdin, piece)
        except OSError:  # the worker is gone; the receiver fails what was sent
            pass
        finally:
            with contextlib.suppress(OSError):
                stdin.close()

    def _receive(self) -> None:
        stdout = self.process.stdout
        assert stdout is not None  # opened as a pipe
        while True:
            try:
                ok, answer = _read_frame(stdout)
            except Exception:  # EOF, a broken pipe or a torn frame: the worker is gone
                break
            with self._lock:
                future = self._sent.popleft()
            if ok:
                future.set_result(answer)
            else:
                future.set_exception(answer)
        with self._lock:
            self.broken = True
            stopped = list(self._sent)
            self._sent.clear()
        code = self.process.wait()
        for future in stopped:
            future.set_exception(WorkerStoppedError(f"the transform worker exited with status {code}"))

    def close(self) -> None:
        """Let the worker finish what it was sent, then end it."""
        self._outbox.put(None)
        self._sender.join()
        self._receiver.join()


class TransformWorkers:
    """The access-log transform in ``processes`` worker processes (``python -m meterlake.local.invoker``), as
    Firehose invokes its Lambda concurrently; each is started on first use.

    ``submit`` queues a piece with the next worker in turn and returns at once. If a worker dies, the pieces it had not
    answered fail with :class:`WorkerStoppedError` (the caller transforms them itself) and its next ``submit`` starts
    another. A worker exits when its stdin closes: when :meth:`close` is called or the stream's process ends, even by
    ``kill -9``. What the transform prints goes to the worker's stderr (its stdout carries the answers).
    """

    def __init__(self, settings: TransformSettings, invocation: Invocation, *, processes: int) -> None:
        self._settings = settings
        self._invocation = invocation
        self._connections: list[_Connection | None] = [None] * max(1, processes)
        self._turn = 0

    def submit(self, offsets: list[int], arrivals_ms: list[int], records: list[bytes]) -> Future[Transformed]:
        """Queue one piece for the next worker."""
        future: Future[Transformed] = Future()
        self._next_connection().submit(future, (offsets, arrivals_ms, records))
        return future

    def submit_request(self, request: object) -> Future[Any]:
        """Queue a request the worker reads from the spool itself (a ``meterlake.local.rows.PieceRequest``); its
        future answers a ``DecodedPiece``, or fails with :class:`WorkerPieceError` or :class:`WorkerStoppedError`."""
        future: Future[Any] = Future()
        self._next_connection().submit(future, request)
        return future

    def _next_connection(self) -> _Connection:
        """The next worker in turn, started if it is not running."""
        turn = self._turn
        self._turn = (turn + 1) % len(self._connections)
        connection = self._connections[turn]
        if connection is None or connection.broken:
            connection = self._connections[turn] = _Connection(self._settings, self._invocation)
        return connection

    def processes(self) -> list[subprocess.Popen[bytes]]:
        """The worker processes started so far."""
        return [connection.process for connection in self._connections if connection is not None]

    def close(self) -> None:
        """Stop the workers once they have answered what they were sent."""
        connections, self._connections = self._connections, [None] * len(self._connections)
        for connection in connections:
            if connection is not None:
                connection.close()


def _write_frame(stream: IO[bytes], document: object) -> None:
    """Pickle ``document`` and write it as one length-prefixed frame: one large write, not one per pickled part (each
    of which would wait for the interpreter lock again while the pipe drains)."""
    data = pickle.dumps(document, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_FRAME_HEADER.pack(len(data)))
    stream.write(data)
    stream.flush()


def _read_frame(stream: IO[bytes]) -> Any:
    """Read one frame written by :func:`_write_frame`.

    Raises:
        EOFError: the stream ended (inside a frame or before one).
    """
    header = stream.read(_FRAME_HEADER.size)
    if len(header) < _FRAME_HEADER.size:
        raise EOFError("the pipe closed")
    (size,) = _FRAME_HEADER.unpack(header)
    data = stream.read(size)
    if len(data) < size:
        raise EOFError("the pipe closed inside a frame")
    return pickle.loads(data)  # noqa: S301 (written by this module, over a pipe between a stream and its own worker)


def _serve() -> None:
    """The worker's loop: settings first, then pieces in, outcomes (or the exception) out, until stdin closes."""
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # the handler's prints must not land among the answers
    pieces = sys.stdin.buffer
    settings, invocation = _read_frame(pieces)
    invoker = Invoker(make_encoded_handler(settings, emit_metrics=False), invocation)
    while True:
        try:
            request = _read_frame(pieces)
        except EOFError:
            return
        answer: tuple[bool, object]
        if isinstance(request, tuple):
            offsets, arrivals_ms, records = request
            try:
                answer = (True, invoker.transform(offsets, arrivals_ms, records))
            except Exception as exc:  # raised in the stream's process, as an in-process transform would
                answer = (False, exc)
        else:
            # Imported here: it brings pyarrow, which a worker sent only pieces never needs.
            from meterlake.local.rows import transform_piece

            try:
                answer = (True, transform_piece(invoker, request))
            except Exception as exc:  # e.g. a damaged frame: the stream reads the piece itself and raises its error
                answer = (False, WorkerPieceError(f"{type(exc).__name__}: {exc}"))
        try:
            _write_frame(answers, answer)
        except (pickle.PicklingError, TypeError, AttributeError):  # an exception that does not pickle: send its text
            _write_frame(answers, (False, RuntimeError(repr(answer[1]))))


if __name__ == "__main__":
    # Run as the imported module, so what the worker pickles names meterlake.local.invoker, not __main__.
    from meterlake.local.invoker import _serve as serve

    serve()

"""The meter-event delivery process: the meter-event stream (spool, flusher), forwarding's worker and the
meter-events table's maintenance schedule, in a process of their own beside the one that serves HTTP.

Why a process: one interpreter lock. In the serving process the flusher's decoding and Iceberg commits, and
forwarding's staging, took the lock from the event loop; here they take it only from each other (and from the puts
thread, for as long as each holds it at most: the process's switch interval is short). Maintenance (every 15 minutes,
see :mod:`meterlake.lake.compact`) mostly runs in pyarrow with the lock released: reading, sorting and writing a
closed day's small files; a day's rows are in memory twice while it is sorted.

The service talks to it over two pipes. ``puts``: group commit driven by the serving event loop
(:meth:`MeterEventProcess.commit`). While one put is in flight, the lines of the requests that arrive queue up; when
its answer comes (empty once they are in the spool, fsync'd, else the reason none of them is), its requests are
answered and everything queued goes as the next put. The loop only writes and reads a non-blocking socket: no thread
of the serving process competes for its interpreter lock. (A writer thread doing the same cost the serving thread
~650 instead of ~390 us of CPU per 100-record request, in lock handoffs: 200k records/s now against 115k then.)
``control``: flush, stats, settle and close, one at a time, from any thread. A put and a flush may overlap, as they
do on one stream.

If the service dies, the process sees its pipes close and exits at once without committing: what it acknowledged is
durable in the spool and the next start resumes it, as after a SIGKILL of one process. Ctrl-C and SIGTERM are the
service's to handle; the process ignores them and stops when told to close.

Processes come from a fork server that has imported this module (and the stream, pyiceberg, DuckDB) once, so a start
costs a fork, not an interpreter's imports (~1.6 s), and no process is forked from one running threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import multiprocessing
import multiprocessing.util
import os
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Final

import msgspec
from pyiceberg.catalog import Catalog
from pyiceberg.table import Table

from meterlake.amberflo.forwarder import Forwarder
from meterlake.amberflo.outbox import ForwardingWorker
from meterlake.amberflo.settings import AmberfloSettings
from meterlake.config import Config
from meterlake.lake.catalog import ensure_meter_events_table, open_catalog
from meterlake.lake.compact import MAINTENANCE_INTERVAL_S, MaintenanceWorker, Retention
from meterlake.lake.home import DataDir
from meterlake.local.stream import (
    DeliveryStream,
    FlushReport,
    StreamError,
    StreamInUseError,
    StreamStats,
    StreamTarget,
)
from meterlake.schema import METER_EVENT_KEY_COLUMNS, METER_EVENTS_TABLE
from meterlake.service.forwarding import meter_events_outbox
from meterlake.service.ingest import NotDurableError

logger = logging.getLogger(__name__)

#: The meter-event stream's name (its commits' snapshot summaries and error files carry it).
METER_EVENT_STREAM = "meterlake-meter-events"
#: Its spool directory under the data dir, beside the access-log stream's ``spool``.
METER_EVENT_SPOOL_DIR = "spool-meter-events"
#: The interpreter's switch interval (seconds) in both processes of the service: a thread that gives up the lock for
#: a socket or a sync waits at most this long to get it back from a busy one (the default is 5 ms).
SWITCH_INTERVAL_S = 0.0005
#: How long a start waits for the spool that a previous, killed process may still hold for a moment.
SPOOL_WAIT_S = 10.0
#: How long a start waits for the process to open its stream (a damaged spool is checked then).
START_TIMEOUT_S = 120.0
#: How long close waits for the final commit and forwarding's last cycle before killing the process.
CLOSE_TIMEOUT_S = 600.0
#: How long a flush, stats or settle request waits for the process's answer (settle: plus its forwarding timeout)
#: before it fails with the reason, rather than hold the usage query that asked for it forever.
CONTROL_TIMEOUT_S = 120.0

#: A frame's header on the put socket, both ways: its payload's length.
_FRAME: Final = struct.Struct("!I")
#: A put's payload: its lines as one MessagePack array of binaries (one copy of each line); the answer is empty once
#: they are durable, else the reason none is, as UTF-8 text.
_LINES_ENCODER: Final = msgspec.msgpack.Encoder()
_LINES_DECODER: Final = msgspec.msgpack.Decoder(list[bytes])
_READ_BYTES = 65536

_CONTEXT: Final = multiprocessing.get_context("forkserver")
_CONTEXT.set_forkserver_preload([__name__])


class DeliveryProcessError(StreamError):
    """The meter-event delivery process failed a request, or is gone (then every put answers 503)."""


def meter_event_target(config: Config, data_dir: DataDir) -> StreamTarget:
    """Where the meter-event stream spools and delivers: the meter_events table, deduplicated on (meter, uniqueId)."""
    settings = config.meterlake.service

    def ensure(catalog: Catalog) -> Table:
        return ensure_meter_events_table(catalog, config)

    return StreamTarget(
        name=METER_EVENT_STREAM,
        spool_dir=data_dir.root / METER_EVENT_SPOOL_DIR,
        destination=(config.database_name, METER_EVENTS_TABLE),
        ensure_table=ensure,
        key_columns=METER_EVENT_KEY_COLUMNS,
        size_in_mbs=settings.buffer_size_mb,
        interval_in_seconds=settings.buffer_interval_s,
    )


def open_meter_event_stream(
    config: Config,
    data_dir: DataDir,
    *,
    on_commit: Callable[[int], None] | None = None,
    recover: bool = False,
) -> DeliveryStream:
    """Open the meter-event delivery stream (resuming what a previous run acknowledged); call ``start`` to flush on
    its buffering hints.

    Raises:
        StreamError: its spool is in use by another process, damaged or unusable (see DeliveryStream).
    """
    return DeliveryStream(
        config=config,
        data_dir=data_dir,
        on_commit=on_commit,
        recover=recover,
        target=meter_event_target(config, data_dir),
    )


@dataclass(frozen=True, slots=True)
class _Start:
    """What the process is started with (pickled to it)."""

    config: Config
    data_dir: DataDir
    amberflo: AmberfloSettings | None
    amberflo_api_key: str | None
    spool_wait_s: float
    maintenance_interval_s: float


class MeterEventProcess:
    """The service's handle on its delivery process: its :class:`~meterlake.service.ingest.EventSink` (:meth:`commit`,
    group commit on the caller's event loop) and the stream's flush, stats and close, answered by the process.

    With ``amberflo`` settings the process also forwards committed events through the meter-event outbox (a dry run
    without ``amberflo_api_key``). It maintains the meter-events table every ``maintenance_interval_s`` (compaction
    and snapshot expiry, as ``meterlake up`` maintains the access-log table; see :mod:`meterlake.lake.compact`),
    keeping every snapshot the meter-event outbox has not staged. A start waits up to ``spool_wait_s`` for the spool
    while another process holds it; flush, stats and settle wait up to ``control_timeout_s`` for the process's
    answer, then fail with the reason.
    """

    def __init__(
        self,
        *,
        config: Config,
        data_dir: DataDir,
        amberflo: AmberfloSettings | None = None,
        amberflo_api_key: str | None = None,
        spool_wait_s: float = SPOOL_WAIT_S,
        control_timeout_s: float = CONTROL_TIMEOUT_S,
        maintenance_interval_s: float = MAINTENANCE_INTERVAL_S,
    ) -> None:
        self._start = _Start(config, data_dir, amberflo, amberflo_api_key, spool_wait_s, maintenance_interval_s)
        self._control_timeout_s = control_timeout_s
        self._process: multiprocessing.process.BaseProcess | None = None
        self._puts: socket.socket | None = None
        self._control: Connection | None = None
        self._control_lock = threading.Lock()
        #: Answers still to come for control requests that timed out (each is skipped, in order, by the next request).
        self._late_answers = 0
        # Group commit, touched only on the loop that commits (see commit).
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queued_lines: list[bytes] = []
        self._queued: list[asyncio.Future[None]] = []
        self._in_flight: list[asyncio.Future[None]] | None = None
        #: Answers still to come for puts whose loop closed before they were answered (each is skipped).
        self._stale_answers = 0
        self._outgoing = bytearray()
        self._received = bytearray()
        self._broken: str | None = None
        self._finalizer: multiprocessing.util.Finalize | None = None
        #: Puts made and lines put, for tests and benchmarks (how well commits were grouped).
        self.puts = 0
        self.lines = 0

    @property
    def pid(self) -> int | None:
        """The process's pid while it runs."""
        return None if self._process is None else self._process.pid

    def start(self) -> None:
        """Start the process and wait until its stream is open.

        Raises:
            StreamError: the spool is in use by another process, damaged or unusable, or the process did not start
                (the message is the process's).
        """
        puts, their_puts = socket.socketpair()
        control, their_control = _CONTEXT.Pipe()
        process = _CONTEXT.Process(
            target=_run, args=(self._start, their_puts, their_control), name="meter-event-delivery", daemon=True
        )
        process.start()
        their_puts.close()
        their_control.close()
        self._process, self._puts, self._control = process, puts, control
        # A service that exits without close: its pipes close before multiprocessing joins its children, so the
        # process (which ignores SIGTERM) sees them close and exits instead of being waited for forever.
        self._finalizer = multiprocessing.util.Finalize(self, _close_pipes, args=(puts, control), exitpriority=10)
        try:
            if not control.poll(START_TIMEOUT_S):
                raise DeliveryProcessError(f"the meter-event delivery process did not start in {START_TIMEOUT_S:.0f} s")
            kind, detail = control.recv()
        except (EOFError, OSError):
            self._abandon()
            process.join(1.0)
            raise DeliveryProcessError(
                f"the meter-event delivery process exited (code {process.exitcode}) before it opened its stream (see "
                "its error above). A program that starts the service must keep its main code under "
                "`if __name__ == '__main__':`: the process imports the main module first, as multiprocessing does"
            ) from None
        except BaseException:
            self._abandon()
            raise
        if kind != "ready":
            self._abandon()
            raise DeliveryProcessError(str(detail))

    async def commit(self, lines: Sequence[bytes]) -> None:
        """Return once ``lines`` are durable in the spool. Every call must come from one event loop at a time (the
        service's); a new loop may take over once the last one's puts are answered.

        Raises:
            NotDurableError: the put covering them failed (none of them is durable), or the process is closed or gone.
        """
        loop = asyncio.get_running_loop()
        if self._puts is None:
            raise NotDurableError("the meter-event delivery process is closed")
        if self._broken is not None:
            raise NotDurableError(self._broken)
        if loop is not self._loop:
            self._attach(loop)
        future: asyncio.Future[None] = loop.create_future()
        self._queued_lines.extend(lines)
        self._queued.append(future)
        if self._in_flight is None:
            self._send_queued()
        await future

    def _attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Watch the put socket from ``loop``. A previous loop with requests waiting must be closed: they are gone
        with it (never answered 200), and the answer of its put in flight, when it comes, is skipped."""
        assert self._puts is not None
        previous = self._loop
        busy = self._in_flight is not None or bool(self._queued)
        if previous is not None and busy and not previous.is_closed():
            raise NotDurableError("meter events are being committed from another event loop that still runs")
        if self._in_flight is not None:
            self._stale_answers += 1
        self._in_flight, self._queued, self._queued_lines = None, [], []
        self._loop = loop
        fd = self._puts.fileno()
        if previous is not None and not previous.is_closed():
            previous.remove_reader(fd)
            previous.remove_writer(fd)
        os.set_blocking(fd, False)
        loop.add_reader(fd, self._on_readable)
        if self._outgoing:  # the rest of a put the previous loop had begun to write
            self._write_outgoing()

    def _send_queued(self) -> None:
        """Send everything queued as one put (called when none is in flight)."""
        queued, lines = self._queued, self._queued_lines
        self._queued, self._queued_lines = [], []
        try:
            payload = _LINES_ENCODER.encode(lines)
            header = _FRAME.pack(len(payload))
        except (struct.error, OverflowError, msgspec.EncodeError) as exc:  # over 4 GiB: nothing of it is sent
            _fail(queued, f"the requests' rows could not be sent ({exc})")
            return
        self._in_flight = queued
        self.puts += 1
        self.lines += len(lines)
        self._outgoing += header
        self._outgoing += payload
        self._write_outgoing()

    def _write_outgoing(self) -> None:
        assert self._puts is not None
        assert self._loop is not None
        fd = self._puts.fileno()
        try:
            while self._outgoing:
                del self._outgoing[: os.write(fd, self._outgoing)]
        except BlockingIOError:
            self._loop.add_writer(fd, self._write_outgoing)
            return
        except OSError:
            self._fail_all(self._gone(wait_s=0.0))
            return
        self._loop.remove_writer(fd)

    def _on_readable(self) -> None:
        assert self._puts is not None
        try:
            while chunk := os.read(self._puts.fileno(), _READ_BYTES):
                self._received += chunk
                if len(chunk) < _READ_BYTES:
                    break
            else:
                self._fail_all(self._gone(wait_s=0.0))
                return
        except BlockingIOError:
            pass
        except OSError:
            self._fail_all(self._gone(wait_s=0.0))
            return
        while len(self._received) >= _FRAME.size:
            (size,) = _FRAME.unpack_from(self._received)
            if len(self._received) < _FRAME.size + size:
                return
            answer = bytes(self._received[_FRAME.size : _FRAME.size + size])
            del self._received[: _FRAME.size + size]
            if self._stale_answers:
                self._stale_answers -= 1
                continue
            self._answered(answer.decode() or None)

    def _answered(self, error: str | None) -> None:
        """The put in flight was answered: answer its requests, then send what queued meanwhile."""
        answered, self._in_flight = self._in_flight or [], None
        for future in answered:
            if future.done():  # the request is gone (its client went away)
                continue
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(NotDurableError(error))
        if self._queued:
            self._send_queued()

    def _fail_all(self, reason: str) -> None:
        """The process is gone: fail every waiting request and refuse the next ones."""
        self._broken = reason
        if self._loop is not None and self._puts is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._puts.fileno())
            self._loop.remove_writer(self._puts.fileno())
        waiting = (self._in_flight or []) + self._queued
        self._in_flight, self._queued, self._queued_lines = None, [], []
        if waiting:
            logger.error("%s (%d requests answered 503)", reason, len(waiting))
        _fail(waiting, reason)

    def flush(self) -> FlushReport:
        """Commit everything acknowledged so far to meter_events (what the stream's ``flush`` does)."""
        report = self._call("flush")
        assert isinstance(report, FlushReport)
        return report

    def flush_pending(self) -> None:
        """Commit what is acknowledged but not committed, if anything (read-your-writes before a usage query)."""
        self._call("flush_pending")

    def stats(self) -> StreamStats:
        """The stream's offsets, pending bytes and lag."""
        stats = self._call("stats")
        assert isinstance(stats, StreamStats)
        return stats

    def settle(self, forward_timeout_s: float) -> FlushReport:
        """Commit everything acknowledged, then let forwarding stage and send what was committed."""
        report = self._call("settle", forward_timeout_s, extra_s=forward_timeout_s)
        assert isinstance(report, FlushReport)
        return report

    def close(self) -> FlushReport | None:
        """Commit what was acknowledged, stop forwarding after its last cycle, and end the process (idempotent).
        Returns the final flush's report (None if the process was gone)."""
        process, control = self._process, self._control
        if process is None or control is None:
            return None
        report: FlushReport | None = None
        try:
            with self._control_lock:
                control.send(("close", None))
                with contextlib.suppress(DeliveryProcessError):  # then the poll below fails too, and says so
                    self._skip_late_answers(control, CLOSE_TIMEOUT_S)
                if control.poll(CLOSE_TIMEOUT_S):
                    kind, detail = control.recv()
                    if kind == "ok" and isinstance(detail, FlushReport):
                        report = detail
                    else:
                        logger.error("the meter-event delivery process failed closing: %s", detail)
                else:
                    logger.error("the meter-event delivery process did not close in %.0f s", CLOSE_TIMEOUT_S)
        except (EOFError, OSError):
            logger.error("%s", self._gone())
        finally:
            self._abandon(wait_s=30.0)
        return report

    def _detach(self) -> None:
        """Leave the loop that commits, on that loop's thread when it runs (its callbacks use the socket)."""
        loop = self._loop
        if loop is None or loop.is_closed() or self._puts is None:
            return
        closed = "the meter-event delivery process is closed"
        try:
            on_loop = asyncio.get_running_loop() is loop
        except RuntimeError:
            on_loop = False
        if on_loop or not loop.is_running():
            self._fail_all(closed)
            return
        done = threading.Event()

        def detach() -> None:
            try:
                self._fail_all(closed)
            finally:
                done.set()

        try:
            loop.call_soon_threadsafe(detach)
        except RuntimeError:  # the loop closed meanwhile: nothing watches the socket any more
            return
        done.wait(5.0)

    def _call(self, kind: str, argument: object = None, *, extra_s: float = 0.0) -> object:
        """Send one control request and wait up to the control timeout (plus ``extra_s``) for its answer, after the
        answers of earlier requests that timed out, which are skipped.

        Raises:
            DeliveryProcessError: the process failed the request, did not answer in time, or is gone.
        """
        timeout_s = self._control_timeout_s + extra_s
        with self._control_lock:
            control = self._control
            if control is None:
                raise DeliveryProcessError("the meter-event delivery process is closed")
            try:
                self._skip_late_answers(control, timeout_s)
                control.send((kind, argument))
                if not control.poll(timeout_s):
                    self._late_answers += 1
                    raise DeliveryProcessError(
                        f"the meter-event delivery process did not answer {kind!r} within {timeout_s:.0f} s "
                        "(it may be committing a large backlog); try again later"
                    )
                answer, detail = control.recv()
            except (EOFError, OSError):
                raise DeliveryProcessError(self._gone()) from None
        if answer != "ok":
            raise DeliveryProcessError(str(detail))
        return detail

    def _skip_late_answers(self, control: Connection, timeout_s: float) -> None:
        """Receive and drop the answers of requests that timed out, waiting up to ``timeout_s`` in all."""
        deadline = time.monotonic() + timeout_s
        while self._late_answers:
            if not control.poll(max(0.0, deadline - time.monotonic())):
                raise DeliveryProcessError(
                    f"the meter-event delivery process is still busy with {self._late_answers} earlier request(s) "
                    f"after {timeout_s:.0f} s; try again later"
                )
            control.recv()
            self._late_answers -= 1

    def _gone(self, wait_s: float = 1.0) -> str:
        """Why nothing more is acknowledged; waits up to ``wait_s`` for the process's exit code (0 on the loop)."""
        process = self._process
        if process is not None:
            process.join(wait_s)
        code = None if process is None else process.exitcode
        how = "is running but does not answer" if code is None else f"exited (code {code})"
        return f"the meter-event delivery process {how}: nothing more is acknowledged until the service restarts"

    def _abandon(self, wait_s: float = 5.0) -> None:
        """Stop watching the put socket (answering what waits 503), close the pipes, and reap the process (killing it
        after ``wait_s``)."""
        self._detach()
        process, puts, control = self._process, self._puts, self._control
        self._puts = self._control = None
        for connection in (puts, control):
            if connection is not None:
                connection.close()
        if process is not None:
            process.join(wait_s)
            if process.exitcode is None:
                process.kill()
                process.join(5.0)


def _fail(futures: list[asyncio.Future[None]], reason: str) -> None:
    for future in futures:
        if not future.done():
            future.set_exception(NotDurableError(reason))


def _close_pipes(*connections: Connection | socket.socket) -> None:
    for connection in connections:
        connection.close()


# -- in the process ---------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Parts:
    stream: DeliveryStream
    forwarding: ForwardingWorker | None
    closers: list[Callable[[], object]]


def _run(start: _Start, puts: socket.socket, control: Connection) -> None:
    """The process's body: open the stream, answer puts on a thread and control requests here until close."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL_S))
    closing = threading.Event()
    try:
        parts = _open(start)
    except Exception as exc:  # the service raises it as the start's error
        control.send(("error", str(exc)))
        return
    control.send(("ready", os.getpid()))
    # What opening made lives as long as the process: frozen, full collections do not walk it.
    gc.collect()
    gc.freeze()
    put_lock = threading.Lock()
    threading.Thread(
        target=_answer_puts, args=(parts.stream, puts, closing, put_lock), name="meter-event-puts", daemon=True
    ).start()
    _answer_control(parts, control, closing, put_lock)


def _open(start: _Start) -> _Parts:
    closers: list[Callable[[], object]] = []
    forwarding: ForwardingWorker | None = None
    config, data_dir = start.config, start.data_dir

    def load_table() -> Table:
        return ensure_meter_events_table(open_catalog(data_dir), config)

    try:
        # The outbox is the table's incremental reader whether or not this process forwards: maintenance keeps what
        # it has not staged.
        outbox = meter_events_outbox(data_dir, start.amberflo or config.amberflo)
        closers.append(outbox.close)
        if start.amberflo is not None:
            forwarder = Forwarder(start.amberflo)
            closers.append(forwarder.close)
            forwarding = ForwardingWorker(
                outbox,
                load_table=load_table,
                forwarder=forwarder,
                api_key=start.amberflo_api_key,
            )
            forwarding.start()
            closers.append(forwarding.stop)
        wake = forwarding.wake if forwarding is not None else None
        stream = _open_waiting(start, on_commit=None if wake is None else lambda _snapshot: wake())
        stream.start()
        maintenance = MaintenanceWorker(
            data_dir,
            load_table=load_table,
            retention=Retention.from_config(config),
            readers=lambda: [outbox.status().checkpoint_snapshot_id],
            interval_s=start.maintenance_interval_s,
        )
        maintenance.start()
        closers.append(maintenance.stop)
        return _Parts(stream, forwarding, closers)
    except BaseException:
        _close_all(closers)
        raise


def _open_waiting(start: _Start, on_commit: Callable[[int], None] | None) -> DeliveryStream:
    """Open the stream, waiting up to ``spool_wait_s`` for a process that a restart raced to let go of the spool."""
    deadline = time.monotonic() + start.spool_wait_s
    while True:
        try:
            return open_meter_event_stream(start.config, start.data_dir, on_commit=on_commit)
        except StreamInUseError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.1)


def _answer_puts(stream: DeliveryStream, puts: socket.socket, closing: threading.Event, lock: threading.Lock) -> None:
    """Answer each put (empty once durable, else why none of it is), until the service closes the pipe."""
    try:
        while True:
            try:
                lines = _LINES_DECODER.decode(_receive_frame(puts))
            except (EOFError, OSError):
                if closing.is_set():
                    return
                os._exit(3)  # the service died: what was acknowledged is in the spool; the next start resumes it
            with lock:  # a put is in the spool before close's final flush, or refused
                if closing.is_set():
                    answer = b"the meter-event delivery process is closing"
                else:
                    try:
                        stream.put_records(lines)
                    except Exception as exc:  # the service answers 503 with it; nothing of the put is kept
                        answer = (str(exc) or type(exc).__name__).encode()
                    else:
                        answer = b""
            puts.sendall(_FRAME.pack(len(answer)) + answer)
    except BaseException:  # e.g. a frame that does not decode: exit, so the service sees it and answers 503
        logger.exception("the meter-event delivery process stops answering puts")
        os._exit(4)


def _receive_frame(puts: socket.socket) -> bytes:
    """The next frame's payload from the put socket (blocking).

    Raises:
        EOFError: the service closed its end.
    """
    (size,) = _FRAME.unpack(_receive_exactly(puts, _FRAME.size))
    return _receive_exactly(puts, size)


def _receive_exactly(puts: socket.socket, size: int) -> bytes:
    buffer = bytearray(size)
    view = memoryview(buffer)
    while view:
        received = puts.recv_into(view)
        if received == 0:
            raise EOFError("the put socket was closed")
        view = view[received:]
    return bytes(buffer)


def _answer_control(parts: _Parts, control: Connection, closing: threading.Event, put_lock: threading.Lock) -> None:
    stream = parts.stream
    while True:
        try:
            kind, argument = control.recv()
        except (EOFError, OSError):
            os._exit(3)  # the service died (see _answer_puts)
        try:
            if kind == "close":
                with put_lock:
                    closing.set()
                try:
                    detail: object = stream.close()
                finally:
                    _close_all(parts.closers)
                control.send(("ok", detail))
                return
            if kind == "flush":
                detail = stream.flush()
            elif kind == "flush_pending":
                detail = stream.flush() if stream.stats().pending_bytes > 0 else None
            elif kind == "stats":
                detail = stream.stats()
            elif kind == "settle":
                detail = stream.flush()
                if parts.forwarding is not None:
                    parts.forwarding.wait_for_cycle(float(str(argument)))
            else:
                raise ValueError(f"unknown request {kind!r}")
        except Exception as exc:  # answered, and the process goes on
            control.send(("error", f"{type(exc).__name__}: {exc}"))
            if kind == "close":
                return
        else:
            control.send(("ok", detail))


def _close_all(closers: list[Callable[[], object]]) -> None:
    while closers:
        try:
            closers.pop()()
        except Exception:
            logger.exception("closing the meter-event delivery process")

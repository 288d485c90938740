"""Group commit: many requests' rows made durable by one put (one fsync) of the local delivery stream.

:meth:`GroupCommitSink.commit` queues a request's lines and waits. A writer thread takes everything queued, puts it
(one write, one fdatasync) and answers those requests; whatever was queued meanwhile is the next put, so concurrent
requests share an fsync, and the event loop checks the next requests while the disk syncs the previous ones instead
of standing still for the sync (1-4 ms on a busy disk). The writer answers each put's requests with one wake-up of
their loop. A put either keeps every line or none (the stream's guarantee), so a failed put fails all its requests
(503) and keeps nothing. The stream's backpressure (a put waits while too much is spooled but not yet committed)
holds up the writer, not the loop: requests queue while it waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Sequence
from typing import Protocol

from meterlake.service.ingest import NotDurableError

logger = logging.getLogger(__name__)

_JOIN_TIMEOUT_S = 30.0

_Waiter = tuple[Sequence[bytes], asyncio.Future[None], asyncio.AbstractEventLoop]


class LineSink(Protocol):
    """Where the lines go: ``put_records`` of the delivery process (the service's) or of a delivery stream (tests),
    durable when it returns."""

    def put_records(self, lines: Sequence[bytes]) -> None:
        """Make all of ``lines`` durable, or raise having kept none."""


class GroupCommitSink:
    """The service's :class:`~meterlake.service.ingest.EventSink` over a local delivery stream."""

    def __init__(self, stream: LineSink) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        self._queued = threading.Condition(self._lock)
        self._waiting: list[_Waiter] = []
        self._closed = False
        #: Puts made and lines put, for tests and benchmarks (how well commits were grouped).
        self.puts = 0
        self.lines = 0
        self._writer = threading.Thread(target=self._run, name="meter-event-writer", daemon=True)
        self._writer.start()

    async def commit(self, lines: Sequence[bytes]) -> None:
        """Return once ``lines`` are durable.

        Raises:
            NotDurableError: the put covering them failed (none of them is durable), or the sink is closed.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with self._lock:
            if self._closed:
                raise NotDurableError("the meter-event writer is closed")
            self._waiting.append((lines, future, loop))
            if len(self._waiting) == 1:
                self._queued.notify()
        await future

    def close(self) -> None:
        """Refuse new lines, put the queued ones, and stop the writer (idempotent).

        Raises:
            RuntimeError: the writer did not stop within 30 s (a put hangs on the disk).
        """
        with self._lock:
            self._closed = True
            self._queued.notify()
        self._writer.join(_JOIN_TIMEOUT_S)
        if self._writer.is_alive():
            raise RuntimeError("the meter-event writer did not stop: a put hangs on the disk")

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._waiting and not self._closed:
                    self._queued.wait()
                if not self._waiting:
                    return
                waiting, self._waiting = self._waiting, []
            self._put(waiting)

    def _put(self, waiting: list[_Waiter]) -> None:
        lines = [line for batch, _, _ in waiting for line in batch]
        error: NotDurableError | None = None
        try:
            self._stream.put_records(lines)
            self.puts += 1
            self.lines += len(lines)
        except Exception as exc:  # every failure of the put means nothing of it is durable
            logger.error("meter events not made durable (%d requests answered 503): %s", len(waiting), exc)
            error = NotDurableError(str(exc))
        by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
        for _, future, loop in waiting:
            by_loop.setdefault(loop, []).append(future)
        for loop, futures in by_loop.items():
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits for these any more
                loop.call_soon_threadsafe(_answer, futures, error)


def _answer(futures: list[asyncio.Future[None]], error: NotDurableError | None) -> None:
    for future in futures:
        if future.done():  # the request is gone (its client went away)
            continue
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(NotDurableError(str(error)))

"""Group commit: many requests' rows made durable by one put (one fsync) of the local delivery stream.

:meth:`GroupCommitSink.commit` queues a request's lines and waits; one writer thread takes every batch waiting when
it starts a put and hands them to the stream in one call, so concurrent requests share one fsync. A put either keeps
every line or none (the stream's guarantee), so a failed put fails all its requests (503) and keeps nothing.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
from collections.abc import Sequence
from typing import Protocol

from meterlake.service.ingest import NotDurableError

logger = logging.getLogger(__name__)

#: Most lines in one put; more waiting lines go into the next one.
MAX_PUT_LINES = 20_000


class LineSink(Protocol):
    """Where the lines go: the delivery stream's ``put_records`` (durable when it returns)."""

    def put_records(self, lines: Sequence[bytes]) -> None:
        """Make all of ``lines`` durable, or raise having kept none."""


class _Waiting:
    __slots__ = ("future", "lines", "loop")

    def __init__(self, lines: Sequence[bytes], future: asyncio.Future[None], loop: asyncio.AbstractEventLoop) -> None:
        self.lines = lines
        self.future = future
        self.loop = loop


class GroupCommitSink:
    """The service's :class:`~meterlake.service.ingest.EventSink` over a local delivery stream."""

    def __init__(self, stream: LineSink, *, max_put_lines: int = MAX_PUT_LINES) -> None:
        self._stream = stream
        self._max_put_lines = max_put_lines
        self._cond = threading.Condition()
        self._queue: collections.deque[_Waiting] = collections.deque()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="meter-event-writer", daemon=True)
        self._thread.start()
        #: Puts made and lines put, for tests and benchmarks (how well commits were grouped).
        self.puts = 0
        self.lines = 0

    async def commit(self, lines: Sequence[bytes]) -> None:
        """Return once ``lines`` are durable.

        Raises:
            NotDurableError: the put covering them failed; none of them is durable.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with self._cond:
            if self._closing:
                raise NotDurableError("the meter-event writer is closed")
            self._queue.append(_Waiting(lines, future, loop))
            self._cond.notify()
        await future

    def close(self) -> None:
        """Put what is queued, then stop the writer (idempotent)."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    return
                batch = [self._queue.popleft()]
                size = len(batch[0].lines)
                while self._queue and size + len(self._queue[0].lines) <= self._max_put_lines:
                    waiting = self._queue.popleft()
                    size += len(waiting.lines)
                    batch.append(waiting)
            error: BaseException | None = None
            try:
                self._stream.put_records([line for waiting in batch for line in waiting.lines])
                self.puts += 1
                self.lines += size
            except Exception as exc:  # every failure of the put means nothing of it is durable
                logger.error("meter events not made durable (%d requests answered 503): %s", len(batch), exc)
                error = exc
            for waiting in batch:
                with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
                    waiting.loop.call_soon_threadsafe(_resolve, waiting.future, error)


def _resolve(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(NotDurableError(str(error)))

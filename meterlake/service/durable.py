"""Group commit: many requests' rows made durable by one put (one fsync) of the local delivery stream.

:meth:`GroupCommitSink.commit` queues a request's lines and waits. The first request queued in an iteration of the
event loop schedules one put at the end of the loop's ready callbacks, so every request whose body arrived meanwhile
joins it: concurrent requests share one fsync. The put runs on the loop itself and blocks it for the write and
fdatasync (~0.1-0.3 ms here): a writer thread would instead wait for the GIL behind the loop's own work, up to the
interpreter's switch interval (5 ms) per put, and every acknowledgement waits for the put. A put either keeps every
line or none (the stream's guarantee), so a failed put fails all its requests (503) and keeps nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Protocol

from meterlake.service.ingest import NotDurableError

logger = logging.getLogger(__name__)


class LineSink(Protocol):
    """Where the lines go: the delivery stream's ``put_records`` (durable when it returns)."""

    def put_records(self, lines: Sequence[bytes]) -> None:
        """Make all of ``lines`` durable, or raise having kept none."""


class GroupCommitSink:
    """The service's :class:`~meterlake.service.ingest.EventSink` over a local delivery stream."""

    def __init__(self, stream: LineSink) -> None:
        self._stream = stream
        self._waiting: list[tuple[Sequence[bytes], asyncio.Future[None]]] = []
        self._scheduled = False
        self._closed = False
        #: Puts made and lines put, for tests and benchmarks (how well commits were grouped).
        self.puts = 0
        self.lines = 0

    async def commit(self, lines: Sequence[bytes]) -> None:
        """Return once ``lines`` are durable.

        Raises:
            NotDurableError: the put covering them failed (none of them is durable), or the sink is closed.
        """
        if self._closed:
            raise NotDurableError("the meter-event writer is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._waiting.append((lines, future))
        if not self._scheduled:
            self._scheduled = True
            # Two hops: the requests whose bodies arrived in this iteration reach commit() in the next one.
            loop.call_soon(loop.call_soon, self._put)
        await future

    def close(self) -> None:
        """Refuse new lines (the queued ones are put by their loop, which is still running or gone)."""
        self._closed = True

    def _put(self) -> None:
        waiting, self._waiting, self._scheduled = self._waiting, [], False
        lines = [line for batch, _ in waiting for line in batch]
        error: BaseException | None = None
        try:
            self._stream.put_records(lines)
            self.puts += 1
            self.lines += len(lines)
        except Exception as exc:  # every failure of the put means nothing of it is durable
            logger.error("meter events not made durable (%d requests answered 503): %s", len(waiting), exc)
            error = exc
        for _, future in waiting:
            if future.done():  # the request is gone (its client went away)
                continue
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(NotDurableError(str(error)))

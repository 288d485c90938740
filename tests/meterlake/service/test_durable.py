"""Group commit: concurrent requests share puts, and a failed put fails every request in it."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import pytest

from meterlake.service.durable import GroupCommitSink
from meterlake.service.ingest import NotDurableError


class SlowDisk:
    """A stream whose put takes a while (an fsync), recording every put; it can be made to fail."""

    def __init__(self) -> None:
        self.puts: list[list[bytes]] = []
        self.failing = False
        self._lock = threading.Lock()

    def put_records(self, lines: Sequence[bytes]) -> None:
        threading.Event().wait(0.01)
        if self.failing:
            raise OSError(28, "No space left on device")
        with self._lock:
            self.puts.append(list(lines))


async def _commit_all(sink: GroupCommitSink, batches: list[list[bytes]]) -> list[BaseException | None]:
    return await asyncio.gather(*(sink.commit(batch) for batch in batches), return_exceptions=True)


def test_concurrent_commits_share_puts_and_each_returns_once_durable() -> None:
    disk = SlowDisk()
    sink = GroupCommitSink(disk)
    batches = [[f"{i}-{j}".encode() for j in range(3)] for i in range(50)]
    try:
        results = asyncio.run(_commit_all(sink, batches))
    finally:
        sink.close()
    assert results == [None] * 50
    put = [line for lines in disk.puts for line in lines]
    assert sorted(put) == sorted(line for batch in batches for line in batch)
    assert len(disk.puts) < 50  # grouped: fewer puts (fsyncs) than requests
    assert (sink.puts, sink.lines) == (len(disk.puts), 150)


def test_a_failed_put_fails_every_request_in_it_and_the_next_ones_succeed() -> None:
    disk = SlowDisk()
    sink = GroupCommitSink(disk)
    try:
        disk.failing = True
        failed = asyncio.run(_commit_all(sink, [[b"a"], [b"b"]]))
        assert all(isinstance(result, NotDurableError) for result in failed)
        assert disk.puts == []
        disk.failing = False
        assert asyncio.run(_commit_all(sink, [[b"c"]])) == [None]
    finally:
        sink.close()
    assert disk.puts == [[b"c"]]
    with pytest.raises(NotDurableError, match="closed"):
        asyncio.run(sink.commit([b"d"]))

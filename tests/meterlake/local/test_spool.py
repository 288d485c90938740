"""The spool: durable group-committed appends, monotonic offsets, torn tails cut on open, segment GC, one owner."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from meterlake.local.spool import (
    HEADER_BYTES,
    Spool,
    SpoolCorruptError,
    SpoolInUseError,
    SpoolOffsetError,
)


def _records(n: int, prefix: str = "r") -> list[bytes]:
    return [f"{prefix}-{i}-{'x' * (i % 17)}".encode() for i in range(n)]


def test_append_then_read_round_trips_records_offsets_and_arrival(tmp_path: Path) -> None:
    records = _records(50)
    with Spool(tmp_path) as spool:
        end = spool.append(records, arrival_ms=1_700_000_000_123)
        batch = spool.read(0, 1 << 20)
    assert batch.records == records
    assert batch.arrivals_ms == [1_700_000_000_123] * 50
    assert batch.end == end == sum(HEADER_BYTES + len(r) for r in records)
    assert batch.offsets[0] == 0
    assert all(b > a for a, b in zip(batch.offsets, batch.offsets[1:], strict=False))


def test_offsets_only_grow_and_a_read_resumes_where_the_last_ended(tmp_path: Path) -> None:
    with Spool(tmp_path, segment_bytes=256) as spool:
        ends = [spool.append(_records(5, prefix=str(i))) for i in range(20)]
        assert ends == sorted(ends)
        assert len(set(ends)) == len(ends)
        seen: list[bytes] = []
        offset = 0
        while offset < spool.end:
            batch = spool.read(offset, 100)
            assert batch.start == offset
            seen.extend(batch.records)
            offset = batch.end
    assert seen == [r for i in range(20) for r in _records(5, prefix=str(i))]
    assert len(list(tmp_path.glob("*.seg"))) > 1


def test_read_respects_the_byte_budget_but_always_returns_one_record(tmp_path: Path) -> None:
    big = b"y" * 5000
    with Spool(tmp_path) as spool:
        spool.append([big, b"small"])
        first = spool.read(0, 10)
        rest = spool.read(first.end, 1 << 20)
    assert first.records == [big]
    assert rest.records == [b"small"]


def test_a_fresh_process_view_sees_everything_append_acknowledged(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    end = spool.append(_records(10))
    # Read the bytes straight from disk, as a process started after a crash would, before closing anything.
    data = b"".join(p.read_bytes() for p in sorted(tmp_path.glob("*.seg")))
    assert len(data) == end
    spool.close()
    with Spool(tmp_path) as reopened:
        assert reopened.end == end
        assert reopened.read(0, 1 << 20).records == _records(10)


@pytest.mark.parametrize("cut", [1, HEADER_BYTES - 1, HEADER_BYTES + 3])
def test_a_torn_tail_is_cut_off_on_open_and_nothing_before_it_is_lost(tmp_path: Path, cut: int) -> None:
    with Spool(tmp_path) as spool:
        kept_end = spool.append(_records(30))
        spool.append([b"the record being written when the power went"])
    segment = next(tmp_path.glob("*.seg"))
    with open(segment, "r+b") as handle:
        handle.truncate(kept_end + cut)
    with Spool(tmp_path) as reopened:
        assert reopened.end == kept_end
        assert reopened.read(0, 1 << 20).records == _records(30)
        assert reopened.append([b"after"]) > kept_end
        assert reopened.read(kept_end, 1 << 20).records == [b"after"]


def test_a_corrupted_last_frame_is_dropped_on_open(tmp_path: Path) -> None:
    with Spool(tmp_path) as spool:
        kept_end = spool.append(_records(3))
        spool.append([b"garbled"])
    segment = next(tmp_path.glob("*.seg"))
    data = bytearray(segment.read_bytes())
    data[-2] ^= 0xFF
    segment.write_bytes(bytes(data))
    with Spool(tmp_path) as reopened:
        assert reopened.end == kept_end


def test_damage_inside_the_log_is_reported_not_skipped(tmp_path: Path) -> None:
    with Spool(tmp_path, segment_bytes=64) as spool:
        spool.append(_records(4))
        spool.append(_records(4))
    first = sorted(tmp_path.glob("*.seg"))[0]
    data = bytearray(first.read_bytes())
    data[HEADER_BYTES + 1] ^= 0xFF
    first.write_bytes(bytes(data))
    with Spool(tmp_path) as reopened, pytest.raises(SpoolCorruptError) as caught:
        reopened.read(0, 1 << 20)
    assert caught.value.offset == 0


def test_segments_wholly_below_the_committed_offset_are_deleted(tmp_path: Path) -> None:
    with Spool(tmp_path, segment_bytes=100) as spool:
        ends = [spool.append(_records(4, prefix=str(i))) for i in range(6)]
        before = spool.segment_paths()
        deleted = spool.delete_below(ends[3])
        after = spool.segment_paths()
        assert deleted == len(before) - len(after) > 0
        assert all(not p.exists() for p in before[:deleted])
        assert spool.start <= ends[3]
        assert spool.read(ends[3], 1 << 20).records == [r for i in (4, 5) for r in _records(4, prefix=str(i))]
        with pytest.raises(SpoolOffsetError):
            spool.read(0, 10)
        # The active segment stays even when everything is committed, so offsets keep growing.
        spool.delete_below(spool.end)
        assert len(spool.segment_paths()) == 1
        assert spool.append([b"next"]) > ends[-1]


def test_an_empty_spool_starts_at_the_initial_offset(tmp_path: Path) -> None:
    with Spool(tmp_path, initial_offset=12345) as spool:
        assert spool.start == spool.end == 12345
        assert spool.append([b"a"]) == 12345 + HEADER_BYTES + 1


def test_a_second_owner_is_refused_with_the_holders_pid(tmp_path: Path) -> None:
    with Spool(tmp_path), pytest.raises(SpoolInUseError) as caught:
        Spool(tmp_path)
    assert caught.value.pid == os.getpid()
    assert str(os.getpid()) in str(caught.value)
    with Spool(tmp_path) as again:
        assert again.end == 0


def test_concurrent_appends_and_reads_keep_every_record(tmp_path: Path) -> None:
    with Spool(tmp_path, segment_bytes=4096) as spool:

        def writer(name: str) -> None:
            for i in range(40):
                spool.append(_records(5, prefix=f"{name}{i}"))

        threads = [threading.Thread(target=writer, args=(n,)) for n in "abc"]
        for thread in threads:
            thread.start()
        seen: list[bytes] = []
        offset = 0
        while any(t.is_alive() for t in threads) or offset < spool.end:
            batch = spool.read(offset, 2048)
            seen.extend(batch.records)
            offset = batch.end
        for thread in threads:
            thread.join()
        seen.extend(spool.read(offset, 1 << 30).records)
    expected = {r for n in "abc" for i in range(40) for r in _records(5, prefix=f"{n}{i}")}
    assert sorted(seen) == sorted(expected)

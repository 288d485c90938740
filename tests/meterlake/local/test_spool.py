"""The spool: durable group-committed appends, monotonic offsets, torn tails cut on open, segment GC, one owner;
appends the disk refuses leave nothing behind; damage is refused at open and repaired by quarantine, never by
truncation."""

from __future__ import annotations

import errno
import itertools
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from meterlake.local.spool import (
    HEADER_BYTES,
    QUARANTINE_DIR,
    Spool,
    SpoolCorruptError,
    SpoolDamagedError,
    SpoolFullError,
    SpoolInUseError,
    SpoolOffsetError,
    SpoolWriteError,
    read_range,
)

REPO_ROOT = Path(__file__).resolve().parents[3]


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


def test_damage_found_while_reading_names_the_file_and_byte(tmp_path: Path) -> None:
    with Spool(tmp_path, segment_bytes=64) as spool:
        spool.append(_records(4))
        spool.append(_records(4))
        first = sorted(tmp_path.glob("*.seg"))[0]
        data = bytearray(first.read_bytes())
        data[HEADER_BYTES + 1] ^= 0xFF
        first.write_bytes(bytes(data))
        with pytest.raises(SpoolCorruptError) as caught:
            spool.read(0, 1 << 20)
    assert (caught.value.offset, caught.value.file_offset) == (0, 0)
    assert f"spool segment {first} is damaged at byte 0" in str(caught.value)


def test_a_range_is_read_by_another_reader_as_the_spool_reads_it_across_segments(tmp_path: Path) -> None:
    """What a worker process reads of ``Spool.range`` (no lock, from the files) is what ``read`` returns, across
    segment files, and a range that does not start or end on a frame boundary is refused."""
    with Spool(tmp_path, segment_bytes=100) as spool:
        ends = [spool.append(_records(4, prefix=str(i))) for i in range(6)]
        spool_range = spool.range(ends[0], ends[4])
        assert len(spool_range.segments) > 1  # the range spans several segment files
        batch = read_range(spool_range)
        expected = spool.read(ends[0], ends[4] - ends[0])
        assert (batch.start, batch.end) == (ends[0], ends[4])
        assert (batch.offsets, batch.arrivals_ms, batch.records) == (
            expected.offsets,
            expected.arrivals_ms,
            expected.records,
        )
        assert batch.records == [r for i in (1, 2, 3, 4) for r in _records(4, prefix=str(i))]
        with pytest.raises(SpoolCorruptError):
            read_range(spool.range(ends[0], ends[1] - 1))  # the last frame runs past the range's end
        with pytest.raises(SpoolOffsetError):
            spool.range(ends[0], spool.end + 1)
        with pytest.raises(ValueError, match="empty"):
            spool.range(ends[1], ends[1])


def test_a_range_read_after_open_finds_damage_done_since(tmp_path: Path) -> None:
    """A byte flipped after the spool was opened (open checked it) fails the range's read, naming file and byte."""
    with Spool(tmp_path) as spool:
        first = spool.append(_records(4))
        end = spool.append(_records(4, prefix="s"))
        segment = sorted(tmp_path.glob("*.seg"))[0]
        data = bytearray(segment.read_bytes())
        data[first + HEADER_BYTES + 2] ^= 0xFF
        segment.write_bytes(bytes(data))
        assert read_range(spool.range(0, first)).records == _records(4)
        with pytest.raises(SpoolCorruptError) as caught:
            read_range(spool.range(first, end))
    assert (caught.value.offset, caught.value.file_offset) == (first, first)
    assert "checksum mismatch" in str(caught.value)


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


# -- a full disk ------------------------------------------------------------------------------------------------------

#: Appends batches under a file-size limit (RLIMIT_FSIZE, with SIGXFSZ ignored so write() fails with EFBIG the way it
#: fails with ENOSPC on a full disk: a short write, then the error), lifts the limit, and appends again.
_FULL_DISK_SCRIPT = """
import json, os, resource, signal, sys
from pathlib import Path
from meterlake.local.spool import Spool

directory, limit = Path(sys.argv[1]), int(sys.argv[2])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
_, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
acked, refusals = [], []

def append(spool, batch):
    try:
        spool.append(batch)
    except Exception as exc:
        segment = spool.segment_paths()[-1]
        refusals.append({"type": type(exc).__name__, "message": str(exc), "errno": getattr(exc, "errno", None),
                         "segment": str(segment), "size": segment.stat().st_size, "end": spool.end})
    else:
        acked.extend(record.decode() for record in batch)

with Spool(directory) as spool:
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    for i in range(10):
        append(spool, [f"full-{i}-{j}-{'x' * 40}".encode() for j in range(7)])
    append(spool, [b"a small batch that still fits"])
    resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
    for i in range(3):
        append(spool, [f"after-{i}-{j}".encode() for j in range(5)])
print(json.dumps({"acked": acked, "refusals": refusals}))
"""


def test_an_append_the_disk_refuses_keeps_nothing_and_later_appends_lose_nothing(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _FULL_DISK_SCRIPT, str(tmp_path), "4000"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=60,
        check=True,
    )
    outcome = json.loads(done.stdout)
    acked: list[str] = outcome["acked"]
    refusals: list[dict[str, object]] = outcome["refusals"]
    with Spool(tmp_path) as reopened:
        kept = [r.decode() for r in reopened.read(reopened.start, 1 << 20).records]
    assert kept == acked, "an acknowledged record is missing, or a refused one was kept"
    full_batches = [i for i in range(10) if f"full-{i}-0-{'x' * 40}" in acked]
    assert full_batches == list(range(len(full_batches))), "a batch after a refused one went in"
    assert len(refusals) == 10 - len(full_batches) >= 2
    assert "a small batch that still fits" in acked
    assert [a for a in acked if a.startswith("after-")] == [f"after-{i}-{j}" for i in range(3) for j in range(5)]
    for refusal in refusals:
        assert refusal["type"] == SpoolFullError.__name__
        assert refusal["errno"] == errno.EFBIG
        assert refusal["size"] == refusal["end"], "a refused append left bytes in the segment"
        assert f"spool segment {refusal['segment']} has no room" in str(refusal["message"])
        assert "EFBIG" in str(refusal["message"])


def test_a_failed_sync_leaves_the_segment_as_it_was(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_fdatasync = os.fdatasync
    failures = [OSError(errno.EIO, os.strerror(errno.EIO))]

    def failing_once(fd: int) -> None:
        if failures:
            raise failures.pop()
        real_fdatasync(fd)

    with Spool(tmp_path) as spool:
        kept_end = spool.append(_records(3))
        monkeypatch.setattr(os, "fdatasync", failing_once)
        with pytest.raises(SpoolWriteError) as caught:
            spool.append([b"never acknowledged"])
        assert not isinstance(caught.value, SpoolFullError)
        assert caught.value.errno == errno.EIO
        assert "EIO" in str(caught.value)
        assert spool.end == kept_end == spool.segment_paths()[-1].stat().st_size
        end = spool.append([b"acknowledged"])
    with Spool(tmp_path) as reopened:
        assert reopened.end == end
        assert reopened.read(0, 1 << 20).records == [*_records(3), b"acknowledged"]


# -- damage -----------------------------------------------------------------------------------------------------------


def _flip(path: Path, file_offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[file_offset] ^= 0x5A
    path.write_bytes(bytes(data))


#: Where in a frame a byte is flipped: the length (runs past the end, or short), the checksum, the arrival time, the
#: payload.
_FRAME_FIELDS = {"length-high": 3, "length-low": 0, "crc": 5, "arrival": 9, "payload": HEADER_BYTES + 2}


@pytest.mark.parametrize("field", sorted(_FRAME_FIELDS))
def test_a_flipped_byte_mid_segment_is_refused_at_open_and_the_file_is_left_alone(tmp_path: Path, field: str) -> None:
    records = _records(30)
    with Spool(tmp_path) as spool:
        spool.append(records)
        offsets = spool.read(0, 1 << 20).offsets
    segment = next(tmp_path.glob("*.seg"))
    damaged_at = offsets[12]
    _flip(segment, damaged_at + _FRAME_FIELDS[field])
    before = segment.read_bytes()
    with pytest.raises(SpoolDamagedError) as caught:
        Spool(tmp_path)
    assert segment.read_bytes() == before, "refusing must not change the segment"
    damage = caught.value.damages[0]
    assert (damage.path, damage.file_offset, damage.resume_file_offset) == (segment, damaged_at, offsets[13])
    assert str(caught.value).startswith(
        f"spool segment {segment} is damaged at byte {damaged_at} (log offset {damaged_at}): "
        f"{offsets[13] - damaged_at} bytes unreadable, readable frames resume at byte {offsets[13]}"
    )


def test_repair_quarantines_the_damaged_segment_and_keeps_every_readable_record(tmp_path: Path) -> None:
    records = _records(30)
    with Spool(tmp_path) as spool:
        spool.append(records)
        batch = spool.read(0, 1 << 20)
    segment = next(tmp_path.glob("*.seg"))
    _flip(segment, batch.offsets[12] + HEADER_BYTES + 2)
    damaged_bytes = segment.read_bytes()
    with Spool(tmp_path, repair=True) as repaired:
        assert [r.path for r in repaired.repairs] == [segment]
        repair = repaired.repairs[0]
        again = repaired.read(0, 1 << 20)
        assert again.records == records[:12] + records[13:]
        assert again.offsets == batch.offsets[:12] + batch.offsets[13:], "offsets after the damage must not move"
        end = repaired.append([b"after the repair"])
        # Only the spool's own reads skip padding: a range over the repaired bytes is not handed to another reader.
        with pytest.raises(ValueError, match="padding"):
            repaired.range(0, end)
        assert read_range(repaired.range(batch.offsets[13], end)).records == [*records[13:], b"after the repair"]
    assert repair.copy.parent == tmp_path / QUARANTINE_DIR
    assert repair.copy.read_bytes() == damaged_bytes
    note = json.loads(repair.note.read_text())
    assert note["damaged"] == [
        {
            "file_offset": batch.offsets[12],
            "length": batch.offsets[13] - batch.offsets[12],
            "log_offset": batch.offsets[12],
        }
    ]
    with Spool(tmp_path) as reopened:
        assert reopened.repairs == []
        assert reopened.end == end
        assert reopened.read(0, 1 << 20).records == [*records[:12], *records[13:], b"after the repair"]
        # A read from inside the repaired range (a commit point lost in the damage) continues after it.
        assert reopened.read(batch.offsets[12] + 1, 1 << 20).records == [*records[13:], b"after the repair"]


def test_a_zeroed_page_across_sealed_segments_is_repaired_around(tmp_path: Path) -> None:
    with Spool(tmp_path, segment_bytes=8192) as spool:
        for i in range(24):
            spool.append(_records(40, prefix=str(i)))
        everything = spool.read(0, 1 << 30)
    segments = sorted(tmp_path.glob("*.seg"))
    assert len(segments) >= 3
    victim = segments[1]
    start = int(victim.name.removesuffix(".seg"))
    data = bytearray(victim.read_bytes())
    data[1000:5096] = bytes(4096)
    victim.write_bytes(bytes(data))
    with pytest.raises(SpoolDamagedError) as caught:
        Spool(tmp_path)
    assert caught.value.damages[0].path == victim
    assert caught.value.damages[0].file_offset <= 1000
    with Spool(tmp_path, repair=True) as repaired:
        kept = repaired.read(0, 1 << 30)
    bounds = [*everything.offsets, everything.end]
    lost = {o for o, stop in itertools.pairwise(bounds) if o < start + 5096 and stop > start + 1000}
    survivors = [(o, r) for o, r in zip(everything.offsets, everything.records, strict=True) if o not in lost]
    assert list(zip(kept.offsets, kept.records, strict=True)) == survivors


def test_a_sealed_segment_cut_short_is_damage_not_a_torn_tail(tmp_path: Path) -> None:
    with Spool(tmp_path, segment_bytes=512) as spool:
        for i in range(6):
            spool.append(_records(8, prefix=str(i)))
        everything = spool.read(0, 1 << 30)
    sealed = sorted(tmp_path.glob("*.seg"))[0]
    size = sealed.stat().st_size
    with open(sealed, "r+b") as handle:
        handle.truncate(size - 5)
    with pytest.raises(SpoolDamagedError) as caught:
        Spool(tmp_path)
    last_frame = max(o for o in everything.offsets if o < size)
    assert (caught.value.damages[0].file_offset, caught.value.damages[0].resume_file_offset) == (last_frame, size)
    with Spool(tmp_path, repair=True) as repaired:
        kept = repaired.read(0, 1 << 30)
    assert kept.records == [r for o, r in zip(everything.offsets, everything.records, strict=True) if o != last_frame]

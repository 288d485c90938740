"""The delivery stream's durable spool: an append-only log of records in segment files under ``DataDir.spool``.

Offsets are byte positions in one logical log that spans the segments: a segment file is named by the offset of its
first byte, a record's offset is where its frame starts, and ``append`` returns the offset just past the last frame.
Offsets therefore only grow, survive segment deletion and say how many bytes are pending (``end - committed``).

Each frame is ``length:u32 | crc32:u32 | arrival_ms:i64 | payload``, the CRC covering arrival time and payload. Frames
are self-delimiting, and open checks every one of them:

- a torn tail (an append a crash interrupted: no valid frame follows the first bad one in the last segment) was
  never acknowledged, and is cut off;
- anything else that fails its checksum is damage: a bad frame that valid frames follow (found by scanning for the
  next header whose checksum matches), any bad frame in a sealed segment, or a sealed segment cut short. Open refuses
  with :class:`SpoolDamagedError`, naming the file and byte, and changes nothing. Opened with ``repair=True``, the
  spool hard-links each damaged segment into ``quarantine/`` with a JSON note of its damaged ranges, then replaces
  each range in place with a padding frame of the same size: every readable record keeps its offset (which the
  table's commits refer to) and is delivered; ``read`` never returns padding.

``append`` writes a whole batch with one ``fdatasync`` (group commit) before it returns. If the disk refuses the write
or the sync (a full disk writes part of a batch, then fails), the segment is cut back to where the batch began and
the append raises, :class:`SpoolFullError` when out of space: a refused batch leaves no partial frame for later,
acknowledged ones to sit behind, and appends succeed again as soon as there is room. One process at a time: an
exclusive ``flock`` on ``LOCK`` names the holder's pid.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import fcntl
import itertools
import json
import logging
import os
import re
import shutil
import struct
import threading
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType

logger = logging.getLogger(__name__)

_HEADER = struct.Struct("<IIq")
HEADER_BYTES = _HEADER.size
_ARRIVAL = struct.Struct("<q")
_SEGMENT_SUFFIX = ".seg"
_SEGMENT_DIGITS = 20
LOCK_FILE = "LOCK"
#: Where repair keeps damaged segments (hard links to the original bytes) and a JSON note of each one's damage.
QUARANTINE_DIR = "quarantine"
#: The arrival time that marks a padding frame: it stands in for a damaged range, and ``read`` skips it.
_PADDING_ARRIVAL = -(1 << 63)
#: Errors that mean "no room" (a full disk or quota, a file-size limit): the caller can free space and retry.
_OUT_OF_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
#: A frame header always holds a non-zero byte (the CRC of an empty frame's zero arrival time is not zero), so a
#: resynchronising scan jumps over runs of zeros.
_NON_ZERO = re.compile(rb"[^\x00]")

#: A segment is closed and a new one started once it holds this many bytes (a batch never spans two segments).
DEFAULT_SEGMENT_BYTES = 64 * 1024 * 1024
_MAX_RECORD = 0xFFFFFFFF


class SpoolError(Exception):
    """Base of the spool's errors."""


class SpoolInUseError(SpoolError):
    """Another process (or another open Spool) holds the spool's lock."""

    def __init__(self, directory: Path, pid: int | None) -> None:
        holder = f"pid {pid}" if pid is not None else "another process"
        super().__init__(f"the delivery stream in {directory} is in use by {holder}")
        self.directory = directory
        self.pid = pid


class SpoolCorruptError(SpoolError):
    """A frame fails its checksum or runs past its segment, or the segments overlap.

    ``offset`` is the log offset of the damage, ``file_offset`` the byte within ``path``.
    """

    def __init__(self, path: Path, offset: int, problem: str, *, file_offset: int) -> None:
        super().__init__(f"spool segment {path} is damaged at byte {file_offset} (log offset {offset}): {problem}")
        self.path = path
        self.offset = offset
        self.file_offset = file_offset


@dataclass(frozen=True, slots=True)
class SpoolDamage:
    """A damaged byte range ``[file_offset, resume_file_offset)`` of a segment file; valid frames resume at its end."""

    path: Path
    segment_start: int
    file_offset: int
    resume_file_offset: int

    @property
    def offset(self) -> int:
        """The log offset of the first damaged byte."""
        return self.segment_start + self.file_offset

    @property
    def length(self) -> int:
        """How many bytes are unreadable."""
        return self.resume_file_offset - self.file_offset

    def describe(self) -> str:
        """The damage in words, for error messages and logs."""
        return f"{self.length} bytes unreadable, readable frames resume at byte {self.resume_file_offset}"


class SpoolDamagedError(SpoolCorruptError):
    """Open found damage (not a torn tail) and changed nothing; ``Spool(..., repair=True)`` repairs it.

    ``damages`` lists every damaged range found, oldest first; the message names the first.
    """

    def __init__(self, damages: Sequence[SpoolDamage]) -> None:
        first = damages[0]
        more = f"; {len(damages) - 1} more damaged ranges after it" if len(damages) > 1 else ""
        super().__init__(first.path, first.offset, first.describe() + more, file_offset=first.file_offset)
        self.damages = tuple(damages)


@dataclass(frozen=True, slots=True)
class SpoolRepair:
    """A segment repaired on open: the damaged file kept as ``copy``, its ranges listed in ``note``, padded in place."""

    path: Path
    copy: Path
    note: Path
    damages: tuple[SpoolDamage, ...]

    def describe(self) -> str:
        """What was skipped and where the damaged file went, for logs and the recovering command's output."""
        ranges = ", ".join(f"{d.length} bytes at byte {d.file_offset}" for d in self.damages)
        return f"spool segment {self.path}: skipped {ranges}; the damaged segment is kept as {self.copy}"


class SpoolWriteError(SpoolError):
    """The disk refused an append (its write or its sync); the segment was cut back, so no byte of the batch is kept."""

    def __init__(self, path: Path, size: int, cause: OSError) -> None:
        code = errno.errorcode.get(cause.errno or 0, str(cause.errno))
        super().__init__(self._describe(path, size, f"{code} ({cause.strerror})"))
        self.path = path
        self.size = size
        self.errno = cause.errno

    @staticmethod
    def _describe(path: Path, size: int, error: str) -> str:
        return f"appending {size} bytes to spool segment {path} failed: {error}; nothing of the batch was kept"


class SpoolFullError(SpoolWriteError):
    """No room for an append (disk full, quota, or a file-size limit); appends succeed again once there is room."""

    @staticmethod
    def _describe(path: Path, size: int, error: str) -> str:
        return f"spool segment {path} has no room for {size} more bytes: {error}; nothing of the batch was kept"


class SpoolClosedError(SpoolError):
    """An append after :meth:`Spool.close`."""


class SpoolOffsetError(SpoolError):
    """A read asked for an offset the spool no longer (or not yet) holds."""

    def __init__(self, offset: int, start: int, end: int) -> None:
        super().__init__(f"offset {offset} is outside the spool's range [{start}, {end}]")
        self.offset = offset


class FrameTooLargeError(SpoolError):
    """A record does not fit in a frame's 32-bit length."""

    def __init__(self, size: int) -> None:
        super().__init__(f"a record of {size} bytes is larger than a spool frame allows ({_MAX_RECORD})")
        self.size = size


@dataclass(frozen=True, slots=True)
class SpoolBatch:
    """Records read from the spool: parallel lists, ``start`` = the offset read from, ``end`` = just past the last
    frame read (padding included)."""

    start: int
    end: int
    offsets: list[int]
    arrivals_ms: list[int]
    records: list[bytes]

    def __len__(self) -> int:
        return len(self.records)

    @property
    def size_bytes(self) -> int:
        """Bytes of the log this batch covers, frames included."""
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class _Segment:
    start: int
    path: Path


def _segment_name(start: int) -> str:
    return f"{start:0{_SEGMENT_DIGITS}d}{_SEGMENT_SUFFIX}"


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _padding_frame(size: int) -> bytes:
    """A valid frame of exactly ``size`` bytes (at least a header) that ``read`` skips: it stands in for damage."""
    payload = bytes(size - HEADER_BYTES)
    crc = zlib.crc32(payload, zlib.crc32(_ARRIVAL.pack(_PADDING_ARRIVAL)))
    return _HEADER.pack(len(payload), crc, _PADDING_ARRIVAL) + payload


def _frame_end(data: bytes, pos: int, limit: int) -> int:
    """Where the frame at ``pos`` ends if it lies whole within ``data[:limit]`` and its checksum matches, else -1."""
    if pos + HEADER_BYTES > limit:
        return -1
    length, crc, _ = _HEADER.unpack_from(data, pos)
    stop: int = pos + HEADER_BYTES + length
    if stop > limit or zlib.crc32(data[pos + 8 : stop]) != crc:
        return -1
    return stop


def _resynchronise(data: bytes, pos: int, limit: int) -> int:
    """The first position from ``pos`` on where a valid frame starts, or -1 if none does before ``limit``."""
    while pos + HEADER_BYTES <= limit:
        if data[pos] == 0:
            non_zero = _NON_ZERO.search(data, pos, limit)
            if non_zero is None:
                return -1
            pos = max(pos, non_zero.start() - HEADER_BYTES + 1)
        if _frame_end(data, pos, limit) >= 0:
            return pos
        pos += 1
    return -1


@dataclass(slots=True)
class _SegmentScan:
    """What open found in one segment file: damaged and padded ranges (file offsets) and where its frames end."""

    damaged: list[tuple[int, int]] = field(default_factory=list)
    padded: list[tuple[int, int]] = field(default_factory=list)
    end: int = 0


def _scan_segment(data: bytes, expected_size: int | None) -> _SegmentScan:
    """Check every frame of a segment: ``expected_size`` is a sealed segment's size (the next one's start minus its
    own), None for the last segment, whose bad tail with no valid frame after it is a torn tail, not damage."""
    scan = _SegmentScan()
    limit = len(data) if expected_size is None else min(len(data), expected_size)
    unpack = _HEADER.unpack_from
    crc32 = zlib.crc32
    pos = 0
    while pos < limit:
        if pos + HEADER_BYTES <= limit:
            length, crc, arrival = unpack(data, pos)
            stop = pos + HEADER_BYTES + length
            if stop <= limit and crc32(data[pos + 8 : stop]) == crc:
                if arrival == _PADDING_ARRIVAL:
                    scan.padded.append((pos, stop))
                pos = stop
                continue
        # A bad frame is at least a header long, so the next good one starts a header or more further on.
        resume = _resynchronise(data, pos + HEADER_BYTES, limit)
        if resume < 0:
            if expected_size is None:
                break
            resume = expected_size
        scan.damaged.append((pos, resume))
        pos = resume
    if expected_size is not None and pos < expected_size:
        scan.damaged.append((pos, expected_size))  # the file was cut short
        pos = expected_size
    scan.end = pos
    return scan


@dataclass(frozen=True, slots=True)
class SpoolRange:
    """The records of ``[start, stop)`` as another process reads them (:func:`read_range`): the segment files
    (start offset, path) that hold the range. Small and picklable: a worker process reads the records from the page
    cache itself instead of receiving them through a pipe."""

    start: int
    stop: int
    segments: tuple[tuple[int, str], ...]


def read_range(spool_range: SpoolRange) -> SpoolBatch:
    """Read every record of ``spool_range``, checking each frame's checksum as :meth:`Spool.read` does. Needs no lock:
    the range's frames were acknowledged, so they are never written again, and segments are deleted only below the
    committed offset, which a range still to be delivered lies above.

    Raises:
        SpoolCorruptError: a frame fails its checksum or runs past ``stop`` (damage since the spool was opened).
        OSError: a segment file cannot be read.
    """
    segments = [(start, Path(path)) for start, path in spool_range.segments]
    size = spool_range.stop - spool_range.start
    batch = _read_frames(segments, spool_range.stop, [], spool_range.start, size)
    if batch.end != spool_range.stop:
        segment_start, path = segments[bisect.bisect_right([s for s, _ in segments], batch.end) - 1]
        raise SpoolCorruptError(
            path,
            batch.end,
            f"the frames end at log offset {batch.end}, not at the range's end {spool_range.stop}",
            file_offset=batch.end - segment_start,
        )
    return batch


def _read_frames(
    segments: Sequence[tuple[int, Path]], end: int, padded: Sequence[tuple[int, int]], offset: int, max_bytes: int
) -> SpoolBatch:
    """The body of :meth:`Spool.read` over a snapshot of the spool: ``segments`` (start, path) oldest first, the
    log's ``end`` and its padded ranges."""
    position = offset
    for pad_start, pad_stop in padded:
        if pad_start < position < pad_stop:
            position = pad_stop
    starts = [start for start, _ in segments]
    offsets: list[int] = []
    arrivals: list[int] = []
    records: list[bytes] = []
    budget = max_bytes
    unpack = _HEADER.unpack_from
    crc32 = zlib.crc32
    padding = _PADDING_ARRIVAL
    while position < end and not (records and budget <= 0):
        index = bisect.bisect_right(starts, position) - 1
        segment_start, segment_path = segments[index]
        segment_end = starts[index + 1] if index + 1 < len(segments) else end
        with open(segment_path, "rb") as handle:
            handle.seek(position - segment_start)
            data = handle.read(min(segment_end - position, max(budget, HEADER_BYTES)))
            pos = 0
            while pos + HEADER_BYTES <= len(data):
                length, crc, arrival = unpack(data, pos)
                stop = pos + HEADER_BYTES + length
                if stop > len(data):
                    # What was read ends at the segment's end or earlier: only a frame past it can run past that.
                    if position + stop > segment_end:
                        raise SpoolCorruptError(
                            segment_path,
                            position + pos,
                            "the frame runs past the end of its segment",
                            file_offset=position + pos - segment_start,
                        )
                    if records:
                        break
                    # The first record alone exceeds the budget: read it whole so the caller makes progress.
                    data += handle.read(stop - len(data))
                    if stop > len(data):
                        break
                # The checksum covers the arrival time and the payload, which follow each other in the frame.
                if crc32(data[pos + 8 : stop]) != crc:
                    raise SpoolCorruptError(
                        segment_path,
                        position + pos,
                        "checksum mismatch",
                        file_offset=position + pos - segment_start,
                    )
                if arrival != padding:
                    offsets.append(position + pos)
                    arrivals.append(arrival)
                    records.append(data[pos + HEADER_BYTES : stop])
                pos = stop
        if pos == 0:
            if records:
                break
            raise SpoolCorruptError(
                segment_path,
                position,
                "the segment file ends inside a frame",
                file_offset=position - segment_start,
            )
        position += pos
        budget -= pos
        if records and position < segment_end:
            break
    return SpoolBatch(offset, position, offsets, arrivals, records)


class Spool:
    """A durable, append-only, thread-safe record log; see the module docstring for the format and the checks on open.

    ``repairs`` lists the segments this open repaired (``repair=True``), with what each skipped.

    Raises (from the constructor):
        SpoolInUseError: another process holds the spool.
        SpoolDamagedError: a segment is damaged (``repair=False``); nothing was changed.
        SpoolCorruptError: the segment files overlap, or a damaged range is too short to pad; no repair is possible.
    """

    def __init__(
        self,
        directory: Path,
        *,
        initial_offset: int = 0,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        repair: bool = False,
    ) -> None:
        self.directory = directory
        self._segment_bytes = segment_bytes
        self._lock = threading.Lock()
        self.repairs: list[SpoolRepair] = []
        #: Log ranges ``[start, stop)`` of padding frames: a read that starts inside one starts at its end.
        self._padded: list[tuple[int, int]] = []
        directory.mkdir(parents=True, exist_ok=True)
        self._lock_fd = self._acquire_lock()
        try:
            self._segments = self._open_segments(initial_offset, repair=repair)
            last = self._segments[-1]
            self._fd = os.open(last.path, os.O_WRONLY | os.O_APPEND)
            self._active_size = last.path.stat().st_size
            self._end = last.start + self._active_size
            #: Set when a failed append could not be cut back: the next append cuts back first.
            self._cut_back_pending = False
        except BaseException:
            self._release_lock()
            raise

    # -- lifecycle ---------------------------------------------------------------------------------------------------

    def _acquire_lock(self) -> int:
        path = self.directory / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise SpoolInUseError(self.directory, int(holder) if holder.isdigit() else None) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        return fd

    def _release_lock(self) -> None:
        with contextlib.suppress(OSError):
            os.ftruncate(self._lock_fd, 0)
        os.close(self._lock_fd)

    def close(self) -> None:
        """Close the active segment and release the lock (idempotent)."""
        with self._lock:
            if self._fd < 0:
                return
            os.close(self._fd)
            self._fd = -1
            self._release_lock()

    def __enter__(self) -> Spool:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _open_segments(self, initial_offset: int, *, repair: bool) -> list[_Segment]:
        """List the segments, check every frame, cut a torn tail off the last one and, if asked, repair damage."""
        segments = sorted(
            (
                _Segment(int(p.name.removesuffix(_SEGMENT_SUFFIX)), p)
                for p in self.directory.glob("*" + _SEGMENT_SUFFIX)
                if p.name.removesuffix(_SEGMENT_SUFFIX).isdigit()
            ),
            key=lambda s: s.start,
        )
        if not segments:
            return [self._create_segment(initial_offset)]
        scans: list[tuple[_Segment, _SegmentScan, int, int | None]] = []
        for segment, following in itertools.zip_longest(segments, segments[1:]):
            data = segment.path.read_bytes()
            expected = None if following is None else following.start - segment.start
            if expected is not None and len(data) > expected:
                raise SpoolCorruptError(
                    segment.path,
                    following.start,
                    f"the segment runs {len(data) - expected} bytes past the start of the next one, {following.path}",
                    file_offset=expected,
                )
            scan = _scan_segment(data, expected)
            scans.append((segment, scan, len(data), expected))
        damages = [
            SpoolDamage(segment.path, segment.start, start, stop)
            for segment, scan, _, _ in scans
            for start, stop in scan.damaged
        ]
        if damages and not repair:
            raise SpoolDamagedError(damages)
        for segment, scan, size, expected in scans:
            if scan.damaged:
                self.repairs.append(self._repair(segment, scan, expected))
                scan.padded = sorted([*scan.padded, *scan.damaged])
            elif scan.end < size:
                # A crash mid-append: everything from the first bad frame on was never acknowledged.
                logger.info(
                    "cutting a torn tail of %d bytes off %s at byte %d", size - scan.end, segment.path, scan.end
                )
                with open(segment.path, "r+b") as handle:
                    handle.truncate(scan.end)
                    handle.flush()
                    os.fsync(handle.fileno())
            self._padded.extend((segment.start + start, segment.start + stop) for start, stop in scan.padded)
        return segments

    def _repair(self, segment: _Segment, scan: _SegmentScan, expected_size: int | None) -> SpoolRepair:
        """Quarantine a damaged segment and pad its damaged ranges in place (a torn tail after them is cut off)."""
        original = segment.path.read_bytes()
        size = scan.end if expected_size is None else expected_size
        repaired = bytearray(original[:size].ljust(size, b"\0"))
        damages = tuple(SpoolDamage(segment.path, segment.start, start, stop) for start, stop in scan.damaged)
        for damage in damages:
            if damage.length < HEADER_BYTES:
                raise SpoolCorruptError(
                    segment.path,
                    damage.offset,
                    f"{damage.describe()}, too few to hold even a frame header: the segment cannot be repaired",
                    file_offset=damage.file_offset,
                )
            repaired[damage.file_offset : damage.resume_file_offset] = _padding_frame(damage.length)
        quarantine = self.directory / QUARANTINE_DIR
        quarantine.mkdir(exist_ok=True)
        copy = quarantine / f"{segment.path.name}.{datetime.now(UTC):%Y%m%dT%H%M%S%fZ}"
        try:
            os.link(segment.path, copy)
        except OSError:  # a filesystem without hard links: copy the damaged bytes instead
            shutil.copyfile(segment.path, copy)
        note = copy.with_name(copy.name + ".json")
        document = {
            "segment": segment.path.name,
            "segment_start": segment.start,
            "damaged": [{"file_offset": d.file_offset, "length": d.length, "log_offset": d.offset} for d in damages],
            "size_before": len(original),
            "size_after": size,
            "quarantined_at": datetime.now(UTC).isoformat(),
        }
        _write_durably(note, json.dumps(document, indent=2).encode())
        _fsync_dir(quarantine)
        staging = segment.path.with_name(f".{segment.path.name}.repair")
        _write_durably(staging, bytes(repaired))
        os.replace(staging, segment.path)
        _fsync_dir(self.directory)
        repair = SpoolRepair(segment.path, copy, note, damages)
        logger.warning("repaired %s", repair.describe())
        return repair

    def _create_segment(self, start: int) -> _Segment:
        path = self.directory / _segment_name(start)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o644))
        _fsync_dir(self.directory)
        return _Segment(start, path)

    # -- writing -----------------------------------------------------------------------------------------------------

    @property
    def start(self) -> int:
        """Offset of the oldest record still held."""
        with self._lock:
            return self._segments[0].start

    @property
    def end(self) -> int:
        """Offset just past the last durable record."""
        with self._lock:
            return self._end

    def append(self, records: Sequence[bytes], *, arrival_ms: int | None = None) -> int:
        """Append ``records`` as one group commit: returns the end offset once they are written and fdatasync'ed.

        Raises:
            FrameTooLargeError: a record exceeds the frame's 32-bit length (nothing is written).
            SpoolFullError: no room for the batch (nothing of it is kept; retry once there is room).
            SpoolWriteError: the disk refused the write or the sync otherwise (nothing of it is kept).
            SpoolClosedError: the spool was closed.
        """
        arrival = int(time.time() * 1000) if arrival_ms is None else arrival_ms
        if arrival == _PADDING_ARRIVAL:
            raise ValueError(f"arrival_ms {arrival} is reserved for padding frames")
        arrival_bytes = _ARRIVAL.pack(arrival)
        base_crc = zlib.crc32(arrival_bytes)
        pack = _HEADER.pack
        crc32 = zlib.crc32
        parts: list[bytes] = []
        for record in records:
            if len(record) > _MAX_RECORD:
                raise FrameTooLargeError(len(record))
            parts.append(pack(len(record), crc32(record, base_crc), arrival))
            parts.append(record)
        frame_bytes = b"".join(parts)
        with self._lock:
            if self._fd < 0:
                raise SpoolClosedError(f"the spool in {self.directory} is closed")
            if not frame_bytes:
                return self._end
            if self._cut_back_pending:
                self._cut_back(len(frame_bytes))
            if self._active_size >= self._segment_bytes:
                self._roll(len(frame_bytes))
            try:
                view = memoryview(frame_bytes)
                while view:
                    written = os.write(self._fd, view)
                    view = view[written:]
                os.fdatasync(self._fd)
            except OSError as exc:
                self._cut_back_pending = True
                with contextlib.suppress(SpoolWriteError):
                    self._cut_back(len(frame_bytes))
                raise self._write_error(len(frame_bytes), exc) from exc
            self._active_size += len(frame_bytes)
            self._end += len(frame_bytes)
            return self._end

    def _write_error(self, size: int, cause: OSError, path: Path | None = None) -> SpoolWriteError:
        error = SpoolFullError if cause.errno in _OUT_OF_SPACE else SpoolWriteError
        return error(path or self._segments[-1].path, size, cause)

    def _cut_back(self, size: int) -> None:
        """Cut the active segment back to its last acknowledged byte, durably (caller holds the lock).

        Raises:
            SpoolWriteError: the cut failed; it is tried again before the next append.
        """
        try:
            os.ftruncate(self._fd, self._active_size)
            os.fsync(self._fd)
        except OSError as exc:
            raise self._write_error(size, exc) from exc
        self._cut_back_pending = False

    def _roll(self, size: int) -> None:
        """Seal the active segment and start a new one at the current end (caller holds the lock)."""
        path = self.directory / _segment_name(self._end)
        try:
            segment = self._create_segment(self._end)
            fd = os.open(segment.path, os.O_WRONLY | os.O_APPEND)
        except OSError as exc:
            raise self._write_error(size, exc, path) from exc
        os.close(self._fd)
        self._fd = fd
        self._segments.append(segment)
        self._active_size = 0

    # -- reading -----------------------------------------------------------------------------------------------------

    def read(self, offset: int, max_bytes: int) -> SpoolBatch:
        """Read the records from ``offset`` while they fit in ``max_bytes`` of log (at least one, if any remain).

        Padding frames are skipped, and an ``offset`` inside one reads from its end.

        Raises:
            SpoolOffsetError: ``offset`` was deleted or is past the end.
            SpoolCorruptError: a frame fails its checksum (``offset`` not a record boundary, or damaged data).
        """
        segments, end, padded = self._layout_from(offset)
        return _read_frames(segments, end, padded, offset, max_bytes)

    def _layout_from(self, offset: int) -> tuple[list[tuple[int, Path]], int, list[tuple[int, int]]]:
        """The segments (start, path), the end and the padded ranges, as they are now, for reading from ``offset``.

        Raises:
            SpoolOffsetError: ``offset`` was deleted or is past the end.
        """
        with self._lock:
            segments = [(s.start, s.path) for s in self._segments]
            end = self._end
            padded = list(self._padded)
        if offset < segments[0][0] or offset > end:
            raise SpoolOffsetError(offset, segments[0][0], end)
        return segments, end, padded

    def range(self, start: int, stop: int) -> SpoolRange:
        """What another process needs to read the records of ``[start, stop)`` itself (see :func:`read_range`).

        ``start`` and ``stop`` must be frame boundaries (e.g. the end offsets ``append`` returned), and the range
        must hold no padding: a repaired range is read by :meth:`read` only.

        Raises:
            SpoolOffsetError: ``start`` was deleted, or ``stop`` is past the end.
            ValueError: the range is empty or overlaps a padded range.
        """
        segments, end, padded = self._layout_from(start)
        if stop > end:
            raise SpoolOffsetError(stop, segments[0][0], end)
        if stop <= start or any(pad_start < stop and start < pad_stop for pad_start, pad_stop in padded):
            raise ValueError(f"spool range [{start}, {stop}) is empty or holds padding")
        first = bisect.bisect_right([s for s, _ in segments], start) - 1
        covering = [(s, path) for s, path in segments[first:] if s < stop]
        return SpoolRange(start, stop, tuple((s, str(path)) for s, path in covering))

    # -- garbage collection ------------------------------------------------------------------------------------------

    def delete_below(self, offset: int) -> int:
        """Delete the segments whose every record lies below ``offset`` (never the active one); returns how many."""
        with self._lock:
            doomed = [s for s, following in itertools.pairwise(self._segments) if following.start <= offset]
            self._segments = self._segments[len(doomed) :]
            self._padded = [(a, b) for a, b in self._padded if b > self._segments[0].start]
        for segment in doomed:
            segment.path.unlink(missing_ok=True)
        if doomed:
            _fsync_dir(self.directory)
        return len(doomed)

    def segment_paths(self) -> list[Path]:
        """The segment files currently held, oldest first."""
        with self._lock:
            return [s.path for s in self._segments]

"""The delivery stream's durable spool: an append-only log of records in segment files under ``DataDir.spool``.

Offsets are byte positions in one logical log that spans the segments: a segment file is named by the offset of its
first byte, a record's offset is where its frame starts, and ``append`` returns the offset just past the last frame.
Offsets therefore only grow, survive segment deletion and say how many bytes are pending (``end - committed``).

Each frame is ``length:u32 | crc32:u32 | arrival_ms:i64 | payload``, the CRC covering arrival time and payload, so a
write torn by a crash is found on open and cut off without touching the frames before it. ``append`` writes a whole
batch with one ``fdatasync`` (group commit) before it returns. One process at a time: an exclusive ``flock`` on
``LOCK`` names the holder's pid.
"""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import itertools
import os
import struct
import threading
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

_HEADER = struct.Struct("<IIq")
HEADER_BYTES = _HEADER.size
_ARRIVAL = struct.Struct("<q")
_SEGMENT_SUFFIX = ".seg"
_SEGMENT_DIGITS = 20
LOCK_FILE = "LOCK"

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
    """A frame before the spool's tail fails its checksum, or the segments do not line up."""

    def __init__(self, path: Path, offset: int, problem: str) -> None:
        super().__init__(f"spool segment {path} is damaged at offset {offset}: {problem}")
        self.path = path
        self.offset = offset


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
    """Records read from the spool: parallel lists, ``start`` = first record's offset, ``end`` = just past the last."""

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


def _valid_prefix(data: bytes) -> int:
    """Length of the longest prefix of ``data`` made of whole frames whose checksums match."""
    pos = 0
    size = len(data)
    unpack = _HEADER.unpack_from
    crc32 = zlib.crc32
    while pos + HEADER_BYTES <= size:
        length, crc, _ = unpack(data, pos)
        stop = pos + HEADER_BYTES + length
        if stop > size or crc32(data[pos + 8 : stop]) != crc:
            break
        pos = stop
    return pos


class Spool:
    """A durable, append-only, thread-safe record log; see the module docstring for the format.

    Raises (from the constructor):
        SpoolInUseError: another process holds the spool.
        SpoolCorruptError: the segment files do not line up (a sealed segment was truncated or removed mid-log).
    """

    def __init__(self, directory: Path, *, initial_offset: int = 0, segment_bytes: int = DEFAULT_SEGMENT_BYTES) -> None:
        self.directory = directory
        self._segment_bytes = segment_bytes
        self._lock = threading.Lock()
        directory.mkdir(parents=True, exist_ok=True)
        self._lock_fd = self._acquire_lock()
        try:
            self._segments = self._open_segments(initial_offset)
            last = self._segments[-1]
            self._fd = os.open(last.path, os.O_WRONLY | os.O_APPEND)
            self._active_size = last.path.stat().st_size
            self._end = last.start + self._active_size
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

    def _open_segments(self, initial_offset: int) -> list[_Segment]:
        """List the segments, check they line up, and cut a torn tail off the last one."""
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
        for sealed, following in itertools.pairwise(segments):
            size = sealed.path.stat().st_size
            if sealed.start + size != following.start:
                raise SpoolCorruptError(
                    sealed.path,
                    sealed.start + size,
                    f"segment ends at {sealed.start + size} but the next one starts at {following.start}",
                )
        last = segments[-1]
        data = last.path.read_bytes()
        valid = _valid_prefix(data)
        if valid < len(data):
            # A crash mid-append: everything from the first bad frame on was never acknowledged.
            with open(last.path, "r+b") as handle:
                handle.truncate(valid)
                handle.flush()
                os.fsync(handle.fileno())
        return segments

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
        """
        arrival = int(time.time() * 1000) if arrival_ms is None else arrival_ms
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
                raise SpoolError(f"the spool in {self.directory} is closed")
            if not frame_bytes:
                return self._end
            if self._active_size >= self._segment_bytes:
                self._roll()
            view = memoryview(frame_bytes)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
            os.fdatasync(self._fd)
            self._active_size += len(frame_bytes)
            self._end += len(frame_bytes)
            return self._end

    def _roll(self) -> None:
        """Seal the active segment and start a new one at the current end (caller holds the lock)."""
        segment = self._create_segment(self._end)
        os.close(self._fd)
        self._fd = os.open(segment.path, os.O_WRONLY | os.O_APPEND)
        self._segments.append(segment)
        self._active_size = 0

    # -- reading -----------------------------------------------------------------------------------------------------

    def read(self, offset: int, max_bytes: int) -> SpoolBatch:
        """Read the records from ``offset`` while they fit in ``max_bytes`` of log (at least one, if any remain).

        Raises:
            SpoolOffsetError: ``offset`` was deleted or is past the end.
            SpoolCorruptError: a frame fails its checksum (``offset`` not a record boundary, or damaged data).
        """
        with self._lock:
            segments = list(self._segments)
            end = self._end
        if offset < segments[0].start or offset > end:
            raise SpoolOffsetError(offset, segments[0].start, end)
        offsets: list[int] = []
        arrivals: list[int] = []
        records: list[bytes] = []
        position = offset
        budget = max_bytes
        index = bisect.bisect_right([s.start for s in segments], offset) - 1
        unpack = _HEADER.unpack_from
        crc32 = zlib.crc32
        while position < end and index < len(segments):
            segment = segments[index]
            segment_end = segments[index + 1].start if index + 1 < len(segments) else end
            if position >= segment_end:
                index += 1
                continue
            want = min(segment_end - position, max(budget, 0))
            if want < HEADER_BYTES:
                if records:
                    break
                want = min(segment_end - position, HEADER_BYTES)
            with open(segment.path, "rb") as handle:
                handle.seek(position - segment.start)
                data = handle.read(want)
                pos = 0
                while pos + HEADER_BYTES <= len(data):
                    length, crc, arrival = unpack(data, pos)
                    stop = pos + HEADER_BYTES + length
                    if stop > len(data):
                        if records or position + stop > segment_end:
                            break
                        # The first record alone exceeds the budget: read it whole so the caller makes progress.
                        data += handle.read(stop - len(data))
                        if stop > len(data):
                            break
                    payload = data[pos + HEADER_BYTES : stop]
                    if crc32(payload, crc32(data[pos + 8 : pos + HEADER_BYTES])) != crc:
                        raise SpoolCorruptError(segment.path, position + pos, "checksum mismatch")
                    offsets.append(position + pos)
                    arrivals.append(arrival)
                    records.append(payload)
                    pos = stop
            if pos == 0:
                if records:
                    break
                raise SpoolCorruptError(segment.path, position, "frame runs past the end of its segment")
            position += pos
            budget -= pos
            if budget <= 0 or position < segment_end:
                break
            index += 1
        return SpoolBatch(offset, position, offsets, arrivals, records)

    # -- garbage collection ------------------------------------------------------------------------------------------

    def delete_below(self, offset: int) -> int:
        """Delete the segments whose every record lies below ``offset`` (never the active one); returns how many."""
        with self._lock:
            doomed = [s for s, following in itertools.pairwise(self._segments) if following.start <= offset]
            self._segments = self._segments[len(doomed) :]
        for segment in doomed:
            segment.path.unlink(missing_ok=True)
        if doomed:
            _fsync_dir(self.directory)
        return len(doomed)

    def segment_paths(self) -> list[Path]:
        """The segment files currently held, oldest first."""
        with self._lock:
            return [s.path for s in self._segments]

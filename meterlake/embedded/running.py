"""What the local pipeline running from a data dir is doing: which gateway serves (`meterlake up` records it,
`meterlake token` follows it), and what is spooled but not yet committed.

A token is accepted only by a gateway whose user pool issued it for its own issuer, and the issuer carries the
gateway's real port (``meterlake up --port 8870`` or ``--port 0``). So `up` writes the port and issuer it serves on to
the data dir (:attr:`DataDir.serving_gateway`) and removes it on the way out; commands that issue tokens for "the"
local gateway read it instead of assuming the configured port.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import msgspec
from pyiceberg.table import Table

from meterlake.lake.home import DataDir


class ServingGateway(msgspec.Struct, frozen=True):
    """A running gateway: the process serving it, its port, its user pool's issuer and its invoke URL."""

    pid: int
    port: int
    issuer: str
    invoke_url: str


def _is_running(pid: int) -> bool:
    """Whether ``pid`` names a running process (signal 0 probes without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True


def serving_gateway(data_dir: DataDir) -> ServingGateway | None:
    """The gateway `meterlake up` is serving from ``data_dir``; None when none is (or its process is gone)."""
    try:
        record = msgspec.json.decode(data_dir.serving_gateway.read_bytes(), type=ServingGateway)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return None
    return record if _is_running(record.pid) else None


@contextlib.contextmanager
def recorded_as_serving(data_dir: DataDir, *, port: int, issuer: str, invoke_url: str) -> Iterator[ServingGateway]:
    """Record this process's gateway as the one serving from ``data_dir`` while the block runs.

    The record is written whole (temp file, rename) and removed afterwards only if it is still this process's.
    """
    record = ServingGateway(pid=os.getpid(), port=port, issuer=issuer, invoke_url=invoke_url)
    path = data_dir.serving_gateway
    tmp = path.with_name(f".{path.name}.{record.pid}.tmp")
    tmp.write_bytes(msgspec.json.encode(record))
    tmp.replace(path)
    try:
        yield record
    finally:
        current = serving_gateway(data_dir)
        if current is not None and current.pid == record.pid:
            path.unlink(missing_ok=True)


def uncommitted_spool_bytes(data_dir: DataDir, table: Table) -> int:
    """Bytes the delivery stream has spooled (acknowledged) but not yet committed to ``table``.

    Read from the files alone, without opening the stream (a running `up` holds it): the spool's end is the last
    segment's start plus its size, and the table's snapshots record the spool offset each commit covers. Nonzero
    means a query does not see everything answered yet: the next flush (the buffering interval, or `meterlake
    flush`) commits it.
    """
    from meterlake.local.stream import SPOOL_OFFSET_PROPERTY

    end = 0
    for segment in data_dir.spool.glob("*.seg"):
        if segment.stem.isdigit():
            with contextlib.suppress(OSError):
                end = max(end, int(segment.stem) + segment.stat().st_size)
    committed = 0
    for snapshot in table.snapshots():
        offset = snapshot.summary.get(SPOOL_OFFSET_PROPERTY) if snapshot.summary is not None else None
        if offset is not None and offset.isdigit():
            committed = max(committed, int(offset))
    return max(0, end - committed)

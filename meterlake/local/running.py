"""Which local gateway is serving from a data dir: `meterlake up` records it, `meterlake token` follows it.

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

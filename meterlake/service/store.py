"""The service's own SQLite database in the data dir: meters, cancellation rules and API keys (locally; the AWS
adapter of a later issue keeps them elsewhere behind the same classes).

One connection, WAL and ``synchronous=FULL``, guarded by one lock: every change is one transaction, durable when it
returns, and readers in other processes (``meterlake keys list``) see committed state only.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

from meterlake.lake.home import PRIVATE_DIR_MODE, DataDir

SERVICE_DIR = "service"
DATABASE_FILE = "registry.db"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meters (
    id TEXT PRIMARY KEY,
    meter_api_name TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL CHECK (kind IN ('event', 'request')),
    label TEXT NOT NULL,
    meter_type TEXT NOT NULL,
    description TEXT NOT NULL,
    dimensions TEXT NOT NULL,
    aggregation_dimensions TEXT NOT NULL,
    locking_status TEXT NOT NULL,
    create_time_ms INTEGER NOT NULL,
    update_time_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS cancellation_rules (
    id TEXT PRIMARY KEY,
    meter_api_name TEXT NOT NULL,
    start_s INTEGER NOT NULL,
    end_s INTEGER NOT NULL,
    filter TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    removed_ms INTEGER
);
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    secret_sha256 BLOB NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('admin', 'tenant')),
    customer_id TEXT,
    label TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    revoked_ms INTEGER
);
"""


class StoreError(Exception):
    """The service's database cannot be opened or written; the message names the file."""


class ServiceStore:
    """The service's SQLite database; safe to use from several threads (one lock)."""

    def __init__(self, path: Path) -> None:
        """Open (creating on first use) the database at ``path``.

        Raises:
            StoreError: it cannot be opened or its tables created.
        """
        self.path = path
        try:
            path.parent.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open the service database {path}: {exc}") from exc
        self._lock = threading.RLock()

    @classmethod
    def in_data_dir(cls, data_dir: DataDir) -> ServiceStore:
        """The local service's database: ``<data dir>/service/registry.db``."""
        return cls(data_dir.root / SERVICE_DIR / DATABASE_FILE)

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Rows of one read (values bound)."""
        with self._lock:
            return list(self._db.execute(sql, params).fetchall())

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE): committed when the block ends, rolled back if it raises."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> ServiceStore:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

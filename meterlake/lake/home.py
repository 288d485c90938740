"""The local runtime's data directory: one place that names every file the embedded pipeline keeps.

Default ``./.meterlake``; ``$METERLAKE_HOME`` overrides it. The data dir is private to its user: it holds the user
pool's signing key and every tenant's requests, so its directories are 0700 and what the CLI writes there is 0600
(the CLI runs with umask 077).
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

HOME_ENV = "METERLAKE_HOME"
DEFAULT_HOME = ".meterlake"
#: Mode of every directory of the data dir: its user only.
PRIVATE_DIR_MODE = 0o700
#: The umask under which files written to the data dir are its user's only (0600) and directories 0700.
PRIVATE_UMASK = 0o077


#: The catalog's SQLite file in the data dir.
CATALOG_FILE = "catalog.db"


class DataDirError(Exception):
    """The data dir cannot be created, made private or written to; the message names the path and the reason."""

    def __init__(self, root: Path, problem: str) -> None:
        super().__init__(f"data dir {root} {problem}")
        self.root = root


@dataclass(frozen=True, slots=True)
class DataDir:
    """Paths under the data directory. Nothing is created until :meth:`ensure` is called."""

    root: Path

    @classmethod
    def resolve(cls, root: Path | str | None = None) -> DataDir:
        """The data dir at ``root``, else ``$METERLAKE_HOME``, else ./.meterlake (made absolute)."""
        chosen = root if root is not None else os.environ.get(HOME_ENV) or DEFAULT_HOME
        return cls(Path(chosen).expanduser().resolve())

    @property
    def catalog_db(self) -> Path:
        """SQLite file of the pyiceberg SqlCatalog."""
        return self.root / CATALOG_FILE

    @property
    def warehouse(self) -> Path:
        """Filesystem warehouse holding the Iceberg tables' data and metadata files."""
        return self.root / "warehouse"

    @property
    def spool(self) -> Path:
        """The delivery stream's durable spool (segments and checkpoint)."""
        return self.root / "spool"

    @property
    def errors(self) -> Path:
        """Records the transform rejected, under Firehose's error output prefix."""
        return self.root / "errors"

    @property
    def serving_gateway(self) -> Path:
        """The record of the gateway `meterlake up` is serving from this data dir (its port and issuer)."""
        return self.root / "gateway.json"

    @property
    def keys(self) -> Path:
        """The local user pool's RSA signing key."""
        return self.root / "keys"

    def ensure(self) -> DataDir:
        """Create the directory tree (idempotent), make its directories 0700, and return self.

        A data dir made by an older version (0755) is tightened here. On a read-only file system the modes are left
        as they are: nothing can be written there to expose, and the data can still be queried.

        Raises:
            DataDirError: a directory cannot be created (a file is in the way, a read-only file system, no
                permission) or made private.
        """
        for path in (self.root, self.warehouse, self.spool, self.errors, self.keys):
            try:
                path.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
            except FileExistsError:
                problem = "is not a directory" if path == self.root else f"cannot be created: {path} is a file"
                raise DataDirError(self.root, problem) from None
            except OSError as exc:
                raise DataDirError(self.root, f"cannot be created: {path}: {exc.strerror}") from None
            try:
                if stat.S_IMODE(path.stat().st_mode) != PRIVATE_DIR_MODE:
                    path.chmod(PRIVATE_DIR_MODE)
            except OSError as exc:
                if exc.errno != errno.EROFS:
                    raise DataDirError(self.root, f"cannot be made private: {path}: {exc.strerror}") from None
        return self

    def require_writable(self) -> DataDir:
        """Check that files can be created in the data dir, for commands that write there; returns self.

        Raises:
            DataDirError: the data dir is on a read-only file system, or its user may not write there.
        """
        try:
            with tempfile.TemporaryFile(dir=self.root):
                pass
        except OSError as exc:
            raise DataDirError(self.root, f"is not writable ({exc.strerror})") from None
        return self

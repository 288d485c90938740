"""The local runtime's data directory: one place that names every file the embedded pipeline keeps.

Default ``./.meterlake``; ``$METERLAKE_HOME`` overrides it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

HOME_ENV = "METERLAKE_HOME"
DEFAULT_HOME = ".meterlake"


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
        return self.root / "catalog.db"

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
    def keys(self) -> Path:
        """The local user pool's RSA signing key."""
        return self.root / "keys"

    def ensure(self) -> DataDir:
        """Create the directory tree (idempotent) and return self."""
        for path in (self.root, self.warehouse, self.spool, self.errors, self.keys):
            path.mkdir(parents=True, exist_ok=True)
        return self

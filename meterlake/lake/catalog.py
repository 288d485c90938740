"""The local Iceberg catalog: pyiceberg's SqlCatalog on SQLite with a filesystem warehouse in the data dir."""

from __future__ import annotations

import contextlib
from pathlib import Path
from urllib.parse import urlparse

from pyiceberg.catalog import Catalog
from pyiceberg.catalog.sql import SqlCatalog
from pyiceberg.exceptions import (
    NamespaceAlreadyExistsError,
    NoSuchNamespaceError,
    NoSuchTableError,
    TableAlreadyExistsError,
)
from pyiceberg.table import Table
from sqlalchemy.exc import OperationalError

from meterlake.config import Config
from meterlake.lake.home import DataDir
from meterlake.schema import (
    METER_EVENT_PARTITION_SPEC,
    METER_EVENT_SCHEMA,
    METER_EVENTS_TABLE,
    METERING_EVENT_PARTITION_SPEC,
    METERING_EVENT_SCHEMA,
    TABLE_PROPERTIES,
)

CATALOG_NAME = "meterlake"


def open_catalog(data: DataDir) -> SqlCatalog:
    """Open (creating on first use) the SQLite-backed catalog under the data dir.

    Two openers racing on a new catalog (threads or processes) can both try to create its tables; SQLite then refuses
    the second ``CREATE TABLE``, and opening again finds the tables the first one made.
    """
    data.ensure()
    retries = 2
    while True:
        try:
            return SqlCatalog(CATALOG_NAME, uri=f"sqlite:///{data.catalog_db}", warehouse=data.warehouse.as_uri())
        except OperationalError as exc:
            if "already exists" not in str(exc) or retries == 0:
                raise
            retries -= 1


def ensure_metering_table(catalog: SqlCatalog, config: Config) -> Table:
    """Return the metering-events table, creating its namespace and the table only when they do not exist yet.

    It loads first: ``create_table`` writes the table's first metadata file before it finds that the table exists, so
    creating on every open (as this once did, ~720 times an hour from an idle ``meterlake up``) left one orphan
    metadata file per open. Two openers racing to create it both succeed: the loser loads the winner's table.
    """
    identifier = (config.database_name, config.table_name)
    with contextlib.suppress(NoSuchTableError, NoSuchNamespaceError):
        return catalog.load_table(identifier)
    with contextlib.suppress(NamespaceAlreadyExistsError):
        catalog.create_namespace(config.database_name)
    try:
        return catalog.create_table(
            identifier,
            schema=METERING_EVENT_SCHEMA,
            partition_spec=METERING_EVENT_PARTITION_SPEC,
            # A copy: pyiceberg pops format-version out of the mapping it is given.
            properties=dict(TABLE_PROPERTIES),
        )
    except TableAlreadyExistsError:
        return catalog.load_table(identifier)


def ensure_meter_events_table(catalog: Catalog, config: Config) -> Table:
    """Return the meter-events table (``meter_events`` beside the metering table), creating it on first use.

    Loads first and tolerates a racing creator, as :func:`ensure_metering_table` does.
    """
    identifier = (config.database_name, METER_EVENTS_TABLE)
    with contextlib.suppress(NoSuchTableError, NoSuchNamespaceError):
        return catalog.load_table(identifier)
    with contextlib.suppress(NamespaceAlreadyExistsError):
        catalog.create_namespace(config.database_name)
    try:
        return catalog.create_table(
            identifier,
            schema=METER_EVENT_SCHEMA,
            partition_spec=METER_EVENT_PARTITION_SPEC,
            properties=dict(TABLE_PROPERTIES),
        )
    except TableAlreadyExistsError:
        return catalog.load_table(identifier)


def remove_orphan_metadata(table: Table) -> list[Path]:
    """Delete the first-version metadata files (``00000-*.metadata.json``) of ``table`` that nothing references.

    Every failed ``create_table`` leaves one (see :func:`ensure_metering_table`). Only first versions are removed:
    a commit in flight writes a later version before the catalog points at it, so deleting any unreferenced file
    could break it, while a first version is either the table's own (referenced by its current metadata or its
    metadata log, or expired from that log) or a failed creation's. Returns the deleted files.
    """
    referenced = {_file_name(table.metadata_location)}
    referenced.update(_file_name(entry.metadata_file) for entry in table.metadata.metadata_log)
    directory = Path(urlparse(table.metadata_location).path).parent
    removed: list[Path] = []
    for candidate in sorted(directory.glob("00000-*.metadata.json")):
        if candidate.name not in referenced:
            candidate.unlink(missing_ok=True)
            removed.append(candidate)
    return removed


def _file_name(location: str) -> str:
    return Path(urlparse(location).path).name

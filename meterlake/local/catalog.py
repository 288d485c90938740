"""The local Iceberg catalog: pyiceberg's SqlCatalog on SQLite with a filesystem warehouse in the data dir."""

from __future__ import annotations

import contextlib

from pyiceberg.catalog.sql import SqlCatalog
from pyiceberg.exceptions import NamespaceAlreadyExistsError, TableAlreadyExistsError
from pyiceberg.table import Table
from sqlalchemy.exc import OperationalError

from meterlake.config import Config
from meterlake.local.home import DataDir
from meterlake.schema import METERING_EVENT_PARTITION_SPEC, METERING_EVENT_SCHEMA, TABLE_PROPERTIES

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
    """Return the metering-events table, creating its namespace and the table first if needed (idempotent)."""
    with contextlib.suppress(NamespaceAlreadyExistsError):
        catalog.create_namespace(config.database_name)
    identifier = (config.database_name, config.table_name)
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

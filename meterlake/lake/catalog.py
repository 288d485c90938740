"""The local Iceberg catalog: pyiceberg's SqlCatalog on SQLite with a filesystem warehouse in the data dir.

Opening a table evolves it to the schema the code defines: a field added to the record (``meterlake.records``) or to
the meter-events schema becomes a new optional column of an existing table, whose older rows read it as null. Only
additions are applied; any other difference is refused (:class:`IncompatibleSchemaError`).
"""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path
from urllib.parse import urlparse

from pyiceberg.catalog import Catalog
from pyiceberg.catalog.sql import SqlCatalog
from pyiceberg.exceptions import (
    CommitFailedException,
    NamespaceAlreadyExistsError,
    NoSuchNamespaceError,
    NoSuchTableError,
    TableAlreadyExistsError,
)
from pyiceberg.schema import Schema
from pyiceberg.table import Table
from pyiceberg.types import NestedField
from sqlalchemy.exc import DatabaseError, OperationalError

from meterlake.config import Config
from meterlake.lake.home import DataDir, DataDirError
from meterlake.schema import (
    METER_EVENT_PARTITION_SPEC,
    METER_EVENT_SCHEMA,
    METER_EVENTS_TABLE,
    METERING_EVENT_PARTITION_SPEC,
    METERING_EVENT_SCHEMA,
    TABLE_PROPERTIES,
)

CATALOG_NAME = "meterlake"

#: How many times a schema update is retried after another writer committed first.
_EVOLVE_ATTEMPTS = 3


class IncompatibleSchemaError(Exception):
    """An existing table's schema differs from the code's in a way that is not an added optional column (a changed
    type, a changed required flag, other identifier fields, or an added required column)."""


def open_catalog(data: DataDir) -> SqlCatalog:
    """Open (creating on first use) the SQLite-backed catalog under the data dir.

    Two openers racing on a new catalog (threads or processes) can both try to create its tables; SQLite then refuses
    the second ``CREATE TABLE``, and opening again finds the tables the first one made.

    Raises:
        DataDirError: the catalog file is damaged (not a SQLite database, or a malformed one).
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
        except DatabaseError as exc:  # not an OperationalError (a lock, a full disk): the file itself is damaged
            raise DataDirError(
                data.root,
                f"has a damaged catalog, {data.catalog_db} ({exc.orig}): restore it from a recent copy, or move the "
                "data dir aside to start an empty one",
            ) from None


def current_metadata_location(data: DataDir, identifier: tuple[str, str]) -> str | None:
    """The metadata file the catalog names as the table's current state (None: no such table or no catalog yet), read
    from the catalog's own row (pyiceberg's ``iceberg_tables``, the JDBC catalog's layout): what ``load_table`` reads
    first, without opening the catalog (~3 ms) or parsing the metadata (~9 ms for a month of commits)."""
    if not data.catalog_db.is_file():
        return None
    namespace, name = identifier
    with contextlib.closing(sqlite3.connect(f"{data.catalog_db.as_uri()}?mode=ro", uri=True, timeout=30)) as db:
        try:
            row = db.execute(
                "SELECT metadata_location FROM iceberg_tables "
                "WHERE catalog_name = ? AND table_namespace = ? AND table_name = ?",
                (CATALOG_NAME, namespace, name),
            ).fetchone()
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):  # a catalog file whose tables pyiceberg has not created yet
                return None
            raise
    return None if row is None or row[0] is None else str(row[0])


def ensure_metering_table(catalog: SqlCatalog, config: Config) -> Table:
    """Return the metering-events table, creating its namespace and the table only when they do not exist yet.

    It loads first: ``create_table`` writes the table's first metadata file before it finds that the table exists, so
    creating on every open (as this once did, ~720 times an hour from an idle ``meterlake up``) left one orphan
    metadata file per open. Two openers racing to create it both succeed: the loser loads the winner's table.
    """
    identifier = (config.database_name, config.table_name)
    with contextlib.suppress(NoSuchTableError, NoSuchNamespaceError):
        return evolve_table(catalog.load_table(identifier), METERING_EVENT_SCHEMA)
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
        return evolve_table(catalog.load_table(identifier), METERING_EVENT_SCHEMA)


def ensure_meter_events_table(catalog: Catalog, config: Config) -> Table:
    """Return the meter-events table (``meter_events`` beside the metering table), creating it on first use.

    Loads first and tolerates a racing creator, as :func:`ensure_metering_table` does.
    """
    identifier = (config.database_name, METER_EVENTS_TABLE)
    with contextlib.suppress(NoSuchTableError, NoSuchNamespaceError):
        return evolve_table(catalog.load_table(identifier), METER_EVENT_SCHEMA)
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
        return evolve_table(catalog.load_table(identifier), METER_EVENT_SCHEMA)


def added_fields(current: Schema, wanted: Schema) -> list[NestedField]:
    """The top-level fields of ``wanted`` that ``current`` lacks (by name), in ``wanted``'s order.

    A field of ``current`` that ``wanted`` does not name is left alone: a newer meterlake may have added it.

    Raises:
        IncompatibleSchemaError: a field both have differs in type or required flag, the identifier fields differ,
            or an added field is required (the rows already written have no value for it).
    """
    problems: list[str] = []
    added: list[NestedField] = []
    for field in wanted.fields:
        try:
            existing = current.find_field(field.name)
        except ValueError:
            if field.required:
                problems.append(f"{field.name}: a column added to a table that holds rows must be optional")
            added.append(field)
            continue
        if str(existing.field_type) != str(field.field_type):
            problems.append(f"{field.name}: the table has {existing.field_type}, the code {field.field_type}")
        if existing.required != field.required:
            has, wants = ("required" if f.required else "optional" for f in (existing, field))
            problems.append(f"{field.name}: the table has it {has}, the code {wants}")
    if current.identifier_field_names() != wanted.identifier_field_names():
        problems.append(
            f"identifier fields: the table has {sorted(current.identifier_field_names())}, "
            f"the code {sorted(wanted.identifier_field_names())}"
        )
    if problems:
        raise IncompatibleSchemaError(
            "only added optional columns evolve a table automatically; " + "; ".join(problems)
        )
    return added


def evolve_table(table: Table, schema: Schema) -> Table:
    """Add the columns of ``schema`` that ``table`` lacks, in one Iceberg schema update, and return the table.

    Nothing is rewritten: data files written before keep their columns, and readers (which map columns by field
    id) read an added column of their rows as null. A concurrent writer's commit is retried over.

    Raises:
        IncompatibleSchemaError: the difference is not only added optional columns (see :func:`added_fields`),
            naming the table and each offending column.
    """
    for attempt in range(_EVOLVE_ATTEMPTS):
        try:
            added = added_fields(table.schema(), schema)
        except IncompatibleSchemaError as exc:
            raise IncompatibleSchemaError(f"table {'.'.join(table.name())}: {exc}") from None
        if not added:
            return table
        try:
            with table.update_schema() as update:
                update.union_by_name(Schema(*added))
        except CommitFailedException:
            if attempt == _EVOLVE_ATTEMPTS - 1:
                raise
            table = table.refresh()
    return table


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

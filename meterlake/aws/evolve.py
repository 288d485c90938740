"""Schema evolution on AWS: the Athena DDL that adds to a deployed table the fields the record gained after it was
created.

CloudFormation creates the AWS table from ``METERING_EVENT_CREATION_SCHEMA`` and must never see that change (see
``cdk_stacks.glue_iceberg``), so a field appended to the record reaches a deployed table through Athena's
``ALTER TABLE ADD COLUMNS``, an Iceberg schema update that rewrites no data: rows written before read it as null.
Only additions are evolved, as locally (``meterlake.lake.catalog.added_fields``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from pyiceberg.schema import Schema
from pyiceberg.types import DecimalType, IcebergType

from meterlake.aws.stacks import ATHENA_DEFAULT_CATALOG, S3_TABLES_CATALOG
from meterlake.config import Config
from meterlake.lake.catalog import added_fields
from meterlake.schema import METERING_EVENT_CREATION_SCHEMA, METERING_EVENT_SCHEMA

#: Iceberg types -> the type names Athena's Iceberg DDL takes ("Supported data types for Iceberg tables in Athena").
#: Athena's DDL creates no timestamptz or time column.
_ATHENA_DDL_TYPES: Final[dict[str, str]] = {
    "boolean": "boolean",
    "int": "int",
    "long": "bigint",
    "float": "float",
    "double": "double",
    "date": "date",
    "timestamp": "timestamp",
    "string": "string",
    "binary": "binary",
}


class AthenaTypeError(ValueError):
    """An added field has a type Athena's Iceberg DDL cannot add (timestamptz, time, uuid, fixed, nested)."""


@dataclass(frozen=True, slots=True)
class Evolution:
    """What a deployed table needs: the columns to add, the statement adding them, and where to run it."""

    columns: list[str]
    statement: str | None
    catalog: str


def athena_ddl_type(field_type: IcebergType) -> str:
    """Athena's DDL name for an Iceberg primitive type, e.g. ``bigint`` for ``long``.

    Raises:
        AthenaTypeError: a type Athena's Iceberg DDL does not create.
    """
    if isinstance(field_type, DecimalType):
        return f"decimal({field_type.precision},{field_type.scale})"
    name = _ATHENA_DDL_TYPES.get(str(field_type))
    if name is None:
        raise AthenaTypeError(
            f"Athena's DDL cannot add a {field_type} column; add it with an Iceberg client (pyiceberg's "
            "update_schema against the Glue catalog) instead"
        )
    return name


def evolution(
    config: Config,
    *,
    table_bucket: str | None = None,
    schema: Schema = METERING_EVENT_SCHEMA,
    created: Schema = METERING_EVENT_CREATION_SCHEMA,
) -> Evolution:
    """The ``ALTER TABLE ADD COLUMNS`` that evolves a table created as ``created`` to ``schema``; no statement when
    there is nothing to add. ``table_bucket`` names an S3 table's bucket (its Athena catalog).

    Raises:
        IncompatibleSchemaError: the record changed otherwise than by added optional fields.
        AthenaTypeError: an added field's type cannot be added by Athena's DDL.
    """
    if config.s3_tables is None:
        catalog = ATHENA_DEFAULT_CATALOG
    else:
        catalog = f"{S3_TABLES_CATALOG}/{table_bucket or '<table bucket: the Storage stack output TableBucketName>'}"
    added = added_fields(created, schema)
    if not added:
        return Evolution(columns=[], statement=None, catalog=catalog)
    columns = ", ".join(f"`{field.name}` {athena_ddl_type(field.field_type)}" for field in added)
    statement = f"ALTER TABLE `{config.database_name}`.`{config.table_name}` ADD COLUMNS ({columns})"
    return Evolution(columns=[field.name for field in added], statement=statement, catalog=catalog)

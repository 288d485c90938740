"""The metering-events Iceberg table, defined once: schema, partition spec and identifier fields.

Generated from the access-log record (``meterlake.records``) so the two cannot drift. The local catalog creates
the table from these objects and the CDK Glue table is generated from them.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

import pyarrow as pa
from pyiceberg.partitioning import PartitionField, PartitionSpec
from pyiceberg.schema import Schema
from pyiceberg.transforms import DayTransform
from pyiceberg.types import (
    IcebergType,
    IntegerType,
    LongType,
    NestedField,
    StringType,
    TimestamptzType,
)

from meterlake.records import ACCESS_LOG_FIELDS, INGESTED_AT, FieldType

_ICEBERG_TYPES: dict[FieldType, IcebergType] = {
    FieldType.STRING: StringType(),
    FieldType.INT: IntegerType(),
    FieldType.LONG: LongType(),
    FieldType.EPOCH_MILLIS: TimestamptzType(),
}

#: Iceberg field ids assigned to the partition fields start here, as the Iceberg spec does.
PARTITION_FIELD_ID_START = 1000


def _build_schema() -> Schema:
    fields = [
        NestedField(field_id=i, name=f.name, field_type=_ICEBERG_TYPES[f.type], required=f.required, doc=f.doc)
        for i, f in enumerate(ACCESS_LOG_FIELDS, start=1)
    ]
    fields.append(
        NestedField(
            field_id=len(fields) + 1,
            name=INGESTED_AT,
            field_type=TimestamptzType(),
            required=True,
            doc="When the pipeline processed the event",
        )
    )
    by_name = {f.name: f for f in fields}
    identifiers = [by_name[name].field_id for name in IDENTIFIER_COLUMNS]
    return Schema(*fields, identifier_field_ids=identifiers)


#: The column the table is partitioned on, by day.
PARTITION_SOURCE_COLUMN = "request_time"
#: What identifies an event: the request id, and its time. Firehose upserts on these (its unique keys), and an
#: Iceberg equality delete only reaches rows of the partition it is written to, so the keys include the partition's
#: source column, as Iceberg's upserting writers require: a redelivered line then always finds its first copy. The
#: time never differs between copies of one request, so uniqueness is the request id's.
IDENTIFIER_COLUMNS = ("request_id", PARTITION_SOURCE_COLUMN)

METERING_EVENT_SCHEMA: Schema = _build_schema()

METERING_EVENT_PARTITION_SPEC: PartitionSpec = PartitionSpec(
    PartitionField(
        source_id=METERING_EVENT_SCHEMA.find_field(PARTITION_SOURCE_COLUMN).field_id,
        field_id=PARTITION_FIELD_ID_START,
        transform=DayTransform(),
        name=f"{PARTITION_SOURCE_COLUMN}_day",
    )
)

#: Table properties shared by the local catalog and the Glue table.
TABLE_PROPERTIES: Mapping[str, str] = MappingProxyType(
    {
        "format-version": "2",
        "write.format.default": "parquet",
        "write.parquet.compression-codec": "zstd",
    }
)


def metering_event_arrow_schema() -> pa.Schema:
    """The Arrow schema rows must have to be appended to the table (timestamps in UTC microseconds)."""
    schema: pa.Schema = METERING_EVENT_SCHEMA.as_arrow()
    return schema

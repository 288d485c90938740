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
    DoubleType,
    IcebergType,
    IntegerType,
    LongType,
    MapType,
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


#: ``ingested_at``'s field id: the one it had when the record had its first 17 fields.
INGESTED_AT_FIELD_ID = 18
#: The last field id of the table as deployed tables were created (the record's first 17 fields, then
#: ``ingested_at``). A field id is forever: Iceberg maps data files' columns by id, and CloudFormation created tables
#: on AWS with these. So the record only grows at its end, and a field appended to it takes the next id after this
#: (19, 20, ...), never a position's.
CREATION_LAST_FIELD_ID = INGESTED_AT_FIELD_ID


def _access_log_field_ids() -> list[int]:
    """1, 2, ... for the record's fields in order, skipping ``ingested_at``'s id."""
    ids = [i for i in range(1, len(ACCESS_LOG_FIELDS) + 2) if i != INGESTED_AT_FIELD_ID]
    return ids[: len(ACCESS_LOG_FIELDS)]


def _build_schema() -> Schema:
    fields = [
        NestedField(field_id=i, name=f.name, field_type=_ICEBERG_TYPES[f.type], required=f.required, doc=f.doc)
        for i, f in zip(_access_log_field_ids(), ACCESS_LOG_FIELDS, strict=True)
    ]
    fields.insert(
        INGESTED_AT_FIELD_ID - 1,
        NestedField(
            field_id=INGESTED_AT_FIELD_ID,
            name=INGESTED_AT,
            field_type=TimestamptzType(),
            required=True,
            doc="When the pipeline processed the event",
        ),
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


#: The table as deployed tables were created: the fields up to :data:`CREATION_LAST_FIELD_ID`. CloudFormation
#: creates the AWS table from this schema, never from :data:`METERING_EVENT_SCHEMA`: a changed Glue Iceberg table
#: resource is updated in a way that drops its Iceberg parameters, and a changed S3 table resource is replaced. Fields
#: the record gains later reach deployed tables by schema evolution (README, "Schema evolution").
def creation_schema(schema: Schema) -> Schema:
    """``schema``'s fields up to :data:`CREATION_LAST_FIELD_ID`: the table as deployed tables were created."""
    return Schema(
        *(f for f in schema.fields if f.field_id <= CREATION_LAST_FIELD_ID),
        identifier_field_ids=schema.identifier_field_ids,
    )


METERING_EVENT_CREATION_SCHEMA: Schema = creation_schema(METERING_EVENT_SCHEMA)

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


# -- the meter-events table: usage the application reports (LLM tokens, GPU seconds, ...) through the service --------

#: The table ingested usage events land in, in the metering table's database.
METER_EVENTS_TABLE = "meter_events"
#: When the usage happened: the event's own time (the partition source).
METER_TIME_COLUMN = "meter_time"
#: When the service accepted the event; cancellation rules select events by it.
METER_INGESTED_AT_COLUMN = "ingested_at"
#: What makes an event the same event, as Amberflo deduplicates: its meter and its uniqueId. The local delivery
#: stream drops a row whose key was committed before.
METER_EVENT_KEY_COLUMNS = ("meter_api_name", "unique_id")

METER_EVENT_SCHEMA: Schema = Schema(
    NestedField(
        1, "unique_id", StringType(), required=True, doc="The sender's uniqueId, or one derived from the content"
    ),
    NestedField(2, "meter_api_name", StringType(), required=True, doc="The event meter it counts for"),
    NestedField(3, "customer_id", StringType(), required=True, doc="Whose usage it is (the tenant)"),
    NestedField(4, "meter_value", DoubleType(), required=True, doc="How much usage (a finite number)"),
    NestedField(5, METER_TIME_COLUMN, TimestamptzType(), required=True, doc="When the usage happened"),
    NestedField(
        6,
        "dimensions",
        MapType(key_id=9, key_type=StringType(), value_id=10, value_type=StringType(), value_required=True),
        required=False,
        doc="Dimension name -> value, as sent",
    ),
    NestedField(
        7, METER_INGESTED_AT_COLUMN, TimestamptzType(), required=True, doc="When the service accepted the event"
    ),
    NestedField(8, "source", StringType(), required=True, doc="How it arrived: ingest (POST /ingest) or event"),
    # The time is part of the key for the reason IDENTIFIER_COLUMNS gives; uniqueness is the meter's and uniqueId's.
    identifier_field_ids=[2, 1, 5],
)

METER_EVENT_PARTITION_SPEC: PartitionSpec = PartitionSpec(
    PartitionField(
        source_id=METER_EVENT_SCHEMA.find_field(METER_TIME_COLUMN).field_id,
        field_id=PARTITION_FIELD_ID_START,
        transform=DayTransform(),
        name=f"{METER_TIME_COLUMN}_day",
    )
)


def meter_event_arrow_schema() -> pa.Schema:
    """The Arrow schema rows must have to be appended to the meter-events table (timestamps in UTC microseconds)."""
    schema: pa.Schema = METER_EVENT_SCHEMA.as_arrow()
    return schema

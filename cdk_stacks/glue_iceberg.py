"""The metering-events table as AWS creates it, generated from ``meterlake.schema``: Glue's ``OpenTableFormatInput``
(an Iceberg table in a general-purpose bucket) and S3 Tables' ``IcebergMetadata`` (a table in a table bucket).

CloudFormation creates the table from these, so the table on AWS has the columns, field ids, identifier fields and
partition spec the local catalog creates: there is no DDL to run by hand. They are the table as created
(``METERING_EVENT_CREATION_SCHEMA``), and never change under a deployed stack: CloudFormation's update of a Glue
Iceberg table drops its Iceberg parameters (aws-cloudformation/cloudformation-coverage-roadmap#1919, #2495), and an S3
table's ``IcebergMetadata`` is create-only. Fields added to the record later are added by ``meterlake aws evolve``.
"""

from __future__ import annotations

from typing import Final

from aws_cdk import aws_glue as glue
from aws_cdk import aws_s3tables as s3tables
from pyiceberg.partitioning import PartitionSpec
from pyiceberg.schema import Schema
from pyiceberg.types import (
    BinaryType,
    BooleanType,
    DateType,
    DecimalType,
    DoubleType,
    FixedType,
    FloatType,
    IcebergType,
    IntegerType,
    LongType,
    StringType,
    TimestampType,
    TimestamptzType,
    TimeType,
    UUIDType,
)

from meterlake.schema import METERING_EVENT_CREATION_SCHEMA, METERING_EVENT_PARTITION_SPEC, TABLE_PROPERTIES

#: Iceberg primitive types -> the type names of the Iceberg spec, which Glue's Iceberg API takes.
_PRIMITIVE_TYPE_NAMES: Final[dict[type[IcebergType], str]] = {
    BooleanType: "boolean",
    IntegerType: "int",
    LongType: "long",
    FloatType: "float",
    DoubleType: "double",
    DateType: "date",
    TimeType: "time",
    TimestampType: "timestamp",
    TimestamptzType: "timestamptz",
    StringType: "string",
    UUIDType: "uuid",
    BinaryType: "binary",
}

#: Set by Glue from IcebergInput.Version; Iceberg reserves it, so it is not passed as a table property.
_RESERVED_PROPERTIES: Final = frozenset({"format-version"})


class UnsupportedIcebergTypeError(TypeError):
    """A schema type has no Glue Iceberg type name here (nested types are not used by the metering table)."""

    def __init__(self, field_type: IcebergType) -> None:
        super().__init__(f"no Glue Iceberg type for {field_type!r}")
        self.field_type = field_type


def glue_iceberg_type(field_type: IcebergType) -> str:
    """The Iceberg-spec type name of a primitive pyiceberg type, e.g. ``timestamptz`` or ``decimal(9,2)``.

    Raises:
        UnsupportedIcebergTypeError: a nested (struct, list, map) or unknown type.
    """
    if isinstance(field_type, DecimalType):
        return f"decimal({field_type.precision},{field_type.scale})"
    if isinstance(field_type, FixedType):
        return f"fixed[{len(field_type)}]"
    name = _PRIMITIVE_TYPE_NAMES.get(type(field_type))
    if name is None:
        raise UnsupportedIcebergTypeError(field_type)
    return name


def iceberg_schema(schema: Schema = METERING_EVENT_CREATION_SCHEMA) -> glue.CfnTable.IcebergSchemaProperty:
    """Columns (id, name, type, required, doc) and identifier field ids of ``schema``."""
    return glue.CfnTable.IcebergSchemaProperty(
        fields=[
            glue.CfnTable.IcebergStructFieldProperty(
                id=field.field_id,
                name=field.name,
                type=glue_iceberg_type(field.field_type),
                required=field.required,
                doc=field.doc,
            )
            for field in schema.fields
        ],
        identifier_field_ids=list(schema.identifier_field_ids),
        type="struct",
    )


def iceberg_partition_spec(
    spec: PartitionSpec = METERING_EVENT_PARTITION_SPEC,
) -> glue.CfnTable.IcebergPartitionSpecProperty:
    """The partition spec's fields (source id, transform, field id, name)."""
    return glue.CfnTable.IcebergPartitionSpecProperty(
        fields=[
            glue.CfnTable.IcebergPartitionFieldProperty(
                name=field.name, source_id=field.source_id, transform=str(field.transform), field_id=field.field_id
            )
            for field in spec.fields
        ],
        spec_id=spec.spec_id,
    )


def open_table_format_input(location: str) -> glue.CfnTable.OpenTableFormatInputProperty:
    """Create the metering-events table (Iceberg format v2) at ``location``."""
    return glue.CfnTable.OpenTableFormatInputProperty(
        iceberg_input=glue.CfnTable.IcebergInputProperty(
            metadata_operation="CREATE",
            version=TABLE_PROPERTIES["format-version"],
            iceberg_table_input=glue.CfnTable.IcebergTableInputProperty(
                location=location,
                schema=iceberg_schema(),
                partition_spec=iceberg_partition_spec(),
                properties={k: v for k, v in TABLE_PROPERTIES.items() if k not in _RESERVED_PROPERTIES},
            ),
        )
    )


def s3_tables_iceberg_metadata(
    schema: Schema = METERING_EVENT_CREATION_SCHEMA, spec: PartitionSpec = METERING_EVENT_PARTITION_SPEC
) -> s3tables.CfnTable.IcebergMetadataProperty:
    """The S3 table's schema (field ids and identifier fields included), partition spec and properties."""
    return s3tables.CfnTable.IcebergMetadataProperty(
        iceberg_schema_v2=s3tables.CfnTable.IcebergSchemaV2Property(
            schema_v2_field_type="struct",
            schema_v2_field_list=[
                s3tables.CfnTable.SchemaV2FieldProperty(
                    id=field.field_id,
                    name=field.name,
                    type=glue_iceberg_type(field.field_type),
                    required=field.required,
                    doc=field.doc,
                )
                for field in schema.fields
            ],
            identifier_field_ids=list(schema.identifier_field_ids),
        ),
        iceberg_partition_spec=s3tables.CfnTable.IcebergPartitionSpecProperty(
            fields=[
                s3tables.CfnTable.IcebergPartitionFieldProperty(
                    name=field.name, source_id=field.source_id, transform=str(field.transform), field_id=field.field_id
                )
                for field in spec.fields
            ],
            spec_id=spec.spec_id,
        ),
        table_properties={k: v for k, v in TABLE_PROPERTIES.items() if k not in _RESERVED_PROPERTIES},
    )

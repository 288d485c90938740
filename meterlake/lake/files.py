"""Reading a table's data files as an Iceberg reader sees them, for the parts that read files one by one.

Apart from the catalog (no SQL catalog, no SQLAlchemy), so the forwarding stager's Lambda bundle can carry it.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
from pyiceberg.io import InputStream


def read_data_file(source: str | InputStream, schema: pa.Schema) -> pa.Table:
    """A data file's rows with ``schema``'s columns, in its order and types, as an Iceberg reader sees them: a column
    the table gained after the file was written (see :func:`meterlake.lake.catalog.evolve_table`) reads as null.

    Columns are matched by name, which evolution never changes (it only adds).
    """
    parquet = pq.ParquetFile(source)
    written = set(parquet.schema_arrow.names)
    rows = parquet.read(columns=[name for name in schema.names if name in written])
    for field in schema:
        if field.name not in written:
            rows = rows.append_column(field.name, pa.nulls(rows.num_rows, field.type))
    return rows.select(schema.names).cast(schema)

"""Transformed rows into Arrow, in the stream's process or in a transform worker that reads its piece itself.

:func:`decode_rows` turns the transform's Ok rows (JSON lines) into an Arrow table of the destination's schema and
singles out the rows that do not fit it.

:func:`transform_piece` is what a transform worker does with a :class:`PieceRequest`: it reads a range of the spool
from the segment files (checking every frame, as the stream's own reads do), runs the transform on it as Firehose
invokes its Lambda (:class:`~meterlake.local.invoker.Invoker`) and decodes the destination's Ok rows to Arrow. The
stream's process then receives one Arrow table per piece instead of sending the records and decoding the answers
itself, so on two cores the per-record work of a piece runs beside the stream's puts, deduplication and commits.
This module imports pyarrow, so the worker imports it only when it is first sent a piece of this kind.
"""

from __future__ import annotations

import functools
import logging
import sys
from dataclasses import dataclass, field
from typing import Annotated, Any

import msgspec
import pyarrow as pa
from msgspec import Meta
from msgspec.structs import astuple

from meterlake.local.invoker import Invoker, Transformed, event_ranges
from meterlake.local.spool import SpoolRange, read_range

logger = logging.getLogger(__name__)

#: Bytes of rows decoded per call (see rows_to_arrow).
_CHUNK_BYTES = 256 * 1024
#: What a row that does not fit its table raises while it is decoded or its column built.
_DECODE_ERRORS = (msgspec.DecodeError, pa.ArrowException, ValueError, TypeError, OverflowError, RecursionError)


@dataclass(frozen=True, slots=True)
class PieceRequest:
    """A piece of the spool for a worker to read, transform and decode.

    Attributes:
        spool_range: the records, as the worker reads them (frame boundaries, no padding).
        destination: the (database, table) whose Ok rows the worker decodes.
        schema: that table's Arrow schema when the piece was sent.
    """

    spool_range: SpoolRange
    destination: tuple[str, str]
    schema: pa.Schema


@dataclass(slots=True)
class DecodedPiece:
    """What a worker made of a :class:`PieceRequest`; indices are positions among the range's records.

    Attributes:
        records: how many records the range holds.
        first_arrival_ms: the first record's arrival time (0 when the range holds none).
        transformed: the transform's outcome, without the destination's Ok rows (they are in ``rows``).
        rows: the destination's Ok rows, in the request's schema.
        bad: (index, problem) of each of the destination's Ok rows that does not fit the schema.
    """

    records: int
    first_arrival_ms: int
    transformed: Transformed
    rows: pa.Table
    bad: list[tuple[int, str]] = field(default_factory=list)


def transform_piece(invoker: Invoker, request: PieceRequest) -> DecodedPiece:
    """Read ``request``'s range of the spool, transform it and decode the destination's Ok rows (see the module).

    Raises:
        SpoolCorruptError: a frame of the range fails its checksum.
        OSError: a segment file cannot be read.
    """
    batch = read_range(request.spool_range)
    transformed = invoker.transform(batch.offsets, batch.arrivals_ms, batch.records)
    first_arrival_ms = batch.arrivals_ms[0] if batch.arrivals_ms else 0
    ok = transformed.rows.pop(request.destination, None)
    if ok is None:
        return DecodedPiece(len(batch), first_arrival_ms, transformed, request.schema.empty_table())
    indices, lines = ok
    rows, bad = decode_rows(lines, request.schema)
    return DecodedPiece(len(batch), first_arrival_ms, transformed, rows, [(indices[j], problem) for j, problem in bad])


class UnsupportedColumnError(ValueError):
    """A destination column has a type the local stream cannot decode JSON into (none of meterlake's tables has one)."""


def _bounded_int(bits: int, *, signed: bool) -> Any:
    """An integer annotation msgspec checks against the range of an Arrow integer of ``bits`` bits."""
    low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    return Annotated[int, Meta(ge=low, le=high)]


def _column_annotation(name: str, arrow_type: pa.DataType) -> Any:
    """The Python type msgspec decodes a column's JSON value into, as Firehose reads it for an Iceberg column: strings,
    range-checked integers (timestamps as integer microseconds), numbers, booleans, and maps of strings."""
    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type):
        return str
    if pa.types.is_integer(arrow_type):
        return _bounded_int(arrow_type.bit_width, signed=pa.types.is_signed_integer(arrow_type))
    if pa.types.is_timestamp(arrow_type):
        return _bounded_int(64, signed=True)
    if pa.types.is_floating(arrow_type):
        return float
    if pa.types.is_boolean(arrow_type):
        return bool
    if pa.types.is_map(arrow_type) and all(
        pa.types.is_string(t) or pa.types.is_large_string(t) for t in (arrow_type.key_type, arrow_type.item_type)
    ):
        return dict[str, str]
    raise UnsupportedColumnError(f"column {name!r} has type {arrow_type}, which the local stream cannot decode")


@functools.lru_cache(maxsize=32)
def _row_decoder(target: pa.Schema) -> msgspec.json.Decoder[Any]:
    """Decodes rows (with ``decode_lines``: one JSON object a line) into structs of ``target``'s columns, in order.

    A nullable column may be null or absent; a required one must hold a value. A member that is no column is an error,
    except in a table with a map column (the meter events), whose rows ignore one, as they always have.
    """
    members = [
        (f"c{i}", _column_annotation(f.name, f.type) | None, msgspec.field(name=f.name, default=None))
        if f.nullable
        else (f"c{i}", _column_annotation(f.name, f.type), msgspec.field(name=f.name))
        for i, f in enumerate(target)
    ]
    maps = any(pa.types.is_map(f.type) for f in target)
    # gc=False: a row holds only strings, numbers and dicts of strings (no cycles), and tracking 100k+ of them set
    # off full collections. kw_only: required and optional columns may come in any order.
    row = msgspec.defstruct("Row", members, kw_only=True, gc=False, forbid_unknown_fields=not maps)
    return msgspec.json.Decoder(row)


def rows_to_arrow(lines: list[bytes], target: pa.Schema) -> pa.Table:
    """Parse JSON object lines into ``target``'s types (raises ``msgspec.DecodeError`` or ``ValueError`` on a row
    that does not fit). A line may hold several rows, one a line (the metering service puts a request's rows as one
    record).

    msgspec decodes the joined lines into typed structs in one call, and each column is built from their members:
    single-threaded, this costs ~0.6-0.8 us a row less CPU than Arrow's JSON reader (whose threads also took CPU
    from the other transform worker) on access-log rows, and it builds map columns, which Arrow's reader cannot.
    """
    if not lines:
        return target.empty_table()
    decoder = _row_decoder(target)
    tables = []
    # A chunk per decode call, cut as events are (no request limit here): msgspec holds the interpreter lock for a
    # whole call, and the metering service's delivery process answers its puts from another thread (a 200k-row
    # buffer in one call held them ~0.1 s).
    for chunk in event_ranges(lines, _CHUNK_BYTES, sys.maxsize):
        body = b"\n".join(lines[chunk.start : chunk.stop])
        rows = decoder.decode_lines(body)
        if len(rows) != body.count(b"\n") + 1:
            # msgspec skips blank lines: a record (or a line of one) that holds no row would vanish without a trace.
            raise ValueError("a line holds no row (it is empty or blank)")
        columns = zip(*map(astuple, rows), strict=True)
        arrays = [pa.array(c, type=f.type) for c, f in zip(columns, target, strict=True)]
        tables.append(pa.Table.from_arrays(arrays, schema=target))
    return tables[0] if len(tables) == 1 else pa.concat_tables(tables)


def decode_rows(lines: list[bytes], target: pa.Schema) -> tuple[pa.Table, list[tuple[int, str]]]:
    """JSON rows -> one Arrow table of ``target``, plus (position, problem) for rows that do not fit.

    The whole batch is parsed at once; only if that fails is it parsed record by record to single out the records
    that do not fit (a record holding several rows, one a line, fits or not as a whole).
    """
    try:
        return rows_to_arrow(lines, target), []
    except _DECODE_ERRORS:
        logger.info("batch JSON decode failed; decoding %d rows one by one", len(lines))
    good: list[pa.Table] = []
    bad: list[tuple[int, str]] = []
    for i, line in enumerate(lines):
        try:
            good.append(rows_to_arrow([line], target))
        except _DECODE_ERRORS as exc:
            bad.append((i, f"the transformed record does not fit the table: {exc}"))
    arrow = pa.concat_tables(good) if good else target.empty_table()
    return arrow, bad

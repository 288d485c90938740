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
import io
import logging
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any

import msgspec
import pyarrow as pa
import pyarrow.json as pa_json

from meterlake.local.invoker import Invoker, Transformed
from meterlake.local.spool import SpoolRange, read_range

logger = logging.getLogger(__name__)

_MIB = 1024 * 1024


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


def _json_parse_schema(target: pa.Schema) -> pa.Schema:
    """The schema to parse transformed JSON with: timestamps arrive as integer microseconds, everything nullable."""
    return pa.schema(
        pa.field(f.name, pa.int64() if pa.types.is_timestamp(f.type) else f.type, nullable=True) for f in target
    )


def rows_to_arrow(lines: list[bytes], target: pa.Schema) -> pa.Table:
    """Parse JSON object lines into ``target``'s types (raises pyarrow/ValueError errors on a bad row).

    Arrow's JSON reader cannot build a map column (a JSON object with any keys), so map columns are decoded apart,
    by msgspec in one call, and the reader then lets their members pass. A line may hold several rows, one a line
    (the metering service puts a request's rows as one record).
    """
    maps = [f for f in target if pa.types.is_map(f.type)]
    flat = pa.schema([f for f in target if not pa.types.is_map(f.type)])
    body = b"\n".join(lines)
    longest = max(len(line) for line in lines)
    table = pa_json.read_json(
        io.BytesIO(body),
        read_options=pa_json.ReadOptions(block_size=max(4 * _MIB, 2 * longest + 2)),
        parse_options=pa_json.ParseOptions(
            explicit_schema=_json_parse_schema(flat), unexpected_field_behavior="ignore" if maps else "error"
        ),
    )
    if maps:
        # Line by line, in place: wrapping the body into one JSON array copied it twice (~0.5 us a row).
        rows = _map_decoder(tuple(f.name for f in maps)).decode_lines(body)
        if len(rows) != table.num_rows:
            raise ValueError(f"{len(rows)} rows hold maps, {table.num_rows} rows were read")
        for f in maps:
            values = list(map(attrgetter(f.name), rows))
            table = table.append_column(f.name, pa.array(values, type=f.type))
    return table.select(target.names).cast(target)


@functools.cache
def _map_decoder(names: tuple[str, ...]) -> msgspec.json.Decoder[Any]:
    """Decodes rows (with ``decode_lines``: one JSON object a line) into just their map members (objects of strings,
    or null)."""
    # gc=False: the rows hold only dicts of strings (no cycles), and tracking 100k+ of them set off full collections.
    row = msgspec.defstruct("MapMembers", [(name, dict[str, str] | None, None) for name in names], gc=False)
    return msgspec.json.Decoder(row)


def decode_rows(lines: list[bytes], target: pa.Schema) -> tuple[pa.Table, list[tuple[int, str]]]:
    """JSON rows -> one Arrow table of ``target``, plus (position, problem) for rows that do not fit.

    The whole batch is parsed at once; only if that fails is it parsed row by row to single out the bad rows.
    """
    try:
        return rows_to_arrow(lines, target), []
    except (pa.ArrowException, ValueError):
        logger.info("batch JSON decode failed; decoding %d rows one by one", len(lines))
    good: list[pa.Table] = []
    bad: list[tuple[int, str]] = []
    for i, line in enumerate(lines):
        if b"\n" in line or b"\r" in line:
            bad.append((i, "the transformed record spans several lines"))
            continue
        try:
            good.append(rows_to_arrow([line], target))
        except (pa.ArrowException, ValueError) as exc:
            bad.append((i, f"the transformed record does not fit the table: {exc}"))
    arrow = pa.concat_tables(good) if good else target.empty_table()
    return arrow, bad

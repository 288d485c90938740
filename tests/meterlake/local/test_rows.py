"""JSON rows to Arrow: the decoding the delivery stream (and its transform workers) applies to transformed records."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec
import pyarrow as pa
import pytest

from meterlake.local.rows import decode_rows, rows_to_arrow
from meterlake.schema import METER_EVENT_SCHEMA, METERING_EVENT_SCHEMA

TARGET = METER_EVENT_SCHEMA.as_arrow()


def _row(i: int, dimensions: dict[str, str] | None) -> dict[str, object]:
    return {
        "unique_id": f"u{i}",
        "meter_api_name": "llm-tokens",
        "customer_id": f"c{i % 3}",
        "meter_value": float(i),
        "meter_time": 1_700_000_000_000_000 + i,
        "dimensions": dimensions,
        "ingested_at": 1_700_000_000_000_000,
        "source": "ingest",
    }


def _dimensions(i: int) -> dict[str, str] | None:
    return None if i % 4 == 0 else {} if i % 4 == 1 else {f"k{j}": f"v{i}-{j}" for j in range(i % 4)}


def test_map_members_stay_with_their_rows_across_records_of_several_lines() -> None:
    """A record may hold several rows, one a line (the service puts a request's rows as one record): every row's
    map lands on that row."""
    rows = [_row(i, _dimensions(i)) for i in range(40)]
    records = [b"\n".join(msgspec.json.encode(row) for row in rows[start : start + 7]) for start in range(0, 40, 7)]
    table = rows_to_arrow(records, TARGET)
    assert table.schema == TARGET
    assert table.column("unique_id").to_pylist() == [f"u{i}" for i in range(40)]
    decoded = table.column("dimensions").to_pylist()
    expected = [None if d is None else sorted(d.items()) for d in map(_dimensions, range(40))]
    assert [None if d is None else sorted(d) for d in decoded] == expected


def test_a_row_that_does_not_fit_is_singled_out_and_the_rest_kept() -> None:
    good = [msgspec.json.encode(_row(i, {"model": "m1"})) for i in range(3)]
    bad = msgspec.json.encode({**_row(9, None), "dimensions": {"model": 1}})
    table, problems = decode_rows([good[0], bad, good[1], good[2]], TARGET)
    assert table.column("unique_id").to_pylist() == ["u0", "u1", "u2"]
    assert [position for position, _ in problems] == [1]
    assert table.schema == TARGET


ACCESS_LOG_ROWS = METERING_EVENT_SCHEMA.as_arrow()
_EVENT = {
    "request_id": "r1",
    "tenant_id": "acme",
    "request_time": 1_764_000_000_000_000,
    "http_method": "GET",
    "status": 200,
    "response_length": 5,
    "ingested_at": 1_764_000_000_000_001,
}


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"request_id": None}, "Expected `str`, got `null`"),
        ({"status": 2**31}, "Expected `int` <= 2147483647"),
        ({"status": "200"}, "Expected `int`, got `str`"),
        ({"status": 200.0}, "Expected `int`, got `float`"),
        ({"tenant_id": 7}, "Expected `str | null`, got `int`"),
        ({"request_time": 2**63}, "Expected `int` <= 9223372036854775807"),
        ({"not_a_column": "x"}, "unknown field `not_a_column`"),
    ],
)
def test_a_row_whose_member_does_not_fit_its_column_is_singled_out_with_the_reason(
    change: dict[str, object], reason: str
) -> None:
    good = msgspec.json.encode(_EVENT)
    table, problems = decode_rows([good, msgspec.json.encode({**_EVENT, **change}), good], ACCESS_LOG_ROWS)
    assert table.num_rows == 2
    assert table.schema == ACCESS_LOG_ROWS
    assert [position for position, _ in problems] == [1]
    assert reason in problems[0][1]


def test_a_required_column_missing_from_a_row_is_a_problem_and_absent_nullable_ones_are_null() -> None:
    table, problems = decode_rows([msgspec.json.encode(_EVENT)], ACCESS_LOG_ROWS)
    assert problems == []
    row = table.to_pylist()[0]
    assert row["user"] is None
    assert row["status"] == 200
    assert row["request_time"] == datetime(2025, 11, 24, 16, 0, tzinfo=UTC)
    missing = {k: v for k, v in _EVENT.items() if k != "status"}
    _, problems = decode_rows([msgspec.json.encode(missing)], ACCESS_LOG_ROWS)
    assert "missing required field `status`" in problems[0][1]


def test_a_column_of_a_type_the_stream_cannot_decode_rejects_every_row_with_the_reason() -> None:
    target = pa.schema([pa.field("day", pa.date32())])
    table, problems = decode_rows([b'{"day": 1}', b'{"day": 2}'], target)
    assert table.num_rows == 0
    assert [position for position, _ in problems] == [0, 1]
    assert "column 'day' has type date32[day], which the local stream cannot decode" in problems[0][1]


@pytest.mark.parametrize("empty", [b"", b"  ", b'{"unique_id": "x"}\n'])
def test_a_record_or_a_line_of_one_holding_no_row_is_a_problem_not_lost(empty: bytes) -> None:
    """msgspec skips blank lines; the decoder must not, or the record would vanish without a reject."""
    good = [msgspec.json.encode(_row(i, {"model": "m1"})) for i in range(2)]
    several = b"\n".join(msgspec.json.encode(_row(i, None)) for i in range(5, 8))
    table, problems = decode_rows([good[0], empty, several, good[1]], TARGET)
    assert [position for position, _ in problems] == [1]
    assert "holds no row" in problems[0][1] or "missing required field" in problems[0][1]
    # the other records' rows are all kept, the one holding several rows too
    assert table.column("unique_id").to_pylist() == ["u0", "u5", "u6", "u7", "u1"]


def test_a_row_nested_deeper_than_the_decoder_goes_is_a_problem_not_a_crash() -> None:
    deep = msgspec.json.encode(_row(1, None))[:-1] + b',"extra":' + b"[" * 5000 + b"]" * 5000 + b"}"
    table, problems = decode_rows([msgspec.json.encode(_row(0, None)), deep], TARGET)
    assert table.num_rows == 1
    assert [position for position, _ in problems] == [1]


def test_rows_past_one_decode_call_keep_their_order_and_maps() -> None:
    """Rows are decoded a chunk (~256 KB) at a time, so the metering service's puts are answered in between."""
    rows = [_row(i, _dimensions(i)) for i in range(6000)]
    records = [b"\n".join(msgspec.json.encode(row) for row in rows[start : start + 10]) for start in range(0, 6000, 10)]
    assert sum(map(len, records)) > 3 * 256 * 1024
    table, problems = decode_rows(records, TARGET)
    assert problems == []
    assert table.column("unique_id").to_pylist() == [f"u{i}" for i in range(6000)]
    decoded = table.column("dimensions").to_pylist()
    assert [None if d is None else sorted(d) for d in decoded] == [
        None if d is None else sorted(d.items()) for d in map(_dimensions, range(6000))
    ]


@pytest.mark.parametrize("row", [b"null", b"[1]", b"7", b'"row"'])
def test_a_row_that_is_no_object_is_a_problem(row: bytes) -> None:
    """Arrow's JSON reader, which decoded rows before, crashed the process (SIGSEGV) on a ``null`` row."""
    table, problems = decode_rows([row, msgspec.json.encode(_EVENT)], ACCESS_LOG_ROWS)
    assert table.num_rows == 1
    assert [position for position, _ in problems] == [0]

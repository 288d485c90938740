"""JSON rows to Arrow: the decoding the delivery stream (and its transform workers) applies to transformed records."""

from __future__ import annotations

import msgspec

from meterlake.local.rows import decode_rows, rows_to_arrow
from meterlake.schema import METER_EVENT_SCHEMA

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

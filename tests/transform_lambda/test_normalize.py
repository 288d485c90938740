"""The transform's pure logic: typing, rejection reasons, and the batch path agreeing with the per-line path."""

from __future__ import annotations

import base64
import json
import random
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pyiceberg.types import IntegerType, LongType, StringType, TimestamptzType

from meterlake.records import ACCESS_LOG_FIELDS, INGESTED_AT, NO_TENANT_PATTERN, render_access_log_line
from meterlake.schema import METERING_EVENT_SCHEMA
from transform_lambda.normalize import (
    MAX_RECORD_BYTES,
    Rejection,
    RejectionKind,
    Unmetered,
    rejection_reason,
    transform_records,
)

INGESTED_AT_US = 1_795_000_000_123_456
UNMETERED = frozenset({"OPTIONS"})


def values(index: int = 0, **overrides: object) -> dict[str, object | None]:
    """The values of a valid access-log line (authenticated GET), with overrides."""
    base: dict[str, object | None] = {
        "request_id": f"6f1c2a9e-0000-4000-8000-{index:012d}",
        "api_id": "k2x9q7w1ab",
        "stage": "prod",
        "tenant_id": ("acme", "globex", "initech")[index % 3],
        "user": "alice",
        "client_id": "3n4b5v6c7x8z9l0k1j2h3g4f5d",
        "ip": "198.51.100.7",
        "user_agent": "curl/8.5.0",
        "request_time": 1_764_000_000_123 + index,
        "http_method": "GET",
        "resource_path": "/random/strings",
        "path": "/random/strings?len=8",
        "status": 200,
        "protocol": "HTTP/1.1",
        "response_length": 42,
        "response_latency_ms": 15,
        "integration_latency_ms": 12,
    }
    base.update(overrides)
    return base


def line(index: int = 0, **overrides: object) -> bytes:
    return render_access_log_line(values(index, **overrides))


def as_dict(line_bytes: bytes) -> dict[str, Any]:
    parsed: dict[str, Any] = json.loads(line_bytes)
    return parsed


def compact(document: dict[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def transform(lines: list[bytes], unmetered: frozenset[str] = UNMETERED) -> list[Any]:
    return transform_records([b64(x) for x in lines], ingested_at=INGESTED_AT_US, unmetered_http_methods=unmetered)


def event_of(outcome: object) -> dict[str, Any]:
    assert isinstance(outcome, str), outcome
    decoded: dict[str, Any] = json.loads(base64.b64decode(outcome))
    return decoded


def without(field: str) -> bytes:
    document = as_dict(line())
    del document[field]
    return compact(document)


def with_member(key: str, value: object) -> bytes:
    document = as_dict(line())
    document[key] = value
    return compact(document)


def with_raw_value(field: str, raw: bytes) -> bytes:
    """A valid line whose field's value is replaced by raw JSON text."""
    original = line()
    start = original.index(f'"{field}":'.encode()) + len(field) + 3
    end = original.index(b'"', start + 1) + 1
    return original[:start] + raw + original[end:]


BAD_LINES: list[tuple[str, bytes, RejectionKind, str]] = [
    ("empty", b"", RejectionKind.NOT_JSON, "not valid JSON: Input data was truncated"),
    ("not json", b"GET /random/strings 200", RejectionKind.NOT_JSON, "not valid JSON: "),
    ("truncated", line()[:-9], RejectionKind.NOT_JSON, "not valid JSON: "),
    ("two objects", line() + b"," + line(1), RejectionKind.NOT_JSON, "not valid JSON: "),
    ("not utf-8", line(user_agent="curl").replace(b"curl", b"cu\xffl"), RejectionKind.NOT_UTF8, "not UTF-8: "),
    ("array", b"[1, 2]", RejectionKind.NOT_OBJECT, "not a JSON object: got an array"),
    ("string", b'"GET /"', RejectionKind.NOT_OBJECT, "not a JSON object: got a string"),
    ("null", b"null", RejectionKind.NOT_OBJECT, "not a JSON object: got null"),
    ("status text", line(status="abc"), RejectionKind.WRONG_TYPE, "status: expected an integer, got 'abc'"),
    ("status float", line(status="2.5"), RejectionKind.WRONG_TYPE, "status: expected an integer, got '2.5'"),
    (
        "status out of range",
        line(status=99),
        RejectionKind.OUT_OF_RANGE,
        "status: 99 is out of range 100..599 (an HTTP status)",
    ),
    ("status 600", line(status=600), RejectionKind.OUT_OF_RANGE, "status: 600 is out of range 100..599"),
    (
        "request id missing",
        line(request_id=None),
        RejectionKind.REQUIRED_MISSING,
        "request_id: required but missing ('-')",
    ),
    (
        "method missing",
        line(http_method=None),
        RejectionKind.REQUIRED_MISSING,
        "http_method: required but missing ('-')",
    ),
    (
        "time missing",
        line(request_time=None),
        RejectionKind.REQUIRED_MISSING,
        "request_time: required but missing ('-')",
    ),
    ("status missing", line(status=None), RejectionKind.REQUIRED_MISSING, "status: required but missing ('-')"),
    (
        "status null",
        with_raw_value("status", b"null"),
        RejectionKind.REQUIRED_MISSING,
        "status: required but missing (null)",
    ),
    ("request id empty", line(request_id=""), RejectionKind.OUT_OF_RANGE, "request_id: must not be empty"),
    ("time zero", line(request_time=0), RejectionKind.OUT_OF_RANGE, "request_time: 0 is out of range"),
    (
        "time in seconds",
        line(request_time=1_764_000_000),
        RejectionKind.OUT_OF_RANGE,
        "request_time: 1764000000 is out",
    ),
    ("time absurd", line(request_time=99_999_999_999_999), RejectionKind.OUT_OF_RANGE, "request_time: 99999999999999"),
    ("time text", line(request_time="yesterday"), RejectionKind.WRONG_TYPE, "request_time: expected an integer"),
    (
        "negative length",
        line(response_length=-5),
        RejectionKind.OUT_OF_RANGE,
        "response_length: -5 is out of range 0..",
    ),
    ("negative latency", line(response_latency_ms=-1), RejectionKind.OUT_OF_RANGE, "response_latency_ms: -1 is out"),
    (
        "latency overflow",
        line(integration_latency_ms=2**31),
        RejectionKind.OUT_OF_RANGE,
        "integration_latency_ms: 2147",
    ),
    ("ua number", with_raw_value("user_agent", b"5"), RejectionKind.WRONG_TYPE, "user_agent: expected a string, got 5"),
    (
        "ua object",
        with_raw_value("user_agent", b'{"a":"-"}'),
        RejectionKind.WRONG_TYPE,
        "user_agent: expected a string",
    ),
    ("field absent", without("stage"), RejectionKind.ABSENT_FIELD, "stage: absent from the line"),
    ("required absent", without("request_id"), RejectionKind.ABSENT_FIELD, "request_id: absent from the line"),
    ("unknown field", with_member("referer", "x"), RejectionKind.UNKNOWN_FIELD, "unknown field 'referer': not in the"),
    ("ingested_at sent", with_member(INGESTED_AT, "1"), RejectionKind.UNKNOWN_FIELD, "unknown field 'ingested_at'"),
    ("too large", line(user_agent="x" * MAX_RECORD_BYTES), RejectionKind.TOO_LARGE, "record exceeds 1000 KiB ("),
]


@pytest.mark.parametrize(("bad", "kind", "reason"), [case[1:] for case in BAD_LINES], ids=[c[0] for c in BAD_LINES])
def test_bad_line_fails_with_its_reason_and_neighbours_stay_ok(bad: bytes, kind: RejectionKind, reason: str) -> None:
    outcomes = transform([line(1), bad, line(2)])
    rejection = outcomes[1]
    assert isinstance(rejection, Rejection)
    assert rejection.kind is kind
    assert rejection.reason.startswith(reason)
    assert rejection_reason(bad) == rejection.reason
    assert [event_of(outcomes[i])["request_id"] for i in (0, 2)] == [values(1)["request_id"], values(2)["request_id"]]


def test_a_line_at_the_size_limit_is_still_decoded() -> None:
    filler = MAX_RECORD_BYTES - len(line(user_agent=""))
    at_limit = line(user_agent="x" * filler)
    assert len(at_limit) == MAX_RECORD_BYTES
    (outcome,) = transform([at_limit])
    assert len(event_of(outcome)["user_agent"]) == filler


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        ("@@@@", "data is not valid base64: '@@@@'"),
        ("QUJD\n", "data is not valid base64: 'QUJD\\n'"),
        ("QUI", "data is not valid base64: 'QUI'"),
        (None, "data is not a base64 string: got NoneType"),
        (b"e30=", "data is not a base64 string: got bytes"),
    ],
)
def test_payload_that_is_not_base64_fails_alone(data: object, reason: str) -> None:
    outcomes = transform_records(
        [b64(line(1)), data, b64(line(2))], ingested_at=INGESTED_AT_US, unmetered_http_methods=UNMETERED
    )
    assert outcomes[1] == Rejection(RejectionKind.NOT_BASE64, reason)
    assert isinstance(outcomes[0], str)
    assert isinstance(outcomes[2], str)


def test_valid_line_becomes_the_typed_event_with_exactly_the_table_columns() -> None:
    (outcome,) = transform([line(7)])
    event = event_of(outcome)
    expected = values(7)
    assert list(event) == [field.name for field in METERING_EVENT_SCHEMA.fields]
    assert event["request_time"] == 1_764_000_000_130 * 1000
    assert event[INGESTED_AT] == INGESTED_AT_US
    for field in ACCESS_LOG_FIELDS:
        if field.name != "request_time":
            assert event[field.name] == expected[field.name], field.name
    python_types = {str(StringType()): str, str(IntegerType()): int, str(LongType()): int, str(TimestamptzType()): int}
    for column in METERING_EVENT_SCHEMA.fields:
        assert type(event[column.name]) is python_types[str(column.field_type)], column.name
    # compact: exactly what a compact dump of the same object gives
    assert base64.b64decode(outcome) == compact(event)


def test_milliseconds_become_exact_microseconds() -> None:
    times = [946_684_800_000, 1_764_000_000_999, 4_102_444_799_999]
    outcomes = transform([line(i, request_time=t) for i, t in enumerate(times)])
    assert [event_of(o)["request_time"] for o in outcomes] == [t * 1000 for t in times]


def test_dash_becomes_null_for_every_optional_field() -> None:
    optional = [f.name for f in ACCESS_LOG_FIELDS if not f.required]
    (outcome,) = transform([render_access_log_line({**values(), **dict.fromkeys(optional)})])
    event = event_of(outcome)
    assert {name: event[name] for name in optional} == dict.fromkeys(optional)
    assert event["request_id"] == values()["request_id"]


def test_tenantless_request_is_kept_with_tenant_null() -> None:
    (outcome,) = transform([line(tenant_id=None, user=None, client_id=None)])
    event = event_of(outcome)
    assert event["tenant_id"] is None
    assert event["user"] is None
    assert event["status"] == 200


def test_json_null_and_spaced_dash_are_missing_too() -> None:
    spaced = json.dumps(as_dict(line(tenant_id=None, response_length=None))).encode()  # ", " and ": " separators
    assert b'"tenant_id": "-"' in spaced
    nulled = compact({**as_dict(line()), "tenant_id": None, "response_length": None})
    for outcome in transform([spaced, nulled]):
        event = event_of(outcome)
        assert event["tenant_id"] is None
        assert event["response_length"] is None


@pytest.mark.parametrize(
    "user_agent",
    ['Mozilla "quoted" agent', 'a\\"b', '":"-"', '-"', "emoji 🚀 and ünïcödé", "tab\tnew\nline", "-x", " - "],
)
def test_user_agent_text_survives_exactly(user_agent: str) -> None:
    (outcome,) = transform([line(user_agent=user_agent)])
    assert event_of(outcome)["user_agent"] == user_agent


def test_unmetered_methods_are_dropped_and_only_those() -> None:
    lines = [line(0, http_method="OPTIONS"), line(1, http_method="GET"), line(2, http_method="options")]
    assert transform(lines)[0] is Unmetered.DROPPED
    assert isinstance(transform(lines)[1], str)
    assert isinstance(transform(lines)[2], str)  # methods are case-sensitive, as in HTTP
    assert all(isinstance(o, str) for o in transform(lines, unmetered=frozenset()))
    assert rejection_reason(lines[0]) is None


def test_invalid_options_request_is_rejected_not_dropped() -> None:
    bad = line(http_method="OPTIONS", status="abc")
    (outcome,) = transform([bad])
    assert outcome == Rejection(RejectionKind.WRONG_TYPE, "status: expected an integer, got 'abc'")


def test_numbers_may_also_arrive_as_json_numbers() -> None:
    document = {**as_dict(line()), "status": 201, "response_length": 7}
    (outcome,) = transform([compact(document)])
    assert event_of(outcome)["status"] == 201
    assert event_of(outcome)["response_length"] == 7


def test_empty_batch() -> None:
    assert transform([]) == []


# Lines that are not one JSON value each. Joined with commas, the first three parse as three valid events (a string
# left open in one record is closed by the next, and two values in one record keep the count), so a naive
# "[" + ",".join(lines) + "]" decode would hand one record's fields to another's recordId.
MERGING_LINES = [
    line(10).replace(b'"user_agent":"curl/8.5.0",', b"")[:-1] + b',"user_agent":"x',
    b'y"}',
    line(11) + b"," + line(12),
]
SHIFTING_LINES = [
    *MERGING_LINES,
    line(1),
    line(2) + b"," + line(3),  # two values in one record
    line(4)[:-1] + b',"x":[',  # an object left open...
    line(5),  # ...swallowing this valid neighbour...
    b"]}",  # ...and closed here
    line(6).replace(b'"user_agent":"curl/8.5.0"', b'"user_agent":"":"-"x"'),  # an unescaped quote...
    line(7).replace(b'"user_agent":"curl/8.5.0"', b'"user_agent":"\\":"-"}"'),  # ...or one too many: invalid
    b'{"request_id":"forged"',
    b'"api_id":"-"}',
    line(8),
]


@pytest.mark.parametrize(
    ("batch", "ok"),
    [([line(20), *MERGING_LINES, line(21)], {0, 4}), (SHIFTING_LINES, {3, 6, 12})],
    ids=["merging", "shifting"],
)
def test_lines_that_are_not_one_value_each_cannot_shift_their_neighbours(batch: list[bytes], ok: set[int]) -> None:
    outcomes = transform(batch)
    assert outcomes == [transform([x])[0] for x in batch]
    assert {i for i, o in enumerate(outcomes) if isinstance(o, str)} == ok
    for index, outcome in enumerate(outcomes):
        if index in ok:
            assert event_of(outcome)["request_id"] == as_dict(batch[index])["request_id"]
        else:
            assert isinstance(outcome, Rejection)
            assert rejection_reason(batch[index]) == outcome.reason


def realistic_batch(size: int, seed: int) -> tuple[list[bytes], dict[int, str]]:
    """Valid lines of several tenants with every ~500th line broken; returns the lines and the broken indexes."""
    rnd = random.Random(seed)
    bad_lines = [case[1] for case in BAD_LINES if case[0] != "too large"]
    lines: list[bytes] = []
    broken: dict[int, str] = {}
    for index in range(size):
        if rnd.random() < 0.002:
            lines.append(rnd.choice(bad_lines))
            broken[index] = "broken"
            continue
        tenant = rnd.choice(["acme", "globex", "initech", None])
        lines.append(
            line(
                index,
                tenant_id=tenant,
                user=None if tenant is None else "bob",
                status=rnd.choice([200, 200, 201, 404, 429, 500]),
                http_method=rnd.choice(["GET", "POST", "OPTIONS"]),
                user_agent=rnd.choice(["curl/8.5.0", 'agent "x"', "-"]),
                integration_latency_ms=rnd.choice([None, 5]),
            )
        )
    return lines, broken


def test_mixed_batch_falls_back_and_matches_line_by_line_processing() -> None:
    lines, broken = realistic_batch(15_000, seed=3)
    assert len(broken) >= 10
    outcomes = transform(lines)
    assert len(outcomes) == len(lines)
    for index, (candidate, outcome) in enumerate(zip(lines, outcomes, strict=True)):
        assert outcome == transform([candidate])[0], index
        if index in broken:
            assert isinstance(outcome, Rejection)
            assert outcome.reason == rejection_reason(candidate)
        elif as_dict(candidate)["http_method"] == "OPTIONS":
            assert outcome is Unmetered.DROPPED
        else:
            event = event_of(outcome)
            source = as_dict(candidate)
            assert event["request_id"] == source["request_id"]
            assert event["request_time"] == int(source["request_time"]) * 1000
            assert event["tenant_id"] == (None if source["tenant_id"] == "-" else source["tenant_id"])


@given(tenant=st.text(alphabet=[" ", "\t", "\n", "\f", "\r", "\v", "\u00a0", "-", "a", "\\", '"'], max_size=6))
def test_a_blank_or_dash_tenant_is_stored_as_no_tenant_exactly_as_the_meters_read_it(tenant: str) -> None:
    """The transform nulls what records.NO_TENANT_PATTERN calls no tenant (RE2, as the meters and DuckDB match it),
    and nothing else, so every reader's "has a tenant" is simply IS NOT NULL."""
    (outcome,) = transform([line(0, tenant_id=tenant)])
    stored = event_of(outcome)["tenant_id"]
    no_tenant = pc.match_substring_regex(pa.array([tenant]), NO_TENANT_PATTERN)[0].as_py()
    assert stored == (None if no_tenant else tenant)

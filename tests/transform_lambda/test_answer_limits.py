"""The transform's answer fits Lambda's response limit at every processor buffer the config allows.

Firehose fills the processor buffer with raw records (BufferSizeInMBs counts them before base64). The answer holds
every typed event in base64 plus Iceberg routing metadata per record, so for the shortest lines API Gateway writes it
is over twice the raw lines: a buffer the answer does not fit fails every invocation, then every retry, and the
requests land in the error prefix, never metered.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meterlake.config import (
    LAMBDA_PAYLOAD_LIMIT_BYTES,
    LAMBDA_REQUEST_LIMIT_BYTES,
    TRANSFORM_BUFFER_CAP_MB,
    LambdaProcessing,
)
from meterlake.local.invoker import oversized_payload
from meterlake.records import render_access_log_line
from transform_lambda.handler import TransformSettings, make_handler

MIB = 1024 * 1024
#: The deployed table's names (the config's defaults, as the AWS sample names them): longer names, larger metadata.
SETTINGS = TransformSettings(
    database="restapi_access_log_iceberg_db",
    table="restapi_access_log_iceberg",
    operation="update",
    unmetered_http_methods=frozenset({"OPTIONS"}),
)
#: Firehose record ids seen in the wild are 56-62 digits; 64 errs long.
RECORD_ID_DIGITS = 64


def _line(n: int, **values: object) -> bytes:
    """An access-log line with the shortest values API Gateway writes: a 36-character request id, a 10-character
    API id, a one-letter stage, the shortest IPv4 address, '/' and '-' wherever a value may be absent."""
    base: dict[str, object | None] = {
        "request_id": f"6f1c2a9e-0000-4000-8000-{n:012d}",
        "api_id": "k2x9q7w1ab",
        "stage": "p",
        "ip": "1.1.1.1",
        "request_time": 1_764_000_000_000 + n,
        "http_method": "GET",
        "path": "/",
        "status": 403,
        "protocol": "HTTP/1.1",
        "response_length": 42,
        "response_latency_ms": 0,
    }
    base.update(values)
    return render_access_log_line(base)


#: The lines whose answer is largest relative to their own size: a missing route (no authorizer, every claim '-'),
#: a 401, an authenticated call with the shortest tenant and user, and an unmetered OPTIONS (answered with its data).
WORST_LINES: dict[str, Callable[[int], bytes]] = {
    "missing route": lambda n: _line(n),
    "unauthorized": lambda n: _line(n, status=401, resource_path="/r"),
    "authenticated": lambda n: _line(
        n, status=200, resource_path="/r", tenant_id="a", user="b", client_id="c" * 26, integration_latency_ms=1
    ),
    "unmetered": lambda n: _line(n, http_method="OPTIONS", status=204, resource_path="/r"),
}


def _full_buffer(make: Callable[[int], bytes], buffer_mb: float) -> list[bytes]:
    """As many lines as fill ``buffer_mb`` MB of raw records, as Firehose fills its processor buffer."""
    lines: list[bytes] = []
    size = 0
    while True:
        line = make(len(lines))
        if size + len(line) > buffer_mb * MIB:
            return lines
        lines.append(line)
        size += len(line)


def _firehose_event(lines: list[bytes]) -> dict[str, Any]:
    return {
        "invocationId": "6c1b2d3e-4f50-6172-8394-a5b6c7d8e9f0",
        "deliveryStreamArn": "arn:aws:firehose:us-east-1:123456789012:deliverystream/amazon-apigateway-random-gen",
        "region": "us-east-1",
        "records": [
            {
                "recordId": str(10**RECORD_ID_DIGITS - 1 - n),
                "approximateArrivalTimestamp": 1_764_000_000_000 + n,
                "data": base64.b64encode(line).decode(),
            }
            for n, line in enumerate(lines)
        ],
    }


def _as_lambda_sends(document: object) -> int:
    """Bytes of a handler's answer as Lambda's Python runtime marshals it (simplejson, default separators): what the
    local stream counts, and an upper bound of what the AWS entry point sends (encode_answer, tested as such)."""
    return len(json.dumps(document, ensure_ascii=False).encode())


def _mixed(n: int) -> bytes:
    makers = list(WORST_LINES.values())
    return makers[n % len(makers)](n)


@pytest.mark.parametrize("kind", [*WORST_LINES, "mixed"])
def test_the_answer_fits_at_the_largest_buffer_the_config_accepts(kind: str) -> None:
    largest = LambdaProcessing(buffer_size=3)  # Firehose's maximum, the AWS sample's value
    make = _mixed if kind == "mixed" else WORST_LINES[kind]
    event = _firehose_event(_full_buffer(make, largest.effective_buffer_size))
    answer = make_handler(SETTINGS, emit_metrics=False)(event, None)
    assert len(answer["records"]) == len(event["records"])
    assert len(json.dumps(event, separators=(",", ":"))) < LAMBDA_REQUEST_LIMIT_BYTES
    size = _as_lambda_sends(answer)
    assert size < LAMBDA_PAYLOAD_LIMIT_BYTES, f"{kind}: {size:,} bytes at {largest.effective_buffer_size} MB"


def test_an_uncapped_3_mb_buffer_of_short_lines_would_answer_over_the_limit() -> None:
    """Why the cap exists: Firehose's own maximum buffer of the shortest lines answers ~7 MB."""
    event = _firehose_event(_full_buffer(WORST_LINES["missing route"], 3))
    answer = make_handler(SETTINGS, emit_metrics=False)(event, None)
    assert _as_lambda_sends(answer) > LAMBDA_PAYLOAD_LIMIT_BYTES
    assert LambdaProcessing(buffer_size=3).effective_buffer_size == TRANSFORM_BUFFER_CAP_MB < 3


def test_a_capped_buffer_is_said_and_an_uncapped_one_is_not() -> None:
    capped = LambdaProcessing(buffer_size=3)
    assert capped.buffer_size_note is not None
    assert "capped to 2.5 MB" in capped.buffer_size_note
    assert LambdaProcessing(buffer_size=1).buffer_size_note is None
    assert LambdaProcessing(buffer_size=1).effective_buffer_size == 1


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=25,
)


@given(document=json_values, limit=st.integers(min_value=0, max_value=400))
def test_oversized_payload_counts_exactly_as_the_runtime_marshals(document: object, limit: int) -> None:
    size = _as_lambda_sends(document)
    assert oversized_payload(document, limit) == (size if size > limit else None)

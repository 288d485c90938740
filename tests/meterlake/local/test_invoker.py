"""The invoker reads a handler's answer the same whether the handler answers a document (JSON-encoded by Lambda's
runtime) or JSON bytes (sent unchanged, as the deployed transform does): same rows, same rejects, same reasons."""

from __future__ import annotations

import base64
import copy
from collections.abc import Callable
from typing import Any

import msgspec
import pytest

from meterlake.config import LAMBDA_PAYLOAD_LIMIT_BYTES
from meterlake.local.invoker import Invocation, Invoker, Transformed
from meterlake.local.stream import access_log_handler
from tests.meterlake.local.test_stream import default_handler, gateway_line, make_config

DESTINATION = ("metering", "events")
Answer = dict[str, Any]


def _invocation(attempts: int = 1) -> Invocation:
    return Invocation(
        arn="arn:aws:firehose:local:000000000000:deliverystream/test",
        attempts=attempts,
        event_raw_bytes=1024 * 1024,
        default_destination=DESTINATION,
        request_limit=LAMBDA_PAYLOAD_LIMIT_BYTES,
        response_limit=LAMBDA_PAYLOAD_LIMIT_BYTES,
    )


def _echo(edit: Callable[[Answer], None]) -> Callable[[dict[str, Any], Any], Answer]:
    """A handler answering every record Ok with its own data and routing metadata, then ``edit`` applied."""

    def handler(event: dict[str, Any], context: Any) -> Answer:
        answer: Answer = {
            "records": [
                {
                    "recordId": record["recordId"],
                    "result": "Ok",
                    "data": record["data"],
                    "metadata": {"otfMetadata": {"destinationDatabaseName": "metering", "operation": "insert"}},
                }
                for record in event["records"]
            ]
        }
        edit(answer)
        return answer

    return handler


def _records(answer: Answer) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = answer["records"]
    return records


def _set(index: int, **members: object) -> Callable[[Answer], None]:
    return lambda answer: _records(answer)[index].update(members)


def _delete(index: int, member: str) -> Callable[[Answer], None]:
    return lambda answer: _records(answer)[index].pop(member)


def _both(*edits: Callable[[Answer], None]) -> Callable[[Answer], None]:
    def edit(answer: Answer) -> None:
        for one in edits:
            one(answer)

    return edit


def _replace_record(index: int, value: object) -> Callable[[Answer], None]:
    def edit(answer: Answer) -> None:
        answer["records"][index] = value

    return edit


EDITS: dict[str, Callable[[Answer], None]] = {
    "as is": lambda answer: None,
    "reordered": lambda answer: _records(answer).reverse(),
    "one dropped, one failed": _both(_set(1, result="Dropped"), _set(2, result="ProcessingFailed")),
    "a record answered twice": lambda answer: _records(answer).append(copy.deepcopy(_records(answer)[0])),
    "a record unanswered": lambda answer: _records(answer).__delitem__(-1),
    "an unknown recordId": _set(0, recordId="nope"),
    "an unknown result": _set(1, result="Maybe"),
    "Ok without data": _delete(2, "data"),
    "Ok with numeric data": _set(2, data=5),
    "Ok with data that is not base64": _set(2, data="not base64!"),
    "dropped with data that is not base64": _set(2, result="Dropped", data="not base64!"),
    "a dropped record without data": _both(_set(1, result="Dropped"), _delete(1, "data")),
    "no records list": lambda answer: answer.update(records={}),
    "a record that is no object": _replace_record(0, "Ok"),
    "another table for one record": _set(0, metadata={"otfMetadata": {"destinationTableName": "other"}}),
    "an unsupported operation": _set(3, metadata={"otfMetadata": {"operation": "delete"}}),
    "metadata null": _set(0, metadata=None),
}


@pytest.mark.parametrize("edit", EDITS.values(), ids=EDITS.keys())
def test_a_bytes_answer_reads_as_the_same_answer_as_a_document(edit: Callable[[Answer], None]) -> None:
    lines = [gateway_line(n) for n in range(6)]
    as_document = _echo(edit)

    def as_bytes(event: dict[str, Any], context: Any) -> bytes:
        return msgspec.json.encode(as_document(event, context))

    outcomes: list[Transformed] = [
        Invoker(handler, _invocation()).transform(list(range(6)), [0] * 6, lines) for handler in (as_document, as_bytes)
    ]
    assert outcomes[1] == outcomes[0]


def test_a_bytes_answer_that_is_not_json_fails_the_invocation_with_the_reason() -> None:
    def garbled(event: dict[str, Any], context: Any) -> bytes:
        return b'{"records": ['

    outcome = Invoker(garbled, _invocation(attempts=2)).transform([0, 1], [0, 0], [gateway_line(0), gateway_line(1)])
    assert outcome.invocations == 2
    assert [(i, code) for i, code, *_ in outcome.rejected] == [
        (0, "Lambda.InvalidResponse"),
        (1, "Lambda.InvalidResponse"),
    ]
    assert outcome.rejected[0][2].startswith("the answer is not JSON (")


_OK = b'{"recordId":"0","result":"Ok","data":"' + base64.b64encode(b"{}") + b'"'
MALFORMED = {
    "a number too large in the metadata": b'{"records":[' + _OK + b',"metadata":{"n":1e400}}]}',
    "metadata that is not UTF-8": b'{"records":[' + _OK + b',"metadata":"\xff"}]}',
    "a result that is not UTF-8": b'{"records":[{"recordId":"0","result":"O\xff"}]}',
    "nesting deeper than the decoder goes": b"[" * 5000 + b"]" * 5000,
    "nesting in the metadata": b'{"records":[' + _OK + b',"metadata":' + b"[" * 5000 + b"]" * 5000 + b"}]}",
}


@pytest.mark.parametrize("answer", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_bytes_answer_fails_the_invocation_and_raises_nothing(answer: bytes) -> None:
    outcome = Invoker(lambda event, context: answer, _invocation()).transform([0], [0], [gateway_line(0)])
    assert [code for _, code, *_ in outcome.rejected] == ["Lambda.InvalidResponse"]


@pytest.mark.parametrize(("over", "taken"), [(0, True), (1, False)])
def test_a_bytes_answer_is_measured_byte_for_byte_against_lambdas_limit(over: int, taken: bool) -> None:
    """Bytes go back unchanged: their length is the response's size, exactly."""
    real = _echo(lambda answer: None)

    def padded(event: dict[str, Any], context: Any) -> bytes:
        answer = real(event, context)
        answer["records"][0]["result"] = "Dropped"
        size = len(msgspec.json.encode(answer))
        answer["records"][0]["data"] += "A" * (LAMBDA_PAYLOAD_LIMIT_BYTES + over - size)  # a dropped record's data
        encoded = msgspec.json.encode(answer)
        assert len(encoded) == LAMBDA_PAYLOAD_LIMIT_BYTES + over
        return encoded

    outcome = Invoker(padded, _invocation()).transform([0, 1], [0, 0], [gateway_line(0), gateway_line(1)])
    if taken:
        assert (outcome.dropped, outcome.rejected, len(outcome.rows[DESTINATION][0])) == (1, [], 1)
    else:
        assert [code for _, code, *_ in outcome.rejected] == ["Lambda.FunctionError"] * 2
        assert "Function.ResponseSizeTooLarge" in outcome.rejected[0][2]


def test_the_access_log_stream_runs_the_transform_as_deployed_answering_json_bytes() -> None:
    """The stream's handler answers what the AWS entry point returns (bytes), with the document handler's records."""
    config = make_config()
    lines = [gateway_line(n, method="OPTIONS" if n == 0 else "GET") for n in range(4)]
    event = {
        "invocationId": "00000000-0000-4000-8000-000000000000",
        "deliveryStreamArn": "arn:aws:firehose:local:000000000000:deliverystream/test",
        "region": "local",
        "records": [
            {"recordId": str(n), "approximateArrivalTimestamp": 0, "data": base64.b64encode(line).decode()}
            for n, line in enumerate(lines)
        ],
    }
    answer = access_log_handler(config)(event, None)
    assert isinstance(answer, bytes)
    document = default_handler(config)(event, None)
    decoded = msgspec.json.decode(answer)
    assert [(r["recordId"], r["result"]) for r in decoded["records"]] == [
        (r["recordId"], r["result"]) for r in document["records"]
    ]
    assert decoded["records"][1]["metadata"] == document["records"][1]["metadata"]

"""The Lambda handler: Powertools event in, one answer per record out, settings, logs, metrics, bundling."""

from __future__ import annotations

import ast
import base64
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
from aws_lambda_powertools.utilities.data_classes import KinesisFirehoseDataTransformationRecord
from aws_lambda_powertools.utilities.typing import LambdaContext
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meterlake.records import ACCESS_LOG_FIELDS, FieldType, render_access_log_line
from meterlake.schema import METERING_EVENT_SCHEMA
from tests.transform_lambda.test_normalize import BAD_LINES, line, values
from transform_lambda import handler as handler_module
from transform_lambda.handler import (
    IcebergRoutingMetadata,
    InvalidSettingError,
    MissingSettingError,
    TransformSettings,
    encode_answer,
    lambda_handler,
    make_handler,
)
from transform_lambda.normalize import rejection_reason, transform_records

SETTINGS = TransformSettings(database="metering", table="metering_events")
REPO = Path(__file__).resolve().parents[2]


def firehose_event(payloads: list[bytes]) -> dict[str, Any]:
    return {
        "invocationId": "0f1e2d3c-invocation",
        "deliveryStreamArn": "arn:aws:firehose:us-east-1:123456789012:deliverystream/amazon-apigateway-metering",
        "region": "us-east-1",
        "records": [
            {
                "recordId": f"4954698668313554428650745793632167567570019247115678{i:04d}",
                "approximateArrivalTimestamp": 1_764_000_000_000 + i,
                "data": base64.b64encode(payload).decode(),
            }
            for i, payload in enumerate(payloads)
        ],
    }


def test_answers_every_record_in_order_with_routing_for_ok_records() -> None:
    payloads = [line(0), line(1, http_method="OPTIONS"), b"not json", line(3, tenant_id=None)]
    event = firehose_event(payloads)
    answer = make_handler(SETTINGS, emit_metrics=False)(event, None)
    records = answer["records"]
    assert [r["recordId"] for r in records] == [r["recordId"] for r in event["records"]]
    assert [r["result"] for r in records] == ["Ok", "Dropped", "ProcessingFailed", "Ok"]
    routing = {"destinationDatabaseName": "metering", "destinationTableName": "metering_events", "operation": "insert"}
    assert records[0]["metadata"] == {"otfMetadata": routing}
    assert "metadata" not in records[1]
    assert "metadata" not in records[2]
    for index in (1, 2):  # not Ok: the original data goes back
        assert records[index]["data"] == event["records"][index]["data"]
    tenantless = json.loads(base64.b64decode(records[3]["data"]))
    assert tenantless["tenant_id"] is None
    assert tenantless["request_id"] == values(3)["request_id"]


def test_ok_record_renders_as_powertools_record_would() -> None:
    event = firehose_event([line(0)])
    (ok,) = make_handler(SETTINGS, emit_metrics=False)(event, None)["records"]
    routing = IcebergRoutingMetadata(destination_database_name="metering", destination_table_name="metering_events")
    powertools = KinesisFirehoseDataTransformationRecord(record_id=ok["recordId"], data=ok["data"], metadata=routing)
    assert ok == powertools.asdict()


def test_dropped_and_failed_records_render_as_powertools_records_would() -> None:
    event = firehose_event([line(0, http_method="OPTIONS"), b"not json"])
    dropped, failed = make_handler(SETTINGS, emit_metrics=False)(event, None)["records"]
    first, second = event["records"]
    expected = [
        KinesisFirehoseDataTransformationRecord(record_id=first["recordId"], result="Dropped", data=first["data"]),
        KinesisFirehoseDataTransformationRecord(
            record_id=second["recordId"], result="ProcessingFailed", data=second["data"]
        ),
    ]
    assert [dropped, failed] == [record.asdict() for record in expected]


def test_the_encoded_answer_is_the_answers_json_and_no_larger_than_the_runtimes() -> None:
    """Lambda's Python runtime sends a handler's bytes unchanged (the AWS entry point returns encode_answer's): they
    must be the answer's JSON, and no larger than the runtime's own encoding of it (simplejson, default separators,
    non-ASCII as UTF-8), which the answer-size limits were set by."""
    event = firehose_event([line(0, user_agent='curl/8 \u00e9\u2603 "q"'), line(1, http_method="OPTIONS"), b"{"])
    answer = make_handler(SETTINGS, emit_metrics=False)(event, None)
    sent = encode_answer(answer)
    assert isinstance(sent, bytes)
    assert json.loads(sent) == answer
    assert len(sent) <= len(json.dumps(answer, ensure_ascii=False).encode())


@pytest.mark.parametrize(
    "settings_",
    [SETTINGS, TransformSettings(database="metering", table="metering_events", operation="update")],
)
def test_the_encoded_handler_sends_exactly_the_bytes_of_the_answers_encoding(
    settings_: TransformSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The AWS entry point's handler renders its answer from structs and raw documents (faster), which must give the
    very bytes encode_answer gives for make_handler's answer: every kind of record, in order, non-ASCII and quotes."""
    monkeypatch.setattr(time, "time_ns", lambda: 1_764_000_000_123_456_789)  # one ingested_at for both answers
    payloads = [
        line(0, user_agent='curl/8 \u00e9\u2603 "q"'),
        line(1, http_method="OPTIONS"),
        b"{",
        line(3, tenant_id=None),
        b"\xff\xfe",
        line(5),
    ]
    event = firehose_event(payloads)
    answer = make_handler(settings_, emit_metrics=False)(event, None)
    sent = handler_module.make_encoded_handler(settings_, emit_metrics=False)(event, None)
    assert sent == encode_answer(answer)
    # Without any rejection (the outcomes list is the documents' own) and with API-key tenants.
    keyed = TransformSettings(database="metering", table="metering_events", tenants_by_api_key={"key-1": "acme"})
    clean = firehose_event([line(0, tenant_id="key-1"), line(1, http_method="OPTIONS"), line(2, tenant_id="key-2")])
    assert handler_module.make_encoded_handler(keyed, emit_metrics=False)(clean, None) == encode_answer(
        make_handler(keyed, emit_metrics=False)(clean, None)
    )
    assert [record["result"] for record in json.loads(sent)["records"]] == [
        "Ok",
        "Dropped",
        "ProcessingFailed",
        "Ok",
        "ProcessingFailed",
        "Ok",
    ]


def test_a_response_of_documents_renders_as_one_of_base64_text() -> None:
    """A response holding Ok documents as bytes (transform_documents) renders, as a dict too, the Ok records a
    response of their base64 text does, and its bytes are that dict's encoding."""
    batch = [{"recordId": "a", "data": "eA=="}, {"recordId": "b", "data": "eQ=="}]
    routing = IcebergRoutingMetadata(destination_database_name="metering", destination_table_name="metering_events")
    documents = handler_module.MeteringTransformationResponse(
        batch=batch, outcomes=[b"{}", b'{"k":1}'], routing=routing
    )
    texts = handler_module.MeteringTransformationResponse(
        batch=batch, outcomes=[base64.b64encode(b"{}").decode(), base64.b64encode(b'{"k":1}').decode()], routing=routing
    )
    assert documents.asdict() == texts.asdict()
    assert [record["result"] for record in documents.asdict()["records"]] == ["Ok", "Ok"]
    assert documents.encode() == texts.encode() == encode_answer(texts.asdict())


def test_operation_setting_reaches_the_metadata() -> None:
    update = TransformSettings(database="db", table="events", operation="update")
    (ok,) = make_handler(update, emit_metrics=False)(firehose_event([line(0)]), None)["records"]
    assert ok["metadata"]["otfMetadata"]["operation"] == "update"


def test_routing_metadata_keeps_partition_keys_when_given() -> None:
    routing = IcebergRoutingMetadata(
        partition_keys={"day": "2026-11-25"}, destination_database_name="db", destination_table_name="t"
    )
    assert routing.asdict() == {
        "otfMetadata": {"destinationDatabaseName": "db", "destinationTableName": "t", "operation": "insert"},
        "partitionKeys": {"day": "2026-11-25"},
    }


def test_empty_batch_answers_no_records() -> None:
    assert make_handler(SETTINGS, emit_metrics=False)(firehose_event([]), None) == {"records": []}


def test_rejections_are_logged_as_warnings_ok_records_are_not(caplog: pytest.LogCaptureFixture) -> None:
    bad = line(1, status="abc")
    event = firehose_event([line(0), bad, line(2)])
    with caplog.at_level(logging.DEBUG, logger="transform"):
        make_handler(SETTINGS, emit_metrics=False)(event, None)
    (logged,) = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert logged.levelno == logging.WARNING
    assert logged.__dict__["record_id"] == event["records"][1]["recordId"]
    assert logged.__dict__["reason"] == "status: expected an integer, got 'abc'" == rejection_reason(bad)


def test_local_handler_prints_no_metrics_even_after_many_invocations(capsys: pytest.CaptureFixture[str]) -> None:
    # Powertools prints an EMF blob once a metric holds 100 values, even with POWERTOOLS_METRICS_DISABLED set.
    handler = make_handler(SETTINGS, emit_metrics=False)
    event = firehose_event([line(0), line(1, http_method="OPTIONS")])
    for _ in range(120):
        handler(event, None)
    assert capsys.readouterr().out == ""


def test_aws_handler_emits_counts_per_invocation(capsys: pytest.CaptureFixture[str]) -> None:
    handler = make_handler(SETTINGS, emit_metrics=True)
    handler(firehose_event([line(0), line(1, http_method="OPTIONS"), b"[1]", b"{", b"{"]), None)
    (blob,) = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith('{"_aws"')]
    assert blob["_aws"]["CloudWatchMetrics"][0]["Namespace"] == "meterlake"
    assert blob["service"] == "transform"
    assert blob["RecordsOk"] == [1.0]
    assert blob["RecordsDropped"] == [1.0]
    assert blob["RecordsFailed"] == [3.0]
    assert blob["RecordsFailedNotObject"] == [1.0]
    assert blob["RecordsFailedNotJson"] == [2.0]


def test_settings_from_environment() -> None:
    environ = {
        "METERING_DATABASE": "metering",
        "METERING_TABLE": "metering_events",
        "OTF_OPERATION": "update",
        "UNMETERED_HTTP_METHODS": "options, head,",
    }
    assert TransformSettings.from_env(environ) == TransformSettings(
        database="metering",
        table="metering_events",
        operation="update",
        unmetered_http_methods=frozenset({"OPTIONS", "HEAD"}),
    )
    defaults = TransformSettings.from_env({"METERING_DATABASE": "d", "METERING_TABLE": "t"})
    assert defaults.operation == "insert"
    assert defaults.unmetered_http_methods == frozenset({"OPTIONS"})
    everything_metered = TransformSettings.from_env(
        {"METERING_DATABASE": "d", "METERING_TABLE": "t", "UNMETERED_HTTP_METHODS": ""}
    )
    assert everything_metered.unmetered_http_methods == frozenset()


@pytest.mark.parametrize("missing", ["METERING_DATABASE", "METERING_TABLE"])
def test_missing_required_setting_names_the_variable(missing: str) -> None:
    environ = {"METERING_DATABASE": "d", "METERING_TABLE": "t", missing: " "}
    with pytest.raises(MissingSettingError, match=missing) as raised:
        TransformSettings.from_env(environ)
    assert raised.value.variable == missing


@pytest.mark.parametrize(
    ("kwargs", "setting"),
    [
        ({"operation": "delete"}, "operation"),
        ({"operation": "INSERT"}, "operation"),
        ({"unmetered_http_methods": frozenset({"options"})}, "unmetered_http_methods"),
        ({"database": ""}, "database"),
    ],
)
def test_invalid_setting_is_refused_with_its_value(kwargs: dict[str, Any], setting: str) -> None:
    arguments: dict[str, Any] = {"database": "d", "table": "t", **kwargs}
    with pytest.raises(InvalidSettingError) as raised:
        TransformSettings(**arguments)
    assert raised.value.setting == setting
    assert raised.value.value in (*kwargs.values(), "options")


@dataclass
class FakeLambdaContext:
    function_name: str = "meterlake-transform"
    memory_limit_in_mb: int = 512
    invoked_function_arn: str = "arn:aws:lambda:us-east-1:123456789012:function:meterlake-transform"
    aws_request_id: str = "f7e6d5c4-request"


CONTEXT = cast(LambdaContext, FakeLambdaContext())


def test_lambda_handler_reads_settings_from_environment_once(monkeypatch: pytest.MonkeyPatch) -> None:
    handler_module._aws_handler.cache_clear()
    monkeypatch.delenv("METERING_DATABASE", raising=False)
    monkeypatch.setenv("METERING_TABLE", "events")
    with pytest.raises(MissingSettingError):
        lambda_handler(firehose_event([line(0)]), CONTEXT)
    monkeypatch.setenv("METERING_DATABASE", "metering")
    monkeypatch.setenv("POWERTOOLS_METRICS_DISABLED", "true")
    (ok,) = json.loads(lambda_handler(firehose_event([line(0)]), CONTEXT))["records"]
    assert ok["metadata"]["otfMetadata"]["destinationTableName"] == "events"
    monkeypatch.setenv("METERING_TABLE", "changed")
    (again,) = json.loads(lambda_handler(firehose_event([line(0)]), CONTEXT))["records"]
    assert again["metadata"]["otfMetadata"]["destinationTableName"] == "events"
    handler_module._aws_handler.cache_clear()


ALLOWED_IMPORTS = {"msgspec", "aws_lambda_powertools", "meterlake.records", "transform_lambda"}


def test_transform_lambda_imports_only_what_its_bundle_holds() -> None:
    for source in sorted((REPO / "transform_lambda").glob("*.py")):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                allowed = top in sys.stdlib_module_names or top in {
                    "msgspec",
                    "aws_lambda_powertools",
                    "transform_lambda",
                }
                assert allowed or name in ALLOWED_IMPORTS, f"{source.name} imports {name}"
    probe = (
        "import json, sys, transform_lambda.handler, transform_lambda.normalize; print(json.dumps(sorted(sys.modules)))"
    )
    environment = {k: v for k, v in os.environ.items() if not k.startswith("METERING_")}
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, env=environment, capture_output=True, text=True, check=True
    )
    modules = set(json.loads(result.stdout))
    assert not {m for m in modules if m.split(".")[0] in {"pyiceberg", "pyarrow", "duckdb"}}
    assert {m for m in modules if m.split(".")[0] == "meterlake"} == {"meterlake", "meterlake.records"}


# --- property: whatever the batch, the handler answers each record once, in order, with schema-valid Ok rows ---

_ints = st.one_of(st.integers(min_value=-(2**64), max_value=2**64), st.sampled_from([0, 100, 599, 2**31, 2**63]))
_text = st.text(max_size=12)
_scalar = st.one_of(st.none(), st.booleans(), _ints, _text, st.just("-"))
_json = st.recursive(_scalar, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3))


def _field_value(field_type: FieldType) -> st.SearchStrategy[object]:
    if field_type is FieldType.STRING:
        return st.one_of(st.none(), _text, st.sampled_from(['"', "\\", '":"-"', "-", ""]))
    if field_type is FieldType.EPOCH_MILLIS:
        return st.one_of(st.none(), st.integers(min_value=946_684_800_000, max_value=4_102_444_799_999), _ints)
    return st.one_of(st.none(), st.integers(min_value=0, max_value=2**31 - 1), _ints, st.just("abc"))


_valid_lines = st.fixed_dictionaries({f.name: _field_value(f.type) for f in ACCESS_LOG_FIELDS}).map(
    render_access_log_line
)


@st.composite
def _mutated_lines(draw: st.DrawFn) -> bytes:
    original = draw(_valid_lines)
    document = json.loads(original)
    action = draw(st.sampled_from(["drop", "add", "retype", "truncate", "splice", "byte"]))
    if action == "drop":
        document.pop(draw(st.sampled_from(sorted(document))))
    elif action == "add":
        document[draw(_text)] = draw(_json)
    elif action == "retype":
        document[draw(st.sampled_from(sorted(document)))] = draw(_json)
    else:
        position = draw(st.integers(min_value=0, max_value=len(original)))
        if action == "truncate":
            return original[:position]
        if action == "splice":
            return original[:position] + draw(st.sampled_from([b",", b"}", b"{", b'"', b'":"-"', b"],["]))
        return original[:position] + draw(st.binary(min_size=1, max_size=2)) + original[position:]
    return json.dumps(document, separators=(",", ":")).encode()


_payloads = st.one_of(
    _valid_lines,
    _mutated_lines(),
    st.binary(max_size=40),
    _json.map(lambda value: json.dumps(value).encode()),
    st.just(line(0)),
)


def _assert_matches_schema(row: dict[str, Any]) -> None:
    assert list(row) == [f.name for f in METERING_EVENT_SCHEMA.fields]
    bounds = {"int": (-(2**31), 2**31 - 1), "long": (-(2**63), 2**63 - 1), "timestamptz": (0, 2**63 - 1)}
    for column in METERING_EVENT_SCHEMA.fields:
        value = row[column.name]
        if value is None:
            assert not column.required, column.name
        elif str(column.field_type) == "string":
            assert isinstance(value, str), column.name
        else:
            low, high = bounds[str(column.field_type)]
            assert type(value) is int, column.name
            assert low <= value <= high, column.name


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payloads=st.lists(_payloads, max_size=25))
def test_any_batch_gets_one_answer_per_record_and_schema_valid_rows(payloads: list[bytes]) -> None:
    event = firehose_event(payloads)
    answer = make_handler(SETTINGS, emit_metrics=False)(event, None)
    assert [r["recordId"] for r in answer["records"]] == [r["recordId"] for r in event["records"]]
    alone = [
        transform_records([record["data"]], ingested_at=1, unmetered_http_methods=SETTINGS.unmetered_http_methods)[0]
        for record in event["records"]
    ]
    for record, source, single, payload in zip(answer["records"], event["records"], alone, payloads, strict=True):
        assert record["result"] in {"Ok", "Dropped", "ProcessingFailed"}
        if record["result"] == "Ok":
            row = json.loads(base64.b64decode(record["data"]))
            _assert_matches_schema(row)
            assert isinstance(single, str)
            single_row = json.loads(base64.b64decode(single))
            assert {**row, "ingested_at": 1} == single_row  # the batch path agrees with the line alone
            assert rejection_reason(payload) is None
        else:
            assert record["data"] == source["data"]
            assert (rejection_reason(payload) is None) == (record["result"] == "Dropped")


def test_bad_lines_inside_a_batch_get_the_reason_of_the_line_alone(caplog: pytest.LogCaptureFixture) -> None:
    payloads = [case[1] for case in BAD_LINES]
    event = firehose_event(payloads)
    with caplog.at_level(logging.WARNING, logger="transform"):
        answer = make_handler(SETTINGS, emit_metrics=False)(event, None)
    assert {r["result"] for r in answer["records"]} == {"ProcessingFailed"}
    assert [r.__dict__["reason"] for r in caplog.records] == [rejection_reason(payload) for payload in payloads]

"""Transform: the Lambda's settings come from the config, and its bundle alone answers a Firehose event."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from aws_cdk.assertions import Template

from cdk_stacks.bundling import LOCK_TARGET_COMMENT, BundlingError, PythonBundle, PythonTarget, project_requirements
from cdk_stacks.transform import TRANSFORM_HANDLER, transform_bundle
from meterlake.records import render_access_log_line
from tests.cdk_stacks.conftest import only_resource
from tests.cdk_stacks.local_bundles import build_for_this_machine

_INVOKE = """
import json, os, sys, types
sys.path[:0] = [sys.argv[1]]
os.environ.update(json.loads(sys.argv[2]))
import msgspec
assert msgspec.__file__.startswith(sys.argv[1]), msgspec.__file__
module, _, name = sys.argv[3].rpartition(".")
handler = getattr(__import__(module, fromlist=[name]), name)
context = types.SimpleNamespace(function_name="transform", memory_limit_in_mb=1024, aws_request_id="req-1",
    invoked_function_arn="arn:aws:lambda:eu-west-1:111122223333:function:transform")
answer = handler(json.load(sys.stdin), context)
# As Lambda's Python runtime marshals an answer: bytes are sent unchanged, anything else JSON-encoded.
print(answer.decode() if isinstance(answer, bytes) else json.dumps(answer))
"""


def test_function_settings_come_from_config(templates: dict[str, Template]) -> None:
    function = only_resource(templates["MeterlakeTransform"], "AWS::Lambda::Function")
    assert function["Runtime"] == "python3.13"
    assert function["Architectures"] == ["arm64"]
    assert function["MemorySize"] == 1536
    assert function["Handler"] == TRANSFORM_HANDLER
    assert function["Environment"]["Variables"] == {
        "METERING_DATABASE": "usage_db",
        "METERING_TABLE": "api_events",
        "OTF_OPERATION": "update",
        "UNMETERED_HTTP_METHODS": "OPTIONS,HEAD",
        "POWERTOOLS_SERVICE_NAME": "transform",
        "POWERTOOLS_METRICS_NAMESPACE": "meterlake",
    }
    log_group = only_resource(templates["MeterlakeTransform"], "AWS::Logs::LogGroup")
    assert log_group["RetentionInDays"] == 90
    assert "LoggingConfig" in function


def test_lambda_bundle_holds_wheels_for_the_lambda_platform(cdk_outdir: Path, templates: dict[str, Template]) -> None:
    function = only_resource(templates["MeterlakeTransform"], "AWS::Lambda::Function")
    asset = cdk_outdir / f"asset.{function['Code']['S3Key'].removesuffix('.zip')}"
    assert (asset / "transform_lambda" / "handler.py").is_file()
    assert (asset / "meterlake" / "records.py").is_file()
    assert not (asset / "meterlake" / "schema.py").exists()
    assert [p.name for p in (asset / "msgspec").glob("_core.*.so")] == ["_core.cpython-313-aarch64-linux-gnu.so"]
    assert (asset / "aws_lambda_powertools").is_dir()


def test_bundle_alone_answers_a_firehose_event(tmp_path: Path) -> None:
    """Same bundling code and locked versions, built for this machine, imported with nothing but the bundle (and
    stdlib) on sys.path."""
    bundle_dir = build_for_this_machine(transform_bundle, tmp_path / "bundle")
    line = render_access_log_line(
        {
            "request_id": "r-1",
            "tenant_id": "acme",
            "request_time": 1_764_000_000_123,
            "http_method": "GET",
            "resource_path": "/random/strings",
            "status": 200,
            "response_length": 42,
        }
    )
    event = {
        "invocationId": "inv-1",
        "deliveryStreamArn": "arn:aws:firehose:eu-west-1:111122223333:deliverystream/amazon-apigateway-x",
        "region": "eu-west-1",
        "records": [
            {
                "recordId": "rec-1",
                "approximateArrivalTimestamp": 1_764_000_000_500,
                "data": base64.b64encode(line).decode(),
            }
        ],
    }
    environment = {"METERING_DATABASE": "usage_db", "METERING_TABLE": "api_events", "OTF_OPERATION": "update"}
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", _INVOKE, str(bundle_dir), json.dumps(environment), TRANSFORM_HANDLER],
        input=json.dumps(event),
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    response: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    (record,) = response["records"]
    assert record["recordId"] == "rec-1"
    assert record["result"] == "Ok"
    assert record["metadata"]["otfMetadata"] == {
        "destinationDatabaseName": "usage_db",
        "destinationTableName": "api_events",
        "operation": "update",
    }
    document = json.loads(base64.b64decode(record["data"]))
    assert document["request_id"] == "r-1"
    assert document["request_time"] == 1_764_000_000_123_000


def test_asset_hash_follows_sources_pins_lock_and_target(tmp_path: Path) -> None:
    (tmp_path / "handler.py").write_text("x = 1\n")
    target = PythonTarget(platform="manylinux2014_aarch64", python_version="3.13")
    bundle = PythonBundle(
        sources=(("handler.py", "handler.py"),), requirements=("msgspec<1",), target=target, root=tmp_path
    )
    first = bundle.asset_hash()
    assert (
        PythonBundle(sources=bundle.sources, requirements=("msgspec<2",), target=target, root=tmp_path).asset_hash()
        != first
    )
    other_target = PythonTarget(platform="manylinux2014_x86_64", python_version="3.13")
    assert (
        PythonBundle(
            sources=bundle.sources, requirements=bundle.requirements, target=other_target, root=tmp_path
        ).asset_hash()
        != first
    )
    (tmp_path / "handler.py").write_text("x = 2\n")
    second = bundle.asset_hash()
    assert second != first
    lock = tmp_path / "lock.txt"
    lock.write_text("msgspec==0.22.0 --hash=sha256:aa\n")
    locked = PythonBundle(
        sources=bundle.sources, requirements=bundle.requirements, target=target, root=tmp_path, lock=lock
    )
    third = locked.asset_hash()
    assert third != second
    lock.write_text("msgspec==0.22.0 --hash=sha256:bb\n")
    assert locked.asset_hash() != third


def test_a_lock_serves_only_the_targets_it_was_resolved_for(tmp_path: Path) -> None:
    (tmp_path / "handler.py").write_text("x = 1\n")
    lock = tmp_path / "lock.txt"
    arm = PythonTarget.for_lambda(architecture="arm64", python_version="3.13")
    lock.write_text(f"{LOCK_TARGET_COMMENT}{arm.describe()}\n")
    x86 = PythonTarget.for_lambda(architecture="x86_64", python_version="3.13")
    bundle = PythonBundle(
        sources=(("handler.py", "handler.py"),), requirements=(), target=x86, root=tmp_path, lock=lock
    )
    with pytest.raises(BundlingError, match=r"not resolved for cp3\.13 manylinux2014_x86_64.*make lock-lambdas"):
        bundle.build(tmp_path / "out")
    with pytest.raises(BundlingError, match="make lock-lambdas"):
        PythonBundle(
            sources=bundle.sources, requirements=(), target=x86, root=tmp_path, lock=tmp_path / "no.txt"
        ).build(tmp_path / "out")


def test_requirements_are_read_from_pyproject(tmp_path: Path) -> None:
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\ndependencies = ["msgspec>=0.19,<0.23", "Aws_Lambda.Powertools>=3,<4"]\n')
    assert project_requirements(["aws-lambda-powertools", "msgspec"], pyproject=pyproject) == (
        "Aws_Lambda.Powertools>=3,<4",
        "msgspec>=0.19,<0.23",
    )
    with pytest.raises(BundlingError, match="orjson"):
        project_requirements(["orjson"], pyproject=pyproject)

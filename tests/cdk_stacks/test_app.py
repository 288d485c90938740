"""The whole app: cdk-nag clean, cfn-lint clean, deploy order explicit, bad configs refused with one message."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from aws_cdk import App, Stack, Validations
from aws_cdk import aws_s3 as s3
from cdk_nag import AwsSolutionsChecks

from cdk_stacks.app import MeterlakeStacks
from meterlake.aws.stacks import STACK_NAMES

REPO = Path(__file__).resolve().parents[2]
CFN_LINT = Path(sys.executable).with_name("cfn-lint")
_ENV = {**os.environ, "JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION": "20", "PYTHONPATH": str(REPO)}


def test_cdk_nag_reports_nothing_unacknowledged(stacks: MeterlakeStacks, cdk_outdir: Path) -> None:
    """The session synthesis would have raised ValidationFailed; the report confirms no plugin reported."""
    report = json.loads((cdk_outdir / "validation-report.json").read_text())
    assert report["pluginReports"] == []


def test_cdk_nag_gate_fails_on_an_unacknowledged_finding(tmp_path: Path) -> None:
    app = App(outdir=str(tmp_path))
    s3.Bucket(Stack(app, "Unchecked"), "Bucket")
    Validations.of(app).add_plugins(AwsSolutionsChecks(app))
    with pytest.raises(RuntimeError, match="ValidationFailed"):
        app.synth()


def test_cfn_lint_passes_on_every_template(stacks: MeterlakeStacks, cdk_outdir: Path) -> None:
    templates = sorted(str(cdk_outdir / f"{name}.template.json") for name in STACK_NAMES)
    result = subprocess.run(
        [str(CFN_LINT), "--ignore-checks", "W3005", "--", *templates], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_stacks_depend_on_each_other_in_deploy_order(stacks: MeterlakeStacks, cdk_outdir: Path) -> None:
    manifest: dict[str, Any] = json.loads((cdk_outdir / "manifest.json").read_text())
    dependencies = {
        name: {d for d in manifest["artifacts"][name].get("dependencies", []) if d in STACK_NAMES}
        for name in STACK_NAMES
    }
    assert dependencies == {
        "MeterlakeStorage": set(),
        "MeterlakeTransform": set(),
        "MeterlakeDelivery": {"MeterlakeStorage", "MeterlakeTransform"},
        "MeterlakeApi": {"MeterlakeDelivery"},
        "MeterlakeAnalytics": {"MeterlakeStorage", "MeterlakeDelivery"},
        "MeterlakeForwarding": {"MeterlakeStorage", "MeterlakeDelivery"},
    }


@pytest.mark.parametrize(
    ("context", "key"),
    [
        (
            {"data_firehose_configuration": {"destination_iceberg_table_configuration": {"database_name": "usage-db"}}},
            "data_firehose_configuration.destination_iceberg_table_configuration.database_name",
        ),
        (
            {"data_firehose_configuration": {"buffering_hints": {"interval_in_seconds": 901}}},
            "data_firehose_configuration.buffering_hints.interval_in_seconds",
        ),
        ({"data_firehose_configuration": {"stream_name": "bad/name"}}, "stream_name"),
    ],
)
def test_bad_config_fails_synthesis_naming_the_key(tmp_path: Path, context: dict[str, Any], key: str) -> None:
    (tmp_path / "cdk.context.json").write_text(json.dumps(context))
    result = subprocess.run(
        [sys.executable, str(REPO / "app.py")], cwd=tmp_path, env=_ENV, capture_output=True, text=True, check=False
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: cdk.context.json: ")
    assert key in lines[0]
    assert not (tmp_path / "cdk.out").exists()


def test_app_py_synthesizes_the_repository_config_to_cdk_out(tmp_path: Path) -> None:
    shutil.copy(REPO / "cdk.context.json", tmp_path / "cdk.context.json")
    result = subprocess.run(
        [sys.executable, str(REPO / "app.py")], cwd=tmp_path, env=_ENV, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for name in STACK_NAMES:
        template = json.loads((tmp_path / "cdk.out" / f"{name}.template.json").read_text())
        assert template["Resources"]
    stream = json.loads((tmp_path / "cdk.out" / "MeterlakeDelivery.template.json").read_text())
    names = [r["Properties"].get("DeliveryStreamName") for r in stream["Resources"].values()]
    assert "amazon-apigateway-random-gen" in names

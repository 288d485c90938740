"""What a newcomer trips on at the command line (issue 13): every mistake one `error:` line, output that pastes."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import pytest

from meterlake.amberflo.forwarder import Forwarder
from meterlake.amberflo.outbox import Outbox
from meterlake.config import load_config
from meterlake.lake.home import DataDir
from tests.meterlake.cli_process import meterlake, one_error_line


def test_max_count_zero_is_refused_not_replaced_by_ten(tmp_path: Path) -> None:
    result = meterlake(
        "load-test", "--apigw-invoke-url", "http://127.0.0.1:9/prod", "--auth-token", "x", "--max-count", "0",
        "--dry-run", cwd=tmp_path,
    )  # fmt: skip
    assert "at least 1" in one_error_line(result)


def test_version_is_the_installed_distributions(tmp_path: Path) -> None:
    result = meterlake("--version", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"meterlake {importlib.metadata.version('meterlake')}\n"


def test_dash_h_is_help(tmp_path: Path) -> None:
    for args in (["-h"], ["query", "-h"], ["aws", "check", "-h"]):
        result = meterlake(*args, cwd=tmp_path)
        assert result.returncode == 0, (args, result.stderr)
        assert "Usage: meterlake" in result.stdout


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["query", "--formatt", "csv"], "error: meterlake query: No such option: --formatt"),
        (["token", "--ttl", "soon"], "error: meterlake token: Invalid value for '--ttl'"),
        (["load-test", "--concurrency", "0", "--auth-token", "x"], "error: meterlake load-test: Invalid value"),
        (["no-such-command"], "error: meterlake: No such command 'no-such-command'"),
    ],
)
def test_a_command_line_mistake_is_one_line_not_a_box(tmp_path: Path, args: list[str], expected: str) -> None:
    line = one_error_line(meterlake(*args, cwd=tmp_path))
    assert line.startswith(expected), line


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["query", "usage_per_tenant_hour", "--param", "start=2026-11-26T00:00:00Z", "--param", "end=2026-11-25"],
            "end 2026-11-25T00:00:00Z is not after start 2026-11-26T00:00:00Z",
        ),
        (
            ["query", "usage_per_tenant_hour", "--from", "2026-11-26T00:00:00Z", "--to", "2026-11-26T00:00:00Z"],
            "is not after start",
        ),
        (["query", "top_routes_per_tenant", "--param", "limit=-1"], "parameter 'limit': -1 is below its minimum, 1"),
        (["query", "top_routes_per_tenant", "--param", "limit=0"], "parameter 'limit': 0 is below its minimum, 1"),
        (
            ["reconcile", "--from", "2026-11-26T00:00:00Z", "--to", "2026-11-25T00:00:00Z"],
            "--to 2026-11-25T00:00:00Z is not after --from 2026-11-26T00:00:00Z",
        ),
        (["query", "usage_per_tenant_hour", "--from", "yesterday"], "'yesterday' is not an ISO-8601 timestamp"),
    ],
)
def test_windows_and_ranges_are_validated_once_for_every_command(
    tmp_path: Path, args: list[str], expected: str
) -> None:
    line = one_error_line(meterlake(*args, cwd=tmp_path))
    assert expected in line, line


def test_query_json_ends_with_a_newline(tmp_path: Path) -> None:
    result = meterlake("query", "usage_per_tenant_day", "--format", "json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "[]\n"


def test_meters_list_names_no_value_for_a_null_test(tmp_path: Path) -> None:
    result = meterlake("meters", "list", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "None" not in result.stdout
    assert "response_length is not null" in result.stdout


def test_config_says_which_file_and_data_dir(tmp_path: Path) -> None:
    (tmp_path / "cdk.context.json").write_text('{"meterlake": {"api_stage": "v1"}}')
    text = meterlake("config", cwd=tmp_path)
    assert text.returncode == 0, text.stderr
    assert f"config file      {tmp_path / 'cdk.context.json'}\n" in text.stdout
    assert f"data dir         {tmp_path / 'home'}\n" in text.stdout
    document = json.loads(meterlake("config", "--format", "json", cwd=tmp_path).stdout)
    assert document["config_file"] == str(tmp_path / "cdk.context.json")
    assert document["data_dir"] == str(tmp_path / "home")
    assert document["config"]["meterlake"]["api_stage"] == "v1"


def test_forward_status_reports_how_the_outbox_was_drained_not_this_shells_key(tmp_path: Path) -> None:
    before = meterlake("forward", "status", cwd=tmp_path)
    assert "not drained yet" in before.stdout, before.stderr
    config = load_config(None)
    with (
        Outbox.in_data_dir(DataDir.resolve(tmp_path / "home"), meters=config.meters, settings=config.amberflo) as box,
        Forwarder(config.amberflo) as forwarder,
    ):
        box.drain(forwarder, api_key="held-by-up-only")  # as an `up` started with the key drains
    after = meterlake("forward", "status", cwd=tmp_path)  # this shell has no key
    assert "forwarding     sending to Amberflo" in after.stdout, after.stdout
    assert "dry run" not in after.stdout
    document = json.loads(meterlake("forward", "status", "--format", "json", cwd=tmp_path).stdout)
    assert document["last_drain"]["sending"] is True


def test_reconcile_as_json(tmp_path: Path) -> None:
    result = meterlake(
        "reconcile", "--from", "2026-11-25T00:00:00Z", "--to", "2026-11-26T00:00:00Z", "--format", "json", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("}\n")
    document = json.loads(result.stdout)
    assert document["differences"] == []
    assert document["against"] == "staged records (dry run)"


def test_format_takes_text_or_json_only(tmp_path: Path) -> None:
    assert "--format must be text or json" in one_error_line(meterlake("config", "--format", "yaml", cwd=tmp_path))


def test_ingest_says_where_rejected_lines_went(tmp_path: Path) -> None:
    (tmp_path / "lines.txt").write_text('{"not": "an access-log line"}\n')
    result = meterlake("ingest", "lines.txt", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "rejected 1" in result.stdout
    assert f"kept, each with its reason, under {tmp_path / 'home' / 'errors'}" in result.stdout

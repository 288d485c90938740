"""The command line: user mistakes give one clear line and a non-zero exit, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from meterlake.records import TenantSource, render_access_log_format


def meterlake(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from meterlake.cli import main; main()", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "METERLAKE_HOME": str(cwd / "home")},
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["query", "no_such_query"], "unknown query"),
        (["query", "usage_per_tenant_day", "--param", "start"], "start"),
        (["query", "usage_per_tenant_day", "--param", "bogus=1"], "bogus"),
        (["query", "usage_per_tenant_day", "--param", "start=yesterday-ish"], "start"),
        (["load-test", "--apigw-invoke-url", "http://127.0.0.1:9/prod", "--auth-token", "x"], "could not be reached"),
        (["load-test", "--apigw-invoke-url", "ftp://example/prod", "--auth-token", "x"], "not an http"),
        (["load-test", "--auth-token", "x"], "--rest-api-id"),
        (["--config", "missing.json", "config"], "cannot read"),
        (["ingest", "nowhere.txt"], "no such file"),
    ],
)
def test_user_mistakes_print_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    result = meterlake(*args, cwd=tmp_path)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert message in lines[0]


def test_bad_config_value_names_the_key(tmp_path: Path) -> None:
    (tmp_path / "cdk.context.json").write_text(
        json.dumps({"data_firehose_configuration": {"buffering_hints": {"interval_in_seconds": 5000}}})
    )
    result = meterlake("config", cwd=tmp_path)
    assert result.returncode != 0
    assert "data_firehose_configuration.buffering_hints.interval_in_seconds" in result.stderr
    assert "Traceback" not in result.stderr


def test_access_log_format_is_the_rendered_definition(tmp_path: Path) -> None:
    result = meterlake("access-log-format", cwd=tmp_path)
    assert result.returncode == 0
    assert result.stdout.strip() == render_access_log_format()


API_KEY_CONFIG = {"meterlake": {"tenant_source": {"kind": "api_key", "tenants_by_api_key": {"k1": "acme", "k2": "b"}}}}


def test_the_tenant_source_shapes_the_format_the_local_keys_and_the_load_test(tmp_path: Path) -> None:
    """With tenants from API keys: the format logs the key id, `api-key` prints a local key's value, and the local
    load test sends the first N configured keys."""
    (tmp_path / "cdk.context.json").write_text(json.dumps(API_KEY_CONFIG))
    rendered = meterlake("access-log-format", cwd=tmp_path)
    assert rendered.stdout.strip() == render_access_log_format(TenantSource.api_key())
    assert (
        "tenant           $context.identity.apiKeyId, mapped to 2 tenants" in meterlake("config", cwd=tmp_path).stdout
    )
    values = [meterlake("api-key", key_id, cwd=tmp_path).stdout.strip() for key_id in ("k1", "k2", "k1")]
    assert values[0] == values[2] != values[1]
    result = meterlake(
        "load-test", "--apigw-invoke-url", "http://127.0.0.1:9/prod", "--tenants", "2", "--max-count", "20",
        "--seed", "1", "--dry-run", cwd=tmp_path,
    )  # fmt: skip
    sent = {c.split("x-api-key: ")[1].rstrip("'") for c in result.stdout.splitlines()}
    assert sent == {values[0], values[1]}
    for args, message in (
        (["api-key", "k9"], "no API key 'k9' in meterlake.tenant_source.tenants_by_api_key (keys: k1, k2)"),
        (["load-test", "--apigw-invoke-url", "http://127.0.0.1:9/prod", "--tenants", "3"], "maps 2"),
    ):
        refused = meterlake(*args, cwd=tmp_path)
        assert refused.returncode != 0
        assert refused.stderr.strip().startswith("error: ")
        assert message in refused.stderr
    (tmp_path / "cdk.context.json").unlink()
    assert "takes no API keys" in meterlake("api-key", "k1", cwd=tmp_path).stderr


def test_dry_run_prints_curl_commands_like_run_test(tmp_path: Path) -> None:
    result = meterlake(
        "load-test", "--execution-id", "abc123", "--region-name", "eu-west-1", "--api-stage", "dev",
        "--auth-token", "TOKEN", "--max-count", "3", "--dry-run", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    commands = result.stdout.strip().splitlines()
    assert len(commands) == 3
    assert all(
        c.startswith("curl -XGET 'https://abc123.execute-api.eu-west-1.amazonaws.com/dev/random/") for c in commands
    )
    assert all("Authorization: TOKEN" in c for c in commands)


@pytest.mark.parametrize(
    ("sql", "message"),
    [
        (
            "SELECT content FROM read_text('{key}') UNION ALL SELECT tenant_id FROM metering_events",
            "Cannot access file",
        ),
        ("SELECT * FROM read_csv('/etc/passwd') CROSS JOIN (SELECT count(*) FROM metering_events)", "/etc/passwd"),
        ("COPY (SELECT tenant_id FROM metering_events) TO '{target}'", "only a query (SELECT) can run, not COPY"),
    ],
)
def test_a_query_file_cannot_reach_outside_the_table(tmp_path: Path, sql: str, message: str) -> None:
    assert meterlake("token", "--tenant", "acme", cwd=tmp_path).returncode == 0
    key = next((tmp_path / "home" / "keys").glob("*.pem"))
    target = tmp_path / "copied.csv"
    (tmp_path / "hostile.sql").write_text("-- hostile\n" + sql.format(key=key, target=target) + "\n")
    result = meterlake("query", "hostile.sql", "--format", "csv", cwd=tmp_path)
    assert result.returncode != 0
    assert "PRIVATE KEY" not in result.stdout + result.stderr
    assert "root:" not in result.stdout
    assert not target.exists()
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert message in lines[0]

"""What a newcomer trips on at the command line (issue 13): every mistake one `error:` line, output that pastes."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest

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

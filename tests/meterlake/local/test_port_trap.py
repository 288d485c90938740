"""The port trap (issue 13, defect 1): `meterlake up --port N` (or 0), then `token` and `load-test --tenants`.

Tokens must carry the issuer of the gateway actually serving, a 401's reason must reach the server log (never the
response body), and a load test whose every request failed must say so and exit non-zero.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.meterlake.cli_process import meterlake, one_error_line

pytestmark = pytest.mark.slow

_CLI = (sys.executable, "-c", "from meterlake.cli import main; main()")


@pytest.fixture
def running_up(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """`meterlake up --port 0` in ``tmp_path`` (data dir ``tmp_path/home``); yields its invoke URL and the process."""
    process = subprocess.Popen(
        [*_CLI, "--home", str(tmp_path / "home"), "up", "--port", "0"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        first = process.stdout.readline().split()
        assert first[:1] == ["RestApiEndpoint"], (first, process.stderr.read() if process.stderr else "")
        banner: list[str] = []  # up's banner ends with the buffering line
        while not banner or (not banner[-1].startswith(("flushing to Iceberg", "Traceback")) and banner[-1]):
            banner.append(process.stdout.readline())
        # The printed command stays on one line whatever the width, so pasting it runs it (defect 6).
        assert any(line.endswith(f"{first[1]}/random/strings?len=8\n") for line in banner), banner
        yield first[1], process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()


def test_token_follows_the_serving_gateway(tmp_path: Path, running_up: tuple[str, subprocess.Popen[str]]) -> None:
    url, _ = running_up
    issued = meterlake("token", "--tenant", "acme", cwd=tmp_path)
    assert issued.returncode == 0, issued.stderr
    answer = httpx.get(f"{url}/random/strings", headers={"Authorization": issued.stdout.strip()}, timeout=10)
    assert answer.status_code == 200, answer.text


def test_load_test_tenants_follow_the_url(tmp_path: Path, running_up: tuple[str, subprocess.Popen[str]]) -> None:
    url, _ = running_up
    result = meterlake("load-test", "--apigw-invoke-url", url, "--tenants", "2", "--max-count", "6", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "200 x6" in result.stdout
    as_json = meterlake(
        *("load-test", "--apigw-invoke-url", url, "--tenants", "2", "--max-count", "4", "--format", "json"),
        cwd=tmp_path,
    )
    assert as_json.returncode == 0, as_json.stderr
    document = json.loads(as_json.stdout)
    assert (document["answered"], document["status"]) == (4, {"200": 4})
    assert sum(document["billable_by_tenant"].values()) == 4


def test_a_refused_token_is_explained_in_the_server_log_only(
    tmp_path: Path, running_up: tuple[str, subprocess.Popen[str]]
) -> None:
    url, process = running_up
    # A token of the configured port's issuer (8850): not this gateway's.
    stale = meterlake("token", "--tenant", "acme", "--port", "8850", cwd=tmp_path)
    assert stale.returncode == 0, stale.stderr
    answer = httpx.get(f"{url}/random/strings", headers={"Authorization": stale.stdout.strip()}, timeout=10)
    assert answer.status_code == 401
    assert answer.json() == {"message": "Unauthorized"}
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    explained = [line for line in err.splitlines() if "answered 401" in line]
    assert explained, err
    assert "issuer" in explained[0]
    assert ":8850/" in explained[0]


def test_a_load_test_where_every_request_failed_exits_non_zero(
    tmp_path: Path, running_up: tuple[str, subprocess.Popen[str]]
) -> None:
    url, _ = running_up
    stale = meterlake("token", "--tenant", "acme", "--port", "8850", cwd=tmp_path).stdout.strip()
    result = meterlake("load-test", "--apigw-invoke-url", url, "--auth-token", stale, "--max-count", "4", cwd=tmp_path)
    line = one_error_line(result)
    assert "none of the 4 requests succeeded" in line
    assert "401 x4" in result.stdout


def test_ctrl_c_during_a_load_test_prints_what_was_answered(
    tmp_path: Path, running_up: tuple[str, subprocess.Popen[str]]
) -> None:
    url, _ = running_up
    token = meterlake("token", "--tenant", "acme", cwd=tmp_path).stdout.strip()
    process = subprocess.Popen(
        [
            *_CLI,
            "load-test",
            "--apigw-invoke-url",
            url,
            "--auth-token",
            token,
            "--duration",
            "60",
            "--concurrency",
            "2",
        ],
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "METERLAKE_HOME": str(tmp_path / "home")},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for_requests(tmp_path / "home")
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode != 0
    assert "answered" in out, (out, err)
    assert "200 x" in out
    assert "interrupted" in out
    assert err.strip().splitlines()[-1].startswith("error: interrupted after"), err
    assert "Traceback" not in err


def _spooled_bytes(home: Path) -> int:
    return sum(segment.stat().st_size for segment in (home / "spool").glob("*.seg"))


def _wait_for_requests(home: Path) -> None:
    """Wait until the load test is under way: the gateway's spool grows with its requests' access-log lines."""
    before = _spooled_bytes(home)
    deadline = time.monotonic() + 60
    while _spooled_bytes(home) <= before:
        assert time.monotonic() < deadline, "the load test sent nothing"
        time.sleep(0.05)


def test_feedback_while_data_is_in_flight(tmp_path: Path, running_up: tuple[str, subprocess.Popen[str]]) -> None:
    url, process = running_up
    token = meterlake("token", "--tenant", "acme", cwd=tmp_path).stdout.strip()
    assert httpx.get(f"{url}/random/strings", headers={"Authorization": token}, timeout=10).status_code == 200
    # Answered means spooled; the 60 s buffering interval has not committed it: the query says so.
    query = meterlake("query", "usage_per_tenant_day", "--format", "csv", cwd=tmp_path)
    assert query.returncode == 0, query.stderr
    assert "not committed yet" in query.stderr
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    # `up` shows each flush: what was committed to which table.
    assert "flushed 1 records: 1 events committed to restapi_access_log_iceberg_db.restapi_access_log_iceberg" in err
    after = meterlake("query", "usage_per_tenant_day", "--format", "csv", cwd=tmp_path)
    assert "not committed yet" not in after.stderr
    assert "acme" in after.stdout

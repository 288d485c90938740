"""The AWS options of the command line, in process under moto: `query --athena` and `load-test --cognito-client-id`."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from meterlake.cli import app, main
from tests.meterlake.aws.conftest import CognitoUser, queue_athena_result, verified_claims
from tests.meterlake.aws.test_athena import USAGE_COLUMNS, USAGE_ROWS

runner = CliRunner()


class RecordingServer(ThreadingHTTPServer):
    """A stand-in API on loopback that answers 200 and remembers each request's path and Authorization header."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _RecordingHandler)
        self.requests: list[tuple[str, str | None]] = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}/prod"


class _RecordingHandler(BaseHTTPRequestHandler):
    server: RecordingServer

    def do_GET(self) -> None:
        with self.server.lock:
            self.server.requests.append((self.path, self.headers.get("Authorization")))
        body = b'["aBcD"]'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Keep the test output clean."""


@pytest.fixture
def api() -> Iterator[RecordingServer]:
    server = RecordingServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def load_test_args(api: RecordingServer, user: CognitoUser, *extra: str) -> list[str]:
    return [
        "load-test",
        "--apigw-invoke-url",
        api.url,
        "--cognito-client-id",
        user.client_id,
        "--username",
        user.username,
        "--region-name",
        "us-east-1",
        "--max-count",
        "5",
        "--concurrency",
        "2",
        *extra,
    ]


@pytest.mark.parametrize("password_from", ["option", "env", "prompt"])
def test_load_test_signs_in_and_sends_the_id_token_raw(
    api: RecordingServer, cognito_user: CognitoUser, password_from: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    extra, stdin = [], None
    if password_from == "option":
        extra = ["--password", cognito_user.password]
    elif password_from == "env":
        monkeypatch.setenv("METERLAKE_PASSWORD", cognito_user.password)
    else:
        stdin = cognito_user.password + "\n"

    result = runner.invoke(app, load_test_args(api, cognito_user, *extra), input=stdin)

    assert result.exit_code == 0, (result.output, result.exception)
    assert "answered 5 requests" in result.stdout
    assert cognito_user.password not in result.output
    assert len(api.requests) == 5
    assert all(path.startswith("/prod/random/strings") for path, _ in api.requests)
    tokens = {authorization for _, authorization in api.requests}
    assert len(tokens) == 1
    (token,) = tokens
    assert token is not None
    assert not token.startswith("Bearer")
    claims = verified_claims(token, cognito_user)
    assert (claims["token_use"], claims["custom:tenant_id"]) == ("id", "acme")


def test_load_test_wrong_password_is_one_error_line(
    api: RecordingServer,
    cognito_user: CognitoUser,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["meterlake", *load_test_args(api, cognito_user, "--password", "wrong")]
    monkeypatch.setattr(sys, "argv", argv)

    with pytest.raises(SystemExit) as caught:
        main()

    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "AWS region us-east-1 (from --region), the default credentials",
        "error: Cognito sign-in of 'alice': NotAuthorizedException: Incorrect username or password. "
        "(wrong password, disabled user, or a client that needs a secret)",
    ]
    assert api.requests == []


def test_query_on_athena_prints_the_queued_rows_as_csv(athena: Any, tmp_path: Path) -> None:
    config = tmp_path / "cdk.context.json"
    config.write_text(
        json.dumps(
            {
                "data_firehose_configuration": {
                    "destination_iceberg_table_configuration": {"database_name": "lake", "table_name": "events"}
                }
            }
        )
    )
    queue_athena_result(USAGE_COLUMNS, USAGE_ROWS)

    result = runner.invoke(
        app,
        [
            "--config",
            str(config),
            "query",
            "usage_per_tenant_day",
            "--athena",
            "--workgroup",
            "wg",
            "--region",
            "us-east-1",
            "--format",
            "csv",
            "--param",
            "tenant_id=acme",
        ],
    )

    assert result.exit_code == 0, (result.output, result.exception)
    assert result.stdout == (
        "tenant_id,usage_date,requests,billable_requests,bytes_out,errors_4xx,errors_5xx,p95_latency_ms\n"
        "acme,2024-05-01,120,118,40960,3,2,87\n"
        ",2024-05-01,7,0,0,7,0,3\n"
    )
    (execution_id,) = athena.list_query_executions(WorkGroup="wg")["QueryExecutionIds"]
    execution = athena.get_query_execution(QueryExecutionId=execution_id)["QueryExecution"]
    assert '"lake"."events"' in execution["Query"]
    assert execution["ExecutionParameters"][2:] == ["'acme'", "'acme'"]


def test_query_workgroup_defaults_from_the_environment(athena: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METERLAKE_ATHENA_WORKGROUP", "wg")

    result = runner.invoke(app, ["query", "usage_per_tenant_day", "--athena", "--format", "json"])

    assert result.exit_code == 0, (result.output, result.exception)
    assert json.loads(result.stdout) == []
    assert len(athena.list_query_executions(WorkGroup="wg")["QueryExecutionIds"]) == 1


def meterlake(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """The real entry point in a fresh process with no AWS settings but ``env``."""
    return subprocess.run(
        [sys.executable, "-c", "from meterlake.cli import main; main()", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "METERLAKE_HOME": str(cwd / "home"), "HOME": str(cwd), **env},
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["query", "usage_per_tenant_day", "--athena"],
            "error: no AWS region: give --region, set AWS_REGION or AWS_DEFAULT_REGION, or set region in the profile",
        ),
        (
            [
                "load-test",
                "--apigw-invoke-url",
                "http://127.0.0.1:9/prod",
                "--cognito-client-id",
                "c",
                "--username",
                "u",
            ],
            "error: no AWS region: give --region, set AWS_REGION or AWS_DEFAULT_REGION",
        ),
        (
            ["query", "usage_per_tenant_day", "--region", "us-east-1"],
            "error: --region, --profile, --output-location and --table-bucket only apply with --athena",
        ),
        (
            ["load-test", "--apigw-invoke-url", "http://127.0.0.1:9/prod", "--auth-token", "x", "--username", "u"],
            "error: --user only applies with --cognito-client-id",
        ),
    ],
)
def test_aws_option_mistakes_print_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    result = meterlake(*args, cwd=tmp_path)

    assert result.returncode == 2
    assert result.stderr.splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith(message)


def test_unknown_aws_profile_is_one_line(tmp_path: Path) -> None:
    result = meterlake(
        "query", "usage_per_tenant_day", "--athena", "--region", "us-east-1", cwd=tmp_path, AWS_PROFILE="nope"
    )

    assert result.returncode == 2
    assert result.stderr == "error: cannot set up the athena client: The config profile (nope) could not be found\n"

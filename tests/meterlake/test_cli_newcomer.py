"""What a newcomer trips on at the command line (issue 13): every mistake one `error:` line, output that pastes."""

from __future__ import annotations

from pathlib import Path

from tests.meterlake.cli_process import meterlake, one_error_line


def test_max_count_zero_is_refused_not_replaced_by_ten(tmp_path: Path) -> None:
    result = meterlake(
        "load-test", "--apigw-invoke-url", "http://127.0.0.1:9/prod", "--auth-token", "x", "--max-count", "0",
        "--dry-run", cwd=tmp_path,
    )  # fmt: skip
    assert "at least 1" in one_error_line(result)

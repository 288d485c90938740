"""One spelling per idea across the command line (issue 13): windows, region, profile, user, REST API and stage.

run_test.py's spellings (the AWS sample's load test, which the README documented) still work on `load-test` as hidden
aliases; every shown option uses the one spelling, and a new command that reaches for another fails here.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import typer
from typer._click.core import Command
from typer.core import TyperGroup, TyperOption

from meterlake.cli import app
from tests.meterlake.cli_process import meterlake, one_error_line

#: Spellings the command line does not show: each idea has the one on the right.
OTHER_SPELLINGS = {
    "--region-name": "--region",
    "--aws-region": "--region",
    "--aws-profile": "--profile",
    "--username": "--user",
    "--user-name": "--user",
    "--start": "--from",
    "--since": "--from",
    "--end": "--to",
    "--until": "--to",
    "--api-stage": "--stage",
    "--stage-name": "--stage",
    "--execution-id": "--rest-api-id",
    "--api-id": "--rest-api-id",
}


def _commands(command: Command, path: str = "meterlake") -> Iterator[tuple[str, Command]]:
    yield path, command
    if isinstance(command, TyperGroup):
        for name, sub in command.commands.items():
            yield from _commands(sub, f"{path} {name}")


def _shown_options() -> Iterator[tuple[str, str]]:
    for path, command in _commands(typer.main.get_command(app)):
        for param in command.params:
            if isinstance(param, TyperOption) and not param.hidden:
                for name in (*param.opts, *param.secondary_opts):
                    yield path, name


def test_every_shown_option_uses_the_one_spelling() -> None:
    shown = list(_shown_options())
    others = [f"{path} {name} (say {OTHER_SPELLINGS[name]})" for path, name in shown if name in OTHER_SPELLINGS]
    assert others == []
    # The spellings are the ones commands actually use.
    names = {name for _, name in shown}
    assert {"--region", "--profile", "--user", "--from", "--to", "--stage", "--rest-api-id"} <= names


def test_region_and_profile_are_spelled_alike_wherever_they_apply() -> None:
    by_command: dict[str, set[str]] = {}
    for path, name in _shown_options():
        by_command.setdefault(path, set()).add(name)
    with_region = {path for path, names in by_command.items() if "--region" in names}
    with_profile = {path for path, names in by_command.items() if "--profile" in names}
    assert with_region == with_profile
    assert {"meterlake query", "meterlake load-test", "meterlake aws check"} <= with_region


_URL = "https://abc123.execute-api.eu-west-1.amazonaws.com/dev/random/"


@pytest.mark.parametrize(
    "spelling",
    [
        ["--rest-api-id", "abc123", "--region", "eu-west-1", "--stage", "dev"],
        ["--execution-id", "abc123", "--region-name", "eu-west-1", "--api-stage", "dev"],
    ],
    ids=["one-spelling", "run_test.py-aliases"],
)
def test_load_test_takes_the_one_spelling_and_run_test_aliases(tmp_path: Path, spelling: list[str]) -> None:
    result = meterlake("load-test", *spelling, "--auth-token", "T", "--max-count", "2", "--dry-run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    commands = result.stdout.splitlines()
    assert len(commands) == 2
    assert all(command.startswith(f"curl -XGET '{_URL}") for command in commands), commands


def test_load_test_help_shows_only_the_one_spelling(tmp_path: Path) -> None:
    shown = meterlake("load-test", "--help", cwd=tmp_path).stdout
    for name in ("--rest-api-id", "--stage", "--region", "--user", "--profile"):
        assert name in shown
    for name in ("--execution-id", "--api-stage", "--region-name", "--username"):
        assert name not in shown


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["--region", "eu-west-1", "--region-name", "eu-west-2"],
            "error: --region-name is the old spelling of --region",
        ),
        (["--stage", "a", "--api-stage", "b"], "error: --api-stage is the old spelling of --stage"),
        (["--rest-api-id", "a", "--execution-id", "b"], "error: --execution-id is the old spelling of --rest-api-id"),
        (["--user", "a", "--username", "b"], "error: --username is the old spelling of --user"),
        (["--cognito-client-id", "c"], "error: --cognito-client-id needs --user"),
    ],
)
def test_an_option_given_under_both_spellings_is_one_error_line(tmp_path: Path, args: list[str], expected: str) -> None:
    result = meterlake("load-test", "--apigw-invoke-url", "http://127.0.0.1:9/prod", *args, cwd=tmp_path)
    assert one_error_line(result).startswith(expected)

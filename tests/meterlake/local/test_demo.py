"""The demo's report shows tenants as text."""

from __future__ import annotations

import io

from rich.console import Console

from meterlake.local.demo import Reconciliation, reconcile


def test_a_reconciliation_line_shows_control_characters_and_markup_as_text() -> None:
    lines = reconcile({"\x1b[2Jevil": 2, "[/bold]": 1, None: 1}, {"\x1b[2Jevil": 2, "[/bold]": 1, None: 1})
    shown = [str(line).lstrip() for line in lines]
    assert "\x1b" not in "".join(shown)
    assert [line.split(": answered")[0] for line in shown] == [r"\x1b[2Jevil", "[/bold]", "(no tenant)"]
    out = io.StringIO()
    console = Console(file=out, width=200, color_system=None)
    for line in lines:  # as run_demo prints them
        console.print(str(line), markup=False, highlight=False)
    assert "[/bold]: answered" in out.getvalue()


def test_an_empty_tenant_is_not_shown_as_no_tenant() -> None:
    assert str(Reconciliation("", 1, 1, 1, 1)).startswith(" " * 12 + ": answered")

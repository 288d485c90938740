"""What every test package shares: the fault-injection report printed at the end of `make test`.

Each fault test (tests/meterlake/local/test_stream_faults.py, test_gateway_durability.py, amberflo/test_outbox.py,
...) records what it measured with the ``fault_report`` fixture; the session ends with one table of every fault:
requests (or records) answered, events committed, lost and duplicated. A row with any loss fails its own test.
Rows travel on each test's report (``user_properties``), so the table is whole when pytest-xdist runs the tests in
several worker processes (``make test`` does).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest

_FAULT_PROPERTY = "fault_row"


@dataclass(frozen=True, slots=True)
class FaultRow:
    """One fault and what the pipeline did under it."""

    fault: str
    answered: int
    committed: int
    lost: int
    duplicated: int


FaultReport = Callable[..., None]


@pytest.fixture
def fault_report(request: pytest.FixtureRequest) -> FaultReport:
    """``fault_report(fault, answered=, committed=, lost=, duplicated=)`` adds a row to the session's fault table."""
    properties = request.node.user_properties

    def record(fault: str, *, answered: int, committed: int, lost: int, duplicated: int) -> None:
        properties.append((_FAULT_PROPERTY, (fault, answered, committed, lost, duplicated)))

    return record


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Collect the fault rows a test recorded (in this process, or in an xdist worker whose report came back); the
    teardown report carries every row, whichever phase recorded it."""
    if report.when != "teardown":
        return
    for name, value in report.user_properties:
        if name == _FAULT_PROPERTY:
            assert isinstance(value, list | tuple)  # xdist sends the tuple back as a list
            fault, answered, committed, lost, duplicated = value
            _rows.append(FaultRow(str(fault), int(answered), int(committed), int(lost), int(duplicated)))


#: The session's fault rows, in the order their tests' reports arrived.
_rows: list[FaultRow] = []


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    """Print the fault table after the test summary (``make test`` shows it on every run)."""
    rows = _rows
    if not rows:
        return
    width = max(len(row.fault) for row in rows)
    terminalreporter.section("fault injection: nothing answered may be lost or counted twice")
    terminalreporter.line(f"{'fault':<{width}}  {'answered':>9}  {'committed':>9}  {'lost':>5}  {'duplicated':>10}")
    for row in rows:
        terminalreporter.line(
            f"{row.fault:<{width}}  {row.answered:>9}  {row.committed:>9}  {row.lost:>5}  {row.duplicated:>10}"
        )

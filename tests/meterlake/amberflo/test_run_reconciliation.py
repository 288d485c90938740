"""One run's reconciliation, per tenant (make demo, meterlake aws check): answered == counted == forwarded."""

from __future__ import annotations

import io
from collections.abc import Mapping

from rich.console import Console

from meterlake.amberflo.reconcile import (
    RunReconciliation,
    Tally,
    TenantReconciliation,
    event_usage_tallies,
    reconcile_run,
    usage_tallies,
)
from meterlake.lake.query import QueryResult
from tests.meterlake.aws.test_athena import USAGE_COLUMNS


def athena(
    answered: Mapping[str, Tally], counted: Mapping[str, Tally], forwarded: dict[str, int] | None
) -> RunReconciliation:
    """The check's reconciliation: counted in Athena."""
    return reconcile_run(
        dict[str | None, Tally](answered), dict[str | None, Tally](counted), forwarded, counted_in="Athena"
    )


def test_matching_maps_reconcile_to_ok_lines_in_the_demos_format() -> None:
    answered = {"acme": Tally(20, 18), "globex": Tally(5, 5)}
    result = athena(answered, dict(answered), {"acme": 18, "globex": 5})
    assert result.ok
    assert result.differences == []
    assert [str(line) for line in result.lines] == [
        "        acme: answered    20 == counted in Athena    20  billable    18 == api-calls units in Amberflo    18"
        "  OK",
        "      globex: answered     5 == counted in Athena     5  billable     5 == api-calls units in Amberflo     5"
        "  OK",
    ]


def test_a_short_count_is_a_mismatch_naming_both_sides() -> None:
    result = athena({"acme": Tally(20, 20)}, {"acme": Tally(17, 17)}, {"acme": 20})
    assert not result.ok
    (line,) = result.lines
    assert str(line) == (
        "        acme: answered    20 != counted in Athena    17  billable    20 != billable in Athena    17 "
        "== api-calls units in Amberflo    20  MISMATCH"
    )
    assert result.differences == [
        "acme: answered 20, counted in Athena 17",
        "acme: billable 20, billable in Athena 17",
    ]


def test_amberflo_short_of_the_billable_requests_is_a_mismatch() -> None:
    result = athena({"acme": Tally(20, 20)}, {"acme": Tally(20, 20)}, {"acme": 19})
    assert not result.ok
    assert result.differences == ["acme: billable 20, api-calls units in Amberflo 19"]
    assert str(result.lines[0]).endswith("billable    20 != api-calls units in Amberflo    19  MISMATCH")


def test_a_tenant_missing_from_a_side_counts_zero_there() -> None:
    result = athena({"acme": Tally(20, 20), "globex": Tally(3, 3)}, {"acme": Tally(20, 20)}, {"acme": 20})
    assert [line.tenant for line in result.lines] == ["acme", "globex"]
    assert result.lines[0].matches
    assert result.differences == [
        "globex: answered 3, counted in Athena 0",
        "globex: billable 3, billable in Athena 0",
        "globex: billable 3, api-calls units in Amberflo 0",
    ]
    # A tenant the lake or Amberflo holds that the check never answered is a difference too.
    extra = athena({}, {"stranger": Tally(1, 1)}, {"stranger": 1})
    assert extra.differences == [
        "stranger: answered 0, counted in Athena 1",
        "stranger: billable 0, billable in Athena 1",
        "stranger: billable 0, api-calls units in Amberflo 1",
    ]


def test_a_dry_run_compares_the_lake_only_and_says_so() -> None:
    result = athena({"acme": Tally(20, 20)}, {"acme": Tally(20, 20)}, None)
    assert result.ok
    assert str(result.lines[0]) == (
        "        acme: answered    20 == counted in Athena    20  billable    20  (forwarding is a dry run)  OK"
    )
    short = athena({"acme": Tally(20, 20)}, {"acme": Tally(19, 19)}, None)
    assert not short.ok
    assert "Amberflo" not in " ".join(short.differences)


def test_nothing_to_reconcile_is_not_ok() -> None:
    assert not athena({}, {}, {}).ok


def test_usage_rows_are_summed_per_tenant_over_days() -> None:
    result = QueryResult(
        columns=[name for name, _ in USAGE_COLUMNS],
        rows=[
            ("acme", "2026-11-29", 3, 2, 0, 1, 0, 9),
            ("acme", "2026-11-30", 4, 4, 0, 0, 0, 9),
            (None, "2026-11-30", 7, 0, 0, 7, 0, 3),
        ],
    )
    assert usage_tallies(result.columns, result.rows) == {"acme": Tally(7, 6), None: Tally(7, 0)}
    assert usage_tallies([], []) == {}


def test_a_reconciliation_line_shows_control_characters_and_markup_as_text() -> None:
    tallies = {"\x1b[2Jevil": Tally(2, 2), "[/bold]": Tally(1, 1), None: Tally(1, 1)}
    lines = reconcile_run(tallies, tallies, {"\x1b[2Jevil": 2, "[/bold]": 1}, counted_in="Iceberg").lines
    shown = [str(line).lstrip() for line in lines]
    assert "\x1b" not in "".join(shown)
    assert [line.split(": answered")[0] for line in shown] == [r"\x1b[2Jevil", "[/bold]", "(no tenant)"]
    out = io.StringIO()
    console = Console(file=out, width=200, color_system=None)
    for line in lines:  # as run_demo prints them
        console.print(str(line), markup=False, highlight=False)
    assert "[/bold]: answered" in out.getvalue()


def test_an_empty_tenant_is_not_shown_as_no_tenant() -> None:
    line = TenantReconciliation("", Tally(1, 1), Tally(1, 1), 1, counted_in="Iceberg")
    assert str(line).startswith(" " * 12 + ": answered")


def test_event_meter_lines_compare_ingested_events_and_units_with_the_lake_and_amberflo() -> None:
    ingested = {"acme": Tally(12, 3400), "globex": Tally(4, 90)}
    counted = {"acme": Tally(12, 3400), "globex": Tally(4, 89)}
    result = reconcile_run(
        dict[str | None, Tally](ingested),
        dict[str | None, Tally](counted),
        {"acme": 3400, "globex": 90},
        counted_in="Iceberg",
        meter="llm-tokens",
    )
    assert [str(line) for line in result.lines] == [
        "        acme llm-tokens: ingested    12 events    3400 units == counted in Iceberg    12 /    3400 == units "
        "in Amberflo    3400  OK",
        "      globex llm-tokens: ingested     4 events      90 units != counted in Iceberg     4 /      89 == units "
        "in Amberflo      90  MISMATCH",
    ]
    assert result.differences == ["globex llm-tokens: ingested 90 units, in Iceberg 89"]


def test_event_usage_tallies_sum_the_sql_files_buckets_per_customer() -> None:
    columns = ["customer_id", "bucket_epoch_s", "sum_value", "event_count", "min_value", "max_value", "unique_count"]
    rows = [("acme", 0, 10.0, 2, 4.0, 6.0, 1), ("acme", 86400, 5.0, 1, 5.0, 5.0, 1), ("globex", 0, 1.0, 1, 1, 1, 0)]
    assert event_usage_tallies(columns, rows) == {"acme": Tally(3, 15), "globex": Tally(1, 1)}
    assert event_usage_tallies([], []) == {}

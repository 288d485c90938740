"""The ``amberflo`` config section: defaults, validation, and that it stays importable without the heavy stack."""

from __future__ import annotations

import subprocess
import sys

import msgspec
import pytest

from meterlake.amberflo.settings import AmberfloSettings


def test_defaults_point_at_amberflo_and_retry_past_its_advised_20_seconds() -> None:
    settings = AmberfloSettings()
    assert settings.ingest_url == "https://app.amberflo.io/ingest"
    assert settings.give_up_after_s > 20
    assert settings.api_key_secret_name == "AmberfloApiKey"
    assert AmberfloSettings(base_url="http://127.0.0.1:9/api/").ingest_url == "http://127.0.0.1:9/api/ingest"


def test_backoff_bounds_must_be_ordered() -> None:
    with pytest.raises(msgspec.ValidationError, match=r"max_backoff_s 1\.0 is below min_backoff_s 2\.0"):
        msgspec.convert({"min_backoff_s": 2.0, "max_backoff_s": 1.0}, type=AmberfloSettings)


def test_forwarder_imports_no_arrow_duckdb_or_iceberg() -> None:
    """The AWS forwarder Lambda ships without pyarrow, DuckDB, sqlglot and pyiceberg: nothing it imports needs them."""
    heavy = ("pyarrow", "duckdb", "sqlglot", "pyiceberg")
    code = (
        "import sys, meterlake.amberflo.forwarder, meterlake.aws.forwarding; "
        f"print(','.join(m for m in {heavy!r} if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""

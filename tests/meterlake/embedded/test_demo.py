"""`make demo` end to end (a small run): API traffic and custom usage both reconcile, per tenant and meter."""

from __future__ import annotations

import io
from pathlib import Path

from rich.console import Console

from meterlake.config import Config
from meterlake.embedded.demo import DEMO_TENANTS, run_demo
from meterlake.lake.home import DataDir


def test_the_demo_reconciles_api_calls_and_llm_tokens_per_tenant(tmp_path: Path) -> None:
    output = io.StringIO()
    console = Console(file=output, width=200, color_system=None)
    assert run_demo(config=Config(), data_dir=DataDir(tmp_path), requests=120, concurrency=8, console=console)
    lines = output.getvalue().splitlines()
    for tenant, _ in DEMO_TENANTS:
        [tokens] = [line for line in lines if line.strip().startswith(f"{tenant} llm-tokens:")]
        assert "ingested    40 events" in tokens
        assert tokens.count("==") == 2
        assert tokens.endswith("OK")
    assert not any("MISMATCH" in line for line in lines)

"""The Python API (meterlake/api.py): README.md's example, run as written, and what the package import costs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def readme_api_example() -> str:
    """The ``python`` block of README.md's "Python API" section."""
    section = PROJECT_ROOT.joinpath("README.md").read_text(encoding="utf-8").split("\n### Python API\n", 1)[1]
    match = re.search(r"^```python\n(.*?)^```$", section, flags=re.DOTALL | re.MULTILINE)
    assert match is not None, "README.md's Python API section has no python block"
    return match.group(1)


def _python(code: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return _python_file("-c", code, cwd=cwd, timeout=timeout)


def _python_file(*args: str | Path, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``python *args`` in ``cwd`` with a data dir of its own."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "METERLAKE_HOME": str(cwd / "home"), "HOME": str(cwd)}
    return subprocess.run(
        [sys.executable, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_the_readme_example_runs_as_written(tmp_path: Path) -> None:
    # Saved as a file and run, as a user runs it: the delivery process imports the main module (see README).
    example = tmp_path / "example.py"
    example.write_text(readme_api_example(), encoding="utf-8")
    result = _python_file(example, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    # The one request acme made is in the day's usage, committed when the block was left.
    acme = [line for line in lines if "'tenant_id': 'acme'" in line]
    assert len(acme) == 1, result.stdout
    assert "'requests': 1," in acme[0]
    assert "'billable_requests': 1," in acme[0]
    # No Amberflo key: nothing is sent (the stack staged the records already on its way out).
    assert re.fullmatch(r"\d+ records staged, 0 sent", lines[-1]), result.stdout


def test_importing_the_package_loads_nothing_until_the_api_is_used(tmp_path: Path) -> None:
    # The Lambda bundles carry meterlake's modules without the local pipeline's dependencies: the import must not
    # reach for them.
    code = (
        "import sys, meterlake\n"
        "print(sorted(m for m in sys.modules if m.startswith('meterlake') or m in ('pyiceberg', 'duckdb', 'httpx')))\n"
        "meterlake.query_usage\n"
        "print('meterlake.api' in sys.modules)\n"
    )
    result = _python(code, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["['meterlake']", "True"]


def test_an_unknown_name_is_an_attribute_error(tmp_path: Path) -> None:
    import meterlake

    with pytest.raises(AttributeError, match="no attribute 'query_usge'"):
        meterlake.query_usge  # noqa: B018


def test_forward_sends_both_outboxes_as_forward_run_does(tmp_path: Path) -> None:
    # meterlake.forward() is `meterlake forward run`: the access-log meters' records AND the metering service's events.
    import json
    import time

    import httpx

    import meterlake
    from meterlake.amberflo.server import LocalAmberflo
    from meterlake.config import Config
    from meterlake.lake.home import DataDir
    from meterlake.service.local import LocalMeteringService
    from tests.meterlake.amberflo.conftest import API_KEY, quick_settings
    from tests.meterlake.amberflo.lake import commit_events, make_events, metering_table

    with LocalAmberflo(api_key=API_KEY) as server:
        config_file = tmp_path / "cdk.context.json"
        config_file.write_text(json.dumps({"amberflo": {"base_url": server.url}}))
        home = tmp_path / "data"
        commit_events(metering_table(home), make_events(0, 5), offset=1)
        meter = {"label": "LLM tokens", "meterApiName": "llm-tokens", "meterType": "sum_of_all_usage"}
        record = {"customerId": "acme", "meterApiName": "llm-tokens", "meterValue": 7, "uniqueId": "e7"}
        with LocalMeteringService(
            config=Config(), data_dir=DataDir(home), port=0, amberflo=quick_settings(server)
        ) as s:
            _, admin = s.keys.create(role="admin")
            with httpx.Client(base_url=s.url, headers={"X-API-KEY": admin}) as client:
                assert client.post("/meters", json=meter).status_code == 200
                record["meterTimeInMillis"] = int(time.time() * 1000)
                assert client.post("/ingest", json=[record]).status_code == 200
            s.settle()  # committed and staged; not sent (the service was given no key)
        result = meterlake.forward(api_key=API_KEY, home=home, config=config_file)
        assert result.staged_records > 0
        assert result.drain.sent_records == result.staged_records
        assert result.event_staged_records == 0  # the service staged its event when it stopped
        assert result.event_drain.sent_records == 1
        assert "e7" in server.accepted_unique_ids()


def test_importing_meterlake_chooses_the_system_allocator_for_arrow(tmp_path: Path) -> None:
    # mimalloc kept each flush's freed buffers (ingest bench: 482 MB peak instead of 421 MB); a user's choice wins.
    code = "import meterlake, pyarrow; print(pyarrow.default_memory_pool().backend_name)"
    assert _python(code, tmp_path).stdout.strip() == "system"
    env = {"PATH": os.environ.get("PATH", ""), "ARROW_DEFAULT_MEMORY_POOL": "mimalloc"}
    chosen = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert chosen.stdout.strip() == "mimalloc", chosen.stderr

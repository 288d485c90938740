"""The data dir is private to its user: everything a run writes there (spool, Parquet, metadata, catalog, outbox,
errors, keys) is readable by no one else."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from meterlake.lake.home import DataDir, DataDirError
from tests.meterlake.cli_process import meterlake


def modes(root: Path) -> dict[str, int]:
    """Permission bits of ``root`` and of everything under it, by path relative to ``root``."""
    found = {".": stat.S_IMODE(root.stat().st_mode)}
    for path in root.rglob("*"):
        found[str(path.relative_to(root))] = stat.S_IMODE(path.lstat().st_mode)
    return found


@pytest.mark.slow
def test_everything_a_demo_run_writes_is_private(tmp_path: Path) -> None:
    # The bad line puts a record in the error folder, so that is checked too.
    (tmp_path / "bad.txt").write_text("not an access-log line\n")
    for args in (["demo", "--requests", "60", "--concurrency", "4"], ["ingest", "bad.txt"]):
        result = meterlake(*args, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
    found = modes(tmp_path / "home")
    kinds = {Path(p).suffix for p in found}
    assert {".parquet", ".json", ".avro", ".seg", ".db", ".pem"} <= kinds, kinds
    assert any(p.startswith("errors/") and (tmp_path / "home" / p).is_file() for p in found), sorted(found)
    dirs = {p: m for p, m in found.items() if (tmp_path / "home" / p).is_dir()}
    files = {p: m for p, m in found.items() if p not in dirs}
    assert {p: m for p, m in dirs.items() if m != 0o700} == {}
    assert {p: m for p, m in files.items() if m != 0o600} == {}


def test_ensure_makes_an_existing_data_dir_private(tmp_path: Path) -> None:
    root = tmp_path / "home"
    for sub in ("warehouse", "spool", "errors", "keys"):
        (root / sub).mkdir(parents=True, mode=0o755)
        (root / sub).chmod(0o755)
    root.chmod(0o755)
    data = DataDir.resolve(root).ensure()
    assert {p: oct(m) for p, m in modes(data.root).items()} == {
        p: oct(0o700) for p in (".", "warehouse", "spool", "errors", "keys")
    }


def test_ensure_refuses_a_data_dir_that_is_a_file(tmp_path: Path) -> None:
    root = tmp_path / "home"
    root.write_text("")
    with pytest.raises(DataDirError, match=rf"data dir {root} is not a directory"):
        DataDir.resolve(root).ensure()

"""Two synths of the same commit give byte-identical Lambda assets (issue 13): same files, bytes, modes and times.

The session's synth (tests/cdk_stacks/conftest.py) is compared with a second one made here under another umask, as
another user or a CI runner would make it. CDK zips an asset directory with each file's mode and time, so those must
match as well as the bytes; and no file may name the synthesizing machine's paths (a pip script's shebang did).
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest

from cdk_stacks.app import MeterlakeStacks, build_app
from cdk_stacks.bundling import PROJECT_ROOT
from meterlake.config import Config

pytestmark = pytest.mark.slow

Entry = tuple[str, int, float, bytes]


def _tree(root: Path) -> list[Entry]:
    """Every file and directory under ``root``: relative path, mode, mtime and (for a file) its bytes."""
    entries: list[Entry] = []
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        data = path.read_bytes() if stat.S_ISREG(info.st_mode) else b""
        entries.append((path.relative_to(root).as_posix(), stat.S_IMODE(info.st_mode), info.st_mtime, data))
    return entries


def _lambda_assets(outdir: Path) -> list[Path]:
    return sorted(path for path in outdir.glob("asset.*") if path.is_dir())


def test_two_synths_build_identical_lambda_assets(
    stacks: MeterlakeStacks, cdk_outdir: Path, test_config: Config, tmp_path: Path
) -> None:
    first = _lambda_assets(cdk_outdir)
    assert len(first) >= 3, first  # transform, forwarder, stager (and the demo API's)
    second_outdir = tmp_path / "cdk.out"
    previous = os.umask(0o077)  # a stricter user than the session's synth
    try:
        build_app(test_config, outdir=str(second_outdir)).app.synth()
    finally:
        os.umask(previous)
    second = _lambda_assets(second_outdir)
    assert [path.name for path in second] == [path.name for path in first]
    machine_paths = [str(PROJECT_ROOT).encode(), sys.prefix.encode(), str(cdk_outdir).encode()]
    for one, other in zip(first, second, strict=True):
        tree = _tree(one)
        assert tree, one
        differing = [a[0] for a, b in zip(tree, _tree(other), strict=True) if a != b]
        assert not differing, f"{one.name}: {differing[:10]}"
        assert len(tree) == len(_tree(other))
        naming = [entry[0] for entry in tree if any(path in entry[3] for path in machine_paths)]
        assert not naming, f"{one.name}: files naming this machine's paths: {naming[:10]}"

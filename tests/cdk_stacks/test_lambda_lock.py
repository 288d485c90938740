"""The Lambda assets' lock files: hashed, resolved for both architectures, and within pyproject.toml's ranges.

The synthesized app installs each lock with ``--require-hashes`` (so pip has checked that every dependency is locked);
these tests check what pip cannot: that the lock has not drifted from what the project declares.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from cdk_stacks.bundling import (
    LAMBDA_ARCHITECTURES,
    LOCK_TARGET_COMMENT,
    PythonBundle,
    PythonTarget,
    canonical_name,
    project_dependencies,
)
from cdk_stacks.lambda_lock import (
    LOCKED_BUNDLES,
    LockedWheel,
    LockError,
    merge,
    read_lock,
    render_lock,
    runtime_constraints,
)
from cdk_stacks.shared import LAMBDA_PYTHON_VERSION

ARM = PythonTarget.for_lambda(architecture="arm64", python_version="3.13", glibc_2_28=True)
X86 = PythonTarget.for_lambda(architecture="x86_64", python_version="3.13", glibc_2_28=True)


def _lambda_targets(glibc_2_28: bool) -> list[PythonTarget]:
    return [
        PythonTarget.for_lambda(architecture=architecture, python_version=LAMBDA_PYTHON_VERSION, glibc_2_28=glibc_2_28)
        for architecture in LAMBDA_ARCHITECTURES
    ]


def _locked(make_bundle: Callable[[PythonTarget], PythonBundle], glibc_2_28: bool) -> tuple[PythonBundle, Path]:
    bundle = make_bundle(_lambda_targets(glibc_2_28)[0])
    assert bundle.lock is not None, f"{make_bundle.__name__} installs no lock"
    return bundle, bundle.lock


@pytest.mark.parametrize(
    ("make_bundle", "glibc_2_28"), LOCKED_BUNDLES, ids=lambda value: getattr(value, "__name__", "")
)
def test_lock_pins_the_bundles_requirements_within_pyprojects_ranges(
    make_bundle: Callable[[PythonTarget], PythonBundle], glibc_2_28: bool
) -> None:
    """Every requirement of the bundle is locked within its range, and so is every locked package pyproject.toml
    declares (a dependency of a dependency too): editing a range without `make lock-lambdas` fails here."""
    bundle, lock = _locked(make_bundle, glibc_2_28)
    pins = read_lock(lock)
    for requirement in map(Requirement, bundle.requirements):
        name = canonical_name(requirement.name)
        assert name in pins, f"{lock.name} does not lock {name}: run `make lock-lambdas`"
        assert requirement.specifier.contains(Version(pins[name]), prereleases=True), (
            f"{lock.name} locks {name}=={pins[name]}, outside {requirement}: run `make lock-lambdas`"
        )
    declared = {name: Requirement(specifier) for name, specifier in project_dependencies().items()}
    outside = [
        f"{name}=={version} (pyproject.toml: {declared[name]})"
        for name, version in pins.items()
        if name in declared and not declared[name].specifier.contains(Version(version), prereleases=True)
    ]
    assert not outside, f"{lock.name} locks outside pyproject.toml's ranges: {outside}; run `make lock-lambdas`"


@pytest.mark.parametrize(
    ("make_bundle", "glibc_2_28"), LOCKED_BUNDLES, ids=lambda value: getattr(value, "__name__", "")
)
def test_lock_hashes_every_pin_for_both_architectures(
    make_bundle: Callable[[PythonTarget], PythonBundle], glibc_2_28: bool
) -> None:
    _, lock = _locked(make_bundle, glibc_2_28)
    lines = lock.read_text(encoding="utf-8").replace("\\\n", " ").splitlines()
    for target in _lambda_targets(glibc_2_28):
        assert f"{LOCK_TARGET_COMMENT}{target.describe()}" in lines
    pins = [line.split() for line in lines if line and not line.startswith("#")]
    assert len(pins) == len(read_lock(lock))
    for name_version, *options in pins:
        assert "==" in name_version
        assert options, f"{name_version} has no hash"
        assert all(option.startswith("--hash=sha256:") for option in options), name_version


def test_a_lock_holds_each_architectures_wheel_hash_and_reads_back(tmp_path: Path) -> None:
    wheels = merge(
        {
            ARM: {"msgspec": ("0.22.0", "aa"), "jmespath": ("1.1.0", "cc")},
            X86: {"msgspec": ("0.22.0", "bb"), "jmespath": ("1.1.0", "cc")},
        }
    )
    assert wheels == [LockedWheel("jmespath", "1.1.0", ("cc",)), LockedWheel("msgspec", "0.22.0", ("aa", "bb"))]
    lock = tmp_path / "lock.txt"
    lock.write_text(render_lock(title="Test", requirements=("msgspec<1",), targets=(ARM, X86), wheels=wheels))
    assert read_lock(lock) == {"jmespath": "1.1.0", "msgspec": "0.22.0"}
    assert "msgspec==0.22.0 \\\n    --hash=sha256:aa \\\n    --hash=sha256:bb\n" in lock.read_text()


def test_architectures_that_resolve_differently_are_refused() -> None:
    with pytest.raises(LockError, match=r"pyarrow: 26\.0\.1 for cp3\.13 manylinux2014_aarch64 .*, 25\.0\.0 for"):
        merge({ARM: {"pyarrow": ("26.0.1", "a")}, X86: {"pyarrow": ("25.0.0", "b")}})
    with pytest.raises(LockError, match="tzdata: absent for"):
        merge({ARM: {}, X86: {"tzdata": ("2026.6", "c")}})


@pytest.mark.parametrize(
    ("make_bundle", "glibc_2_28"), LOCKED_BUNDLES, ids=lambda value: getattr(value, "__name__", "")
)
def test_packages_the_runtimes_aws_sdk_shares_are_locked_where_botocore_accepts_them(
    make_bundle: Callable[[PythonTarget], PythonBundle], glibc_2_28: bool
) -> None:
    """A bundle comes first on the Lambda runtime's path: a python-dateutil or urllib3 it ships is the one the
    runtime's botocore imports, so it must be within botocore's own requirements (python-dateutil 4 was locked)."""
    _, lock = _locked(make_bundle, glibc_2_28)
    pins = read_lock(lock)
    shared = [Requirement(spec) for spec in runtime_constraints()]
    assert {canonical_name(r.name) for r in shared} >= {"python-dateutil", "urllib3", "jmespath"}
    outside = [
        f"{r.name}=={pins[canonical_name(r.name)]} ({r})"
        for r in shared
        if canonical_name(r.name) in pins and not r.specifier.contains(Version(pins[canonical_name(r.name)]))
    ]
    assert not outside, f"{lock.name}: {outside}; run `make lock-lambdas`"

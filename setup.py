"""Build hook: the wheel carries the repository's root-level files the installed package reads.

pyproject.toml declares the project; this adds what its declarative form cannot: ``sql/`` (every query, with its
subfolders) shipped as ``meterlake/sql`` and ``cdk.json`` as ``cdk_stacks/cdk.json``, so an installed ``meterlake``
knows its queries and an installed CDK app its feature flags, while the checkout keeps them at the root.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
#: (file or directory at the repository root, where it goes inside the built packages).
SHIPPED = (("sql", "meterlake/sql"), ("cdk.json", "cdk_stacks/cdk.json"))


class BuildPyWithRootData(build_py):
    """``build_py`` that also copies :data:`SHIPPED` into the build directory (and so into the wheel)."""

    def run(self) -> None:
        """Build the packages, then copy the root-level data beside them."""
        super().run()
        build_lib = Path(self.build_lib)
        for source, target in SHIPPED:
            origin, destination = ROOT / source, build_lib / target
            if origin.is_dir():
                for path in sorted(origin.rglob("*.sql")):
                    copied = destination / path.relative_to(origin)
                    copied.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(path, copied)
            else:
                destination.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(origin, destination)


setup(cmdclass={"build_py": BuildPyWithRootData})

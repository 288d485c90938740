"""meterlake: API traffic into billable, per-tenant usage (local pipeline, AWS CDK app, forwarding to Amberflo)."""

from __future__ import annotations

import importlib.metadata

#: The installed distribution's version: pyproject.toml's ``[project].version`` is its one definition.
__version__ = importlib.metadata.version("meterlake")

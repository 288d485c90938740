"""meterlake: API traffic into billable, per-tenant usage (local pipeline, AWS CDK app, forwarding to Amberflo).

The Python API (:mod:`meterlake.api`) is re-exported here and loaded on first use: ``meterlake.query_usage``,
``meterlake.run_local_stack``, ``meterlake.forward``. Importing the package itself imports nothing else (it only
chooses Arrow's allocator, below), so the Lambda bundles, which carry these modules without the local pipeline's
dependencies, still import it.

The version is pyproject.toml's ``[project].version``, read from the installed distribution where it is needed
(``meterlake --version``): the Lambda bundles carry these modules without any distribution metadata.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

# Arrow's default allocator (mimalloc) keeps what each flush's decode and Parquet write freed, so a long-running
# stream's RSS grows with its largest buffers; the system allocator gives it back (ingest bench, 500k lines: peak 421 MB
# instead of 482 MB at the same rate). Arrow reads this once, when pyarrow is first imported; a user's own setting wins.
os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")

if TYPE_CHECKING:
    from meterlake.api import ForwardResult, RunningStack, forward, query_usage, run_local_stack

__all__ = ["ForwardResult", "RunningStack", "forward", "query_usage", "run_local_stack"]


def __getattr__(name: str) -> Any:
    """Load the API's names on first use (PEP 562)."""
    if name in __all__:
        from meterlake import api

        return getattr(api, name)
    raise AttributeError(f"module 'meterlake' has no attribute {name!r}")

"""What the Amberflo tests share: a local Amberflo per test and forwarder settings that retry in milliseconds."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from meterlake.amberflo.server import LocalAmberflo
from meterlake.amberflo.settings import AmberfloSettings

#: The key the local Amberflo of these tests accepts.
API_KEY = "local-api-key"


@pytest.fixture
def server() -> Iterator[LocalAmberflo]:
    """A fresh local Amberflo that accepts :data:`API_KEY`."""
    with LocalAmberflo(api_key=API_KEY) as amberflo:
        yield amberflo


def quick_settings(server: LocalAmberflo, **overrides: Any) -> AmberfloSettings:
    """Settings pointing at ``server``: backoff in tens of milliseconds, short timeouts, a 20 s retry budget."""
    values: dict[str, Any] = {
        "base_url": server.url,
        "concurrency": 4,
        "min_backoff_s": 0.01,
        "max_backoff_s": 0.05,
        "connect_timeout_s": 2.0,
        "read_timeout_s": 0.3,
        "give_up_after_s": 20.0,
    }
    values.update(overrides)
    return AmberfloSettings(**values)

"""How the forwarder reaches Amberflo: the ``amberflo`` section of the config.

Kept apart from ``meterlake.meters`` (which needs pyarrow, DuckDB and sqlglot) so that the forwarder, and the AWS
forwarder Lambda that runs it, import nothing heavier than msgspec for their settings.
"""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta

from meterlake.structs import ConfigSection


class AmberfloSettings(ConfigSection, frozen=True):
    """How the forwarder reaches Amberflo: endpoint, key, batching, concurrency, timeouts and retry budget.

    Transient failures (429, 5xx, network errors, timeouts) are retried with full-jitter exponential backoff for
    ``give_up_after_s``; after that the batch stays pending for the next drain, never dead-lettered.
    """

    #: Amberflo's API root; records go to ``<base_url>/ingest``.
    base_url: Annotated[str, Meta(pattern=r"^https?://[^\s/]+(/[^\s]*)?$")] = "https://app.amberflo.io"
    #: The environment variable holding the API key; unset means dry run (records are staged, nothing is sent).
    api_key_env: Annotated[str, Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")] = "AMBERFLO_API_KEY"
    #: Records per request; every official client sends at most 100.
    batch_size: Annotated[int, Meta(ge=1, le=100)] = 100
    #: Requests in flight at once.
    concurrency: Annotated[int, Meta(ge=1, le=32)] = 8
    connect_timeout_s: Annotated[float, Meta(gt=0, le=60)] = 5.0
    read_timeout_s: Annotated[float, Meta(gt=0, le=300)] = 30.0
    #: First backoff ceiling; each retry doubles it up to ``max_backoff_s`` (the wait is uniform below it).
    min_backoff_s: Annotated[float, Meta(gt=0, le=60)] = 0.5
    max_backoff_s: Annotated[float, Meta(gt=0, le=600)] = 30.0
    #: How long one batch's transient failures are retried before it is left pending for the next drain.
    give_up_after_s: Annotated[float, Meta(gt=0, le=86_400)] = 600.0
    #: Stage records but never send them, even with an API key.
    dry_run: bool = False
    #: How often the forwarding worker stages and drains when no commit wakes it.
    poll_interval_s: Annotated[float, Meta(gt=0, le=3600)] = 5.0
    #: While Amberflo refuses the API key (401/403) forwarding pauses and tries again after ``poll_interval_s``,
    #: doubling the wait up to this.
    key_refused_retry_max_s: Annotated[float, Meta(gt=0, le=86_400)] = 300.0
    #: On AWS: the Secrets Manager secret holding the API key (the Amberflo SaaS Builder Toolkit plug-in's default)
    #: and the key of the secret's JSON that holds it.
    api_key_secret_name: Annotated[str, Meta(pattern=r"^[A-Za-z0-9/_+=.@-]{1,512}$")] = "AmberfloApiKey"  # noqa: S105 (a secret name, not a secret)
    api_key_secret_json_key: Annotated[str, Meta(min_length=1)] = "apiKey"  # noqa: S105 (a JSON key name)

    def __post_init__(self) -> None:
        if self.max_backoff_s < self.min_backoff_s:
            raise ValueError(f"max_backoff_s {self.max_backoff_s} is below min_backoff_s {self.min_backoff_s}")

    @property
    def ingest_url(self) -> str:
        """The ingest endpoint."""
        return self.base_url.rstrip("/") + "/ingest"

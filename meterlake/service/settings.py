"""The metering service's settings: the ``meterlake.service`` section of the config.

Kept apart from the service's code so that ``meterlake.config`` can hold it without importing the service.
"""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta

from meterlake.structs import ConfigSection

#: Amberflo keeps uniqueIds of up to 128 characters; the service refuses longer ones rather than change them.
UNIQUE_ID_MAX_CHARS = 128


class ServiceSettings(ConfigSection, frozen=True):
    """Where ``meterlake serve`` listens, what an ingested record may be, and who may call it.

    A record's ``meterTimeInMillis`` must lie within ``late_arrival_window_s`` before now (older usage is a backfill,
    accepted inside the window) and at most ``future_skew_s`` after it.
    """

    host: str = "127.0.0.1"
    port: Annotated[int, Meta(ge=0, le=65535)] = 8852
    late_arrival_window_s: Annotated[int, Meta(ge=0, le=400 * 86400)] = 35 * 86400
    future_skew_s: Annotated[int, Meta(ge=0, le=86400)] = 300
    max_records_per_request: Annotated[int, Meta(ge=1, le=100_000)] = 10_000
    #: API Gateway's payload limit, which the AWS adapter will sit behind.
    max_body_bytes: Annotated[int, Meta(ge=1024, le=10 * 1024 * 1024)] = 10 * 1024 * 1024
    max_customer_id_chars: Annotated[int, Meta(ge=1, le=1024)] = 256
    max_dimensions: Annotated[int, Meta(ge=0, le=256)] = 32
    max_dimension_name_chars: Annotated[int, Meta(ge=1, le=1024)] = 128
    max_dimension_value_chars: Annotated[int, Meta(ge=1, le=65536)] = 1024
    #: The Cognito group whose members' tokens may manage meters and cancellation rules.
    admin_group: Annotated[str, Meta(pattern=r"^[\w+=,.@-]{1,128}$")] = "meterlake-admins"
    #: The meter-event delivery stream's buffering: flush after this many seconds or MB, whichever comes first.
    buffer_interval_s: Annotated[int, Meta(ge=0, le=900)] = 10
    buffer_size_mb: Annotated[int, Meta(ge=1, le=128)] = 32

    def __post_init__(self) -> None:
        if self.host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(f"host {self.host!r}: the local metering service only listens on loopback")

"""The service's local adapter: the meter-event delivery stream in the data dir (the Firehose stand-in).

On AWS (a later issue) a Firehose stream takes this stream's place; the rows and their table are the same.
"""

from __future__ import annotations

from collections.abc import Callable

from pyiceberg.catalog import Catalog
from pyiceberg.table import Table

from meterlake.config import Config
from meterlake.lake.catalog import ensure_meter_events_table
from meterlake.lake.home import DataDir
from meterlake.local.stream import DeliveryStream, StreamTarget
from meterlake.schema import METER_EVENT_KEY_COLUMNS, METER_EVENTS_TABLE
from meterlake.service.events import make_passthrough_handler

#: The meter-event stream's name (its commits' snapshot summaries and error files carry it).
METER_EVENT_STREAM = "meterlake-meter-events"
#: Its spool directory under the data dir, beside the access-log stream's ``spool``.
METER_EVENT_SPOOL_DIR = "spool-meter-events"


def meter_event_target(config: Config, data_dir: DataDir) -> StreamTarget:
    """Where the meter-event stream spools and delivers: the meter_events table, deduplicated on (meter, uniqueId)."""
    settings = config.meterlake.service

    def ensure(catalog: Catalog) -> Table:
        return ensure_meter_events_table(catalog, config)

    return StreamTarget(
        name=METER_EVENT_STREAM,
        spool_dir=data_dir.root / METER_EVENT_SPOOL_DIR,
        destination=(config.database_name, METER_EVENTS_TABLE),
        ensure_table=ensure,
        key_columns=METER_EVENT_KEY_COLUMNS,
        size_in_mbs=settings.buffer_size_mb,
        interval_in_seconds=settings.buffer_interval_s,
    )


def open_meter_event_stream(
    config: Config,
    data_dir: DataDir,
    *,
    on_commit: Callable[[int], None] | None = None,
    recover: bool = False,
) -> DeliveryStream:
    """Open the meter-event delivery stream (resuming what a previous run acknowledged); call ``start`` to flush on
    its buffering hints.

    Raises:
        StreamError: its spool is in use by another process, damaged or unusable (see DeliveryStream).
    """
    return DeliveryStream(
        config=config,
        data_dir=data_dir,
        handler=make_passthrough_handler(config.database_name, METER_EVENTS_TABLE),
        on_commit=on_commit,
        recover=recover,
        target=meter_event_target(config, data_dir),
    )

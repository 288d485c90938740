"""A forwarder process for the crash test: stage the data dir's committed snapshots, then drain to Amberflo.

``python -m tests.meterlake.amberflo.forward_process HOME AMBERFLO_URL`` with the key in ``$AMBERFLO_API_KEY``.
The test kills it with SIGKILL mid-drain and runs it again.
"""

from __future__ import annotations

import os
import sys

from meterlake.amberflo.forwarder import Forwarder
from meterlake.amberflo.outbox import Outbox
from meterlake.amberflo.settings import AmberfloSettings
from meterlake.lake.home import DataDir
from tests.meterlake.amberflo.lake import metering_table


def main(argv: list[str]) -> int:
    """Stage and drain once; print what was staged and sent."""
    home, url = argv
    settings = AmberfloSettings(
        base_url=url, concurrency=4, min_backoff_s=0.01, max_backoff_s=0.1, connect_timeout_s=2, read_timeout_s=0.5
    )
    with Outbox.in_data_dir(DataDir.resolve(home), settings=settings) as outbox, Forwarder(settings) as forwarder:
        print(f"staged {outbox.stage_committed(metering_table(DataDir.resolve(home).root))}", flush=True)
        report = outbox.drain(forwarder, api_key=os.environ[settings.api_key_env])
        print(f"sent {report.sent_records} records, {report.pending_batches} batches pending", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

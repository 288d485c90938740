#!/usr/bin/env python3
"""CDK app entry point. The stacks arrive with the CDK issue; today it validates cdk.context.json, the one config."""

from __future__ import annotations

import sys

from meterlake.config import ConfigError, load_config


def main() -> int:
    """Load and validate the config; exit non-zero with one line naming the bad key."""
    try:
        config = load_config()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"config ok: delivery stream {config.data_firehose_configuration.delivery_stream_name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

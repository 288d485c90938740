#!/usr/bin/env python3
"""CDK app entry point: load the one config, build meterlake's stacks (checked by cdk-nag), synthesize to cdk.out.

A bad config value fails synthesis with one message naming its key and a non-zero exit; so does a Lambda asset
that cannot be bundled (pip cannot reach the package index, a lock that does not match).
"""

from __future__ import annotations

import os
import sys

from meterlake.config import ConfigError, load_config


def main() -> int:
    """Synthesize every stack; exit 1 with one ``error:`` line naming the key if the config is invalid."""
    try:
        config = load_config()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    note = config.data_firehose_configuration.transform_records_with_aws_lambda.buffer_size_note
    if note is not None:
        print(f"note: {note}", file=sys.stderr)
    # Imported after the config check: a bad value should fail fast, before jsii starts node.
    from cdk_stacks.app import build_app
    from cdk_stacks.bundling import BUNDLING_FAILURES

    # The cdk CLI tells the app where to write; run directly, it writes ./cdk.out.
    try:
        build_app(config, outdir=os.environ.get("CDK_OUTDIR", "cdk.out")).app.synth()
    except Exception:
        if not BUNDLING_FAILURES:
            raise
        # A Lambda asset could not be built (e.g. no package index): its cause, not jsii's 60-line trace.
        print(f"error: {BUNDLING_FAILURES[-1]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Every Lambda asset of the app, for both architectures, stays well inside Lambda's unzipped package limit.

A deploy that exceeds the limit fails in CloudFormation, after everything before it deployed; nothing else offline
measures an asset. The configured architecture's assets are the session's synthesized ones; the other architecture
(x86_64 wheels are the bigger) is synthesized once more, from the same config with only the architecture changed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

import pytest
from aws_cdk.assertions import Template
from msgspec.structs import replace

from cdk_stacks.app import MeterlakeStacks, build_app
from cdk_stacks.bundling import LAMBDA_ARCHITECTURES
from cdk_stacks.forwarding import FORWARDER_HANDLER, STAGER_HANDLER
from cdk_stacks.transform import TRANSFORM_HANDLER
from meterlake.aws.stacks import STACK_NAMES
from meterlake.config import Config

#: Lambda's limit on a function's deployment package, unzipped: its code plus its layers.
LAMBDA_UNZIPPED_LIMIT_BYTES: Final = 262_144_000
#: Each function may use this share of the limit. One routine upgrade can add tens of MB (one pyarrow major grew
#: its x86_64 wheel by ~10 MB; DuckDB alone was ~70 MB), so the gate fails in review, with room left to react,
#: rather than the deploy failing at the limit.
ASSET_BUDGET_SHARE: Final = 0.75
ASSET_BUDGET_BYTES: Final = int(LAMBDA_UNZIPPED_LIMIT_BYTES * ASSET_BUDGET_SHARE)
#: The functions whose assets the bundler builds: the gate must have measured at least these.
BUNDLED_HANDLERS: Final = frozenset({TRANSFORM_HANDLER, STAGER_HANDLER, FORWARDER_HANDLER})


def unzipped_bytes(directory: Path) -> int:
    """What Lambda counts: the sizes of the files the asset's zip holds."""
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())


def function_packages(templates: dict[str, Template], outdir: Path) -> dict[str, tuple[str, int]]:
    """Each Lambda function's (handler, unzipped bytes of its code and layers), by ``stack/logical id``."""
    packages: dict[str, tuple[str, int]] = {}
    for stack, template in templates.items():
        layers = template.find_resources("AWS::Lambda::LayerVersion")
        for logical_id, function in template.find_resources("AWS::Lambda::Function").items():
            properties: dict[str, Any] = function["Properties"]
            if "S3Key" not in properties["Code"]:
                continue  # inline code (ZipFile): no asset
            keys = [properties["Code"]["S3Key"]]
            keys += [layers[layer["Ref"]]["Properties"]["Content"]["S3Key"] for layer in properties.get("Layers", [])]
            size = sum(unzipped_bytes(outdir / f"asset.{key.removesuffix('.zip')}") for key in keys)
            packages[f"{stack}/{logical_id}"] = (str(properties.get("Handler")), size)
    return packages


@pytest.fixture(scope="session")
def packages_by_architecture(
    stacks: MeterlakeStacks,
    templates: dict[str, Template],
    test_config: Config,
    cdk_outdir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, dict[str, tuple[str, int]]]:
    """Every function's package size for each architecture: the session's app, and the same app for the other."""
    configured = test_config.meterlake.aws.lambda_architecture
    measured: dict[str, dict[str, tuple[str, int]]] = {configured: function_packages(templates, cdk_outdir)}
    for architecture in LAMBDA_ARCHITECTURES:
        if architecture == configured:
            continue
        aws = replace(test_config.meterlake.aws, lambda_architecture=architecture)
        config = replace(test_config, meterlake=replace(test_config.meterlake, aws=aws))
        outdir = tmp_path_factory.mktemp(f"cdk.out-{architecture}")
        assembly = build_app(config, outdir=str(outdir)).app.synth()
        other = {name: Template.from_json(assembly.get_stack_by_name(name).template) for name in STACK_NAMES}
        measured[architecture] = function_packages(other, outdir)
    return measured


@pytest.mark.parametrize("architecture", LAMBDA_ARCHITECTURES)
def test_every_lambda_package_stays_within_its_budget(
    packages_by_architecture: dict[str, dict[str, tuple[str, int]]], architecture: str
) -> None:
    packages = packages_by_architecture[architecture]
    assert {handler for handler, _ in packages.values()} >= BUNDLED_HANDLERS
    over = [
        f"{function} ({handler}, {architecture}): {size:,} bytes unzipped, {size / LAMBDA_UNZIPPED_LIMIT_BYTES:.1%} "
        f"of Lambda's {LAMBDA_UNZIPPED_LIMIT_BYTES:,}"
        for function, (handler, size) in sorted(packages.items())
        if size > ASSET_BUDGET_BYTES
    ]
    assert not over, f"over the budget of {ASSET_BUDGET_SHARE:.0%} ({ASSET_BUDGET_BYTES:,} bytes): " + "; ".join(over)

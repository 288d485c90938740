"""What an AWS account must hold before ``cdk deploy``, checked in seconds instead of found halfway through a deploy.

A deploy that lacks one of these fails late, with CloudFormation's words rather than ours: Lake Formation refuses the
Glue database, or the table grant, to a CDK execution role it does not trust; a bucket name kept by an earlier
deployment is taken; the Amberflo API key's secret is missing and the forwarder fails every invocation. Every check
here only reads.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final

from botocore.exceptions import ClientError  # type: ignore[import-untyped]

from meterlake.aws.account import Account
from meterlake.aws.stacks import CDK_QUALIFIER, DELIVERY_STACK, FORWARDING_STACK, S3_TABLES_CATALOG, STORAGE_STACK
from meterlake.config import Config, S3TablesDestination

#: The Lake Formation principal that stands for "IAM decides" in an account's default permissions.
IAM_ALLOWED_PRINCIPALS: Final = "IAM_ALLOWED_PRINCIPALS"
#: Below this many concurrent Lambda executions (new accounts may start at 10), the transform competes with the
#: forwarder's SQS subscription and Firehose's invocations are throttled.
MIN_LAMBDA_CONCURRENCY: Final = 100


class Outcome(enum.Enum):
    """How a check went: FAIL stops a deploy, WARN is worth reading."""

    OK = "ok"
    WARN = "warn"
    FAIL = "fail"


@dataclass(frozen=True, slots=True)
class Check:
    """One prerequisite: what was checked, how it went, and what to do about it."""

    name: str
    outcome: Outcome
    detail: str


def preflight(config: Config, account: Account) -> list[Check]:
    """Every check, in the order a deploy would hit them."""
    return list(_checks(config, account))


def _checks(config: Config, account: Account) -> Iterator[Check]:
    yield _bootstrap(account)
    yield _lake_formation(config, account)
    if not _iam_governed(account) or _s3_tables_under_lake_formation(config):
        yield _athena_access(config)
    if config.s3_tables is None:
        yield _database(config, account)
    else:
        yield _s3_tables_integration(config.s3_tables, account)
        if config.s3_tables.table_bucket_name is not None:
            yield _named_table_bucket(config.s3_tables.table_bucket_name, account)
    if config.data_firehose_configuration.s3_bucket is not None:
        yield _named_bucket(config.data_firehose_configuration.s3_bucket, account)
    yield _delivery_stream(config.data_firehose_configuration.delivery_stream_name, account)
    yield _amberflo_secret(config, account)
    yield _lambda_concurrency(config, account)


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _deployed_resource(account: Account, stack: str, physical_id: str) -> bool:
    """Whether ``physical_id`` belongs to the deployed stack (an update, not a clash)."""
    cloudformation = account.client("cloudformation")
    try:
        resources = cloudformation.describe_stack_resources(StackName=stack)["StackResources"]
    except ClientError as exc:
        if _error_code(exc) in ("ValidationError", "AccessDenied"):
            return False
        raise
    return any(resource.get("PhysicalResourceId") == physical_id for resource in resources)


def _bootstrap(account: Account) -> Check:
    name = "cdk bootstrap"
    try:
        version = account.client("ssm").get_parameter(Name=f"/cdk-bootstrap/{CDK_QUALIFIER}/version")
    except ClientError as exc:
        if _error_code(exc) != "ParameterNotFound":
            raise
        return Check(
            name,
            Outcome.FAIL,
            f"{account.account_id}/{account.region} is not bootstrapped for the CDK: "
            f"run `cdk bootstrap aws://{account.account_id}/{account.region}`",
        )
    return Check(name, Outcome.OK, f"bootstrap version {version['Parameter']['Value']} in {account.region}")


def _s3_tables_under_lake_formation(config: Config) -> bool:
    """Whether the table is in a table bucket whose catalog integration is governed by Lake Formation grants."""
    return config.s3_tables is not None and config.s3_tables.access_control == "lake_formation"


def _lake_formation(config: Config, account: Account) -> Check:
    """The CDK execution role creates the Glue database and table and grants Firehose, the stager and the
    optimizers their table permissions: Lake Formation lets it if it is a data lake administrator, or if the
    account still leaves new databases to IAM (the default until Lake Formation is set up). An S3 table under Lake
    Formation is another matter: S3 Tables, not the role, creates it in the ``s3tablescatalog`` catalog, so only a
    data lake administrator may grant on it, whatever the default catalog's settings."""
    name = "Lake Formation"
    settings = account.client("lakeformation").get_data_lake_settings()["DataLakeSettings"]
    role = account.cdk_execution_role
    admins = {admin.get("DataLakePrincipalIdentifier") for admin in settings.get("DataLakeAdmins", [])}
    if role in admins:
        return Check(name, Outcome.OK, f"the CDK execution role is a data lake administrator ({role})")
    if _s3_tables_under_lake_formation(config):
        return Check(
            name,
            Outcome.FAIL,
            f"s3_tables.access_control is 'lake_formation' and the CDK execution role {role} is not a data lake "
            "administrator: the table bucket's tables are created by S3 Tables in the s3tablescatalog catalog, so "
            "CloudFormation's grants to Firehose and the stager would be refused ('Resource does not exist or "
            "requester is not authorized to access requested permissions'). Add the role as an administrator "
            "(console: Lake Formation > Administrative roles and tasks; or `aws lakeformation put-data-lake-settings`, "
            "keeping the current admins)",
        )
    defaults = {
        entry.get("Principal", {}).get("DataLakePrincipalIdentifier")
        for entry in settings.get("CreateDatabaseDefaultPermissions", [])
    }
    if IAM_ALLOWED_PRINCIPALS in defaults:
        return Check(
            name,
            Outcome.OK,
            "new databases are governed by IAM (Lake Formation's default); the CDK execution role creates the "
            "database and table, so it may grant on them",
        )
    return Check(
        name,
        Outcome.FAIL,
        f"Lake Formation governs this account's catalog and the CDK execution role {role} is not a data lake "
        "administrator: CloudFormation would fail creating the Glue database ('Insufficient Lake Formation "
        "permission(s)') or granting the table. Add it as an administrator (console: Lake Formation > "
        "Administrative roles and tasks; or `aws lakeformation put-data-lake-settings`, keeping the current admins)",
    )


def _iam_governed(account: Account) -> bool:
    """Whether new databases are left to IAM (Lake Formation never set up): then IAM alone grants table access."""
    settings = account.client("lakeformation").get_data_lake_settings()["DataLakeSettings"]
    return IAM_ALLOWED_PRINCIPALS in {
        entry.get("Principal", {}).get("DataLakePrincipalIdentifier")
        for entry in settings.get("CreateDatabaseDefaultPermissions", [])
    }


def _athena_access(config: Config) -> Check:
    table = f"{config.database_name}.{config.table_name}"
    return Check(
        "Athena queries",
        Outcome.WARN,
        f"Lake Formation governs the catalog: grant SELECT and DESCRIBE on {table} to whoever runs `meterlake "
        "query --athena` (the stacks grant only Firehose, the stager and Glue's optimizers; a data lake "
        "administrator has no SELECT by default)",
    )


def _lambda_concurrency(config: Config, account: Account) -> Check:
    name = "Lambda concurrency"
    limit = account.client("lambda").get_account_settings()["AccountLimit"]["ConcurrentExecutions"]
    if limit >= MIN_LAMBDA_CONCURRENCY:
        return Check(name, Outcome.OK, f"{limit} concurrent executions")
    return Check(
        name,
        Outcome.WARN,
        f"this account runs at most {limit} Lambda invocations at once (new accounts start low): the forwarder "
        f"alone may take {max(2, config.amberflo.concurrency)}, and Firehose's throttled transform invocations are "
        f"retried {config.data_firehose_configuration.transform_records_with_aws_lambda.number_of_retries} times, "
        "then their records go to the error prefix unmetered. Ask for more (Service Quotas: AWS Lambda, "
        f"Concurrent executions; at least {MIN_LAMBDA_CONCURRENCY})",
    )


def _exists(call: Callable[[], object], *missing: str) -> bool:
    """Whether the resource ``call`` describes exists: it raises one of the ``missing`` error codes if not."""
    try:
        call()
    except ClientError as exc:
        if _error_code(exc) not in missing:
            raise
        return False
    return True


def _name_free(
    check: str, *, label: str, stack: str, exists: bool, account: Account, remedy: str, physical_id: str | None = None
) -> Check:
    """A name the stack will create: free, already the deployed stack's (an update), or taken outside it.

    ``physical_id`` is what CloudFormation records for the resource (default: the name the label ends with).
    """
    name = physical_id or label.rsplit(" ", 1)[-1]
    if not exists:
        return Check(check, Outcome.OK, f"{label} does not exist yet; {stack} creates it")
    if _deployed_resource(account, stack, name):
        return Check(check, Outcome.OK, f"{label} belongs to the deployed {stack}")
    return Check(check, Outcome.FAIL, f"{label} exists outside {stack}: {remedy}")


def _database(config: Config, account: Account) -> Check:
    database = config.database_name
    glue = account.client("glue")
    return _name_free(
        "Glue database",
        label=f"database {database}",
        stack=STORAGE_STACK,
        exists=_exists(lambda: glue.get_database(Name=database), "EntityNotFoundException"),
        account=account,
        remedy="CloudFormation cannot create it; delete it or set "
        "data_firehose_configuration.destination_iceberg_table_configuration.database_name",
    )


def _s3_tables_integration(destination: S3TablesDestination, account: Account) -> Check:
    """Firehose, Athena and Glue reach S3 tables through the ``s3tablescatalog`` federated catalog, which exists once
    the region's table buckets were integrated with AWS analytics services (a one-time, region-wide step AWS leaves
    to the console or CLI); the integration's access control must be the one the config describes."""
    name = "S3 Tables integration"
    glue = account.client("glue")
    try:
        catalog = glue.get_catalog(CatalogId=S3_TABLES_CATALOG)["Catalog"]
    except ClientError as exc:
        if _error_code(exc) != "EntityNotFoundException":
            raise
        return Check(
            name,
            Outcome.FAIL,
            f"table buckets are not integrated with AWS analytics services in {account.region} (no Glue catalog "
            f"{S3_TABLES_CATALOG}): enable it once per region (S3 console > Table buckets > Integrate), then deploy",
        )
    defaults = {
        entry.get("Principal", {}).get("DataLakePrincipalIdentifier")
        for entry in catalog.get("CreateTableDefaultPermissions", [])
    }
    actual = "iam" if IAM_ALLOWED_PRINCIPALS in defaults else "lake_formation"
    if actual != destination.access_control:
        return Check(
            name,
            Outcome.FAIL,
            f"the integration uses {actual} access control but s3_tables.access_control is "
            f"{destination.access_control!r}: set it to {actual!r} so the stacks grant what the account enforces",
        )
    return Check(name, Outcome.OK, f"{S3_TABLES_CATALOG} exists; {actual} access control, as configured")


def _named_table_bucket(bucket: str, account: Account) -> Check:
    s3tables = account.client("s3tables")
    arn = f"arn:aws:s3tables:{account.region}:{account.account_id}:bucket/{bucket}"
    return _name_free(
        "table bucket",
        label=f"table bucket {bucket}",
        stack=STORAGE_STACK,
        exists=_exists(lambda: s3tables.get_table_bucket(tableBucketARN=arn), "NotFoundException"),
        account=account,
        physical_id=arn,
        remedy="kept by an earlier deployment's `cdk destroy`? Delete its tables, namespace and bucket, or set "
        "another s3_tables.table_bucket_name",
    )


def _named_bucket(bucket: str, account: Account) -> Check:
    s3 = account.client("s3")
    try:
        exists = _exists(lambda: s3.head_bucket(Bucket=bucket), "404", "NoSuchBucket", "NotFound")
    except ClientError as exc:
        if _error_code(exc) not in ("403", "AccessDenied", "Forbidden"):
            raise
        return Check("lake bucket", Outcome.FAIL, f"the bucket name {bucket} is taken by another account")
    return _name_free(
        "lake bucket",
        label=f"bucket {bucket}",
        stack=STORAGE_STACK,
        exists=exists,
        account=account,
        remedy="kept by an earlier deployment's `cdk destroy`? Empty and delete it (`aws s3 rb s3://BUCKET "
        "--force`), or set another data_firehose_configuration.s3_bucket",
    )


def _delivery_stream(stream: str, account: Account) -> Check:
    firehose = account.client("firehose")
    return _name_free(
        "delivery stream",
        label=f"stream {stream}",
        stack=DELIVERY_STACK,
        exists=_exists(
            lambda: firehose.describe_delivery_stream(DeliveryStreamName=stream), "ResourceNotFoundException"
        ),
        account=account,
        remedy="delete it or set data_firehose_configuration.stream_name",
    )


def _amberflo_secret(config: Config, account: Account) -> Check:
    name = "Amberflo API key"
    secret = config.amberflo.api_key_secret_name
    secrets = account.client("secretsmanager")
    if not _exists(lambda: secrets.describe_secret(SecretId=secret), "ResourceNotFoundException"):
        command = (
            f"aws secretsmanager create-secret --name {secret} "
            f'--secret-string \'{{"{config.amberflo.api_key_secret_json_key}": "YOUR-AMBERFLO-KEY"}}\''
        )
        return Check(
            name,
            Outcome.WARN,
            f"no secret {secret}: create it before deploying {FORWARDING_STACK} ({command}), or its forwarder fails",
        )
    return Check(name, Outcome.OK, f"secret {secret} exists")

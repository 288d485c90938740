"""``meterlake aws check``: prove a live deployment the way ``make demo`` proves the local one.

It reads the deployed stacks' outputs, creates one Cognito user per check tenant (tenant ids unique to the run,
``check-<8 hex>-<n>``), sends requests through the real API with their ID tokens, deletes the users again (always,
even when something fails), then polls Athena (the ``sql/`` files) until the lake counted every answered request and
Amberflo holds one ``api-calls`` unit per billable one, or the timeout ends. Last it reads the forwarding state (queue
and dead-letter queue depth, dead letters written since the check started) and reconciles, per tenant, what the API
answered, what Athena counted and what reached Amberflo, in the lines ``make demo`` prints.

Apart from that traffic and those users it only reads (Athena writes its query results where the workgroup says).
Each piece takes its boto3 client (or httpx client) as an argument, so tests hand them moto-backed ones;
:func:`run_check` wires them to an :class:`Account`.
"""

from __future__ import annotations

import json
import secrets
import string
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Final, TypeVar

import httpx
from botocore.exceptions import BotoCoreError, ClientError  # type: ignore[import-untyped]

from meterlake.amberflo.reconcile import (
    CALLS_METER,
    RunReconciliation,
    Tally,
    Window,
    amberflo_usage,
    reconcile_run,
    usage_tallies,
)
from meterlake.amberflo.settings import AmberfloSettings
from meterlake.aws import AwsError
from meterlake.aws.account import Account
from meterlake.aws.athena import run_athena_query
from meterlake.aws.cognito import TENANT_CLAIM, fetch_id_token
from meterlake.aws.forwarding import DEAD_LETTER_PREFIX
from meterlake.aws.stacks import (
    ANALYTICS_STACK,
    API_STACK,
    DELIVERY_STACK,
    FORWARDING_STACK,
    STACK_NAMES,
    STORAGE_STACK,
)
from meterlake.config import Config
from meterlake.lake.query import load_query
from meterlake.meters import Meter
from meterlake.records import DEFAULT_TENANT_SOURCE

#: The sql/ query that counts the check's requests in the lake.
USAGE_QUERY: Final = "usage_per_tenant_day"
#: Where the reconciliation lines say the requests were counted.
COUNTED_IN: Final = "Athena"
#: The demo API's route the check calls, and its query string.
ROUTE: Final = "/random/strings"
ROUTE_PARAMS: Final = {"len": "8"}
DEFAULT_TENANTS: Final = 2
DEFAULT_REQUESTS_PER_TENANT: Final = 20
#: Added to Firehose's buffering (processor and destination) for the transform, the Iceberg commit, the stager's
#: one-minute schedule, the forwarder and Amberflo's own aggregation.
TIMEOUT_MARGIN_S: Final = 600
#: Seconds between two counts in Athena (each scans the window) or in Amberflo.
POLL_INTERVAL_S = 30.0
#: Each Athena count may run this long before it is cancelled.
ATHENA_QUERY_TIMEOUT_S: Final = 300.0
#: Widens every window: the access log's request_time and S3's LastModified are AWS's clocks, not this machine's.
CLOCK_SLACK: Final = timedelta(minutes=5)
#: Statuses API Gateway answers without running the authorizer's claims into the access log: no tenant is metered.
REFUSED_STATUSES: Final = frozenset({401, 403})
#: Stack statuses whose resources and outputs are in place (an update that rolled back keeps the previous ones).
USABLE_STACK_STATUSES: Final = frozenset(
    {"CREATE_COMPLETE", "UPDATE_COMPLETE", "UPDATE_ROLLBACK_COMPLETE", "IMPORT_COMPLETE", "IMPORT_ROLLBACK_COMPLETE"}
)
#: The outputs the check reads, per stack (``TableBucketName`` is added with ``s3_tables``).
REQUIRED_OUTPUTS: Final[Mapping[str, tuple[str, ...]]] = {
    STORAGE_STACK: ("BucketName",),
    DELIVERY_STACK: ("DeliveryStreamName",),
    API_STACK: ("UserPoolId", "UserPoolClientId", "RestApiEndpoint"),
    ANALYTICS_STACK: ("AthenaWorkGroup",),
    FORWARDING_STACK: ("ForwardQueueUrl", "ForwardDeadLetterQueueUrl", "AlarmTopicArn"),
}
#: How many request ids of a tenant whose count differs are printed (the rest are counted).
SHOWN_REQUEST_IDS: Final = 10

_PASSWORD_CLASSES: Final = (string.ascii_lowercase, string.ascii_uppercase, string.digits, "!#%*+-=?@^_~")
_PASSWORD_LENGTH: Final = 32

T = TypeVar("T")


class CheckError(AwsError):
    """Base of the failures of ``meterlake aws check``."""


class DeploymentIncompleteError(CheckError):
    """A stack the check needs is not deployed (or not usable), or lacks an output; ``problems`` names each."""

    def __init__(self, problems: Sequence[str], *, region: str) -> None:
        self.problems = list(problems)
        self.region = region
        super().__init__(f"the deployment in {region} is incomplete: {'; '.join(problems)}")


class CheckRequestError(CheckError):
    """An AWS call the check needs was refused or could not be made."""

    def __init__(self, operation: str, detail: str) -> None:
        self.operation = operation
        self.detail = detail
        super().__init__(f"{operation}: {detail}")


class CheckUserCleanupError(CheckError):
    """A check user could not be deleted; ``leftovers`` maps each username to Cognito's error."""

    def __init__(self, user_pool_id: str, leftovers: Mapping[str, str]) -> None:
        self.user_pool_id = user_pool_id
        self.leftovers = dict(leftovers)
        users = "; ".join(f"{name} ({why})" for name, why in leftovers.items())
        super().__init__(
            f"could not delete the check's Cognito user(s) from {user_pool_id}: {users}; delete them with "
            f"aws cognito-idp admin-delete-user --user-pool-id {user_pool_id} --username NAME"
        )


class CheckFailed(CheckError):  # noqa: N818 - what the command reports, as AthenaQueryFailed
    """The check ran and the deployment did not prove out; ``problems`` names every difference."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__(f"deployment check failed: {'; '.join(problems)}")


def _call(operation: Callable[..., Any], name: str, **kwargs: Any) -> Any:
    """One AWS call, botocore's errors turned into :class:`CheckRequestError`."""
    try:
        return operation(**kwargs)
    except ClientError as exc:
        error = exc.response.get("Error", {})
        raise CheckRequestError(name, f"{error.get('Code', 'error')}: {error.get('Message', exc)}") from exc
    except BotoCoreError as exc:
        raise CheckRequestError(name, str(exc)) from exc


# --- the deployment --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Deployment:
    """The deployed stacks' outputs the check uses."""

    user_pool_id: str
    user_pool_client_id: str
    rest_api_endpoint: str
    delivery_stream_name: str
    bucket_name: str
    athena_workgroup: str
    forward_queue_url: str
    forward_dead_letter_queue_url: str
    alarm_topic_arn: str
    #: With ``s3_tables``: the table bucket holding the metering table; else None.
    table_bucket_name: str | None = None


def required_outputs(config: Config) -> dict[str, tuple[str, ...]]:
    """The outputs the check needs from each stack, for this config."""
    outputs = dict(REQUIRED_OUTPUTS)
    if config.s3_tables is not None:
        outputs[STORAGE_STACK] = (*outputs[STORAGE_STACK], "TableBucketName")
    return outputs


def read_deployment(cloudformation: Any, config: Config, *, region: str) -> Deployment:
    """Every stack of the app, deployed and usable, with the outputs the check needs (DescribeStacks).

    Raises:
        DeploymentIncompleteError: a stack is missing or not in a usable state, or an output is missing; every such
            problem is named, in deployment order.
        CheckRequestError: CloudFormation refused to describe a stack (access denied, throttled).
    """
    needed = required_outputs(config)
    problems: list[str] = []
    values: dict[str, str] = {}
    for stack_name in STACK_NAMES:
        stack = _describe_stack(cloudformation, stack_name)
        if stack is None:
            problems.append(f"{stack_name} is not deployed")
            continue
        status = str(stack.get("StackStatus", ""))
        if status not in USABLE_STACK_STATUSES:
            problems.append(f"{stack_name} is {status}")
            continue
        outputs = {o["OutputKey"]: o["OutputValue"] for o in stack.get("Outputs", [])}
        missing = [key for key in needed.get(stack_name, ()) if not outputs.get(key)]
        if missing:
            problems.append(f"{stack_name} has no output {', '.join(missing)}")
        values.update({key: outputs[key] for key in needed.get(stack_name, ()) if outputs.get(key)})
    if problems:
        raise DeploymentIncompleteError(problems, region=region)
    return Deployment(
        user_pool_id=values["UserPoolId"],
        user_pool_client_id=values["UserPoolClientId"],
        rest_api_endpoint=values["RestApiEndpoint"],
        delivery_stream_name=values["DeliveryStreamName"],
        bucket_name=values["BucketName"],
        athena_workgroup=values["AthenaWorkGroup"],
        forward_queue_url=values["ForwardQueueUrl"],
        forward_dead_letter_queue_url=values["ForwardDeadLetterQueueUrl"],
        alarm_topic_arn=values["AlarmTopicArn"],
        table_bucket_name=values.get("TableBucketName"),
    )


def _describe_stack(cloudformation: Any, stack_name: str) -> dict[str, Any] | None:
    """The stack's description, or None when no such stack exists in the region."""
    try:
        stacks = cloudformation.describe_stacks(StackName=stack_name)["Stacks"]
    except ClientError as exc:
        error = exc.response.get("Error", {})
        # CloudFormation's only way of saying "no such stack".
        if error.get("Code") == "ValidationError" and "does not exist" in str(error.get("Message", "")):
            return None
        detail = f"{error.get('Code', 'error')}: {error.get('Message', exc)}"
        raise CheckRequestError(f"CloudFormation DescribeStacks {stack_name}", detail) from exc
    except BotoCoreError as exc:
        raise CheckRequestError(f"CloudFormation DescribeStacks {stack_name}", str(exc)) from exc
    return dict(stacks[0]) if stacks else None


def read_api_key(secretsmanager: Any, settings: AmberfloSettings) -> str:
    """The Amberflo API key from the secret the config names (``api_key_secret_name``/``api_key_secret_json_key``).

    Raises:
        CheckRequestError: the secret cannot be read, is not a JSON object, or lacks the key.
    """
    name, key = settings.api_key_secret_name, settings.api_key_secret_json_key
    operation = f"Secrets Manager GetSecretValue {name}"
    secret = _call(secretsmanager.get_secret_value, operation, SecretId=name)
    try:
        document = json.loads(secret.get("SecretString") or "")
    except ValueError:
        raise CheckRequestError(operation, "the secret is not a JSON object") from None
    value = document.get(key) if isinstance(document, dict) else None
    if not isinstance(value, str) or not value:
        raise CheckRequestError(operation, f"the secret holds no JSON key {key!r} with the Amberflo API key")
    return value


# --- the check's users ----------------------------------------------------------------------------------------------


def new_run_id() -> str:
    """8 random hex digits naming one run's tenants and users."""
    return secrets.token_hex(4)


def check_tenants(run_id: str, count: int) -> list[str]:
    """The run's tenant ids: ``check-<run id>-1`` ... ``check-<run id>-<count>``."""
    return [f"check-{run_id}-{n}" for n in range(1, count + 1)]


def new_password() -> str:
    """A random password meeting the user pool's policy (12+ characters, lower, upper, digit, symbol)."""
    chars = [secrets.choice(kind) for kind in _PASSWORD_CLASSES]
    alphabet = "".join(_PASSWORD_CLASSES)
    chars += [secrets.choice(alphabet) for _ in range(_PASSWORD_LENGTH - len(chars))]
    secrets.SystemRandom().shuffle(chars)
    return "".join(chars)


@dataclass(frozen=True, slots=True)
class CheckUser:
    """A check tenant's Cognito user and the ID token it signed in for."""

    tenant_id: str
    username: str
    id_token: str = field(repr=False)


class CheckUsers:
    """The check's Cognito users: one per tenant, created by an administrator with ``custom:tenant_id`` and a
    permanent random password, signed in with USER_PASSWORD_AUTH for an ID token, and deleted when the ``with``
    block ends, however it ends.

    A user that cannot be deleted is an error (:class:`CheckUserCleanupError`) when the block succeeded; when the
    block itself failed, that failure propagates and each leftover user is passed to ``on_warning``.
    """

    def __init__(
        self,
        cognito: Any,
        *,
        user_pool_id: str,
        client_id: str,
        region: str,
        on_warning: Callable[[str], None],
    ) -> None:
        self._cognito = cognito
        self.user_pool_id = user_pool_id
        self.client_id = client_id
        self.region = region
        self._on_warning = on_warning
        #: Usernames created and not deleted yet.
        self.created: list[str] = []

    def create(self, tenant_id: str) -> CheckUser:
        """Create the user of ``tenant_id`` and sign it in.

        Raises:
            CheckRequestError: Cognito refused to create the user or to set its password.
            CognitoAuthError: the new user could not sign in.
        """
        username = f"meterlake-{tenant_id}"
        pool = self.user_pool_id
        # Tracked before the call: a user created by a request whose answer was lost is deleted too.
        self.created.append(username)
        _call(
            self._cognito.admin_create_user,
            f"Cognito AdminCreateUser {username}",
            UserPoolId=pool,
            Username=username,
            UserAttributes=[{"Name": TENANT_CLAIM, "Value": tenant_id}],
            MessageAction="SUPPRESS",
        )
        password = new_password()
        _call(
            self._cognito.admin_set_user_password,
            f"Cognito AdminSetUserPassword {username}",
            UserPoolId=pool,
            Username=username,
            Password=password,
            Permanent=True,
        )
        token = fetch_id_token(
            client_id=self.client_id,
            username=username,
            password=password,
            region=self.region,
            cognito_client=self._cognito,
        )
        return CheckUser(tenant_id=tenant_id, username=username, id_token=token)

    def delete_all(self) -> dict[str, str]:
        """Delete every user created; returns those that could not be, with Cognito's reason."""
        leftovers: dict[str, str] = {}
        for username in list(self.created):
            try:
                self._cognito.admin_delete_user(UserPoolId=self.user_pool_id, Username=username)
            except ClientError as exc:
                error = exc.response.get("Error", {})
                if error.get("Code") != "UserNotFoundException":
                    leftovers[username] = f"{error.get('Code', 'error')}: {error.get('Message', exc)}"
                    continue
            except BotoCoreError as exc:
                leftovers[username] = str(exc)
                continue
            self.created.remove(username)
        return leftovers

    def __enter__(self) -> CheckUsers:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        leftovers = self.delete_all()
        if not leftovers:
            return
        cleanup = CheckUserCleanupError(self.user_pool_id, leftovers)
        if exc_type is None:
            raise cleanup
        self._on_warning(str(cleanup))


# --- traffic --------------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class TenantTraffic:
    """What the API answered one tenant's requests: statuses, request ids, and requests that got no answer."""

    tenant_id: str
    statuses: Counter[int] = field(default_factory=Counter)
    #: ``x-amzn-RequestId`` of every answer that carried one (the access log's request_id).
    request_ids: list[str] = field(default_factory=list)
    transport_errors: Counter[str] = field(default_factory=Counter)

    @property
    def answered(self) -> int:
        """Answers of any status."""
        return sum(self.statuses.values())

    @property
    def refused(self) -> int:
        """Answers refusing the token (401/403): the access log carries no tenant for them."""
        return sum(n for status, n in self.statuses.items() if status in REFUSED_STATUSES)

    @property
    def server_errors(self) -> int:
        """Answers with status >= 500."""
        return sum(n for status, n in self.statuses.items() if status >= 500)

    @property
    def tally(self) -> Tally:
        """What the lake should count for the tenant: answers the authorizer let through, and the billable ones."""
        attributed = self.answered - self.refused
        return Tally(requests=attributed, billable=attributed - self.server_errors)

    def problems(self) -> list[str]:
        """What went wrong with the traffic itself, one phrase each."""
        found = []
        if self.transport_errors:
            kinds = ", ".join(f"{kind} x{n}" for kind, n in sorted(self.transport_errors.items()))
            found.append(f"{self.tenant_id}: {sum(self.transport_errors.values())} requests got no answer ({kinds})")
        if self.refused:
            found.append(f"{self.tenant_id}: {self.refused} requests answered 401/403 (the API refused the ID token)")
        if self.server_errors:
            found.append(f"{self.tenant_id}: {self.server_errors} requests answered 5xx")
        return found


def drive_traffic(
    http: httpx.Client,
    endpoint: str,
    users: Sequence[CheckUser],
    requests_per_tenant: int,
    *,
    on_answer: Callable[[], None] | None = None,
) -> dict[str, TenantTraffic]:
    """Send ``requests_per_tenant`` GETs of the demo route per user, its raw ID token in Authorization.

    One request at a time, so a check never meets the stage's throttling.
    """
    url = endpoint.rstrip("/") + ROUTE
    traffic: dict[str, TenantTraffic] = {}
    for user in users:
        tenant = traffic[user.tenant_id] = TenantTraffic(user.tenant_id)
        for _ in range(requests_per_tenant):
            try:
                response = http.get(url, params=ROUTE_PARAMS, headers={"Authorization": user.id_token})
            except httpx.TransportError as exc:
                tenant.transport_errors[type(exc).__name__] += 1
            else:
                tenant.statuses[response.status_code] += 1
                request_id = response.headers.get("x-amzn-RequestId")
                if request_id:
                    tenant.request_ids.append(request_id)
            if on_answer is not None:
                on_answer()
    return traffic


# --- counters -------------------------------------------------------------------------------------------------------


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def count_in_athena(
    athena: Any,
    config: Config,
    *,
    workgroup: str,
    table_bucket: str | None,
    tenants: Iterable[str],
    start: datetime,
    end: datetime,
) -> dict[str, Tally]:
    """Each tenant's requests in the lake between ``start`` and ``end``, with :data:`USAGE_QUERY` per tenant.

    Raises:
        AthenaError: Athena refused, failed or timed out a query.
    """
    query = load_query(USAGE_QUERY)
    counted: dict[str, Tally] = {}
    for tenant in tenants:
        result = run_athena_query(
            query,
            {"start": _iso(start), "end": _iso(end), "tenant_id": tenant},
            config=config,
            athena_client=athena,
            workgroup=workgroup,
            table_bucket=table_bucket,
            timeout_s=ATHENA_QUERY_TIMEOUT_S,
        )
        counted[tenant] = usage_tallies(result.columns, result.rows).get(tenant, Tally())
    return counted


def amberflo_units(
    http: httpx.Client,
    *,
    settings: AmberfloSettings,
    api_key: str,
    meter: Meter,
    tenants: Iterable[str],
    window: Window,
) -> dict[str, int]:
    """The meter's units Amberflo's ``/usage`` holds for each tenant over the window's whole hours.

    Raises:
        ReconcileError: Amberflo refused the query or could not be reached.
    """
    units = dict.fromkeys(tenants, 0.0)
    usage = amberflo_usage(http, base_url=settings.base_url, api_key=api_key, meters=[meter], window=window)
    for (customer, _meter, _hour), value in usage.items():
        if customer in units:
            units[customer] += value
    return {tenant: round(value) for tenant, value in units.items()}


@dataclass(frozen=True, slots=True)
class ForwardingState:
    """The forward queue and its dead-letter queue, and dead letters written since the check started."""

    queued: int
    in_flight: int
    dead_letter_queue: int
    #: Keys under ``amberflo/dead-letters/`` in the lake bucket, written since the check started.
    dead_letters: tuple[str, ...]
    bucket: str

    def problems(self) -> list[str]:
        """Usage that will not reach Amberflo without an operator: messages in the DLQ, new dead letters."""
        found = []
        if self.dead_letter_queue:
            found.append(f"the forward dead-letter queue holds {self.dead_letter_queue} messages (redrive them)")
        if self.dead_letters:
            found.append(
                f"{len(self.dead_letters)} dead letters written since the check started "
                f"(s3://{self.bucket}/{self.dead_letters[0]} ...)"
            )
        return found

    def __str__(self) -> str:
        return (
            f"forward queue: {self.queued} messages waiting, {self.in_flight} in flight; "
            f"dead-letter queue: {self.dead_letter_queue}; dead letters since the check started: "
            f"{len(self.dead_letters)}"
        )


def _queue_depth(sqs: Any, queue_url: str) -> tuple[int, int]:
    """(visible, in flight) messages of a queue."""
    attributes = _call(
        sqs.get_queue_attributes,
        f"SQS GetQueueAttributes {queue_url}",
        QueueUrl=queue_url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    return int(attributes["ApproximateNumberOfMessages"]), int(attributes["ApproximateNumberOfMessagesNotVisible"])


def forwarding_state(
    sqs: Any, s3: Any, *, queue_url: str, dead_letter_queue_url: str, bucket: str, since: datetime
) -> ForwardingState:
    """Queue depths (GetQueueAttributes) and the dead letters under the lake bucket's prefix since ``since``.

    Raises:
        CheckRequestError: SQS or S3 refused a read.
    """
    queued, in_flight = _queue_depth(sqs, queue_url)
    dead_visible, dead_in_flight = _queue_depth(sqs, dead_letter_queue_url)
    # Dead letters are keyed by date, so the listing can start at the check's first day.
    request: dict[str, Any] = {
        "Bucket": bucket,
        "Prefix": DEAD_LETTER_PREFIX,
        "StartAfter": f"{DEAD_LETTER_PREFIX}{since.astimezone(UTC):%Y-%m-%d}",
    }
    keys: list[str] = []
    while True:
        page = _call(s3.list_objects_v2, f"S3 ListObjectsV2 s3://{bucket}/{DEAD_LETTER_PREFIX}", **request)
        keys += [o["Key"] for o in page.get("Contents", []) if o["LastModified"] >= since]
        if not page.get("IsTruncated"):
            break
        request["ContinuationToken"] = page["NextContinuationToken"]
    return ForwardingState(queued, in_flight, dead_visible + dead_in_flight, tuple(keys), bucket)


# --- reconciliation --------------------------------------------------------------------------------------------------


def lake_settled(answered: Mapping[str, Tally], counted: Mapping[str, Tally]) -> bool:
    """Whether counting again is pointless: every tenant counted as answered, or one counted more (counts only
    grow)."""
    matched = all(counted.get(t, Tally()) == tally for t, tally in answered.items())
    over = any(counted.get(t, Tally()).requests > tally.requests for t, tally in answered.items())
    return matched or over


def amberflo_settled(answered: Mapping[str, Tally], forwarded: Mapping[str, int]) -> bool:
    """:func:`lake_settled` for Amberflo's units against the billable answers."""
    matched = all(forwarded.get(t, 0) == tally.billable for t, tally in answered.items())
    over = any(forwarded.get(t, 0) > tally.billable for t, tally in answered.items())
    return matched or over


def poll(
    read: Callable[[], T],
    settled: Callable[[T], bool],
    *,
    deadline: float,
    interval_s: float,
    on_read: Callable[[T], None],
) -> tuple[T, bool]:
    """Read until ``settled`` or the monotonic ``deadline`` passed (at least once); the last value and whether it
    settled."""
    while True:
        value = read()
        on_read(value)
        if settled(value):
            return value, True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return value, False
        time.sleep(min(interval_s, remaining))


# --- the check ------------------------------------------------------------------------------------------------------


def default_timeout_s(config: Config) -> int:
    """How long to wait for the pipeline: Firehose's two buffering intervals (the Lambda processor's and the
    destination's) plus :data:`TIMEOUT_MARGIN_S`."""
    firehose = config.data_firehose_configuration
    return (
        firehose.buffering_hints.interval_in_seconds
        + firehose.transform_records_with_aws_lambda.buffer_interval
        + TIMEOUT_MARGIN_S
    )


@dataclass(frozen=True, slots=True)
class CheckReport:
    """What the check saw: the traffic, the per-tenant reconciliation, the forwarding state, what timed out."""

    traffic: Mapping[str, TenantTraffic]
    reconciliation: RunReconciliation
    forwarding: ForwardingState
    timeout_s: float
    #: What was still awaited when the timeout ended ("Athena", "Amberflo"); empty when nothing was.
    timed_out: tuple[str, ...] = ()

    @property
    def problems(self) -> list[str]:
        """Every reason the check fails, in the order they arise: traffic, timeout, differences, forwarding."""
        found = [problem for traffic in self.traffic.values() for problem in traffic.problems()]
        if self.timed_out:
            found.append(f"timed out after {self.timeout_s:g} s waiting for {' and '.join(self.timed_out)}")
        found += self.reconciliation.differences
        found += self.forwarding.problems()
        return found

    @property
    def ok(self) -> bool:
        """True when nothing differs and nothing went wrong."""
        return self.reconciliation.ok and not self.problems

    def request_id_lines(self) -> list[str]:
        """For each tenant whose counts differ: the request ids its answers carried, to look up in the access log."""
        lines = []
        for line in self.reconciliation.lines:
            traffic = None if line.tenant is None else self.traffic.get(line.tenant)
            if line.matches or traffic is None or not traffic.request_ids:
                continue
            ids = traffic.request_ids
            more = f" and {len(ids) - SHOWN_REQUEST_IDS} more" if len(ids) > SHOWN_REQUEST_IDS else ""
            lines.append(f"{line.tenant} request ids: {', '.join(ids[:SHOWN_REQUEST_IDS])}{more}")
        return lines


def _calls_meter(config: Config) -> Meter | None:
    return next((m for m in config.meters if m.meter_api_name == CALLS_METER), None)


def _send_traffic(
    account: Account,
    deployment: Deployment,
    tenant_ids: Sequence[str],
    requests_per_tenant: int,
    say: Callable[[str], None],
) -> dict[str, TenantTraffic]:
    """Create the users, drive the traffic with their tokens, delete the users (whatever happened)."""
    total = len(tenant_ids) * requests_per_tenant
    sent = 0

    def on_answer() -> None:
        nonlocal sent
        sent += 1
        if sent % max(1, total // 4) == 0:
            say(f"sent {sent} of {total} requests")

    say(f"tenants {', '.join(tenant_ids)}: creating their Cognito users (deleted again after the traffic)")
    with (
        CheckUsers(
            account.client("cognito-idp"),
            user_pool_id=deployment.user_pool_id,
            client_id=deployment.user_pool_client_id,
            region=account.region,
            on_warning=lambda message: say(f"warning: {message}"),
        ) as users,
        httpx.Client(timeout=30) as http,
    ):
        created = [users.create(tenant) for tenant in tenant_ids]
        say(f"sending {requests_per_tenant} requests per tenant to {deployment.rest_api_endpoint}{ROUTE}")
        traffic = drive_traffic(http, deployment.rest_api_endpoint, created, requests_per_tenant, on_answer=on_answer)
    say(f"deleted the check's {len(tenant_ids)} Cognito users")
    statuses = sum((t.statuses for t in traffic.values()), Counter[int]())
    answers = ", ".join(f"{status} x{n}" for status, n in sorted(statuses.items())) or "none"
    say(f"answered {sum(statuses.values())} of {total} requests ({answers})")
    if not statuses:
        raise CheckFailed([problem for t in traffic.values() for problem in t.problems()])
    return traffic


def run_check(
    config: Config,
    account: Account,
    *,
    tenants: int = DEFAULT_TENANTS,
    requests_per_tenant: int = DEFAULT_REQUESTS_PER_TENANT,
    timeout_s: float | None = None,
    poll_interval_s: float | None = None,
    say: Callable[[str], None],
) -> CheckReport:
    """Run the whole check against the account's deployment; progress goes to ``say``, one line at a time.

    ``timeout_s`` (default :func:`default_timeout_s`) counts from the last request; ``poll_interval_s`` defaults to
    :data:`POLL_INTERVAL_S`. The users are deleted right after the traffic, before the wait.

    Raises:
        DeploymentIncompleteError: a stack or an output is missing (nothing was created).
        CheckRequestError: an AWS call the check needs failed (Secrets Manager, Cognito, SQS, S3).
        CognitoAuthError: a check user could not sign in.
        CheckUserCleanupError: a check user could not be deleted.
        CheckFailed: no request was answered at all.
        AthenaError: an Athena count failed.
        ReconcileError: Amberflo's usage could not be read.
    """
    if config.meterlake.tenant_source.source() != DEFAULT_TENANT_SOURCE:
        raise CheckFailed(
            [
                f"the check drives the demo API ({API_STACK}) with its Cognito users' {TENANT_CLAIM} claim, "
                f"and meterlake.tenant_source is {config.meterlake.tenant_source.kind!r} with other variables: "
                "the demo API is not deployed with it"
            ]
        )
    timeout = default_timeout_s(config) if timeout_s is None else timeout_s
    interval = POLL_INTERVAL_S if poll_interval_s is None else poll_interval_s
    deployment = read_deployment(account.client("cloudformation"), config, region=account.region)
    say(f"stacks deployed: {', '.join(STACK_NAMES)}; API {deployment.rest_api_endpoint}")
    meter = _calls_meter(config)
    api_key: str | None = None
    not_forwarded_reason = "forwarding is a dry run"
    if config.amberflo.dry_run:
        say("forwarding is a dry run (amberflo.dry_run): Amberflo is not compared")
    elif meter is None:
        not_forwarded_reason = f"no {CALLS_METER} meter declared"
        say(f"the config declares no {CALLS_METER} meter: Amberflo is not compared")
    else:
        api_key = read_api_key(account.client("secretsmanager"), config.amberflo)

    tenant_ids = check_tenants(new_run_id(), tenants)
    started = datetime.now(UTC)
    traffic = _send_traffic(account, deployment, tenant_ids, requests_per_tenant, say)
    answered = {tenant: t.tally for tenant, t in traffic.items()}

    traffic_ended = time.monotonic()
    deadline = traffic_ended + timeout
    firehose = config.data_firehose_configuration
    say(
        f"waiting up to {timeout:g} s for the pipeline (Firehose buffers {firehose.buffering_hints.interval_in_seconds}"
        f" s, its Lambda processor {firehose.transform_records_with_aws_lambda.buffer_interval} s), counting every "
        f"{interval:g} s"
    )

    def elapsed() -> str:
        return f"after {time.monotonic() - traffic_ended:.0f} s"

    athena = account.client("athena")
    counted, lake_done = poll(
        lambda: count_in_athena(
            athena,
            config,
            workgroup=deployment.athena_workgroup,
            table_bucket=deployment.table_bucket_name,
            tenants=tenant_ids,
            start=started - CLOCK_SLACK,
            end=datetime.now(UTC) + CLOCK_SLACK,
        ),
        lambda found: lake_settled(answered, found),
        deadline=deadline,
        interval_s=interval,
        on_read=lambda found: say(
            f"Athena {elapsed()}: {sum(t.requests for t in found.values())} of "
            f"{sum(t.requests for t in answered.values())} answered requests counted"
        ),
    )
    timed_out = [] if lake_done else ["Athena"]

    forwarded: dict[str, int] | None = None
    if api_key is not None and meter is not None:
        window = Window.covering(started - CLOCK_SLACK, datetime.now(UTC) + CLOCK_SLACK)
        key, calls = api_key, meter
        with httpx.Client() as http:
            units, amberflo_done = poll(
                lambda: amberflo_units(
                    http, settings=config.amberflo, api_key=key, meter=calls, tenants=tenant_ids, window=window
                ),
                lambda found: amberflo_settled(answered, found),
                deadline=deadline,
                interval_s=interval,
                on_read=lambda found: say(
                    f"Amberflo {elapsed()}: {sum(found.values())} of {sum(t.billable for t in answered.values())} "
                    f"{CALLS_METER} units"
                ),
            )
        forwarded = units
        if not amberflo_done:
            timed_out.append("Amberflo")

    forwarding = forwarding_state(
        account.client("sqs"),
        account.client("s3"),
        queue_url=deployment.forward_queue_url,
        dead_letter_queue_url=deployment.forward_dead_letter_queue_url,
        bucket=deployment.bucket_name,
        since=started - CLOCK_SLACK,
    )
    say(str(forwarding))
    return CheckReport(
        traffic=traffic,
        reconciliation=reconcile_run(
            answered,
            counted,
            forwarded,
            counted_in=COUNTED_IN,
            not_forwarded_reason=not_forwarded_reason,
        ),
        forwarding=forwarding,
        timeout_s=timeout,
        timed_out=tuple(timed_out),
    )

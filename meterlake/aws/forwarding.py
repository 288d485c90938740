"""Forwarding to Amberflo on AWS, the forwarder Lambda: SQS messages of meter records -> Amberflo.

The stager (``meterlake.aws.staging``) fills the queue with what Iceberg committed; this Lambda sends each message
through the same :class:`Forwarder` as the local runtime, so it behaves the same. Sent: done. GaveUp (the retry
budget was spent on transient failures): the message is reported in ``batchItemFailures``, SQS redelivers it, and
after the queue's maxReceiveCount it lands in the dead-letter queue (alarmed). KeyRefused (Amberflo answered 401 or
403: the API key is wrong, no record is): the message and every later one of the invocation go back to SQS
untried, the ``ApiKeyRefused`` metric is 1 (alarm on it) and the next invocation reads the secret again, so fixing
the secret resumes forwarding; nothing is dead-lettered. RecordsRefused (the forwarder isolated the records Amberflo
refuses): each refused record and Amberflo's answer to it is written to
``s3://<bucket>/amberflo/dead-letters/<date>/<messageId>-<index>.json`` and the message counts as processed, its
other records accepted. DeadLetter (a 4xx no record explains): the message's records and Amberflo's answer are
written to ``.../<date>/<messageId>.json``.
With ``amberflo.dry_run`` the stack leaves this Lambda unsubscribed; invoked anyway, it sends nothing and hands every
message back to the queue.

It imports neither pyarrow nor pyiceberg (nor anything that does), so its Lambda asset stays small and starts fast;
the stager's module imports this one for the names both share.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import msgspec
from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities import parameters
from aws_lambda_powertools.utilities.batch import BatchProcessor, EventType, process_partial_response
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord
from aws_lambda_powertools.utilities.typing import LambdaContext

from meterlake.amberflo.forwarder import DeadLetter, Forwarder, GaveUp, KeyRefused, RecordsRefused, encode_batch
from meterlake.amberflo.settings import AmberfloSettings
from meterlake.aws import AwsError

METRICS_NAMESPACE: Final = "meterlake"
FORWARDER_SERVICE: Final = "amberflo-forwarder"

#: Under which prefix of the lake bucket the forwarder writes refused batches.
DEAD_LETTER_PREFIX: Final = "amberflo/dead-letters/"

ENV_BUCKET: Final = "LAKE_BUCKET"
ENV_AMBERFLO: Final = "AMBERFLO_SETTINGS_JSON"
ENV_SECRET_NAME: Final = "AMBERFLO_API_KEY_SECRET_NAME"  # noqa: S105 (a variable name, not a secret)
ENV_SECRET_JSON_KEY: Final = "AMBERFLO_API_KEY_SECRET_JSON_KEY"  # noqa: S105 (a variable name)

#: The forwarder starts no new message, and stops retrying, this long before the Lambda's own timeout.
FORWARDER_STOP_MARGIN_S: Final = 5.0
#: How long the API key read from Secrets Manager is reused by a warm forwarder.
SECRET_MAX_AGE_S: Final = 300

#: The service name comes from each Lambda's POWERTOOLS_SERVICE_NAME.
logger = Logger()


class ForwardingError(AwsError):
    """Base of the failures of forwarding on AWS."""


class MissingSettingError(ForwardingError):
    """A forwarding Lambda's environment lacks a variable it needs."""

    def __init__(self, variable: str) -> None:
        super().__init__(f"environment variable {variable} is required but is not set")
        self.variable = variable


class ApiKeyMissingError(ForwardingError):
    """The Amberflo API key secret has no such JSON key."""

    def __init__(self, secret_name: str, json_key: str) -> None:
        super().__init__(f"secret {secret_name!r} holds no JSON key {json_key!r} with the Amberflo API key")


# -- configuration rendered at synth time ---------------------------------------------------------------------------


def render_amberflo_settings(settings: AmberfloSettings, *, retry_budget_s: float) -> str:
    """The forwarder's Amberflo settings as JSON, with the retry budget one message may spend in the Lambda."""
    return msgspec.json.encode(msgspec.structs.replace(settings, give_up_after_s=retry_budget_s)).decode()


def required_env(environ: Mapping[str, str], variable: str) -> str:
    """The non-blank value of ``variable``.

    Raises:
        MissingSettingError: it is unset or blank.
    """
    value = environ.get(variable, "").strip()
    if not value:
        raise MissingSettingError(variable)
    return value


@dataclass(frozen=True, slots=True)
class ForwarderSettings:
    """How the forwarder reaches Amberflo, where its API key is and where refused batches go."""

    amberflo: AmberfloSettings
    bucket: str
    secret_name: str
    secret_json_key: str

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> ForwarderSettings:
        """Read the forwarder's environment.

        Raises:
            MissingSettingError: a variable is unset.
            msgspec.ValidationError: the Amberflo settings JSON is invalid.
        """
        return cls(
            amberflo=msgspec.json.decode(required_env(environ, ENV_AMBERFLO), type=AmberfloSettings),
            bucket=required_env(environ, ENV_BUCKET),
            secret_name=required_env(environ, ENV_SECRET_NAME),
            secret_json_key=required_env(environ, ENV_SECRET_JSON_KEY),
        )


# -- the forwarder --------------------------------------------------------------------------------------------------


class RetryLaterError(ForwardingError):
    """A message's batch was not delivered yet (transient failures, or no time left): SQS redelivers it."""


class S3DeadLetters:
    """Records Amberflo refused for good: ``<prefix><YYYY-MM-DD>/<name>.json`` with the status and answer, where
    name is the message id (a whole message refused) or ``<messageId>-<index>`` (one record, at that index)."""

    def __init__(self, s3: Any, *, bucket: str, prefix: str = DEAD_LETTER_PREFIX) -> None:
        self._s3 = s3
        self.bucket = bucket
        self.prefix = prefix

    def put(
        self,
        name: str,
        records: Sequence[Mapping[str, Any]],
        *,
        message_id: str,
        status: int,
        answer: str,
        attempts: int,
    ) -> str:
        """Write refused records; returns the key."""
        now = datetime.now(UTC)
        key = f"{self.prefix}{now:%Y-%m-%d}/{name}.json"
        document = {
            "messageId": message_id,
            "deadLetteredAt": now.isoformat(),
            "status": status,
            "answer": answer,
            "attempts": attempts,
            "records": list(records),
        }
        self._s3.put_object(
            Bucket=self.bucket, Key=key, Body=msgspec.json.encode(document), ContentType="application/json"
        )
        return key


@dataclass(slots=True)
class ForwardCounts:
    """What one invocation did with its messages."""

    records_sent: int = 0
    records_dead_lettered: int = 0
    batches_retried: int = 0
    #: Amberflo refused the API key (401/403) in this invocation: its status, else None.
    key_refused: int | None = None


class MessageForwarder:
    """Forwards one SQS message's records through the shared :class:`Forwarder`; the record handler of the batch.

    After one message gave up (Amberflo unreachable for the whole budget) or met a refused API key, or once
    ``deadline`` (monotonic) is near, the remaining messages are handed back to SQS without a request: they would only
    spend the Lambda's time.
    """

    def __init__(
        self, forwarder: Forwarder, *, api_key: str, dead_letters: S3DeadLetters, deadline: float | None = None
    ) -> None:
        self._forwarder = forwarder
        self._api_key = api_key
        self._dead_letters = dead_letters
        self._deadline = deadline
        self._unreachable: str | None = None
        self.counts = ForwardCounts()

    def __call__(self, record: SQSRecord) -> None:
        """Send the message's records; return if every record was accepted or dead-lettered.

        Raises:
            RetryLaterError: not delivered yet; the batch processor reports the message in batchItemFailures.
        """
        records: list[dict[str, Any]] = msgspec.json.decode(record.body)
        if self._unreachable is not None:
            self._retry_later(f"not tried: {self._unreachable}")
        halt = threading.Event()
        timer: threading.Timer | None = None
        if self._deadline is not None:
            left = self._deadline - time.monotonic()
            if left <= 0:
                self._retry_later("not tried: the invocation is out of time")
            timer = threading.Timer(left, halt.set)
            timer.start()
        try:
            outcome = self._forwarder.send_batch(encode_batch(records), api_key=self._api_key, halt=halt)
        finally:
            if timer is not None:
                timer.cancel()
        if isinstance(outcome, GaveUp):
            self._unreachable = outcome.last_error
            self._retry_later(outcome.last_error)
        elif isinstance(outcome, KeyRefused):
            self._unreachable = f"Amberflo refused the API key ({outcome.status})"
            self.counts.key_refused = outcome.status
            logger.error(
                "Amberflo refused the API key: the messages go back to the queue, nothing is dead-lettered; fix the "
                "secret (it is read again on the next invocation)",
                extra={"status": outcome.status, "answer": outcome.body[:500]},
            )
            self._retry_later(self._unreachable)
        elif isinstance(outcome, RecordsRefused):
            for refused in outcome.refused:
                key = self._dead_letters.put(
                    f"{record.message_id}-{refused.index}",
                    [refused.record],
                    message_id=record.message_id,
                    status=refused.status,
                    answer=refused.body,
                    attempts=outcome.attempts,
                )
                logger.error("Amberflo refused a record for good", extra={"key": key, "status": refused.status})
            self.counts.records_dead_lettered += len(outcome.refused)
            self.counts.records_sent += len(records) - len(outcome.refused)
        elif isinstance(outcome, DeadLetter):
            key = self._dead_letters.put(
                record.message_id,
                records,
                message_id=record.message_id,
                status=outcome.status,
                answer=outcome.body,
                attempts=outcome.attempts,
            )
            logger.error("Amberflo refused a batch for good", extra={"key": key, "status": outcome.status})
            self.counts.records_dead_lettered += len(records)
        else:
            self.counts.records_sent += len(records)

    def _retry_later(self, why: str) -> None:
        self.counts.batches_retried += 1
        raise RetryLaterError(why)


def forward_messages(event: dict[str, Any], handler: MessageForwarder, context: Any = None) -> dict[str, Any]:
    """Run ``handler`` on every message of an SQS event; the partial response names those to redeliver.

    Every message failing is a partial response too (no exception), so SQS counts a receive for each and the
    redrive policy applies the same way.
    """
    processor = BatchProcessor(event_type=EventType.SQS, raise_on_entire_batch_failure=False)
    return dict(process_partial_response(event=event, record_handler=handler, processor=processor, context=context))


# -- Lambda entry point ---------------------------------------------------------------------------------------------


@functools.cache
def _forwarder_runtime() -> tuple[ForwarderSettings, Forwarder]:
    settings = ForwarderSettings.from_env()
    return settings, Forwarder(settings.amberflo)


@functools.cache
def _s3() -> Any:
    import boto3  # type: ignore[import-untyped]

    return boto3.client("s3")


def reset_caches() -> None:
    """Forget the settings, client and API key read so far (tests; a warm Lambda keeps them)."""
    for cached in (_forwarder_runtime, _s3):
        cached.cache_clear()
    parameters.clear_caches()  # type: ignore[no-untyped-call]


@logger.inject_lambda_context
def forwarder_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    """SQS entry point: forward each message's records; answer with the messages SQS must redeliver."""
    settings, forwarder = _forwarder_runtime()
    if settings.amberflo.dry_run:
        # The stack leaves the queue's event source disabled in a dry run. Invoked anyway (the subscription enabled
        # by hand), send nothing and hand every message back; each receive counts toward the dead-letter redrive.
        logger.error(
            "amberflo.dry_run is set but the forwarder was invoked: nothing is sent and every message goes back to "
            "the queue (after maxReceiveCount receives, to its dead-letter queue)"
        )
        return {"batchItemFailures": [{"itemIdentifier": record["messageId"]} for record in event.get("Records", [])]}
    s3 = _s3()
    secret = parameters.get_secret(settings.secret_name, transform="json", max_age=SECRET_MAX_AGE_S)
    api_key = secret.get(settings.secret_json_key) if isinstance(secret, dict) else None
    if not isinstance(api_key, str) or not api_key:
        raise ApiKeyMissingError(settings.secret_name, settings.secret_json_key)
    deadline = time.monotonic() + context.get_remaining_time_in_millis() / 1000 - FORWARDER_STOP_MARGIN_S
    handler = MessageForwarder(
        forwarder, api_key=api_key, dead_letters=S3DeadLetters(s3, bucket=settings.bucket), deadline=deadline
    )
    response = forward_messages(event, handler, context)
    metrics = Metrics(namespace=METRICS_NAMESPACE, service=FORWARDER_SERVICE)
    metrics.add_metric(name="RecordsSent", unit=MetricUnit.Count, value=handler.counts.records_sent)
    metrics.add_metric(name="RecordsDeadLettered", unit=MetricUnit.Count, value=handler.counts.records_dead_lettered)
    metrics.add_metric(name="BatchesRetried", unit=MetricUnit.Count, value=handler.counts.batches_retried)
    # 0 or 1 per invocation: alarm on its maximum. The backlog waits on the queue for a working key.
    metrics.add_metric(name="ApiKeyRefused", unit=MetricUnit.Count, value=int(handler.counts.key_refused is not None))
    metrics.flush_metrics()
    if handler.counts.key_refused is not None:
        parameters.clear_caches()  # type: ignore[no-untyped-call]  # read the (fixed?) secret again next time
    return response

"""What code asks of AWS, recorded on the wire: moto's server on loopback, and each request as IAM authorizes it.

Handlers run against this server with the environment their template gives them; every request any client sends
(boto3, and Arrow's own S3 client under pyiceberg) is recorded, then turned into the IAM authorizations AWS would
make for it (:func:`authorizations`). Recording on the wire rather than in boto3 is what catches calls made by
libraries that bring their own AWS client.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, unquote

from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import BaseWSGIServer, make_server

from tests.cdk_stacks.iam_evaluation import ACCOUNT, PARTITION, REGION, AwsCall, UnsupportedPolicyError

_CREDENTIAL_SCOPE = re.compile(r"Credential=[^/]+/\d{8}/([^/]+)/([^/]+)/aws4_request")


@dataclass(frozen=True)
class RecordedRequest:
    """One request moto answered: which service (from its SigV4 scope), what was asked, and the status."""

    service: str
    region: str
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    status: int

    def describe(self) -> str:
        """A line naming the request, for failure messages."""
        target = self.headers.get("x-amz-target", "")
        query = "&".join(sorted(self.query))
        return f"{self.service} {self.method} {self.path}{'?' + query if query else ''} {target} -> {self.status}"


class RecordingMotoServer:
    """moto's server on 127.0.0.1 (an ephemeral port), recording every request; use as a context manager."""

    def __init__(self) -> None:
        self.requests: list[RecordedRequest] = []
        self._lock = threading.Lock()
        self._app = DomainDispatcherApplication(create_backend_app)
        self._server: BaseWSGIServer = make_server(
            "127.0.0.1", 0, self._record, threaded=True, request_handler=MotoRequestHandler
        )
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="moto", daemon=True)

    def __enter__(self) -> RecordingMotoServer:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._server.shutdown()
        self._thread.join(5)

    def _record(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        headers = {k[5:].replace("_", "-").lower(): v for k, v in environ.items() if k.startswith("HTTP_")}
        body = b""
        # Only API calls carry their parameters in the body (JSON or form); S3 bodies are data, left unread.
        if "x-amz-target" in headers or environ.get("CONTENT_TYPE", "").startswith("application/x-www-form"):
            body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
            environ["wsgi.input"] = _Replay(body)
        statuses: list[int] = []

        def remember_status(status: str, response_headers: Any, exc_info: Any = None) -> Any:
            statuses.append(int(status.split(" ", 1)[0]))
            return start_response(status, response_headers, exc_info)

        answer: Iterable[bytes] = self._app(environ, remember_status)
        scope = _CREDENTIAL_SCOPE.search(headers.get("authorization", ""))
        request = RecordedRequest(
            service=scope.group(2) if scope else "unsigned",
            region=scope.group(1) if scope else "",
            method=environ["REQUEST_METHOD"],
            path=unquote(environ.get("PATH_INFO", "")),
            query=parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True),
            headers=headers,
            body=body,
            status=statuses[0] if statuses else 0,
        )
        with self._lock:
            self.requests.append(request)
        return answer

    def take(self) -> list[RecordedRequest]:
        """The requests recorded since the last call, oldest first."""
        with self._lock:
            taken, self.requests = self.requests, []
        return taken


class _Replay:
    """A WSGI input stream over bytes already read."""

    def __init__(self, body: bytes) -> None:
        self._body = body
        self._position = 0

    def read(self, size: int = -1) -> bytes:
        end = len(self._body) if size < 0 else self._position + size
        chunk = self._body[self._position : end]
        self._position += len(chunk)
        return chunk

    def readline(self, size: int = -1) -> bytes:
        end = self._body.find(b"\n", self._position)
        end = len(self._body) if end < 0 else end + 1
        if size >= 0:
            end = min(end, self._position + size)
        return self.read(end - self._position)

    def __iter__(self) -> Iterator[bytes]:
        while line := self.readline():
            yield line


# -- requests -> the authorizations IAM makes ----------------------------------------------------------------------

#: Every request travels over TLS on AWS; bucket and queue policies deny anything else.
_TRANSPORT = {"aws:SecureTransport": "true"}
#: SQS batch operations are authorized as their single-message actions.
_SQS_ACTIONS = {
    "SendMessageBatch": "SendMessage",
    "DeleteMessageBatch": "DeleteMessage",
    "ChangeMessageVisibilityBatch": "ChangeMessageVisibility",
}
#: Calls that need no permission.
_UNAUTHORIZED_OPERATIONS = frozenset({("sts", "GetCallerIdentity")})


def authorizations(
    request: RecordedRequest, *, secret_arn: Callable[[str], str] | None = None, account: str = ACCOUNT
) -> list[AwsCall]:
    """The IAM authorizations AWS makes to answer ``request`` as moto answered it.

    ``secret_arn`` turns a Secrets Manager SecretId (a name) into the secret's full ARN.

    Raises:
        UnsupportedPolicyError: a service or operation this mapping does not know (never skipped silently).
    """
    if request.service == "s3":
        return _s3(request)
    target = request.headers.get("x-amz-target")
    if target is not None:
        operation = target.rsplit(".", 1)[1]
        params: dict[str, Any] = json.loads(request.body or b"{}")
    else:
        form = parse_qs(request.body.decode())
        if "Action" not in form:
            raise UnsupportedPolicyError(f"cannot tell the operation of {request.describe()}")
        operation = form["Action"][0]
        params = {key: values[0] for key, values in form.items()}
    if (request.service, operation) in _UNAUTHORIZED_OPERATIONS:
        return []
    why = request.describe()
    region = request.region or REGION
    if request.service == "glue":
        return [_glue(operation, params, region=region, account=account, why=why)]
    if request.service == "sqs":
        *_, queue_account, name = params["QueueUrl"].rstrip("/").split("/")
        arn = f"arn:{PARTITION}:sqs:{region}:{queue_account}:{name}"
        return [AwsCall(f"sqs:{_SQS_ACTIONS.get(operation, operation)}", (arn,), _TRANSPORT, why)]
    if request.service == "secretsmanager" and operation == "GetSecretValue":
        if secret_arn is None:
            raise UnsupportedPolicyError("a Secrets Manager call needs secret_arn to name the secret's ARN")
        return [AwsCall("secretsmanager:GetSecretValue", (secret_arn(params["SecretId"]),), _TRANSPORT, why)]
    raise UnsupportedPolicyError(f"no IAM mapping for {request.describe()}")


def _glue(operation: str, params: dict[str, Any], *, region: str, account: str, why: str) -> AwsCall:
    """Glue authorizes a table operation on the catalog, the database and the table."""
    catalog_id = params.get("CatalogId", account)
    prefix = f"arn:{PARTITION}:glue:{region}:{catalog_id}"
    resources: tuple[str, ...]
    if operation in ("GetTable", "UpdateTable", "DeleteTable"):
        database = params["DatabaseName"]
        name = params["Name"] if operation != "UpdateTable" else params["TableInput"]["Name"]
        resources = (f"{prefix}:catalog", f"{prefix}:database/{database}", f"{prefix}:table/{database}/{name}")
    elif operation == "GetDatabase":
        resources = (f"{prefix}:catalog", f"{prefix}:database/{params['Name']}")
    else:
        raise UnsupportedPolicyError(f"no IAM mapping for glue {operation}")
    return AwsCall(f"glue:{operation}", resources, _TRANSPORT, why)


def _s3(request: RecordedRequest) -> list[AwsCall]:
    """S3's REST API, path style: ``/bucket`` for bucket operations, ``/bucket/key`` for object operations."""
    bucket, _, key = request.path.lstrip("/").partition("/")
    bucket_arn = f"arn:{PARTITION}:s3:::{bucket}"
    query = request.query
    why = request.describe()
    if not key:
        if request.method == "GET" and "location" in query:
            return [AwsCall("s3:GetBucketLocation", (bucket_arn,), _TRANSPORT, why)]
        if request.method == "GET" and "uploads" in query:
            return [AwsCall("s3:ListBucketMultipartUploads", (bucket_arn,), _TRANSPORT, why)]
        if request.method in ("GET", "HEAD") and not set(query) - {
            "list-type",
            "prefix",
            "delimiter",
            "max-keys",
            "continuation-token",
            "start-after",
            "encoding-type",
            "fetch-owner",
        }:
            context: dict[str, str] = dict(_TRANSPORT)
            for name in ("prefix", "delimiter", "max-keys"):
                if name in query:
                    context[f"s3:{name}"] = query[name][0]
            return [AwsCall("s3:ListBucket", (bucket_arn,), context, why)]
        raise UnsupportedPolicyError(f"no IAM mapping for {why}")
    object_arn = f"{bucket_arn}/{key}"
    if request.method in ("GET", "HEAD"):
        calls = [AwsCall("s3:GetObject", (object_arn,), _TRANSPORT, why)]
        if request.status == 404:
            # S3 tells a caller a key is missing (404) only if it may list the bucket; anyone else gets 403. The
            # check is made without the s3:prefix a ListObjects request would carry.
            calls.append(AwsCall("s3:ListBucket", (bucket_arn,), _TRANSPORT, f"{why}: a missing key reads as 404"))
        return calls
    if request.method == "DELETE":
        action = "s3:AbortMultipartUpload" if "uploadId" in query else "s3:DeleteObject"
        return [AwsCall(action, (object_arn,), _TRANSPORT, why)]
    if request.method in ("PUT", "POST") and ("x-amz-copy-source" not in request.headers):
        # PutObject, and the multipart upload's create, parts and complete, are all authorized as s3:PutObject.
        return [AwsCall("s3:PutObject", (object_arn,), _TRANSPORT, why)]
    raise UnsupportedPolicyError(f"no IAM mapping for {why}")

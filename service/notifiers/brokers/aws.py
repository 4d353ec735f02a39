"""Amazon SQS and EventBridge destinations with boto3.

Credentials come from boto3's standard chain (environment, shared files, instance or
task role); ``MOTIONHOOK_AWS_ENDPOINT_URL`` sends every call to a local endpoint
(moto, LocalStack). boto3 only ever connects to the AWS endpoint of the region (or
that endpoint), never to a host taken from the subscription URL, so no outbound
guard is needed here. One client per destination; boto3 clients are thread-safe
and keep their own connection pool. boto3's retries are off: the delivery policy
retries on its schedule.

- SQS: ``SendMessage`` of the envelope with the signature headers as message
  attributes; FIFO queues get ``MessageGroupId`` = job id and
  ``MessageDeduplicationId`` = event id, so a retried delivery is dropped by SQS.
- EventBridge: ``PutEvents`` with ``Source`` ``motionhook``, ``DetailType`` = event
  type and ``Detail`` = the envelope. PutEvents has no attributes, so the signature
  headers are not carried: who may put events on a bus is decided by IAM, and
  consumers de-duplicate on ``detail.id``.
"""

from __future__ import annotations

import contextlib
from typing import Any

import boto3
from botocore import exceptions as aws_errors
from botocore.config import Config

from service.notifiers.brokers import Answer, OneByOne, Outgoing
from service.notifiers.policy import Outcome

SOURCE = "motionhook"
POOL_CONNECTIONS = 16
AUTH_CODES = frozenset(
    {
        "AccessDenied",
        "AccessDeniedException",
        "AuthFailure",
        "IncompleteSignature",
        "InvalidAccessKeyId",
        "InvalidClientTokenId",
        "InvalidSignatureException",
        "MissingAuthenticationToken",
        "SignatureDoesNotMatch",
        "UnrecognizedClientException",
    }
)
MISSING_CODES = frozenset(
    {
        "AWS.SimpleQueueService.NonExistentQueue",
        "NonExistentQueue",
        "QueueDoesNotExist",
        "ResourceNotFoundException",
    }
)
RETRY_CODES = frozenset(
    {
        "InternalError",
        "InternalFailure",
        "RequestThrottled",
        "RequestTimeout",
        "ServiceUnavailable",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
    }
)
UNAVAILABLE_ERRORS = (
    aws_errors.EndpointConnectionError,
    aws_errors.ConnectTimeoutError,
    aws_errors.ReadTimeoutError,
    aws_errors.ConnectionClosedError,
)


class EntryFailed(Exception):
    """EventBridge accepted the call but not the entry (``FailedEntryCount`` 1)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


class _AwsPublisher(OneByOne):
    service = ""
    _client: Any = None

    def _open(self, timeout: float) -> None:
        config = Config(
            connect_timeout=timeout,
            read_timeout=timeout,
            retries={"total_max_attempts": 1},
            max_pool_connections=POOL_CONNECTIONS,
            user_agent_extra=SOURCE,
        )
        # A session per client: boto3's default session is not safe to share across threads.
        self._client = boto3.session.Session().client(
            self.service,  # type: ignore[call-overload]
            region_name=self.destination.region,
            endpoint_url=self.settings.aws_endpoint_url,
            config=config,
        )

    def _close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()

    def is_stale(self, error: Exception) -> bool:
        return False  # boto3 replaces dead pooled connections by itself

    def classify(self, error: Exception) -> Outcome | None:
        if isinstance(error, EntryFailed):
            if error.code in AUTH_CODES:
                return Outcome("permanent", f"access denied: {error}")
            if error.code in RETRY_CODES:
                return Outcome("retry", str(error)[:200])
            return Outcome("failed", str(error)[:200])
        if isinstance(error, aws_errors.ClientError):
            details = error.response.get("Error", {})
            code = str(details.get("Code", ""))
            text = f"{code}: {details.get('Message', '')}"[:200]
            status = int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
            if code in AUTH_CODES:
                return Outcome("permanent", f"authentication failed: {text}")
            if code in MISSING_CODES:
                return Outcome("permanent", f"{self.missing} does not exist: {text}")
            if code in RETRY_CODES or status >= 500 or status == 429:
                return Outcome("retry", text)
            return Outcome("failed", text)
        if isinstance(error, aws_errors.NoCredentialsError | aws_errors.PartialCredentialsError):
            return Outcome("permanent", "no AWS credentials: boto3's credential chain found none")
        if isinstance(error, aws_errors.NoRegionError):
            return Outcome("failed", "no AWS region: add ?region= to the url or set AWS_REGION")
        if isinstance(error, UNAVAILABLE_ERRORS):
            return Outcome("retry", f"could not reach AWS ({type(error).__name__})")
        if isinstance(error, aws_errors.BotoCoreError):
            return Outcome("retry", f"AWS client error ({type(error).__name__})")
        return None

    @property
    def missing(self) -> str:
        return self.destination.origin


class SqsPublisher(_AwsPublisher):
    """Sends to one SQS queue (standard or FIFO)."""

    service = "sqs"

    def _send(self, message: Outgoing, timeout: float) -> Answer:
        params: dict[str, Any] = {
            "QueueUrl": self.destination.path,
            "MessageBody": message.body.decode(),
            "MessageAttributes": {
                name: {"DataType": "String", "StringValue": value}
                for name, value in message.headers.items()
            },
        }
        if self.destination.fifo:
            params["MessageGroupId"] = message.group_id
            params["MessageDeduplicationId"] = message.event_id
        answer = self._client.send_message(**params)
        sequence = answer.get("SequenceNumber")
        return Answer(
            f"MessageId {answer['MessageId']}" + (f", sequence {sequence}" if sequence else ""),
            status=answer["ResponseMetadata"]["HTTPStatusCode"],
        )


class EventBridgePublisher(_AwsPublisher):
    """Puts events on one EventBridge bus."""

    service = "events"

    def _send(self, message: Outgoing, timeout: float) -> Answer:
        answer = self._client.put_events(
            Entries=[
                {
                    "Source": SOURCE,
                    "DetailType": message.event_type,
                    "Detail": message.body.decode(),
                    "EventBusName": self.destination.path,
                }
            ]
        )
        (entry,) = answer["Entries"]
        if answer.get("FailedEntryCount") or "EventId" not in entry:
            raise EntryFailed(str(entry.get("ErrorCode")), str(entry.get("ErrorMessage")))
        return Answer(
            f"EventId {entry['EventId']}", status=answer["ResponseMetadata"]["HTTPStatusCode"]
        )

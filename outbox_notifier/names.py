"""The pipeline's shared vocabulary: channel, provider, record status, call outcome and error
code names (all contract names). A small module of its own so that every stage, the store and
the metrics can use them without importing each other.

Names (one word per concept, in code, logs and docs):

- *channel*: the record's logical channel, ``notification_records.channel`` (``CHANNEL``): the
  namespace of its dedupe key and the ``channel`` metric label. Not the platform.
- *provider*: the platform that makes the call (``PROVIDER_NAMES``; ``providers.Provider``), as
  the recipient's ``provider`` column names it: the ``provider`` metric label.
- *recipient*: the user's row in ``notification_channels`` for the record's channel (enabled,
  webhook URL, auth), as delivery reads it (``providers.model.Recipient``); missing or
  disabled, the record is skipped with ``recipient_missing``. A 410 *disables the channel*
  (``disable_channel``): the recipient row is switched off.
- *target*: the endpoint a webhook URL points at (``targets``, ``target_key``): the unit of
  pacing and of the breaker. The payload's ``target_type``, ``target_id`` and ``target_url``
  are contract fields about something else: the business object the notification is about.
- *pacing*: how often one target may be called, the 429 throttle included (``store.Pacing``);
  the *breaker*: a failing target left alone for a cool-off, its state *tripped* or open in
  code (``store.Breaker``), ``paused_until`` in the contract's columns and metric names.
- *digest*: one chat-bot message carrying several records to one recipient
  (``HttpProvider.send_digest``), for records its budget cannot send one by one; each record
  keeps its own transition and attempt row, the rows of one call sharing its *message id*.
  The records of a target that wait for its next digest are its *queue*
  (``notification_records.digest_target``).
- *attempt result*: what one call produced and the status it leads to
  (``store.AttemptResult``); *applied record*, *rescued record*: a record as the statement
  that changed it returned it.
"""

from __future__ import annotations

import enum
from typing import Final, Literal

#: The channel every record of the event contract is delivered on.
CHANNEL: Final = "feishu"

#: Every provider name a channel row may select (``notification_channels.provider``, whose CHECK
#: constraint lists the same), in registry order: the bounded ``provider`` metric label. Each has
#: its entry in ``providers.REGISTRY`` (a test holds the two together).
PROVIDER_NAMES: Final = (
    "feishu_flow",
    "feishu_bot",
    "webhook",
    "dingtalk_bot",
    "wecom_bot",
    "slack_webhook",
)

RecordStatus = Literal["pending", "sending", "sent", "failed", "dead", "skipped"]
"""A notification record's status."""


class Outcome(enum.StrEnum):
    """How one provider call ended (contract names)."""

    SUCCESS = "success"
    TEMPORARY_FAIL = "temporary_fail"
    PERMANENT_FAIL = "permanent_fail"
    SKIPPED = "skipped"


class ErrorCode(enum.StrEnum):
    """Why a provider call did not succeed (contract names, as in the seed)."""

    # retryable
    PROVIDER_TIMEOUT = "provider_timeout"
    PROVIDER_RATE_LIMITED = "provider_rate_limited"
    PROVIDER_5XX = "provider_5xx"
    NETWORK_ERROR = "network_error"
    SENDING_LEASE_EXPIRED = "sending_lease_expired"
    # permanent
    RECIPIENT_MISSING = "recipient_missing"
    INVALID_URL = "invalid_url"
    PROVIDER_AUTH_FAILED = "provider_auth_failed"
    PAYLOAD_INVALID = "payload_invalid"
    ENDPOINT_GONE = "endpoint_gone"  # HTTP 410: the receiver retired the endpoint for good
    # The egress guard refused the address (loopback, private, link-local, metadata ...):
    # no connection was made, and retrying cannot change that.
    DESTINATION_FORBIDDEN = "destination_forbidden"


RETRYABLE_ERROR_CODES: frozenset[ErrorCode] = frozenset(
    {
        ErrorCode.PROVIDER_TIMEOUT,
        ErrorCode.PROVIDER_RATE_LIMITED,
        ErrorCode.PROVIDER_5XX,
        ErrorCode.NETWORK_ERROR,
        ErrorCode.SENDING_LEASE_EXPIRED,
    }
)
PERMANENT_ERROR_CODES: frozenset[ErrorCode] = frozenset(set(ErrorCode) - RETRYABLE_ERROR_CODES)

"""Logging setup: one line per event, plain or JSON, with the record's context fields.

Modules log through ``logging.getLogger(__name__)`` (so loggers are ``outbox_notifier.<module>``)
with lazy %-style messages and context in ``extra``::

    log.info("delivered record %s", record_id, extra={"record_id": record_id, "attempt": 2})

plain::

    2024-05-01 12:00:00,123 INFO outbox_notifier.delivery delivered record 7 record_id=7 attempt=2

json (one object per line)::

    {"ts":"2024-05-01T12:00:00.123Z","level":"INFO","logger":"outbox_notifier.delivery",
     "msg":"delivered record 7","record_id":7,"attempt":2}

With tracing on (``outbox_notifier.tracing``), a line written inside a span carries the span's
``trace_id`` and ``span_id`` (a ``trace_id`` of its own that differs becomes ``payload_trace_id``).
"""

from __future__ import annotations

import datetime as dt
import logging
import sys
from typing import Any

import msgspec

from outbox_notifier import tracing

PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"

# Attributes every LogRecord has; anything else on a record came from ``extra``.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", logging.INFO, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "taskName",
}

# Defence in depth: callers must not put secrets in ``extra``, but if one does, it is not written.
_SECRET_WORDS = ("secret", "token", "password", "authorization", "webhook_url")
_MASK = "***"

# Loggers of libraries that would print what must never be logged: httpx logs every request's
# full URL at INFO, and a Feishu webhook URL is a credential.
_QUIET_LOGGERS = ("httpx", "httpcore")

_json_encoder = msgspec.json.Encoder(enc_hook=str)


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for key, value in vars(record).items():
        if key in _RECORD_ATTRS or key.startswith("_"):
            continue
        lowered = key.lower()
        fields[key] = _MASK if any(w in lowered for w in _SECRET_WORDS) else value
    if "span_id" not in fields:
        # Tracing (None when off, or outside any span): the line points at the current span.
        ids = tracing.active.log_ids()
        if ids is not None:
            own = fields.get("trace_id")
            if own and own != ids[0]:
                fields["payload_trace_id"] = own
            fields["trace_id"], fields["span_id"] = ids
    return fields


def _plain_value(value: object) -> str:
    text = value if isinstance(value, str) else str(value)
    if not text or any(c.isspace() or c in "\"'=" for c in text):
        return msgspec.json.encode(text).decode()
    return text


class PlainFormatter(logging.Formatter):
    """``PLAIN_FORMAT`` followed by the extra fields as ``key=value`` pairs."""

    def __init__(self) -> None:
        super().__init__(PLAIN_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        extras = _extras(record)
        if extras:
            tail = " ".join(f"{k}={_plain_value(v)}" for k, v in extras.items())
            line = f"{line} {tail}"
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, the extra fields, and exc if any."""

    def format(self, record: logging.LogRecord) -> str:
        ts = dt.datetime.fromtimestamp(record.created, tz=dt.UTC)
        doc: dict[str, Any] = {
            "ts": ts.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in _extras(record).items():
            doc.setdefault(key, value)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        return _json_encoder.encode(doc).decode()


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the handler this module installed, so reconfiguring replaces it."""


def configure_logging(fmt: str, level: str) -> None:
    """Sends every log record to stderr in ``fmt`` ("plain" or "json") at ``level`` and above.

    Safe to call again: the handler installed by an earlier call is replaced.
    """
    if fmt not in ("plain", "json"):
        raise ValueError(f"unknown log format {fmt!r}; expected 'plain' or 'json'")
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")

    handler = _Handler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else PlainFormatter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(numeric)
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(numeric, logging.WARNING))

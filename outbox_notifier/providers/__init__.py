"""Delivery channels: each turns one claimed ``Delivery`` into one ``SendResult``.

``REGISTRY`` is the one description of the providers: the name a channel row selects
(``notification_channels.provider``), the prefix of its settings and its class. The provider
factory (``default_providers``), the claim policy's pacing (``claim_policy``) and the bounded
``provider`` metric label (``PROVIDER_NAMES``) all read it. Adding a provider is one module
here, one entry below and its five settings (``<prefix>_allowed_schemes``,
``<prefix>_allowed_hosts``, ``<prefix>_path_prefix``, ``<prefix>_max_per_s``,
``<prefix>_max_per_min``) in ``Settings``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final

import httpx
import msgspec

from outbox_notifier.settings import Settings
from outbox_notifier.store import ClaimPolicy

from .base import (
    PERMANENT_ERROR_CODES,
    RETRYABLE_ERROR_CODES,
    Delivery,
    ErrorCode,
    HttpProvider,
    Outcome,
    Provider,
    SendResult,
    Target,
    UrlPolicy,
    UrlRejected,
    classify_status,
    parse_retry_after,
    read_body_capped,
)
from .dingtalk_bot import DingTalkBotProvider
from .feishu_bot import FeishuBotProvider
from .feishu_flow import FeishuFlowProvider
from .slack_webhook import SlackWebhookProvider
from .webhook import WebhookProvider
from .wecom_bot import WeComBotProvider


class ProviderSettings(msgspec.Struct, frozen=True, kw_only=True):
    """One provider's settings: its URL policy and its per-target pacing (0: no limit)."""

    allowed_schemes: tuple[str, ...]
    allowed_hosts: tuple[str, ...]
    path_prefix: str
    max_per_s: int
    max_per_min: int

    @classmethod
    def read(cls, settings: Settings, prefix: str) -> ProviderSettings:
        """The ``<prefix>_<field>`` settings (a test checks each exists for every entry)."""
        return cls(
            **{name: getattr(settings, f"{prefix}_{name}") for name in cls.__struct_fields__}
        )


def _no_options(settings: Settings) -> Mapping[str, Any]:
    return {}


class ProviderSpec(msgspec.Struct, frozen=True, kw_only=True):
    """A provider as the registry describes it. ``options`` gives its own constructor
    options beyond ``HttpProvider``'s (say, a message format) from the settings."""

    name: str
    settings_prefix: str
    cls: Callable[..., HttpProvider]
    options: Callable[[Settings], Mapping[str, Any]] = _no_options

    def settings(self, settings: Settings) -> ProviderSettings:
        return ProviderSettings.read(settings, self.settings_prefix)

    def build(self, settings: Settings, transport: httpx.AsyncBaseTransport) -> HttpProvider:
        own = self.settings(settings)
        return self.cls(
            transport,
            frontend_base_url=settings.frontend_base_url,
            allowed_schemes=own.allowed_schemes,
            allowed_hosts=own.allowed_hosts,
            path_prefix=own.path_prefix,
            timeout_s=settings.http_timeout_s,
            response_body_max_bytes=settings.response_body_max_bytes,
            **self.options(settings),
        )


REGISTRY: Final = (
    ProviderSpec(name="feishu_flow", settings_prefix="flow", cls=FeishuFlowProvider),
    ProviderSpec(
        name="feishu_bot",
        settings_prefix="bot",
        cls=FeishuBotProvider,
        options=lambda s: {"message_format": s.bot_message_format},
    ),
    ProviderSpec(name="webhook", settings_prefix="webhook", cls=WebhookProvider),
    ProviderSpec(name="dingtalk_bot", settings_prefix="dingtalk", cls=DingTalkBotProvider),
    ProviderSpec(name="wecom_bot", settings_prefix="wecom", cls=WeComBotProvider),
    ProviderSpec(name="slack_webhook", settings_prefix="slack", cls=SlackWebhookProvider),
)

#: Every provider name a channel row may select (``notification_channels.provider``): the one
#: list the bounded ``provider`` metric label and the provider table agree on.
PROVIDER_NAMES: Final = tuple(spec.name for spec in REGISTRY)


def default_providers(
    settings: Settings, transport: httpx.AsyncBaseTransport
) -> dict[str, Provider]:
    """The providers by the name a channel row selects, sharing ``transport``."""
    return {spec.name: spec.build(settings, transport) for spec in REGISTRY}


def claim_policy(settings: Settings) -> ClaimPolicy:
    """The claims' lease, per-target pacing by provider name, throttling and endpoint
    protection."""
    own = {spec.name: spec.settings(settings) for spec in REGISTRY}
    return ClaimPolicy(
        lease_s=settings.lease_s,
        per_s={name: s.max_per_s for name, s in own.items()},
        per_min={name: s.max_per_min for name, s in own.items()},
        margin_s=settings.pacing_margin_s,
        breaker_failures=settings.breaker_failures,
        cooloff_s=settings.breaker_cooloff_s,
        window_s=settings.breaker_window_s,
        min_calls=settings.breaker_min_calls,
        failure_ratio=settings.breaker_failure_ratio,
        slowdown_s=settings.throttle_slowdown_s,
        slow_per_s=settings.throttle_max_per_s,
        retry_after_max_s=settings.retry_after_max_s,
        durable=settings.durable_claims,
    )


__all__ = [
    "PERMANENT_ERROR_CODES",
    "PROVIDER_NAMES",
    "REGISTRY",
    "RETRYABLE_ERROR_CODES",
    "Delivery",
    "DingTalkBotProvider",
    "ErrorCode",
    "FeishuBotProvider",
    "FeishuFlowProvider",
    "Outcome",
    "Provider",
    "ProviderSettings",
    "ProviderSpec",
    "SendResult",
    "SlackWebhookProvider",
    "Target",
    "UrlPolicy",
    "UrlRejected",
    "WeComBotProvider",
    "WebhookProvider",
    "claim_policy",
    "classify_status",
    "default_providers",
    "parse_retry_after",
    "read_body_capped",
]

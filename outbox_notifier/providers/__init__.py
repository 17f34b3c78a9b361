"""The providers, one per platform: each turns one claimed ``Delivery`` into one ``SendResult``.

The package: ``model`` (the delivery, the result and the request and reply between them),
``base`` (``HttpProvider``, the prepare + send + classify template), ``sender`` (the one
place that talks to the transport), ``replies`` (the reply classifiers), ``bodies`` (the
fields every body carries), ``urls`` (the URL policy), ``chat`` (what the chat robots
share), and one module per platform.

``REGISTRY`` is the one description of the providers: the name a recipient selects
(``notification_channels.provider``, one of ``names.PROVIDER_NAMES``, which bound the
``provider`` metric label), the prefix of its settings and its class. The provider factory
(``default_providers``) and the claims' pacing (``daemon.claim_policy``) read it. Adding a
provider is one module here, its name in ``names.PROVIDER_NAMES``, one entry below and its
five settings (``<prefix>_allowed_schemes``, ``<prefix>_allowed_hosts``,
``<prefix>_path_prefix``, ``<prefix>_max_per_s``, ``<prefix>_max_per_min``) in ``Settings``;
a provider that can digest (a chat bot: ``HttpProvider.can_digest``) has a sixth,
``<prefix>_digest``, its switch, and is built with it and ``digest_max_records``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final

import httpx
import msgspec

from outbox_notifier.settings import Settings

from .base import HttpProvider
from .dingtalk_bot import DingTalkBotProvider
from .feishu_bot import FeishuBotProvider
from .feishu_flow import FeishuFlowProvider
from .model import DigestProvider, Provider
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

    @property
    def can_digest(self) -> bool:
        """Whether the provider's platform takes digests (``HttpProvider.can_digest``)."""
        return bool(getattr(self.cls, "can_digest", False))

    def digest_options(self, settings: Settings) -> Mapping[str, Any]:
        """``digest`` (the ``<prefix>_digest`` switch) and ``digest_max_records`` for a
        provider that can digest; nothing for one that cannot."""
        if not self.can_digest:
            return {}
        return {
            "digest": getattr(settings, f"{self.settings_prefix}_digest"),
            "digest_max_records": settings.digest_max_records,
        }

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
            **self.digest_options(settings),
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


def digester(provider: Provider) -> DigestProvider | None:
    """``provider`` when it merges records into digests (its ``digests`` on), else None."""
    return provider if isinstance(provider, HttpProvider) and provider.digests else None


def default_providers(
    settings: Settings, transport: httpx.AsyncBaseTransport
) -> dict[str, Provider]:
    """The providers by the name a channel row selects, sharing ``transport``."""
    return {spec.name: spec.build(settings, transport) for spec in REGISTRY}


__all__ = [
    "REGISTRY",
    "DigestProvider",
    "DingTalkBotProvider",
    "FeishuBotProvider",
    "FeishuFlowProvider",
    "ProviderSettings",
    "ProviderSpec",
    "SlackWebhookProvider",
    "WeComBotProvider",
    "WebhookProvider",
    "default_providers",
    "digester",
]

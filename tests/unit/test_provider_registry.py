"""The provider registry: one description of each provider's settings, read by the provider
factory and by the claim policy."""

from __future__ import annotations

import json

import httpx
import pytest

from outbox_notifier.daemon import claim_policy
from outbox_notifier.names import PROVIDER_NAMES
from outbox_notifier.providers import REGISTRY, ProviderSettings, default_providers
from outbox_notifier.providers.base import HttpProvider
from outbox_notifier.providers.model import Provider, Recipient
from outbox_notifier.providers.urls import UrlRejected
from outbox_notifier.settings import Settings, SettingsError
from tests.provider_support import make_delivery, mock_transport


def http(provider: Provider) -> HttpProvider:
    assert isinstance(provider, HttpProvider)
    return provider


def test_every_entry_has_its_settings() -> None:
    fields = set(Settings.__struct_fields__)
    for spec in REGISTRY:
        wanted = {f"{spec.settings_prefix}_{name}" for name in ProviderSettings.__struct_fields__}
        assert wanted <= fields, (spec.name, sorted(wanted - fields))


def test_a_provider_that_can_digest_has_its_switch_and_no_other_has_one() -> None:
    fields = set(Settings.__struct_fields__)
    for spec in REGISTRY:
        switch = f"{spec.settings_prefix}_digest"
        assert (switch in fields) is spec.can_digest, spec.name
        if spec.can_digest:
            assert getattr(Settings(), switch) is True


def test_names_come_from_the_registry_once_each() -> None:
    assert tuple(spec.name for spec in REGISTRY) == PROVIDER_NAMES
    assert len(set(PROVIDER_NAMES)) == len(PROVIDER_NAMES)
    assert len({spec.settings_prefix for spec in REGISTRY}) == len(REGISTRY)


def test_the_factory_applies_each_providers_url_policy() -> None:
    settings = Settings(
        flow_allowed_hosts=("example.org",),
        bot_path_prefix="/bots/",
        webhook_allowed_schemes=("http",),
        webhook_path_prefix="/in/",
    )
    providers = default_providers(settings, httpx.AsyncHTTPTransport())
    flow, bot, hook = (http(providers[n]) for n in ("feishu_flow", "feishu_bot", "webhook"))
    assert flow.check_url("https://www.example.org/flow/api/trigger-webhook/t")
    with pytest.raises(UrlRejected, match="host not allowed"):
        flow.check_url("https://www.feishu.cn/flow/api/trigger-webhook/t")
    assert bot.check_url("https://open.feishu.cn/bots/t")
    with pytest.raises(UrlRejected, match="path must start with '/bots/'"):
        bot.check_url("https://open.feishu.cn/open-apis/bot/v2/hook/t")
    assert hook.check_url("http://anywhere.example/in/x")
    with pytest.raises(UrlRejected, match="scheme 'https' not allowed"):
        hook.check_url("https://anywhere.example/in/x")
    with pytest.raises(UrlRejected, match="path must start with '/in/'"):
        hook.check_url("http://anywhere.example/out")


async def test_the_factory_passes_a_providers_own_options() -> None:
    sent: list[httpx.Request] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(200, content=b'{"code":0}')

    settings = Settings(bot_message_format="card", bot_allowed_schemes=("http",))
    async with mock_transport(handler) as transport:
        bot = default_providers(settings, transport)["feishu_bot"]
        url = "http://open.feishu.cn/open-apis/bot/v2/hook/t"
        recipient = Recipient(enabled=True, webhook_url=url, auth_kind="none", auth_secret=None)
        await bot.send(make_delivery(recipient))
    assert [json.loads(r.content)["msg_type"] for r in sent] == ["interactive"]


def test_the_claim_policy_paces_by_the_same_settings() -> None:
    policy = claim_policy(Settings(flow_max_per_s=3, webhook_max_per_min=7, lease_s=42))
    assert policy.pacing.per_s == {
        "feishu_flow": 3,
        "feishu_bot": 5,
        "webhook": 0,
        "dingtalk_bot": 0,
        "wecom_bot": 0,
        "slack_webhook": 1,
    }
    assert policy.pacing.per_min == {
        "feishu_flow": 0,
        "feishu_bot": 100,
        "webhook": 7,
        "dingtalk_bot": 20,
        "wecom_bot": 20,
        "slack_webhook": 0,
    }
    assert policy.lease_s == 42


def test_every_path_prefix_is_checked() -> None:
    with pytest.raises(SettingsError, match="webhook_path_prefix"):
        Settings(webhook_path_prefix="in/")

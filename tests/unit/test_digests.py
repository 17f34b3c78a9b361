"""Digests: several records to one chat robot in one message, in each platform's documented
format and within its documented limits (the limits and their pages are in each provider's
module docstring).

Pure ``prepare_digest`` calls where the body is the question; ``httpx.MockTransport`` where a
call is made. What every provider keeps for a digest (one call, no secret in the body or the
stored request) is in ``test_provider_contract``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import httpx
import msgspec
import pytest

from outbox_notifier import message
from outbox_notifier.names import ErrorCode, Outcome
from outbox_notifier.providers import (
    REGISTRY,
    DingTalkBotProvider,
    FeishuBotProvider,
    FeishuFlowProvider,
    SlackWebhookProvider,
    WebhookProvider,
    WeComBotProvider,
    default_providers,
    digester,
    dingtalk_bot,
    slack_webhook,
    wecom_bot,
)
from outbox_notifier.providers.base import HttpProvider
from outbox_notifier.providers.model import Delivery, DigestRequest, Recipient
from outbox_notifier.settings import Settings, SettingsError, load_settings
from tests import provider_support
from tests.provider_support import mock_transport, recording

NOW = datetime(2024, 1, 1, 0, 0, 0, tzinfo=UTC)
NOW_TS = "1704067200"
SECRET = "digest-signing-secret-XYZ"
BASE = "https://app.example.com"
CHAT_BOTS = ("feishu_bot", "dingtalk_bot", "wecom_bot", "slack_webhook")

URLS = {
    "feishu_bot": "https://open.feishu.cn/open-apis/bot/v2/hook/feishu-token-0123",
    "dingtalk_bot": "https://oapi.dingtalk.com/robot/send?access_token=ding-token-0123",
    "wecom_bot": "https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=wecom-key-0123",
    "slack_webhook": "https://hooks.slack.com/services/T000/B000/slack-secret-0123",
}
CLASSES: dict[str, type[HttpProvider]] = {
    "feishu_bot": FeishuBotProvider,
    "dingtalk_bot": DingTalkBotProvider,
    "wecom_bot": WeComBotProvider,
    "slack_webhook": SlackWebhookProvider,
}
# A summary at the seed's 180 runes, three UTF-8 bytes each: what a record's text can be
# without its fallback.
SUMMARY_180 = "日" * 179 + "末"


def make_provider(name: str, **options: Any) -> HttpProvider:
    options.setdefault("frontend_base_url", BASE)
    return CLASSES[name](
        httpx.MockTransport(lambda r: httpx.Response(200)), clock=lambda: NOW, **options
    )


def recipient(name: str, auth_kind: str = "none", secret: str | None = None) -> Recipient:
    return Recipient(enabled=True, webhook_url=URLS[name], auth_kind=auth_kind, auth_secret=secret)


def records(
    count: int, to: Recipient, text: Callable[[int], str] = lambda i: f"record {i} moved."
) -> list[Delivery]:
    """``count`` deliveries, oldest first, each with its own text and target."""
    return [
        provider_support.make_delivery(
            to,
            record_id=i,
            dedupe_key=f"dk-{i}",
            target_url=f"/assistant/preview/asp_{i}",
            message_text=f"{text(i)}\n/assistant/preview/asp_{i}",
        )
        for i in range(1, count + 1)
    ]


def digest_of(name: str, deliveries: Sequence[Delivery], **options: Any) -> DigestRequest:
    provider = make_provider(name, **options)
    to = deliveries[0].recipient
    assert to is not None
    return provider.prepare_digest(deliveries, to, provider.check_url(to.webhook_url))


def body(digest: DigestRequest) -> Any:
    return json.loads(digest.request.body)


def link(i: int) -> str:
    return f"{BASE}/assistant/preview/asp_{i}"


def text(delivery: Delivery) -> str:
    return delivery.message_text


# ---------------------------------------------------------------- who digests


def test_the_chat_bots_digest_by_default_and_flow_and_webhook_never() -> None:
    providers = default_providers(Settings(), httpx.AsyncHTTPTransport())
    assert {name for name, p in providers.items() if digester(p)} == set(CHAT_BOTS)
    for spec in REGISTRY:
        assert spec.can_digest is (spec.name in CHAT_BOTS)


@pytest.mark.parametrize("cls", [FeishuFlowProvider, WebhookProvider])
def test_flow_and_webhook_refuse_a_digest(cls: type[HttpProvider]) -> None:
    transport = httpx.AsyncHTTPTransport()
    with pytest.raises(ValueError, match="cannot digest"):
        cls(transport, allowed_hosts=("example.com",), digest=True)
    provider = cls(transport, allowed_hosts=("example.com",))
    assert provider.digests is False
    to = Recipient(
        enabled=True, webhook_url="https://example.com/x", auth_kind="none", auth_secret=None
    )
    with pytest.raises(ValueError, match="does not digest"):
        provider.prepare_digest(records(2, to), to, httpx.URL(to.webhook_url))


@pytest.mark.parametrize("name", CHAT_BOTS)
def test_a_switch_turned_off_says_the_provider_does_not_digest(name: str) -> None:
    prefix = {spec.name: spec.settings_prefix for spec in REGISTRY}[name]
    settings = Settings(**{f"{prefix}_digest": False})  # type: ignore[arg-type]
    providers = default_providers(settings, httpx.AsyncHTTPTransport())
    assert digester(providers[name]) is None
    assert {n for n, p in providers.items() if digester(p)} == set(CHAT_BOTS) - {name}
    off = make_provider(name, digest=False)
    to = recipient(name)
    with pytest.raises(ValueError, match="does not digest"):
        off.prepare_digest(records(2, to), to, httpx.URL(to.webhook_url))


def test_the_settings_are_validated_with_one_line() -> None:
    with pytest.raises(SettingsError, match=r"digest_max_records.*expected an integer >= 1"):
        load_settings(
            config_path=None, env={"OUTBOX_NOTIFIER_DIGEST_MAX_RECORDS": "0"}, overrides={}
        )
    with pytest.raises(
        SettingsError,
        match=r"^invalid setting wecom_digest \(from OUTBOX_NOTIFIER_WECOM_DIGEST\): "
        r"expected true or false, got 'maybe'$",
    ):
        load_settings(config_path=None, env={"OUTBOX_NOTIFIER_WECOM_DIGEST": "maybe"}, overrides={})
    with pytest.raises(ValueError, match="digest_max_records must be >= 1"):
        make_provider("slack_webhook", digest_max_records=0)


def test_the_registry_passes_digest_max_records() -> None:
    providers = default_providers(Settings(digest_max_records=2), httpx.AsyncHTTPTransport())
    provider = providers["wecom_bot"]
    assert isinstance(provider, HttpProvider)
    to = recipient("wecom_bot")
    digest = provider.prepare_digest(records(5, to), to, httpx.URL(to.webhook_url))
    assert digest.included == 2


# ---------------------------------------------------------------- each platform's shape


def test_dingtalk_digest_is_markdown_with_a_title_naming_the_count() -> None:
    given = records(3, recipient("dingtalk_bot"))
    digest = digest_of("dingtalk_bot", given)
    assert digest.included == 3
    title = "SmartFlow 日程调整建议 (3 条)"
    assert message.digest_title(3) == title
    assert body(digest) == {
        "msgtype": "markdown",
        "markdown": {
            "title": title,
            "text": f"### {title}\n\n"
            + "\n\n".join(
                f"{i}. record {i} moved.  \n/assistant/preview/asp_{i}  \n"
                f"[查看并确认调整]({link(i)})"
                for i in (1, 2, 3)
            ),
        },
    }
    assert digest.request.stored == digest.request.body


def test_wecom_digest_is_markdown_content() -> None:
    given = records(3, recipient("wecom_bot"))
    digest = digest_of("wecom_bot", given)
    assert digest.included == 3
    content = body(digest)["markdown"]["content"]
    assert body(digest) == {"msgtype": "markdown", "markdown": {"content": content}}
    assert content.startswith(f"### {message.digest_title(3)}\n\n1. record 1 moved.")
    positions = [content.index(f"[查看并确认调整]({link(i)})") for i in (1, 2, 3)]
    assert positions == sorted(positions)


def test_slack_digest_is_a_header_and_one_section_per_record() -> None:
    given = records(3, recipient("slack_webhook"))
    digest = digest_of("slack_webhook", given)
    assert digest.included == 3
    label = {"type": "plain_text", "text": "查看并确认调整"}
    title = message.digest_title(3)
    assert body(digest) == {
        "text": title,
        "blocks": [
            {"type": "header", "text": {"type": "plain_text", "text": title}},
            *(
                {
                    "type": "section",
                    "text": {"type": "plain_text", "text": text(d)},
                    "accessory": {"type": "button", "text": label, "url": link(i)},
                }
                for i, d in enumerate(given, 1)
            ),
        ],
    }


def test_feishu_text_format_digests_as_a_post() -> None:
    given = records(3, recipient("feishu_bot"))
    digest = digest_of("feishu_bot", given)
    assert digest.included == 3
    assert body(digest) == {
        "msg_type": "post",
        "content": {
            "post": {
                "zh_cn": {
                    "title": message.digest_title(3),
                    "content": [
                        [
                            {"tag": "text", "text": f"{i}. {text(d)} "},
                            {"tag": "a", "text": "查看并确认调整", "href": link(i)},
                        ]
                        for i, d in enumerate(given, 1)
                    ],
                }
            }
        },
    }


def test_feishu_card_format_digests_as_a_card() -> None:
    given = records(2, recipient("feishu_bot"))
    digest = digest_of("feishu_bot", given, message_format="card")
    card = body(digest)["card"]
    assert body(digest)["msg_type"] == "interactive"
    assert card["header"] == {"title": {"tag": "plain_text", "content": message.digest_title(2)}}
    button = {"tag": "button", "text": {"tag": "plain_text", "content": "查看并确认调整"}}
    assert card["elements"] == [
        element
        for i, d in enumerate(given, 1)
        for element in (
            {"tag": "div", "text": {"tag": "plain_text", "content": f"{i}. {text(d)}"}},
            {"tag": "action", "actions": [button | {"type": "primary", "url": link(i)}]},
        )
    ]


@pytest.mark.parametrize("name", CHAT_BOTS)
def test_without_an_absolute_link_a_record_has_its_text_only(name: str) -> None:
    """As the single message has no button then: the text already ends with the target."""
    digest = digest_of(name, records(2, recipient(name)), frontend_base_url="")
    sent = digest.request.body.decode()
    assert "查看并确认调整" not in sent
    assert "https://app" not in sent
    for i in (1, 2):
        assert json.dumps(f"/assistant/preview/asp_{i}")[1:-1] in sent


# ---------------------------------------------------------------- fitting


def included_texts(name: str, digest: DigestRequest, given: Sequence[Delivery]) -> None:
    """Each of the first ``included`` records' whole text is in the body, in order; none of
    the others is."""
    sent = digest.request.body.decode()
    at = 0
    for i, delivery in enumerate(given):
        encoded = json.dumps(delivery.message_text, ensure_ascii=False)[1:-1]
        if name in ("dingtalk_bot", "wecom_bot"):
            encoded = encoded.replace("\\n", "  \\n")
        found = sent.find(encoded, at)
        if i < digest.included:
            assert found >= at, (i, encoded[:40])
            at = found
        else:
            assert found == -1, i


# name, the limit's measure of a digest, the limit, a record text that fills it after a few
LIMITS: list[tuple[str, Callable[[DigestRequest], int], int]] = [
    ("feishu_bot", lambda d: len(d.request.body), 19_000),
    ("dingtalk_bot", lambda d: len(d.request.body), dingtalk_bot.DINGTALK_BODY_MAX_BYTES),
    (
        "wecom_bot",
        lambda d: len(body(d)["markdown"]["content"].encode()),
        wecom_bot.WECOM_MARKDOWN_MAX_BYTES,
    ),
]


@pytest.mark.parametrize(("name", "measure", "limit"), LIMITS, ids=[n for n, *_ in LIMITS])
@pytest.mark.parametrize("auth_kind", ["none", "bot_secret"])
def test_the_size_limit_holds_and_included_is_the_most_that_fits(
    name: str, measure: Callable[[DigestRequest], int], limit: int, auth_kind: str
) -> None:
    """Long records (a fallback text of 1000 runes, or the seed's 180-rune summary, in
    three-byte characters): fewer go, none is cut, and one more would not have fitted."""
    to = recipient(name, auth_kind, SECRET)
    long = 1000 if name != "wecom_bot" else 180
    given = records(20, to, lambda i: f"{i}:" + "長" * long)
    provider = make_provider(name)
    url = provider.check_url(to.webhook_url)
    digest = provider.prepare_digest(given, to, url)
    assert 2 <= digest.included < len(given)
    assert measure(digest) <= limit
    included_texts(name, digest, given)
    # the most that fits: one more record breaks the limit
    assert provider.digest_request(given[: digest.included + 1], to, url) is None
    assert digest == provider.prepare_digest(given[: digest.included], to, url)


@pytest.mark.parametrize("name", CHAT_BOTS)
def test_180_rune_summaries_are_never_cut(name: str) -> None:
    given = records(4, recipient(name), lambda i: SUMMARY_180)
    digest = digest_of(name, given)
    assert digest.included == 4
    included_texts(name, digest, given)


def test_slack_takes_at_most_50_blocks() -> None:
    given = records(60, recipient("slack_webhook"))
    digest = digest_of("slack_webhook", given, digest_max_records=100)
    assert digest.included == slack_webhook.MAX_BLOCKS - 1  # the header is a block
    assert len(body(digest)["blocks"]) == slack_webhook.MAX_BLOCKS


def test_slack_stops_before_a_section_over_3000_characters() -> None:
    given = records(5, recipient("slack_webhook"), lambda i: "x" * (3000 if i == 3 else 10))
    digest = digest_of("slack_webhook", given)
    assert digest.included == 2  # the third waits; it goes first, alone, in the next slot
    later = digest_of("slack_webhook", given[2:])
    assert later.included == 1
    assert body(later)["blocks"][0]["type"] == "section"  # its single message


@pytest.mark.parametrize("name", CHAT_BOTS)
def test_at_most_digest_max_records_go(name: str) -> None:
    digest = digest_of(name, records(5, recipient(name)), digest_max_records=3)
    assert digest.included == 3
    assert message.digest_title(3) in digest.request.body.decode()


@pytest.mark.parametrize("name", CHAT_BOTS)
def test_one_record_goes_as_its_single_message(name: str) -> None:
    """Alone (one given, or the first too long to share a message) a record is sent as its
    single message would be: it always goes."""
    provider = make_provider(name)
    to = recipient(name)
    url = provider.check_url(to.webhook_url)
    (one,) = records(1, to)
    assert provider.prepare_digest([one], to, url) == DigestRequest(
        request=provider.prepare(one, to, url), included=1
    )
    huge = records(3, to, lambda i: "長" * 8000 if i == 1 else "short")
    digest = provider.prepare_digest(huge, to, url)
    assert digest == DigestRequest(request=provider.prepare(huge[0], to, url), included=1)


def test_an_empty_run_is_refused() -> None:
    provider = make_provider("wecom_bot")
    to = recipient("wecom_bot")
    with pytest.raises(ValueError, match="at least one"):
        provider.prepare_digest([], to, httpx.URL(to.webhook_url))


# ---------------------------------------------------------------- signatures and secrets


@pytest.mark.parametrize("fmt", ["text", "card"])
def test_a_feishu_digest_is_signed_and_its_signature_masked(fmt: str) -> None:
    to = recipient("feishu_bot", "bot_secret", f" {SECRET} ")
    digest = digest_of("feishu_bot", records(3, to), message_format=fmt)
    sent = body(digest)
    assert list(sent)[:3] == ["timestamp", "sign", "msg_type"]
    assert sent["timestamp"] == NOW_TS
    assert sent["sign"] == provider_support.feishu_sign(NOW_TS, SECRET)
    stored = json.loads(digest.request.stored)
    assert stored == sent | {"sign": "***"}
    assert SECRET in digest.request.secrets
    assert SECRET.encode() not in digest.request.stored


def test_a_dingtalk_digest_is_signed_in_its_query() -> None:
    to = recipient("dingtalk_bot", "bot_secret", SECRET)
    digest = digest_of("dingtalk_bot", records(3, to))
    query = digest.request.url.query.decode()
    assert query.startswith("access_token=ding-token-0123&")
    signed = query.partition("&")[2]
    assert provider_support.dingtalk_signature_ok(signed, SECRET, NOW.timestamp())
    assert digest.request.stored == digest.request.body
    assert SECRET.encode() not in digest.request.body
    assert set(digest.request.secrets) >= {SECRET}


@pytest.mark.parametrize("name", ["feishu_bot", "dingtalk_bot"])
async def test_a_signing_channel_without_a_secret_is_not_sent(name: str) -> None:
    to = recipient(name, "bot_secret", "  ")
    seen, handler = recording(200)
    transport = mock_transport(handler)
    provider = CLASSES[name](transport, frontend_base_url=BASE, clock=lambda: NOW)
    async with transport:
        done = await provider.send_digest(records(3, to))
    assert done.included == 1
    provider_support.assert_not_called(
        seen, done.result, outcome=Outcome.PERMANENT_FAIL, code=ErrorCode.PROVIDER_AUTH_FAILED
    )


# ---------------------------------------------------------------- send_digest


async def test_send_digest_makes_one_call_for_the_records_it_holds() -> None:
    seen, handler = recording(200, content=b'{"errcode":0,"errmsg":"ok"}')
    transport = mock_transport(handler)
    provider = WeComBotProvider(transport, frontend_base_url=BASE, digest_max_records=4)
    given = records(6, recipient("wecom_bot"))
    async with transport:
        done = await provider.send_digest(given)
    assert done.included == 4
    assert done.result.outcome is Outcome.SUCCESS
    (request,) = seen
    assert json.loads(request.content)["msgtype"] == "markdown"
    assert done.result.request_json == request.content


async def test_send_digest_classifies_the_reply_as_send_does() -> None:
    _, handler = recording(200, json={"errcode": 45009, "errmsg": "api freq out of limit"})
    transport = mock_transport(handler)
    provider = WeComBotProvider(transport, frontend_base_url=BASE)
    async with transport:
        done = await provider.send_digest(records(3, recipient("wecom_bot")))
    assert done.included == 3
    assert done.result.outcome is Outcome.TEMPORARY_FAIL
    assert done.result.error_code is ErrorCode.PROVIDER_RATE_LIMITED


async def test_send_digest_wants_one_recipient() -> None:
    provider = make_provider("slack_webhook")
    given = records(2, recipient("slack_webhook"))
    other = msgspec.structs.replace(
        given[1], recipient=recipient("slack_webhook", "bearer", "another")
    )
    with pytest.raises(ValueError, match="share their recipient"):
        await provider.send_digest([given[0], other])
    with pytest.raises(ValueError, match="at least one"):
        await provider.send_digest([])


async def test_send_digest_without_a_recipient_answers_for_the_first_alone() -> None:
    seen, handler = recording(200)
    transport = mock_transport(handler)
    provider = SlackWebhookProvider(transport, frontend_base_url=BASE)
    disabled = msgspec.structs.replace(recipient("slack_webhook"), enabled=False)
    async with transport:
        done = await provider.send_digest(records(3, disabled))
    assert done.included == 1
    provider_support.assert_not_called(
        seen, done.result, outcome=Outcome.SKIPPED, code=ErrorCode.RECIPIENT_MISSING
    )

"""What a provider's error text may say of a webhook URL: nothing that carries its key."""

from __future__ import annotations

import httpx

from outbox_notifier.providers.urls import scrub

SIGNED = httpx.URL(
    "https://oapi.dingtalk.com/robot/send?access_token=tok-123456&timestamp=1700000000000"
    "&sign=c2lnbmF0dXJl"
)


def test_the_whole_path_and_query_are_masked() -> None:
    url = httpx.URL("https://open.feishu.cn/open-apis/bot/v2/hook/abcdef?x=1")
    text = scrub(f"cannot connect to {url}", url)
    assert "abcdef" not in text and "x=1" not in text
    assert "open.feishu.cn" in text


def test_a_key_is_masked_where_another_form_of_the_url_quotes_it() -> None:
    # The recipient's URL, unsigned, inside a message about the signed request: the signed
    # query as a whole is not in it, its access_token is.
    unsigned = "https://oapi.dingtalk.com/robot/send?access_token=tok-123456"
    text = scrub(f"connection reset while posting to {unsigned}", SIGNED)
    assert "tok-123456" not in text
    assert "oapi.dingtalk.com" in text


def test_short_values_are_left_alone() -> None:
    # a three-character value would mask unrelated words of the message
    url = httpx.URL("https://hooks.example/x?v=abc")
    assert scrub("abc went wrong", url) == "abc went wrong"

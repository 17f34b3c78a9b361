"""One trust store for every provider: the system's, plus ``ca_bundle`` added to it.

Certificates come from locally generated CAs (``trustme``). The "system" store is played by
a second CA named in ``SSL_CERT_FILE``, which OpenSSL's default paths (and so
``ssl.create_default_context``) read: a Feishu-like target signed by it must keep verifying
when ``ca_bundle`` adds a private CA.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import trustme

from outbox_notifier.httpclient import EgressConfig, ssl_context
from outbox_notifier.names import ErrorCode, Outcome
from outbox_notifier.providers.model import HttpReply, SendResult
from tests.tls_support import post_once, tls_server

LOOPBACK = ("127.0.0.0/8",)


async def call(config: EgressConfig, url: str) -> HttpReply | SendResult:
    return await post_once(config, url + "/flow/api/trigger-webhook/secret-token")


@pytest.fixture
def public_ca(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> trustme.CA:
    """A CA the (simulated) system store trusts."""
    ca = trustme.CA()
    path = tmp_path / "system.pem"
    ca.cert_pem.write_to_path(str(path))
    monkeypatch.setenv("SSL_CERT_FILE", str(path))
    monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path / "no-such-dir"))
    return ca


@pytest.fixture
def private_ca(tmp_path: Path) -> tuple[trustme.CA, str]:
    ca = trustme.CA()
    path = tmp_path / "private.pem"
    ca.cert_pem.write_to_path(str(path))
    return ca, str(path)


async def test_ca_bundle_adds_to_the_system_store(
    public_ca: trustme.CA, private_ca: tuple[trustme.CA, str]
) -> None:
    ca, bundle = private_ca
    config = EgressConfig(allow_cidrs=LOOPBACK, ca_bundle=bundle)
    async with tls_server(ca) as internal, tls_server(public_ca) as feishu_like:
        for url in (internal, feishu_like):
            reply = await call(config, url)
            assert isinstance(reply, HttpReply), reply
            assert reply.status == 200


async def test_private_ca_is_not_trusted_without_ca_bundle(
    public_ca: trustme.CA, private_ca: tuple[trustme.CA, str]
) -> None:
    ca, _ = private_ca
    async with tls_server(ca) as internal:
        result = await call(EgressConfig(allow_cidrs=LOOPBACK), internal)
    assert isinstance(result, SendResult)
    assert (result.outcome, result.error_code) == (Outcome.TEMPORARY_FAIL, ErrorCode.NETWORK_ERROR)
    assert result.error_message is not None
    assert "CERTIFICATE_VERIFY_FAILED" in result.error_message
    assert "secret-token" not in result.error_message


async def test_self_signed_server_fails_with_a_clear_tls_reason(tmp_path: Path) -> None:
    # A certificate that is its own CA, trusted by nobody.
    ca = trustme.CA()
    async with tls_server(ca) as server:
        result = await call(EgressConfig(allow_cidrs=LOOPBACK), server)
    assert isinstance(result, SendResult)
    assert result.error_code == ErrorCode.NETWORK_ERROR
    assert result.error_message is not None
    assert "certificate verify failed" in result.error_message


def test_one_context_verifies_and_checks_host_names(private_ca: tuple[trustme.CA, str]) -> None:
    _, bundle = private_ca
    context = ssl_context(bundle)
    assert context.verify_mode is ssl.CERT_REQUIRED
    assert context.check_hostname is True
    # the private CA was added (the system's CAs load lazily from a directory, unlisted here)
    assert any("trustme" in str(cert["subject"]) for cert in context.get_ca_certs())

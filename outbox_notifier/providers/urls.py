"""Which webhook URLs a provider may call, and how a message keeps a URL's secret out."""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterable

import httpx

# Accepted URLs a policy remembers: about one per channel row in active use.
URLS_KEPT = 4096

# Host names in rejection messages are cut so a garbled URL cannot smuggle a long secret.
_HOST_IN_MESSAGE_MAX_CHARS = 100


class UrlRejected(ValueError):
    """A webhook URL outside the policy; the message never contains the URL's path."""


class UrlPolicy:
    """Which webhook URLs a provider may call.

    Usage::

        policy = UrlPolicy(schemes=("https",), hosts=("feishu.cn",), path_prefix="/flow/")
        url = policy.check(raw_url)  # httpx.URL, or raises UrlRejected

    ``hosts`` match exactly or as a parent domain (``feishu.cn`` allows ``www.feishu.cn``,
    never ``feishu.cn.evil.com``); an empty ``hosts`` allows any host, while the schemes
    are always enforced. Credentials in the URL are refused. The path is checked after
    normalisation, so ``..`` segments cannot climb out of ``path_prefix``. Rejections name
    only scheme and host: the path (and query) of a webhook URL is usually its secret.
    """

    def __init__(
        self, *, schemes: Iterable[str], hosts: Iterable[str], path_prefix: str = "/"
    ) -> None:
        self.schemes = frozenset(s.strip().lower() for s in schemes)
        if not self.schemes:
            raise ValueError("allowed schemes must not be empty")
        self.hosts = frozenset(h.strip().strip(".").lower() for h in hosts)
        self._host_suffixes = tuple("." + h for h in self.hosts)
        self.path_prefix = path_prefix
        # A channel's URL is the same on every call, and parsing it is a good part of a
        # call's CPU. The policy never changes, so a verdict can be kept; refusals are not
        # kept (they end the record, so they do not repeat at any rate).
        self._accepted = functools.lru_cache(maxsize=URLS_KEPT)(self._check)

    def check(self, raw_url: str) -> httpx.URL:
        """Parse ``raw_url`` and enforce the policy; raise ``UrlRejected`` if outside it."""
        return self._accepted(raw_url)

    def _check(self, raw_url: str) -> httpx.URL:
        try:
            url = httpx.URL(raw_url.strip())
        except (httpx.InvalidURL, ValueError, TypeError):
            raise UrlRejected("webhook url cannot be parsed") from None
        scheme = url.scheme
        host = url.host.rstrip(".")
        shown = f"{scheme}://{host[:_HOST_IN_MESSAGE_MAX_CHARS]}"
        if scheme not in self.schemes:
            allowed = ", ".join(sorted(self.schemes))
            raise UrlRejected(f"webhook url {shown}: scheme {scheme!r} not allowed ({allowed})")
        if not _is_host_name(url.raw_host.decode("ascii").rstrip(".")) or (
            self.hosts and host not in self.hosts and not host.endswith(self._host_suffixes)
        ):
            raise UrlRejected(f"webhook url {shown}: host not allowed")
        if url.userinfo:
            raise UrlRejected(f"webhook url {shown}: credentials in the url are not allowed")
        if not url.raw_path.decode("ascii").startswith(self.path_prefix):
            raise UrlRejected(f"webhook url {shown}: path must start with {self.path_prefix!r}")
        return url


# A DNS name in its ASCII (IDNA) form: letters, digits and hyphens, dot-separated.
_DNS_NAME = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)(?:\.(?!-)[a-z0-9-]{1,63}(?<!-))*", re.I)


def _is_host_name(host: str) -> bool:
    """A DNS name or an IP address (IPv6 without its brackets), nothing else."""
    if _DNS_NAME.fullmatch(host):
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def scrub(message: str, url: httpx.URL, secrets: Iterable[str] = ()) -> str:
    """Mask a webhook's path and query (where its key lives) and ``secrets`` in ``message``."""
    for part in (url.raw_path.decode("ascii"), url.path):
        if len(part) > 1 and part in message:
            message = message.replace(part, "/****")
    query = url.query.decode("ascii")
    if query and query in message:
        message = message.replace(query, "****")
    # Each value alone too: a message may quote another form of the URL (DingTalk's signed
    # URL adds timestamp and sign to the recipient's, so its whole query is not in the
    # recipient's URL, but its access_token is).
    for _, value in url.params.multi_items():
        if len(value) > 3 and value in message:
            message = message.replace(value, "****")
    for secret in secrets:
        if secret and secret in message:
            message = message.replace(secret, "****")
    return message

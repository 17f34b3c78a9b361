"""The one HTTP transport every provider shares: httpx's types over aiohttp, guarded and trusted.

Usage::

    async with build_transport(EgressConfig.from_settings(settings)) as transport:
        provider = FeishuFlowProvider(transport, ...)

The stack, top to bottom:

- Providers build an ``httpx.Request`` and hand it to the transport themselves
  (``providers.sender.post_capped``). ``httpx.AsyncClient`` is not in the path: its cookie jar
  would carry one webhook's ``Set-Cookie`` to the next user's webhook on the same host, its
  redirect and auth layers are off anyway, and together they cost more CPU per call than
  the rest of the pipeline (see ``bench/README.md``).
- ``EgressTransport``: picks, per request, the direct or the proxied
  ``httpx_aiohttp.AiohttpTransport``; both share one ``aiohttp.ClientSession``. It remaps
  aiohttp's errors to the httpx exception that says what happened.
- ``GuardedConnector`` (an ``aiohttp.TCPConnector``): the connection pool, TLS with the one
  ``ssl.SSLContext``, and the egress guard at connect time. A literal or numeric host is
  checked here (aiohttp skips the resolver for those); a DNS name is resolved by
  ``GuardedResolver``, which hands aiohttp only the addresses the guard allowed, so the
  connection goes to an address that was checked and no second lookup happens. A refusal
  raises ``egress.DestinationForbidden`` before any socket is opened.

Proxies: ``http_proxy`` sends every call through one HTTP proxy (``CONNECT`` for https
targets); ``http_proxy_from_env`` honours ``HTTPS_PROXY``/``HTTP_PROXY``/``NO_PROXY``. The
proxy itself is trusted (the operator chose it), so the guard does not apply to its address;
the target is checked, as the daemon resolves it, before the ``CONNECT`` is sent. The proxy
resolves the target again on its own, so through a proxy the guard cannot pin the address:
a DNS answer that changes between the two lookups reaches whatever the proxy allows. Use the
proxy's own access rules for a hard boundary there.

Hostile servers: aiohttp (llhttp parser) refuses malformed heads and over-long header lines
(8190 bytes), never resends a POST on a connection the server dropped (it retries only
idempotent methods), and does not pool a connection whose response was not read to its end
or had bytes after its end (it pools a connection only once its response was framed whole).
Provider code caps what it reads (``providers.sender.read_body_capped``).
"""

from __future__ import annotations

import contextvars
import ipaddress
import os
import socket
import ssl
import urllib.request
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import aiohttp
import httpx
import msgspec
from aiohttp.abc import AbstractResolver, ResolveResult
from httpx_aiohttp import AiohttpTransport

from outbox_notifier.egress import DestinationForbidden, EgressGuard
from outbox_notifier.settings import Settings

__all__ = [
    "EgressConfig",
    "EgressTransport",
    "GuardedConnector",
    "GuardedResolver",
    "build_transport",
    "ssl_context",
]

# The pool's idle-connection lifetime: below the common 60 s server idle timeouts (nginx
# defaults to 75 s), so the daemon seldom races a server closing an idle connection.
KEEPALIVE_S = 30.0


class EgressConfig(msgspec.Struct, frozen=True, kw_only=True):
    """What the client needs from the settings (see ``outbox_notifier.settings``)."""

    max_connections: int = 50
    allow_cidrs: tuple[str, ...] = ()
    ca_bundle: str = ""
    http_proxy: str = ""
    proxy_from_env: bool = False

    @classmethod
    def from_settings(cls, settings: Settings) -> EgressConfig:
        return cls(
            max_connections=settings.delivery_concurrency,
            allow_cidrs=settings.egress_allow_cidrs,
            ca_bundle=settings.ca_bundle,
            http_proxy=settings.http_proxy,
            proxy_from_env=settings.http_proxy_from_env,
        )


def ssl_context(ca_bundle: str = "") -> ssl.SSLContext:
    """The one trust store: the system's, plus the CAs in ``ca_bundle`` (a file) when set.

    ``load_verify_locations`` adds to the store ``create_default_context`` loaded, so a
    private CA for one internal webhook does not break every public one. Verification and
    host name checks are always on.
    """
    context = ssl.create_default_context()
    if ca_bundle:
        if os.path.isdir(ca_bundle):
            context.load_verify_locations(capath=ca_bundle)
        else:
            context.load_verify_locations(cafile=ca_bundle)
    return context


# Set while the connector opens the connection to a configured proxy: the one connection the
# guard does not judge (the operator chose the proxy). A context variable, not a flag on the
# connector, so concurrent calls of other tasks stay guarded.
_to_proxy: contextvars.ContextVar[bool] = contextvars.ContextVar("to_proxy", default=False)


class GuardedResolver(AbstractResolver):
    """Resolves a DNS name and returns only the addresses the guard allows."""

    def __init__(self, guard: EgressGuard, inner: AbstractResolver | None = None) -> None:
        self._guard = guard
        self._inner = inner or aiohttp.ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        if _to_proxy.get():
            return results
        allowed: list[ResolveResult] = []
        refusal = "resolves to no address"
        for result in results:
            reason = self._guard.refusal(ipaddress.ip_address(result["host"]))
            if reason is None:
                allowed.append(result)
            else:
                refusal = "resolves to a " + reason
        if not allowed:
            raise DestinationForbidden(host, refusal)
        return allowed

    async def close(self) -> None:
        await self._inner.close()


class GuardedConnector(aiohttp.TCPConnector):
    """A ``TCPConnector`` that applies the egress guard to every target it connects to."""

    def __init__(self, *, guard: EgressGuard, **kwargs: Any) -> None:
        for hook in ("_resolve_host", "_create_proxy_connection"):
            if not hasattr(aiohttp.TCPConnector, hook):  # pragma: no cover
                # The guard hooks these methods; fail loudly rather than run unguarded.
                raise RuntimeError(f"this aiohttp has no TCPConnector.{hook} to guard")
        # No DNS cache: every new connection resolves afresh through the guard, and no
        # answer resolved for the proxy can be shared with a guarded lookup.
        super().__init__(resolver=GuardedResolver(guard), use_dns_cache=False, **kwargs)
        self._guard = guard

    async def _resolve_host(
        self, host: str, port: int, traces: Sequence[Any] | None = None
    ) -> list[ResolveResult]:
        if not _to_proxy.get():
            address = self._guard.literal_address(host)
            if address is not None:
                # aiohttp would take a literal host as is, without the resolver: connect to
                # the checked (and, for 127.1 and friends, canonical) address ourselves.
                family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
                return [
                    {
                        "hostname": host,
                        "host": str(address),
                        "port": port,
                        "family": family,
                        "proto": 0,
                        "flags": 0,
                    }
                ]
        return await super()._resolve_host(host, port, traces)

    async def _create_proxy_connection(
        self, req: Any, traces: Any, timeout: Any
    ) -> tuple[Any, Any]:
        # The proxy connects to the target, not us: check the target as we resolve it
        # before the CONNECT (or the forwarded request) leaves.
        await self._resolve_host(req.url.raw_host, req.port)
        token = _to_proxy.set(True)
        try:
            return await super()._create_proxy_connection(req, traces, timeout)
        finally:
            _to_proxy.reset(token)


def _proxy_for(config: EgressConfig, env: Mapping[str, str]) -> tuple[dict[str, str], str]:
    """``({scheme: proxy url}, no_proxy)`` from the settings and, when opted in, ``env``."""
    proxies: dict[str, str] = {}
    no_proxy = ""
    if config.proxy_from_env:
        lowered = {k.lower(): v for k, v in env.items() if v}
        for scheme in ("http", "https"):
            url = lowered.get(f"{scheme}_proxy") or lowered.get("all_proxy")
            if url:
                proxies[scheme] = url
        no_proxy = lowered.get("no_proxy", "")
    if config.http_proxy:
        proxies = {"http": config.http_proxy, "https": config.http_proxy}
    return proxies, no_proxy


class EgressTransport(httpx.AsyncBaseTransport):
    """Sends each request directly or through its scheme's proxy (``NO_PROXY`` honoured)."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        context: ssl.SSLContext,
        proxies: Mapping[str, str],
        no_proxy: str = "",
    ) -> None:
        self._session = session
        self._direct = AiohttpTransport(verify=context, client=session)
        self._proxied = {
            scheme: AiohttpTransport(verify=context, client=session, proxy=httpx.Proxy(url))
            for scheme, url in proxies.items()
        }
        self._no_proxy = no_proxy

    def _transport_for(self, url: httpx.URL) -> AiohttpTransport:
        proxied = self._proxied.get(url.scheme)
        if proxied is None:
            return self._direct
        # The standard library's reading of NO_PROXY (typeshed does not list it).
        bypass = urllib.request.proxy_bypass_environment  # type: ignore[attr-defined]
        if self._no_proxy and bypass(url.host, {"no": self._no_proxy}):
            return self._direct
        return proxied

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            response = await self._transport_for(request.url).handle_async_request(request)
        except (httpx.TransportError, aiohttp.ClientError) as exc:
            raise _remap(exc) from exc
        # The body's read errors are remapped too; the response itself is kept (building a
        # second one would parse its headers again).
        response.stream = _RemappingStream(response.stream)
        return response

    async def aclose(self) -> None:
        await self._session.close()


class _RemappingStream(httpx.AsyncByteStream):
    """A response body whose read errors are remapped like the request's."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._inner:
                yield chunk
        except (httpx.TransportError, aiohttp.ClientError) as exc:
            raise _remap(exc) from exc

    async def aclose(self) -> None:
        await self._inner.aclose()


def _remap(exc: Exception) -> Exception:
    """The httpx exception that says what happened.

    httpx-aiohttp maps every ``aiohttp.ClientConnectionError`` to ``httpx.ConnectTimeout``
    (a refused connection, a dropped one, a bad TLS certificate), which the providers would
    report as ``provider_timeout``; and it leaves a malformed response head as a raw
    ``aiohttp.ClientResponseError``. Judge by the aiohttp exception underneath instead.
    """
    cause = exc.__cause__ if isinstance(exc, httpx.TransportError) else exc
    message = str(cause or exc)
    if isinstance(cause, TimeoutError | aiohttp.ServerTimeoutError):
        return exc if isinstance(exc, httpx.TimeoutException) else httpx.ReadTimeout(message)
    if isinstance(cause, aiohttp.ClientProxyConnectionError | aiohttp.ClientHttpProxyError):
        return httpx.ProxyError(message)
    if isinstance(cause, aiohttp.ClientConnectorError):
        return httpx.ConnectError(message)
    if isinstance(cause, aiohttp.ServerDisconnectedError):
        return httpx.RemoteProtocolError("server disconnected before a complete response")
    if isinstance(cause, aiohttp.ClientPayloadError | aiohttp.ClientResponseError):
        return httpx.RemoteProtocolError(message)
    if isinstance(cause, aiohttp.ClientError):
        return httpx.NetworkError(message)
    return exc


def build_transport(
    config: EgressConfig, *, env: Mapping[str, str] | None = None
) -> EgressTransport:
    """The shared transport for ``config``; ``env`` (default ``os.environ``) for proxy
    variables.

    Must be called inside a running event loop (aiohttp binds its pool to it); closing the
    transport closes the pool. Requests carry their own timeouts (``httpx.Request``'s
    ``timeout`` extension); redirects are never followed at this level.
    """
    proxies, no_proxy = _proxy_for(config, os.environ if env is None else env)
    context = ssl_context(config.ca_bundle)
    connector = GuardedConnector(
        guard=EgressGuard(config.allow_cidrs),
        ssl=context,
        limit=config.max_connections,
        limit_per_host=0,
        keepalive_timeout=KEEPALIVE_S,
    )
    session = aiohttp.ClientSession(
        connector=connector,
        trust_env=False,  # proxies are chosen above, from settings
        auto_decompress=False,  # bodies are capped as raw bytes
    )
    return EgressTransport(session, context, proxies, no_proxy)

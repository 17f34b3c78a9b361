"""A fast, scriptable local HTTP/1.1 server that answers like Feishu.

Used by integration tests, the ``demo`` command and the benchmarks. It is built on raw
``asyncio`` streams (no extra dependency), supports keep-alive, and records every request.

Three ways to run it::

    async with FeishuServer() as srv:          # inside the caller's event loop
        ...

    with FeishuServer.in_thread() as srv:      # background thread with its own loop
        ...

    python -m outbox_notifier.testing.feishu_server --port 8080   # prints its URL, serves
                                                                  # until SIGTERM/SIGINT

Endpoints (default replies):

* ``POST /flow/api/trigger-webhook/<token>`` -> ``200 {"code":0,"msg":"success","data":{}}``
* ``POST /open-apis/bot/v2/hook/<token>`` -> ``200 {"code":0,"msg":"success","data":{}}``
* ``POST /robot/send?access_token=<token>`` (DingTalk) -> ``200 {"errcode":0,"errmsg":"ok"}``
* ``POST /cgi-bin/webhook/send?key=<key>`` (WeCom) -> ``200 {"errcode":0,"errmsg":"ok"}``
* ``POST /services/<path>`` (Slack) -> ``200 ok`` (plain text)
* any other path -> ``200 {}``
* control (not recorded): ``GET /_requests`` (``?since=<index>&path_prefix=<p>``),
  ``POST /_script`` (``{"prefix": ..., "replies": [...], "then": ...}``), ``POST /_chaos``
  (keyword arguments of :meth:`FeishuServer.chaos`), ``POST /_reset``, ``POST /_hold``,
  ``POST /_release``.

Replies are scripted per path prefix (matched against the path and query, so a DingTalk or
WeCom robot is told apart by its token) or token prefix with :meth:`FeishuServer.script`; see
:class:`Reply` for what a reply can do (status, JSON or raw body, headers, delay, drop, oversize
body, trickled response, hold until released). :meth:`FeishuServer.judge` answers by what each
request carries instead (a platform refusing a message that holds one invalid record).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import functools
import math
import random
import signal
import sys
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from types import TracebackType
from typing import Any, Concatenate, ParamSpec, Self, TypeVar
from urllib.parse import parse_qs

from msgspec import json as mjson

__all__ = [
    "BOT_PREFIX",
    "DINGTALK_PREFIX",
    "FLOW_PREFIX",
    "SLACK_PREFIX",
    "WECOM_PREFIX",
    "FeishuServer",
    "Recorded",
    "RemoteFeishuServer",
    "Reply",
    "main",
    "max_in_window",
]

FLOW_PREFIX = "/flow/api/trigger-webhook/"
BOT_PREFIX = "/open-apis/bot/v2/hook/"
DINGTALK_PREFIX = "/robot/send?access_token="
WECOM_PREFIX = "/cgi-bin/webhook/send?key="
SLACK_PREFIX = "/services/"

_FEISHU_OK = b'{"code":0,"msg":"success","data":{}}'
_GENERIC_OK = b"{}"
_ERRCODE_OK = b'{"errcode":0,"errmsg":"ok"}'
_MAX_HEAD_BYTES = 64 * 1024
_MAX_BODY_BYTES = 64 * 1024 * 1024
_CHUNK = 64 * 1024
_TRICKLE_STEP_S = 0.05
_POLL_S = 0.005

# Each endpoint's path (and query) prefix and its default 2xx body, by kind (the index).
_ENDPOINTS = (
    (FLOW_PREFIX, _FEISHU_OK),
    (BOT_PREFIX, _FEISHU_OK),
    (DINGTALK_PREFIX, _ERRCODE_OK),
    (WECOM_PREFIX, _ERRCODE_OK),
    (SLACK_PREFIX, b"ok"),
)
_KIND_GENERIC = len(_ENDPOINTS)

_CONTROL_PATHS = frozenset({"/_requests", "/_script", "/_chaos", "/_reset", "/_hold", "/_release"})

_HoldSpec = asyncio.Event | threading.Event | bool | None


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def _kind(target: str) -> int:
    """The endpoint kind of a request target (``path?query``)."""
    return next((i for i, (p, _) in enumerate(_ENDPOINTS) if target.startswith(p)), _KIND_GENERIC)


def _ok_body(kind: int) -> bytes:
    return _ENDPOINTS[kind][1] if kind < _KIND_GENERIC else _GENERIC_OK


def _head(status: int, headers: Mapping[str, str], length: int, keep_alive: bool) -> bytes:
    lines = [f"HTTP/1.1 {status} {_reason(status)}"]
    has_ct = False
    for k, v in headers.items():
        kl = k.lower()
        if kl in ("content-length", "connection", "transfer-encoding"):
            continue
        has_ct = has_ct or kl == "content-type"
        lines.append(f"{k}: {v}")
    if not has_ct:
        lines.append("Content-Type: application/json; charset=utf-8")
    lines.append(f"Content-Length: {length}")
    lines.append("Connection: keep-alive" if keep_alive else "Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


@dataclass(frozen=True, slots=True)
class Reply:
    """One scripted reply.

    ``json`` is encoded as the body unless ``body`` (raw bytes) is given. With neither, a 2xx
    reply carries the endpoint's default body and any other status ``{"code": <status>, "msg":
    <reason>}``. Before answering the server sleeps ``delay_s``, then waits for ``hold``
    (an ``asyncio.Event``/``threading.Event`` to be set, or ``True``: until
    :meth:`FeishuServer.release_all`). ``drop`` closes the connection without answering.
    ``oversize_bytes`` replaces the body by a (valid JSON) body of exactly that many bytes.
    ``trickle_s`` sends the whole response (status line, headers and body) in small pieces
    spread over that many seconds.
    """

    status: int = 200
    json: object | None = None
    body: bytes | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    drop: bool = False
    oversize_bytes: int = 0
    trickle_s: float = 0.0
    hold: _HoldSpec = None

    @classmethod
    def feishu_error(cls, code: int, msg: str = "error", *, status: int = 200) -> Reply:
        """A Feishu-style error body, e.g. ``Reply.feishu_error(19021, "sign match fail")``."""
        return cls(status=status, json={"code": code, "msg": msg, "data": {}})

    @classmethod
    def rate_limited(cls, retry_after_s: float = 1, *, status: int = 429) -> Reply:
        """HTTP 429 with ``Retry-After`` and the bot's ``11232 frequency limited`` body."""
        return cls(
            status=status,
            json={"code": 11232, "msg": "frequency limited", "data": {}},
            headers={"Retry-After": f"{retry_after_s:g}"},
        )

    @classmethod
    def errcode(cls, code: int, msg: str = "error", *, status: int = 200) -> Reply:
        """A DingTalk/WeCom-style error body, e.g. ``Reply.errcode(45009, "api freq out of
        limit")``."""
        return cls(status=status, json={"errcode": code, "errmsg": msg})

    @classmethod
    def slack_error(cls, status: int, code: str, retry_after_s: float | None = None) -> Reply:
        """A Slack incoming webhook error: the status with a plain-text code such as
        ``invalid_payload``, and ``Retry-After`` when given (Slack's 429)."""
        headers = {"Content-Type": "text/plain; charset=utf-8"}
        if retry_after_s is not None:
            headers["Retry-After"] = f"{retry_after_s:g}"
        return cls(status=status, body=code.encode(), headers=headers)

    def to_dict(self) -> dict[str, object]:
        """The JSON form accepted by ``POST /_script`` (only ``hold=True`` is expressible)."""
        if self.hold is not None and not isinstance(self.hold, bool):
            raise ValueError("a Reply holding on an Event has no JSON form; use hold=True")
        out: dict[str, object] = {"status": self.status}
        if self.json is not None:
            out["json"] = self.json
        if self.body is not None:
            out["body_b64"] = base64.b64encode(self.body).decode("ascii")
        if self.headers:
            out["headers"] = dict(self.headers)
        if self.delay_s:
            out["delay_s"] = self.delay_s
        if self.drop:
            out["drop"] = True
        if self.oversize_bytes:
            out["oversize_bytes"] = self.oversize_bytes
        if self.trickle_s:
            out["trickle_s"] = self.trickle_s
        if self.hold:
            out["hold"] = True
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Reply:
        """Parse the JSON form; ``body`` is UTF-8 text, ``body_b64`` base64 bytes."""
        allowed = {
            "status",
            "json",
            "body",
            "body_b64",
            "headers",
            "delay_s",
            "drop",
            "oversize_bytes",
            "trickle_s",
            "hold",
        }
        unknown = set(data) - allowed
        if unknown:
            raise ValueError(f"unknown reply fields: {sorted(unknown)}")
        body: bytes | None = None
        if data.get("body") is not None:
            body = str(data["body"]).encode("utf-8")
        if data.get("body_b64") is not None:
            body = base64.b64decode(str(data["body_b64"]))
        headers = data.get("headers") or {}
        if not isinstance(headers, Mapping):
            raise ValueError("headers must be an object")
        return cls(
            status=int(data.get("status", 200)),
            json=data.get("json"),
            body=body,
            headers={str(k): str(v) for k, v in headers.items()},
            delay_s=float(data.get("delay_s", 0.0)),
            drop=bool(data.get("drop", False)),
            oversize_bytes=int(data.get("oversize_bytes", 0)),
            trickle_s=float(data.get("trickle_s", 0.0)),
            hold=True if data.get("hold") else None,
        )


_UNPARSED: Any = object()


# eq=False: requests are told apart by identity; repr=False: __repr__ below leaves out the body.
@dataclass(slots=True, eq=False, repr=False)
class Recorded:
    """One received request. ``json`` is parsed lazily from ``body`` (``None`` if not JSON).

    ``status_sent`` is 0 until the reply's status line is sent (and stays 0 for dropped or
    still-held requests).
    """

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    received_at: float
    status_sent: int = 0
    query: str = ""
    _json: object = field(default=_UNPARSED, init=False)  # the parsed body, once asked for

    @property
    def json(self) -> object | None:
        if self._json is _UNPARSED:
            parsed: object | None = None
            if self.body:
                try:
                    parsed = mjson.decode(self.body)
                except Exception:
                    parsed = None
            self._json = parsed
        return self._json

    @property
    def latency_s(self) -> float | None:
        """``received_at - bench_sent_at`` when the JSON body carries a numeric
        ``bench_sent_at`` at top level or inside ``message``; else ``None``."""
        doc = self.json
        if not isinstance(doc, dict):
            return None
        value = doc.get("bench_sent_at")
        if value is None and isinstance(doc.get("message"), dict):
            value = doc["message"].get("bench_sent_at")
        if isinstance(value, int | float) and not isinstance(value, bool):
            return self.received_at - float(value)
        return None

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            "method": self.method,
            "path": self.path,
            "query": self.query,
            "headers": self.headers,
            "body_b64": base64.b64encode(self.body).decode("ascii"),
            "json": self.json,
            "received_at": self.received_at,
            "status_sent": self.status_sent,
        }
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Recorded:
        rec = cls(
            method=str(data["method"]),
            path=str(data["path"]),
            headers={str(k): str(v) for k, v in dict(data["headers"]).items()},
            body=base64.b64decode(str(data["body_b64"])),
            received_at=float(data["received_at"]),
            status_sent=int(data["status_sent"]),
            query=str(data.get("query", "")),
        )
        return rec

    def __repr__(self) -> str:
        return (
            f"Recorded(method={self.method!r}, path={self.path!r}, status_sent="
            f"{self.status_sent}, received_at={self.received_at:.6f}, body={self.body[:80]!r})"
        )


def max_in_window(timestamps: Iterable[float], window_s: float = 1.0) -> int:
    """Max number of timestamps inside any half-open window ``[t, t + window_s)``."""
    ts = sorted(timestamps)
    best = 0
    i = 0
    for j, t in enumerate(ts):
        while t - ts[i] >= window_s:
            i += 1
        best = max(best, j - i + 1)
    return best


@dataclass(slots=True)
class _Rule:
    prefixes: tuple[str, ...]
    queue: deque[Reply]
    then: Reply | None
    then_fn: Callable[[], Reply | None] | None = None
    # Judges each request by what it carries (``FeishuServer.judge``); None: the default.
    judge: Callable[[Recorded], Reply | None] | None = None


def _rule_prefixes(key: str) -> tuple[str, ...]:
    if key.startswith("/"):
        return (key,)
    return tuple(prefix + key for prefix, _ in _ENDPOINTS)


def _matches(rec: Recorded, path_prefix: str | None, status: int | None) -> bool:
    if path_prefix is not None and not rec.path.startswith(path_prefix):
        return False
    return status is None or rec.status_sent == status


class _BadRequest(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


def _parse_head(head: bytes) -> tuple[str, str, str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise _BadRequest(400)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise _BadRequest(400)
        headers[key.strip().lower()] = value.strip()
    return parts[0], parts[1], parts[2], headers


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts: list[bytes] = []
    total = 0
    while True:
        size_line = await reader.readuntil(b"\r\n")
        try:
            size = int(size_line.split(b";", 1)[0].strip(), 16)
        except ValueError as exc:
            raise _BadRequest(400) from exc
        if size == 0:
            while (await reader.readuntil(b"\r\n")) != b"\r\n":
                pass  # trailers
            return b"".join(parts)
        total += size
        if total > _MAX_BODY_BYTES:
            raise _BadRequest(413)
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)


class _EndpointUrls:
    """Webhook URLs of each endpoint the look-alike answers for, under ``url``."""

    @property
    def url(self) -> str:
        raise NotImplementedError

    def flow_url(self, token: str = "flow-token") -> str:
        return f"{self.url}{FLOW_PREFIX}{token}"

    def bot_url(self, token: str = "bot-token") -> str:
        return f"{self.url}{BOT_PREFIX}{token}"

    def dingtalk_url(self, token: str = "dingtalk-token") -> str:
        return f"{self.url}{DINGTALK_PREFIX}{token}"

    def wecom_url(self, key: str = "wecom-key") -> str:
        return f"{self.url}{WECOM_PREFIX}{key}"

    def slack_url(self, path: str = "T000/B000/slack-secret") -> str:
        return f"{self.url}{SLACK_PREFIX}{path}"


_P = ParamSpec("_P")
_T = TypeVar("_T")


def _blocking(
    method: Callable[Concatenate[FeishuServer, _P], Coroutine[Any, Any, _T]],
) -> Callable[Concatenate[FeishuServer, _P], _T]:
    """A blocking twin of a coroutine method: it runs on the server's own loop (a server
    started with ``start_in_thread``) while the calling thread waits for its result."""

    @functools.wraps(method)
    def blocking(server: FeishuServer, /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        loop = server._loop
        if loop is None or not server._threaded:
            raise RuntimeError(f"{method.__name__}: the server must run in another thread")
        return asyncio.run_coroutine_threadsafe(method(server, *args, **kwargs), loop).result()

    return blocking


class FeishuServer(_EndpointUrls):
    """Local Feishu look-alike. See the module docstring for endpoints and run modes."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self._lock = threading.Lock()
        self._requests: list[Recorded] = []
        self._ok_counts: defaultdict[str, int] = defaultdict(int)
        self._rules: dict[str, _Rule] = {}
        self._holding = False
        self._gate = asyncio.Event()
        self._held = 0
        self._connections_total = 0
        self._connections_open = 0
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._threaded = False
        self._closing = False
        self._conn_tasks: set[asyncio.Task[Any]] = set()
        self._defaults: dict[tuple[int, bool], bytes] = {}
        for kind in range(_KIND_GENERIC + 1):
            body = _ok_body(kind)
            for keep in (True, False):
                self._defaults[(kind, keep)] = _head(200, {}, len(body), keep) + body

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> Self:
        """Start serving in the running event loop."""
        if self._server is not None:
            return self
        self._loop = asyncio.get_running_loop()
        self._closing = False
        self._server = await asyncio.start_server(
            self._serve_connection, self.host, self.port, limit=_MAX_HEAD_BYTES, backlog=1024
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def aclose(self) -> None:
        """Stop serving (in-loop mode): close the listener and cancel open connections."""
        self._closing = True
        server, self._server = self._server, None
        if server is not None:
            server.close()
        tasks = [t for t in self._conn_tasks if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 5.0)

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def start_in_thread(self, timeout_s: float = 10.0) -> Self:
        """Start serving on a daemon thread with its own event loop; returns once listening."""
        if self._thread is not None:
            return self
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.start())
            except BaseException as exc:
                errors.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(self.aclose())
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._threaded = True
        self._thread = threading.Thread(target=run, name="feishu-server", daemon=True)
        self._thread.start()
        if not ready.wait(timeout_s):
            raise TimeoutError("feishu server did not start in time")
        if errors:
            self._thread.join()
            self._thread = None
            raise errors[0]
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop a server started with :meth:`start_in_thread` (idempotent)."""
        thread, loop = self._thread, self._loop
        if thread is None:
            return
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout_s)
        self._thread = None

    @classmethod
    def in_thread(cls, host: str = "127.0.0.1", port: int = 0) -> Self:
        """A server already running on a background thread; use as ``with ... as srv``."""
        return cls(host, port).start_in_thread()

    def __enter__(self) -> Self:
        return self.start_in_thread()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ URLs

    @property
    def url(self) -> str:
        """Base URL, ``http://<host>:<port>``."""
        if self._server is None and self.port == 0:
            raise RuntimeError("server not started")
        return f"http://{self.host}:{self.port}"

    # ------------------------------------------------------------------ scripting

    def script(
        self, path_or_token_prefix: str, replies: Sequence[Reply] = (), then: Reply | None = None
    ) -> None:
        """Queue ``replies`` for requests whose path starts with the prefix (a path if it
        starts with ``/``, else a Flow/bot token prefix); afterwards answer ``then`` (or the
        endpoint default when ``None``). The longest matching prefix wins; scripting the same
        prefix again replaces its rule."""
        rule = _Rule(_rule_prefixes(path_or_token_prefix), deque(replies), then)
        with self._lock:
            self._rules[path_or_token_prefix] = rule

    def chaos(
        self,
        seed: int,
        p_500: float = 0.2,
        p_timeout: float = 0.0,
        p_drop: float = 0.0,
        p_429: float = 0.0,
        retry_after_s: float = 1,
        *,
        timeout_s: float = 30.0,
        prefix: str = "/",
        ok_delay_s: float = 0.0,
    ) -> None:
        """Answer requests under ``prefix`` with a seeded random mix: 500, a ``timeout_s``
        delay, a dropped connection, 429 with ``Retry-After``, else the endpoint default
        after ``ok_delay_s`` (a target slower to succeed than to fail)."""
        total = p_500 + p_timeout + p_drop + p_429
        if total > 1.0 + 1e-9 or min(p_500, p_timeout, p_drop, p_429) < 0:
            raise ValueError("chaos probabilities must be >= 0 and sum to <= 1")
        rng = random.Random(seed)
        r500 = Reply(status=500)
        rtimeout = Reply(delay_s=timeout_s)
        rdrop = Reply(drop=True)
        r429 = Reply.rate_limited(retry_after_s)
        rok = Reply(delay_s=ok_delay_s) if ok_delay_s else None

        def pick() -> Reply | None:
            x = rng.random()
            for p, reply in ((p_500, r500), (p_timeout, rtimeout), (p_drop, rdrop), (p_429, r429)):
                if x < p:
                    return reply
                x -= p
            return rok

        rule = _Rule(_rule_prefixes(prefix), deque(), None, pick)
        with self._lock:
            self._rules[prefix] = rule

    def judge(
        self, path_or_token_prefix: str, reply_for: Callable[[Recorded], Reply | None]
    ) -> None:
        """Answer requests under the prefix (as :meth:`script` matches it) with
        ``reply_for(request)``, or the endpoint default when it returns None: a platform that
        reads each body, say one that refuses any message holding a record it finds invalid.
        ``reply_for`` runs on the server's loop and must not block. Scripting the same prefix
        again replaces it."""
        rule = _Rule(_rule_prefixes(path_or_token_prefix), deque(), None, judge=reply_for)
        with self._lock:
            self._rules[path_or_token_prefix] = rule

    def clear_scripts(self) -> None:
        with self._lock:
            self._rules.clear()

    def reset(self) -> None:
        """Forget recorded requests, scripts and counters; release held requests."""
        with self._lock:
            self._requests.clear()
            self._ok_counts.clear()
            self._rules.clear()
        self.release_all()

    def hold_all(self) -> None:
        """Hold every incoming request (before answering) until :meth:`release_all`."""
        self._holding = True

    def release_all(self) -> None:
        """Release everything held by :meth:`hold_all` or ``Reply(hold=True)``."""
        self._holding = False
        old, self._gate = self._gate, asyncio.Event()
        self._in_loop(old.set)

    def _in_loop(self, fn: Callable[[], None]) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            fn()
            return
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            fn()
        else:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(fn)

    def _pick(self, path: str, rec: Recorded) -> Reply | None:
        # The rule is picked under the lock, and a judge run outside it: it may read the body.
        reply_for = self._reply_for(path)
        return reply_for(rec) if reply_for is not None else None

    def _reply_for(self, path: str) -> Callable[[Recorded], Reply | None] | None:
        """The scripted reply for ``path`` as a function of the request; None: unscripted."""
        with self._lock:
            best: _Rule | None = None
            best_len = -1
            for rule in self._rules.values():
                for p in rule.prefixes:
                    if len(p) > best_len and path.startswith(p):
                        best, best_len = rule, len(p)
            if best is None:
                return None
            reply: Reply | None
            if best.queue:
                reply = best.queue.popleft()
            elif best.judge is not None:
                return best.judge
            elif best.then_fn is not None:
                reply = best.then_fn()
            else:
                reply = best.then
        return lambda _rec: reply

    # ------------------------------------------------------------------ inspection

    @property
    def requests(self) -> list[Recorded]:
        """A snapshot of the recorded requests, oldest first."""
        with self._lock:
            return list(self._requests)

    def requests_to(self, path_prefix: str) -> list[Recorded]:
        with self._lock:
            return [r for r in self._requests if r.path.startswith(path_prefix)]

    def count(self, path_prefix: str | None = None, status: int | None = None) -> int:
        """Number of recorded requests, optionally by path prefix and status sent."""
        with self._lock:
            if path_prefix is None and status is None:
                return len(self._requests)
            return sum(1 for r in self._requests if _matches(r, path_prefix, status))

    @property
    def ok_counts(self) -> dict[str, int]:
        """Number of 2xx replies sent, per path."""
        with self._lock:
            return dict(self._ok_counts)

    @property
    def connections_total(self) -> int:
        """Connections accepted since start (keep-alive reuse keeps this low)."""
        return self._connections_total

    @property
    def connections_open(self) -> int:
        return self._connections_open

    @property
    def held_count(self) -> int:
        """Requests currently waiting on a hold."""
        return self._held

    def max_per_window(self, window_s: float = 1.0, path_prefix: str | None = None) -> int:
        """Max number of requests received in any sliding window of ``window_s`` seconds."""
        with self._lock:
            ts = [r.received_at for r in self._requests if _matches(r, path_prefix, None)]
        return max_in_window(ts, window_s)

    def latencies(self, path_prefix: str | None = None) -> list[float]:
        """``latency_s`` of the requests that carry ``bench_sent_at``."""
        out: list[float] = []
        for r in self.requests:
            if path_prefix is None or r.path.startswith(path_prefix):
                lat = r.latency_s
                if lat is not None:
                    out.append(lat)
        return out

    async def wait_for_count(
        self,
        n: int,
        timeout_s: float = 10.0,
        path_prefix: str | None = None,
        status: int | None = None,
    ) -> list[Recorded]:
        """Wait (without blocking the loop) until at least ``n`` matching requests were
        recorded; returns them. Raises ``TimeoutError``."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                found = self._arrived(n, path_prefix, status, deadline)
            if found is not None:
                return found
            await asyncio.sleep(_POLL_S)

    wait_for = wait_for_count

    #: Blocking variant of :meth:`wait_for_count`, for a server started with
    #: :meth:`start_in_thread`: the wait runs on the server's loop, the caller's thread blocks.
    wait_for_count_sync = _blocking(wait_for_count)

    def _arrived(
        self, n: int, path_prefix: str | None, status: int | None, deadline: float
    ) -> list[Recorded] | None:
        """The matching requests once there are ``n``, None while fewer and ``deadline``
        (monotonic) has not passed, ``TimeoutError`` after. The caller holds the lock."""
        found = [r for r in self._requests if _matches(r, path_prefix, status)]
        if len(found) >= n:
            return found
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"expected {n} requests (prefix={path_prefix!r}, status={status}), got {len(found)}"
            )
        return None

    # ------------------------------------------------------------------ serving

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._conn_tasks.add(task)
        self._connections_total += 1
        self._connections_open += 1
        try:
            while not self._closing:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return
                except asyncio.LimitOverrunError:
                    writer.write(_head(431, {}, 0, False))
                    return
                try:
                    method, target, version, headers = _parse_head(head)
                    if headers.get("expect", "").lower() == "100-continue":
                        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                    if "chunked" in headers.get("transfer-encoding", "").lower():
                        body = await _read_chunked(reader)
                    else:
                        try:
                            length = int(headers.get("content-length", "0"))
                        except ValueError as exc:
                            raise _BadRequest(400) from exc
                        if length < 0:
                            raise _BadRequest(400)
                        if length > _MAX_BODY_BYTES:
                            raise _BadRequest(413)
                        body = await reader.readexactly(length) if length else b""
                except _BadRequest as bad:
                    writer.write(_head(bad.status, {}, 0, False))
                    return
                conn = headers.get("connection", "").lower()
                keep = ("close" not in conn) if version == "HTTP/1.1" else ("keep-alive" in conn)
                path, _, query = target.partition("?")
                if path in _CONTROL_PATHS:
                    await self._control(method, path, query, body, writer, keep)
                elif not await self._answer(method, path, query, headers, body, writer, keep):
                    return
                if not keep:
                    return
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            return
        finally:
            self._connections_open -= 1
            if task is not None:
                self._conn_tasks.discard(task)
            with contextlib.suppress(Exception):
                writer.close()

    async def _answer(
        self,
        method: str,
        path: str,
        query: str,
        headers: dict[str, str],
        body: bytes,
        writer: asyncio.StreamWriter,
        keep: bool,
    ) -> bool:
        rec = Recorded(method, path, headers, body, time.time(), 0, query)
        with self._lock:
            self._requests.append(rec)
        if self._holding:
            await self._wait_hold(True)
        target = f"{path}?{query}" if query else path
        reply = self._pick(target, rec)
        kind = _kind(target)
        if reply is None:
            if method != "POST" and kind != _KIND_GENERIC:
                status = 405
                payload = mjson.encode({"code": 405, "msg": "method not allowed"})
                data = _head(status, {}, len(payload), keep) + payload
            else:
                status = 200
                data = self._defaults[(kind, keep)]
            self._mark(rec, status)
            writer.write(data)
            await writer.drain()
            return True
        return await self._send_reply(rec, reply, kind, writer, keep)

    async def _send_reply(
        self, rec: Recorded, reply: Reply, kind: int, writer: asyncio.StreamWriter, keep: bool
    ) -> bool:
        if reply.delay_s > 0:
            await asyncio.sleep(reply.delay_s)
        await self._wait_hold(reply.hold)
        if reply.drop:
            writer.close()
            return False
        status = reply.status
        if reply.oversize_bytes > 0:
            self._mark(rec, status)
            await self._send_oversize(writer, reply, keep)
            return True
        if reply.body is not None:
            body = reply.body
        elif reply.json is not None:
            body = mjson.encode(reply.json)
        elif 200 <= status < 300:
            body = _ok_body(kind)
        else:
            body = mjson.encode({"code": status, "msg": _reason(status)})
        data = _head(status, reply.headers, len(body), keep) + body
        self._mark(rec, status)
        if reply.trickle_s > 0:
            pieces = max(1, min(len(data), math.ceil(reply.trickle_s / _TRICKLE_STEP_S)))
            interval = reply.trickle_s / pieces
            size = math.ceil(len(data) / pieces)
            for offset in range(0, len(data), size):
                await asyncio.sleep(interval)
                writer.write(data[offset : offset + size])
                await writer.drain()
        else:
            writer.write(data)
            await writer.drain()
        return True

    async def _send_oversize(self, writer: asyncio.StreamWriter, reply: Reply, keep: bool) -> None:
        n = reply.oversize_bytes
        prefix = b'{"code":0,"msg":"success","pad":"'
        suffix = b'"}'
        writer.write(_head(reply.status, reply.headers, n, keep))
        if n < len(prefix) + len(suffix):
            writer.write(b"x" * n)
            await writer.drain()
            return
        writer.write(prefix)
        fill = n - len(prefix) - len(suffix)
        chunk = b"x" * min(_CHUNK, fill)
        while fill > 0:
            writer.write(chunk if fill >= len(chunk) else chunk[:fill])
            fill -= len(chunk)
            await writer.drain()
        writer.write(suffix)
        await writer.drain()

    async def _wait_hold(self, hold: _HoldSpec) -> None:
        if hold is None or (isinstance(hold, bool) and not hold):
            return
        self._held += 1
        try:
            if isinstance(hold, bool):
                await self._gate.wait()
            elif isinstance(hold, asyncio.Event) and not self._threaded:
                await hold.wait()
            else:
                while not hold.is_set():
                    await asyncio.sleep(_POLL_S)
        finally:
            self._held -= 1

    def _mark(self, rec: Recorded, status: int) -> None:
        with self._lock:
            rec.status_sent = status
            if 200 <= status < 300:
                self._ok_counts[rec.path] += 1

    async def _control(
        self,
        method: str,
        path: str,
        query: str,
        body: bytes,
        writer: asyncio.StreamWriter,
        keep: bool,
    ) -> None:
        status = 200
        result: object = {"ok": True}
        try:
            if path == "/_requests":
                params = parse_qs(query)
                since = int(params.get("since", ["0"])[0])
                prefix = params.get("path_prefix", [None])[0]
                with self._lock:
                    recs = self._requests[since:]
                    if prefix is not None:
                        recs = [r for r in recs if r.path.startswith(prefix)]
                    result = {
                        "requests": [r.to_dict() for r in recs],
                        "total": len(self._requests),
                        "ok_counts": dict(self._ok_counts),
                        "connections_total": self._connections_total,
                        "held": self._held,
                    }
            elif method != "POST":
                status, result = 405, {"error": "use POST"}
            elif path == "/_script":
                doc = mjson.decode(body) if body else {}
                specs = doc if isinstance(doc, list) else [doc]
                for spec in specs:
                    then = spec.get("then")
                    self.script(
                        str(spec["prefix"]),
                        [Reply.from_dict(r) for r in spec.get("replies", [])],
                        Reply.from_dict(then) if then is not None else None,
                    )
            elif path == "/_chaos":
                kwargs = mjson.decode(body) if body else {}
                self.chaos(**kwargs)
            elif path == "/_reset":
                self.reset()
            elif path == "/_hold":
                self.hold_all()
            elif path == "/_release":
                self.release_all()
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            status, result = 400, {"error": f"{type(exc).__name__}: {exc}"}
        payload = mjson.encode(result)
        writer.write(_head(status, {}, len(payload), keep) + payload)
        await writer.drain()


class RemoteFeishuServer(_EndpointUrls):
    """Drive a :class:`FeishuServer` running in another process through its control API."""

    def __init__(self, url: str, timeout_s: float = 10.0) -> None:
        self._url = url.rstrip("/")
        self._timeout_s = timeout_s

    @property
    def url(self) -> str:
        return self._url

    def _call(self, method: str, path: str, payload: object = None) -> Any:
        import httpx

        content = mjson.encode(payload) if payload is not None else b""
        resp = httpx.request(method, self.url + path, content=content, timeout=self._timeout_s)
        resp.raise_for_status()
        return mjson.decode(resp.content)

    def requests(self, path_prefix: str | None = None) -> list[Recorded]:
        path = "/_requests"
        if path_prefix is not None:
            path += "?" + "path_prefix=" + path_prefix
        doc = self._call("GET", path)
        return [Recorded.from_dict(r) for r in doc["requests"]]

    def count(self, path_prefix: str | None = None, status: int | None = None) -> int:
        return sum(1 for r in self.requests(path_prefix) if _matches(r, None, status))

    def script(self, prefix: str, replies: Sequence[Reply] = (), then: Reply | None = None) -> None:
        payload = {
            "prefix": prefix,
            "replies": [r.to_dict() for r in replies],
            "then": then.to_dict() if then is not None else None,
        }
        self._call("POST", "/_script", payload)

    def chaos(self, seed: int, **kwargs: float | str) -> None:
        self._call("POST", "/_chaos", {"seed": seed, **kwargs})

    def reset(self) -> None:
        self._call("POST", "/_reset")

    def hold_all(self) -> None:
        self._call("POST", "/_hold")

    def release_all(self) -> None:
        self._call("POST", "/_release")


# ---------------------------------------------------------------------- script mode


async def _serve_forever(host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with FeishuServer(host, port) as srv:
        print(srv.url, flush=True)
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m outbox_notifier.testing.feishu_server",
        description="Serve a local Feishu look-alike; prints its URL, runs until SIGTERM.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    args = parser.parse_args(argv)
    asyncio.run(_serve_forever(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())

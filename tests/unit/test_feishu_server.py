"""The local Feishu look-alike server: defaults, scripting, faults, recording, run modes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from outbox_notifier.testing.feishu_server import (
    FeishuServer,
    Recorded,
    RemoteFeishuServer,
    Reply,
    max_in_window,
)

FEISHU_OK = {"code": 0, "msg": "success", "data": {}}
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=5.0) as c:
        yield c


async def test_default_replies(srv: FeishuServer, client: httpx.AsyncClient) -> None:
    r = await client.post(srv.flow_url("tok1"), json={"a": 1})
    assert r.status_code == 200
    assert r.json() == FEISHU_OK
    r = await client.post(srv.bot_url("tok2"), json={"msg_type": "text"})
    assert r.status_code == 200
    assert r.json() == FEISHU_OK
    r = await client.post(srv.url + "/anything/else", content=b"raw")
    assert r.status_code == 200
    assert r.json() == {}

    recs = srv.requests
    assert [r.path for r in recs] == [
        "/flow/api/trigger-webhook/tok1",
        "/open-apis/bot/v2/hook/tok2",
        "/anything/else",
    ]
    assert recs[0].method == "POST"
    assert recs[0].json == {"a": 1}
    assert recs[0].headers["content-type"] == "application/json"
    assert recs[2].body == b"raw"
    assert recs[2].json is None
    assert all(r.status_sent == 200 for r in recs)
    assert all(abs(r.received_at - time.time()) < 5 for r in recs)
    assert srv.count() == 3
    assert srv.count("/flow/") == 1
    assert srv.count(status=200) == 3
    assert srv.ok_counts["/open-apis/bot/v2/hook/tok2"] == 1


async def test_scripted_queue_then_default(srv: FeishuServer, client: httpx.AsyncClient) -> None:
    srv.script(
        "tok",
        [Reply(status=500), Reply.feishu_error(11232, "frequency limited")],
        then=Reply(status=503),
    )
    statuses = []
    bodies = []
    for _ in range(4):
        r = await client.post(srv.flow_url("tok-a"), json={})
        statuses.append(r.status_code)
        bodies.append(r.json())
    assert statuses == [500, 200, 503, 503]
    assert bodies[1]["code"] == 11232
    # another token is not affected
    r = await client.post(srv.flow_url("other"), json={})
    assert r.json() == FEISHU_OK
    # without `then` the endpoint default comes back after the queue
    srv.script("/open-apis/", [Reply(status=401)])
    assert (await client.post(srv.bot_url("x"))).status_code == 401
    assert (await client.post(srv.bot_url("x"))).json() == FEISHU_OK
    assert srv.count(status=503) == 2


async def test_longest_prefix_wins(srv: FeishuServer, client: httpx.AsyncClient) -> None:
    srv.script("/", [], then=Reply(status=500))
    srv.script("/flow/api/trigger-webhook/", [], then=Reply(status=502))
    srv.script("special", [], then=Reply(status=418))
    assert (await client.post(srv.url + "/x")).status_code == 500
    assert (await client.post(srv.flow_url("plain"))).status_code == 502
    assert (await client.post(srv.flow_url("special-1"))).status_code == 418
    assert (await client.post(srv.bot_url("special-2"))).status_code == 418


async def test_a_judge_answers_by_the_body(srv: FeishuServer, client: httpx.AsyncClient) -> None:
    # A platform that refuses any message holding the word "bad", and lets the rest through.
    def refuse_bad(request: Recorded) -> Reply | None:
        return Reply.errcode(400201, "bad record") if b"bad" in request.body else None

    srv.judge("/robot/send", refuse_bad)
    refused = await client.post(srv.dingtalk_url("t"), json={"text": "one good, one bad"})
    passed = await client.post(srv.dingtalk_url("t"), json={"text": "all good"})
    assert refused.json() == {"errcode": 400201, "errmsg": "bad record"}
    assert passed.json() == {"errcode": 0, "errmsg": "ok"}
    srv.script("/robot/send", [Reply(status=503)])  # a script replaces the judge
    assert (await client.post(srv.dingtalk_url("t"), json={"text": "bad"})).status_code == 503


async def test_retry_after_header(srv: FeishuServer, client: httpx.AsyncClient) -> None:
    srv.script("/", [Reply.rate_limited(3), Reply(status=429, headers={"Retry-After": "7"})])
    r = await client.post(srv.bot_url("t"))
    assert r.status_code == 429
    assert r.headers["retry-after"] == "3"
    assert r.json()["code"] == 11232
    r = await client.post(srv.bot_url("t"))
    assert r.headers["Retry-After"] == "7"


async def test_delay(srv: FeishuServer, client: httpx.AsyncClient) -> None:
    srv.script("/", [Reply(delay_s=0.3)])
    t0 = time.monotonic()
    r = await client.post(srv.flow_url("t"))
    assert r.status_code == 200
    assert time.monotonic() - t0 >= 0.28
    # a client timeout shorter than the delay fires
    srv.script("/", [Reply(delay_s=2.0)])
    with pytest.raises(httpx.ReadTimeout):
        await client.post(srv.flow_url("t"), timeout=0.2)


async def test_drop_is_transport_error(srv: FeishuServer, client: httpx.AsyncClient) -> None:
    srv.script("/", [Reply(drop=True)])
    with pytest.raises(httpx.TransportError):
        await client.post(srv.flow_url("t"), json={})
    assert srv.requests[0].status_sent == 0
    # the next request works again
    assert (await client.post(srv.flow_url("t"))).status_code == 200


async def test_oversize_body(srv: FeishuServer, client: httpx.AsyncClient) -> None:
    size = 3 * 1024 * 1024 + 17
    srv.script("/", [Reply(oversize_bytes=size), Reply(oversize_bytes=5)])
    r = await client.post(srv.flow_url("t"))
    assert r.status_code == 200
    assert len(r.content) == size
    assert r.json()["code"] == 0
    r = await client.post(srv.flow_url("t"))
    assert len(r.content) == 5
    # a client that stops reading early does not break the server
    srv.script("/", [Reply(oversize_bytes=size)])
    async with client.stream("POST", srv.flow_url("t")) as resp:
        async for _chunk in resp.aiter_bytes():
            break
    assert (await client.post(srv.flow_url("t"))).status_code == 200


async def test_trickle(srv: FeishuServer, client: httpx.AsyncClient) -> None:
    srv.script("/", [Reply(trickle_s=0.5)])
    t0 = time.monotonic()
    # each read is well within the per-read timeout, the whole takes ~trickle_s
    r = await client.post(srv.flow_url("t"), timeout=httpx.Timeout(0.3))
    assert r.json() == FEISHU_OK
    assert time.monotonic() - t0 >= 0.45


async def test_keep_alive_single_connection(srv: FeishuServer, client: httpx.AsyncClient) -> None:
    for i in range(200):
        r = await client.post(srv.bot_url("k"), json={"i": i})
        assert r.status_code == 200
    assert srv.connections_total == 1
    assert srv.count() == 200
    assert [r.json for r in srv.requests][-1] == {"i": 199}
    # Connection: close is honoured
    r = await client.post(srv.bot_url("k"), headers={"Connection": "close"})
    assert r.headers["connection"] == "close"
    await client.post(srv.bot_url("k"))
    assert srv.connections_total == 2


async def test_concurrent_clients_throughput(srv: FeishuServer) -> None:
    limits = httpx.Limits(max_connections=8)
    async with httpx.AsyncClient(limits=limits, timeout=10) as c:

        async def worker(n: int) -> None:
            for _ in range(n):
                assert (await c.post(srv.flow_url("p"), content=b"{}")).status_code == 200

        await asyncio.gather(*(worker(50) for _ in range(8)))
    assert srv.count(status=200) == 400
    assert srv.connections_total <= 8


def test_in_thread_from_sync_code() -> None:
    with FeishuServer.in_thread() as srv:
        srv.script("t", [Reply(status=500)])
        with httpx.Client(timeout=5) as c:
            assert c.post(srv.flow_url("t1")).status_code == 500
            assert c.post(srv.flow_url("t1")).status_code == 200

        def later() -> None:
            time.sleep(0.1)
            httpx.post(srv.bot_url("b"), json={"x": 1})

        threading.Thread(target=later).start()
        got = srv.wait_for_count_sync(1, 5, path_prefix="/open-apis/")
        assert got[0].json == {"x": 1}
        with pytest.raises(TimeoutError):
            srv.wait_for_count_sync(10, 0.1)
    # stopped: the port no longer answers
    with pytest.raises(httpx.TransportError):
        httpx.post(srv.flow_url("t"), timeout=1)


def test_start_in_thread_and_stop() -> None:
    srv = FeishuServer().start_in_thread()
    try:
        assert httpx.post(srv.url + "/g").json() == {}
    finally:
        srv.stop()
    srv.stop()  # idempotent


async def test_hold_all_release_all(srv: FeishuServer, client: httpx.AsyncClient) -> None:
    srv.hold_all()
    tasks = [asyncio.create_task(client.post(srv.flow_url(f"h{i}"))) for i in range(3)]
    await srv.wait_for_count(3, 5)
    await asyncio.sleep(0.1)
    assert srv.held_count == 3
    assert not any(t.done() for t in tasks)
    assert all(r.status_sent == 0 for r in srv.requests)
    srv.release_all()
    results = await asyncio.gather(*tasks)
    assert [r.status_code for r in results] == [200, 200, 200]
    assert srv.held_count == 0
    # after release, requests flow freely
    assert (await client.post(srv.flow_url("z"))).status_code == 200


async def test_hold_event_per_reply(srv: FeishuServer, client: httpx.AsyncClient) -> None:
    gate = asyncio.Event()
    srv.script("/", [Reply(hold=gate, status=201), Reply(hold=True, status=202)])
    t1 = asyncio.create_task(client.post(srv.flow_url("a")))
    await srv.wait_for_count(1, 5)
    await asyncio.sleep(0.05)
    assert not t1.done()
    gate.set()
    assert (await t1).status_code == 201
    t2 = asyncio.create_task(client.post(srv.flow_url("a")))
    await srv.wait_for_count(2, 5)
    await asyncio.sleep(0.05)
    assert not t2.done()
    srv.release_all()
    assert (await t2).status_code == 202


def test_hold_threading_event_in_thread() -> None:
    gate = threading.Event()
    with FeishuServer.in_thread() as srv:
        srv.script("/", [Reply(hold=gate)])
        result: list[int] = []
        th = threading.Thread(target=lambda: result.append(httpx.post(srv.url + "/x").status_code))
        th.start()
        srv.wait_for_count_sync(1, 5)
        time.sleep(0.05)
        assert result == []
        gate.set()
        th.join(5)
        assert result == [200]


def test_max_per_window() -> None:
    assert max_in_window([], 1.0) == 0
    assert max_in_window([0.0, 0.2, 0.4, 0.6, 0.8, 1.0], 1.0) == 5
    assert max_in_window([0.0, 0.1, 0.2, 5.0, 5.05, 5.1, 5.15], 1.0) == 4
    assert max_in_window([3.0, 1.0, 2.0], 1.5) == 2

    srv = FeishuServer()
    base = 1_000.0
    for i, t in enumerate([0.0, 0.5, 0.9, 0.95, 2.0, 2.1]):
        path = "/open-apis/bot/v2/hook/a" if i % 2 == 0 else "/other"
        srv._requests.append(Recorded("POST", path, {}, b"", base + t, 200))
    assert srv.max_per_window(1.0) == 4
    assert srv.max_per_window(1.0, path_prefix="/open-apis/") == 2
    assert srv.max_per_window(0.2) == 2


async def test_max_per_window_live(srv: FeishuServer, client: httpx.AsyncClient) -> None:
    for _ in range(5):
        await client.post(srv.bot_url("p"))
    assert srv.max_per_window(10.0, path_prefix="/open-apis/") == 5


async def test_latency_extraction(srv: FeishuServer, client: httpx.AsyncClient) -> None:
    now = time.time()
    await client.post(srv.flow_url("t"), json={"bench_sent_at": now - 0.5})
    await client.post(srv.bot_url("t"), json={"message": {"bench_sent_at": now - 0.25}})
    await client.post(srv.bot_url("t"), json={"message": "no"})
    lat = srv.latencies()
    assert len(lat) == 2
    assert 0.5 <= lat[0] < 5
    assert 0.25 <= lat[1] < 5
    assert srv.requests[2].latency_s is None


async def test_control_api_over_http(srv: FeishuServer, client: httpx.AsyncClient) -> None:
    script = {
        "prefix": "ctl",
        "replies": [
            {"status": 429, "headers": {"Retry-After": "2"}},
            {"status": 200, "json": {"code": 19021, "msg": "sign match fail"}},
            {"status": 200, "body": "not json"},
        ],
        "then": {"status": 500},
    }
    r = await client.post(srv.url + "/_script", json=script)
    assert r.status_code == 200
    r1 = await client.post(srv.bot_url("ctl-1"), json={"n": 1})
    assert (r1.status_code, r1.headers["retry-after"]) == (429, "2")
    assert (await client.post(srv.bot_url("ctl-1"))).json()["code"] == 19021
    assert (await client.post(srv.bot_url("ctl-1"))).content == b"not json"
    assert (await client.post(srv.bot_url("ctl-1"))).status_code == 500

    doc = (await client.get(srv.url + "/_requests")).json()
    assert doc["total"] == 4
    assert [x["status_sent"] for x in doc["requests"]] == [429, 200, 200, 500]
    assert doc["requests"][0]["json"] == {"n": 1}
    assert Recorded.from_dict(doc["requests"][0]).json == {"n": 1}
    doc = (await client.get(srv.url + "/_requests", params={"since": 3})).json()
    assert len(doc["requests"]) == 1

    bad = await client.post(srv.url + "/_script", json={"prefix": "x", "replies": [{"nope": 1}]})
    assert bad.status_code == 400

    assert (await client.post(srv.url + "/_reset")).status_code == 200
    assert srv.count() == 0
    assert (await client.post(srv.bot_url("ctl-1"))).json() == FEISHU_OK


def test_remote_client_and_chaos() -> None:
    with FeishuServer.in_thread() as srv:
        remote = RemoteFeishuServer(srv.url)
        remote.script("r", [Reply.rate_limited(1), Reply(drop=True)], then=Reply(status=502))
        with httpx.Client(timeout=5) as c:
            assert c.post(remote.flow_url("r1")).status_code == 429
            with pytest.raises(httpx.TransportError):
                c.post(remote.flow_url("r1"))
            assert c.post(remote.flow_url("r1")).status_code == 502
        assert [r.status_sent for r in remote.requests()] == [429, 0, 502]
        assert remote.count(status=502) == 1

        remote.reset()
        remote.chaos(7, p_500=0.3, p_429=0.2)
        with httpx.Client(timeout=5) as c:
            codes = [c.post(remote.bot_url("c")).status_code for _ in range(200)]
        assert set(codes) == {200, 429, 500}
        assert 30 <= codes.count(500) <= 90
        assert 15 <= codes.count(429) <= 70

        # same seed, same sequence
        srv.reset()
        srv.chaos(7, p_500=0.3, p_429=0.2)
        with httpx.Client(timeout=5) as c:
            again = [c.post(srv.bot_url("c")).status_code for _ in range(200)]
        assert again == codes

        srv.clear_scripts()
        remote.hold_all()
        result: list[int] = []
        th = threading.Thread(target=lambda: result.append(httpx.post(srv.url + "/y").status_code))
        th.start()
        srv.wait_for_count_sync(1, 5, path_prefix="/y")
        time.sleep(0.05)
        assert result == []
        remote.release_all()
        th.join(5)
        assert result == [200]


def test_script_mode_starts_answers_and_exits_on_sigterm() -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    with subprocess.Popen(  # the with block closes the pipes
        [sys.executable, "-m", "outbox_notifier.testing.feishu_server", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    ) as proc:
        try:
            assert proc.stdout is not None
            url = proc.stdout.readline().strip()
            assert url.startswith("http://127.0.0.1:")
            r = httpx.post(url + "/flow/api/trigger-webhook/abc", json={"x": 1}, timeout=5)
            assert r.json() == FEISHU_OK
            doc = httpx.get(url + "/_requests", timeout=5).json()
            assert doc["requests"][0]["path"] == "/flow/api/trigger-webhook/abc"
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_stop_while_requests_are_held() -> None:
    srv = FeishuServer.in_thread()
    srv.hold_all()
    errors: list[BaseException] = []

    def call() -> None:
        try:
            httpx.post(srv.flow_url("held"), timeout=5)
        except httpx.TransportError as exc:
            errors.append(exc)

    th = threading.Thread(target=call)
    th.start()
    srv.wait_for_count_sync(1, 5)
    t0 = time.monotonic()
    srv.stop()
    th.join(5)
    assert time.monotonic() - t0 < 3
    assert len(errors) == 1  # like a daemon's peer dying mid-call: no reply at all

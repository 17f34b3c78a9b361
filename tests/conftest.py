"""Shared fixtures: a real PostgreSQL with a migrated template database, one clone per test.

The server comes from ``outbox_notifier.testing.postgres.throwaway_server`` (the test DSN
variable, else a Docker container, else a private local cluster); tests never skip for lack of
one. Cloning a migrated template makes every test's database fresh and costs milliseconds; the
next clone is made on a thread while a test runs, so a test takes a ready one. Also the local
Feishu look-alike and a plain httpx transport, which the provider and HTTP tests
share.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import AsyncIterator, Iterator

import httpx
import psycopg
import pytest

from outbox_notifier import migrations
from outbox_notifier.testing import postgres
from outbox_notifier.testing.feishu_server import FeishuServer


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    with postgres.throwaway_server() as dsn:
        yield dsn


@pytest.fixture(scope="session")
def template_db(pg_server: str) -> Iterator[str]:
    dsn = postgres.create_database(pg_server, prefix="on_template")
    migrations.migrate(dsn)
    name = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
    assert isinstance(name, str)
    yield name
    postgres.drop_database(pg_server, dsn)


class Clones:
    """Clones of the template, one made ahead on a thread of its own (started by the first
    `take`): CREATE DATABASE runs on the server while the test before runs here."""

    def __init__(self, server: str, template: str) -> None:
        self.server, self.template = server, template
        self._ready: queue.Queue[str | BaseException] = queue.Queue(maxsize=1)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def take(self) -> str:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="db-clones", daemon=True)
            self._thread.start()
        made = self._ready.get(timeout=60)
        if isinstance(made, BaseException):
            raise made
        return made

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(60)
        while not self._ready.empty():
            made = self._ready.get_nowait()
            if isinstance(made, str):
                postgres.drop_database(self.server, made)

    def _run(self) -> None:
        while not self._stop.is_set():
            made: str | BaseException
            try:
                made = postgres.create_database(
                    self.server, template=self.template, prefix="on_test"
                )
            except Exception as exc:  # the test that takes it fails with it, the next tries anew
                made = exc
            while True:
                try:
                    self._ready.put(made, timeout=0.5)
                    break
                except queue.Full:
                    if self._stop.is_set():
                        if isinstance(made, str):
                            postgres.drop_database(self.server, made)
                        return


@pytest.fixture(scope="session")
def clones(pg_server: str, template_db: str) -> Iterator[Clones]:
    made = Clones(pg_server, template_db)
    yield made
    made.close()


@pytest.fixture
def empty_db(pg_server: str) -> Iterator[str]:
    """A fresh database with no schema at all."""
    dsn = postgres.create_database(pg_server, prefix="on_test")
    yield dsn
    postgres.drop_database(pg_server, dsn)


@pytest.fixture
def db(pg_server: str, clones: Clones) -> Iterator[str]:
    """DSN of a fresh, migrated database for this test alone."""
    dsn = clones.take()
    yield dsn
    postgres.drop_database(pg_server, dsn)


@pytest.fixture
def conn(db: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(db, autocommit=True) as connection:
        yield connection


@pytest.fixture
async def aconn(db: str) -> AsyncIterator[psycopg.AsyncConnection]:
    async with await psycopg.AsyncConnection.connect(db, autocommit=True) as connection:
        yield connection


@pytest.fixture
async def srv() -> AsyncIterator[FeishuServer]:
    """The local Feishu look-alike, running in the test's own loop."""
    async with FeishuServer() as server:
        yield server


@pytest.fixture
async def transport() -> AsyncIterator[httpx.AsyncBaseTransport]:
    """A plain httpx transport for provider calls to the look-alike (the daemon's guarded
    one has its own tests: tests/integration/test_http_stack.py)."""
    async with httpx.AsyncHTTPTransport() as opened:
        yield opened

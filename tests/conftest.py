"""Shared fixtures: a real PostgreSQL with a migrated template database, one clone per test.

The server comes from ``outbox_notifier.testing.postgres.throwaway_server`` (the test DSN
variable, else a Docker container, else a private local cluster); tests never skip for lack of
one. Cloning a migrated template makes every test's database fresh and costs milliseconds.
Also the local Feishu look-alike and a plain httpx transport, which the provider and HTTP tests
share.
"""

from __future__ import annotations

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


@pytest.fixture
def empty_db(pg_server: str) -> Iterator[str]:
    """A fresh database with no schema at all."""
    dsn = postgres.create_database(pg_server, prefix="on_test")
    yield dsn
    postgres.drop_database(pg_server, dsn)


@pytest.fixture
def db(pg_server: str, template_db: str) -> Iterator[str]:
    """DSN of a fresh, migrated database for this test alone."""
    dsn = postgres.create_database(pg_server, template=template_db, prefix="on_test")
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

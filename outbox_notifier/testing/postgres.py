"""Throwaway PostgreSQL servers for tests, benchmarks and ``outbox-notifier demo``.

``throwaway_server()`` finds a server the way the test suite promises to:

1. ``OUTBOX_NOTIFIER_TEST_DSN`` when set (an existing server; callers create and drop their own
   databases on it);
2. a testcontainers PostgreSQL container when a Docker engine answers;
3. a private cluster made with the local ``initdb``/``pg_ctl`` in a temporary directory, on a free
   loopback port, removed afterwards.

``initdb`` refuses to run as root, so as root the cluster is created and run as the unprivileged
``postgres`` user (override with ``OUTBOX_NOTIFIER_TEST_PG_USER``).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

import psycopg
from psycopg import sql

TEST_DSN_ENV = "OUTBOX_NOTIFIER_TEST_DSN"


class NoPostgres(RuntimeError):
    """No way to get a PostgreSQL server on this machine."""


def _pg_bindir() -> Path:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    # Debian and Ubuntu keep the server binaries off PATH, one directory per major version.
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    if candidates:
        return Path(candidates[-1]).parent
    raise NoPostgres(
        "no PostgreSQL server binaries (initdb, pg_ctl) found: install PostgreSQL, "
        f"start Docker, or set {TEST_DSN_ENV}"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class LocalCluster:
    """A private PostgreSQL cluster in a temporary directory, on a free loopback port."""

    def __init__(self, *, fsync: bool = False, settings: Mapping[str, str] | None = None) -> None:
        self.bindir = _pg_bindir()
        self.port = _free_port()
        self.fsync = fsync
        # Extra server settings (``-c name=value``), e.g. a preloaded library for a benchmark.
        self.settings = dict(settings or {})
        self.root = Path(tempfile.mkdtemp(prefix="outbox-notifier-pg-"))
        self.datadir = self.root / "data"
        self.logfile = self.root / "postgres.log"
        self._user: str | None = None
        if os.geteuid() == 0:
            self._user = os.environ.get("OUTBOX_NOTIFIER_TEST_PG_USER", "postgres")
            entry = pwd.getpwnam(self._user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
        result = subprocess.run(
            [str(self.bindir / args[0]), *args[1:]],
            capture_output=True,
            text=True,
            env=env,
            user=self._user,
            cwd=self.root,
            check=False,
        )
        if result.returncode != 0:
            log = self.logfile.read_text() if self.logfile.exists() else ""
            raise NoPostgres(
                f"{args[0]} failed ({result.returncode}): {result.stderr.strip()} {log[-2000:]}"
            )

    def start(self) -> None:
        if not self.datadir.exists():
            self._run(
                "initdb", "-D", str(self.datadir), "-U", "postgres", "--auth=trust",
                "-E", "UTF8", "--no-sync", "--no-instructions",
            )  # fmt: skip
        durability = "" if self.fsync else " -c fsync=off -c synchronous_commit=off"
        extra = "".join(f" -c {name}={value}" for name, value in self.settings.items())
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root}"
            f" -c max_connections=200{durability}{extra}"
        )
        self._run("pg_ctl", "start", "-w", "-D", str(self.datadir), "-l", str(self.logfile),
                  "-o", options)  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "stop", "-w", "-D", str(self.datadir), "-m", mode)

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def remove(self) -> None:
        with contextlib.suppress(NoPostgres):
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


def _docker_answers() -> bool:
    try:
        import docker
    except ImportError:
        return False
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if host.startswith("unix://") and not os.path.exists(host.removeprefix("unix://")):
        # No engine there; and docker-py's failed connect to a missing socket leaves it open.
        return False
    try:
        # A fixed API version: the default ("auto") asks the engine from inside the constructor,
        # and a constructor that fails there leaves its socket open.
        client = docker.from_env(version=docker.constants.MINIMUM_DOCKER_API_VERSION, timeout=3)
    except Exception:  # any failure means: no usable engine
        return False
    try:
        return bool(client.ping())
    except Exception:
        return False
    finally:
        client.close()


@contextlib.contextmanager
def throwaway_server(
    *, fsync: bool = False, settings: Mapping[str, str] | None = None
) -> Iterator[str]:
    """Yields the DSN of a PostgreSQL server (see the module docstring for how it is found).

    ``fsync`` and ``settings`` (extra ``-c name=value`` server settings) apply to the private
    cluster only: an existing server or a container keeps its own configuration, so a caller
    that needs a setting checks the server it got."""
    existing = os.environ.get(TEST_DSN_ENV)
    if existing:
        yield existing
        return
    if _docker_answers():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16-alpine", driver=None) as container:
            yield container.get_connection_url()
        return
    cluster = LocalCluster(fsync=fsync, settings=settings)
    try:
        cluster.start()
        yield cluster.dsn
    finally:
        cluster.remove()


def with_database(dsn: str, dbname: str) -> str:
    """The DSN ``dsn`` pointing at another database."""
    return psycopg.conninfo.make_conninfo(dsn, dbname=dbname)


def create_database(server_dsn: str, *, template: str | None = None, prefix: str = "on") -> str:
    """Creates a uniquely named database (optionally from a template); returns its DSN."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        if template is None:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        else:
            conn.execute(
                sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                    sql.Identifier(name), sql.Identifier(template)
                )
            )
    return with_database(server_dsn, name)


def drop_database(server_dsn: str, dsn: str) -> None:
    name = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
    assert isinstance(name, str)
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )

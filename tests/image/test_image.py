"""The container image, built from the Containerfile by the README's commands and run for real.

One test, in steps: build (README's commands; a podman wrapper adds only what these machines
need: host networking, the local base image, and plain HTTP to the local registry), push to a
local registry, inspect the image contract, then ``migrate`` and ``run`` in the image with a
read-only root filesystem as uid 10001 and host networking, against the test PostgreSQL and the
Feishu look-alike; one record is delivered, /readyz answers 200, and SIGTERM ends it with exit 0
within the drain deadline. The daemon connects as a login role that has only the daemon role.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from psycopg import sql

import outbox_notifier
from outbox_notifier.testing.feishu_server import FeishuServer
from tests.image.engine import Podman, missing_tools
from tests.support import add_channel, enqueue, payload, scalar

pytestmark = [pytest.mark.image, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
README_MARK = "<!-- image-build: run by tests/image/test_image.py -->"
DOCUMENTED_IMAGE = "registry.example.com/outbox-notifier"
SOURCE = "https://git.example.com/outbox-notifier.git"
DRAIN_S = 5.0
# Set by .ci/run: there the image test must run, not skip.
REQUIRE_ENV = "OUTBOX_NOTIFIER_TEST_REQUIRE_IMAGE"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def readme_build_commands() -> str:
    """The shell block that follows README_MARK in README.md."""
    text = (ROOT / "README.md").read_text()
    match = re.search(re.escape(README_MARK) + r"\s*```sh\n(.*?)```", text, re.S)
    assert match, f"README.md has no ```sh block after {README_MARK}"
    return match.group(1)


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Podman:
    missing = missing_tools()
    if missing:
        reason = f"no container engine here: {', '.join(missing)} not installed"
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return Podman(tmp_path_factory.mktemp("podman"))


@pytest.fixture(scope="module")
def registry(podman: Podman, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A local image registry (Debian's docker-registry) on a loopback port."""
    binary = shutil.which("docker-registry")
    assert binary is not None  # checked with the other tools by the podman fixture
    work = tmp_path_factory.mktemp("registry")
    port = _free_port()
    config = work / "config.yml"
    config.write_text(
        "version: 0.1\n"
        f"storage:\n  filesystem:\n    rootdirectory: {work / 'data'}\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
        "log:\n  level: warn\n"
    )
    proc = subprocess.Popen([binary, "serve", str(config)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v2/", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the local registry did not start"
            time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _podman_wrapper(bin_dir: Path, conf_env: dict[str, str]) -> None:
    """A `podman` first on PATH that adds this machine's flags to the README's commands: its
    containers.conf (the README's), host networking, plain HTTP to the local registry."""
    wrapper = bin_dir / "podman"
    real = shutil.which("podman")
    wrapper.write_text(
        "#!/bin/sh\n"
        f"export CONTAINERS_CONF='{conf_env['CONTAINERS_CONF']}'\n"
        'cmd="$1"; shift\n'
        'case "$cmd" in\n'
        f'  build) exec {real} build --network host "$@" ;;\n'
        f'  push) exec {real} push --tls-verify=false "$@" ;;\n'
        f'  *) exec {real} "$cmd" "$@" ;;\n'
        "esac\n"
    )
    wrapper.chmod(0o755)


@pytest.fixture
def login_as_daemon(pg_server: str, empty_db: str) -> Iterator[str]:
    name = f"on_image_{uuid.uuid4().hex[:10]}"
    yield name
    with psycopg.connect(pg_server, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))


def test_image_builds_pushes_and_delivers_read_only_as_uid_10001(
    podman: Podman,
    registry: str,
    empty_db: str,
    login_as_daemon: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    version = outbox_notifier.__version__
    started = time.monotonic()
    base = podman.ensure_base()  # begun when the session collected this test (engine.BASE)
    base_s = time.monotonic() - started

    # 1. The README's build commands, as written (image name pointed at the local registry).
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _podman_wrapper(bin_dir, dict(podman.env))
    image = f"{registry}/outbox-notifier"
    tag = f"{image}:{version}"
    request.addfinalizer(lambda: podman.run("rmi", "--force", tag, check=False))
    script = readme_build_commands().replace(DOCUMENTED_IMAGE, image)
    assert "podman build" in script and "podman push" in script
    # the README's route where the public registry is unreachable: a local base
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
        "BASE_IMAGE": base,
        "SOURCE": SOURCE,
    }
    dangling_before = set(podman.run("images", "-q", "-f", "dangling=true").stdout.split())
    # sh, as pasted: the block itself must stop at the first error
    build = subprocess.run(["sh", "-c", script], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=600, check=False)  # fmt: skip
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
    dangling = set(podman.run("images", "-q", "-f", "dangling=true").stdout.split())
    assert dangling <= dangling_before, "the build left dangling images behind"
    catalog = httpx.get(f"http://{registry}/v2/outbox-notifier/tags/list", timeout=5).json()
    assert catalog["tags"] == [version]

    # 2. The image contract.
    inspect = podman.run("image", "inspect", tag, "--format",
                         "{{json .Config}}").stdout  # fmt: skip
    config: dict[str, Any] = httpx.Response(200, content=inspect).json()
    labels = config["Labels"]
    assert labels["org.opencontainers.image.version"] == version
    assert labels["org.opencontainers.image.licenses"] == "MIT"
    assert labels["org.opencontainers.image.source"] == SOURCE
    assert "DingTalk" in labels["org.opencontainers.image.description"]
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ["outbox-notifier"]
    assert config["Cmd"] == ["run"]
    locked = ["run", "--rm", "--read-only", "--user", "10001", "--network", "host"]
    assert podman.run(*locked, tag, "--version").stdout.strip() == f"outbox-notifier {version}"
    cas = podman.run(*locked, "--entrypoint", "python3", tag, "-c",
                     "import ssl; print(ssl.create_default_context().cert_store_stats()"
                     "['x509_ca'])").stdout  # fmt: skip
    assert int(cas) > 10, "no CA certificates in the image"
    built_s = time.monotonic() - started

    # 3. migrate with the schema owner's DSN, then run as a login role with the daemon role only.
    migrate = podman.run(*locked, "-e", f"OUTBOX_NOTIFIER_DSN={empty_db}", tag, "migrate")
    assert "applied 0004_roles_and_versioned_functions" in migrate.stdout
    with psycopg.connect(empty_db, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN IN ROLE outbox_notifier_daemon").format(
                sql.Identifier(login_as_daemon)
            )
        )
        daemon_dsn = psycopg.conninfo.make_conninfo(empty_db, user=login_as_daemon)
        with FeishuServer.in_thread() as server:
            add_channel(conn, 1, server.flow_url("alice"))
            enqueue(conn, payload("from-the-image"))
            port = _free_port()
            name = f"outbox-notifier-test-{uuid.uuid4().hex[:8]}"
            proc = podman.popen([
                *locked, "--name", name,
                "-e", f"OUTBOX_NOTIFIER_DSN={daemon_dsn}",
                "-e", f"OUTBOX_NOTIFIER_HTTP_LISTEN=127.0.0.1:{port}",
                "-e", "OUTBOX_NOTIFIER_FLOW_ALLOWED_SCHEMES=http",
                "-e", "OUTBOX_NOTIFIER_FLOW_ALLOWED_HOSTS=127.0.0.1",
                # for the egress guard that refuses loopback unless allowed (ignored before it)
                "-e", "OUTBOX_NOTIFIER_EGRESS_ALLOW_CIDRS=127.0.0.0/8",
                "-e", "OUTBOX_NOTIFIER_POLL_INTERVAL_S=0.5",
                "-e", f"OUTBOX_NOTIFIER_SHUTDOWN_DEADLINE_S={DRAIN_S}",
                tag,
            ])  # fmt: skip
            try:
                deadline = time.monotonic() + 60
                ready = None
                while time.monotonic() < deadline and proc.poll() is None:
                    try:
                        ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2)
                    except httpx.TransportError:
                        ready = None
                    sent = scalar(conn, "SELECT count(*) FROM outbox_notifier.notification_records"
                                  " WHERE status = 'sent'")  # fmt: skip
                    if ready is not None and ready.status_code == 200 and sent == 1:
                        break
                    time.sleep(0.3)
                assert proc.poll() is None, proc.communicate()[0][-4000:]
                assert ready is not None and ready.status_code == 200, ready and ready.text
                assert sent == 1
                assert server.count("/flow/api/trigger-webhook/alice") == 1

                stop_at = time.monotonic()
                podman.run("kill", "--signal", "TERM", name)
                out, _ = proc.communicate(timeout=DRAIN_S + 15)
                stopped_s = time.monotonic() - stop_at
            finally:
                if proc.poll() is None:
                    podman.run("kill", name, check=False)
                    proc.wait(timeout=30)
    assert proc.returncode == 0, out[-4000:]
    assert stopped_s < DRAIN_S + 5
    assert "Traceback" not in out
    print(
        f"waited {base_s:.1f}s for the base image; image built and checked in {built_s:.1f}s;"
        f" total {time.monotonic() - started:.1f}s"
    )

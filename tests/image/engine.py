"""Podman for the image test: the settings these machines need, and a locally made base image.

Measured facts behind the choices: podman and buildah work as root with the runc runtime (crun
cannot set rlimits here) and no default ulimits, builds need host networking, and no base image
can be pulled from a registry; so the base is made with debootstrap (Debian's packages) and
``podman import``, and kept between runs (its tag names what went into it).

On a fresh machine making the base is most of the image test's time (about a minute of
debootstrap, downloads included), so `BASE` makes it on a thread of its own at the lowest CPU
priority, started when a session collects an image test (tests/image/conftest.py): it runs while
the tests collected before it do, and the image test waits for what is left of it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

# What the Containerfile asks of a base (see its BASE_IMAGE note).
BASE_SUITE = "bookworm"
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
_BASE_KEY = hashlib.sha256(f"{BASE_SUITE} {' '.join(BASE_PACKAGES)}".encode()).hexdigest()[:12]
BASE_IMAGE = f"localhost/outbox-notifier-test-base:{BASE_SUITE}-{_BASE_KEY}"

CONTAINERS_CONF = """\
[containers]
default_ulimits = []

[engine]
runtime = "runc"
"""


def missing_tools() -> list[str]:
    tools = ("podman", "runc", "debootstrap", "docker-registry")
    return [tool for tool in tools if shutil.which(tool) is None]


class Podman:
    """Runs podman with a containers.conf of its own (passed by CONTAINERS_CONF)."""

    def __init__(self, workdir: Path) -> None:
        conf = workdir / "containers.conf"
        conf.write_text(CONTAINERS_CONF)
        self.env: Mapping[str, str] = {**os.environ, "CONTAINERS_CONF": str(conf)}

    def run(
        self, *args: str, timeout_s: float = 600, check: bool = True, **kwargs: object
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            ["podman", *args], capture_output=True, text=True, timeout=timeout_s,
            env=self.env, check=False, **kwargs,  # type: ignore[call-overload]
        )  # fmt: skip
        if check and proc.returncode != 0:
            raise AssertionError(
                f"podman {' '.join(args[:3])} exited {proc.returncode}:\n"
                f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
            )
        return proc  # type: ignore[no-any-return]

    def popen(self, args: Sequence[str]) -> subprocess.Popen[str]:
        return subprocess.Popen(
            ["podman", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=self.env,
        )  # fmt: skip

    def image_exists(self, name: str) -> bool:
        return self.run("image", "exists", name, check=False).returncode == 0

    def ensure_base(self) -> str:
        """The local base image, made once per machine (see `BASE`)."""
        return BASE.wait()


def _mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path`` (debootstrap mounts /proc and /sys in its target while
    it runs, and unmounts them when it exits)."""
    prefix = str(path.resolve())
    found = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        point = line.split()[1].replace("\\040", " ")
        if point == prefix or point.startswith(prefix + "/"):
            found.append(point)
    return found


class BaseImage:
    """Makes `BASE_IMAGE` unless it exists, once, on a thread of its own: debootstrap runs
    under ``nice -n 19`` (and dpkg without fsync), so tests running meanwhile keep the CPU."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._stopped = False
        self._error: BaseException | None = None

    def start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="base-image", daemon=True)
                self._thread.start()

    def wait(self, timeout_s: float = 900.0) -> str:
        """Starts the work unless started; returns the image's name once it exists."""
        self.start()
        assert self._thread is not None
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise AssertionError(f"the base image was not made within {timeout_s:g}s")
        if self._error is not None:
            raise AssertionError(f"making the base image failed: {self._error}") from self._error
        return BASE_IMAGE

    def stop(self) -> None:
        """At the session's end: debootstrap still running is stopped (SIGTERM: it unmounts
        what it mounted on its way out) and its work removed."""
        with self._lock:
            self._stopped = True
            proc, thread = self._proc, self._thread
        if proc is not None and proc.poll() is None:
            proc.terminate()
        if thread is not None:
            thread.join(120)

    def _run(self) -> None:
        try:
            with tempfile.TemporaryDirectory(prefix="outbox-notifier-podman-") as conf:
                podman = Podman(Path(conf))
                if not podman.image_exists(BASE_IMAGE):
                    self._make(podman)
        except BaseException as exc:
            self._error = exc

    def _make(self, podman: Podman) -> None:
        tmp = Path(tempfile.mkdtemp(prefix="outbox-notifier-base-"))
        rootfs = tmp / "rootfs"
        try:
            with self._lock:
                if self._stopped:
                    raise RuntimeError("stopped before it began")
                self._proc = subprocess.Popen(
                    ["nice", "-n", "19", "debootstrap", "--variant=minbase",
                     f"--include={','.join(BASE_PACKAGES)}", BASE_SUITE, str(rootfs)],
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                    # dpkg's defaults, and no fsync of every file it unpacks: the tree is
                    # thrown away once imported, and the tests running meanwhile keep the disk
                    env={**os.environ, "DPKG_FORCE": "downgrade,security-mac,unsafe-io"},
                )  # fmt: skip
            out, _ = self._proc.communicate(timeout=900)
            if self._proc.returncode != 0:
                raise RuntimeError(
                    f"debootstrap exited {self._proc.returncode}: {out.decode()[-3000:]}"
                )
            shutil.rmtree(rootfs / "var/cache/apt/archives", ignore_errors=True)
            shutil.rmtree(rootfs / "var/lib/apt/lists", ignore_errors=True)
            tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
            try:
                podman.run("import", "-", BASE_IMAGE, stdin=tar.stdout)
            finally:
                assert tar.stdout is not None
                tar.stdout.close()
                tar.wait()
        finally:
            if self._proc is not None and self._proc.poll() is None:
                self._proc.kill()
                self._proc.wait()
            # Never remove through a mount left behind (a /proc or /sys of the target).
            if not _mounts_under(tmp):
                shutil.rmtree(tmp, ignore_errors=True)


BASE = BaseImage()

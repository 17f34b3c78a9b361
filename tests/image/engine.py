"""Podman for the image test: the settings these machines need, and a locally made base image.

Measured facts behind the choices: podman and buildah work as root with the runc runtime (crun
cannot set rlimits here) and no default ulimits, builds need host networking, and no base image
can be pulled from a registry; so the base is made with debootstrap (Debian's packages) and
``podman import``, and kept between runs (its tag names what went into it).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
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
        """The local base image, made once per machine (about 30 s of debootstrap)."""
        if self.image_exists(BASE_IMAGE):
            return BASE_IMAGE
        with tempfile.TemporaryDirectory(prefix="outbox-notifier-base-") as tmp:
            rootfs = Path(tmp) / "rootfs"
            subprocess.run(
                ["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
                 BASE_SUITE, str(rootfs)],
                check=True, capture_output=True, timeout=900,
            )  # fmt: skip
            shutil.rmtree(rootfs / "var/cache/apt/archives", ignore_errors=True)
            shutil.rmtree(rootfs / "var/lib/apt/lists", ignore_errors=True)
            tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
            try:
                self.run("import", "-", BASE_IMAGE, stdin=tar.stdout)
            finally:
                assert tar.stdout is not None
                tar.stdout.close()
                tar.wait()
        return BASE_IMAGE

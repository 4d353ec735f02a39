"""A private PostgreSQL cluster for one test: initdb, start, crash, start again, remove.

Outage tests crash the database server itself (``pg_ctl stop -m immediate``, what a
power cut or an OOM kill does to the postmaster), which they must never do to the
shared server other tests use. :class:`PgCluster` makes a throwaway cluster in a
temporary folder, listening on a free port on 127.0.0.1 only, with its socket in
that folder; the ``pg_cluster`` fixture removes it at teardown whatever happened.

PostgreSQL refuses to run as root: as root, the cluster runs as the ``postgres``
OS user and its folder belongs to that user; as anyone else, as that user.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service.devstack import free_port

BINARIES = "/usr/lib/postgresql/*/bin"
OS_USER = "postgres"
START_TIMEOUT = 60


def server_binaries() -> Path | None:
    """The newest PostgreSQL server's ``bin`` folder (Debian's layout), or the one on PATH."""
    found = sorted(glob.glob(BINARIES), key=lambda p: int(Path(p).parent.name), reverse=True)
    if found:
        return Path(found[0])
    on_path = shutil.which("pg_ctl")
    return Path(on_path).parent if on_path else None


class PgCluster:
    """One PostgreSQL cluster in a temporary folder, on a free loopback port."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="motionhook-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self._as: dict[str, Any] = {}
        if os.geteuid() == 0:
            account = pwd.getpwnam(OS_USER)
            os.chown(self.root, account.pw_uid, account.pw_gid)
            self._as = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run(
            [str(self.bin_dir / tool), *args],
            check=True,
            capture_output=True,
            cwd=self.root,
            timeout=START_TIMEOUT,
            **self._as,
        )

    def init(self) -> None:
        """Create the cluster: superuser ``postgres``, trust on loopback, no fsync."""
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-sync")

    def start(self) -> None:
        """Start the server and wait until it accepts connections (crash recovery included)."""
        options = " ".join(
            (
                f"-p {self.port}",
                "-c listen_addresses=127.0.0.1",
                f"-c unix_socket_directories={self.root}",
                # The machine does not crash in these tests, only the server: committed
                # WAL sits in the kernel's page cache and survives, so no fsync is needed.
                "-c fsync=off",
                "-c max_connections=100",
            )
        )
        self._run("pg_ctl", "start", "-w", "-D", str(self.data), "-l", str(self.log), "-o", options)

    def crash(self) -> None:
        """Stop the server the way a crash does: no checkpoint, every backend killed."""
        self._run("pg_ctl", "stop", "-w", "-D", str(self.data), "-m", "immediate")

    def remove(self) -> None:
        """Stop the server if it runs (by its pid file when pg_ctl cannot), delete the folder."""
        pid_file = self.data / "postmaster.pid"
        if pid_file.exists():
            try:
                self.crash()
            except (subprocess.SubprocessError, OSError):
                pid = int(pid_file.read_text().split()[0])
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)

    def server_log(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@pytest.fixture
def pg_cluster() -> Iterator[PgCluster]:
    """A started private cluster, removed at teardown even when the test fails."""
    bin_dir = server_binaries()
    if bin_dir is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl) on this machine")
    cluster = PgCluster(bin_dir)
    try:
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        cluster.remove()

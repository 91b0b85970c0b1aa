"""A throwaway PostgreSQL 15 cluster for tests and `make pg-up`: its own data folder, loopback
only (127.0.0.1 and a unix socket in that folder), trust auth on loopback, fsync on, small
(shared_buffers 32MB, max_connections 50: the machines are shared).

PostgreSQL refuses to run as root; as root the cluster runs as the unprivileged system user
``dlis-pg`` (created when missing), which owns the data folder.

Manual use: ``python -m tests.integration.broker.pg up DIR`` prints the URL; ``... down DIR`` stops it.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

PG_BIN = Path(os.environ.get("DLIS_PG_BIN", "/usr/lib/postgresql/15/bin"))
PG_USER = "dlis-pg"
DB_NAME = "dlis"


class PgError(RuntimeError):
    """The test cluster could not start or stop (the message names the log to read)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_user(cmd: list[str]) -> list[str]:
    """Run ``cmd`` as ``dlis-pg`` when we are root (PostgreSQL refuses root), else as ourselves."""
    if os.geteuid() != 0:
        return cmd
    try:
        pwd.getpwnam(PG_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_USER], check=True)
    return ["runuser", "-u", PG_USER, "--", *cmd]


class PgCluster:
    """One cluster in ``root`` (created by :meth:`start`, stopped by :meth:`stop`)."""

    def __init__(self, root: Path, port: int | None = None):
        self.root = Path(root)
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self.port = port or _free_port()

    @property
    def url(self) -> str:
        return self.url_of(DB_NAME)

    def url_of(self, database: str) -> str:
        return f"postgresql+psycopg://{PG_USER}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A new empty database (a fresh ledger per test); its URL."""
        engine = create_engine(self.url, isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
        finally:
            engine.dispose()
        return self.url_of(name)

    def _run(self, *cmd: str) -> None:
        res = subprocess.run(_as_user(list(cmd)), capture_output=True, text=True, timeout=120)
        if res.returncode != 0:
            raise PgError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()[-2000:]}; see {self.log}")

    def start(self) -> PgCluster:
        if not (PG_BIN / "postgres").exists():
            raise PgError(f"PostgreSQL 15 is not installed at {PG_BIN}: apt-get install postgresql-15")
        self.root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            _as_user(["true"])  # creates the user when missing
            shutil.chown(self.root, PG_USER, PG_USER)
        self.root.chmod(0o700)
        if not (self.data / "PG_VERSION").exists():
            self._run(str(PG_BIN / "initdb"), "-D", str(self.data), "-U", PG_USER, "-A", "trust", "-E", "UTF8",
                      "--no-instructions")  # fmt: skip
        opts = (
            f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.root} "
            "-c shared_buffers=32MB -c max_connections=50 -c fsync=on"
        )
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", opts, "-w", "-t", "60",
                  "start")  # fmt: skip
        deadline = time.monotonic() + 30
        while True:  # createdb as soon as the server takes connections
            try:
                self._run(str(PG_BIN / "createdb"), "-h", str(self.root), "-p", str(self.port), "-U", PG_USER, DB_NAME)
                return self
            except PgError as exc:
                if "already exists" in str(exc):
                    return self
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def __enter__(self) -> PgCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """One cluster per test session, in a folder of its own under the system temp dir (pytest's
    tmp folders are private to root: the ``dlis-pg`` user could not enter them)."""
    root = Path(tempfile.mkdtemp(prefix="dlis-pg-"))
    cluster = PgCluster(root).start()
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture()
def pg_url(pg_cluster: PgCluster) -> str:
    """A fresh PostgreSQL database for this test: its SQLAlchemy URL."""
    return pg_cluster.create_database("t_" + secrets.token_hex(6))


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("up", "down"):
        print("usage: python -m tests.integration.broker.pg up|down DIR", file=sys.stderr)
        return 2
    root = Path(argv[1]).resolve()
    port_file = root / "port"
    if argv[0] == "up":
        port = int(port_file.read_text()) if port_file.exists() else None
        cluster = PgCluster(root, port).start()
        port_file.write_text(str(cluster.port))
        print(cluster.url)
    else:
        PgCluster(root, int(port_file.read_text()) if port_file.exists() else 1).stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

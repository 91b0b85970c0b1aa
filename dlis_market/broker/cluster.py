"""Several broker processes behind one API on one PostgreSQL ledger: who is alive, who settles.

Every process writes a heartbeat (database clock) for its instance id; a peer whose heartbeat is
older than ``broker.instance_stale_s`` is taken for dead, and a live process reclaims the jobs it
left running (:meth:`.ledger.Ledger.recover_interrupted`). One process at a time settles: the one
holding a session-level advisory lock on a connection of its own. The lock is the lease: when that
process dies its connection drops and PostgreSQL releases the lock, so a survivor takes it over
within one heartbeat, with nothing to expire or clean up. The settler's batch rows are committed
before their transactions are sent, and JobMarket refuses a used nonce or batch id, so a takeover
finishes a dead settler's open batches without paying anything twice; one settler at a time also
keeps the broker account's transaction nonces in one sequence.

On SQLite (one process) a member does nothing and always settles: today's single broker.
"""

from __future__ import annotations

import logging
import threading

from sqlalchemy import Connection, text
from sqlalchemy.exc import DBAPIError

from dlis_market.broker.ledger import LOCK_SETTLER, InstanceRow, Ledger

log = logging.getLogger(__name__)

_NOW = "extract(epoch FROM clock_timestamp())::float8"


class ClusterMember:
    """This process as a member of its ledger's broker cluster. :meth:`join` before it admits
    jobs (they name it as their owner, and a peer takes the jobs of an owner it never saw beat
    for dead); :meth:`leave` when it stops."""

    def __init__(self, ledger: Ledger, broker: str, heartbeat_s: float):
        self.ledger = ledger
        self.name = f"dlis-settler:{broker.lower()}"
        self.heartbeat_s = heartbeat_s
        self._conn: Connection | None = None  # holds the settler lock while this process settles
        self._leader = not ledger.shared
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._joined = False

    @property
    def instance(self) -> str:
        return self.ledger.instance

    def is_settler(self) -> bool:
        """Whether this process is the one that settles now (always, on SQLite)."""
        return self._leader

    def join(self) -> None:
        """Write the first heartbeat (and try for the settler lease), then beat in a thread: a
        thread of its own, so a busy event loop never makes a live process look dead."""
        if not self.ledger.shared or self._joined:
            return
        self._joined = True
        self.beat()
        self._thread = threading.Thread(target=self._run, name="dlis-broker-heartbeat", daemon=True)
        self._thread.start()

    def leave(self) -> None:
        """Stop beating and give up the lease (a peer takes over at its next heartbeat)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.heartbeat_s + 10)
        self._drop_connection()

    def _run(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            self.beat()

    def beat(self) -> None:
        """One heartbeat; takes the settler lease when it is free. A database error loses the
        lease (the lock went with the connection) until a later beat gets it again."""
        try:
            conn = self._connection()
            conn.execute(
                text(
                    f"INSERT INTO {InstanceRow.__tablename__} (id, started_at, heartbeat_at) "
                    f"VALUES (:id, {_NOW}, {_NOW}) ON CONFLICT (id) DO UPDATE SET heartbeat_at = {_NOW}"
                ),
                {"id": self.instance},
            )
            if not self._leader:
                got = conn.execute(
                    text("SELECT pg_try_advisory_lock(:ns, hashtext(:name))"), {"ns": LOCK_SETTLER, "name": self.name}
                ).scalar()
                if got:
                    log.info("broker instance %s settles now (it holds the settler lease)", self.instance)
                self._leader = bool(got)
        except DBAPIError as exc:  # the ledger is unreachable: no lease until a beat gets through
            if self._leader:
                log.warning("broker instance %s lost the settler lease: %s", self.instance, exc)
            self._leader = False
            self._drop_connection()

    def _connection(self) -> Connection:
        if self._conn is None:
            self._conn = self.ledger.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        return self._conn

    def _drop_connection(self) -> None:
        """Close the lease connection (PostgreSQL releases the lock with it)."""
        self._leader = not self.ledger.shared
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.invalidate()  # never back to the pool: the session lock must go with it
                conn.close()
            except DBAPIError as exc:  # already broken: nothing left to release
                log.debug("closing the lease connection: %s", exc)

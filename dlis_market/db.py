"""How the project's stores (broker ledger, oracle store, outbox) open their SQLAlchemy engine.

Any SQLAlchemy URL works; for a SQLite file the folder is created and every connection uses the
WAL journal (readers never block the writer) with the ``synchronous`` level the store asks for. A
server database (PostgreSQL: several broker processes share one) gets connections checked before
reuse.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from sqlalchemy import Engine, create_engine, event, make_url

Synchronous = Literal["NORMAL", "FULL"]


def open_engine(url: str, *, synchronous: Synchronous = "FULL", foreign_keys: bool = False) -> Engine:
    """``create_engine(url)``, with the SQLite settings above when ``url`` is SQLite."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        # A server database can restart or drop idle connections: check one before reusing it.
        return create_engine(url, pool_pre_ping=True)
    engine = create_engine(url)
    if parsed.database not in (None, "", ":memory:"):
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)

    def pragmas(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA synchronous={synchronous}")
        if foreign_keys:
            cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    event.listen(engine, "connect", pragmas)
    return engine

"""Logging of the long-running commands: one configuration, text or JSON lines, no library noise.

:func:`configure_logging` is called once by ``dlis node start``, ``dlis broker start``, ``dlis
oracle start`` and ``dlis ipfs daemon`` (settings ``log.level`` and ``log.format``, env
``DLIS_LOG__LEVEL`` / ``DLIS_LOG__FORMAT``, or ``dlis --log-format json ...``). Records go to stderr,
one line each: ``text`` for people, ``json`` (one object per line: ``ts``, ``level``, ``logger``,
``message``, ``exc`` when an exception is attached, and any ``extra`` fields) for log shippers.
Libraries that chatter at INFO (hivemind's DHT, HTTP clients, web3, uvicorn's access lines) log
at WARNING and above unless the level asked for is DEBUG. uvicorn is started with
``log_config=None`` so its records come through here too.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from dlis_market.settings import LogSettings

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Loggers kept at WARNING unless DEBUG was asked for: they log per request or per DHT message.
NOISY = ("hivemind", "httpx", "httpcore", "urllib3", "web3", "asyncio", "uvicorn.access", "multipart")
# Attributes every LogRecord has; anything else on a record came from ``extra=`` and is kept in JSON.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime", "taskName"}


# Canonical level names: a library may rename them process-wide (hivemind makes WARNING "WARN").
_LEVELS = {logging.DEBUG: "DEBUG", logging.INFO: "INFO", logging.WARNING: "WARNING", logging.ERROR: "ERROR",
           logging.CRITICAL: "CRITICAL"}  # fmt: skip


class JsonFormatter(logging.Formatter):
    """One JSON object per record."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": _LEVELS.get(record.levelno, record.levelname),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        return json.dumps(out, default=str)


def configure_logging(settings: LogSettings, *, verbose: bool = False) -> None:
    """Route every record to stderr in ``settings.format``; ``verbose`` lowers the level to DEBUG."""
    level = logging.DEBUG if verbose else getattr(logging, settings.level)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if settings.format == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for name in NOISY:
        logging.getLogger(name).setLevel(logging.DEBUG if level <= logging.DEBUG else logging.WARNING)
    for name in ("uvicorn", "uvicorn.error"):  # uvicorn's own handlers would print each line twice
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True

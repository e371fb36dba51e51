"""How the ``patchwire`` command logs: readable lines (``--log-format text``, the default) or one JSON object per line
(``--log-format json``) for log collectors (Loki, Elasticsearch, Cloud Logging), on stderr.

A JSON line holds ``time`` (UTC, ISO 8601 with milliseconds), ``level``, ``logger``, ``message``, ``pid`` and, for a
record made while the server serves a call, the call's ``request_id``, ``method``, ``identity`` and ``peer`` (set on
the record by ``patchwire.service._calls``); ``exception`` holds a traceback where there is one. Standard library
only: the command's parser imports nothing else.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

__all__ = ["CALL_FIELDS", "FORMATS", "TEXT_FORMAT", "JsonFormatter", "configure_logging"]

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
CALL_FIELDS = ("request_id", "method", "identity", "peer")
"""Attributes of a record made inside a server call, written where present."""


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines in messages and tracebacks are escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        for key in CALL_FIELDS:
            value = getattr(record, key, None)
            if value:
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False, default=str)


class _Stderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted (a stream replaced since, e.g. by an embedding
    application or a test's capture, is never written to after it was closed)."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


_installed: logging.Handler | None = None
"""The handler :func:`configure_logging` put on the root logger last."""


def configure_logging(level: str, log_format: str = "text") -> None:
    """Logs records from ``level`` up to stderr as ``log_format`` (``text`` or ``json``); called again (once a
    configuration file has set them) it replaces the handler it installed before, and only that one: handlers that
    others put on the root logger (an embedding application's, a test's capture) stay."""
    global _installed
    if log_format not in FORMATS:
        raise ValueError(f"log format: expected one of {', '.join(FORMATS)}, got {log_format!r}")
    handler = _Stderr()
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    if _installed is not None:
        root.removeHandler(_installed)
    root.addHandler(handler)
    root.setLevel(level.upper())
    _installed = handler

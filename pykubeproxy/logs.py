"""Log lines in the formats kube-proxy writes: klog text (default) or JSON.

``--logging-format`` (``logging.format``) picks one, as upstream's component-base does.
Text is klog's header (``I1124 05:30:00.123456 1234 file.py:42] msg``). JSON is one object
per line with component-base's keys: ``ts`` (Unix time in milliseconds), ``caller``,
``msg``, ``v`` (the verbosity of an info line) and, for errors, ``err`` when an exception
is attached. Verbosity (``-v``) 4 and above turns on debug lines.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

QUIET_LIBRARIES = ("urllib3", "kubernetes", "pyroute2")
DEBUG_VERBOSITY = 4


def _caller(record: logging.LogRecord) -> str:
    return f"{Path(record.pathname).name}:{record.lineno}"


class KlogFormatter(logging.Formatter):
    """klog's line format, which operators' log tooling knows."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%m%d %H:%M:%S", time.localtime(record.created))
        micros = int(record.created % 1 * 1_000_000)
        line = (
            f"{record.levelname[0]}{stamp}.{micros:06d} {record.process:>7} {_caller(record)}] "
            f"{record.getMessage()}"
        )
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """component-base's JSON log lines (logging.format: json)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": round(record.created * 1000, 3),
            "caller": _caller(record),
            "msg": record.getMessage(),
        }
        if record.levelno >= logging.ERROR:
            if record.exc_info:
                entry["err"] = self.formatException(record.exc_info)
        else:
            entry["v"] = DEBUG_VERBOSITY if record.levelno < logging.INFO else 0
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(verbosity: int, fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else KlogFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbosity >= DEBUG_VERBOSITY else logging.INFO)
    quiet = logging.WARNING if verbosity < 6 else logging.NOTSET
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(quiet)

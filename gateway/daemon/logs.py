"""structlog configuration: one JSON object per line on stderr (journald keeps it).

Every connection logs through a logger bound with ``conn_id``; asyncssh's own chatter is kept at
WARNING and rendered through the same JSON formatter.

Every event, ours and the standard library's (aiohttp, asyncssh) alike, goes through
:func:`sanitize`: credentials are redacted (an ``Authorization`` value, a bearer token, an API
key's secret) and every string value is made printable and capped (keystore/printable.py),
so a client-supplied string can neither forge a log line nor carry terminal escapes.
"""

from __future__ import annotations

import logging
import sys
import threading

import structlog

from keystore.printable import LOG_MAX_CHARS, escape, redact, scrub

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


# Tracebacks are ours and multi-line: escaped (bar newlines and tabs) and redacted, not capped.
_MULTILINE_KEYS = frozenset({"exception", "stack"})


# Keys already found clean (our code's field names, in practice): not scrubbed again. Bounded,
# so that a stream of client-chosen keys cannot grow it.
_SAFE_KEYS: set[str] = set()
_SAFE_KEYS_MAX = 4096


def sanitize(
    _logger: object, _method: str, event_dict: structlog.typing.EventDict
) -> structlog.typing.EventDict:
    """The structlog processor: every value redacted, escaped and capped (keys too)."""
    for key, value in list(event_dict.items()):
        if key.startswith("_"):  # _record, _from_structlog: the formatter's own
            continue
        if key in _MULTILINE_KEYS and isinstance(value, str):
            event_dict[key] = escape(redact(value), keep="\n\t")
            continue
        if value is None or isinstance(value, bool | int | float):
            continue  # nothing to scrub in the value, and the key is checked below
        clean = scrub(value, LOG_MAX_CHARS)
        if clean is not value:
            event_dict[key] = clean
    for key in [k for k in event_dict if k not in _SAFE_KEYS]:
        if key.startswith("_"):
            continue
        safe_key = scrub(key, LOG_MAX_CHARS)
        if safe_key == key:
            if len(_SAFE_KEYS) < _SAFE_KEYS_MAX:
                _SAFE_KEYS.add(key)
            continue
        event_dict[safe_key] = event_dict.pop(key)
    return event_dict


_WRITE_LOCK = threading.Lock()


class _StderrLogger:
    """Writes each rendered line to the current ``sys.stderr`` (looked up at each write, so a
    test's capture or a reopened stderr is honoured). Why not the standard library's handler:
    a line through ``logging`` cost ~110 us (two LogRecords, caller lookup, handler lock,
    ProcessorFormatter); rendered here it is a third of that, and a session logs several."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name  # structlog.stdlib.add_logger_name reads it

    def msg(self, message: str) -> None:
        with _WRITE_LOCK:  # whole lines, whichever thread logs
            sys.stderr.write(message + "\n")

    debug = info = warning = warn = error = critical = exception = fatal = log = msg


def _stderr_logger(*args: object) -> _StderrLogger:
    return _StderrLogger(str(args[0]) if args else "gateway")


def configure(level: str = "info", fmt: str = "json") -> None:
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.stdlib.add_logger_name,
    ]
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    # Our events: rendered by structlog and written straight to stderr.
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, sanitize, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=True,
    )
    # The standard library's (aiohttp, asyncssh): the same processors, through its handler.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                sanitize,
                renderer,
            ],
            # A stdlib record's traceback (aiohttp's parse errors quote the request's header
            # lines) is formatted here, then sanitized like the rest.
            foreign_pre_chain=[*shared, structlog.processors.format_exc_info],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_LEVELS[level])
    logging.getLogger("asyncssh").setLevel(logging.WARNING)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)

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
        clean = scrub(value, LOG_MAX_CHARS)
        safe_key = scrub(key, LOG_MAX_CHARS)
        if safe_key != key:
            del event_dict[key]
        event_dict[safe_key] = clean
    return event_dict


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
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.format_exc_info,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                sanitize,  # ours and the standard library's events alike
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

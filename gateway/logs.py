"""Logging set-up: structlog events, JSON under systemd, readable lines in a terminal.

Every module logs with ``structlog.get_logger(__name__)`` and key/value events.
:func:`configure_logging` routes those events and the standard-library
records of pymodbus, python-can and asyncio through one
``structlog.stdlib.ProcessorFormatter`` on stdout, so a third-party warning
reads like a bessgw event.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Literal, TextIO

import structlog

LogFormat = Literal["auto", "json", "console"]
LOG_LEVELS = ("debug", "info", "warning", "error")


def running_under_systemd(environ: dict[str, str] | None = None) -> bool:
    """Tell whether systemd started this process with stdout on the journal.

    systemd sets ``INVOCATION_ID`` for every unit it starts and
    ``JOURNAL_STREAM`` when stdout or stderr is connected to the journal.
    """
    env = os.environ if environ is None else environ
    return bool(env.get("JOURNAL_STREAM") or env.get("INVOCATION_ID"))


def resolve_format(fmt: LogFormat, environ: dict[str, str] | None = None) -> str:
    """Turn ``auto`` into ``json`` under systemd and ``console`` anywhere else."""
    if fmt not in ("auto", "json", "console"):
        raise ValueError(f"log format {fmt!r} is not one of auto, json, console")
    if fmt != "auto":
        return fmt
    return "json" if running_under_systemd(environ) else "console"


def configure_logging(
    level: str = "info", fmt: LogFormat = "auto", stream: TextIO | None = None
) -> str:
    """Configure structlog and the standard ``logging`` root once per process.

    ``level`` is one of :data:`LOG_LEVELS`. Returns the format chosen
    (``json`` or ``console``). Calling it again replaces the earlier set-up,
    which is what a test or a SIGHUP with a new level needs.
    """
    level_name = level.lower()
    if level_name not in LOG_LEVELS:
        raise ValueError(f"log level {level!r} is not one of {', '.join(LOG_LEVELS)}")
    chosen = resolve_format(fmt)
    out = sys.stdout if stream is None else stream

    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if chosen == "json":
        renderer: structlog.types.Processor = structlog.processors.JSONRenderer()
        # JSON carries the traceback as a string field; the console renderer
        # prints it itself and must receive the exception unformatted.
        shared.append(structlog.processors.dict_tracebacks)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=out.isatty())

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)

    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level_name.upper())
    # pymodbus logs every retry and reconnect at INFO; the drivers log the
    # state changes that matter, so its own chatter is kept to warnings.
    logging.getLogger("pymodbus").setLevel(max(logging.WARNING, root.level))
    return chosen

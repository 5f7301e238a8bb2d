"""Suite-wide fixtures."""

from __future__ import annotations

import logging
import sys

import pytest
import structlog

from gateway.logs import configure_logging


class _CurrentStderr:
    """Write to whatever ``sys.stderr`` is now, so pytest captures the log lines."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return False


def pytest_configure(config: pytest.Config) -> None:
    """Send structlog and ``logging`` output to stderr at WARNING for the whole suite.

    structlog's default prints every event to stdout, where it would mix
    with the output of CLI commands that tests parse. Tests that check log
    events use ``structlog.testing.capture_logs`` or ``caplog.set_level``,
    which work with this set-up.
    """
    configure_logging("warning", "console", stream=_CurrentStderr())


@pytest.fixture(autouse=True)
def restore_logging():
    """Undo any logging set-up a test made, such as a CLI command that configures structlog.

    ``bessgw`` commands configure structlog and the ``logging`` root for the
    whole process. Without this, one CLI test would change what every later
    test's ``capture_logs`` or ``caplog`` receives.
    """
    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    pymodbus_level = logging.getLogger("pymodbus").level
    yield
    structlog.configure(**saved)
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger("pymodbus").setLevel(pymodbus_level)

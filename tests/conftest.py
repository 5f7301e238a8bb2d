"""Suite-wide fixtures."""

from __future__ import annotations

import logging

import pytest
import structlog


@pytest.fixture(autouse=True)
def restore_logging():
    """Undo any logging set-up a test made, such as a CLI command that quiets structlog.

    ``bessgw`` commands configure structlog and the ``logging`` root for the
    whole process. Without this, one CLI test would change what every later
    test's ``structlog.testing.capture_logs`` or ``caplog`` receives.
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

"""sd_notify messages: the Notifier alone, then the daemon process under a fake NOTIFY_SOCKET."""

from __future__ import annotations

import os
import socket
import uuid

import pytest

from gateway.service.notify import Notifier


@pytest.fixture
def notify_socket(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify.sock"
    sock.bind(str(path))
    sock.settimeout(5.0)
    yield str(path), sock
    sock.close()


def test_notifier_ready_status(notify_socket):
    path, sock = notify_socket
    notifier = Notifier({"NOTIFY_SOCKET": path})
    assert notifier.enabled
    assert notifier.ready("running: 2 PCS") is True
    message = sock.recv(4096).decode()
    assert message.splitlines() == ["READY=1", "STATUS=running: 2 PCS", f"MAINPID={os.getpid()}"]
    notifier.status("degraded:\nmeter stale")
    assert sock.recv(4096) == b"STATUS=degraded: meter stale"
    notifier.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"
    notifier.stopping()
    assert sock.recv(4096) == b"STOPPING=1\nSTATUS=stopping"
    notifier.close()


def test_notifier_abstract_socket():
    name = f"bessgw-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(5.0)
    try:
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert notifier.watchdog() is True
        assert sock.recv(4096) == b"WATCHDOG=1"
    finally:
        sock.close()


def test_notifier_disabled():
    notifier = Notifier({})
    assert not notifier.enabled
    assert notifier.ready("x") is False
    assert notifier.watchdog_interval_s is None


def test_notifier_relative_path_ignored():
    assert not Notifier({"NOTIFY_SOCKET": "relative/notify.sock"}).enabled


def test_notifier_watchdog_usec():
    notifier = Notifier({"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())})
    assert notifier.watchdog_interval_s == 2.0


@pytest.mark.parametrize(
    "env",
    [
        {"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"},
        {"WATCHDOG_USEC": "soon"},
        {"WATCHDOG_USEC": "0"},
    ],
)
def test_notifier_watchdog_ignored(env):
    assert Notifier(env).watchdog_interval_s is None


def test_notifier_socket_gone(tmp_path):
    """A vanished socket makes sends return False and count, without raising."""
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert notifier.watchdog() is False
    assert notifier.watchdog() is False
    assert notifier.failed_sends == 2

"""sd_notify messages: the Notifier alone, then the daemon process under a fake NOTIFY_SOCKET."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import threading
import time
import uuid

import pytest
from daemon_rig import DaemonRig

from gateway.service.api import ApiClient
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


def test_notifier_full_queue_does_not_block(notify_socket):
    # The test never reads the socket, so the kernel queue fills after a few dozen
    # datagrams. A send must then fail and be counted, never wait for room.
    path, sock = notify_socket
    notifier = Notifier({"NOTIFY_SOCKET": path})
    results: list[bool] = []
    sender = threading.Thread(
        target=lambda: results.extend(notifier.watchdog() for _ in range(2000)), daemon=True
    )
    sender.start()
    sender.join(timeout=10.0)
    assert not sender.is_alive()
    assert results.count(False) == notifier.failed_sends
    assert notifier.failed_sends > 0
    assert sock.recv(4096) == b"WATCHDOG=1"
    assert notifier.watchdog() is True
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


# -- the daemon process ---------------------------------------------------------

STALL_MS = 3000.0


async def _watch(rig, seconds: float) -> None:
    """Read notify messages every 20 ms for ``seconds`` so their times are accurate."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        rig.read_notify()
        await asyncio.sleep(0.02)


async def test_daemon_notify_watchdog(tmp_path):
    """READY and STATUS arrive; WATCHDOG pings stop while the fast loop stalls and resume after."""
    rig = DaemonRig(tmp_path)
    await rig.start_plant()
    rig.write_config()
    try:
        await rig.start_daemon(("BESSGW_TEST_HOOKS", "1"))
        t_ready = await rig.wait_notify("READY=1", 30)
        ready = next(m for t, m in rig.notify_log if "READY=1" in m)
        assert "STATUS=standby" in ready
        assert "MAINPID=" in ready
        assert any("STATUS=init: waiting for" in m for _, m in rig.notify_log)
        await rig.wait_notify("STATUS=running", 10)
        await _watch(rig, 1.5)
        pings_before = [t for t, m in rig.notify_log if m == "WATCHDOG=1" and t > t_ready]
        assert len(pings_before) >= 2

        client = ApiClient(rig.api_socket)
        await asyncio.to_thread(client.call, "test_stall_loop", duration_ms=STALL_MS)
        t_stall = time.monotonic() - rig._started_mono_s
        await _watch(rig, STALL_MS / 1000 + 3.0)

        # One supervision cycle (0.1 s) may still ping before it detects the stall.
        quiet_from, quiet_to = t_stall + 0.3, t_stall + STALL_MS / 1000 - 0.3
        during = [t for t, m in rig.notify_log if m == "WATCHDOG=1" and quiet_from < t < quiet_to]
        assert during == []
        after = [
            t for t, m in rig.notify_log if m == "WATCHDOG=1" and t > t_stall + STALL_MS / 1000
        ]
        assert after, rig.log_tail()
        statuses = [m for t, m in rig.notify_log if t > t_stall and m.startswith("STATUS=fault")]
        assert any("fast loop stalled" in m for m in statuses)

        await rig.signal(signal.SIGTERM)
        assert await rig.wait_exit(30) == 0
        rig.read_notify()
        assert any(m.startswith("STOPPING=1") for _, m in rig.notify_log)
    finally:
        await rig.close()

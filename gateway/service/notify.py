"""systemd notification protocol (``sd_notify``) over ``NOTIFY_SOCKET``.

The protocol is one datagram per message on an ``AF_UNIX`` socket, newline
separated ``KEY=VALUE`` assignments (see ``sd_notify(3)``). ``NOTIFY_SOCKET``
is a filesystem path, or an abstract socket name written with a leading ``@``.
When the variable is unset (not started by systemd) every call is a no-op.

Watchdog contract: the caller sends ``WATCHDOG=1`` only after it has checked
that the fast loop is healthy, at least twice per ``WATCHDOG_USEC``. The
daemon does this from its loop health check, never from a timer of its own,
so a stalled loop stops the pings and systemd restarts the service.
"""

from __future__ import annotations

import os
import socket

import structlog

log = structlog.get_logger(__name__)


class Notifier:
    """Send readiness, status, watchdog and stopping messages to systemd.

    A send that fails (the socket vanished, the manager is gone) is logged
    once and then counted. When sending works again, one
    ``notify_recovered`` line follows. Sending never raises, because losing
    the supervisor must not stop the control of the plant, and systemd's own
    watchdog kills a service that stops pinging.
    """

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.address = _socket_address(env.get("NOTIFY_SOCKET", ""))
        self.watchdog_usec = _watchdog_usec(env)
        self.failed_sends = 0
        self._sock: socket.socket | None = None
        self._failing = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """Half the watchdog timeout in seconds, the longest safe gap between pings."""
        if self.watchdog_usec is None:
            return None
        return self.watchdog_usec / 2e6

    def send(self, message: str) -> bool:
        """Send one raw message such as ``"READY=1\\nSTATUS=running"``; True when sent."""
        if self.address is None:
            return False
        if self._sock is None:
            # Non-blocking: when the reader falls behind and its queue is full,
            # a send fails with EAGAIN and is counted; it never stalls the daemon.
            self._sock = socket.socket(
                socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
            )
        try:
            self._sock.sendto(message.encode("utf-8"), self.address)
        except OSError as err:
            self.failed_sends += 1
            if not self._failing:
                self._failing = True
                # No traceback: the OS error text is the whole diagnosis.
                log.error(  # noqa: TRY400
                    "notify_failed",
                    socket=os.fsdecode(self.address),
                    error=str(err),
                    hint="systemd's NOTIFY_SOCKET is not reachable; the watchdog will "
                    "restart the service if this persists",
                )
            return False
        if self._failing:
            self._failing = False
            log.info("notify_recovered", failed_sends=self.failed_sends)
        return True

    def ready(self, status: str) -> bool:
        return self.send(f"READY=1\nSTATUS={_one_line(status)}\nMAINPID={os.getpid()}")

    def status(self, status: str) -> bool:
        return self.send(f"STATUS={_one_line(status)}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def reloading(self) -> bool:
        return self.send("RELOADING=1")

    def stopping(self, status: str = "stopping") -> bool:
        return self.send(f"STOPPING=1\nSTATUS={_one_line(status)}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _socket_address(value: str) -> str | bytes | None:
    if not value:
        return None
    if value.startswith("@"):
        # Abstract namespace: the kernel name starts with a NUL byte.
        return b"\0" + value[1:].encode("utf-8")
    if not value.startswith("/"):
        # sd_notify(3) accepts absolute paths and '@' names only; a vsock
        # address ("vsock:...") is for virtual machines, which bessgw does not target.
        log.warning("notify_socket_unsupported", notify_socket=value)
        return None
    return value


def _watchdog_usec(env: dict[str, str]) -> int | None:
    raw = env.get("WATCHDOG_USEC", "")
    if not raw:
        return None
    pid = env.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        # The watchdog belongs to another process (a parent that exec'd us
        # without clearing the variable).
        return None
    try:
        usec = int(raw)
    except ValueError:
        log.warning("watchdog_usec_invalid", watchdog_usec=raw)
        return None
    return usec if usec > 0 else None


def _one_line(text: str) -> str:
    return " ".join(text.split())

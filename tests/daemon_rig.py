"""A small plant on this machine for daemon tests: simulated meter, PCS and BMS, and the daemon.

* grid meter and PCS: ``RegisterServer`` instances (meter-3ph, pcs-sunspec)
  on 127.0.0.1 with ports the OS picks;
* plant physics, every 20 ms: the PCS's measured power ``W`` follows
  ``WSet`` while it is connected (``Conn`` = 1) and its setpoint enabled,
  and the grid meter shows ``load - battery``;
* BMS: Pylontech frame sets as slcan lines on a pseudo-terminal, every
  200 ms, which the daemon opens with ``interface = "slcan"``;
* the daemon: ``python -m gateway run`` as a child process with a
  ``NOTIFY_SOCKET`` that the rig reads.

Every server listens on 127.0.0.1 only; :meth:`DaemonRig.close` stops them
and kills a daemon that is still running.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import threading
import time
import tty
from pathlib import Path

from can_support import set_frames, slcan_line

from drivers.modbus.profile import load_profile
from drivers.modbus.server import RegisterServer

LOAD_KW = 800.0
#: Discharge window of the simulated BMS: 1000 A at 48.66 V.
BMS_WINDOW_KW = 48.66


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class SlcanBms:
    """Write Pylontech frame sets to a pty master in a thread; the daemon opens the slave."""

    def __init__(self, period_s: float = 0.2) -> None:
        self.master, slave = os.openpty()
        tty.setraw(slave)
        self.path = os.ttyname(slave)
        self._slave = slave
        self.period_s = period_s
        self.silent = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="slcan-bms", daemon=True)
        os.set_blocking(self.master, False)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        # 1000 A charge and discharge limits at 48.66 V: a 48.7 kW window.
        frame_set = set_frames(limits_hex="140210271027CC01")
        frames = b"".join(slcan_line(fid, data, ext) for fid, ext, data in frame_set)
        while not self._stop.wait(self.period_s):
            with contextlib.suppress(BlockingIOError, OSError):
                os.read(self.master, 4096)  # the adapter commands the daemon sends
            if not self.silent.is_set():
                with contextlib.suppress(BlockingIOError, OSError):
                    os.write(self.master, frames)

    def close(self) -> None:
        """Stop sending and close both ends of the pty; a second call does nothing."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        os.close(self.master)
        os.close(self._slave)


class DaemonRig:
    """Simulators, configuration and the daemon process of one test."""

    def __init__(
        self,
        tmp_path: Path,
        *,
        sigterm_ramp_s: float = 1.0,
        metrics: bool = False,
        with_bms: bool = True,
    ) -> None:
        self.tmp = tmp_path
        self.grid = RegisterServer(load_profile("meter-3ph"))
        self.pcs = RegisterServer(load_profile("pcs-sunspec"))
        #: Without a BMS the PCS has no battery data, so its interlock keeps it at 0 kW.
        self.with_bms = with_bms
        self.bms = SlcanBms()
        self.sigterm_ramp_s = sigterm_ramp_s
        self.metrics_port = free_port() if metrics else 0
        self.api_socket = tmp_path / "run" / "api.sock"
        self.state_dir = tmp_path / "state"
        self.config_path = tmp_path / "bessgw.toml"
        self.notify_path = tmp_path / "notify.sock"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(self.notify_path))
        self.notify.setblocking(False)
        self.notify_log: list[tuple[float, str]] = []
        self._notify_cursor = 0
        self.proc: asyncio.subprocess.Process | None = None
        self.log_path = tmp_path / "daemon.log"
        #: Every WSet value the PCS received, with its monotonic time, in kW.
        self.setpoints: list[tuple[float, float]] = []
        self._physics: asyncio.Task[None] | None = None
        self._started_mono_s = 0.0

    async def start_plant(self) -> None:
        self.grid_port = await self.grid.start_tcp("127.0.0.1", 0)
        self.pcs_port = await self.pcs.start_tcp("127.0.0.1", 0)
        self.grid.set_point("p_kw", LOAD_KW)
        self.bms.start()
        self._physics = asyncio.create_task(self._run_physics())

    async def _run_physics(self) -> None:
        last = None
        while True:
            setpoint_w = self.pcs.get_point("WSet") or 0.0
            following = self.pcs.get_point("Conn") == 1 and self.pcs.get_point("WSet_Ena") == 1
            battery_w = float(setpoint_w) if following else 0.0
            self.pcs.set_point("W", battery_w)
            self.grid.set_point("p_kw", LOAD_KW - battery_w / 1000)
            if setpoint_w != last:
                self.setpoints.append((time.monotonic(), float(setpoint_w) / 1000))
                last = setpoint_w
            await asyncio.sleep(0.02)

    def write_config(self, extra: str = "", **overrides: str) -> None:
        """Write the site configuration; ``overrides`` replace whole ``key = value`` lines.

        ``extra`` is appended as is, for tables the rig does not write (``[planner]``).
        """
        lines = {
            "grid_cap_kw": "grid_cap_kw = 600.0",
            "ramp_limit_kw_per_s": "ramp_limit_kw_per_s = 1000.0",
            "smoothing_tau_s": "smoothing_tau_s = 0.5",
        }
        lines.update(overrides)
        bms_section = (
            f"""bms = "bms-1"

[[devices]]
name = "bms-1"
role = "bms"
profile = "bms-pylontech"
transport = {{ kind = "can", interface = "slcan", channel = "{self.bms.path}" }}
max_current_a = 1500.0
"""
            if self.with_bms
            else ""
        )
        self.config_path.write_text(
            f"""
[site]
name = "rig"
grid_connection_kw = 2000.0

[[devices]]
name = "grid"
role = "grid_meter"
profile = "meter-3ph"
transport = {{ kind = "tcp", host = "127.0.0.1", port = {self.grid_port} }}
poll_period_ms = 50
timeout_ms = 500
# Generous for a shared 2-core machine: a late poll must not latch a fault.
stale_ms = 1000

[[devices]]
name = "pcs-1"
role = "pcs"
profile = "pcs-sunspec"
transport = {{ kind = "tcp", host = "127.0.0.1", port = {self.pcs_port} }}
poll_period_ms = 50
timeout_ms = 500
# Generous for a shared 2-core machine: a late poll must not latch a fault.
stale_ms = 1000
rated_kw = 500.0
{bms_section}

[control]
rate_hz = 1000
{lines["grid_cap_kw"]}
{lines["ramp_limit_kw_per_s"]}
{lines["smoothing_tau_s"]}
rt_priority = 0
lock_memory = false

[safety]
meter_stale_ms = 1000
bms_stale_ms = 3000
pcs_revert_s = 2.0

[service]
state_dir = "{self.state_dir}"
api_socket = "{self.api_socket}"
metrics_port = {self.metrics_port}
sigterm_ramp_s = {self.sigterm_ramp_s}
{extra}"""
        )

    async def start_daemon(self, *extra_env: tuple[str, str]) -> None:
        env = dict(os.environ)
        for key in ("INVOCATION_ID", "JOURNAL_STREAM", "WATCHDOG_PID"):
            env.pop(key, None)
        env["NOTIFY_SOCKET"] = str(self.notify_path)
        env["WATCHDOG_USEC"] = "2000000"
        env.update(extra_env)
        self._started_mono_s = time.monotonic()
        self._log_file = self.log_path.open("wb")
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway",
            "run",
            "--config",
            str(self.config_path),
            "--log-format",
            "json",
            "--log-level",
            "info",
            stdout=self._log_file,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
        )

    def read_notify(self) -> list[tuple[float, str]]:
        """Collect the notify messages that arrived, as (seconds since start, message)."""
        while True:
            try:
                data = self.notify.recv(4096)
            except BlockingIOError:
                return self.notify_log
            self.notify_log.append((time.monotonic() - self._started_mono_s, data.decode()))

    async def wait_notify(self, text: str, timeout_s: float) -> float:
        """Wait for a notify message containing ``text``; return its time since start.

        Messages are consumed in order: the search starts after the message
        that the previous call matched, so waiting for ``STATUS=running``
        after a fault does not return the ``running`` from before it.
        """
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            log = self.read_notify()
            for index in range(self._notify_cursor, len(log)):
                t, message = log[index]
                if text in message:
                    self._notify_cursor = index + 1
                    return t
            if self.proc is not None and self.proc.returncode is not None:
                break
            await asyncio.sleep(0.02)
        raise AssertionError(
            f"no notify message with {text!r} within {timeout_s} s; got "
            f"{[m for _, m in self.notify_log]}; daemon log:\n{self.log_tail()}"
        )

    def log_events(self) -> list[dict]:
        events = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                events.append(json.loads(line))
        return events

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    async def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    async def wait_exit(self, timeout_s: float) -> int:
        assert self.proc is not None
        return await asyncio.wait_for(self.proc.wait(), timeout_s)

    async def close(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)
            await self.proc.wait()
        if self._physics is not None:
            self._physics.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._physics
        await self.grid.stop()
        await self.pcs.stop()
        self.bms.close()
        self.notify.close()
        if hasattr(self, "_log_file"):
            self._log_file.close()

"""Checks between `bessgw pcs set` and the PCS: the daemon, the BMS and the SoC.

A step test commands a real PCS, so it applies the limits that the
daemon's fast loop enforces:

- no second master: when the daemon accepts connections on its API
  socket, the test is rejected, because both would write setpoints to
  the same PCS;
- the battery's BMS (the one the daemon pairs with this PCS) must be online
  before the first write, and the requested power must fit its charge or
  discharge limit and the configured hard SoC band;
- during the test the BMS is checked every cycle. A limit that falls below
  the target clamps it at once. A BMS that goes silent or leaves the SoC
  band ends the test with a ramp to 0 kW.

``--without-bms`` skips the BMS checks, for commissioning a PCS before its
battery's CAN link works; the test then says so on every run.
"""

from __future__ import annotations

import math
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from drivers.can.bms import BmsSnapshot, BmsString, BmsStringConfig
from drivers.can.reader import CanLink, CanOpenError, CanReader
from gateway.cli import EXIT_IO, EXIT_USAGE, CliError
from gateway.config import Device, SiteConfig
from gateway.plant_io import pair_bms


def daemon_seen(config: SiteConfig, config_path: str) -> str:
    """Return why the daemon may be running, or "" when its API socket is gone or refuses.

    Only a refused connection or a missing file mean no daemon. Permission
    denied (a user outside group bessgw) or a timeout might hide a running
    daemon, so they count as one.
    """
    path = Path(config.service.api_socket)
    if not path.exists():
        return ""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return ""  # a socket file left behind by a stopped daemon
        except OSError as err:
            return (
                f"connecting to {path} (service.api_socket in {config_path}) failed: {err}, "
                "so the daemon may be running"
            )
    return f"it accepts connections on {path}, service.api_socket in {config_path}"


def reject_if_daemon_running(config: SiteConfig, config_path: str) -> None:
    """Raise CliError when the daemon may be running: it commands the PCS itself."""
    seen = daemon_seen(config, config_path)
    if seen:
        raise CliError(
            f"the bessgw daemon may be running ({seen}) and would command the PCS at the "
            "same time; stop it first (`systemctl stop bessgw`), and run the test as root or "
            "as a member of group bessgw so that the check can see the daemon",
            EXIT_USAGE,
        )


@dataclass(frozen=True)
class Verdict:
    """Allowed power for a target now: the clamped target, or a reason to stop."""

    allowed_kw: float
    stop_reason: str = ""


class BmsGuard:
    """BMS check for one PCS: its BMS read over CAN, each target judged against it and the SoC."""

    def __init__(self, config: SiteConfig, pcs: Device, config_path: str) -> None:
        name = pair_bms(config).get(pcs.name)
        if name is None:
            raise CliError(
                f"no BMS is paired with {pcs.name!r} in {config_path}: set bms = NAME on the "
                "PCS (or list one BMS per PCS in the same order), so that the step test can "
                "check the battery's limits; to test the PCS alone, add --without-bms",
                EXIT_USAGE,
            )
        device = next(d for d in config.devices if d.name == name)
        try:
            string_config = BmsStringConfig.from_site(device, config.safety)
        except ValueError as err:
            raise CliError(f"{config_path}: {err}", EXIT_USAGE) from err
        self.name = name
        self.control = config.control
        self.string = BmsString(string_config)
        self.link = CanLink.from_transport(device.transport)
        self.reader = CanReader(self.link, self.string.on_message)

    def __enter__(self) -> BmsGuard:
        try:
            self.reader.open()
        except CanOpenError as err:
            raise CliError(f"BMS {self.name!r}: {err}", EXIT_IO) from err
        self.reader.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.reader.stop()

    def snapshot(self) -> BmsSnapshot:
        return self.string.snapshot(time.monotonic())

    def wait_online(self, timeout_s: float) -> BmsSnapshot:
        """Wait until the BMS allows power; raise CliError naming its state after ``timeout_s``."""
        deadline_s = time.monotonic() + timeout_s
        while True:
            snapshot = self.snapshot()
            if snapshot.power_allowed:
                return snapshot
            if time.monotonic() >= deadline_s:
                raise CliError(
                    f"BMS {self.name!r} on {self.link.describe()} is {snapshot.state.value} "
                    f"after {timeout_s:g} s ({snapshot.reason or 'no reason given'}; "
                    f"{snapshot.frames_received} frames received): the PCS was not commanded. "
                    "Check the CAN wiring, bit rate and termination with `bessgw can dump`, "
                    "or give it longer with --bms-wait",
                    EXIT_IO,
                )
            time.sleep(0.05)

    def judge(self, target_kw: float, snapshot: BmsSnapshot | None = None) -> Verdict:
        """Return the largest part of ``target_kw`` (+ discharge) that the BMS and SoC allow."""
        snapshot = snapshot or self.snapshot()
        if not snapshot.power_allowed:
            return Verdict(0.0, f"BMS {self.name!r} is {snapshot.state.value}: {snapshot.reason}")
        soc = snapshot.readings.get("soc_pct")
        if soc is None or not soc.good or not math.isfinite(soc.value):
            return Verdict(0.0, f"BMS {self.name!r} sends no valid SoC")
        if target_kw > 0 and soc.value <= self.control.soc_hard_min_pct:
            return Verdict(
                0.0,
                f"SoC {soc.value:g} % is at or below control.soc_hard_min_pct = "
                f"{self.control.soc_hard_min_pct:g} %: no discharge",
            )
        if target_kw < 0 and soc.value >= self.control.soc_hard_max_pct:
            return Verdict(
                0.0,
                f"SoC {soc.value:g} % is at or above control.soc_hard_max_pct = "
                f"{self.control.soc_hard_max_pct:g} %: no charge",
            )
        charge_kw, discharge_kw = snapshot.power_window_kw()
        return Verdict(max(-charge_kw, min(discharge_kw, target_kw)))

    def check_request(self, p_kw: float, snapshot: BmsSnapshot) -> None:
        """Raise CliError for a requested power that the BMS does not allow now."""
        verdict = self.judge(p_kw, snapshot)
        if verdict.stop_reason:
            raise CliError(f"not commanding the PCS: {verdict.stop_reason}", EXIT_USAGE)
        if abs(verdict.allowed_kw - p_kw) > 1e-9:
            charge_kw, discharge_kw = snapshot.power_window_kw()
            direction = "discharge" if p_kw > 0 else "charge"
            raise CliError(
                f"--kw {p_kw:g} is more than BMS {self.name!r} allows now: {direction} up to "
                f"{discharge_kw if p_kw > 0 else charge_kw:.1f} kW (its current limit times "
                f"the pack voltage); choose |--kw| <= {abs(verdict.allowed_kw):.1f}",
                EXIT_USAGE,
            )

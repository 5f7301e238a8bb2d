"""``bessgw pcs status`` and ``bessgw pcs set``: read a PCS, and run a commissioning step test.

``pcs set NAME --kw P --for SECONDS --yes`` programs the PCS's reversion
timer, enables it, ramps the setpoint from 0 to P kW, holds P for SECONDS,
ramps back to 0 and disables the PCS. Each second it prints the setpoint
and the measured power that the PCS reports. Powers follow the gateway's
sign: positive discharges the battery, negative charges it.

The ramp rate defaults to ``control.ramp_limit_kw_per_s`` and may not exceed
``control.unit_slew_kw_per_s``. Ctrl-C (SIGINT) or SIGTERM ends the test
early: the setpoint ramps to 0 at the faster of the test's rate and
``safety.safe_ramp_kw_per_s`` (at most the unit slew), then the PCS is
disabled. A second Ctrl-C commands 0 kW at once. If the gateway itself dies,
the reversion timer brings the PCS to 0 kW.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from drivers.modbus.errors import ModbusError
from drivers.modbus.link import ModbusLink
from drivers.pcs import (
    PcsConfigError,
    PcsDriver,
    PcsError,
    PcsFaultError,
    PcsStartError,
    PcsStatus,
)
from gateway.cli import EXIT_IO, EXIT_OK, EXIT_USAGE, CliError
from gateway.cli.device_cmd import find_device
from gateway.cli.pcs_guard import BmsGuard, daemon_seen, reject_if_daemon_running
from gateway.config import DEFAULT_CONFIG_PATH, Device, SiteConfig, load_config
from gateway.logs import configure_logging

EXIT_INTERRUPTED = 130
#: Seconds between two printed lines of the step test.
PRINT_PERIOD_S = 1.0


def register(subparsers: argparse._SubParsersAction) -> None:
    pcs = subparsers.add_parser("pcs", help="read a PCS or run a commissioning step test")
    actions = pcs.add_subparsers(dest="action", metavar="ACTION", required=True)

    status = actions.add_parser(
        "status",
        help="read PCS NAME once: power, setpoint, enable, state, events, reversion timer",
    )
    _add_common(status)
    status.set_defaults(func=run_status)

    step = actions.add_parser(
        "set",
        help="step test: ramp PCS NAME to --kw, hold for --for seconds, ramp back to 0",
    )
    _add_common(step)
    step.add_argument(
        "--kw",
        type=float,
        required=True,
        metavar="P",
        help="active power to hold, kW; positive discharges, negative charges",
    )
    step.add_argument(
        "--for",
        dest="hold_s",
        type=float,
        required=True,
        metavar="SECONDS",
        help="how long to hold P, in seconds",
    )
    step.add_argument(
        "--ramp-kw-per-s",
        type=float,
        metavar="R",
        help="ramp rate to and from P, kW/s (default: control.ramp_limit_kw_per_s)",
    )
    step.add_argument(
        "--bms-wait",
        type=float,
        default=10.0,
        metavar="S",
        help="how long to wait for the PCS's BMS to come online before the test, s (default 10)",
    )
    step.add_argument(
        "--without-bms",
        action="store_true",
        help="skip the BMS checks (limits, SoC, silence), to test a PCS whose battery's CAN "
        "link does not work yet; the PCS's own protection is then all there is",
    )
    step.add_argument(
        "--yes", action="store_true", help="confirm that the PCS may really be commanded"
    )
    step.set_defaults(func=run_set)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME", help="PCS device name from the site configuration")
    parser.add_argument(
        "--config",
        default=str(DEFAULT_CONFIG_PATH),
        metavar="FILE",
        help=f"site configuration (default {DEFAULT_CONFIG_PATH})",
    )


def load_pcs(config_path: str, name: str) -> tuple[SiteConfig, Device]:
    """Return the site configuration and its PCS device ``name``; CliError otherwise."""
    device, _ = find_device(config_path, name)
    if device.role != "pcs":
        raise CliError(
            f"device {name!r} in {config_path} has role {device.role!r}, not 'pcs'; "
            "give the name of a PCS",
            EXIT_USAGE,
        )
    return load_config(config_path), device


@contextlib.asynccontextmanager
async def connected_driver(config: SiteConfig, device: Device):
    """Yield a PcsDriver on a connected link; close the link on exit."""
    timeout_s = device.timeout_ms / 1000
    link = ModbusLink.from_transport(device.transport, timeout_s=timeout_s, one_shot=True)
    try:
        driver = PcsDriver.from_config(device, config, link)
    except (PcsConfigError, ValueError) as err:
        raise CliError(f"PCS {device.name!r}: {err}", EXIT_USAGE) from err
    await link.start()
    try:
        wait_s = max(3.0, timeout_s)
        try:
            await link.wait_connected(wait_s)
        except ModbusError as err:
            keys = "host, port" if device.transport.kind == "tcp" else "device, baud, parity"
            raise CliError(
                f"{driver.where}: cannot connect within {wait_s:g} s ({link.down_reason}). "
                f"Check that the PCS is powered and reachable, and its {keys} and unit_id "
                "in the configuration",
                EXIT_IO,
            ) from err
        yield driver
    finally:
        await link.close()


# ----------------------------------------------------------------------------- status


def run_status(args: argparse.Namespace) -> int:
    configure_logging("warning", "console", stream=sys.stderr)
    config, device = load_pcs(args.config, args.name)

    async def session() -> PcsStatus:
        async with connected_driver(config, device) as driver:
            return await driver.read_status()

    status = asyncio.run(session())
    print(format_status(status, device.profile))
    if status.device_state != "online":
        raise CliError(
            f"PCS {status.name!r} ({status.link} unit {status.unit_id}) is "
            f"{status.device_state.replace('_', ' ')}; check its power, unit id and wiring",
            EXIT_IO,
        )
    return EXIT_OK


def format_status(status: PcsStatus, profile_name: str) -> str:
    """Render a status as aligned ``label  value`` lines."""
    enabled = {True: "yes", False: "no", None: "unknown"}[status.enabled]
    if status.revert_timer_s is None:
        timer = "none or unreadable"
    elif status.revert_timer_s == 0:
        timer = "0 s (off: the PCS does not fall back to 0 kW by itself)"
    else:
        timer = f"{status.revert_timer_s:g} s"
    state = status.state_name
    if status.state_code is not None:
        state += f" ({status.state_code})" + (", a fault state" if status.state_fault else "")
    rows = [
        ("active power", _kw(status.p_kw)),
        ("setpoint", _kw(status.setpoint_kw)),
        ("enabled", enabled),
        ("state", state),
        ("events", ", ".join(status.events) or "none"),
        ("revert timer", timer),
        ("heartbeat", "-" if status.heartbeat is None else str(status.heartbeat)),
    ]
    if status.fault is not None:
        rows.append(("gateway fault", f"{status.fault.target}: {status.fault.detail}"))
    lines = [
        f"{status.name} ({profile_name}, {status.link} unit {status.unit_id}): "
        f"{status.device_state.replace('_', ' ')}"
    ]
    lines += [f"  {label:<14} {value}" for label, value in rows]
    return "\n".join(lines)


def _kw(reading) -> str:
    if reading.good:
        return f"{_tenths(reading.value)} kW"
    return f"- ({reading.quality.name})"


def _tenths(value_kw: float) -> str:
    """Format a power to 0.1 kW, with a value that rounds to zero shown as 0.0, never -0.0."""
    return f"{round(value_kw, 1) + 0.0:.1f}"


# ----------------------------------------------------------------------------- step test


@dataclass(frozen=True)
class StepPlan:
    """A checked step test: powers in kW, rates in kW/s, times in seconds."""

    p_kw: float
    hold_s: float
    ramp_kw_per_s: float
    #: Ramp back to 0 after an interrupt.
    abort_ramp_kw_per_s: float


def plan_step(args: argparse.Namespace, config: SiteConfig, device: Device) -> StepPlan:
    """Check the requested test against the PCS rating and the configuration."""
    rated_kw = device.rated_kw or 0.0
    if not math.isfinite(args.kw) or abs(args.kw) > rated_kw:
        raise CliError(
            f"--kw {args.kw:g} is outside the rating of {device.name!r}: rated_kw = "
            f"{rated_kw:g} in {args.config} allows -{rated_kw:g} to {rated_kw:g} kW",
            EXIT_USAGE,
        )
    if not (math.isfinite(args.hold_s) and args.hold_s > 0):
        raise CliError(
            f"--for {args.hold_s:g} is invalid: give the hold time in seconds > 0", EXIT_USAGE
        )
    slew = config.control.unit_slew_kw_per_s
    ramp = args.ramp_kw_per_s
    if ramp is None:
        ramp = min(config.control.ramp_limit_kw_per_s, slew)
    if not (math.isfinite(ramp) and 0 < ramp <= slew):
        raise CliError(
            f"--ramp-kw-per-s {ramp:g} is invalid: give a rate above 0 and at most "
            f"control.unit_slew_kw_per_s = {slew:g} kW/s",
            EXIT_USAGE,
        )
    abort_ramp = min(max(ramp, config.safety.safe_ramp_kw_per_s), slew)
    return StepPlan(args.kw, args.hold_s, ramp, abort_ramp)


class _Interrupts:
    """Counts SIGINT and SIGTERM while the step test runs, instead of raising."""

    def __init__(self) -> None:
        self.count = 0

    def signal(self) -> None:
        self.count += 1

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        signals = (signal.SIGINT, signal.SIGTERM)
        for number in signals:
            loop.add_signal_handler(number, self.signal)
        try:
            yield
        finally:
            for number in signals:
                loop.remove_signal_handler(number)


class StepTest:
    """The ramp, hold and ramp-back phases, with a printed line each second."""

    def __init__(
        self,
        driver: PcsDriver,
        plan: StepPlan,
        interrupts: _Interrupts,
        guard: BmsGuard | None = None,
        daemon_probe: Callable[[], str] | None = None,
    ) -> None:
        self.driver = driver
        self.plan = plan
        self.interrupts = interrupts
        self.guard = guard
        #: Returns why the daemon may be running, or "" (see ``pcs_guard.daemon_seen``).
        self.daemon_probe = daemon_probe
        #: Why the BMS check ended the test, or "" while it allows the target.
        self.stop_reason = ""
        #: Why another controller seems to command the PCS, or "". Once set, nothing is written.
        self.other_master = ""
        self._clamp_reported = False
        self.target_kw = 0.0
        self.cycle_s = driver.policy.settings.min_write_interval_s
        self.started_s = time.monotonic()
        self.next_print_s = self.started_s

    async def run(self) -> bool:
        """Run every phase; return False when an interrupt cut the test short."""
        print("  time_s  phase       target_kw  setpoint_kw  power_kw", flush=True)
        await self.ramp("ramp up", self.plan.p_kw, self.plan.ramp_kw_per_s)
        if not self.interrupted:
            await self.hold()
        if self.other_master:
            return False
        aborted = self.interrupted
        if aborted and not self.stop_reason:
            print("interrupted: ramping to 0 kW", flush=True)
        if aborted:
            await self.ramp("abort", 0.0, self.plan.abort_ramp_kw_per_s)
        else:
            await self.ramp("ramp down", 0.0, self.plan.ramp_kw_per_s)
        if self.other_master:
            return False  # it appeared during the ramp down: the PCS is left to it
        await self.print_line("end")
        return not self.interrupted

    @property
    def interrupted(self) -> bool:
        return self.interrupts.count > 0 or bool(self.stop_reason) or bool(self.other_master)

    def _ramp_over(self, to_zero: bool) -> bool:
        """Return whether a ramp must end now, before its end value."""
        if self.other_master:
            return True
        if to_zero:
            return self.interrupts.count >= 2
        return self.interrupts.count >= 1 or bool(self.stop_reason)

    async def ramp(self, phase: str, end_kw: float, rate_kw_per_s: float) -> None:
        """Move the setpoint to ``end_kw`` at ``rate_kw_per_s``.

        A ramp towards a non-zero power stops at the first interrupt. A ramp
        to 0 continues through the first interrupt and jumps to 0 at the second.
        """
        to_zero = end_kw == 0.0
        last_s = time.monotonic()
        while True:
            if self._ramp_over(to_zero):
                if to_zero and not self.other_master:
                    await self._command_zero_now()
                return
            now_s = time.monotonic()
            max_step_kw = rate_kw_per_s * (now_s - last_s)
            last_s = now_s
            self.target_kw += max(-max_step_kw, min(max_step_kw, end_kw - self.target_kw))
            await self.cycle(phase)
            if self.target_kw == end_kw and self._verified(end_kw):
                return

    async def hold(self) -> None:
        end_s = time.monotonic() + self.plan.hold_s
        while time.monotonic() < end_s and not self.interrupted:
            await self.cycle("hold")

    async def cycle(self, phase: str) -> None:
        started_s = time.monotonic()
        if self._apply_bms_check() or self.other_master:
            return  # the caller ramps to 0 from here, or stops writing
        await self.driver.step(self.target_kw)
        self._check_fault()
        if started_s >= self.next_print_s:
            self.next_print_s += PRINT_PERIOD_S
            await self.print_line(phase)
        await asyncio.sleep(max(0.0, self.cycle_s - (time.monotonic() - started_s)))

    async def print_line(self, phase: str) -> None:
        status = await self.driver.read_status()
        self._check_other_master(status)
        elapsed_s = time.monotonic() - self.started_s
        print(
            f"  {elapsed_s:6.1f}  {phase:<10}  {_tenths(self.target_kw):>9}  "
            f"{_number(status.setpoint_kw):>11}  {_number(status.p_kw):>8}",
            flush=True,
        )

    def _check_other_master(self, status: PcsStatus) -> None:
        """Stop writing when the daemon started or the setpoint differs from the last write."""
        if self.other_master:
            return
        seen = self.daemon_probe() if self.daemon_probe is not None else ""
        written_kw = self.driver.policy.verified("p")
        tolerance_kw = self.driver.policy.settings.readback_tolerance_kw
        if seen:
            self.other_master = f"the bessgw daemon started during the test ({seen})"
        elif (
            status.setpoint_kw.good
            and written_kw is not None
            and abs(status.setpoint_kw.value - written_kw) > tolerance_kw
        ):
            self.other_master = (
                f"the PCS's setpoint reads {_tenths(status.setpoint_kw.value)} kW, not the "
                f"{_tenths(written_kw)} kW this test wrote last, so another controller writes it"
            )
        if self.other_master:
            print(f"stopped: {self.other_master}; this test writes nothing more", flush=True)

    def _apply_bms_check(self) -> bool:
        """Clamp the target to the BMS's limit now; return True when a stop reason appears."""
        if self.guard is None:
            return False
        verdict = self.guard.judge(self.target_kw)
        if verdict.stop_reason:
            if self.stop_reason:
                return False  # already ramping to 0 kW
            self.stop_reason = verdict.stop_reason
            print(f"BMS check: {verdict.stop_reason}; ramping to 0 kW", flush=True)
            return True
        if abs(verdict.allowed_kw) < abs(self.target_kw):
            if not self._clamp_reported:
                self._clamp_reported = True
                print(
                    f"BMS check: {self.guard.name} allows {_tenths(verdict.allowed_kw)} kW now; "
                    f"target clamped from {_tenths(self.target_kw)} kW",
                    flush=True,
                )
            self.target_kw = verdict.allowed_kw
        return False

    def _verified(self, end_kw: float) -> bool:
        verified = self.driver.policy.verified("p")
        deadband_kw = self.driver.policy.settings.deadband_kw
        if end_kw == 0.0:
            return verified == 0.0
        return verified is not None and abs(verified - end_kw) <= deadband_kw

    async def _command_zero_now(self) -> None:
        """Write 0 kW at once, as often as the write rate allows, until it reads back."""
        print("second interrupt: commanding 0 kW now", flush=True)
        self.target_kw = 0.0
        for _ in range(self.driver.policy.settings.write_budget + 1):
            await self.driver.step(0.0)
            self._check_fault()
            if self._verified(0.0):
                return
            await asyncio.sleep(self.cycle_s)

    def _check_fault(self) -> None:
        fault = self.driver.fault
        if fault is not None:
            raise CliError(
                f"{self.driver.where}: fault latched during the step test ({fault.target}: "
                f"{fault.detail}). The PCS was commanded to 0 kW and disabled as far as the "
                "link allows. Check the PCS's own fault log, its local/remote switch and the "
                "[pcs] points of its profile",
                EXIT_IO,
            )


def _number(reading) -> str:
    return _tenths(reading.value) if reading.good else "-"


def run_set(args: argparse.Namespace) -> int:
    configure_logging("info", "console", stream=sys.stderr)
    config, device = load_pcs(args.config, args.name)
    plan = plan_step(args, config, device)
    if not args.yes:
        raise CliError(
            f"not commanding {device.name!r} without --yes. The test would ramp it to "
            f"{plan.p_kw:g} kW at {plan.ramp_kw_per_s:g} kW/s, hold for {plan.hold_s:g} s and "
            "ramp back to 0; add --yes to run it",
            EXIT_USAGE,
        )

    if not (math.isfinite(args.bms_wait) and args.bms_wait > 0):
        raise CliError(f"--bms-wait {args.bms_wait:g} is invalid: give seconds > 0", EXIT_USAGE)
    reject_if_daemon_running(config, args.config)
    if args.without_bms:
        print(
            f"warning: --without-bms: {device.name!r} is commanded without checking its "
            "battery's limits, SoC or silence",
            file=sys.stderr,
            flush=True,
        )
        return _run_step(config, device, plan, None, args.config)
    with BmsGuard(config, device, args.config) as guard:
        snapshot = guard.wait_online(args.bms_wait)
        guard.check_request(plan.p_kw, snapshot)
        charge_kw, discharge_kw = snapshot.power_window_kw()
        print(
            f"BMS {guard.name}: online, SoC {snapshot.readings['soc_pct'].value:g} %, "
            f"charge up to {charge_kw:.1f} kW, discharge up to {discharge_kw:.1f} kW",
            flush=True,
        )
        return _run_step(config, device, plan, guard, args.config)


def _run_step(
    config: SiteConfig, device: Device, plan: StepPlan, guard: BmsGuard | None, config_path: str
) -> int:
    """Run the step test on a connected driver; return the exit code."""
    test: StepTest | None = None

    async def session() -> bool:
        nonlocal test
        async with connected_driver(config, device) as driver:
            interrupts = _Interrupts()
            finished = False
            disabled = True
            with interrupts.installed():
                try:
                    await driver.start()
                    print(
                        f"{driver.where}: reversion timer {driver.programmed_revert_s} s, "
                        f"step to {plan.p_kw:g} kW for {plan.hold_s:g} s",
                        flush=True,
                    )
                    await driver.enable()
                    test = StepTest(
                        driver, plan, interrupts, guard, lambda: daemon_seen(config, config_path)
                    )
                    completed = await test.run()
                    finished = True
                except (PcsStartError, PcsFaultError) as err:
                    raise CliError(str(err), EXIT_IO) from err
                except PcsConfigError as err:
                    raise CliError(str(err), EXIT_USAGE) from err
                finally:
                    # After a fault the driver has already commanded 0 kW and disabled.
                    other_master = test is not None and test.other_master
                    if driver.started and driver.fault is None and not other_master:
                        disabled = await driver.disable()
                        if not disabled and not finished:
                            # An error is on its way out; add this warning to it.
                            print(f"warning: {_unverified(driver)}", file=sys.stderr)
            if test is not None and test.other_master:
                raise CliError(
                    f"step test stopped: {test.other_master}. It left the PCS to that controller "
                    "and did not disable it; find what else commands the PCS (`systemctl status "
                    "bessgw`, the plant controller) before the next test",
                    EXIT_IO,
                )
            if not disabled:
                raise CliError(_unverified(driver), EXIT_IO)
            print("done: 0 kW, PCS disabled" if completed else "stopped: 0 kW, PCS disabled")
            return completed

    try:
        completed = asyncio.run(session())
    except PcsError as err:
        raise CliError(str(err), EXIT_IO) from err
    if test is not None and test.stop_reason:
        raise CliError(
            f"step test stopped by the BMS check: {test.stop_reason}. The PCS is at 0 kW and "
            "disabled; check the BMS with `bessgw can dump` before the next test",
            EXIT_IO,
        )
    return EXIT_OK if completed else EXIT_INTERRUPTED


def _unverified(driver: PcsDriver) -> str:
    return (
        f"{driver.where}: 0 kW and disable were written but not both verified by read-back; "
        "check the PCS locally before leaving it"
    )

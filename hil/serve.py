"""One simulated device on its own (``bessgw hil serve``), for mbpoll or a real controller.

* ``pcs``: one PCS unit of the scenario (its rating, time constant, dead
  time, reversion timer) on a battery of the scenario's size, with no site
  load: whatever the client commands is what the unit does.
* ``meter``: the scenario's site replayed in real time and looped: with a
  ``meter-3ph`` profile the grid connection without a battery
  (load - wind), with ``pdu-rack`` the first rack. The values are what a
  meter with the scenario's window and update period would show.
* ``bms``: one battery string's BMS, the scenario's battery at rest, as
  slcan on ``socket://127.0.0.1:PORT``.

Every server listens on 127.0.0.1 only and runs until ``stop`` is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from drivers.modbus.profile import load_profile
from hil import plant as plant_model
from hil.devices import BmsDevice, MeterDevice, PcsUnit
from hil.gateway_config import write_bms_profile
from hil.scenario import Scenario
from hil.sil import battery_params, pcs_params
from hil.site import build_traces

KINDS = ("pcs", "meter", "bms")
DEFAULT_PROFILES = {"pcs": "pcs-sunspec", "meter": "meter-3ph"}
#: The plant steps at 1 ms, caught up every 5 ms, as in the HIL rig.
STEP_S = 0.001
CHUNK_S = 0.005
#: Meter replay resolution; finer than any meter window the scenario schema allows in practice.
METER_STEP_S = 0.01


@dataclass(frozen=True)
class ServeOptions:
    """Options of one ``bessgw hil serve`` command."""

    kind: str
    scenario: Scenario
    #: Modbus profile name or path; None takes :data:`DEFAULT_PROFILES`.
    profile: str | None = None
    #: TCP port on 127.0.0.1; 0 picks a free one.
    port: int = 0
    unit_id: int = 1
    #: BMS only: where to write a BMS profile whose ranges fit the simulated pack; None
    #: writes it into a new temporary folder.
    profile_out: Path | None = None


Ready = Callable[[str], None]


async def serve_device(options: ServeOptions, ready: Ready, stop: asyncio.Event) -> None:
    """Serve one device until ``stop`` is set; call ``ready`` with a line saying where it is.

    Raises ValueError for an unknown kind or a profile that does not fit it.
    """
    if options.kind == "bms":
        if options.profile is not None:
            raise ValueError(
                "--profile does not apply to the BMS simulator, which sends the Pylontech "
                "frame set; leave it out"
            )
        await _serve_bms(options, ready, stop)
    elif options.kind in DEFAULT_PROFILES:
        profile = options.profile or DEFAULT_PROFILES[options.kind]
        serve = _serve_pcs if options.kind == "pcs" else _serve_meter
        await serve(options, profile, ready, stop)
    else:
        raise ValueError(f"device kind {options.kind!r} is invalid; use one of {', '.join(KINDS)}")


def _plant(scenario: Scenario) -> plant_model.Plant:
    return plant_model.Plant(pcs_params(scenario), battery_params(scenario), 1, STEP_S)


async def _run_plant(
    plant: plant_model.Plant, each_chunk: Callable[[], None], stop: asyncio.Event
) -> None:
    started = time.monotonic()
    done = 0
    while not stop.is_set():
        due = int((time.monotonic() - started) / STEP_S)
        for _ in range(due - done):
            plant.step(0.0, 0.0)
        done = due
        each_chunk()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), CHUNK_S)


async def _serve_pcs(
    options: ServeOptions, profile: str, ready: Ready, stop: asyncio.Event
) -> None:
    scenario, unit_id = options.scenario, options.unit_id
    plant = _plant(scenario)
    unit = PcsUnit(
        "pcs", plant, 0, load_profile(profile), unit_id=unit_id, revert_s=scenario.pcs.revert_s
    )
    bound = await unit.start(options.port)
    chunks = 0

    def publish() -> None:
        nonlocal chunks
        unit.check_heartbeat(plant.t_s)
        unit.publish(chunks % 20 == 0)
        chunks += 1

    publish()
    ready(
        f"PCS simulator (profile {profile}, unit {unit_id}, {scenario.pcs.rated_kw:g} kW) "
        f"on 127.0.0.1:{bound}"
    )
    try:
        await _run_plant(plant, publish, stop)
    finally:
        await unit.stop()


async def _serve_meter(
    options: ServeOptions, profile: str, ready: Ready, stop: asyncio.Event
) -> None:
    scenario, unit_id = options.scenario, options.unit_id
    loaded = load_profile(profile)
    device = MeterDevice("meter", loaded, unit_id)
    traces = build_traces(scenario, METER_STEP_S)
    if profile == "pdu-rack":
        series, what = traces.racks_kw[0], "rack 1"
    else:
        series, what = traces.load_kw - traces.wind_kw, "site load - wind"
    measured = plant_model.meter_batch(
        series, METER_STEP_S, scenario.meters.window_ms / 1000.0, scenario.meters.update_ms / 1000.0
    )
    measured[~np.isfinite(measured)] = series[0]
    bound = await device.start(options.port)
    device.publish(float(measured[0]), 0.0)
    ready(
        f"meter simulator (profile {profile}, unit {unit_id}, {what}, update "
        f"{scenario.meters.update_ms:g} ms) on 127.0.0.1:{bound}"
    )
    started = time.monotonic()
    try:
        while not stop.is_set():
            t_s = time.monotonic() - started
            index = int(t_s / METER_STEP_S) % measured.size
            device.publish(float(measured[index]), t_s)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), scenario.meters.update_ms / 1000.0 / 2)
    finally:
        await device.stop()


async def _serve_bms(options: ServeOptions, ready: Ready, stop: asyncio.Event) -> None:
    scenario = options.scenario
    plant = _plant(scenario)
    string = BmsDevice("bms", plant.battery, strings=scenario.pcs.units)
    url = await string.start_slcan(options.port)

    def send() -> None:
        if string.due(plant.t_s):
            string.send(plant.t_s)

    profile_out = options.profile_out
    if profile_out is None:
        profile_out = Path(tempfile.mkdtemp(prefix="bessgw-hil-")) / "bms-profile.toml"
    write_bms_profile(scenario, profile_out)
    ready(
        f"BMS simulator (Pylontech frames every {string.period_s:g} s, one of "
        f"{scenario.pcs.units} strings, {scenario.battery.cells_in_series} LFP cells) on {url}; "
        f"the built-in bms-pylontech profile fits 48 V packs, so give the gateway "
        f'profile = "{profile_out}", written for this pack'
    )
    try:
        await _run_plant(plant, send, stop)
    finally:
        await string.stop()

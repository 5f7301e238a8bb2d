"""Handlers of the local API methods, bound to a running :class:`gateway.daemon.Daemon`.

Every handler that changes something writes an event and returns only
after the store has committed it, so an action the operator saw
acknowledged is in the store even if the daemon is killed the next moment.
The event id is part of the result.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import structlog

from gateway import __version__
from gateway.forecast.hints import HintError, add_hint
from gateway.plan.events import EventError, parse_event
from gateway.service.api import (
    ApiParamsError,
    ApiRejectedError,
    DemandResponseParams,
    EventsParams,
    FaultsParams,
    JobHintParams,
    NoParams,
    OperatorParams,
    PlannerInputParams,
    SetCapParams,
    SetModeParams,
    StallParams,
)
from gateway.states import Mode, State

if TYPE_CHECKING:
    from gateway.daemon import Daemon

log = structlog.get_logger(__name__)


#: Environment variable that enables the test hooks of the API (``test_stall_loop``).
TEST_HOOKS_ENV = "BESSGW_TEST_HOOKS"


def handlers(daemon: Daemon, *, test_hooks: bool = False) -> dict[str, Any]:
    """Return the API method table for ``daemon``, with the test hooks when asked."""
    api = _Handlers(daemon)
    table = {
        "status": api.status,
        "measurements": api.measurements,
        "faults": api.faults,
        "events": api.events,
        "set_mode": api.set_mode,
        "set_cap": api.set_cap,
        "clear_cap": api.clear_cap,
        "reset_faults": api.reset_faults,
        "add_job_hint": api.add_job_hint,
        "add_dr_event": api.add_dr_event,
    }
    if test_hooks:
        log.warning("api_test_hooks_enabled", env=TEST_HOOKS_ENV)
        table["test_stall_loop"] = api.test_stall_loop
        table["test_planner_input"] = api.test_planner_input
    return table


class _Handlers:
    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon

    async def status(self, params: NoParams, peer_uid: int | None) -> dict[str, Any]:
        d = self.d
        health = d.loop.health()
        override = d.cap_override
        now = time.monotonic()
        active = await d._store_call(d.store.faults, active_only=True)
        return {
            "version": __version__,
            "site": d.config.site.name,
            "state": d.machine.state.value,
            "mode": d.mode.value,
            "manual_kw": d.manual_kw if d.mode is Mode.MANUAL else None,
            "ready": d._ready,
            "uptime_s": round(time.time() - d._started_utc, 1),
            "cap_kw": _finite(np.asarray(d.loop.params.cap_kw, float)),
            "soc_band_pct": [
                _finite(np.asarray(d.loop.params.soc_soft_min_pct, float)),
                _finite(np.asarray(d.loop.params.soc_soft_max_pct, float)),
            ],
            "headroom_kw": d.headroom_kw(),
            "planner": None if d.planner is None else d.planner.status(),
            "cap_override": None
            if override is None
            else {
                "cap_kw": override.cap_kw,
                "expires_utc": override.expires_utc,
                "remaining_s": round(override.expires_mono_s - now, 1),
                "operator": override.operator,
            },
            "loop": {
                "running": health.running,
                "healthy": d._loop_healthy,
                "ticks": health.ticks,
                "missed": health.missed,
                "max_late_us": round(health.max_late_ns / 1000, 1),
                "overflows": health.overflows,
            },
            "pcs": {
                name: {
                    "command_kw": round(float(d._last_setpoints[i]), 3),
                    "enabled": bool(d._last_enabled[i]),
                }
                for i, name in enumerate(d.pcs_names)
            },
            "devices": {
                name: d.measurements.health(name).as_dict(now) for name in d.measurements.devices
            },
            "faults_active": [f.as_dict() for f in active],
            "metrics_port": d.metrics_port,
        }

    async def measurements(self, params: NoParams, peer_uid: int | None) -> dict[str, Any]:
        d = self.d
        record = d.telemetry.last_record if d.telemetry is not None else None
        tick: dict[str, Any] | None = None
        if record is not None:
            tick = {
                "tick": int(record["tick"]),
                "grid_kw": _finite(record["grid_kw"]),
                "load_kw": _finite(record["load_kw"]),
                "target_kw": _finite(record["target_kw"]),
                "uncovered_kw": _finite(record["uncovered_kw"]),
                "units": {
                    name: {
                        "setpoint_kw": _finite(record["units"][i]["setpoint_kw"]),
                        "pcs_p_kw": _finite(record["units"][i]["pcs_p_kw"]),
                        "soc_pct": _finite(record["units"][i]["soc_pct"]),
                        "discharge_cap_kw": _finite(record["units"][i]["discharge_cap_kw"]),
                        "charge_cap_kw": _finite(record["units"][i]["charge_cap_kw"]),
                    }
                    for i, name in enumerate(d.pcs_names)
                },
            }
        return {"loop": tick, "devices": d.measurements.snapshot(time.monotonic())}

    async def faults(self, params: FaultsParams, peer_uid: int | None) -> dict[str, Any]:
        d = self.d
        rows = await d._store_call(
            d.store.faults, active_only=params.active_only, limit=params.limit
        )
        return {"faults": [f.as_dict() for f in rows]}

    async def events(self, params: EventsParams, peer_uid: int | None) -> dict[str, Any]:
        d = self.d
        rows = await d._store_call(d.store.events, after_id=params.after_id, limit=params.limit)
        return {"events": rows}

    async def set_mode(self, params: SetModeParams, peer_uid: int | None) -> dict[str, Any]:
        d = self.d
        self._refuse_when_stopping()
        mode = Mode(params.mode)
        if mode is Mode.MANUAL:
            if params.manual_kw is None:
                raise ApiParamsError("mode 'manual' needs manual_kw (total PCS power, +discharge)")
            total_kw = float(np.sum(np.asarray(d.loop.params.rated_kw, float)))
            if abs(params.manual_kw) > total_kw:
                raise ApiParamsError(
                    f"manual_kw {params.manual_kw:g} exceeds the PCS rating of {total_kw:g} kW"
                )
            d.manual_kw = params.manual_kw
        elif params.manual_kw is not None:
            raise ApiParamsError(f"manual_kw is only valid with mode 'manual', not {mode.value!r}")
        old = d.mode
        d.mode = mode
        if d.metrics is not None:
            d.metrics.mode.state(mode.value)
        detail = f" at {d.manual_kw:g} kW" if mode is Mode.MANUAL else ""
        log.info(
            "mode_changed",
            old=old.value,
            new=mode.value,
            operator=params.operator,
            peer_uid=peer_uid,
        )
        event_id = await self._event(
            "mode_changed",
            f"mode {old.value} -> {mode.value}{detail} by {params.operator}",
            {"old": old.value, "new": mode.value, "manual_kw": params.manual_kw},
            params.operator,
            peer_uid,
        )
        return {"mode": mode.value, "manual_kw": params.manual_kw, "event_id": event_id}

    async def set_cap(self, params: SetCapParams, peer_uid: int | None) -> dict[str, Any]:
        from gateway.daemon import CapOverride  # noqa: PLC0415 - avoids an import cycle

        d = self.d
        self._refuse_when_stopping()
        floor = float(np.asarray(d.base_params.floor_kw, float))
        if params.cap_kw <= floor:
            raise ApiParamsError(
                f"cap_kw {params.cap_kw:g} must be above the grid floor of {floor:g} kW"
            )
        d.cap_override = CapOverride(
            cap_kw=params.cap_kw,
            expires_mono_s=time.monotonic() + params.expires_in_s,
            expires_utc=time.time() + params.expires_in_s,
            operator=params.operator,
        )
        d._apply_params()
        log.info(
            "cap_override_set",
            cap_kw=params.cap_kw,
            expires_in_s=params.expires_in_s,
            operator=params.operator,
            peer_uid=peer_uid,
        )
        event_id = await self._event(
            "cap_override_set",
            f"cap {params.cap_kw:g} kW for {params.expires_in_s:g} s by {params.operator}",
            {"cap_kw": params.cap_kw, "expires_in_s": params.expires_in_s},
            params.operator,
            peer_uid,
        )
        return {
            "cap_kw": params.cap_kw,
            "expires_utc": d.cap_override.expires_utc,
            "event_id": event_id,
        }

    async def clear_cap(self, params: OperatorParams, peer_uid: int | None) -> dict[str, Any]:
        d = self.d
        had = d.cap_override
        d.cap_override = None
        d._apply_params()
        cap = _finite(np.asarray(d.base_params.cap_kw, float))
        if had is None:
            return {"cleared": False, "cap_kw": cap, "event_id": None}
        log.info("cap_override_cleared", operator=params.operator, peer_uid=peer_uid)
        event_id = await self._event(
            "cap_override_cleared",
            f"cap override {had.cap_kw:g} kW cleared by {params.operator}",
            {"cap_kw": had.cap_kw},
            params.operator,
            peer_uid,
        )
        return {"cleared": True, "cap_kw": cap, "event_id": event_id}

    async def reset_faults(self, params: OperatorParams, peer_uid: int | None) -> dict[str, Any]:
        """Request the operator reset; a latched fault whose cause is gone clears next tick."""
        d = self.d
        self._refuse_when_stopping()
        if d.telemetry is not None:
            d.telemetry.reset_operator = params.operator
        d.loop.reset_faults()
        d.plant.reset_faults()
        active = await d._store_call(d.store.faults, active_only=True)
        log.info(
            "fault_reset_requested", operator=params.operator, peer_uid=peer_uid, active=len(active)
        )
        event_id = await self._event(
            "fault_reset_requested",
            f"fault reset requested by {params.operator} ({len(active)} active)",
            {"active": [f.code for f in active]},
            params.operator,
            peer_uid,
        )
        return {
            "requested": True,
            "active_before": [f.as_dict() for f in active],
            "event_id": event_id,
        }

    async def add_job_hint(self, params: JobHintParams, peer_uid: int | None) -> dict[str, Any]:
        d = self.d
        try:
            hint = add_hint(d.hints, params.model_dump())
        except HintError as err:
            raise ApiParamsError(str(err)) from err
        event_id = await self._event(
            "job_hint_added",
            f"job {hint.job_id}: {hint.expected_kw:g} kW on {hint.nodes} nodes",
            params.model_dump(),
            "scheduler",
            peer_uid,
        )
        end = None if math.isinf(hint.end_utc) else hint.end_utc
        return {
            "job_id": hint.job_id,
            "start_utc": hint.start_utc,
            "end_utc": end,
            "event_id": event_id,
        }

    async def add_dr_event(
        self, params: DemandResponseParams, peer_uid: int | None
    ) -> dict[str, Any]:
        d = self.d
        try:
            parse_event(params.model_dump())
        except EventError as err:
            raise ApiParamsError(str(err)) from err
        if params.end_utc <= time.time():
            raise ApiParamsError(
                f"event {params.event_id}: end_utc {params.end_utc} is in the past"
            )
        d.dr_events[params.event_id] = params
        log.info(
            "dr_event_added",
            event_id=params.event_id,
            start_utc=params.start_utc,
            end_utc=params.end_utc,
            reduce_kw=params.reduce_kw,
        )
        event_id = await self._event(
            "dr_event_added",
            f"demand response {params.event_id}: -{params.reduce_kw:g} kW",
            params.model_dump(),
            "operator",
            peer_uid,
        )
        return {"event_id": event_id, "dr_event_id": params.event_id}

    async def test_stall_loop(self, params: StallParams, peer_uid: int | None) -> dict[str, Any]:
        """Stall the fast loop once, to prove that the watchdog stops and the state faults."""
        log.warning("test_stall_loop", duration_ms=params.duration_ms, peer_uid=peer_uid)
        self.d.loop.stall(params.duration_ms)
        return {"stalled_ms": params.duration_ms}

    async def test_planner_input(
        self, params: PlannerInputParams, peer_uid: int | None
    ) -> dict[str, Any]:
        """Replace one planner input for the next runs, to prove a broken input changes nothing."""
        planner = self.d.planner
        if planner is None:
            raise ApiRejectedError("the planner is not enabled ([planner] enabled = false)")
        log.warning(
            "test_planner_input",
            field=params.field,
            value=params.value,
            runs=params.runs,
            peer_uid=peer_uid,
        )
        planner.input_overrides[params.field] = (params.value, params.runs)
        return {"field": params.field, "value": params.value, "runs": params.runs}

    def _refuse_when_stopping(self) -> None:
        if self.d.machine.state is State.STOPPING:
            raise ApiRejectedError("the daemon is stopping; the request was not applied")

    async def _event(
        self, kind: str, message: str, data: dict[str, Any], operator: str, peer_uid: int | None
    ) -> int:
        d = self.d
        return await d._store_call(
            d.store.add_event,
            kind,
            message,
            source=operator,
            data={**data, "peer_uid": peer_uid},
        )


def _finite(value: Any) -> float | None:
    x = float(value)
    return x if math.isfinite(x) else None

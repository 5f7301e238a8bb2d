"""Scenario files (``hil/scenarios/*.toml``): site, traces, battery, PCS, timing, faults, criteria.

A scenario states everything a run needs and which bundled data it uses, so a
result can be reproduced from the file and the seed alone. Every table
forbids unknown keys. Powers are in kW, energies in kWh, times in the unit
their name carries.
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from hil.plan_scenario import Cluster, DemandResponse, Planner

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib


class ScenarioError(ValueError):
    """A scenario file is missing or breaks the schema; ``problems`` has one line per error."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: {len(problems)} scenario error(s):\n" + "\n".join(problems))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Run(_Strict):
    name: str = Field(min_length=1)
    description: str = ""
    duration_s: float = Field(gt=0)
    seed: int = 0
    #: Plant integration step of the HIL and SIL runs.
    dt_ms: float = Field(default=1.0, gt=0, le=1000)
    #: UTC start used to pick the wind and facility data, ISO 8601.
    start_utc: str = "2015-02-03T12:00:00Z"


class Racks(_Strict):
    """GPU racks: each rack's power is the measured trace's shape, scaled, plus fast swings."""

    count: int = Field(ge=1, le=256)
    #: Rack power at 100 % of the trace's maximum.
    peak_kw: float = Field(gt=0)
    #: ``h100-training`` (measured 8-GPU training power), ``h200-inference`` or ``generator`` only.
    trace: Literal["h100-training", "h200-inference", "generator"] = "h100-training"
    #: Add the generator's iteration swings, which 2-second logging cannot show.
    iteration_swings: bool = True
    iteration_period_s: float = Field(default=1.5, gt=0)
    #: Low point of an iteration swing as a fraction of the rack's momentary envelope.
    swing_low_fraction: float = Field(default=0.35, ge=0, le=1)
    #: Time offset between consecutive racks' copies of the trace.
    rack_offset_s: float = Field(default=17.0, ge=0)
    #: Spread of iteration phase between racks, 0 = in lock-step, 1 = independent.
    desync: float = Field(default=0.1, ge=0, le=1)
    checkpoint_every_s: float = Field(default=120.0, gt=0)
    checkpoint_length_s: float = Field(default=8.0, ge=0)


class Facility(_Strict):
    """Baseline facility load (cooling, offices) from the commercial 15-minute profile."""

    mean_kw: float = Field(default=0.0, ge=0)
    #: Column of the BDEW commercial calendar profile.
    profile: Literal["g0", "g1", "g3", "g25"] = "g1"


class Wind(_Strict):
    """On-site wind from the La Haute Borne plant data, scaled to ``rated_kw``."""

    rated_kw: float = Field(default=0.0, ge=0)
    interpolation: Literal["linear", "pchip"] = "pchip"


class Battery(_Strict):
    energy_kwh: float = Field(gt=0)
    soc_initial_pct: float = Field(default=60.0, ge=0, le=100)
    charge_efficiency: float = Field(default=0.96, gt=0, le=1)
    discharge_efficiency: float = Field(default=0.96, gt=0, le=1)
    #: Cells in series of the simulated pack, for the BMS voltage.
    cells_in_series: int = Field(default=16, ge=1, le=400)
    #: BMS current limit in each direction at the pack voltage.
    max_current_a: float = Field(default=1000.0, gt=0)


class Pcs(_Strict):
    units: int = Field(default=1, ge=1, le=32)
    rated_kw: float = Field(gt=0)
    #: First-order time constant of the power response; real units are 30 ms or slower.
    time_constant_ms: float = Field(default=30.0, ge=0)
    dead_time_ms: float = Field(default=10.0, ge=0)
    ramp_kw_per_s: float = Field(default=100_000.0, gt=0)
    revert_s: float = Field(default=2.0, gt=0)


class Meters(_Strict):
    """Timing of the simulated meters; real meters update every 100 ms or slower."""

    update_ms: float = Field(default=100.0, gt=0)
    window_ms: float = Field(default=100.0, gt=0)


class Control(_Strict):
    """Values for the generated gateway configuration's ``[control]`` table."""

    grid_cap_kw: float = Field(gt=0)
    grid_floor_kw: float = 0.0
    ramp_limit_kw_per_s: float = Field(default=50.0, gt=0)
    smoothing_tau_s: float = Field(default=5.0, ge=0)
    #: Periodic feed-forward of the load (see gateway.control.predictor).
    feedforward: bool = True
    feedforward_lead_ms: float = Field(default=150.0, ge=0, lt=400)


class Tariff(_Strict):
    """Demand tariff for planning scenarios."""

    demand_charge_per_kw: float = Field(default=0.0, ge=0)
    demand_interval_min: int = Field(default=15, ge=1, le=60)
    #: Hour-of-day energy prices (24 values) for time-of-use arbitrage; empty = flat.
    energy_price_per_kwh: list[float] = Field(default_factory=list)
    daily_cycle_budget: float = Field(default=1.0, gt=0)


FaultKind = Literal[
    "delay",
    "drop",
    "freeze",
    "exception",
    "disconnect",
    "sentinel",
    "bms_silent",
    "bms_alarm",
    "bms_limits_zero",
    "pcs_trip",
    "gateway_sigkill",
    "gateway_sigterm",
]


class Fault(_Strict):
    at_s: float = Field(ge=0)
    #: Device name in the generated configuration (``grid``, ``rack-01``, ``pcs-1``, ``bms-1``),
    #: or ``gateway`` for signals to the daemon.
    device: str = Field(min_length=1)
    kind: FaultKind
    duration_s: float = Field(default=0.0, ge=0)
    #: Extra delay for ``delay``, exception code for ``exception``.
    value: float = 0.0


class Criteria(_Strict):
    """Pass/fail limits; a criterion left unset is reported but not judged."""

    max_15min_demand_kw: float | None = None
    max_grid_ramp_kw_per_s: float | None = None
    #: Largest share of the seconds with battery headroom in which the grid ramp exceeded the limit.
    ramp_exceed_fraction_max: float | None = Field(default=None, ge=0, le=1)
    min_band_attenuation_db: float | None = None
    soc_min_pct: float | None = None
    soc_max_pct: float | None = None
    max_bms_limit_breaches: int | None = Field(default=None, ge=0)
    max_fault_reaction_ms: float | None = Field(default=None, gt=0)
    min_capture_ratio: float | None = Field(default=None, ge=0, le=1)
    min_self_consumption_gain: float | None = Field(default=None, ge=0)
    #: Largest allowed difference between HIL and SIL results, relative.
    hil_sil_tolerance: float | None = Field(default=None, gt=0)


class Scenario(_Strict):
    run: Run
    racks: Racks
    facility: Facility = Facility()
    wind: Wind = Wind()
    battery: Battery
    pcs: Pcs
    meters: Meters = Meters()
    control: Control
    tariff: Tariff = Tariff()
    faults: list[Fault] = Field(default_factory=list)
    criteria: Criteria = Criteria()
    #: Planning replays over days only (``bessgw plan replay``).
    cluster: Cluster | None = None
    planner: Planner | None = None
    demand_response: list[DemandResponse] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check_faults(self) -> Scenario:
        for index, fault in enumerate(self.faults):
            if fault.at_s >= self.run.duration_s:
                raise ValueError(
                    f"faults[{index}] at_s={fault.at_s} is not before the end of the run "
                    f"(duration_s={self.run.duration_s}); move it earlier or lengthen the run"
                )
        return self

    def with_duration(self, duration_s: float) -> Scenario:
        """Return a copy cut to ``duration_s``, dropping faults that would start after it."""
        faults = [f for f in self.faults if f.at_s < duration_s]
        run = self.run.model_copy(update={"duration_s": duration_s})
        return self.model_copy(update={"run": run, "faults": faults})


def _location(loc: tuple[object, ...]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or "(top)"


def parse_scenario(text: str, source: str = "<scenario>") -> Scenario:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ScenarioError(source, [f"not valid TOML: {err}"]) from err
    try:
        return Scenario.model_validate(data)
    except ValidationError as err:
        problems = []
        for error in err.errors(include_url=False):
            where = _location(error["loc"])
            if error["type"] == "extra_forbidden":
                problems.append(f"{where}: unknown key; remove it or check its spelling")
            elif error["type"] == "missing":
                problems.append(f"{where}: required key is missing")
            else:
                message = error["msg"].removeprefix("Value error, ")
                problems.append(f"{where}: invalid value {error.get('input')!r}: {message}")
        raise ScenarioError(source, problems) from err


def builtin_scenarios() -> list[str]:
    folder = resources.files("hil") / "scenarios"
    return sorted(
        p.name.removesuffix(".toml") for p in folder.iterdir() if p.name.endswith(".toml")
    )


def load_scenario(name_or_path: str | Path) -> Scenario:
    """Load a built-in scenario by name (``ai-training-wind``) or a TOML file by path."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        try:
            return parse_scenario(path.read_text(encoding="utf-8"), str(path))
        except FileNotFoundError as err:
            raise ScenarioError(str(path), ["file not found"]) from err
    resource = resources.files("hil") / "scenarios" / f"{name_or_path}.toml"
    if not resource.is_file():
        known = ", ".join(builtin_scenarios())
        raise ScenarioError(
            str(name_or_path),
            [f"no built-in scenario of that name; built-in: {known}, or give a path"],
        )
    return parse_scenario(
        resource.read_text(encoding="utf-8"), f"hil/scenarios/{name_or_path}.toml"
    )

"""Site configuration: one TOML file, parsed with tomllib and validated with pydantic.

Every model forbids unknown keys, so a misspelt key is an error and never a
silent default. :func:`load_config` collects every problem in the file and
raises one :class:`ConfigError` that lists them all, each with its key path,
the value found, what is allowed and how to fix it.
"""

from __future__ import annotations

import itertools
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

DEFAULT_CONFIG_PATH = Path("/etc/bessgw/bessgw.toml")

Role = Literal["grid_meter", "rack_meter", "renewable_meter", "facility_meter", "pcs", "bms"]
METER_ROLES = ("grid_meter", "rack_meter", "renewable_meter", "facility_meter")


class ConfigError(ValueError):
    """The configuration file is missing, is not TOML, or breaks the schema.

    ``problems`` holds one line per error, ready to print.
    """

    def __init__(self, path: str | Path, problems: list[str]) -> None:
        self.path = str(path)
        self.problems = problems
        super().__init__(f"{path}: {len(problems)} configuration error(s):\n" + "\n".join(problems))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class TcpTransport(_Strict):
    """Modbus TCP, or an RTU-over-TCP serial gateway."""

    kind: Literal["tcp"]
    host: str = Field(min_length=1)
    port: int = Field(default=502, ge=1, le=65535)


class RtuTransport(_Strict):
    """Modbus RTU on an RS-485 bus; several devices may share one ``device``."""

    kind: Literal["rtu"]
    #: Serial device (``/dev/ttyUSB0``) or a pyserial URL (``socket://127.0.0.1:4001``).
    device: str = Field(min_length=1)
    baud: Literal[1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200] = 9600
    parity: Literal["N", "E", "O"] = "N"
    stop_bits: Literal[1, 2] = 1


class CanTransport(_Strict):
    """A CAN link read with python-can."""

    kind: Literal["can"]
    #: python-can interface name: ``socketcan``, ``slcan``, ``virtual``.
    interface: Literal["socketcan", "slcan", "virtual"]
    #: ``can0`` for socketcan, a serial device or ``socket://`` URL for slcan, any name for virtual.
    channel: str = Field(min_length=1)
    bitrate: int = Field(default=500_000, ge=10_000, le=1_000_000)
    #: slcan only: seconds to wait after opening the port, for USB adapters whose board
    #: resets when the port opens. Unset: 2 s on a serial device, 0 on a ``socket://`` URL
    #: or a pseudo-terminal (``/dev/pts/N``), where nothing resets.
    slcan_open_delay_s: float | None = Field(default=None, ge=0.0, le=10.0)


Transport = Annotated[TcpTransport | RtuTransport | CanTransport, Field(discriminator="kind")]


class Device(_Strict):
    """One physical device on a link."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    role: Role
    #: Built-in profile name (``drivers/profiles/NAME.toml``) or a path to a TOML profile.
    profile: str = Field(min_length=1)
    transport: Transport
    unit_id: int = Field(default=1, ge=0, le=247)
    poll_period_ms: int = Field(default=1000, ge=10, le=3_600_000)
    timeout_ms: int = Field(default=1000, ge=10, le=60_000)
    #: A value older than this is STALE; default three poll periods.
    stale_ms: int | None = Field(default=None, ge=10, le=3_600_000)
    #: PCS only: the unit's rated active power, which caps every setpoint.
    rated_kw: float | None = Field(default=None, gt=0)
    #: BMS only: hardware ceiling for charge and discharge current limits.
    max_current_a: float | None = Field(default=None, gt=0)
    #: PCS only: name of the BMS device of the battery string behind this PCS.
    bms: str | None = None

    @model_validator(mode="after")
    def _check_role_fields(self) -> Device:
        if self.role == "bms" and self.transport.kind != "can":
            raise ValueError(
                f"device {self.name!r} has role 'bms' but transport kind "
                f"{self.transport.kind!r}; a BMS is read over CAN: set transport.kind = 'can'"
            )
        if self.role != "bms" and self.transport.kind == "can":
            raise ValueError(
                f"device {self.name!r} has transport kind 'can' but role {self.role!r}; "
                "only role 'bms' is read over CAN"
            )
        if self.role == "pcs" and self.rated_kw is None:
            raise ValueError(
                f"device {self.name!r} is a PCS without rated_kw; "
                "set rated_kw to the unit's nameplate active power in kW"
            )
        return self

    @property
    def effective_stale_ms(self) -> int:
        return self.stale_ms if self.stale_ms is not None else 3 * self.poll_period_ms


class Control(_Strict):
    """Parameters of the fast control law. Powers in kW, ramps in kW/s."""

    rate_hz: int = Field(default=1000, ge=100, le=2000)
    #: Peak-shaving cap on grid import.
    grid_cap_kw: float = Field(gt=0)
    #: Floor on grid import; negative allows export down to that value.
    grid_floor_kw: float = 0.0
    #: Largest rate of change of grid power the battery tries to hold.
    ramp_limit_kw_per_s: float = Field(default=50.0, gt=0)
    #: Time constant of the low-pass that defines the smooth grid target.
    smoothing_tau_s: float = Field(default=5.0, ge=0)
    #: Periodic feed-forward of the load (gateway.control.predictor): predict the
    #: load one iteration period back, shifted by the lead, while the load is periodic.
    feedforward: bool = True
    #: Meter delay (window/2 + update/2) plus PCS dead time and time constant.
    feedforward_lead_ms: float = Field(default=150.0, ge=0, lt=400)
    soc_hard_min_pct: float = Field(default=5.0, ge=0, le=100)
    soc_soft_min_pct: float = Field(default=15.0, ge=0, le=100)
    soc_soft_max_pct: float = Field(default=90.0, ge=0, le=100)
    soc_hard_max_pct: float = Field(default=97.0, ge=0, le=100)
    #: Setpoint changes smaller than this are not written to the PCS.
    deadband_kw: float = Field(default=1.0, ge=0)
    #: Per-unit slew limit of the setpoint.
    unit_slew_kw_per_s: float = Field(default=1000.0, gt=0)
    #: Grid import added to the target to recharge while the mean SoC is below
    #: soc_soft_min_pct, within the headroom under the cap. 0 disables recharge.
    recharge_kw: float = Field(default=0.0, ge=0)
    #: Recharge stops when the mean SoC reaches soc_soft_min_pct plus this.
    recharge_hysteresis_pct: float = Field(default=5.0, gt=0, le=50)
    #: SCHED_FIFO priority of the loop thread; 0 keeps the normal scheduler.
    rt_priority: int = Field(default=80, ge=0, le=99)
    #: CPU the loop thread is pinned to; None leaves it to the scheduler.
    cpu: int | None = Field(default=None, ge=0, le=1023)
    #: mlockall() the daemon so that the loop does not wait for page faults.
    lock_memory: bool = True
    #: The loop sleeps until this long before each deadline, then spins.
    spin_us: int = Field(default=100, ge=0, le=5000)
    #: Run the numpy loop when the C extension is missing. Off by default: the
    #: Python loop cannot hold 1 kHz timing.
    allow_python_fallback: bool = False

    @model_validator(mode="after")
    def _check_bands(self) -> Control:
        band = (
            self.soc_hard_min_pct,
            self.soc_soft_min_pct,
            self.soc_soft_max_pct,
            self.soc_hard_max_pct,
        )
        if not all(a < b for a, b in itertools.pairwise(band)):
            raise ValueError(
                "SoC band must satisfy soc_hard_min_pct < soc_soft_min_pct < soc_soft_max_pct "
                f"< soc_hard_max_pct; got {band[0]} < {band[1]} < {band[2]} < {band[3]}"
            )
        if self.grid_floor_kw >= self.grid_cap_kw:
            raise ValueError(
                f"grid_floor_kw ({self.grid_floor_kw}) must be below "
                f"grid_cap_kw ({self.grid_cap_kw})"
            )
        return self


SafeAction = Literal["hold", "ramp_to_zero", "disable"]


class Safety(_Strict):
    """Reaction per fault class, and the limits that trigger them."""

    meter_stale_ms: int = Field(default=500, ge=10, le=60_000)
    bms_stale_ms: int = Field(default=5000, ge=100, le=600_000)
    #: Consistent BMS frame sets needed after silence before non-zero power is allowed.
    bms_recovery_frame_sets: int = Field(default=3, ge=1, le=100)
    on_meter_stale: SafeAction = "ramp_to_zero"
    on_bms_fault: SafeAction = "ramp_to_zero"
    on_soc_hard_limit: SafeAction = "ramp_to_zero"
    on_limit_breach: SafeAction = "ramp_to_zero"
    on_pcs_fault: SafeAction = "disable"
    on_estop: SafeAction = "disable"
    #: Measured PCS power may exceed the unit's limit (rating or BMS limit) by this much.
    limit_breach_margin_kw: float = Field(default=10.0, ge=0)
    #: A breach beyond the margin must last this long to latch the fault.
    limit_breach_ms: int = Field(default=500, ge=1, le=60_000)
    #: Ramp used by ``ramp_to_zero``.
    safe_ramp_kw_per_s: float = Field(default=500.0, gt=0)
    #: PCS reversion timer: the PCS falls back to 0 kW this long after the last command.
    pcs_revert_s: float = Field(default=2.0, ge=0.1, le=600)
    #: Failed writes in a row before a PCS is declared faulted.
    pcs_write_budget: int = Field(default=3, ge=1, le=20)


class Service(_Strict):
    """Where the daemon keeps state and what it exposes."""

    state_dir: str = "/var/lib/bessgw"
    api_socket: str = "/run/bessgw/api.sock"
    #: Prometheus listener; the default binds the loopback only. 0 disables it.
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(default=9687, ge=0, le=65535)
    sigterm_ramp_s: float = Field(default=5.0, gt=0, le=300)
    #: Size limit of the embedded store (database plus disturbance records).
    store_max_mb: float = Field(default=1024.0, ge=1, le=1_000_000)
    #: Events, aggregates and disturbance records older than this are deleted.
    store_max_age_days: float = Field(default=365.0, gt=0, le=36_500)


class Site(_Strict):
    name: str = Field(min_length=1)
    #: Nominal grid connection; used for sanity ranges on measured power.
    grid_connection_kw: float = Field(gt=0)


class Planner(_Strict):
    """Supervisory planner: sets the loop's grid cap and SoC band once per ``period_s``.

    Disabled, the loop runs with ``control.grid_cap_kw`` and the control SoC
    band. Enabled, ``control.grid_cap_kw`` is only the cap used until a day
    of history exists, and ``control.grid_floor_kw``,
    ``control.ramp_limit_kw_per_s`` and ``control.recharge_kw`` carry over.
    The battery's power is the sum of the PCS ratings.
    """

    enabled: bool = False
    #: How often the planner runs. Shorter than a minute only for tests and commissioning.
    period_s: float = Field(default=60.0, ge=1.0, le=60.0)
    #: Stored energy of every battery string together between 0 and 100 % SoC.
    energy_kwh: float | None = Field(default=None, gt=0)
    #: Ride-through reserve that the planner never plans to use.
    reserve_soc_pct: float = Field(default=20.0, ge=0, lt=100)
    #: Top of the SoC band the planner uses; default ``control.soc_soft_max_pct``.
    soc_max_pct: float | None = Field(default=None, gt=0, le=100)
    #: Stored kWh per kWh taken from the grid, PCS losses included.
    charge_efficiency: float = Field(default=0.95, gt=0, le=1)
    #: AC kWh delivered per stored kWh, PCS losses included.
    discharge_efficiency: float = Field(default=0.95, gt=0, le=1)
    #: Length of the tariff's demand interval: the bill charges the highest mean import over it.
    demand_interval_min: float = Field(default=15.0, ge=1, le=60)
    #: Energy discharged per UTC day for self-consumption and arbitrage, in battery capacities.
    #: Peak shaving and demand response are not limited by it.
    daily_cycle_budget: float = Field(default=1.0, ge=0, le=10)
    #: Energy price per kWh for each UTC hour 0-23 (any currency), or empty for a flat price.
    energy_price_per_kwh: list[float] = Field(default_factory=list)
    #: Discharge energy that the cap does not need, to make room for renewable surplus.
    self_consumption: bool = True
    #: Measured history the planner uses to judge which cap the battery can hold.
    history_days: float = Field(default=7.0, ge=1, le=60)
    #: Kept between the planned cap and the loop's cap, for meter error and the period's lag.
    cap_margin_kw: float = Field(default=0.0, ge=0)
    #: Time over which energy above the cap's need is discharged into the load.
    drain_min: float = Field(default=60.0, gt=0, le=1440)
    #: Full range of the site load for the load forecast; default ``site.grid_connection_kw``.
    load_scale_kw: float | None = Field(default=None, gt=0)
    #: Rated output of the on-site renewables; required with a renewable meter.
    renewable_rated_kw: float | None = Field(default=None, gt=0)
    #: JSON file of planned jobs that the job scheduler rewrites (see gateway.forecast.hints).
    job_hint_file: str | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _check_fields(self) -> Planner:
        if 60.0 % self.period_s:
            raise ValueError(f"period_s ({self.period_s}) must divide 60 s evenly")
        prices = self.energy_price_per_kwh
        if prices and len(prices) != 24:
            raise ValueError(
                f"energy_price_per_kwh has {len(prices)} values; give 24 (UTC hours 0-23) or none"
            )
        if self.enabled and self.energy_kwh is None:
            raise ValueError(
                "the planner is enabled without energy_kwh; set it to the battery's stored "
                "energy between 0 and 100 % SoC"
            )
        return self


class SiteConfig(_Strict):
    """The whole file."""

    site: Site
    devices: list[Device] = Field(min_length=1)
    control: Control
    safety: Safety = Safety()
    service: Service = Service()
    planner: Planner = Planner()

    @model_validator(mode="after")
    def _check_planner(self) -> SiteConfig:
        planner, control = self.planner, self.control
        if not planner.enabled:
            return self
        top = self.planner_soc_max_pct
        # The plan's SoC band replaces the control's soft band, so it must lie inside the
        # hard band, and be at least 5 points wide (the planner's derating zone at the top).
        if not control.soc_hard_min_pct < planner.reserve_soc_pct <= top - 5.0:
            raise ValueError(
                f"planner.reserve_soc_pct ({planner.reserve_soc_pct}) must be above "
                f"control.soc_hard_min_pct ({control.soc_hard_min_pct}) and at least 5 points "
                f"below the planner's top SoC ({top})"
            )
        if not top < control.soc_hard_max_pct:
            raise ValueError(
                f"planner.soc_max_pct ({top}) must be below control.soc_hard_max_pct "
                f"({control.soc_hard_max_pct})"
            )
        has_renewables = any(d.role == "renewable_meter" for d in self.devices)
        if has_renewables and planner.renewable_rated_kw is None:
            raise ValueError(
                "the planner is enabled and the site has a renewable_meter, but "
                "planner.renewable_rated_kw is missing; set it to the renewables' rated output"
            )
        return self

    @property
    def planner_soc_max_pct(self) -> float:
        """Top of the planner's SoC band, ``planner.soc_max_pct`` or else the control's soft max."""
        top = self.planner.soc_max_pct
        return self.control.soc_soft_max_pct if top is None else top

    @model_validator(mode="after")
    def _check_devices(self) -> SiteConfig:
        """Check the devices against each other; raise one ValueError, one line per problem."""
        problems = []
        names = [d.name for d in self.devices]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            problems.append(f"device names must be unique; repeated: {', '.join(duplicates)}")
        if not any(d.role == "grid_meter" for d in self.devices):
            problems.append("no device has role 'grid_meter'; the control law needs the grid power")
        if not any(d.role == "pcs" for d in self.devices):
            problems.append("no device has role 'pcs'; add at least one PCS to command")
        bms_names = {d.name for d in self.devices if d.role == "bms"}
        for index, device in enumerate(self.devices):
            if device.role == "bms" and device.max_current_a is None:
                problems.append(
                    f"devices[{index}].max_current_a: device {device.name!r} is a BMS without "
                    "max_current_a; set it to the "
                    "string's hardware current ceiling in A, which caps the BMS's limits"
                )
            if device.bms is None:
                continue
            if device.role != "pcs":
                problems.append(
                    f"devices[{index}].bms: device {device.name!r} has bms = {device.bms!r} but "
                    f"role {device.role!r}; "
                    "only a PCS names the BMS of its battery string"
                )
            elif device.bms not in bms_names:
                known = ", ".join(sorted(bms_names)) or "none"
                problems.append(
                    f"devices[{index}].bms: device {device.name!r} names bms = {device.bms!r}, "
                    f"which is not a device with role 'bms' (BMS devices: {known})"
                )
        if problems:
            # _format_error prints each line of the message as its own error.
            raise ValueError("\n".join(problems))
        return self

    def device(self, name: str) -> Device:
        for device in self.devices:
            if device.name == name:
                return device
        known = ", ".join(d.name for d in self.devices)
        raise KeyError(f"no device named {name!r} in the configuration; known devices: {known}")


def _format_location(loc: tuple[Any, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in ("tcp", "rtu", "can"):
            continue  # the discriminator tag pydantic adds; not a key in the file
        else:
            path += f".{part}" if path else str(part)
    return path or "(top level)"


#: A message that starts with the key path it is about, such as ``devices[1].bms: ``.
_KEY_PATH = re.compile(r"^[a-z_]+(\[\d+\])?(\.[a-z_]+)*: ")


def _format_error(error: dict[str, Any]) -> list[str]:
    """Turn one pydantic error into printable lines, ``KEY.PATH: what is wrong; the fix``.

    A model validator's message may hold several problems, one per line, and
    each becomes its own line. The input of a table or list (a whole device,
    or the whole file) is left out, because the key path already points to it.
    """
    location = _format_location(error["loc"])
    kind = error["type"]
    value = error.get("input")
    if kind == "extra_forbidden":
        return [
            f"{location}: unknown key (value {value!r}); "
            "remove it or check its spelling against systemd/bessgw.example.toml"
        ]
    if kind == "missing":
        return [f"{location}: required key is missing; add it"]
    messages = error["msg"].removeprefix("Value error, ").splitlines()
    if location == "(top level)":
        # A whole-file check may name the key itself, as ``devices[1].bms: ...``.
        return [
            message if _KEY_PATH.match(message) else f"{location}: {message}"
            for message in messages
        ]
    if kind in ("model_type", "dict_type") or isinstance(value, (dict, list)):
        return [f"{location}: {message}" for message in messages]
    return [f"{location}: invalid value {value!r}: {message}" for message in messages]


def validate_config(data: dict[str, Any], path: str | Path = "<config>") -> SiteConfig:
    """Validate parsed TOML; raise :class:`ConfigError` listing every problem."""
    try:
        return SiteConfig.model_validate(data)
    except ValidationError as err:
        problems = [line for e in err.errors(include_url=False) for line in _format_error(e)]
        raise ConfigError(path, problems) from err


def load_config(
    path: str | Path = DEFAULT_CONFIG_PATH, *, missing_hint: str = "check the path"
) -> SiteConfig:
    """Read and validate the site configuration file.

    ``missing_hint`` tells the user how to name another file when ``path``
    does not exist, in the caller's terms (an option, an argument).
    """
    return validate_config(read_config_data(path, missing_hint=missing_hint), path)


def read_config_data(path: str | Path, *, missing_hint: str = "check the path") -> dict[str, Any]:
    """Read and parse the TOML file without validating it; raise :class:`ConfigError`."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError as err:
        raise ConfigError(path, [f"{path}: file not found; {missing_hint}"]) from err
    except OSError as err:
        raise ConfigError(
            path, [f"{path}: cannot be read ({err.strerror}); check its permissions"]
        ) from err
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(
            path, [f"{path}: not UTF-8 text at byte {err.start}; save it as UTF-8"]
        ) from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(path, [f"{path}: not valid TOML: {err}"]) from err
    return data

"""Structured dtypes of the data the fast loop exchanges, and the bit codes it uses.

The C structs in ``fl_law.h`` and these dtypes describe the same bytes.
:func:`check_layout` compares them field by field with the offsets that the
extension exports, so a mismatch fails at start-up and never corrupts a tick.
The numpy reference and the Python fallback use the same dtypes, so records
from either loop read the same.

Signs: grid power positive = import, load positive = consumption, PCS and
battery power positive = discharge into the site.
"""

from __future__ import annotations

import enum
from typing import Any

import numpy as np

#: Largest number of PCS units one loop drives (``FL_MAX_UNITS`` in C).
MAX_UNITS = 64


class Reaction(enum.IntEnum):
    """Safe action of a unit, ordered by severity: the strongest latched one applies."""

    NONE = 0
    HOLD = 1
    RAMP_TO_ZERO = 2
    DISABLE = 3


class Fault(enum.IntFlag):
    """Fault bits. Bits 0-7 are site-wide and act on every unit, bits 8-15 on one unit."""

    GRID_STALE = 1 << 0
    LOAD_STALE = 1 << 1
    ESTOP = 1 << 2
    BMS_SILENT = 1 << 8
    BMS_PROTECTION = 1 << 9
    SOC_HARD = 1 << 10
    LIMIT_BREACH = 1 << 11
    PCS_LOST = 1 << 12
    PCS_FAULT = 1 << 13


#: Number of fault bit positions that carry a configured reaction.
FAULT_BITS = 16

#: Configuration key of :class:`gateway.config.Safety` that sets each fault's reaction.
FAULT_REACTION_KEY = {
    Fault.GRID_STALE: "on_meter_stale",
    Fault.LOAD_STALE: "on_meter_stale",
    Fault.ESTOP: "on_estop",
    Fault.BMS_SILENT: "on_bms_fault",
    Fault.BMS_PROTECTION: "on_bms_fault",
    Fault.SOC_HARD: "on_soc_hard_limit",
    Fault.LIMIT_BREACH: "on_limit_breach",
    Fault.PCS_LOST: "on_pcs_fault",
    Fault.PCS_FAULT: "on_pcs_fault",
}


class Limit(enum.IntFlag):
    """Limit bits: which limit shaped a tick's result. Informational, never a fault."""

    CAP = 1 << 0
    FLOOR = 1 << 1
    RAMP = 1 << 2
    UNCOVERED = 1 << 3
    RECHARGE = 1 << 4
    GRID_OVER_CAP = 1 << 5
    #: The writer held the input seqlock too long and the C thread reused the last snapshot.
    SNAPSHOT_REUSED = 1 << 6
    BMS_LIMIT = 1 << 8
    SOC_DERATE = 1 << 9
    SLEW = 1 << 10
    UNIT_CAP = 1 << 11
    DEADBAND = 1 << 12


SITE_INPUT_DTYPE = np.dtype(
    [
        ("generation", "u8"),  # set by the loop on every publish
        ("grid_kw", "f8"),
        ("load_kw", "f8"),  # net site load: racks + facility - on-site generation
        ("grid_t_ns", "i8"),  # CLOCK_MONOTONIC time the value was received
        ("load_t_ns", "i8"),
        ("grid_quality", "i4"),  # drivers.quality.Quality code
        ("load_quality", "i4"),
        ("estop", "i4"),
        ("reset_count", "u4"),  # a change requests a fault reset
    ]
)

UNIT_INPUT_DTYPE = np.dtype(
    [
        ("pcs_p_kw", "f8"),
        ("soc_pct", "f8"),
        ("bms_voltage_v", "f8"),
        ("bms_charge_limit_a", "f8"),  # magnitude
        ("bms_discharge_limit_a", "f8"),  # magnitude
        ("pcs_t_ns", "i8"),
        ("bms_t_ns", "i8"),
        ("pcs_quality", "i4"),
        ("pcs_fault", "i4"),
        ("bms_quality", "i4"),  # worst quality of the BMS values
        ("bms_protection", "i4"),
    ]
)

SITE_PARAM_DTYPE = np.dtype(
    [
        ("dt_s", "f8"),
        ("cap_kw", "f8"),
        ("floor_kw", "f8"),
        ("ramp_kw_per_s", "f8"),
        ("lp_alpha", "f8"),
        ("soc_hard_min_pct", "f8"),
        ("soc_soft_min_pct", "f8"),
        ("soc_soft_max_pct", "f8"),
        ("soc_hard_max_pct", "f8"),
        ("deadband_kw", "f8"),
        ("safe_ramp_kw_per_s", "f8"),
        ("recharge_kw", "f8"),
        ("recharge_hysteresis_pct", "f8"),
        ("breach_margin_kw", "f8"),
        ("period_ns", "i8"),
        ("meter_stale_ns", "i8"),
        ("bms_stale_ns", "i8"),
        ("pcs_stale_ns", "i8"),
        ("breach_ticks", "i4"),
        ("reaction", "i4", (FAULT_BITS,)),
        ("pad", "i4"),
    ]
)

UNIT_PARAM_DTYPE = np.dtype([("rated_kw", "f8"), ("slew_kw_per_s", "f8")])

RECORD_HEAD_DTYPE = np.dtype(
    [
        ("tick", "u8"),
        ("t_ns", "i8"),  # wake time, the "now" of the tick
        ("wake_late_ns", "i8"),  # wake time minus deadline
        ("compute_ns", "i8"),  # snapshot + law + publish
        ("generation", "u8"),  # generation of the inputs used
        ("grid_kw", "f8"),
        ("load_kw", "f8"),
        ("target_kw", "f8"),
        ("demand_kw", "f8"),  # load - target: what the battery is asked for
        ("uncovered_kw", "f8"),  # demand the battery cannot cover, signed like demand
        ("fault_bits", "u4"),  # latched, site and all units
        ("active_fault_bits", "u4"),
        ("limit_bits", "u4"),
        ("pad", "u4"),
    ]
)

RECORD_UNIT_DTYPE = np.dtype(
    [
        ("setpoint_kw", "f8"),
        ("pcs_p_kw", "f8"),
        ("soc_pct", "f8"),
        ("discharge_cap_kw", "f8"),
        ("charge_cap_kw", "f8"),
        ("fault_bits", "u4"),
        ("limit_bits", "u2"),
        ("reaction", "u1"),
        ("enabled", "u1"),
    ]
)


def record_dtype(n_units: int) -> np.dtype:
    """Return the dtype of one tick record for ``n_units`` units: the head, then ``units``."""
    fields = [(name, RECORD_HEAD_DTYPE.fields[name][0]) for name in RECORD_HEAD_DTYPE.names]
    return np.dtype([*fields, ("units", RECORD_UNIT_DTYPE, (n_units,))])


def empty_inputs(n_units: int) -> tuple[np.ndarray, np.ndarray]:
    """Return a site input record and ``n_units`` unit input records, every value STALE.

    Until a caller fills them, no reading is usable, so every interlock
    that depends on a measurement is active.
    """
    stale = 2  # drivers.quality.Quality.STALE
    site = np.zeros((), SITE_INPUT_DTYPE)
    units = np.zeros(n_units, UNIT_INPUT_DTYPE)
    for name in ("grid_kw", "load_kw"):
        site[name] = np.nan
    site["grid_quality"] = stale
    site["load_quality"] = stale
    for name in (
        "pcs_p_kw",
        "soc_pct",
        "bms_voltage_v",
        "bms_charge_limit_a",
        "bms_discharge_limit_a",
    ):
        units[name] = np.nan
    units["pcs_quality"] = stale
    units["bms_quality"] = stale
    return site, units


_PYTHON_LAYOUT = {
    "site_in": SITE_INPUT_DTYPE,
    "unit_in": UNIT_INPUT_DTYPE,
    "site_par": SITE_PARAM_DTYPE,
    "unit_par": UNIT_PARAM_DTYPE,
    "record_head": RECORD_HEAD_DTYPE,
    "record_unit": RECORD_UNIT_DTYPE,
}


def layout_mismatches(c_layout: dict[str, Any]) -> list[str]:
    """List every difference between the extension's struct layout and these dtypes."""
    problems = []
    if c_layout["max_units"] != MAX_UNITS:
        problems.append(f"MAX_UNITS: C has {c_layout['max_units']}, Python {MAX_UNITS}")
    for struct, dtype in _PYTHON_LAYOUT.items():
        entry = c_layout[struct]
        if entry["size"] != dtype.itemsize:
            problems.append(f"{struct}: C size {entry['size']}, dtype itemsize {dtype.itemsize}")
        c_fields = [(name, offset, size, kind) for name, offset, size, kind in entry["fields"]]
        py_fields = []
        for name in dtype.names:
            field_dtype, offset = dtype.fields[name][:2]
            base = field_dtype.base if field_dtype.subdtype else field_dtype
            py_fields.append((name, offset, field_dtype.itemsize, base.str.lstrip("<>|=")))
        if c_fields != py_fields:
            problems.append(f"{struct}: C fields {c_fields} differ from dtype fields {py_fields}")
    return problems

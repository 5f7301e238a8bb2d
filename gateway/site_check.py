"""Site checks that need the device profiles, shared by ``bessgw config check`` and ``bessgw run``.

:mod:`gateway.config` checks the keys of the site file. This module loads
every device's profile with the loaders that the daemon uses to build its
drivers, so a file that ``config check`` accepts does not fail later when the
daemon starts:

- a BMS profile with :func:`drivers.can.profile.load_bms_profile`;
- any other profile with :func:`drivers.modbus.profile.load_profile`, and
  for a PCS also :meth:`drivers.pcs_map.PcsMap.from_profile`, which rejects
  a profile without the ``[pcs]`` points the PCS writer needs;
- for a meter, the power point that :class:`gateway.plant_io.PlantIO` sums.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, get_args

from drivers.can.profile import ProfileError as BmsProfileError
from drivers.can.profile import load_bms_profile
from drivers.modbus.profile import Profile, ProfileError, load_profile
from drivers.pcs_map import PcsConfigError, PcsMap
from gateway.config import (
    METER_ROLES,
    ConfigError,
    Role,
    SiteConfig,
    read_config_data,
    validate_config,
)

#: Power point and sign that PlantIO reads from a meter profile without a ``[meter]`` table.
DEFAULT_METER_POWER_POINT = "p_kw"
DEFAULT_METER_POWER_SIGN = 1


def load_site_config(path: str | Path, *, missing_hint: str = "check the path") -> SiteConfig:
    """Read and validate the site file and every device profile it names.

    Raise :class:`gateway.config.ConfigError` that lists the schema errors and
    the profile problems together. ``missing_hint`` is used as in
    :func:`gateway.config.load_config`.
    """
    data = read_config_data(path, missing_hint=missing_hint)
    problems = profile_problems(data)
    try:
        config = validate_config(data, path)
    except ConfigError as err:
        raise ConfigError(path, [*err.problems, *problems]) from err
    if problems:
        raise ConfigError(path, problems)
    return config


def profile_problems(data: Mapping[str, Any]) -> list[str]:
    """Load the profile of each device in parsed site data; return one line per problem.

    ``data`` is the parsed TOML, validated or not (``SiteConfig.model_dump()``
    works too), so that profile problems can be listed beside schema errors.
    Devices whose ``role`` or ``profile`` is invalid are skipped, because the
    schema reports those. Each line starts with the key path, for example
    ``devices[3].profile: ...``.
    """
    devices = data.get("devices")
    if not isinstance(devices, list):
        return []
    roles = get_args(Role)
    found: dict[tuple[str, str], list[str]] = {}
    problems: list[str] = []
    for index, entry in enumerate(devices):
        if not isinstance(entry, Mapping):
            continue
        role, name = entry.get("role"), entry.get("profile")
        if role not in roles or not isinstance(name, str) or not name:
            continue
        # Several devices often share one profile: load it once per role.
        if (role, name) not in found:
            found[role, name] = _check_profile(role, name)
        problems.extend(f"devices[{index}].profile: {line}" for line in found[role, name])
    return problems


def _check_profile(role: str, name: str) -> list[str]:
    if _is_relative_path(name) and not Path(name).exists():
        return [
            f"profile file {name!r} not found; a relative path is read from the working "
            f"directory ({Path.cwd()}), so give an absolute path"
        ]
    if role == "bms":
        try:
            load_bms_profile(name)
        except BmsProfileError as err:
            return _name_each(name, err.problems)
        return []
    try:
        profile = load_profile(name)
    except ProfileError as err:
        return _name_each(name, err.problems)
    if role == "pcs":
        try:
            PcsMap.from_profile(profile)
        except PcsConfigError as err:
            return _name_each(name, err.problems)
        return []
    if role in METER_ROLES:
        return _name_each(name, _meter_problems(profile))
    return []


def _meter_problems(profile: Profile) -> list[str]:
    """Check the ``[meter]`` settings that PlantIO uses to read the meter's power in kW."""
    settings = profile.meter
    point_name = settings.get("power_point", DEFAULT_METER_POWER_POINT)
    problems = []
    points = {point.name: point for point in profile.points}
    point = points.get(point_name)
    if point is None:
        problems.append(
            f"no point {point_name!r} for the meter's active power; "
            "name the power point with [meter] power_point"
        )
    elif point.unit != "kW":
        problems.append(
            f"[meter] power point {point_name!r} has unit {point.unit!r}; the gateway reads "
            'meter power in kW: scale the point to kW and set unit = "kW"'
        )
    sign = settings.get("power_sign", DEFAULT_METER_POWER_SIGN)
    if isinstance(sign, bool) or sign not in (1, -1):
        problems.append(
            f"[meter] power_sign = {sign!r} is invalid; use 1, or -1 when the meter's sign "
            "is the opposite of the gateway's for its role"
        )
    return problems


def _name_each(name: str, problems: list[str]) -> list[str]:
    """Prefix each problem with the profile name unless the problem already quotes it."""
    return [problem if repr(name) in problem else f"{name!r}: {problem}" for problem in problems]


def _is_relative_path(name: str) -> bool:
    # The loaders treat a name with a slash or a .toml suffix as a path, and others as built-in.
    return (name.endswith(".toml") or "/" in name) and not Path(name).is_absolute()

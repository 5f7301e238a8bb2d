"""BMS profiles: which decoder, which current sign, which frames form a frame set.

A profile is a TOML file, ``drivers/profiles/bms-pylontech.toml`` being the
built-in one. :func:`load_bms_profile` validates it with pydantic and checks
it against its decoder, so a profile that names an unknown frame id, point
or DBC signal fails at load and never at run time.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from drivers.can.dbc import DbcDecoder, DbcError
from drivers.can.points import POINTS, FrameDecoder
from drivers.can.pylontech import PylontechDecoder

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

PROFILE_DIR = Path(__file__).resolve().parents[1] / "profiles"

Direction = Literal["charge", "discharge"]
SeverityName = Literal["warning", "alarm", "protection"]


class ProfileError(ValueError):
    """A BMS profile is missing, is not TOML, or breaks the schema.

    ``problems`` contains one line per error.
    """

    def __init__(self, path: str | Path, problems: list[str]) -> None:
        self.path = str(path)
        self.problems = problems
        super().__init__(f"BMS profile {path}: " + "; ".join(problems))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class FlagRule(_Strict):
    """Severity of one status bit and the power directions it blocks while set."""

    severity: SeverityName
    blocks: tuple[Direction, ...] = ()


class BmsSection(_Strict):
    protocol: str = Field(min_length=1)
    decoder: Literal["builtin", "dbc"]
    #: Sign of discharge current as the BMS sends it.
    current_sign: Literal["discharge_negative", "discharge_positive"]
    stale_ms: int = Field(ge=100, le=600_000)
    frame_set: tuple[int, ...] = Field(min_length=1)
    limit_frames: tuple[int, ...] = Field(min_length=1)
    optional_points: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _check_frames(self) -> BmsSection:
        if not set(self.frame_set) & set(self.limit_frames):
            raise ValueError(
                "frame_set must contain one of limit_frames, so that recovery waits for fresh "
                f"limits; frame_set is {[hex(i) for i in self.frame_set]}, "
                f"limit_frames {[hex(i) for i in self.limit_frames]}"
            )
        return self


class DbcSection(_Strict):
    #: DBC path, relative to the profile file unless absolute.
    file: str = Field(min_length=1)
    #: DBC signal name -> BMS point name.
    signals: dict[str, str] = Field(min_length=1)
    #: Text point -> its one-character signals in order.
    texts: dict[str, tuple[str, ...]] = {}


class ProfileFile(_Strict):
    """The whole profile file."""

    bms: BmsSection
    ranges: dict[str, tuple[float, float]] = {}
    flags: dict[str, FlagRule] = {}
    dbc: DbcSection | None = None

    @model_validator(mode="after")
    def _check_points(self) -> ProfileFile:
        problems = []
        for name, (low, high) in self.ranges.items():
            if name not in POINTS or POINTS[name].kind not in ("number", "integer"):
                problems.append(f"ranges.{name}: not a numeric BMS point")
            elif not low < high:
                problems.append(f"ranges.{name}: min {low} must be below max {high}")
        for name in self.flags:
            if name not in POINTS or POINTS[name].kind != "flag":
                problems.append(f"flags.{name}: not a flag BMS point")
        for name in self.bms.optional_points:
            if name not in POINTS:
                problems.append(f"bms.optional_points: {name!r} is not a BMS point")
        if self.bms.decoder == "dbc" and self.dbc is None:
            problems.append("bms.decoder is 'dbc' but the [dbc] table is missing")
        if self.bms.decoder == "builtin" and self.bms.protocol != "pylontech":
            problems.append(
                f"bms.protocol {self.bms.protocol!r} has no built-in decoder; "
                "use protocol = 'pylontech' or decoder = 'dbc'"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self


@dataclass(frozen=True)
class BmsProfile:
    """A validated BMS profile with its decoder built."""

    name: str
    path: Path
    protocol: str
    decoder: FrameDecoder
    #: Factor that turns the BMS's current into the gateway's sign (positive = discharge).
    current_sign: int
    stale_s: float
    frame_set: frozenset[int]
    limit_frames: frozenset[int]
    optional_points: frozenset[str]
    ranges: Mapping[str, tuple[float, float]]
    flags: Mapping[str, FlagRule]
    #: The DBC section, kept so a caller can build the other decoder for comparison.
    dbc: DbcSection | None = field(default=None, repr=False)

    def dbc_decoder(self) -> DbcDecoder:
        """Build a decoder from the profile's [dbc] table; raise ProfileError if it has none."""
        if self.dbc is None:
            raise ProfileError(self.path, ["the profile has no [dbc] table"])
        return _build_dbc_decoder(self.path, self.dbc)


def resolve_profile_path(name_or_path: str | Path) -> Path:
    """Return the file of a built-in profile name (``bms-pylontech``) or of a path as given."""
    text = str(name_or_path)
    if text.endswith(".toml") or "/" in text:
        return Path(text)
    return PROFILE_DIR / f"{text}.toml"


def _build_dbc_decoder(profile_path: Path, section: DbcSection) -> DbcDecoder:
    dbc_path = Path(section.file)
    if not dbc_path.is_absolute():
        dbc_path = profile_path.parent / dbc_path
    try:
        return DbcDecoder(dbc_path, section.signals, section.texts)
    except DbcError as err:
        raise ProfileError(profile_path, [str(err)]) from err


def load_bms_profile(name_or_path: str | Path) -> BmsProfile:
    """Load, validate and build a BMS profile; raise :class:`ProfileError` listing every problem."""
    path = resolve_profile_path(name_or_path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        known = ", ".join(sorted(p.stem for p in PROFILE_DIR.glob("bms-*.toml")))
        raise ProfileError(path, [f"file not found; built-in BMS profiles: {known}"]) from err
    except (OSError, UnicodeDecodeError) as err:
        raise ProfileError(path, [f"cannot be read: {err}"]) from err
    except tomllib.TOMLDecodeError as err:
        raise ProfileError(path, [f"not valid TOML: {err}"]) from err
    try:
        model = ProfileFile.model_validate(data)
    except ValidationError as err:
        problems = [
            ".".join(str(part) for part in e["loc"]) + ": " + e["msg"].removeprefix("Value error, ")
            for e in err.errors(include_url=False)
        ]
        raise ProfileError(path, problems) from err

    section = model.bms
    decoder: FrameDecoder
    if section.decoder == "builtin":
        decoder = PylontechDecoder()
    else:
        assert model.dbc is not None  # checked by ProfileFile
        decoder = _build_dbc_decoder(path, model.dbc)
    unknown = [hex(i) for i in section.frame_set if i not in decoder.points_by_frame]
    if unknown:
        raise ProfileError(
            path,
            [f"bms.frame_set: frame ids {unknown} are unknown to the {section.decoder} decoder"],
        )

    return BmsProfile(
        name=path.stem,
        path=path,
        protocol=section.protocol,
        decoder=decoder,
        current_sign=-1 if section.current_sign == "discharge_negative" else 1,
        stale_s=section.stale_ms / 1000.0,
        frame_set=frozenset(section.frame_set),
        limit_frames=frozenset(section.limit_frames),
        optional_points=frozenset(section.optional_points),
        ranges=dict(model.ranges),
        flags=dict(model.flags),
        dbc=model.dbc,
    )

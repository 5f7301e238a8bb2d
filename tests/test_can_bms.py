"""BmsString: sign, limits, alarms and the silence/recovery gating, cycle by cycle.

Times are synthetic ``time.monotonic()`` seconds passed in by the test, so
each case is exact and independent of the machine's speed.
"""

from __future__ import annotations

from pathlib import Path

import can
import pytest
from can_support import frame_bytes, set_frames
from structlog.testing import capture_logs

from drivers.can.bms import BmsState, BmsString, BmsStringConfig, Severity
from drivers.can.profile import PROFILE_DIR, ProfileError, load_bms_profile
from drivers.quality import Quality
from gateway.config import load_config

PROFILE_TEXT = (PROFILE_DIR / "bms-pylontech.toml").read_text(encoding="utf-8")
EXAMPLE_CONFIG = Path(__file__).resolve().parents[1] / "systemd" / "bessgw.example.toml"


def make_string(max_current_a=1000.0, stale_s=5.0, frame_sets=3, profile=None) -> BmsString:
    config = BmsStringConfig(
        name="bms-1",
        profile=profile or load_bms_profile("bms-pylontech"),
        max_current_a=max_current_a,
        stale_s=stale_s,
        recovery_frame_sets=frame_sets,
    )
    return BmsString(config, t_start_mono_s=0.0)


def feed(bms: BmsString, t: float, frames) -> float:
    """Feed frames 10 ms apart from ``t``; return the time of the last one."""
    for i, (frame_id, is_extended, data) in enumerate(frames):
        bms.on_frame(frame_id, data, is_extended, t + 0.01 * i)
    return t + 0.01 * (len(frames) - 1)


def feed_sets(bms: BmsString, start_s: float, count: int, limits_hex="1402740E740ECC01") -> float:
    """Feed one frame set per second from ``start_s``; return the time of the last frame."""
    last = start_s
    for k in range(count):
        last = feed(bms, start_s + k, set_frames(limits_hex))
    return last


def profile_variant(tmp_path: Path, old: str, new: str):
    text = PROFILE_TEXT.replace(old, new)
    assert text != PROFILE_TEXT, f"{old!r} not in the shipped profile"
    text = text.replace(
        'file = "../can/pylontech.dbc"', f'file = "{PROFILE_DIR.parent / "can" / "pylontech.dbc"}"'
    )
    path = tmp_path / "bms-variant.toml"
    path.write_text(text, encoding="utf-8")
    return load_bms_profile(path)


# -- limits normalised and capped ---------------------------------------------------


@pytest.mark.parametrize(
    ("limits_id", "is_extended", "data_hex", "charge_a", "discharge_a"),
    [
        (0x351, False, "4502AC0354FCC001", 94.0, 94.0),  # discharge limit sent as -94.0 A
        (0x351, False, "4502AC03AC03C001", 94.0, 94.0),  # discharge limit sent as +94.0 A
        (0x351, False, "440264009CFF3F02", 10.0, 10.0),  # 0xFF9C = -100 -> 10.0 A
        (0x4220, True, "A410200D2A763674", 25.0, 25.0),  # offset 30000: 30250 and 29750
    ],
)
def test_limits_normalised(limits_id, is_extended, data_hex, charge_a, discharge_a):
    bms = make_string()
    bms.on_frame(limits_id, frame_bytes(data_hex), is_extended, 1.0)
    snap = bms.snapshot(1.5)
    assert snap["charge_current_limit_a"].value == charge_a
    assert snap["discharge_current_limit_a"].value == discharge_a
    assert snap["charge_current_limit_a"].quality is Quality.GOOD


def test_limits_capped_at_ceiling():
    bms = make_string(max_current_a=50.0)
    feed(bms, 1.0, set_frames())  # 370.0 A limits
    snap = bms.snapshot(1.5)
    assert snap["charge_current_limit_a"].value == 50.0
    assert snap["discharge_current_limit_a"].value == 50.0
    # 50 A * 48.66 V / 1000 = 2.433 kW.
    assert snap.charge_limit_kw.value == pytest.approx(2.433, abs=1e-12)


def test_limit_kw_from_pack_voltage():
    bms = make_string()
    feed(bms, 1.0, set_frames("4502AC0354FCC001"))
    snap = bms.snapshot(1.5)
    # 94 A * 48.66 V / 1000 = 4.57404 kW in both directions.
    assert snap.charge_limit_kw.value == pytest.approx(4.57404, abs=1e-12)
    assert snap.discharge_limit_kw.value == pytest.approx(4.57404, abs=1e-12)
    assert snap.charge_limit_kw.unit == "kW"


def test_limit_cap_logged_once():
    bms = make_string(max_current_a=50.0)
    with capture_logs() as logs:
        for k in range(5):
            feed(bms, float(k), set_frames())
    capped = [e for e in logs if e["event"] == "bms_limit_capped"]
    assert [e["point"] for e in capped] == ["charge_current_limit_a", "discharge_current_limit_a"]


# -- sign convention ----------------------------------------------------------------


def test_current_sign_discharge_negative():
    bms = make_string()
    # 0xFF11 = -239 -> the BMS reports -23.9 A, which is discharge.
    bms.on_frame(0x356, frame_bytes("021311FF4A01"), False, 1.0)
    snap = bms.snapshot(1.5)
    assert snap["battery_current_a"].value == 23.9
    # 23.9 A * 48.66 V / 1000 = 1.162974 kW, positive = discharge.
    assert snap["battery_power_kw"].value == pytest.approx(1.162974, abs=1e-12)
    assert "pack_current_a" not in snap.readings


def test_current_sign_discharge_positive(tmp_path):
    profile = profile_variant(
        tmp_path, 'current_sign = "discharge_negative"', 'current_sign = "discharge_positive"'
    )
    bms = make_string(profile=profile)
    bms.on_frame(0x356, frame_bytes("021311FF4A01"), False, 1.0)
    assert bms.snapshot(1.5)["battery_current_a"].value == -23.9


def test_current_out_of_range():
    bms = make_string()
    # An unsigned decode of FE16 would be 6502.2 A; the signed -49.0 A is in range,
    # but 0x7FFF = 3276.7 A is outside the profile's +-1500 A.
    bms.on_frame(0x356, frame_bytes("0213FF7F4A01"), False, 1.0)
    snap = bms.snapshot(1.5)
    assert snap["battery_current_a"].quality is Quality.OUT_OF_RANGE
    assert snap["battery_current_a"].value is None
    assert snap["battery_power_kw"].value is None


# -- silence and recovery ----------------------------------------------------------


def test_silence_and_recovery_cycle():
    """Frames every second to t=99, silence until t=160, new limits after; stale 5 s, 3 sets."""
    bms = make_string()
    last = feed_sets(bms, 0.0, 100)  # sets at t = 0 .. 99; last frame at 99.04
    assert last == pytest.approx(99.04)

    snap = bms.snapshot(99.5)
    assert snap.state is BmsState.ONLINE
    assert snap.power_allowed
    # 370 A * 48.66 V / 1000 = 18.0042 kW.
    assert snap.power_window_kw() == pytest.approx((18.0042, 18.0042), abs=1e-12)

    # Exactly the stale time after the last frame: still fresh.
    assert bms.snapshot(last + 5.0).state is BmsState.ONLINE

    # Just past it: silent, every value unavailable, alarm raised, no power.
    snap = bms.snapshot(last + 5.001)
    assert snap.state is BmsState.SILENT
    assert not snap.power_allowed
    assert snap.power_window_kw() == (0.0, 0.0)
    assert snap.alarm("bms_silent").severity is Severity.ALARM
    for name, reading in snap.readings.items():
        assert reading.value is None, name
        assert reading.quality is Quality.STALE, name

    # Still silent at t=159.
    assert bms.snapshot(159.0).state is BmsState.SILENT

    # Frames resume at t=160 with new limits: 94 A.
    feed_sets(bms, 160.0, 1, "4502AC0354FCC001")
    snap = bms.snapshot(160.5)
    assert snap.state is BmsState.RECOVERING
    assert snap.alarm("bms_silent") is None
    assert not snap.power_allowed
    assert snap.power_window_kw() == (0.0, 0.0)
    assert snap.consistent_frame_sets == 1
    assert snap["charge_current_limit_a"].value == 94.0

    feed_sets(bms, 161.0, 1, "4502AC0354FCC001")
    assert not bms.snapshot(161.5).power_allowed

    feed_sets(bms, 162.0, 1, "4502AC0354FCC001")
    snap = bms.snapshot(162.5)
    assert snap.state is BmsState.ONLINE
    assert snap.power_allowed
    # The new limits: 94 A * 48.66 V / 1000 = 4.57404 kW.
    assert snap.power_window_kw() == pytest.approx((4.57404, 4.57404), abs=1e-12)


def test_link_down_silences_at_once():
    """A failed CAN link makes the string SILENT at once, not after the 5 s stale time."""
    bms = make_string()
    assert bms.link_down("slcan socket://127.0.0.1:1 is down", 0.0) is None
    assert bms.snapshot(0.0).state is BmsState.WAITING  # nothing received yet: unchanged

    last = feed_sets(bms, 0.0, 5)
    assert bms.snapshot(last + 0.1).power_allowed

    bms.link_down("slcan socket://127.0.0.1:1 is down", last + 0.2)
    snap = bms.snapshot(last + 0.2)
    assert snap.state is BmsState.SILENT
    assert snap.reason == "CAN link down: slcan socket://127.0.0.1:1 is down"
    assert not snap.power_allowed
    assert snap.power_window_kw() == (0.0, 0.0)

    # Back on the link: power again only after three consistent frame sets.
    feed_sets(bms, last + 1.0, 2)
    assert not bms.snapshot(last + 2.5).power_allowed
    feed_sets(bms, last + 3.0, 1)
    assert bms.snapshot(last + 3.5).power_allowed


def test_silence_detected_on_resume():
    """A gap seen only when the next frame arrives still restarts the recovery count."""
    bms = make_string()
    feed_sets(bms, 0.0, 5)
    assert bms.snapshot(4.5).power_allowed
    feed_sets(bms, 60.0, 1)  # no snapshot during the gap
    snap = bms.snapshot(60.5)
    assert snap.state is BmsState.RECOVERING
    assert snap.consistent_frame_sets == 1


def test_recovery_needs_limit_frame():
    bms = make_string()
    feed_sets(bms, 0.0, 5)
    bms.snapshot(20.0)  # silent
    without_limits = set_frames()[1:]
    for k in range(10):
        feed(bms, 30.0 + k, without_limits)
    snap = bms.snapshot(39.5)
    assert snap.state is BmsState.RECOVERING
    assert snap.consistent_frame_sets == 0
    # The limits from before the silence never come back.
    assert snap["charge_current_limit_a"].value is None
    assert snap["charge_current_limit_a"].quality is Quality.STALE
    assert snap.power_window_kw() == (0.0, 0.0)

    feed_sets(bms, 40.0, 3, "4502AC0354FCC001")
    snap = bms.snapshot(42.5)
    assert snap.power_allowed
    assert snap["charge_current_limit_a"].value == 94.0


def test_never_received_goes_silent():
    bms = make_string()
    assert bms.snapshot(4.0).state is BmsState.WAITING
    snap = bms.snapshot(5.5)
    assert snap.state is BmsState.SILENT
    assert snap.alarm("bms_silent") is not None


def test_state_changes_logged_once():
    bms = make_string()
    with capture_logs() as logs:
        last = feed_sets(bms, 0.0, 10)
        for k in range(50):
            bms.snapshot(last + 0.5 * k)  # 25 s of silence, polled twice a second
        feed_sets(bms, 40.0, 4)
        for k in range(10):
            bms.snapshot(43.5 + 0.01 * k)
    states = [e["state"] for e in logs if e["event"] == "bms_state_changed"]
    assert states == ["online", "silent", "recovering", "online"]


def test_set_frame_late_blocks_power():
    bms = make_string()
    feed_sets(bms, 0.0, 5)
    without_limits = set_frames()[1:]
    for k in range(7):
        feed(bms, 5.0 + k, without_limits)
    snap = bms.snapshot(11.5)
    # 0x351 last arrived at t=4.0, more than 5 s before 11.5.
    assert snap.state is BmsState.RECOVERING
    assert "0x351" in snap.reason
    assert snap.charge_limit_kw.quality is Quality.STALE
    assert snap.power_window_kw() == (0.0, 0.0)


# -- consistency ---------------------------------------------------------------------


def test_out_of_range_frame_blocks_power():
    bms = make_string()
    feed_sets(bms, 0.0, 5)
    # 0x020A = 522 -> 5.22 V, outside the profile's 36-64 V.
    bms.on_frame(0x356, frame_bytes("0A0211FFBE000000"), False, 5.0)
    snap = bms.snapshot(5.1)
    assert snap.state is BmsState.RECOVERING
    assert "pack_voltage_v = 5.22" in snap.reason
    assert snap["pack_voltage_v"].quality is Quality.OUT_OF_RANGE
    assert snap.power_window_kw() == (0.0, 0.0)

    # The set that completes at t=6.04 contains the bad frame, so it does not
    # count; the sets completing at 7.04, 8.04 and 9.04 do.
    feed_sets(bms, 6.0, 3)
    assert not bms.snapshot(8.5).power_allowed
    feed_sets(bms, 9.0, 1)
    assert bms.snapshot(9.5).power_allowed


def test_short_frame_inconsistent():
    bms = make_string()
    for k in range(5):
        frames = set_frames()
        frames[0] = (0x351, False, frame_bytes("1402740E740E"))  # DLC 6: no discharge voltage limit
        feed(bms, float(k), frames)
    snap = bms.snapshot(4.5)
    assert snap.state is BmsState.WAITING
    assert "discharge_voltage_limit_v missing" in snap.reason
    assert snap["discharge_voltage_limit_v"].quality is Quality.NOT_IMPLEMENTED


def test_short_frame_optional(tmp_path):
    profile = profile_variant(
        tmp_path, "optional_points = []", 'optional_points = ["discharge_voltage_limit_v"]'
    )
    bms = make_string(profile=profile)
    for k in range(3):
        frames = set_frames()
        frames[0] = (0x351, False, frame_bytes("1402740E740E"))
        feed(bms, float(k), frames)
    assert bms.snapshot(2.5).power_allowed


# -- alarms and enable flags ----------------------------------------------------------


def test_status_alarms_severity():
    bms = make_string()
    frames = set_frames()
    frames[3] = (0x359, False, frame_bytes("82000001 01504E"))
    feed_sets(bms, 0.0, 2)
    feed(bms, 2.0, frames)
    snap = bms.snapshot(2.5)
    assert [(a.name, a.severity) for a in snap.alarms] == [
        ("protection_cell_over_voltage", Severity.PROTECTION),
        ("protection_discharge_over_current", Severity.PROTECTION),
        ("warning_charge_high_current", Severity.WARNING),
    ]
    assert snap.power_allowed
    assert snap.power_window_kw() == (0.0, 0.0)


def test_protection_blocks_one_direction():
    bms = make_string()
    frames = set_frames()
    frames[3] = (0x359, False, frame_bytes("02000000 0A504E"))  # cell over-voltage only
    for k in range(3):
        feed(bms, float(k), frames)
    charge_kw, discharge_kw = bms.snapshot(2.5).power_window_kw()
    assert charge_kw == 0.0
    assert discharge_kw == pytest.approx(18.0042, abs=1e-12)


def test_discharge_disabled_flag():
    bms = make_string()
    frames = set_frames()
    frames[4] = (0x35C, False, frame_bytes("8000"))  # charge enable only
    for k in range(3):
        feed(bms, float(k), frames)
    charge_kw, discharge_kw = bms.snapshot(2.5).power_window_kw()
    assert charge_kw == pytest.approx(18.0042, abs=1e-12)
    assert discharge_kw == 0.0


def test_message_adapter_filters():
    bms = make_string()
    standard = {"is_extended_id": False}
    bms.on_message(can.Message(arbitration_id=0x351, is_remote_frame=True, dlc=8, **standard), 1.0)
    bms.on_message(can.Message(arbitration_id=0x40, is_error_frame=True, **standard), 1.0)
    bms.on_message(can.Message(arbitration_id=0x123, data=b"\x00", **standard), 1.0)
    bms.on_message(can.Message(arbitration_id=0x355, data=frame_bytes("1A006400"), **standard), 1.0)
    snap = bms.snapshot(1.5)
    assert snap.frames_received == 1
    assert snap.frames_unknown == 1
    assert snap["soc_pct"].value == 26


# -- configuration and profiles --------------------------------------------------------


def test_from_site_config():
    site = load_config(EXAMPLE_CONFIG)
    config = BmsStringConfig.from_site(site.device("bms-1"), site.safety)
    assert config.effective_stale_s == 5.0
    assert config.max_current_a == 1000.0
    assert config.recovery_frame_sets == 3
    assert config.profile.current_sign == -1


def test_from_site_needs_ceiling():
    site = load_config(EXAMPLE_CONFIG)
    device = site.device("bms-1").model_copy(update={"max_current_a": None})
    with pytest.raises(ValueError, match="without max_current_a"):
        BmsStringConfig.from_site(device, site.safety)


def test_profile_without_limit_frame(tmp_path):
    with pytest.raises(ProfileError, match="frame_set must contain one of limit_frames"):
        profile_variant(tmp_path, "frame_set = [0x351, 0x355,", "frame_set = [0x355,")


def test_profile_unknown_frame(tmp_path):
    with pytest.raises(ProfileError, match=r"frame ids \['0x999'\] are unknown"):
        profile_variant(tmp_path, "0x35C]", "0x35C, 0x999]")


def test_profile_bad_range(tmp_path):
    with pytest.raises(ProfileError, match=r"ranges\.soc_pct: min 100\.0 must be below max 0\.0"):
        profile_variant(tmp_path, "soc_pct = [0, 100]", "soc_pct = [100, 0]")


def test_profile_not_found():
    with pytest.raises(ProfileError, match="built-in BMS profiles: bms-pylontech"):
        load_bms_profile("bms-nonexistent")


def test_dbc_profile_string(tmp_path):
    profile = profile_variant(tmp_path, 'decoder = "builtin"', 'decoder = "dbc"')
    bms = make_string(profile=profile)
    feed_sets(bms, 0.0, 3, "4502AC0354FCC001")
    snap = bms.snapshot(2.5)
    assert snap.power_allowed
    assert snap["discharge_current_limit_a"].value == pytest.approx(94.0)
    assert snap["manufacturer_name"].quality is Quality.STALE
    assert snap.power_window_kw() == pytest.approx((4.57404, 4.57404), abs=1e-12)

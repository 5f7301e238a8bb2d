"""Device profiles: the built-in ones load, and every broken rule is rejected clearly."""

from __future__ import annotations

import pytest

from drivers.modbus.profile import ProfileError, builtin_profiles, load_profile

BUILTIN = ["generic-example", "meter-3ph", "pcs-sunspec", "pdu-rack"]


def test_builtin_names():
    assert builtin_profiles() == BUILTIN


@pytest.mark.parametrize("name", BUILTIN)
def test_builtin_loads(name):
    profile = load_profile(name)
    assert profile.name == name
    assert profile.points
    assert profile.source
    assert 1 <= profile.max_block_regs <= 125


def test_meter_exposes_power_and_energy():
    profile = load_profile("meter-3ph")
    p_kw = profile.point(profile.meter["power_point"])
    assert (p_kw.address, p_kw.vendor_address, p_kw.function, p_kw.type) == (
        52,
        30053,
        "input",
        "f32",
    )
    assert p_kw.scale == 0.001
    assert p_kw.unit == "kW"
    assert profile.point(profile.meter["energy_import_point"]).address == 72
    assert profile.point(profile.meter["energy_export_point"]).address == 74


def test_pdu_exposes_phases():
    profile = load_profile("pdu-rack")
    names = {p.name for p in profile.points}
    assert {"p_kw", "e_kwh", "i_l1_a", "i_l2_a", "i_l3_a", "v_l1_v", "v_l2_v", "v_l3_v"} <= names


def test_pcs_table_names_points():
    profile = load_profile("pcs-sunspec")
    pcs = profile.pcs
    setpoint = profile.point(pcs["setpoint_point"])
    assert setpoint.writable
    assert setpoint.scale_factor == "WSet_SF"
    assert pcs["setpoint_sign"] == 1
    for key in (
        "enable_point",
        "heartbeat_point",
        "revert_timer_point",
        "limit_revert_timer_point",
        "active_power_point",
        "status_point",
        "rated_power_point",
    ):
        assert profile.point(pcs[key]), key
    assert profile.point(pcs["enable_point"]).name == "Conn"
    assert profile.point(pcs["limit_revert_timer_point"]).name == "WMaxLimPct_RvrtTms"


def test_pcs_sunspec_model_chain():
    """Model headers chain from 40002 to the end marker: id, length, next = here + 2 + length."""
    profile = load_profile("pcs-sunspec")
    by_address = {p.address: p for p in profile.points}
    assert by_address[40000].default == "SunS"
    address, model_ids = 40002, []
    while by_address[address].default != 0xFFFF:
        model_ids.append(by_address[address].default)
        address += 2 + by_address[address + 1].default
    assert model_ids == [1, 103, 120, 123, 124, 64900]
    assert address == 40212


# -- validation -------------------------------------------------------------


def write(tmp_path, points, extra=""):
    """Write a profile whose [[points]] are the given TOML snippets."""
    body = '[profile]\nname = "test"\n' + extra + "\n"
    body += "".join(f"[[points]]\n{p}\n\n" for p in points)
    path = tmp_path / "test.toml"
    path.write_text(body, encoding="utf-8")
    return path


def problems_of(path):
    with pytest.raises(ProfileError) as caught:
        load_profile(path)
    assert str(path) in str(caught.value)
    return "\n".join(caught.value.problems)


U16_A = 'name = "a"\naddress = 0\ntype = "u16"'


def test_overlap_rejected(tmp_path):
    path = write(
        tmp_path,
        ['name = "p"\naddress = 10\ntype = "f32"', 'name = "q"\naddress = 11\ntype = "u16"'],
    )
    assert "point 'q' at holding 11 overlaps 'p' (f32 at 10..11)" in problems_of(path)


def test_same_address_other_function_allowed(tmp_path):
    path = write(tmp_path, [U16_A, 'name = "b"\naddress = 0\nfunction = "input"\ntype = "u16"'])
    assert len(load_profile(path).points) == 2


def test_duplicate_address_rejected(tmp_path):
    path = write(tmp_path, [U16_A, 'name = "b"\naddress = 0\ntype = "i16"'])
    assert "point 'b': duplicate holding address 0, also used by 'a'" in problems_of(path)


def test_duplicate_name_rejected(tmp_path):
    path = write(tmp_path, [U16_A, 'name = "a"\naddress = 1\ntype = "u16"'])
    assert "point 'a': duplicate name" in problems_of(path)


def test_count_mismatch_rejected(tmp_path):
    path = write(tmp_path, ['name = "p"\naddress = 0\ntype = "f32"\ncount = 4'])
    assert "count = 4 does not match type 'f32', which uses 2 register(s)" in problems_of(path)


def test_string_needs_length(tmp_path):
    path = write(tmp_path, ['name = "s"\naddress = 0\ntype = "str"'])
    assert "type 'str' needs a length in registers" in problems_of(path)


def test_string_count_matches_length(tmp_path):
    path = write(tmp_path, ['name = "s"\naddress = 0\ntype = "str"\nlength = 8\ncount = 4'])
    assert "count = 4 does not match type 'str', which uses 8 register(s)" in problems_of(path)


def test_unknown_point_key_rejected(tmp_path):
    path = write(tmp_path, [U16_A + "\nscal = 0.1"])
    assert "point 'a': unknown key 'scal'" in problems_of(path)


def test_unknown_profile_key_rejected(tmp_path):
    path = write(tmp_path, [U16_A], extra="max_gap = 3")
    assert "[profile]: unknown key 'max_gap'" in problems_of(path)


def test_unknown_table_rejected(tmp_path):
    path = write(tmp_path, [U16_A])
    path.write_text(path.read_text() + "[bms]\nx = 1\n")
    assert "unknown top-level table or key 'bms'" in problems_of(path)


def test_scale_factor_missing_rejected(tmp_path):
    path = write(tmp_path, ['name = "W"\naddress = 0\ntype = "i16"\nscale_factor = "W_SF"'])
    assert "point 'W': scale_factor 'W_SF' names no point" in problems_of(path)


def test_scale_factor_not_i16_rejected(tmp_path):
    path = write(
        tmp_path,
        [
            'name = "W"\naddress = 0\ntype = "i16"\nscale_factor = "W_SF"',
            'name = "W_SF"\naddress = 1\ntype = "u16"',
        ],
    )
    assert (
        "scale_factor point 'W_SF' is 'u16', but a SunSpec scale factor is an i16"
        in problems_of(path)
    )


def test_scale_factor_other_function_rejected(tmp_path):
    path = write(
        tmp_path,
        [
            'name = "W"\naddress = 0\ntype = "i16"\nscale_factor = "W_SF"',
            'name = "W_SF"\naddress = 1\nfunction = "input"\ntype = "i16"',
        ],
    )
    assert "must be read in the same request" in problems_of(path)


def test_scale_factor_too_far_rejected(tmp_path):
    path = write(
        tmp_path,
        [
            'name = "W"\naddress = 0\ntype = "i16"\nscale_factor = "W_SF"',
            'name = "W_SF"\naddress = 300\ntype = "i16"',
        ],
    )
    assert "span 301 registers, more than one read of max_block_regs = 125" in problems_of(path)


def test_scale_and_factor_rejected(tmp_path):
    path = write(
        tmp_path,
        [
            'name = "W"\naddress = 0\ntype = "i16"\nscale = 0.1\nscale_factor = "W_SF"',
            'name = "W_SF"\naddress = 1\ntype = "i16"',
        ],
    )
    assert "give either scale or scale_factor, not both" in problems_of(path)


def test_bad_values_rejected(tmp_path):
    path = write(
        tmp_path,
        [
            'name = "a"\naddress = 70000\ntype = "u16"',
            'name = "b"\naddress = 1\ntype = "float"',
            'name = "c"\naddress = 2\ntype = "u32"\norder = "BACD"',
            'name = "d"\naddress = 4\ntype = "u16"\nfunction = "coil"',
            'name = "e f"\naddress = 5\ntype = "u16"',
            'name = "g"\naddress = 6\ntype = "u16"\nmin = 5.0\nmax = 1.0',
            'name = "h"\naddress = 7\ntype = "u16"\nscale = 0',
            'name = "i"\naddress = 8\ntype = "u16"\nfunction = "input"\nwritable = true',
            'name = "j"\naddress = 9\ntype = "u16"\ndefault = "x"',
        ],
    )
    problems = problems_of(path)
    assert "point 'a': address 70000 must be a 0-based wire address 0..65535" in problems
    assert "point 'b': type 'float' is invalid" in problems
    assert "point 'c': order 'BACD' is invalid" in problems
    assert "point 'd': function 'coil' is invalid" in problems
    assert "point 'e f': name 'e f' must be an identifier" in problems
    assert "point 'g': min 5.0 is above max 1.0" in problems
    assert "point 'h': scale 0 must be a non-zero number" in problems
    assert "point 'i': input registers are read-only" in problems
    assert "point 'j': default 'x' must be a finite number for type 'u16'" in problems


def test_block_limit_rejected(tmp_path):
    path = write(tmp_path, [U16_A], extra="max_block_regs = 126\nmax_gap_regs = -1")
    problems = problems_of(path)
    assert "max_block_regs 126 must be an integer 1..125" in problems
    assert "max_gap_regs -1 must be an integer >= 0" in problems


def test_role_point_must_exist(tmp_path):
    path = write(tmp_path, [U16_A])
    path.write_text(path.read_text() + '[pcs]\nsetpoint_point = "WSet"\nsetpoint_sign = 1\n')
    assert "[pcs] setpoint_point = 'WSet': no point of that name" in problems_of(path)


def test_all_problems_listed(tmp_path):
    path = write(
        tmp_path, ['name = "a"\naddress = 0\ntype = "x"', 'name = "b"\naddress = 0\ntype = "y"']
    )
    with pytest.raises(ProfileError) as caught:
        load_profile(path)
    assert len(caught.value.problems) == 2
    assert "2 profile error(s)" in str(caught.value)


def test_missing_file_rejected(tmp_path):
    with pytest.raises(ProfileError, match="cannot read the file"):
        load_profile(tmp_path / "absent.toml")


def test_invalid_toml_rejected(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[profile\nname = 1\n")
    with pytest.raises(ProfileError, match="invalid TOML"):
        load_profile(path)


def test_unknown_builtin_rejected():
    with pytest.raises(
        ProfileError, match="no built-in profile 'meter-9ph': use one of generic-example"
    ):
        load_profile("meter-9ph")


def test_profile_error_is_value_error():
    with pytest.raises(ValueError):  # noqa: PT011 - checks the builtin base only
        load_profile("meter-9ph")

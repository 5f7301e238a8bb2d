"""Local API server and client over a real Unix socket."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat

import pytest

from gateway.cli import main
from gateway.cli.run_cmd import _fault_line
from gateway.service import api as api_module
from gateway.service.api import ApiClient, ApiError, ApiRejectedError, ApiServer


async def _status(params, peer_uid):
    return {"state": "running", "peer_uid": peer_uid}


async def _set_cap(params, peer_uid):
    return {"cap_kw": params.cap_kw, "expires_in_s": params.expires_in_s}


async def _set_mode(params, peer_uid):
    if params.mode == "manual" and params.manual_kw is None:
        raise ApiRejectedError("manual mode needs manual_kw")
    return {"mode": params.mode}


async def _broken(params, peer_uid):
    raise RuntimeError("boom")


HANDLERS = {
    "status": _status,
    "set_cap": _set_cap,
    "set_mode": _set_mode,
    "reset_faults": _broken,
}


@pytest.fixture
async def server(tmp_path):
    srv = ApiServer(tmp_path / "run" / "api.sock", HANDLERS)
    await srv.start()
    yield srv
    await srv.stop()


async def _raw(path, *lines: bytes) -> list[dict]:
    reader, writer = await asyncio.open_unix_connection(str(path))
    out = []
    try:
        for line in lines:
            writer.write(line)
            await writer.drain()
            out.append(json.loads(await asyncio.wait_for(reader.readline(), 5)))
    finally:
        writer.close()
        await writer.wait_closed()
    return out


async def test_api_status_roundtrip(server):
    client = ApiClient(server.path)
    result = await asyncio.to_thread(client.call, "status")
    assert result == {"state": "running", "peer_uid": os.getuid()}


async def test_api_socket_mode(server):
    mode = stat.S_IMODE(os.stat(server.path).st_mode)
    assert mode == 0o660


async def test_api_socket_group(tmp_path, monkeypatch):
    """The socket's group is set to the ``bessgw`` group's gid when the group exists."""
    monkeypatch.setattr(api_module, "socket_group_id", lambda: 54321)
    srv = ApiServer(tmp_path / "api.sock", HANDLERS)
    await srv.start()
    try:
        assert os.stat(srv.path).st_gid == 54321
    finally:
        await srv.stop()


async def test_api_stop_removes_socket(tmp_path):
    srv = ApiServer(tmp_path / "api.sock", HANDLERS)
    await srv.start()
    await srv.stop()
    assert not srv.path.exists()


async def test_api_bad_requests(server):
    """Each malformed request gets its own error code, and the connection stays usable."""
    replies = await _raw(
        server.path,
        b"this is not json\n",
        b"[1, 2]\n",
        b'{"id": 1}\n',
        b'{"id": 2, "method": "launch"}\n',
        b'{"id": 3, "method": "status", "extra": true}\n',
        b'{"id": 4, "method": "set_cap", "params": [900]}\n',
        b'{"id": 5, "method": "status"}\n',
    )
    codes = [r["error"]["code"] if not r["ok"] else "ok" for r in replies]
    assert codes == [
        "parse_error",
        "invalid_request",
        "invalid_request",
        "unknown_method",
        "invalid_request",
        "invalid_params",
        "ok",
    ]
    assert replies[3]["id"] == 2
    assert "launch" in replies[3]["error"]["message"]


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"cap_kw": -5, "expires_in_s": 60}, "cap_kw"),
        ({"cap_kw": 900, "expires_in_s": 0}, "expires_in_s"),
        ({"cap_kw": 900, "expires_in_s": 8 * 86400}, "expires_in_s"),
        ({"cap_kw": 900}, "expires_in_s"),
        ({"cap_kw": 900, "expires_in_s": 60, "colour": "red"}, "colour"),
        ({"cap_kw": "NaN", "expires_in_s": 60}, "cap_kw"),
    ],
)
async def test_api_cap_params_invalid(server, params, field):
    request = json.dumps({"id": 9, "method": "set_cap", "params": params}).encode() + b"\n"
    (reply,) = await _raw(server.path, request)
    assert reply["ok"] is False
    assert reply["error"]["code"] == "invalid_params"
    assert field in reply["error"]["message"]


async def test_api_cap_valid(server):
    client = ApiClient(server.path)
    result = await asyncio.to_thread(client.call, "set_cap", cap_kw=900, expires_in_s=3600)
    assert result == {"cap_kw": 900.0, "expires_in_s": 3600.0}


async def test_api_rejected_and_internal(server):
    client = ApiClient(server.path)
    with pytest.raises(ApiError) as rejected:
        await asyncio.to_thread(client.call, "set_mode", mode="manual")
    assert rejected.value.code == "rejected"
    assert "manual_kw" in rejected.value.message
    with pytest.raises(ApiError) as broken:
        await asyncio.to_thread(client.call, "reset_faults", operator="alice")
    assert broken.value.code == "internal_error"
    assert "boom" in broken.value.message


async def test_api_line_too_long(server):
    """A request line over the limit gets an error and the connection is closed."""
    reader, writer = await asyncio.open_unix_connection(str(server.path))
    try:
        writer.write(b"x" * (api_module.MAX_LINE_BYTES + 10) + b"\n")
        await writer.drain()
        reply = json.loads(await asyncio.wait_for(reader.readline(), 5))
        assert reply["error"]["code"] == "invalid_request"
        assert await asyncio.wait_for(reader.read(), 5) == b""
    finally:
        writer.close()


async def test_api_stale_socket_replaced(tmp_path):
    path = tmp_path / "api.sock"
    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    leftover.bind(str(path))
    leftover.close()  # the file stays with no listener, like a crashed daemon's socket
    srv = ApiServer(path, HANDLERS)
    await srv.start()
    try:
        result = await asyncio.to_thread(ApiClient(path).call, "status")
        assert result["state"] == "running"
    finally:
        await srv.stop()


async def test_api_second_server_refused(server):
    other = ApiServer(server.path, HANDLERS)
    with pytest.raises(OSError, match="another process is serving"):
        await other.start()


def test_api_client_no_socket(tmp_path):
    with pytest.raises(ConnectionError, match="not found"):
        ApiClient(tmp_path / "missing.sock").call("status")


def test_api_unknown_handler_name(tmp_path):
    with pytest.raises(ValueError, match="unknown API methods"):
        ApiServer(tmp_path / "a.sock", {"selfdestruct": _status})


# -- the client commands ---------------------------------------------------------


def test_cli_status_no_daemon(tmp_path, capsys):
    """`bessgw status` without a daemon exits 1 and names the socket it tried."""
    code = main(["status", "--socket", str(tmp_path / "none.sock")])
    assert code == 1
    err = capsys.readouterr().err
    assert "none.sock not found" in err


def test_cli_status_bad_config(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[site]\nname = 'x'\n")
    assert main(["status", "--config", str(bad)]) == 2
    assert "cannot take the API socket" in capsys.readouterr().err


def test_cli_run_bad_config(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("not toml [")
    assert main(["run", "--config", str(bad), "--log-format", "console"]) == 2
    assert "not valid TOML" in capsys.readouterr().err


async def test_cli_commands_roundtrip(server, capsys):
    """The operator commands send the right requests and print the results."""
    calls = []

    async def record(name):
        async def handler(params, peer_uid):
            calls.append((name, params.model_dump()))
            return {
                "mode": "manual",
                "manual_kw": 50.0,
                "event_id": 7,
                "cap_kw": 900.0,
                "expires_utc": 1_800_000_000.0,
                "cleared": True,
                "requested": True,
                "active_before": [],
            }

        return handler

    for name in ("set_mode", "set_cap", "clear_cap", "reset_faults"):
        server.handlers[name] = await record(name)
    socket_args = ["--socket", str(server.path), "--operator", "bob"]
    assert await asyncio.to_thread(main, ["mode", "manual", "--kw", "50", *socket_args]) == 0
    assert await asyncio.to_thread(main, ["cap", "set", "900", "--for", "60", *socket_args]) == 0
    assert await asyncio.to_thread(main, ["cap", "clear", *socket_args]) == 0
    assert await asyncio.to_thread(main, ["fault", "reset", *socket_args]) == 0
    assert calls == [
        ("set_mode", {"mode": "manual", "manual_kw": 50.0, "operator": "bob"}),
        ("set_cap", {"cap_kw": 900.0, "expires_in_s": 60.0, "operator": "bob"}),
        ("clear_cap", {"operator": "bob"}),
        ("reset_faults", {"operator": "bob"}),
    ]
    out = capsys.readouterr().out
    assert "mode manual at 50 kW (event #7)" in out
    assert "grid cap 900 kW until 2027-01-15" in out


async def test_cli_rejected_exit_code(server, capsys):
    """An action the daemon refuses exits 1 and prints the reason."""
    code = await asyncio.to_thread(main, ["mode", "manual", "--socket", str(server.path)])
    assert code == 1
    assert "rejected" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("source", "cleared", "latched", "reset", "expected"),
    [
        ("site", None, True, None, "cause present"),
        ("site", 101.0, True, None, "cleared, waiting for reset"),
        ("site", 101.0, False, None, "cleared"),
        ("pcs-1", None, True, None, "latched until reset"),
        ("pcs-1", 101.0, True, 101.0, "reset"),
    ],
)
def test_fault_line_states(source, cleared, latched, reset, expected):
    fault = {
        "id": 4,
        "raised_utc": 100.0,
        "code": "pcs_lost",
        "source": source,
        "cleared_utc": cleared,
        "latched": latched,
        "reset_utc": reset,
    }
    assert _fault_line(fault) == f"#4 1970-01-01 00:01:40Z pcs_lost on {source}: {expected}"

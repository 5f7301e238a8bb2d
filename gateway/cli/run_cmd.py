"""``bessgw run`` (the daemon) and the operator commands that talk to it over the local API.

``bessgw status``, ``bessgw fault reset``, ``bessgw mode`` and ``bessgw cap``
connect to the daemon's Unix socket. The socket path comes from
``--socket``, else from ``service.api_socket`` of ``--config FILE``, else of
/etc/bessgw/bessgw.toml when it exists, else the built-in default.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import getpass
import json
import sys
import threading
from pathlib import Path
from typing import Any

from gateway.cli import EXIT_IO, EXIT_OK, EXIT_USAGE, CliError
from gateway.config import DEFAULT_CONFIG_PATH, ConfigError, Service, load_config
from gateway.logs import LOG_LEVELS, configure_logging
from gateway.service.api import ApiClient, ApiError
from gateway.service.store import StoreError
from gateway.site_check import load_site_config

#: Stack size of the daemon's Python threads (executor, CAN readers, store, HTTP metrics).
#: 1 MiB covers the deepest of them (pydantic validation, json) with room to spare.
THREAD_STACK_BYTES = 1024 * 1024


def register(subparsers: argparse._SubParsersAction) -> None:
    run = subparsers.add_parser(
        "run",
        help="run the gateway daemon (under systemd: Type=notify, SIGTERM ramps the PCS to 0)",
    )
    run.add_argument(
        "--config",
        default=str(DEFAULT_CONFIG_PATH),
        metavar="FILE",
        help=f"site configuration (default {DEFAULT_CONFIG_PATH})",
    )
    run.add_argument("--log-level", choices=LOG_LEVELS, default="info", help="default info")
    run.add_argument(
        "--log-format",
        choices=("auto", "json", "console"),
        default="auto",
        help="auto: JSON under systemd, readable lines in a terminal",
    )
    run.set_defaults(func=run_daemon)

    status = subparsers.add_parser("status", help="print the running daemon's state")
    _client_options(status)
    status.add_argument("--json", action="store_true", help="print the raw status object")
    status.set_defaults(func=run_status)

    fault = subparsers.add_parser("fault", help="operator fault handling")
    fault_actions = fault.add_subparsers(dest="action", metavar="ACTION", required=True)
    reset = fault_actions.add_parser(
        "reset", help="reset latched faults whose cause has cleared (operator reset)"
    )
    _client_options(reset)
    reset.set_defaults(func=run_fault_reset)
    faults_list = fault_actions.add_parser("list", help="list recent faults from the store")
    _client_options(faults_list)
    faults_list.add_argument("--active", action="store_true", help="only faults still active")
    faults_list.set_defaults(func=run_fault_list)

    mode = subparsers.add_parser("mode", help="set the operating mode")
    mode.add_argument("mode", choices=("auto", "manual", "standby"))
    mode.add_argument(
        "--kw",
        type=float,
        default=None,
        help="manual mode: total PCS power in kW, + discharge, - charge",
    )
    _client_options(mode)
    mode.set_defaults(func=run_mode)

    cap = subparsers.add_parser("cap", help="override the grid import cap for a while")
    cap_actions = cap.add_subparsers(dest="action", metavar="ACTION", required=True)
    cap_set = cap_actions.add_parser("set", help="set a cap override that expires")
    cap_set.add_argument("cap_kw", type=float, metavar="KW", help="grid import cap in kW")
    cap_set.add_argument(
        "--for",
        dest="for_s",
        type=float,
        required=True,
        metavar="SECONDS",
        help="the override expires after this many seconds",
    )
    _client_options(cap_set)
    cap_set.set_defaults(func=run_cap_set)
    cap_clear = cap_actions.add_parser("clear", help="end the cap override now")
    _client_options(cap_clear)
    cap_clear.set_defaults(func=run_cap_clear)


def _client_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--socket", metavar="PATH", help="the daemon's API socket")
    parser.add_argument("--config", metavar="FILE", help="take the API socket path from this file")
    parser.add_argument(
        "--operator",
        default=None,
        metavar="NAME",
        help="name recorded with the action (default: your login name)",
    )
    parser.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS", help="default 5")


# -- the daemon --------------------------------------------------------------


def run_daemon(args: argparse.Namespace) -> int:
    configure_logging(args.log_level, args.log_format)
    try:
        config = load_site_config(args.config, missing_hint="pass the site file with --config FILE")
    except ConfigError as err:
        print(f"{err.path}: {len(err.problems)} error(s)", file=sys.stderr)
        for problem in err.problems:
            print(f"  {problem}", file=sys.stderr)
        return EXIT_USAGE
    from gateway.daemon import Daemon  # noqa: PLC0415 - keeps the client commands light

    # Every thread's stack is resident once the fast loop locks the memory (mlockall with
    # MCL_FUTURE). glibc's default is the stack rlimit, 8 MiB here, so tens of MiB for nothing.
    threading.stack_size(THREAD_STACK_BYTES)

    try:
        daemon = Daemon(config, args.config)
    except (ConfigError, ValueError) as err:
        raise CliError(f"cannot start with {args.config}: {err}", EXIT_USAGE) from err
    except OSError as err:
        raise CliError(f"cannot start: {err}", EXIT_IO) from err
    try:
        return asyncio.run(daemon.run())
    except StoreError as err:
        raise CliError(str(err), EXIT_IO) from err


# -- client commands -----------------------------------------------------------


def _socket_path(args: argparse.Namespace) -> Path:
    if args.socket:
        return Path(args.socket)
    path = args.config or (str(DEFAULT_CONFIG_PATH) if DEFAULT_CONFIG_PATH.exists() else None)
    if path is None:
        return Path(Service().api_socket)
    try:
        hint = "pass an existing file with --config FILE, or the socket with --socket PATH"
        return Path(load_config(path, missing_hint=hint).service.api_socket)
    except ConfigError as err:
        raise CliError(
            f"cannot take the API socket from {path}: " + "; ".join(err.problems), EXIT_USAGE
        ) from err


def _call(args: argparse.Namespace, method: str, **params: Any) -> dict[str, Any]:
    client = ApiClient(_socket_path(args), timeout_s=args.timeout)
    try:
        return client.call(method, **params)
    except ApiError as err:
        code = EXIT_USAGE if err.code in ("invalid_params", "unknown_method") else EXIT_IO
        raise CliError(f"the daemon returned error {err.code}: {err.message}", code) from err
    except (ConnectionError, TimeoutError) as err:
        raise CliError(str(err), EXIT_IO) from err


def _operator(args: argparse.Namespace) -> str:
    if args.operator:
        return args.operator
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def run_status(args: argparse.Namespace) -> int:
    status = _call(args, "status")
    if args.json:
        print(json.dumps(status, indent=2))
        return EXIT_OK
    print(format_status(status))
    return EXIT_OK


def format_status(status: dict[str, Any]) -> str:
    """Render a status object as a short, fixed-width report."""
    lines = [
        f"site {status['site']}: {status['state']}, mode {status['mode']}"
        + (f" {status['manual_kw']:g} kW" if status.get("manual_kw") is not None else "")
        + ("" if status["ready"] else " (not ready)"),
    ]
    cap = status.get("cap_kw")
    override = status.get("cap_override")
    cap_text = "none" if cap is None else f"{cap:g} kW"
    if override:
        cap_text += f" (override by {override['operator']}, {override['remaining_s']:g} s left)"
    lines.append(f"grid cap: {cap_text}")
    planner = status.get("planner")
    if planner is not None:
        lines.append(f"planner: {_planner_line(planner, status.get('headroom_kw'))}")

    loop = status["loop"]
    lines.append(
        f"fast loop: {'healthy' if loop['healthy'] else 'NOT HEALTHY'}, {loop['ticks']} ticks, "
        f"{loop['missed']} missed, max lateness {loop['max_late_us']:g} us"
    )
    for name, pcs in status["pcs"].items():
        state = "enabled" if pcs["enabled"] else "disabled"
        lines.append(f"  {name:<16} command {pcs['command_kw']:>9.1f} kW  {state}")
    for name, device in status["devices"].items():
        age = "never" if device["age_s"] is None else f"{device['age_s']:.1f} s ago"
        up = "up" if device["up"] else "DOWN"
        error = (
            f"  last error: {device['last_error']}"
            if not device["up"] and device["last_error"]
            else ""
        )
        lines.append(f"  {name:<16} {device['role']:<16} {up:<5} last good read {age}{error}")

    faults = status.get("faults_active") or []
    lines.append(f"active faults: {len(faults)}")
    lines.extend(f"  {_fault_line(f)}" for f in faults)
    return "\n".join(lines)


def _planner_line(planner: dict[str, Any], headroom_kw: float | None) -> str:
    if planner["error"]:
        failed = f"FAILING ({planner['failures_in_row']} periods): {planner['error']}; "
    else:
        failed = ""
    if planner["cap_kw"] is None:
        return failed + "no plan yet"
    low, high = planner["soc_band_pct"]
    headroom = "unknown" if headroom_kw is None else f"{headroom_kw:g} kW"
    return (
        f"{failed}cap {planner['cap_kw']:g} kW, SoC band {low:g}-{high:g} %, "
        f"headroom {headroom}: {planner['reason']}"
    )


def _fault_line(fault: dict[str, Any]) -> str:
    raised = dt.datetime.fromtimestamp(fault["raised_utc"], dt.timezone.utc).strftime(
        "%Y-%m-%d %H:%M:%SZ"
    )
    if fault["cleared_utc"] is None and fault["source"] not in (None, "site"):
        # The fast loop latches a unit's fault bits and does not track whether the cause
        # persists. Such a fault therefore clears at the reset.
        state = "latched until reset"
    elif fault["cleared_utc"] is None:
        state = "cause present"
    elif fault["latched"] and fault["reset_utc"] is None:
        state = "cleared, waiting for reset"
    else:
        state = "reset" if fault["reset_utc"] else "cleared"
    return f"#{fault['id']} {raised} {fault['code']} on {fault['source']}: {state}"


def run_fault_reset(args: argparse.Namespace) -> int:
    result = _call(args, "reset_faults", operator=_operator(args))
    before = result.get("active_before") or []
    print(f"reset requested; {len(before)} fault(s) were active:")
    for fault in before:
        print(f"  {_fault_line(fault)}")
    print("run `bessgw status` to see which cleared; a fault whose cause is present stays.")
    return EXIT_OK


def run_fault_list(args: argparse.Namespace) -> int:
    result = _call(args, "faults", active_only=args.active)
    faults = result["faults"]
    if not faults:
        print("no faults")
    for fault in faults:
        print(_fault_line(fault))
    return EXIT_OK


def run_mode(args: argparse.Namespace) -> int:
    params: dict[str, Any] = {"mode": args.mode, "operator": _operator(args)}
    if args.kw is not None:
        params["manual_kw"] = args.kw
    result = _call(args, "set_mode", **params)
    extra = f" at {result['manual_kw']:g} kW" if result.get("manual_kw") is not None else ""
    print(f"mode {result['mode']}{extra} (event #{result['event_id']})")
    return EXIT_OK


def run_cap_set(args: argparse.Namespace) -> int:
    result = _call(
        args, "set_cap", cap_kw=args.cap_kw, expires_in_s=args.for_s, operator=_operator(args)
    )
    until = dt.datetime.fromtimestamp(result["expires_utc"], dt.timezone.utc)
    event = result["event_id"]
    print(f"grid cap {result['cap_kw']:g} kW until {until:%Y-%m-%d %H:%M:%SZ} (event #{event})")
    return EXIT_OK


def run_cap_clear(args: argparse.Namespace) -> int:
    result = _call(args, "clear_cap", operator=_operator(args))
    if not result["cleared"]:
        print(f"no cap override was set; the cap is {result['cap_kw']:g} kW")
    else:
        event = result["event_id"]
        print(f"cap override cleared; the cap is {result['cap_kw']:g} kW (event #{event})")
    return EXIT_OK

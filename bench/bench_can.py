"""Benchmark the CAN BMS decoders against a plain cantools decode of the same frames.

Decodes one recorded set of BMS frames, single-threaded, in four ways:

* ``builtin``: :func:`drivers.can.pylontech.decode_frame`, the decoder the
  ``bms-pylontech`` profile uses;
* ``dbc``: :class:`drivers.can.dbc.DbcDecoder` with the profile's signal
  mapping (cantools underneath, plus renaming, rounding and flags);
* ``cantools``: plain ``db.decode_message(frame_id, data, allow_truncated=True)``
  on ``drivers/can/pylontech.dbc``, the baseline;
* ``bms_string``: :meth:`drivers.can.bms.BmsString.on_frame`, the whole
  per-frame path of the gateway (decode, sign, limits, frame-set counting).

It prints frames per second for each, best of ``--repeats`` runs, and the
ratio of each to the cantools baseline, then exits 1 if the built-in decoder
is below ``--min-fps``.

The frames come from a python-can log file given with ``--frames FILE``, in
any format ``can.LogReader`` reads, such as one written by ``bessgw can dump
--log``. By default they come from a synthetic recording instead. It has one
Pylontech frame set a second (0x351, 0x355, 0x356, 0x359, 0x35C, 0x35E) over
``--seconds`` seconds, with SoC, current, temperature and limits changing from
second to second. Every tenth second adds the frames reported from the field,
short DLCs included.

Usage: ``.venv/bin/python bench/bench_can.py --seconds 10000 --repeats 5``
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import can  # noqa: E402
import cantools  # noqa: E402
import structlog  # noqa: E402

from drivers.can.bms import BmsString, BmsStringConfig  # noqa: E402
from drivers.can.profile import load_bms_profile  # noqa: E402
from drivers.can.pylontech import decode_frame, encode_frame  # noqa: E402

Frame = tuple[int, bool, bytes]

FIELD_CASE_FRAMES: list[Frame] = [
    (0x351, False, bytes.fromhex("1402740E740ECC01")),
    (0x351, False, bytes.fromhex("4502AC0354FCC001")),
    (0x351, False, bytes.fromhex("440264009CFF3F02")),
    (0x355, False, bytes.fromhex("1A006400")),
    (0x356, False, bytes.fromhex("021300004A01")),
    (0x356, False, bytes.fromhex("0A0211FFBE000000")),
    (0x359, False, bytes.fromhex("000000000A504E")),
    (0x359, False, bytes.fromhex("8200000101504E")),
    (0x35C, False, bytes.fromhex("C000")),
    (0x35E, False, bytes.fromhex("50594C4F4E202020")),
    (0x35E, False, bytes.fromhex("5059544553")),
    (0x4220, True, bytes.fromhex("A410200D2A763674")),
]


def synthetic_recording(seconds: int) -> list[Frame]:
    """Build one frame set a second with changing values, plus the field-case frames."""
    frames: list[Frame] = []
    for t in range(seconds):
        current_a = 120.0 * math.sin(t / 30.0)
        limit_a = 370.0 - (t % 50)
        frames += [
            (
                0x351,
                False,
                encode_frame(
                    0x351,
                    {
                        "charge_voltage_limit_v": 53.2,
                        "charge_current_limit_a": limit_a,
                        "discharge_current_limit_a": -limit_a if t % 2 else limit_a,
                        "discharge_voltage_limit_v": 46.0,
                    },
                ),
            ),
            (0x355, False, encode_frame(0x355, {"soc_pct": 20 + t % 70, "soh_pct": 100})),
            (
                0x356,
                False,
                encode_frame(
                    0x356,
                    {
                        "pack_voltage_v": 48.0 + (t % 300) / 100.0,
                        "pack_current_a": round(current_a, 1),
                        "pack_temperature_c": 25.0 + (t % 100) / 10.0,
                    },
                ),
            ),
            (
                0x359,
                False,
                encode_frame(0x359, {"module_count": 10}) if t % 7 else FIELD_CASE_FRAMES[7][2],
            ),
            (0x35C, False, bytes.fromhex("C000")),
            (0x35E, False, b"PYLON   "),
        ]
        if t % 10 == 0:
            frames += FIELD_CASE_FRAMES
    return frames


def recorded_frames(path: Path) -> list[Frame]:
    return [
        (m.arbitration_id, m.is_extended_id, bytes(m.data))
        for m in can.LogReader(path)
        if not (m.is_error_frame or m.is_remote_frame)
    ]


def best_rate(run: Callable[[], None], frame_count: int, repeats: int) -> float:
    """Return frames per second of the fastest of ``repeats`` runs of ``run``."""
    best_s = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best_s = min(best_s, time.perf_counter() - start)
    return frame_count / best_s


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=Path, help="python-can log file to decode instead")
    parser.add_argument(
        "--seconds", type=int, default=10_000, help="length of the synthetic recording"
    )
    parser.add_argument("--repeats", type=int, default=5, help="runs per decoder; the best counts")
    parser.add_argument(
        "--min-fps", type=float, default=50_000, help="exit 1 below this built-in rate"
    )
    args = parser.parse_args(argv)

    frames = recorded_frames(args.frames) if args.frames else synthetic_recording(args.seconds)
    profile = load_bms_profile("bms-pylontech")
    dbc_decoder = profile.dbc_decoder()
    database = cantools.database.load_file(str(ROOT / "drivers" / "can" / "pylontech.dbc"))
    known = {m.frame_id for m in database.messages}
    frames = [f for f in frames if f[0] in known]

    def run_builtin() -> None:
        for frame_id, extended, data in frames:
            decode_frame(frame_id, data, extended)

    def run_dbc() -> None:
        decode = dbc_decoder.decode
        for frame_id, extended, data in frames:
            decode(frame_id, data, extended)

    def run_cantools() -> None:
        decode = database.decode_message
        for frame_id, _, data in frames:
            decode(frame_id, data, allow_truncated=True)

    def run_bms_string() -> None:
        config = BmsStringConfig("bench", profile, max_current_a=1000.0, stale_s=5.0)
        bms = BmsString(config, t_start_mono_s=0.0)
        for index, (frame_id, extended, data) in enumerate(frames):
            bms.on_frame(frame_id, data, extended, index * 0.15)

    # The synthetic recording makes BmsString change state every 10 s on
    # purpose; its log lines would flood the output and time the terminal.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {0})  # one core, like the gateway's reader thread

    print(
        f"{len(frames)} frames, best of {args.repeats}; Python {platform.python_version()}, "
        f"cantools {cantools.__version__}, {platform.machine()}, {os.cpu_count()} CPUs, "
        "pinned to CPU 0"
    )
    rates = {
        "cantools": best_rate(run_cantools, len(frames), args.repeats),
        "builtin": best_rate(run_builtin, len(frames), args.repeats),
        "dbc": best_rate(run_dbc, len(frames), args.repeats),
        "bms_string": best_rate(run_bms_string, len(frames), args.repeats),
    }
    baseline = rates["cantools"]
    for name, rate in rates.items():
        print(f"  {name:<11} {rate:>12,.0f} frames/s   {rate / baseline:5.2f} x cantools")
    if rates["builtin"] < args.min_fps:
        print(f"built-in decoder below {args.min_fps:,.0f} frames/s", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Daemon figures: time to READY=1, resident memory in steady state, memory growth over a soak.

It starts the same small plant as the daemon tests (``tests/daemon_rig.py``):
a meter and a PCS as Modbus TCP simulators on 127.0.0.1 and a BMS as slcan
lines on a pseudo-terminal. It runs ``bessgw run`` as a child process with a
``NOTIFY_SOCKET`` that it reads, and measures:

* READY time: from spawning the process to the ``READY=1`` message, for a
  site with the BMS and for the same site without it. A BMS string is
  online after three complete frame sets (about 2 s at one set a second),
  so the gap between the two is mostly that wait. The slcan open delay is
  0 here, as on any pseudo-terminal or ``socket://`` URL; a serial adapter
  adds python-can's 2 s (``slcan_open_delay_s``);
* resident memory (``VmRSS`` from ``/proc/PID/status``) once a second over
  the soak, which starts ``--settle-s`` after READY; steady state is the
  median of the first minute (or of the whole soak when shorter);
* growth: the least-squares slope of RSS over the soak in MiB per hour,
  and the difference between the mean of the last and the first tenth.

Usage: ``.venv/bin/python bench/bench_daemon.py --soak-s 1800 [--json]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from daemon_rig import DaemonRig


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status")


async def time_to_ready(with_bms: bool) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        rig = DaemonRig(Path(tmp), with_bms=with_bms)
        await rig.start_plant()
        rig.write_config()
        try:
            await rig.start_daemon()
            ready_s = await rig.wait_notify("READY=1", 60)
            await rig.signal(signal.SIGTERM)
            code = await rig.wait_exit(60)
            if code != 0:
                raise RuntimeError(f"daemon exited {code}:\n{rig.log_tail()}")
            return ready_s
        finally:
            await rig.close()


async def soak(soak_s: float, settle_s: float, lock_memory: bool) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        rig = DaemonRig(Path(tmp))
        await rig.start_plant()
        rig.write_config()
        if lock_memory:
            # The site default; the test rig turns it off.
            text = rig.config_path.read_text()
            rig.config_path.write_text(text.replace("lock_memory = false", "lock_memory = true"))
        try:
            await rig.start_daemon()
            await rig.wait_notify("STATUS=running", 60)
            await asyncio.sleep(settle_s)
            assert rig.proc is not None
            pid = rig.proc.pid
            t0 = time.monotonic()
            samples: list[tuple[float, int]] = []
            while time.monotonic() - t0 < soak_s:
                samples.append((time.monotonic() - t0, rss_kib(pid)))
                rig.read_notify()
                await asyncio.sleep(1.0)
            state = rig.notify_log[-1][1] if rig.notify_log else ""
            await rig.signal(signal.SIGTERM)
            code = await rig.wait_exit(60)
        finally:
            await rig.close()
    t = np.array([s[0] for s in samples])
    rss_mib = np.array([s[1] for s in samples]) / 1024
    first_minute = rss_mib[t < 60] if np.any(t < 60) else rss_mib
    tenth = max(1, len(rss_mib) // 10)
    slope_mib_per_s = float(np.polyfit(t, rss_mib, 1)[0]) if len(t) > 1 else 0.0
    return {
        "soak_s": round(float(t[-1]), 1),
        "samples": len(samples),
        "rss_steady_mib": round(statistics.median(first_minute.tolist()), 1),
        "rss_max_mib": round(float(rss_mib.max()), 1),
        "growth_mib_per_hour": round(slope_mib_per_s * 3600, 2),
        "growth_last_minus_first_tenth_mib": round(
            float(rss_mib[-tenth:].mean() - rss_mib[:tenth].mean()), 2
        ),
        "exit_code": code,
        "last_notify": state,
        "lock_memory": lock_memory,
    }


async def main_async(args: argparse.Namespace) -> dict[str, object]:
    ready_bms = [await time_to_ready(True) for _ in range(args.repeats)]
    ready_no_bms = [await time_to_ready(False) for _ in range(args.repeats)]
    return {
        "ready_s_with_bms": [round(x, 3) for x in ready_bms],
        "ready_s_without_bms": [round(x, 3) for x in ready_no_bms],
        **await soak(args.soak_s, args.settle_s, args.lock_memory),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--soak-s", type=float, default=1800.0, help="soak length in s (default 1800)"
    )
    parser.add_argument(
        "--settle-s", type=float, default=10.0, help="wait after READY before sampling (default 10)"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="READY measurements per site (default 3)"
    )
    parser.add_argument(
        "--lock-memory",
        action="store_true",
        help="soak with control.lock_memory = true, the site default (mlockall)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    result = asyncio.run(main_async(args))
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"READY with BMS (slcan on a pty):       {result['ready_s_with_bms']} s")
    print(f"READY without BMS:                     {result['ready_s_without_bms']} s")
    print(f"RSS steady state: {result['rss_steady_mib']} MiB, max {result['rss_max_mib']} MiB")
    print(
        f"growth over {result['soak_s']} s: {result['growth_mib_per_hour']} MiB/h (slope), "
        f"{result['growth_last_minus_first_tenth_mib']} MiB (last tenth - first tenth)"
    )
    print(f"daemon exit code {result['exit_code']}; last notify: {result['last_notify']!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

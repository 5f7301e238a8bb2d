"""Benchmark the Modbus engine against a plain pymodbus client loop doing the same reads.

Starts N simulated meters (drivers.modbus.server.RegisterServer, 50 points
each, one TCP port per meter) on 127.0.0.1 in a separate process, then polls
them from this process as fast as they respond, twice per round:

* ``engine``: one ModbusLink and one ModbusDevice per meter; every poll
  reads the planned block and decodes the 50 points into Readings;
* ``pymodbus``: one AsyncModbusTcpClient per meter; every poll reads the
  same block and decodes the 50 points with ``convert_from_registers`` and
  the same scales.

It prints decoded points per second (wall clock) and CPU seconds of this
process per 10,000 points, side by side, and the engine/pymodbus ratios.
When the machine has two or more CPUs, this process is pinned to CPU 0 and
the server process to CPU 1, so the client figures are for one core.

The meter profile is built here: 40 float32 values (half of them scaled
to kilo units) and 10 int16 values at 0.1, 90 input registers in one read,
the shape of a three-phase meter's measurement block.

Usage: ``.venv/bin/python bench/bench_modbus.py --meters 4 --seconds 5``
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import statistics
import sys
import time
from dataclasses import dataclass

import structlog
from pymodbus.client import AsyncModbusTcpClient

from drivers.modbus.device import ModbusDevice
from drivers.modbus.link import ModbusLink
from drivers.modbus.profile import Profile, parse_profile
from drivers.modbus.server import RegisterServer

UNIT = 1
POINTS = 50


def bench_profile() -> Profile:
    """Build the 50-point meter profile (40 f32 and 10 i16, input registers 0..89)."""
    points = []
    for index in range(40):
        point = {"name": f"f{index:02d}", "address": 2 * index, "function": "input", "type": "f32"}
        if index % 2:
            point["scale"] = 0.001
        points.append(point)
    for index in range(10):
        address = 80 + index
        points.append(
            {"name": f"i{index:02d}", "address": address, "function": "input", "type": "i16"}
            | {"scale": 0.1}
        )
    header = {"name": "bench-meter-50", "max_gap_regs": 0, "max_block_regs": 125}
    return parse_profile({"profile": header, "points": points})


def quiet_logs() -> None:
    """Drop log events below ERROR, so that logging costs nothing in the measured loops."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))


# ----------------------------------------------------------------------------- server process


def serve(meters: int, lifetime_s: float, ports_out, stop_event, cpu: int | None) -> None:
    """Run ``meters`` simulators on 127.0.0.1 until ``stop_event`` is set or ``lifetime_s`` ends."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    quiet_logs()

    async def main() -> None:
        profile = bench_profile()
        servers = []
        ports = []
        for meter in range(meters):
            server = RegisterServer(profile, unit_id=UNIT)
            for index, point in enumerate(profile.points):
                server.set_point(point.name, 100.0 + meter + index)
            ports.append(await server.start_tcp("127.0.0.1", 0))
            servers.append(server)
        ports_out.send(ports)
        deadline_mono_s = time.monotonic() + lifetime_s
        while not stop_event.is_set() and time.monotonic() < deadline_mono_s:  # noqa: ASYNC110
            await asyncio.sleep(0.1)  # a multiprocessing.Event has no awaitable wait
        for server in servers:
            await server.stop()

    asyncio.run(main())


# ----------------------------------------------------------------------------- clients


@dataclass
class Result:
    name: str
    points: int
    wall_s: float
    cpu_s: float

    @property
    def points_per_s(self) -> float:
        return self.points / self.wall_s

    @property
    def cpu_s_per_10k(self) -> float:
        return self.cpu_s / self.points * 10_000 if self.points else float("inf")


async def run_engine(ports: list[int], seconds: float) -> Result:
    profile = bench_profile()
    links = [ModbusLink.tcp("127.0.0.1", port, timeout_s=2.0) for port in ports]
    for link in links:
        await link.start()
    for link in links:
        await link.wait_connected(5.0)
    devices = [
        ModbusDevice(f"meter{i}", profile, link, UNIT, poll_period_s=1.0, timeout_s=2.0)
        for i, link in enumerate(links)
    ]
    for device in devices:  # warm-up: connect and check that every point decodes
        readings = await device.poll_once()
        bad = [name for name, reading in readings.items() if not reading.good]
        if bad:
            raise RuntimeError(f"{device.name}: points not GOOD after the first poll: {bad}")

    counts = [0] * len(devices)

    async def poll(index: int, device: ModbusDevice, deadline_mono_s: float) -> None:
        while time.monotonic() < deadline_mono_s:
            readings = await device.poll_once()
            counts[index] += sum(1 for reading in readings.values() if reading.good)

    result = await measure("engine", seconds, counts, poll, devices)
    for link in links:
        await link.close()
    return result


async def run_pymodbus(ports: list[int], seconds: float) -> Result:
    profile = bench_profile()
    datatype = AsyncModbusTcpClient.DATATYPE
    types = {"f32": datatype.FLOAT32, "i16": datatype.INT16}
    layout = [(p.address, p.count, types[p.type], p.scale) for p in profile.points]
    clients = [AsyncModbusTcpClient("127.0.0.1", port=port, timeout=2.0) for port in ports]
    for client in clients:
        if not await client.connect():
            raise RuntimeError(f"pymodbus client cannot connect to {client.comm_params.host}")
    counts = [0] * len(clients)

    async def poll(index: int, client: AsyncModbusTcpClient, deadline_mono_s: float) -> None:
        while time.monotonic() < deadline_mono_s:
            response = await client.read_input_registers(0, count=90, device_id=UNIT)
            if response.isError():
                raise RuntimeError(f"pymodbus read failed: {response}")
            registers = response.registers
            values = []
            for address, count, data_type, scale in layout:
                value = client.convert_from_registers(
                    registers[address : address + count], data_type
                )
                values.append(value * scale if scale is not None else value)
            counts[index] += len(values)

    result = await measure("pymodbus", seconds, counts, poll, clients)
    for client in clients:
        client.close()
    return result


async def measure(name: str, seconds: float, counts: list[int], poll, targets: list) -> Result:
    """Run ``poll(index, target, deadline)`` for every target at once for ``seconds``."""
    cpu_start_s = time.process_time()
    wall_start_s = time.monotonic()
    deadline_mono_s = wall_start_s + seconds
    await asyncio.gather(*(poll(i, target, deadline_mono_s) for i, target in enumerate(targets)))
    wall_s = time.monotonic() - wall_start_s
    cpu_s = time.process_time() - cpu_start_s
    return Result(name, sum(counts), wall_s, cpu_s)


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--meters", type=int, default=4, help="simulated meters (default 4)")
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each run, s")
    parser.add_argument("--rounds", type=int, default=2, help="engine/pymodbus pairs (default 2)")
    args = parser.parse_args(argv)
    if args.meters < 1 or args.seconds <= 0 or args.rounds < 1:
        parser.error("--meters and --rounds must be at least 1 and --seconds positive")

    quiet_logs()
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    client_cpu, server_cpu = (cpus[0], cpus[1]) if len(cpus) >= 2 else (None, None)

    context = multiprocessing.get_context("spawn")
    ports_in, ports_out = context.Pipe(duplex=False)
    stop_event = context.Event()
    lifetime_s = 2 * args.rounds * (args.seconds + 10) + 30
    server = context.Process(
        target=serve,
        args=(args.meters, lifetime_s, ports_out, stop_event, server_cpu),
        daemon=True,
    )
    server.start()
    try:
        if not ports_in.poll(30):
            raise RuntimeError("the simulator process did not report its ports within 30 s")
        ports = ports_in.recv()
        if client_cpu is not None:
            os.sched_setaffinity(0, {client_cpu})
        results: dict[str, list[Result]] = {"engine": [], "pymodbus": []}
        for _ in range(args.rounds):
            results["engine"].append(asyncio.run(run_engine(ports, args.seconds)))
            results["pymodbus"].append(asyncio.run(run_pymodbus(ports, args.seconds)))
    finally:
        stop_event.set()
        server.join(10)
        if server.is_alive():
            server.terminate()
            server.join(5)

    pinned = "not pinned"
    if client_cpu is not None:
        pinned = f"client on CPU {client_cpu}, server on CPU {server_cpu}"
    print(
        f"meters={args.meters} points/meter={POINTS} seconds/run={args.seconds} "
        f"rounds={args.rounds} ({pinned}); python {sys.version.split()[0]}"
    )
    print(f"{'client':15} {'points/s':>10} {'CPU s/10k pts':>14} {'points':>9}")
    medians = {}
    for name, runs in results.items():
        for run in runs:
            print(f"{name:15} {run.points_per_s:10.0f} {run.cpu_s_per_10k:14.4f} {run.points:9d}")
        medians[name] = (
            statistics.median(run.points_per_s for run in runs),
            statistics.median(run.cpu_s_per_10k for run in runs),
        )
    for name, (points_per_s, cpu_s_per_10k) in medians.items():
        print(f"{name + ' median':15} {points_per_s:10.0f} {cpu_s_per_10k:14.4f}")
    engine, plain = medians["engine"], medians["pymodbus"]
    print(
        f"median engine/pymodbus: points/s x{engine[0] / plain[0]:.2f}, "
        f"CPU per point x{engine[1] / plain[1]:.2f} (below 1 is cheaper)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

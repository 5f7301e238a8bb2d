"""``bessgw bench loop``: argument checks, cyclictest parsing and a short real run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gateway.cli import main
from gateway.control import bench

# Trimmed `cyclictest -q -h5` output: 10 samples at 1 us, 988 at 2 us, one at
# 4 us, and one beyond the 5 us histogram at 812 us.
CYCLICTEST_OUTPUT = """\
# /dev/cpu_dma_latency set to 0us
# Histogram
000000 000000
000001 000010
000002 000988
000003 000000
000004 000001
# Total: 000000999
# Min Latencies: 00001
# Avg Latencies: 00002
# Max Latencies: 00812
# Histogram Overflows: 00001
"""


def test_cyclictest_histogram_parsed():
    # 1000 samples: the 500th and 990th are 2 us and the 999th is the one at
    # 4 us. The overflow sample counts at the 812 us maximum. With a 3 us
    # interval the 4 us and the overflow sample are missed deadlines.
    stats = bench.parse_cyclictest_histogram(CYCLICTEST_OUTPUT, interval_us=3)
    assert stats == {
        "p50_us": 2.0,
        "p99_us": 2.0,
        "p999_us": 4.0,
        "max_us": 812.0,
        "missed": 2,
        "ticks": 1000,
    }


def test_cyclictest_without_histogram_rejected():
    with pytest.raises(ValueError, match="no histogram"):
        bench.parse_cyclictest_histogram("# /dev/cpu_dma_latency set to 0us\n", interval_us=1000)


def test_lateness_stats_values():
    late_ns = np.arange(1, 1001) * 1000  # 1 .. 1000 us
    stats = bench.lateness_stats(late_ns, missed=3)
    assert stats["p50_us"] == pytest.approx(500.5)
    assert stats["max_us"] == 1000.0
    assert stats["missed"] == 3
    assert stats["ticks"] == 1000
    with pytest.raises(ValueError, match="no ticks"):
        bench.lateness_stats(np.array([], np.int64), missed=0)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--seconds", "0"], "--seconds is 0"),
        (["--rate", "50"], "--rate is 50"),
        (["--units", "65"], "--units is 65"),
        (["--priority", "100"], "--priority is 100"),
        (["--spin-us", "1000"], "--spin-us is 1000"),
        (["--cpu", "-1"], "--cpu is -1"),
    ],
)
def test_bench_rejects_bad_arguments(capsys, argv, message):
    assert main(["bench", "loop", *argv]) == 2
    assert message in capsys.readouterr().err


def test_bench_short_run_json(capsys):
    # A 0.3 s run of each loop at normal priority: the JSON has every field
    # the issue names, for both loops, and cyclictest is an object or null.
    argv = ["bench", "loop", "--seconds", "0.3", "--units", "2", "--priority", "0", "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) >= {"c", "python", "cyclictest", "compute_us_per_tick", "units"}
    assert result["units"] == 2
    for name in ("c", "python"):
        assert {"p50_us", "p99_us", "p999_us", "max_us", "missed"} <= set(result[name])
        assert result[name]["ticks"] > 0
    assert result["compute_us_per_tick"] == result["c"]["compute_mean_us"]
    assert result["c"]["granted"]["sched_fifo"] is False
    cyclic = result["cyclictest"]
    assert cyclic is None or {"p50_us", "p99_us", "p999_us", "max_us", "missed"} <= set(cyclic)

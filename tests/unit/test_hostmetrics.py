"""The device's health figures from /proc and statvfs: the parsers against real, fake and
hostile text, the sampler that keeps the daemon running through a broken /proc, the metrics
they feed, and a reading of this machine's own /proc."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from updater.hostmetrics import (
    MAX_COUNTER,
    MAX_INTERFACE_NAME,
    MAX_INTERFACES,
    MAX_PROC_BYTES,
    CpuTimes,
    HostSampler,
    InterfaceTraffic,
    Memory,
    cpu_usage_ratio,
    filesystem_size_bytes,
    interface_label,
    parse_meminfo,
    parse_net_dev,
    parse_proc_stat,
)
from updater.metrics import UpdaterMetrics

STAT = """cpu  100 20 30 800 50 5 5 0 10 0
cpu0 50 10 15 400 25 2 3 0 5 0
intr 12345 0 0
ctxt 999
"""
MEMINFO = """MemTotal:        3884356 kB
MemFree:          123456 kB
MemAvailable:    2000000 kB
Buffers:           10000 kB
"""
NET_DEV = """Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo: 5000      50    0    0    0     0          0         0     5000      50    0    0    0     0       0          0
  eth0: 123456789 1000    0    0    0     0          0         0  987654  900    0    0    0     0       0          0
 wlan0:     10       1    0    0    0     0          0         0       20       2    0    0    0     0       0          0
"""  # noqa: E501 (the kernel's layout)


def net_line(name: str, receive: int = 1, transmit: int = 2) -> str:
    return f"{name}: {receive} 0 0 0 0 0 0 0 {transmit} 0 0 0 0 0 0 0\n"


def proc_tree(root: Path, stat: str = STAT, meminfo: str = MEMINFO, net: str = NET_DEV) -> Path:
    (root / "net").mkdir(parents=True)
    (root / "stat").write_text(stat)
    (root / "meminfo").write_text(meminfo)
    (root / "net" / "dev").write_text(net)
    return root


# --- /proc/stat ------------------------------------------------------------------------------


def test_cpu_times_count_idle_and_iowait_as_not_busy_and_guest_time_once() -> None:
    times = parse_proc_stat(STAT)
    # user nice system idle iowait irq softirq steal; guest (10) is inside user already
    assert times == CpuTimes(busy=100 + 20 + 30 + 5 + 5, total=1010)


def test_an_old_kernel_with_four_cpu_fields_is_read() -> None:
    assert parse_proc_stat("cpu 1 2 3 4\n") == CpuTimes(busy=6, total=10)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "no aggregate cpu line"),
        ("cpu0 1 2 3 4\n", "no aggregate cpu line"),
        ("cpu 1 2 3\n", "3 fields, at least 4 expected"),
        ("cpu 1 2 x 4\n", "'x' is not a counter"),
        ("cpu 1 -2 3 4\n", "'-2' is not a counter"),
        (f"cpu 1 2 3 {2**64}\n", "is above 2^64"),
        ("cpu 1 2 3 " + "9" * 5000 + "\n", "is not a counter"),
    ],
)
def test_a_bad_proc_stat_is_refused_by_name(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match="/proc/stat") as caught:
        parse_proc_stat(text)
    assert problem in str(caught.value)


def test_the_cpu_ratio_is_the_busy_share_between_two_readings() -> None:
    earlier = CpuTimes(busy=100, total=1000)
    assert cpu_usage_ratio(earlier, CpuTimes(busy=175, total=1100)) == 0.75
    assert cpu_usage_ratio(earlier, CpuTimes(busy=100, total=1100)) == 0.0
    assert cpu_usage_ratio(earlier, CpuTimes(busy=200, total=1100)) == 1.0


@pytest.mark.parametrize(
    "later",
    [
        CpuTimes(busy=100, total=1000),  # no time passed
        CpuTimes(busy=10, total=100),  # counters went back: a reboot in between
        CpuTimes(busy=90, total=1100),  # busy went back while the total went on
        CpuTimes(busy=300, total=1100),  # busier than the time that passed
    ],
)
def test_the_cpu_ratio_is_unknown_when_the_readings_do_not_make_sense(later: CpuTimes) -> None:
    assert cpu_usage_ratio(CpuTimes(busy=100, total=1000), later) is None


# --- /proc/meminfo ---------------------------------------------------------------------------


def test_meminfo_total_and_available_in_bytes() -> None:
    assert parse_meminfo(MEMINFO) == Memory(3884356 * 1024, 2000000 * 1024)


def test_a_kernel_without_memavailable_gives_the_total_only() -> None:
    assert parse_meminfo("MemTotal: 1000 kB\nMemFree: 10 kB\n") == Memory(1024000, None)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("MemFree: 10 kB\n", "no MemTotal"),
        ("MemTotal: 1000\n", "is not '<n> kB'"),
        ("MemTotal: 1000 MB\n", "is not '<n> kB'"),
        ("MemTotal: lots kB\n", "is not a counter"),
        (f"MemTotal: {2**62} kB\n", "kB is above 2^64 bytes"),
        ("MemTotal: 10 kB\nMemAvailable: 20 kB\n", "MemAvailable above MemTotal"),
    ],
)
def test_a_bad_meminfo_is_refused_by_name(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match="/proc/meminfo") as caught:
        parse_meminfo(text)
    assert problem in str(caught.value)


# --- /proc/net/dev ---------------------------------------------------------------------------


def test_network_counters_per_interface_without_loopback() -> None:
    assert parse_net_dev(NET_DEV) == {
        "eth0": InterfaceTraffic(123456789, 987654),
        "wlan0": InterfaceTraffic(10, 20),
    }


def test_hostile_interface_names_become_bounded_printable_labels() -> None:
    text = net_line('ev"il\\name{x="1"}\x1b[2J', 5, 6) + net_line("a" * 200, 7, 8)
    traffic = parse_net_dev(text)
    assert traffic == {
        "ev_il_name_x__1": InterfaceTraffic(5, 6),
        "a" * MAX_INTERFACE_NAME: InterfaceTraffic(7, 8),
    }


def test_names_that_come_out_the_same_count_once_and_the_number_is_bounded() -> None:
    text = net_line("eth 0", 1, 1) + net_line("eth\t0", 2, 2)
    assert parse_net_dev(text) == {"eth_0": InterfaceTraffic(1, 1)}
    many = "".join(net_line(f"veth{i}", i, i) for i in range(100))
    traffic = parse_net_dev(many)
    assert list(traffic) == [f"veth{i}" for i in range(MAX_INTERFACES)]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("eth0: 1 2 3\n", "3 fields"),
        ("eth0: x 0 0 0 0 0 0 0 1 0 0 0 0 0 0 0\n", "'x' is not a counter"),
        (f"eth0: 1 0 0 0 0 0 0 0 {2**64} 0 0 0 0 0 0 0\n", "is above 2^64"),
    ],
)
def test_a_bad_net_dev_line_is_refused_by_name(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match="/proc/net/dev 'eth0'") as caught:
        parse_net_dev(text)
    assert problem in str(caught.value)


# --- hostile input ---------------------------------------------------------------------------

COUNTERS = st.integers(min_value=0, max_value=MAX_COUNTER)
HOSTILE = st.one_of(
    st.text(max_size=400),
    st.lists(
        st.one_of(
            st.sampled_from(
                [
                    "cpu",
                    "cpu0",
                    "MemTotal:",
                    "MemAvailable:",
                    "kB",
                    "lo:",
                    "eth0:",
                    ":",
                    "|",
                    "-1",
                    str(2**64),
                    "9" * 30,
                    "\n",
                    " ",
                    "\t",
                ]
            ),
            COUNTERS.map(str),
            st.text(max_size=8),
        ),
        max_size=60,
    ).map(" ".join),
)


@settings(max_examples=300, deadline=None)
@given(HOSTILE)
def test_the_parsers_refuse_garbage_with_a_value_error_only(text: str) -> None:
    for parse in (parse_proc_stat, parse_meminfo, parse_net_dev):
        try:
            result = parse(text)
        except ValueError:
            continue
        if isinstance(result, CpuTimes):
            assert 0 <= result.busy <= result.total
        elif isinstance(result, Memory):
            assert 0 <= result.total <= MAX_COUNTER
            assert result.available is None or result.available <= result.total
        else:
            assert len(result) <= MAX_INTERFACES and "lo" not in result
            for name, traffic in result.items():
                assert 0 < len(name) <= MAX_INTERFACE_NAME and name == interface_label(name)
                assert name.isascii() and name.isprintable()
                assert 0 <= traffic.receive <= MAX_COUNTER and 0 <= traffic.transmit <= MAX_COUNTER


@settings(max_examples=200, deadline=None)
@given(st.lists(COUNTERS, min_size=4, max_size=10), st.lists(COUNTERS, min_size=4, max_size=10))
def test_the_cpu_ratio_is_a_fraction_or_unknown(first: list[int], second: list[int]) -> None:
    def line(ticks: list[int]) -> str:
        return "cpu " + " ".join(map(str, ticks)) + "\n"

    ratio = cpu_usage_ratio(parse_proc_stat(line(first)), parse_proc_stat(line(second)))
    assert ratio is None or 0.0 <= ratio <= 1.0


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=40).filter(lambda n: n.strip() != ""),
                       st.tuples(COUNTERS, COUNTERS), max_size=40))  # fmt: skip
def test_any_interface_names_give_bounded_labels(names: dict[str, tuple[int, int]]) -> None:
    text = "".join(net_line(name, *counts) for name, counts in names.items())
    try:
        traffic = parse_net_dev(text)
    except ValueError:  # a name with a line break or colon splits its line: refused, not misread
        return
    assert len(traffic) <= MAX_INTERFACES
    for name in traffic:
        assert 0 < len(name) <= MAX_INTERFACE_NAME and name.isascii() and name.isprintable()


# --- the sampler -----------------------------------------------------------------------------


def test_the_first_sample_has_no_cpu_ratio_and_the_second_has_one(tmp_path: Path) -> None:
    proc = proc_tree(tmp_path)
    sampler = HostSampler(proc)
    first = sampler.sample()
    assert first.cpu_usage_ratio is None
    assert first.memory == Memory(3884356 * 1024, 2000000 * 1024)
    assert first.network is not None and set(first.network) == {"eth0", "wlan0"}
    (proc / "stat").write_text("cpu  150 20 30 850 50 5 5 0 10 0\n")  # 50 busy of 100
    assert sampler.sample().cpu_usage_ratio == 0.5


def test_an_unreadable_figure_is_unknown_and_reported_once_until_it_reads_again(
    tmp_path: Path,
) -> None:
    proc = proc_tree(tmp_path)
    (proc / "meminfo").write_text("MemFree: 1 kB\n")
    (proc / "net" / "dev").unlink()
    reports: list[tuple[str, str]] = []

    def report(source: str, problem: str) -> None:
        reports.append((source, problem))

    sampler = HostSampler(proc)
    for _ in range(3):
        sample = sampler.sample(report)
        assert sample.memory is None and sample.network is None
    assert [source for source, _ in reports] == ["memory", "network"]
    assert "no MemTotal" in reports[0][1] and "No such file" in reports[1][1]
    (proc / "meminfo").write_text(MEMINFO)
    assert sampler.sample(report).memory is not None
    (proc / "meminfo").write_bytes(b"\xff" * 10)
    assert sampler.sample(report).memory is None
    assert [source for source, _ in reports] == ["memory", "network", "memory"]
    assert "no MemTotal" in reports[-1][1]


def test_an_interface_named_outside_ascii_keeps_every_interfaces_figures(tmp_path: Path) -> None:
    proc = proc_tree(tmp_path)
    counters = " ".join(["7"] * 16)
    with (proc / "net" / "dev").open("ab") as handle:
        handle.write("  wlän0: ".encode() + counters.encode() + b"\n")
    network = HostSampler(proc).sample().network
    assert network is not None
    assert set(network) == {"eth0", "wlan0", "wl__n0"}
    assert network["wl__n0"] == InterfaceTraffic(7, 7)


def test_a_counter_holding_a_byte_outside_ascii_is_refused(tmp_path: Path) -> None:
    proc = proc_tree(tmp_path)
    (proc / "meminfo").write_bytes(b"MemTotal: 12\xc3\xa934 kB\n")
    reports: list[tuple[str, str]] = []
    assert HostSampler(proc).sample(lambda s, p: reports.append((s, p))).memory is None
    assert [source for source, _ in reports] == ["memory"]


def test_a_huge_proc_file_is_refused_not_read_whole(tmp_path: Path) -> None:
    proc = proc_tree(tmp_path, meminfo=MEMINFO + "X" * MAX_PROC_BYTES)
    reports: list[tuple[str, str]] = []
    assert HostSampler(proc).sample(lambda s, p: reports.append((s, p))).memory is None
    assert reports == [("memory", f"{proc / 'meminfo'}: longer than {MAX_PROC_BYTES} bytes")]


def test_a_missing_proc_gives_unknown_figures_and_no_exception(tmp_path: Path) -> None:
    sampler = HostSampler(tmp_path / "no-proc")
    for _ in range(2):
        sample = sampler.sample()
        assert (sample.cpu_usage_ratio, sample.memory, sample.network) == (None, None, None)


# --- the metrics -----------------------------------------------------------------------------


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_the_metrics_show_a_sample_and_unknown_figures_as_nan_or_no_series(
    tmp_path: Path,
) -> None:
    registry = CollectorRegistry()
    metrics = UpdaterMetrics(registry)
    for name in ("cpu_usage_ratio", "memory_total_bytes", "memory_available_bytes"):
        assert math.isnan(value(registry, f"fleet_updater_{name}") or 0.0)
    sampler = HostSampler(proc_tree(tmp_path / "proc"))
    metrics.set_host(sampler.sample())
    (tmp_path / "proc" / "stat").write_text("cpu  150 20 30 850 50 5 5 0 10 0\n")
    metrics.set_host(sampler.sample())
    assert value(registry, "fleet_updater_cpu_usage_ratio") == 0.5
    assert value(registry, "fleet_updater_memory_total_bytes") == 3884356 * 1024
    assert value(registry, "fleet_updater_memory_available_bytes") == 2000000 * 1024
    receive = "fleet_updater_network_receive_bytes_total"
    assert value(registry, receive, interface="eth0") == 123456789
    assert value(registry, "fleet_updater_network_transmit_bytes_total", interface="wlan0") == 20
    assert value(registry, receive, interface="lo") is None
    text = metrics.exposition().decode()
    assert "# TYPE fleet_updater_network_receive_bytes_total counter" in text

    (tmp_path / "proc" / "net" / "dev").unlink()
    (tmp_path / "proc" / "meminfo").unlink()
    metrics.set_host(sampler.sample())
    assert value(registry, receive, interface="eth0") is None
    assert math.isnan(value(registry, "fleet_updater_memory_total_bytes") or 0.0)


def test_disk_size_is_the_filesystem_the_free_space_is_measured_on(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    metrics = UpdaterMetrics(registry)
    stats = os.statvfs(tmp_path)
    size = filesystem_size_bytes(tmp_path)
    assert size == stats.f_blocks * stats.f_frsize > 0
    metrics.set_disk_size(tmp_path, size)
    metrics.set_free_space(tmp_path, stats.f_bavail * stats.f_frsize)
    disk = value(registry, "fleet_updater_disk_size_bytes", path=str(tmp_path))
    free = value(registry, "fleet_updater_free_space_bytes", path=str(tmp_path))
    assert disk is not None and free is not None and 0 <= free <= disk
    with pytest.raises(OSError):
        filesystem_size_bytes(tmp_path / "missing")


# --- this machine ----------------------------------------------------------------------------


@pytest.mark.skipif(not Path("/proc/stat").is_file(), reason="needs Linux /proc")
def test_this_machines_proc_reads_sensibly() -> None:
    sampler = HostSampler()
    first = sampler.sample()
    sum(i * i for i in range(200_000))  # some CPU time between the samples
    second = sampler.sample()
    assert first.cpu_usage_ratio is None
    assert second.cpu_usage_ratio is None or 0.0 <= second.cpu_usage_ratio <= 1.0
    memory = second.memory
    assert memory is not None and memory.available is not None
    assert 64 << 20 <= memory.total <= 1 << 50 and 0 < memory.available <= memory.total
    assert second.network is not None and "lo" not in second.network
    page_size = os.sysconf("SC_PAGE_SIZE")
    assert abs(memory.total - os.sysconf("SC_PHYS_PAGES") * page_size) <= memory.total // 10
    assert filesystem_size_bytes(Path("/")) > 0

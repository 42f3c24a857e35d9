"""scenarios.linkstats from files written here: queue_figures on a synthetic links.csv (leaf classes summed per
sample, the "link" rows ignored, cumulative drop counters, backlog in bytes and real ms), the dequeue.csv round
trip (write_dequeue / read_dequeue) and dequeue_figures adding files up, lossless_drops, and serving_watch's picks."""

from __future__ import annotations

import csv

import pytest

from emulator import dequeue
from scenarios import linkstats
from topologies.cluster import ClusterSpec, Scale, cluster_net

COLUMNS = ["t_s", "link", "link_class", "side", "direction", "tclass", "bytes", "packets", "drops", "backlog_bytes"]


@pytest.fixture(scope="module")
def net():
    # pe1-snic, pe1-cnic0, de1-snic, de1-cnic0 at 400e9 * 1e-4 = 40 Mbit/s; st1-nic at 1.6e12 * 1e-4 = 160 Mbit/s;
    # queues of 10 ms; skbs capped to 3 segments (40e6 / 8 * 1 ms = 5000 B // 1514)
    return cluster_net(ClusterSpec(1, 1, gpus_per_node=1, storage_servers=1), Scale(1e-4))


def write_links(path, rows):
    """rows: (t_s, link, link_class, direction, tclass, drops, backlog_bytes)."""
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for t, link, cls, direction, tclass, drops, backlog in rows:
            side = link[:2]
            w.writerow([t, link, cls, side, direction, tclass, 12345, 67, drops, backlog])
    return path


ROWS = [
    # pe1-snic down: drops 5 -> 9 (4 in the window), backlog 1000, 3000, 2000 (mean 2000, max 3000)
    (0.0, "pe1-snic", "snic", "down", "default", 5, 1000),
    (0.0, "pe1-snic", "snic", "down", "link", 100, 99999),  # the root class: ignored
    (0.1, "pe1-snic", "snic", "down", "default", 7, 3000),
    (0.1, "pe1-snic", "snic", "down", "link", 200, 99999),
    (0.2, "pe1-snic", "snic", "down", "default", 9, 2000),
    # de1-snic down: no drops, backlog 0, 10000, 0 (mean 3333.3, max 10000)
    (0.0, "de1-snic", "snic", "down", "default", 0, 0),
    (0.1, "de1-snic", "snic", "down", "default", 0, 10000),
    (0.2, "de1-snic", "snic", "down", "default", 0, 0),
    # pe1-cnic0 up, two leaves summed per sample: 1000 + 500, 2000 + 0; kv drops 1 -> 3
    (0.0, "pe1-cnic0", "cnic", "up", "collective", 0, 1000),
    (0.0, "pe1-cnic0", "cnic", "up", "kv", 1, 500),
    (0.1, "pe1-cnic0", "cnic", "up", "collective", 0, 2000),
    (0.1, "pe1-cnic0", "cnic", "up", "kv", 3, 0),
    # st1-nic up: one sample of 40000
    (0.0, "st1-nic", "stnic", "up", "default", 0, 40000),
    # de1-cnic0 has only root-class rows: no figures at all
    (0.0, "de1-cnic0", "cnic", "down", "link", 50, 7777),
]


def test_queue_figures(tmp_path, net):
    figs = linkstats.queue_figures(write_links(tmp_path / "links.csv", ROWS), net, 1.0)
    assert set(figs) == {"snic", "cnic", "stnic"}
    assert set(figs["snic"]) == {"down"} and set(figs["cnic"]) == {"up"} and set(figs["stnic"]) == {"up"}
    # 8 bits / 40e6 bit/s = 0.2 us per byte = 2e-4 ms
    assert figs["snic"]["down"] == {
        "links": 2, "drops": 4, "dropped": {"pe1-snic down": 4},
        "backlog_mean_bytes": 2666.7,  # (1000 + 3000 + 2000 + 0 + 10000 + 0) / 6
        "backlog_busiest_mean_bytes": 3333.3,  # de1-snic's mean
        "backlog_max_bytes": 10000,
        "queue_limit_bytes": 50000,  # 40e6 / 8 * 0.01 (more than 4 skbs of 3 x 1514)
        "backlog_mean_ms": 0.533, "backlog_busiest_mean_ms": 0.667, "backlog_max_ms": 2.0,
    }
    assert figs["cnic"]["up"] == {
        "links": 1, "drops": 2, "dropped": {"pe1-cnic0 up": 2},
        "backlog_mean_bytes": 1750.0, "backlog_busiest_mean_bytes": 1750.0, "backlog_max_bytes": 2000,
        "queue_limit_bytes": 50000, "backlog_mean_ms": 0.35, "backlog_busiest_mean_ms": 0.35, "backlog_max_ms": 0.4,
    }
    st = figs["stnic"]["up"]
    assert st["queue_limit_bytes"] == 200000  # 160e6 / 8 * 0.01
    assert st["drops"] == 0 and st["dropped"] == {} and st["links"] == 1
    assert st["backlog_max_ms"] == 2.0  # 40000 B * 8 / 160e6 = 2 ms


def test_queue_figures_real_ms_divide_by_time_scale(tmp_path, net):
    figs = linkstats.queue_figures(write_links(tmp_path / "links.csv", ROWS), net, 2.0)
    # a wall ms is half a real ms at time x2: 10000 B at 40 Mbit/s = 2 wall ms = 1 real ms
    assert figs["snic"]["down"]["backlog_max_ms"] == 1.0
    assert figs["snic"]["down"]["backlog_max_bytes"] == 10000


def test_queue_figures_drops_count_from_the_first_sample(tmp_path, net):
    rows = [(0.0, "pe1-snic", "snic", "up", "default", 40, 0), (0.1, "pe1-snic", "snic", "up", "default", 40, 0)]
    fig = linkstats.queue_figures(write_links(tmp_path / "links.csv", rows), net, 1.0)["snic"]["up"]
    assert fig["drops"] == 0 and fig["dropped"] == {}  # 40 before the window, none in it


def test_dequeue_round_trip(tmp_path):
    errors = {"snic": [-0.3, 0.04, 0.04, 3.0, -0.0001, 500.0], "cnic": [0.5], "stnic": []}
    path = tmp_path / "dequeue.csv"
    linkstats.write_dequeue(path, errors)
    rows = list(csv.DictReader(path.open()))
    assert list(rows[0]) == linkstats.DEQUEUE_COLUMNS
    assert len(rows) == 1 + 5  # cnic: 1 bin; snic: early bins 0 and 50, late bins 33, 70, 101
    assert {"link_class": "snic", "side": "late", "error_lo": "0.0398107", "error_hi": "0.0446684", "gaps": "2"} in rows
    assert {"link_class": "snic", "side": "late", "error_lo": "100", "error_hi": "inf", "gaps": "1"} in rows
    back = linkstats.read_dequeue(path)
    assert back == {"snic": dequeue.histogram(errors["snic"]), "cnic": dequeue.histogram([0.5])}


def test_read_dequeue_missing_file(tmp_path):
    assert linkstats.read_dequeue(tmp_path / "nope.csv") == {}
    assert linkstats.dequeue_figures([tmp_path / "nope.csv"]) == {}


def test_dequeue_figures_add_files(tmp_path):
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    linkstats.write_dequeue(a, {"snic": [-0.3] * 50 + [0.04] * 48, "cnic": [0.5] * 40})
    linkstats.write_dequeue(b, {"snic": [3.0] * 2, "cnic": [0.5] * 60, "stnic": [-0.2] * 3})
    figs = linkstats.dequeue_figures([a, b, tmp_path / "missing.csv"])
    assert list(figs) == ["cnic", "snic", "stnic"]
    # snic as one histogram of 100 gaps: only the two from b are past the 99th percentile
    assert figs["snic"]["gaps"] == 100 and figs["snic"]["late_p99"] == 3.1623 and figs["snic"]["early"] == 0.5
    assert figs["snic"] == dequeue.summarize(dequeue.histogram([-0.3] * 50 + [0.04] * 48 + [3.0] * 2))
    assert figs["cnic"]["gaps"] == 100 and figs["cnic"]["late_p99"] == 0.5012  # 0.5 in [0.4467, 0.5012)
    assert figs["stnic"]["gaps"] == 3 and figs["stnic"]["late_p99"] == 0.0 and figs["stnic"]["early"] == 1.0


def test_lossless_drops():
    modes = {
        "basic": {"links": {"cnic": {"up": {"dropped": {"pe1-cnic0 up": 3}}, "down": {"dropped": {}}},
                            "snic": {"down": {"dropped": {"pe1-snic down": 9}}}}},
        "dualpath": {"links": {"cnic": {"down": {"dropped": {"de1-cnic0 down": 1}}}}},
        "oracle": {},  # a mode without link figures
    }
    assert linkstats.lossless_drops(modes) == {"basic: pe1-cnic0 up": 3, "dualpath: de1-cnic0 down": 1}
    assert linkstats.lossless_drops(modes, ("cnic", "snic")) == {
        "basic: pe1-cnic0 up": 3, "basic: pe1-snic down": 9, "dualpath: de1-cnic0 down": 1}
    assert linkstats.lossless_drops(modes, ("stnic",)) == {}


def test_serving_watch(net):
    got = [(w.dev, w.rate_bps, w.group) for w in linkstats.serving_watch(net)]
    assert got == [
        ("dp-pe1-snic", 40e6, "snic"),  # storage -> prefill node: the switch port's egress
        ("dp-de1-snic", 40e6, "snic"),
        ("dp-pe1-cnic0", 40e6, "cnic"),  # KV arriving at the prefill node
        ("de1-cnic0", 40e6, "cnic"),  # KV the decode node forwards: its own egress
        ("dp-de1-cnic0", 40e6, "cnic"),
        ("st1-nic", 160e6, "stnic"),  # reads leaving storage
    ]


def test_serving_watch_picks_first_hosts_and_rail0():
    net = cluster_net(ClusterSpec(2, 3, gpus_per_node=2, storage_servers=2), Scale(1e-4))
    devs = [w.dev for w in linkstats.serving_watch(net)]
    assert devs == ["dp-pe1-snic", "dp-de1-snic", "dp-pe1-cnic0", "de1-cnic0", "dp-de1-cnic0", "st1-nic"]

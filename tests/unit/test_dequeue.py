"""emulator.dequeue without tracefs: the trace_pipe parser (Timing.feed) fed synthetic net_dev_queue /
net_dev_start_xmit lines, the standing-queue rule (MIN_BACKLOG), MIN_WIRE_BYTES, pause(), stale-entry pruning
(STALE_S), max_segs, wire_bytes, and the histogram / summary (early/late split, late_p99, CCDF, bin edges)."""

from __future__ import annotations

import math

import pytest

from emulator import dequeue
from emulator.dequeue import Timing, Watched

DEV = "dp-st2-nic"
RATE = 80e6  # 80 Mbit/s: a 3000-byte skb takes 300 us, a 3066-byte one 306.6 us


def line(t: float, event: str, dev: str = DEV, skb: str = "00000000796fbb88", length: int = 3000, segs: int = 1,
         toff: int = 34) -> str:
    """One trace_pipe line as the kernel prints it (the timestamp is the token before ': net_dev_')."""
    head = f"           python-3218    [001] bNs..   {t:.6f}: net_dev_"
    if event == "queue":
        return head + f"queue: dev={dev} skbaddr={skb} len={length}"
    assert event == "xmit"
    return head + (f"start_xmit: dev={dev} queue_mapping=0 skbaddr={skb} vlan_tagged=0 vlan_proto=0x0000 "
                   f"vlan_tci=0x0000 protocol=0x0800 ip_summed=2 len={length} data_len=0 network_offset=14 "
                   f"transport_offset_valid=1 transport_offset={toff} tx_flags=0 gso_size=1448 gso_segs={segs} "
                   f"gso_type=0x0")


def timing(*watched: Watched) -> Timing:
    return Timing(list(watched) or [Watched(DEV, RATE, "stnic")])


def feed(tm: Timing, lines: list[str]) -> None:
    for ln in lines:
        tm.feed(ln)


# -- wire bytes ----------------------------------------------------------------------------------------------------

def test_tcp_header_is_32_bytes():
    assert dequeue.TCP_HEADER_BYTES == 32  # 66 per segment less Ethernet 14 + IP 20


def test_wire_bytes():
    assert dequeue.wire_bytes(3000, 34, 2) == 3066  # 3000 + 1 * (34 + 32)
    assert dequeue.wire_bytes(5000, 34, 4) == 5198  # 5000 + 3 * 66
    assert dequeue.wire_bytes(3000, 34, 1) == 3000  # one segment: its length only
    assert dequeue.wire_bytes(3000, 34, 0) == 3000  # gso_segs 0 (not GSO)
    assert dequeue.wire_bytes(3000, 0, 3) == 3000  # no valid transport offset: no extra headers
    assert dequeue.wire_bytes(3000, 54, 2) == 3086  # IPv6: 3000 + (54 + 32)


# -- the parser ----------------------------------------------------------------------------------------------------

def test_feed_parses_timestamp_and_skb_from_example_lines():
    tm = timing()
    tm.feed("           python-3218    [001] bNs..   401.200070: net_dev_queue: dev=dp-st2-nic "
            "skbaddr=00000000796fbb88 len=54")
    port = tm.ports[DEV]
    assert dict(port.queued) == {"00000000796fbb88": 401.200070}
    tm.feed("           python-3218    [001] bNs..   401.200115: net_dev_start_xmit: dev=dp-st2-nic queue_mapping=0 "
            "skbaddr=00000000796fbb88 vlan_tagged=0 vlan_proto=0x0000 vlan_tci=0x0000 protocol=0x0800 ip_summed=2 "
            "len=3000 data_len=0 network_offset=14 transport_offset_valid=1 transport_offset=34 tx_flags=0 "
            "gso_size=1448 gso_segs=2 gso_type=0x0")
    assert not port.queued
    assert port.last == (401.200115, 3066, 0)  # (dequeue time, wire bytes, skbs left queued)
    assert port.max_segs == 2
    assert tm.lines == 2
    assert tm.errors == {"stnic": []}  # the first dequeue has no previous one


def test_feed_ignores_other_lines_and_devices():
    tm = timing()
    tm.feed("# tracer: nop")
    tm.feed("")
    assert tm.lines == 0  # not a net_dev_ line: not counted
    tm.feed(line(1.0, "queue", dev="dp-other-nic", skb="a"))
    tm.feed(line(1.1, "xmit", dev="dp-other-nic", skb="a"))
    assert tm.lines == 2
    assert not tm.ports[DEV].queued and tm.ports[DEV].last is None
    # a start_xmit line with too few fields is skipped, the skb stays queued
    tm.feed(line(2.0, "queue", skb="b"))
    tm.feed(f"   x-1 [000] ....   2.000100: net_dev_start_xmit: dev={DEV} queue_mapping=0 skbaddr=b len=3000")
    assert list(tm.ports[DEV].queued) == ["b"] and tm.ports[DEV].last is None


def test_busy_gaps_errors_and_backlog_rule():
    tm = timing()
    feed(tm, [line(10.0, "queue", skb=s, segs=2) for s in "ABCD"])
    feed(tm, [
        line(10.001000, "xmit", skb="A", segs=2),  # B, C, D left queued (3)
        line(10.001460, "xmit", skb="B", segs=2),  # gap 460 us: 460 / 306.6 - 1 = 0.500326; C, D left (2)
        line(10.001700, "xmit", skb="C", segs=2),  # gap 240 us: 240 / 306.6 - 1 = -0.217221; only D left (1)
        line(10.002000, "xmit", skb="D", segs=2),  # previous left 1 skb queued < MIN_BACKLOG: not counted
    ])
    errs = tm.errors["stnic"]
    assert errs == pytest.approx([460 / 306.6 - 1, 240 / 306.6 - 1], abs=1e-6)
    assert errs[0] == pytest.approx(0.500326, abs=1e-6)
    assert errs[1] == pytest.approx(-0.217221, abs=1e-6)
    assert tm.ports[DEV].last == (10.002, 3066, 0)


def test_gap_at_exactly_twice_ideal_is_error_one():
    tm = timing()
    feed(tm, [line(5.0, "queue", skb=s) for s in "ABC"])
    feed(tm, [line(5.001000, "xmit", skb="A"), line(5.001600, "xmit", skb="B")])  # ideal 3000*8/80e6 = 300 us
    assert tm.errors["stnic"] == pytest.approx([1.0], abs=1e-6)


def test_next_skb_queued_after_previous_left_is_not_a_busy_gap():
    tm = timing()
    feed(tm, [line(20.0, "queue", skb=s) for s in "ABC"])
    feed(tm, [
        line(20.001000, "xmit", skb="A"),  # B, C left queued
        line(20.001200, "queue", skb="D"),
        line(20.001400, "xmit", skb="D"),  # D was queued after A left: not counted, though 2 were waiting
        line(20.001700, "xmit", skb="B"),  # B queued (20.0) before D left, B and C still queued: 300/300 - 1 = 0
    ])
    assert tm.errors["stnic"] == pytest.approx([0.0], abs=1e-6)


def test_unknown_skb_is_not_a_busy_gap():
    tm = timing()
    feed(tm, [line(1.0, "queue", skb=s) for s in "ABC"])
    feed(tm, [line(1.001, "xmit", skb="A"), line(1.0013, "xmit", skb="Z")])  # Z's enqueue was never seen
    assert tm.errors["stnic"] == []
    assert list(tm.ports[DEV].queued) == ["B", "C"]


def test_min_backlog_boundary():
    assert dequeue.MIN_BACKLOG == 2
    tm = timing()
    feed(tm, [line(1.0, "queue", skb=s) for s in "AB"])
    feed(tm, [line(1.001, "xmit", skb="A"), line(1.0013, "xmit", skb="B")])  # only B waited when A left
    assert tm.errors["stnic"] == []
    tm = timing()
    feed(tm, [line(1.0, "queue", skb=s) for s in "ABC"])
    feed(tm, [line(1.001, "xmit", skb="A"), line(1.0013, "xmit", skb="B")])  # B and C waited: counted
    assert tm.errors["stnic"] == pytest.approx([0.0], abs=1e-6)


def test_min_wire_bytes():
    assert dequeue.MIN_WIRE_BYTES == 1000
    tm = timing()
    feed(tm, [line(1.0, "queue", skb=s) for s in "ABC"])
    # A is 999 bytes: too small to set an ideal gap
    feed(tm, [line(1.001, "xmit", skb="A", length=999), line(1.0011, "xmit", skb="B")])
    assert tm.errors["stnic"] == []
    tm = timing()
    feed(tm, [line(1.0, "queue", skb=s) for s in "ABC"])
    # A is 1000 bytes: ideal 1000 * 8 / 80e6 = 100 us; gap 150 us -> 0.5
    feed(tm, [line(1.001, "xmit", skb="A", length=1000), line(1.00115, "xmit", skb="B")])
    assert tm.errors["stnic"] == pytest.approx([0.5], abs=1e-6)
    # what counts is the previous skb's wire bytes: len 934 is too small, but with 2 segments 934 + 66 = 1000
    tm = timing()
    feed(tm, [line(1.0, "queue", skb=s) for s in "ABC"])
    feed(tm, [line(1.001, "xmit", skb="A", length=934, segs=2), line(1.00115, "xmit", skb="B", length=66)])
    assert tm.errors["stnic"] == pytest.approx([0.5], abs=1e-6)


def test_pause_forgets_previous_dequeue_and_queue():
    tm = timing()
    feed(tm, [line(3.0, "queue", skb=s) for s in "ABCD"])
    tm.feed(line(3.001, "xmit", skb="A"))
    tm.pause()
    port = tm.ports[DEV]
    assert port.last is None and not port.queued
    tm.feed(line(3.5, "xmit", skb="B"))  # its gap would span the pause: not counted
    assert tm.errors["stnic"] == []
    assert port.last == (3.5, 3000, 0)
    # counting resumes with skbs queued after the pause
    feed(tm, [line(4.0, "queue", skb=s) for s in "EFG"])
    feed(tm, [line(4.001, "xmit", skb="E"), line(4.0013, "xmit", skb="F")])
    assert tm.errors["stnic"] == pytest.approx([0.0], abs=1e-6)


def test_stale_entries_are_pruned():
    assert dequeue.STALE_S == 1.0
    tm = timing()
    tm.feed(line(1.0, "queue", skb="X"))  # dropped: never dequeued
    feed(tm, [line(2.5, "queue", skb=s) for s in "AB"])
    tm.feed(line(2.501, "xmit", skb="A"))  # X queued 1.501 s before: older than STALE_S, forgotten
    port = tm.ports[DEV]
    assert list(port.queued) == ["B"]
    assert port.last == (2.501, 3000, 1)  # one left, not two: B's gap is not a busy one
    tm.feed(line(2.5013, "xmit", skb="B"))
    assert tm.errors["stnic"] == []


def test_recent_entries_are_not_pruned():
    tm = timing()
    tm.feed(line(1.6, "queue", skb="X"))  # 0.901 s before A leaves: kept (a delay, not a drop)
    feed(tm, [line(2.5, "queue", skb=s) for s in "AB"])
    tm.feed(line(2.501, "xmit", skb="A"))
    assert list(tm.ports[DEV].queued) == ["X", "B"]
    tm.feed(line(2.5013, "xmit", skb="B"))  # X and B waited when A left: counted
    assert tm.errors["stnic"] == pytest.approx([0.0], abs=1e-6)


def test_queue_is_bounded():
    tm = timing()
    feed(tm, [line(1.0 + i * 1e-6, "queue", skb=f"s{i}") for i in range(4097)])
    q = tm.ports[DEV].queued
    assert len(q) == 4096
    assert "s0" not in q and "s1" in q and "s4096" in q


def test_max_segs():
    tm = timing()
    assert tm.ports[DEV].max_segs == 0
    for i, segs in enumerate((1, 3, 2)):
        tm.feed(line(1.0 + i, "queue", skb=f"s{i}"))
        tm.feed(line(1.0001 + i, "xmit", skb=f"s{i}", segs=segs))
    assert tm.ports[DEV].max_segs == 3


def test_groups_pool_their_devices():
    tm = timing(Watched("a-nic", RATE, "snic down"), Watched("b-nic", 40e6, "snic down"),
                Watched("c-nic", RATE, "cnic up"))
    assert tm.errors == {"snic down": [], "cnic up": []}
    for dev, gap in (("a-nic", 0.00045), ("b-nic", 0.0006)):  # ideals 300 us and 600 us
        feed(tm, [line(1.0, "queue", dev=dev, skb=s) for s in "ABC"])
        feed(tm, [line(1.001, "xmit", dev=dev, skb="A"), line(1.001 + gap, "xmit", dev=dev, skb="B")])
    assert tm.errors["snic down"] == pytest.approx([0.5, 0.0], abs=1e-6)
    assert tm.errors["cnic up"] == []


# -- histogram and summary -------------------------------------------------------------------------------------------

def test_bin_edges():
    edges = dequeue.bin_edges()
    assert len(edges) == 1 + 5 * 20 + 1 + 1  # 0, 101 log edges from 1e-3 to 1e2, inf
    assert edges[0] == 0.0 and edges[1] == pytest.approx(1e-3) and edges[-2] == pytest.approx(100.0)
    assert edges[-1] == math.inf
    assert edges[21] == pytest.approx(0.01) and edges[61] == pytest.approx(1.0)
    assert edges[2] / edges[1] == pytest.approx(10 ** 0.05)  # 12% per bin
    assert all(a < b for a, b in zip(edges, edges[1:]))


def test_histogram_bins_early_and_late():
    edges = dequeue.bin_edges()
    h = dequeue.histogram([-0.3, -0.0001, 0.0, 0.04, 3.0, 500.0])
    assert len(h["early"]) == len(h["late"]) == len(edges) - 1 == 102
    # |-0.3|: 1e-3 * 10^(49/20) = 0.2818 <= 0.3 < 0.3162 = 1e-3 * 10^(50/20): bin 50; |-1e-4| < 1e-3: bin 0
    assert {i: c for i, c in enumerate(h["early"]) if c} == {0: 1, 50: 1}
    # 0.0 -> bin 0; 0.04 in [0.03981, 0.04467): bin 33; 3.0 in [2.818, 3.162): bin 70; 500 in [100, inf): bin 101
    assert {i: c for i, c in enumerate(h["late"]) if c} == {0: 1, 33: 1, 70: 1, 101: 1}
    assert edges[50] <= 0.3 < edges[51] and edges[33] <= 0.04 < edges[34] and edges[70] <= 3.0 < edges[71]


def test_summarize_empty():
    assert dequeue.summarize({}) == {"gaps": 0}
    assert dequeue.summarize(dequeue.histogram([])) == {"gaps": 0}


def test_summarize_percentiles_and_ccdf():
    # 50 early at -0.3 (bin 50), 48 late at 0.04 (bin 33), 2 late at 3.0 (bin 70)
    s = dequeue.summarize(dequeue.histogram([-0.3] * 50 + [0.04] * 48 + [3.0] * 2))
    assert s["gaps"] == 100
    assert s["early"] == 0.5
    # late_p99: the 99th of 100 sorted signed errors: 50 early come first, then 49 - 50 reached in bin 70,
    # whose upper edge is 10^0.5 = 3.1623
    assert s["late_p99"] == 3.1623
    # |error| sorted: 48 in bin 33, 50 in bin 50 (cumulative 98), 2 in bin 70
    assert s["abs_p50"] == 0.3162 and s["abs_p90"] == 0.3162  # upper edge of bin 50: 10^-0.5
    assert s["abs_p99"] == 3.1623
    assert s["ccdf"] == {"0.01": 1.0, "0.02": 1.0, "0.05": 0.52, "0.1": 0.52, "0.2": 0.52, "0.5": 0.02, "1": 0.02,
                         "2": 0.02, "5": 0.0, "10": 0.0}
    assert s["late_ccdf"] == {"0.01": 0.5, "0.02": 0.5, "0.05": 0.02, "0.1": 0.02, "0.2": 0.02, "0.5": 0.02,
                              "1": 0.02, "2": 0.02, "5": 0.0, "10": 0.0}


def test_summarize_late_p99_small():
    # 99 early, 1 late: the 99th percentile is still an early gap -> 0
    s = dequeue.summarize(dequeue.histogram([-0.5] * 99 + [5.0]))
    assert s["late_p99"] == 0.0 and s["early"] == 0.99
    # all early -> 0
    assert dequeue.summarize(dequeue.histogram([-0.2] * 10))["late_p99"] == 0.0
    # 2% at 1.5 (bin 64: [1.413, 1.585)): p99 is late, the bin's upper edge 10^0.2 = 1.5849
    s = dequeue.summarize(dequeue.histogram([0.01] * 98 + [1.5] * 2))
    assert s["late_p99"] == 1.5849 and s["early"] == 0.0


def test_summarize_caps_the_last_bin():
    s = dequeue.summarize(dequeue.histogram([500.0]))  # bin [100, inf): reported as 10 x HIST_HI
    assert s["late_p99"] == 1000.0 and s["abs_p50"] == 1000.0
    assert s["ccdf"]["10"] == 1.0 and s["late_ccdf"]["10"] == 1.0


def test_histograms_add_up():
    a, b = dequeue.histogram([-0.3, 0.04]), dequeue.histogram([3.0, 0.04])
    added = {k: [x + y for x, y in zip(a[k], b[k])] for k in a}
    assert added == dequeue.histogram([-0.3, 0.04, 3.0, 0.04])


def test_timing_into_summary():
    tm = timing()
    feed(tm, [line(10.0, "queue", skb=f"s{i}") for i in range(5)])
    # s1 after s0 (4 left queued), s2 after s1 (3), s3 after s2 (2): counted; s4 after s3 (1 left): not
    feed(tm, [line(10.001000, "xmit", skb="s0"),
              line(10.001150, "xmit", skb="s1"),  # 150 / 300 - 1 = -0.5
              line(10.001600, "xmit", skb="s2"),  # 450 / 300 - 1 = 0.5
              line(10.002500, "xmit", skb="s3"),  # 900 / 300 - 1 = 2.0
              line(10.003500, "xmit", skb="s4")])
    assert tm.errors["stnic"] == pytest.approx([-0.5, 0.5, 2.0], abs=1e-6)
    s = dequeue.summarize(dequeue.histogram(tm.errors["stnic"]))
    assert s["gaps"] == 3 and s["early"] == 0.3333
    assert s["late_p99"] == 2.2387  # 2.0 in bin 67 [1.995, 2.239): upper edge 10^0.35

"""emulator.tcplan: the HTB plan of every shaped interface, as data and as tc text.

The golden file golden/tiny_tc.txt is the rendered tc plan of the shipped `tiny`
scenario. Its values were checked by hand (and test_golden_values re-checks them
from the file itself, so a regenerated golden cannot silently drift):

    rates   400Gbit x 0.00025 = 100Mbit (snic, cnic); 600Gbit x 0.00025 = 150Mbit (storage NIC)
    skb     1 ms at the slowest rate of each fabric (100Mbit on both): 12500 B -> 8 segments of 1514 B = 12112 B
    burst   max(rate/8 x 1ms, 2 x skb): 12500 / 18750 -> 24224 bytes
    quantum clamp(rate/8/10, 1600, 200000): 1.25e6 / 1.875e6 -> 200000
    limit   max(rate/8 x 10ms, 4 x skb): 125000 / 187500 bytes (4 x skb = 48448 is less)

To regenerate after an intended change, write "\\n".join(map(render, plan.tc_ops)) + "\\n"
and check the numbers by hand again.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import pytest

from emulator.tcplan import (DEFAULT_CLASS, LINK_CLASS, ROOT_HANDLE, TcOp, apply, describe, handle_str,
                             gso_limits, htb_burst_bytes, htb_quantum_bytes, queue_limit_bytes, render, shape_ops,
                             skb_segs_for)
from emulator.units import parse_rate
from scenarios import schema
from scenarios.plan import make_plan

GOLDEN = Path(__file__).parent / "golden" / "tiny_tc.txt"


@pytest.fixture(scope="module")
def tiny_plan():
    """The one-FIFO-class plan (the golden file); the traffic-class tree is tested below."""
    return make_plan(schema.load("tiny", ["traffic_classes.isolation=false"]))


# -- golden ------------------------------------------------------------------
def test_tiny_tc_plan_matches_golden(tiny_plan):
    rendered = "\n".join(render(op) for op in tiny_plan.tc_ops) + "\n"
    assert rendered == GOLDEN.read_text()


def test_golden_values():
    """The golden file itself holds the hand-checked numbers."""
    lines = GOLDEN.read_text().splitlines()
    assert len(lines) == 56  # 7 links x 2 ends x 4 ops
    for line in lines:
        if " class " in line:
            rate = "150Mbit" if "st1-nic" in line else "100Mbit"
            assert f"htb rate {rate} ceil {rate} burst 24224b cburst 24224b quantum 200000 prio 0" in line
        elif " bfifo " in line:
            assert line.endswith("handle 10: bfifo limit " + ("187500b" if "st1-nic" in line else "125000b"))
        else:
            assert line.endswith("root handle 1: htb default 10 r2q 10")


def test_render_first_op_of_tiny(tiny_plan):
    assert render(tiny_plan.tc_ops[0]) == "tc -n dp-pe1 qdisc add dev pe1-snic root handle 1: htb default 10 r2q 10"


# -- structure ---------------------------------------------------------------
def test_op_count_is_four_per_end(tiny_plan):
    assert len(tiny_plan.tc_ops) == 2 * 4 * len(tiny_plan.net.links)


def test_both_ends_of_every_link_shaped(tiny_plan):
    by_end = defaultdict(list)
    for op in tiny_plan.tc_ops:
        by_end[(op.netns, op.dev)].append(op)
    expected = set()
    for lk in tiny_plan.net.links:
        expected.add((tiny_plan.net.host(lk.host).netns, lk.host_intf))  # host egress ("up")
        expected.add((None, lk.switch_intf))                            # switch-port egress ("down")
    assert set(by_end) == expected
    assert all(len(ops) == 4 for ops in by_end.values())


def test_host_end_in_host_namespace_switch_end_in_root(tiny_plan):
    for op in tiny_plan.tc_ops:
        if op.netns is None:
            assert op.dev.startswith("dp-")
        else:
            assert op.netns == "dp-" + op.dev.split("-")[0]
            assert not op.dev.startswith("dp-")


def test_tree_shape_of_each_end(tiny_plan):
    ops = tiny_plan.tc_ops
    for i in range(0, len(ops), 4):
        root, link_cls, default_cls, fifo = ops[i:i + 4]
        assert len({(o.netns, o.dev) for o in (root, link_cls, default_cls, fifo)}) == 1
        assert (root.op, root.kind, root.handle, root.parent) == ("qdisc", "htb", ROOT_HANDLE, None)
        assert (link_cls.op, link_cls.kind, link_cls.handle, link_cls.parent) == ("class", "htb", LINK_CLASS,
                                                                                  ROOT_HANDLE)
        assert (default_cls.op, default_cls.kind, default_cls.handle, default_cls.parent) == (
            "class", "htb", DEFAULT_CLASS, LINK_CLASS)
        assert (fifo.op, fifo.kind, fifo.parent) == ("qdisc", "bfifo", DEFAULT_CLASS)
        # unclassified traffic goes to 1:10
        assert root.param("default") == DEFAULT_CLASS & 0xFFFF


def test_class_rates_are_the_link_rate(tiny_plan):
    rate_of = {}
    for lk in tiny_plan.net.links:
        rate_of[lk.host_intf] = rate_of[lk.switch_intf] = lk.rate_bps
    for op in tiny_plan.tc_ops:
        if op.op == "class":
            assert op.param("rate_bps") == round(rate_of[op.dev])
            assert op.param("ceil_bps") == op.param("rate_bps")


def test_handles():
    assert handle_str(ROOT_HANDLE) == "1:"
    assert handle_str(LINK_CLASS) == "1:1"
    assert handle_str(DEFAULT_CLASS) == "1:10"
    assert handle_str(0x100000) == "10:"


# -- sizing formulas (hand-computed values) ----------------------------------
@pytest.mark.parametrize("rate_bps, segs, burst", [
    (100e6, None, 130204),  # 12500 B per ms -> floor of two uncapped skbs (43 segments of 1514 B)
    (1e9, None, 130204),    # 125000 < 130204
    (2e9, None, 250000),    # 2e9 / 8 * 1e-3
    (8e9, None, 1000000),
    (20e6, 2, 6056),        # 2500 B per ms < two 2-segment skbs
    (160e6, 16, 48448),     # 20000 < 2 x 24224
])
def test_htb_burst(rate_bps, segs, burst):
    assert htb_burst_bytes(rate_bps, segs) == burst


@pytest.mark.parametrize("rate_bps, skb_s, segs", [
    (20e6, 0.00125, 2),     # 3125 B -> 2 full segments
    (160e6, 0.00125, 16),   # 25000 B -> 16
    (1e6, 0.001, 1),        # never below one segment
    (10e9, 0.001, 43),      # never above the kernel's 64 KiB
])
def test_skb_segs(rate_bps, skb_s, segs):
    assert skb_segs_for(rate_bps, skb_s) == segs


def test_gso_limits_let_the_segment_count_bind():
    size, segs = gso_limits(2)
    assert segs == 2 and size == 2 * 1514 + 512  # TCP reserves ~320 B of gso_max_size for headers
    assert gso_limits(43) == (65536, 43)


@pytest.mark.parametrize("rate_bps, quantum", [
    (100e3, 1600),          # 1250 -> clamped up to MTU + 100
    (1e6, 12500),           # 1e6 / 8 / 10
    (8e6, 100000),
    (16e6, 200000),         # exactly the cap
    (100e6, 200000),        # 1.25e6 -> clamped down
])
def test_htb_quantum(rate_bps, quantum):
    assert htb_quantum_bytes(rate_bps) == quantum


@pytest.mark.parametrize("rate_bps, queue_s, segs, limit", [
    (100e6, 0.010, None, 260408),   # 125000 -> floor of four uncapped skbs
    (1e9, 0.010, None, 1250000),    # 1e9 / 8 * 10ms
    (2e9, 0.050, None, 12500000),
    (1e9, 0.001, None, 260408),
    (20e6, 0.0125, 2, 31250),       # the default SNIC: 12.5 ms (10 ms x time 1.25), 4 x 3028 is less
    (20e6, 0.001, 2, 12112),        # floor of four 2-segment skbs
])
def test_queue_limit(rate_bps, queue_s, segs, limit):
    assert queue_limit_bytes(rate_bps, queue_s, segs) == limit


def test_shape_ops_params_at_2gbit():
    ops = shape_ops("dp-pe1", "pe1-snic", 2e9, 0.010)
    for cls in ops[1:3]:
        assert dict(cls.params) == {"rate_bps": 2_000_000_000, "ceil_bps": 2_000_000_000, "burst_bytes": 250000,
                                    "cburst_bytes": 250000, "quantum_bytes": 200000, "prio": 0}
    assert ops[3].param("limit_bytes") == 2_500_000


def test_render_root_namespace_has_no_netns_flag():
    ops = shape_ops(None, "dp-pe1-snic", 40e6, 0.010)
    assert render(ops[0]) == "tc qdisc add dev dp-pe1-snic root handle 1: htb default 10 r2q 10"
    assert render(ops[1]) == ("tc class add dev dp-pe1-snic parent 1: classid 1:1 htb rate 40Mbit ceil 40Mbit "
                              "burst 130204b cburst 130204b quantum 200000 prio 0")
    assert render(ops[3]) == "tc qdisc add dev dp-pe1-snic parent 1:10 handle 10: bfifo limit 260408b"


def test_render_refuses_unknown_op():
    with pytest.raises(ValueError):
        render(TcOp(None, "x", "filter", "fw", 1, None))


def test_describe_bfifo():
    ops = shape_ops(None, "dp-x", 1e9, 0.010)
    assert describe(ops[3]) == "dp-x: bfifo 1.25MB"
    assert describe(ops[1]) == "dp-x: htb class 1:1"


def test_render_is_parseable_back_to_the_rate(tiny_plan):
    for op in tiny_plan.tc_ops:
        if op.op == "class":
            m = re.search(r" rate (\S+) ", render(op))
            assert parse_rate(m.group(1)) == pytest.approx(op.param("rate_bps"), rel=5e-4)


# -- apply (against a fake netlink socket: no kernel) -------------------------
class FakeIPRoute:
    def __init__(self, links):
        self.links = links
        self.calls = []

    def link_lookup(self, ifname):
        return [self.links[ifname]] if ifname in self.links else []

    def tc(self, *args, **kwargs):
        self.calls.append((args, kwargs))


def test_apply_issues_the_plan_in_order_with_byte_rates():
    ipr = FakeIPRoute({"pe1-snic": 7})
    apply(ipr, shape_ops("dp-pe1", "pe1-snic", 40e6, 0.010))
    cls = dict(rate=5_000_000, ceil=5_000_000, burst=130204, cburst=130204, quantum=200000, prio=0)
    assert ipr.calls == [
        (("add", "htb", 7, ROOT_HANDLE), dict(default=0x10, r2q=10)),
        (("add-class", "htb", 7, LINK_CLASS), dict(parent=ROOT_HANDLE, **cls)),
        (("add-class", "htb", 7, DEFAULT_CLASS), dict(parent=LINK_CLASS, **cls)),
        (("add", "bfifo", 7, 0x100000), dict(parent=DEFAULT_CLASS, limit=260408)),
    ]


def test_apply_missing_interface_raises_before_any_op():
    ipr = FakeIPRoute({})
    with pytest.raises(LookupError, match="pe1-snic"):
        apply(ipr, shape_ops("dp-pe1", "pe1-snic", 40e6, 0.010))
    assert ipr.calls == []


# -- traffic classes ---------------------------------------------------------------------------------------
def test_with_isolation_every_compute_fabric_end_gets_dscp_classes():
    plan = make_plan(schema.load("tiny"))  # isolation on by default
    by_end = defaultdict(list)
    for op in plan.tc_ops:
        by_end[(op.netns, op.dev)].append(op)
    for lk in plan.net.links:
        for end in ((plan.net.host(lk.host).netns, lk.host_intf), (None, lk.switch_intf)):
            ops = by_end[end]
            if lk.link_class != "cnic":
                assert len(ops) == 4  # storage fabric: one FIFO class
                continue
            classes = {handle_str(o.handle): o for o in ops if o.op == "class"}
            assert set(classes) == {"1:1", "1:10", "1:11", "1:12"}
            rate = round(lk.rate_bps)
            assert classes["1:11"].param("rate_bps") == round(rate * 0.985) and classes["1:11"].param("prio") == 0
            assert classes["1:12"].param("rate_bps") == round(rate * 0.01) and classes["1:12"].param("prio") == 1
            assert classes["1:10"].param("rate_bps") == round(rate * 0.005)
            assert all(c.param("ceil_bps") == rate for c in classes.values())  # work-conserving: borrow it all
            filters = {o.param("dscp"): handle_str(o.handle) for o in ops if o.op == "filter"}
            assert filters == {46: "1:11", 10: "1:12"}
            fifos = {handle_str(o.parent) for o in ops if o.kind == "bfifo"}
            assert fifos == {"1:10", "1:11", "1:12"}  # every leaf has its own explicit queue


def test_dscp_filter_renders_as_tc_would_take_it():
    from emulator.tcplan import TrafficClass
    ops = shape_ops("dp-pe1", "pe1-cnic0", 160e6, 0.01, (TrafficClass("collective", 0x11, 46, 0.985),))
    (flt,) = [o for o in ops if o.op == "filter"]
    assert render(flt) == ("tc -n dp-pe1 filter add dev pe1-cnic0 parent 1: protocol ip prio 1 "
                           "u32 match ip dsfield 0xb8 0xfc flowid 1:11")
    assert describe(flt) == "pe1-cnic0: u32 filter DSCP 46 -> 1:11"


@pytest.mark.parametrize("classes, match", [
    ((("a", 0x11, 46, 0.5), ("b", 0x12, 46, 0.1)), "DSCP"),
    ((("a", 0x11, 46, 0.5), ("b", 0x11, 10, 0.1)), "minor"),
    ((("a", 0x11, 46, 0.9), ("b", 0x12, 10, 0.1)), "add up"),
])
def test_inconsistent_classes_refused(classes, match):
    from emulator.tcplan import TrafficClass
    with pytest.raises(ValueError, match=match):
        shape_ops(None, "dp-x", 1e8, 0.01, tuple(TrafficClass(*c) for c in classes))


@pytest.mark.parametrize("args, match", [(("a", 0x10, 46, 0.5), "minor"), (("a", 0x11, 64, 0.5), "DSCP"),
                                         (("a", 0x11, 46, 1.0), "share"), (("a", 0x11, 46, 0.5, 9), "prio")])
def test_bad_traffic_class_refused(args, match):
    from emulator.tcplan import TrafficClass
    with pytest.raises(ValueError, match=match):
        TrafficClass(*args)

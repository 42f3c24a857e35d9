"""emulator.spec.NetSpec's lossless-fabric sizing: cap_skbs (each switch's slowest link sets every skb cap on it),
rcvbuf_bytes (a host port's queue less two skbs, shared by its fan_in; skbs small enough for windows of several)
and default_rcvbuf_bytes (the smallest of a host's lossless links whose sockets do not size their own), on small
cluster_net layouts, the shipped 1-GPU default scenario and hand-made NetSpecs."""

from __future__ import annotations

import pytest

from emulator.spec import HostSpec, LinkSpec, NetSpec, SwitchSpec
from emulator.tcplan import GSO_MAX_SEGS
from scenarios import plan, schema
from topologies.cluster import ClusterSpec, Scale, cluster_net

SMALL = ClusterSpec(1, 1, gpus_per_node=1, storage_servers=1)


@pytest.fixture(scope="module")
def small():
    # SNICs and CNICs 400e9 * 1e-4 = 40 Mbit/s, st1-nic 160 Mbit/s; queues 10 ms; skbs of 1 ms
    return cluster_net(SMALL, Scale(1e-4))


def link(net: NetSpec, name: str) -> LinkSpec:
    return next(lk for lk in net.links if f"{lk.host}-{lk.nic}" == name)


def test_small_cluster_skb_caps(small):
    # every switch's slowest link is 40 Mbit/s: 40e6 / 8 * 1 ms = 5000 B -> 3 segments of 1514
    assert {f"{lk.host}-{lk.nic}": lk.skb_segs for lk in small.links} == {
        "pe1-snic": 3, "pe1-cnic0": 3, "de1-snic": 3, "de1-cnic0": 3,
        "st1-nic": 3}  # not its own 160e6 / 8 * 1 ms // 1514 = 13: its skbs cross to an SNIC whole


def test_small_cluster_rcvbuf(small):
    # pe1 on stor: 40e6 / 8 * 0.01 = 50000 B of queue, less 2 skbs of 3 x 1514 = 9084 -> 40916, fan_in 1 (1 server)
    assert small.rcvbuf_bytes("pe1", "stor") == 40916
    # pe1 on rail0: no fan_in, so every other host on rail0 (de1): 40916 / 1
    assert small.rcvbuf_bytes("pe1", "rail0") == 40916
    # st1 on stor: 160e6 / 8 * 0.01 = 200000, less 9084 -> 190916, fan_in 2 compute nodes -> 95458
    assert small.rcvbuf_bytes("st1", "stor") == 95458
    assert small.rcvbuf_bytes("st1", "rail0") is None  # no link there
    assert small.rcvbuf_bytes("pe1", "mgmt") is None  # management is not lossless (and not shaped)
    assert small.rcvbuf_bytes("ctl1", "stor") is None
    assert small.default_rcvbuf_bytes("pe1") == 40916
    assert small.default_rcvbuf_bytes("st1") == 95458
    assert small.default_rcvbuf_bytes("ctl1") is None


def test_not_lossless_gives_none_everywhere():
    net = cluster_net(SMALL, Scale(1e-4), lossless=False)
    assert not any(s.lossless for s in net.switches)
    for h in net.hosts:
        assert net.default_rcvbuf_bytes(h.name) is None
        for s in net.switches:
            assert net.rcvbuf_bytes(h.name, s.name) is None
    assert link(net, "st1-nic").skb_segs == 3  # skbs are capped all the same


@pytest.fixture(scope="module")
def default_net():
    return plan.make_plan(schema.load("default_g1")).net


def test_default_scenario_caps_and_rcvbuf(default_net):
    net = default_net
    snic, cnic, stnic = link(net, "pe1-snic"), link(net, "pe1-cnic0"), link(net, "st1-nic")
    assert (snic.rate_bps, cnic.rate_bps, stnic.rate_bps) == (20e6, 160e6, 80e6)
    assert snic.queue_s == cnic.queue_s == stnic.queue_s == pytest.approx(0.016)  # 10 ms real at time x1.6
    # skbs of 1 ms real = 1.6 ms wall: SNIC 20e6 / 8 * 1.6e-3 = 4000 B -> 2 segments; CNIC 32000 B -> 21, but
    # its 320000 B queue must give its 5 senders windows of 4 skbs (+ 2 of slack): 211 // 22 -> 9;
    # the storage NIC would get 16000 B -> 10 on its own, but shares stor with the SNICs: 2
    assert {lk.link_class: lk.skb_segs for lk in net.links} == {"snic": 2, "cnic": 9, "stnic": 2}
    # SNIC: 40000 B of queue - 2 x 3028 = 33944, over fan_in 2 storage servers -> 16972
    # CNIC: 320000 - 2 x 13626 = 292748, over the 5 other hosts of rail0 -> 58549
    # storage NIC: 160000 - 2 x 3028 = 153944, over fan_in 6 compute nodes -> 25657
    for h in ("pe1", "pe2", "de1", "de4"):
        assert net.rcvbuf_bytes(h, "stor") == 16972
        assert net.rcvbuf_bytes(h, "rail0") == 58549
        assert net.default_rcvbuf_bytes(h) == 58549  # the CNIC's: storage reads size their own
    for h in ("st1", "st2"):
        assert net.rcvbuf_bytes(h, "stor") == 25657
        assert net.default_rcvbuf_bytes(h) == 25657
    assert net.rcvbuf_bytes("pe1", "mgmt") is None


def test_default_scenario_at_time_x1_25():
    """The previous default (bytes 5e-4, time x1.25): 12.5 ms queues, skbs of 1.25 ms."""
    net = plan.make_plan(schema.load("default_g1", ["scale.time=1.25", "scale.bytes=5e-4"])).net
    assert {lk.link_class: lk.skb_segs for lk in net.links} == {"snic": 2, "cnic": 7, "stnic": 2}
    assert net.rcvbuf_bytes("pe1", "stor") == 12597  # (31250 - 2 x 3028) / 2
    assert net.rcvbuf_bytes("pe1", "rail0") == 45760  # (250000 - 2 x 7 x 1514) / 5 = 45760.8
    assert net.rcvbuf_bytes("st1", "stor") == 19824  # (125000 - 2 x 3028) / 6
    assert net.default_rcvbuf_bytes("de2") == 45760


def test_default_scenario_not_lossless():
    net = plan.make_plan(schema.load("default_g1", ["emulation.lossless=false"])).net
    assert all(net.default_rcvbuf_bytes(h.name) is None for h in net.hosts)


def hand_net(lossless_b: bool = False, fan_in: int | None = None, own_a: bool = False) -> NetSpec:
    hosts = tuple(HostSpec(n, "x") for n in ("h1", "h2", "h3"))
    switches = (SwitchSpec("a", "storage", lossless=True), SwitchSpec("b", "compute", lossless=lossless_b))
    links = (LinkSpec("h1", "n0", "a", "slow", 10e6, "10.0.0.1/16", 0.01, fan_in=fan_in, own_rcvbuf=own_a),
             LinkSpec("h2", "n0", "a", "fast", 100e6, "10.0.0.2/16", 0.01),
             LinkSpec("h1", "n1", "b", "fast", 100e6, "10.1.0.1/16", 0.01),
             LinkSpec("h3", "n1", "b", "fast", 100e6, "10.1.0.3/16", 0.01))
    return NetSpec(hosts, switches, links)


def test_cap_skbs_per_switch():
    net = hand_net()
    assert all(lk.skb_segs is None for lk in net.links)
    capped = net.cap_skbs(0.01)
    # switch a (lossless): 10e6 -> 12500 B // 1514 = 8 by time, but a 12500 B queue must hold h2's window of 4
    # skbs and 2 of slack: 8 // 6 -> 1, for both of its links; b: 125000 // 1514 = 82, capped at 43
    assert [lk.skb_segs for lk in capped.links] == [1, 1, GSO_MAX_SEGS, GSO_MAX_SEGS]
    assert GSO_MAX_SEGS == 43
    assert all(lk.skb_segs is None for lk in net.links)  # a new NetSpec; the old one is unchanged
    assert [lk.skb_segs for lk in net.cap_skbs(1e-6).links] == [1, 1, 1, 1]  # at least one segment
    assert [lk.skb_segs for lk in net.cap_skbs(0.002).links] == [1, 1, 16, 16]  # 2500 // 1514, 25000 // 1514


def test_rcvbuf_hand_net():
    net = hand_net().cap_skbs(0.01)
    # h1 on a: 10e6 / 8 * 0.01 = 12500 of queue (skbs of 1 segment); less 2 skbs (3028) -> 9472, shared by
    # every other host on a (h2) -> 9472
    assert net.rcvbuf_bytes("h1", "a") == 9472
    assert net.rcvbuf_bytes("h1", "b") is None  # b is not lossless
    assert net.default_rcvbuf_bytes("h1") == 9472
    assert net.default_rcvbuf_bytes("h3") is None
    # b lossless too: 100e6 / 8 * 0.01 = 125000 B of queue for 1 sender's window of 4 skbs + 2: 82 // 6 -> 13
    # segments; less 2 x 13 x 1514 = 39364 -> 85636 for the 1 other host; the default is the smaller of a's and
    # b's (a socket that does not size its own must not overflow either port)
    both = hand_net(lossless_b=True).cap_skbs(0.01)
    assert [lk.skb_segs for lk in both.links] == [1, 1, 13, 13]
    assert both.rcvbuf_bytes("h1", "b") == 85636
    assert both.default_rcvbuf_bytes("h1") == 9472
    assert both.default_rcvbuf_bytes("h3") == 85636
    # h1's sockets on a size their own (own_rcvbuf): the default is b's
    own = hand_net(lossless_b=True, own_a=True).cap_skbs(0.01)
    assert own.rcvbuf_bytes("h1", "a") == 9472 and own.default_rcvbuf_bytes("h1") == 85636


def test_rcvbuf_floor_is_two_segments():
    net = hand_net(fan_in=1000).cap_skbs(0.01)
    assert net.rcvbuf_bytes("h1", "a") == 2 * 1514  # 9472 / 1000 = 9 B, floored at two full segments

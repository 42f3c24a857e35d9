"""emulator.calibrate planning (pure): which tests calibrate which links, and in which rounds."""

from __future__ import annotations

import pytest

from emulator import calibrate
from emulator.calibrate import FAN_HEADROOM, Target, plan_tests, schedule
from emulator.fidelity import KERNEL_BUDGET_BPS
from emulator.monitor import ClassKey
from emulator.spec import HostSpec, LinkSpec, NetSpec, SwitchSpec
from emulator.tcplan import LINK_CLASS
from scenarios import schema
from scenarios.plan import make_plan
from topologies.cluster import ClusterSpec, Scale, cluster_net


def cluster(p=2, d=4, g=8, s=2, st_rate=1600e9, scale=1e-4):
    return cluster_net(ClusterSpec(p, d, gpus_per_node=g, storage_servers=s, storage_nic_rate_bps=st_rate),
                       Scale(scale), 0.010)


def star(link_rate: float, peer_rates: list[float]) -> NetSpec:
    """One switch; host h0 with `link_rate`, hosts h1.. with `peer_rates`."""
    rates = [link_rate] + peer_rates
    hosts = tuple(HostSpec(f"h{i}", "x") for i in range(len(rates)))
    links = tuple(LinkSpec(f"h{i}", "nic", "sw", "big" if i == 0 else "small", r, f"10.0.0.{i + 1}/24", 0.01)
                  for i, r in enumerate(rates))
    return NetSpec(hosts, (SwitchSpec("sw", "x"),), links)


NETS = {
    "2p4d": cluster(),
    "2p4d_1st": cluster(s=1),
    "1p1d_g2": cluster(1, 1, 2, 1, st_rate=600e9, scale=2.5e-4),
    "3p5d_g3_3st": cluster(3, 5, 3, 3),
}


def covered(tests):
    return {(t.link, t.direction) for test in tests for t in test.targets}


# -- class mode --------------------------------------------------------------
@pytest.mark.parametrize("name", NETS)
def test_class_mode_one_test_per_link_class(name):
    net = NETS[name]
    tests = plan_tests(net, "class")
    classes = {lk.link_class for lk in net.links}
    assert len(tests) == len(classes) == 3
    assert {test.targets[0].link.link_class for test in tests} == classes


def test_class_mode_2p4d_tests():
    tests = plan_tests(NETS["2p4d"], "class")
    assert [(t.kind, sorted(f"{lk.host}-{lk.nic}" for lk in t.links)) for t in tests] == [
        ("pair", ["pe1-snic", "pe2-snic"]),
        ("pair", ["pe1-cnic0", "pe2-cnic0"]),
        ("pair", ["st1-nic", "st2-nic"]),
    ]


def test_pair_test_checks_four_directions_and_flows_both_ways():
    net = NETS["2p4d"]
    pair = plan_tests(net, "class")[0]
    a, b = pair.flows[0]
    assert pair.flows == ((a, b), (b, a))
    assert {(t.link, t.direction) for t in pair.targets} == {(a, "up"), (a, "down"), (b, "up"), (b, "down")}
    assert a.switch == b.switch and a.rate_bps == b.rate_bps and a.host != b.host
    assert pair.offered_bps == pytest.approx(2 * 40e6)


def test_unknown_mode_refused():
    with pytest.raises(ValueError, match="class' or 'all"):
        plan_tests(NETS["2p4d"], "some")


# -- all mode ----------------------------------------------------------------
STARS = {
    "fan_first": star(100.0, [30.0] * 5),           # the fan's peers come after it and need tests too
    "mixed": star(100.0, [100.0, 30.0, 30.0, 60.0]),
    "no_headroom": star(100.0, [30.0, 30.0]),
}


@pytest.mark.parametrize("name", list(NETS) + list(STARS))
def test_all_mode_covers_every_link_in_both_directions(name):
    net = NETS.get(name) or STARS[name]
    wanted = {(lk, d) for lk in net.links for d in ("up", "down")}
    assert covered(plan_tests(net, "all")) == wanted


@pytest.mark.parametrize("name", NETS)
def test_every_flow_stays_on_one_switch_between_two_hosts(name):
    for test in plan_tests(NETS[name], "all"):
        for src, dst in test.flows:
            assert src.switch == dst.switch and src.host != dst.host


def test_all_mode_2p4d_pairs_each_link_once():
    tests = plan_tests(NETS["2p4d"], "all")
    assert all(t.kind == "pair" for t in tests)
    # 6 SNICs -> 3 pairs, 6 CNICs on each of 8 rails -> 24 pairs, 2 storage NICs -> 1 pair
    assert len(tests) == 3 + 24 + 1
    targets = [t.link for test in tests for t in test.targets if t.direction == "up"]
    assert len(targets) == len(set(targets)) == 56


def test_all_mode_odd_count_reuses_a_covered_peer():
    # 3P2D: 5 SNICs -> pe1+pe2, pe3+de1, then de2 pairs with an already tested SNIC
    net = cluster(3, 2, 1, 2)
    tests = plan_tests(net, "all")
    assert covered(tests) == {(lk, d) for lk in net.links for d in ("up", "down")}
    snic_tests = [t for t in tests if t.targets[0].link.link_class == "snic"]
    assert len(snic_tests) == 3


def test_target_keys():
    net = NETS["2p4d"]
    lk = net.links[0]  # pe1-snic
    assert Target(lk, "up").key(net) == ClassKey("dp-pe1", "pe1-snic", LINK_CLASS)
    assert Target(lk, "down").key(net) == ClassKey(None, "dp-pe1-snic", LINK_CLASS)
    assert Target(lk, "up").label == "pe1-snic up"


# -- fan tests ---------------------------------------------------------------
def fan_of(net, host):
    (test,) = [t for t in plan_tests(net, "all") if t.targets[0].link.host == host]
    return test


@pytest.mark.parametrize("peers, chosen", [
    ([30.0] * 5, [30.0] * 5),                 # 4 x 30 = 120 < 125; 5 x 30 = 150
    ([60.0, 50.0, 40.0, 10.0], [60.0, 50.0, 40.0]),  # 60, 110, 150 >= 125
    ([10.0, 40.0, 60.0, 50.0], [60.0, 50.0, 40.0]),  # fastest peers first, whatever their order
    ([80.0, 80.0, 80.0], [80.0, 80.0]),       # 160 >= 125
    ([125.0, 50.0], [125.0]),                 # exactly 1.25x is enough
])
def test_fan_picks_fastest_peers_until_headroom(peers, chosen):
    net = star(100.0, peers)
    fan = fan_of(net, "h0")
    assert fan.kind == "fan"
    link = net.links[0]
    picked = [dst.rate_bps for src, dst in fan.flows if src == link]
    assert picked == chosen
    assert sum(picked) >= FAN_HEADROOM * link.rate_bps
    # and both directions: each chosen peer also sends to the link
    assert sorted(src.rate_bps for src, dst in fan.flows if dst == link) == sorted(chosen)
    assert {(t.link, t.direction) for t in fan.targets} == {(link, "up"), (link, "down")}


def test_fan_uses_every_peer_when_they_cannot_reach_headroom():
    net = star(100.0, [30.0, 30.0])
    fan = fan_of(net, "h0")
    assert sorted(dst.host for src, dst in fan.flows if src == net.links[0]) == ["h1", "h2"]


@pytest.mark.parametrize("name", NETS)
def test_fans_in_clusters_have_headroom(name):
    net = NETS[name]
    fans = [t for t in plan_tests(net, "all") + plan_tests(net, "class") if t.kind == "fan"]
    for fan in fans:
        (link,) = {t.link for t in fan.targets}
        peers = [lk for lk in net.links if lk.switch == link.switch and lk.host != link.host]
        if sum(p.rate_bps for p in peers) >= FAN_HEADROOM * link.rate_bps:
            picked = [dst for src, dst in fan.flows if src == link]
            assert sum(p.rate_bps for p in picked) >= FAN_HEADROOM * link.rate_bps


def test_single_storage_server_gets_a_fan_with_headroom():
    net = NETS["2p4d_1st"]  # st1 160 Mbit/s, six 40 Mbit/s SNIC peers: needs 200 Mbit/s
    fan = fan_of(net, "st1")
    assert fan.kind == "fan"
    picked = [dst for src, dst in fan.flows if src.host == "st1"]
    assert all(p.link_class == "snic" for p in picked)
    assert sum(p.rate_bps for p in picked) >= 1.25 * 160e6 * (1 - 1e-12)
    assert len(picked) in (5, 6)  # 5 x 40 = 200 exactly; float rounding may need the sixth


def test_tiny_storage_fan():
    net = NETS["1p1d_g2"]  # 150 Mbit/s storage NIC, two 100 Mbit/s SNIC peers: 200 >= 187.5
    fan = fan_of(net, "st1")
    assert sorted((s.host, d.host) for s, d in fan.flows) == [("de1", "st1"), ("pe1", "st1"),
                                                              ("st1", "de1"), ("st1", "pe1")]
    assert fan.offered_bps == pytest.approx(4 * 100e6)


def test_fan_that_peers_cannot_fill_is_verified_at_what_they_can_push():
    """A storage NIC faster than all its peers together can never carry more than
    they send: calibration verifies it at that rate, and the plan is not refused."""
    plan = make_plan(schema.load("tiny", ["cluster.storage.nic_rate=1600Gbit"]))
    assert plan.problems == ()
    fan = fan_of(plan.net, "st1")
    st1 = next(lk for lk in plan.net.links if lk.host == "st1")
    assert st1.rate_bps == pytest.approx(400e6)
    assert [t.target_bps for t in fan.targets] == pytest.approx([200e6, 200e6])  # pe1 + de1 SNICs
    full = fan_of(make_plan(schema.load("tiny")).net, "st1")
    assert all(t.expected_bps is None and t.target_bps == pytest.approx(150e6) for t in full.targets)


# -- schedule ----------------------------------------------------------------
def lk(name: str, rate: float = 40.0) -> LinkSpec:
    return LinkSpec(name, "nic", "sw", "x", rate, "10.0.0.1/24", 0.01)


def pair(a: LinkSpec, b: LinkSpec) -> calibrate.Test:
    return calibrate.Test("pair", ((a, b), (b, a)), ())


def test_schedule_hand_example():
    a, b, c, d, e = (lk(n) for n in "abcde")
    t1, t2, t3, t4 = pair(a, b), pair(b, c), pair(c, d), pair(d, e)
    assert schedule([t1, t2, t3, t4], budget_bps=1e9) == [[t1, t3], [t2, t4]]


def test_schedule_budget_hand_example():
    tests = [pair(lk(f"a{i}"), lk(f"b{i}")) for i in range(5)]  # 80 each
    rounds = schedule(tests, budget_bps=170.0)                  # two fit (160), three do not (240)
    assert rounds == [tests[0:2], tests[2:4], tests[4:5]]


def test_schedule_test_over_budget_runs_alone():
    big = pair(lk("a", 1000.0), lk("b", 1000.0))
    small = pair(lk("c"), lk("d"))
    assert schedule([big, small], budget_bps=500.0) == [[big], [small]]


@pytest.mark.parametrize("name", NETS)
@pytest.mark.parametrize("budget", [100e6, 250e6, 1e9, KERNEL_BUDGET_BPS])
def test_schedule_properties(name, budget):
    net = NETS[name]
    tests = plan_tests(net, "all") + plan_tests(net, "class")  # class tests overlap the all tests
    rounds = schedule(tests, budget)
    flat = [t for rnd in rounds for t in rnd]
    assert sorted(map(id, flat)) == sorted(map(id, tests))  # every test exactly once
    for rnd in rounds:
        links = [x for t in rnd for x in t.links]
        assert len(links) == len(set(links)), "two tests of a round share a link"
        if len(rnd) > 1:
            assert sum(t.offered_bps for t in rnd) <= budget


def test_make_plan_rounds_respect_kernel_budget():
    plan = make_plan(schema.load("calibrate_all"))
    assert sum(len(r) for r in plan.rounds) == len(plan.tests) == 28
    for rnd in plan.rounds:
        assert sum(t.offered_bps for t in rnd) <= KERNEL_BUDGET_BPS

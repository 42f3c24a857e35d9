"""A cluster spread over several servers: the scenario's ``servers:`` section (scenarios.placement), what the
NetSpec says about where each object lives (emulator.spec), and the plan text. Pure: no root, no ssh."""

from __future__ import annotations

import dataclasses
from functools import lru_cache

import pytest
import yaml

from emulator.errors import ConfigError
from emulator.servers import ServerSpec
from emulator.spec import ControlLink, LinkSpec, tunnel_temp
from scenarios import placement, plan, schema
from scenarios.placement import underlay_demand, underlay_problems

TUNNELLED = ["pe1-snic", "de1-cnic0", "de1-cnic1", "de1-mgmt", "st1-mgmt"]


@lru_cache(maxsize=None)
def two_plan(*sets: str):
    return plan.make_plan(schema.load("two_servers", list(sets)))


def two_data() -> dict:
    return yaml.safe_load((schema.SCENARIO_DIR / "two_servers.yaml").read_text())


# -- two_servers.yaml ------------------------------------------------------------------------------------------------
def test_two_servers_machines():
    net = two_plan().net
    assert [s.name for s in net.servers] == ["s1", "s2"]
    s1, s2 = net.servers
    assert s1.local and s1.address is None
    assert not s2.local and s2.address == "10.199.0.2" and s2.user == "root"
    assert s2.key == "/tmp/dpt-srv2-testbed/client_key" and s2.known_hosts == "/tmp/dpt-srv2-testbed/known_hosts"
    assert s2.underlay_bps == 10e9
    assert net.tunnel == "vxlan"
    assert net.server("s2") is s2 and net.server("s7") is None


def test_two_servers_placement_of_hosts_and_bridges():
    net = two_plan().net
    assert {h.name: net.server_of(h.name) for h in net.hosts} == {"pe1": "s1", "de1": "s2", "st1": "s2",
                                                                   "ctl1": "s1"}
    # stor: pe1 (s1), de1 and st1 (s2): the majority is on s2; rails 1-1 and mgmt 2-2: ties go to the first
    assert {s.name: net.server_of(s.name) for s in net.switches} == {"stor": "s2", "rail0": "s1", "rail1": "s1",
                                                                      "mgmt": "s1"}
    assert net.switch("stor").bridge == "dp-stor" and net.switch("stor").fabric == "storage"
    net.validate()  # names, ends, servers and placement are consistent


def test_two_servers_tunnelled_cables():
    net = two_plan().net
    tun = net.tunnelled()
    assert [c.host_intf for c in tun] == TUNNELLED
    assert [type(c) for c in tun] == [LinkSpec, LinkSpec, LinkSpec, ControlLink, ControlLink]
    for c in tun:
        assert net.server_of(c.host) != net.server_of(c.switch)
    untunnelled = {c.host_intf for c in net.cables()} - set(TUNNELLED)
    assert untunnelled == {"pe1-cnic0", "pe1-cnic1", "de1-snic", "st1-nic", "pe1-mgmt", "ctl1-mgmt"}


def test_two_servers_objects_on_each_server():
    net = two_plan().net
    netns2, links2 = net.objects_on("s2")
    assert netns2 == ["dp-de1", "dp-st1"]
    # the storage bridge, its ports, and the host ends (dp-t<i>) of the tunnels whose host is on s2 (de1, st1)
    assert links2 == ["dp-stor", "dp-pe1-snic", "dp-de1-snic", "dp-st1-nic", "dp-t1", "dp-t2", "dp-t3", "dp-t4"]
    netns1, links1 = net.objects_on("s1")
    assert netns1 == ["dp-pe1", "dp-ctl1"]
    assert links1 == ["dp-rail0", "dp-rail1", "dp-mgmt", "dp-pe1-cnic0", "dp-pe1-cnic1", "dp-de1-cnic0",
                      "dp-de1-cnic1", "dp-pe1-mgmt", "dp-de1-mgmt", "dp-st1-mgmt", "dp-ctl1-mgmt", "dp-t0"]
    assert tunnel_temp(0) == "dp-t0"
    # together: everything of the one-machine network, once, plus one temporary name per tunnel
    all_ns, all_links = net.objects_on(None)
    assert sorted(netns1 + netns2) == sorted(all_ns)
    assert sorted(links1 + links2) == sorted(all_links + [tunnel_temp(i) for i in range(len(TUNNELLED))])
    assert not set(links1) & set(links2)


def test_objects_on_none_is_the_one_machine_list():
    spread_net = two_plan().net
    one = two_plan("servers=null").net
    assert one.servers == () and one.placement == ()
    assert spread_net.objects_on(None) == one.objects_on(None)
    ns, links = one.objects_on(None)
    assert sorted(ns + links) == sorted(one.root_objects())
    assert not any(n.startswith("dp-t") and n[4:].isdigit() for n in links)


def test_remote_of_and_end_of():
    net = two_plan().net
    s2 = net.server("s2")
    assert net.remote_of(net.host("de1").netns) == s2
    assert net.remote_of("dp-st1") == s2
    assert net.remote_of(net.host("pe1").netns) is None  # on this machine
    assert net.remote_of("dp-ctl1") is None
    assert net.remote_of(None, "dp-pe1-snic") == s2  # pe1 is here, but its switch port is on the stor bridge on s2
    assert net.remote_of(None, "dp-stor") == s2
    assert net.remote_of(None, "dp-de1-cnic0") is None  # de1 is on s2, its rail port here
    assert net.remote_of(None, "dp-rail0") is None
    assert net.remote_of(None, None) is None  # the root namespace of this machine
    assert net.remote_of("dp-nobody") is None
    assert net.end_of("de1-snic") == ("dp-de1", "de1-snic")
    assert net.end_of("pe1-cnic1") == ("dp-pe1", "pe1-cnic1")
    assert net.end_of("dp-de1-snic") == (None, "dp-de1-snic")


def test_one_machine_net_has_no_servers():
    net = two_plan("servers=null").net
    assert net.server_of("de1") is None
    assert net.remote_of("dp-de1") is None and net.remote_of(None, "dp-stor") is None
    assert net.tunnelled() == []
    assert plan.servers_text(net) == []


# -- balanced placement ----------------------------------------------------------------------------------------------
BALANCED = ("cluster.prefill_nodes=2", "cluster.decode_nodes=2", "cluster.storage.servers=2",
            "servers.placement=balanced")


def test_balanced_placement_deals_nodes_out_in_turn():
    net = two_plan(*BALANCED).net
    where = dict(net.placement)
    assert where["ctl1"] == "s1"
    assert {h: where[h] for h in ("pe1", "pe2", "de1", "de2", "st1", "st2")} == {
        "pe1": "s1", "pe2": "s2", "de1": "s1", "de2": "s2", "st1": "s1", "st2": "s2"}
    assert set(where) == {h.name for h in net.hosts} | {s.name for s in net.switches}


def test_balanced_placement_puts_every_bridge_with_most_of_its_hosts():
    net = two_plan(*BALANCED).net
    for sw in net.switches:
        hosts = [net.server_of(c.host) for c in net.cables() if c.switch == sw.name]
        votes = {s.name: hosts.count(s.name) for s in net.servers}
        best = max(votes.values())
        # the machine with most of its ports' hosts; on a tie, the first of them
        assert net.server_of(sw.name) == next(n for n, v in votes.items() if v == best), sw.name
    # concretely: stor 3-3, rails 2-2 (ties: s1), mgmt 4-3 (ctl1 tips it)
    assert {s.name: net.server_of(s.name) for s in net.switches} == {"stor": "s1", "rail0": "s1", "rail1": "s1",
                                                                      "mgmt": "s1"}
    # so every cable of a node on s2 is a tunnel
    assert {c.host for c in net.tunnelled()} == {"pe2", "de2", "st2"}
    assert len(net.tunnelled()) == 2 * (1 + 2 + 1) + 2  # pe2, de2: snic, 2 cnics, mgmt; st2: nic, mgmt


def test_a_bridge_goes_to_the_machine_holding_most_of_its_hosts_by_hand():
    d = two_data()
    d["servers"]["placement"] = {"pe1": "s2", "de1": "s2"}
    net = plan.make_plan(schema.from_dict(d, "x.yaml")).net
    assert net.server_of("rail0") == "s2" and net.server_of("rail1") == "s2"  # both ports' hosts on s2
    assert net.server_of("stor") == "s2"  # pe1, de1 on s2, st1 here
    assert net.server_of("mgmt") == "s1"  # 2-2: the first


# -- problems, named before anything is built ----------------------------------------------------------------------
def test_machine_problems_are_named_together_at_load():
    d = two_data()
    d["servers"]["machines"][0]["address"] = "10.0.0.1"
    del d["servers"]["machines"][1]["address"]
    d["servers"]["placement"] = {"de1": "s7", "st1": "s2"}
    with pytest.raises(ConfigError) as exc:
        schema.from_dict(d, "x.yaml")
    msg = str(exc.value)
    assert exc.value.where == "x.yaml: servers"
    assert "the first machine is this one: give it no address" in msg
    assert "machine s2 needs an address" in msg
    assert "placement de1: no machine 's7'" in msg


def test_one_machine_and_twice_named_machines_are_refused():
    d = two_data()
    d["servers"]["machines"] = [{"name": "s1"}]
    with pytest.raises(ConfigError, match="name at least two machines"):
        schema.from_dict(d, "x.yaml")
    d = two_data()
    d["servers"]["machines"].append({"name": "s2", "address": "10.0.0.9"})
    with pytest.raises(ConfigError, match="machine s2 is named twice"):
        schema.from_dict(d, "x.yaml")
    d = two_data()
    d["servers"]["machines"][1]["name"] = "S-2"
    with pytest.raises(ConfigError, match="a lowercase letter, then letters and digits"):
        schema.from_dict(d, "x.yaml")


def test_placement_and_underlay_problems_are_named_together_at_plan():
    d = two_data()
    d["servers"]["machines"][1]["underlay"] = "1Mbit"
    d["servers"]["placement"] = {"de1": "s2", "st1": "s2", "ctl1": "s2", "zz9": "s2"}
    sc = schema.from_dict(d, "x.yaml")  # the section's own shape is fine
    with pytest.raises(ConfigError) as exc:
        plan.make_plan(sc)
    msg = str(exc.value)
    assert msg.startswith("servers: ")
    assert "placement: no node 'zz9' (nodes: pe1, de1, st1, ctl1)" in msg
    assert "placement: ctl1 (scheduler, workload driver) stays on s1" in msg
    assert "the links tunnelled to s2 can carry 120Mbit each way, more than its underlay (1Mbit)" in msg
    assert msg.count(";") == 2  # three problems, one message


def test_set_cannot_index_the_machine_list():
    with pytest.raises(ConfigError, match="machines is not a section"):
        schema.load("two_servers", ["servers.machines.1.underlay=1Mbit"])


def test_an_underlay_just_fast_enough_passes():
    d = two_data()
    d["servers"]["machines"][1]["underlay"] = "120Mbit"  # exactly the demand
    net = plan.make_plan(schema.from_dict(d, "x.yaml")).net
    assert underlay_problems(net) == []
    slower = dataclasses.replace(net, servers=(net.servers[0], dataclasses.replace(net.servers[1],
                                                                                   underlay_bps=119e6)))
    (problem,) = underlay_problems(slower)
    assert problem.startswith("the links tunnelled to s2 can carry 120Mbit")


def test_spread_without_servers_is_the_net_itself():
    net = two_plan("servers=null").net
    assert placement.spread(net, None) is net


def test_faults_with_servers_are_refused_at_load():
    d = two_data()
    d["faults"] = [{"at": "1s", "kind": "stop", "target": "st1", "for": "1s"}]
    with pytest.raises(ConfigError) as exc:
        schema.from_dict(d, "x.yaml")
    assert exc.value.where == "x.yaml: faults"
    assert "spread over servers" in str(exc.value)
    d.pop("servers")  # the same faults on one machine are fine
    assert len(schema.from_dict(d, "x.yaml").faults) == 1


# -- plan text, underlay demand -------------------------------------------------------------------------------------
def test_plan_text_has_a_servers_section():
    text = plan.plan_text(two_plan())
    lines = text.splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith("## servers"))
    assert lines[i].startswith("## servers (2; tunnels: vxlan")
    assert "MTU" in lines[i] and "less 50 B" in lines[i]
    section = lines[i + 1:lines.index("", i + 1)]
    assert section[0].startswith("s1") and "this machine" in section[0] and "nodes pe1, ctl1" in section[0]
    assert "bridges dp-rail0, dp-rail1, dp-mgmt" in section[0]
    assert section[1].startswith("s2") and "root@10.199.0.2" in section[1] and "nodes de1, st1" in section[1]
    assert "underlay 10Gbit" in section[1] and "can carry 120Mbit each way" in section[1]
    assert "bridges dp-stor" in section[1]
    tunnels = [line for line in section if line.startswith("tunnel")]
    assert len(tunnels) == 5 and len(section) == 7
    for n, (line, intf) in enumerate(zip(tunnels, TUNNELLED, strict=True), start=1):
        assert line.split()[1] == str(n) and f" {intf} on " in line
        if intf.endswith("mgmt"):
            assert line.endswith("unshaped")
        else:
            assert "shaped 40Mbit at both ends" in line
    assert "tunnel   1 vxlan: pe1-snic on s1 <-> dp-pe1-snic on s2 (dp-stor)" in text


def test_plan_text_of_one_machine_has_no_servers_section():
    assert "## servers" not in plan.plan_text(two_plan("servers=null"))


def test_underlay_demand_is_the_shaped_rate_of_the_tunnelled_links():
    net = two_plan().net
    where = dict(net.placement)
    expected = sum(lk.rate_bps for lk in net.links if where[lk.host] != where[lk.switch])
    assert expected == 3 * 40e6  # pe1-snic, de1-cnic0, de1-cnic1 (the mgmt tunnels are unshaped)
    assert underlay_demand(net) == {"s2": pytest.approx(expected)}


def test_underlay_demand_counts_each_remote_machine_of_a_tunnel():
    """Three machines: a cable between two remote ones counts for both; one to the first only for the other."""
    net = two_plan().net
    s3 = ServerSpec("s3", address="10.199.0.3", underlay_bps=1e9)
    moved = dataclasses.replace(net, servers=(*net.servers, s3),
                                placement=tuple((n, "s3" if n == "pe1" else s) for n, s in net.placement))
    by_intf = {lk.host_intf: lk.rate_bps for lk in moved.links}
    # pe1 on s3: its snic (to stor on s2) counts for s2 and s3; its cnics (rails on s1) for s3
    assert {c.host_intf for c in moved.tunnelled()} >= {"pe1-snic", "pe1-cnic0", "pe1-cnic1"}
    demand = underlay_demand(moved)
    assert demand["s3"] == pytest.approx(by_intf["pe1-snic"] + by_intf["pe1-cnic0"] + by_intf["pe1-cnic1"])
    assert demand["s2"] == pytest.approx(by_intf["pe1-snic"] + by_intf["de1-cnic0"] + by_intf["de1-cnic1"])
    assert "s1" not in demand

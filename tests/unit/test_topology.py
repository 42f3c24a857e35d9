"""topologies.cluster.cluster_net: the cluster's hosts, bridges, links and address plan."""

from __future__ import annotations

import ipaddress
from collections import Counter
from functools import lru_cache

import pytest

from emulator.names import IFNAMSIZ_MAX, PREFIX, is_owned
from topologies.cluster import ClusterSpec, Scale, cluster_net

QUEUE_S = 0.010
SCALE = Scale(1e-4)


@lru_cache(maxsize=None)
def net_for(p: int, d: int, g: int, s: int):
    return cluster_net(ClusterSpec(p, d, gpus_per_node=g, storage_servers=s), SCALE, QUEUE_S)


DEFAULT = (2, 4, 8, 2)
# Shapes whose names and addresses stress the limits: 254 nodes per role (the
# last octet) and 32 GPUs (rails 10.32 .. 10.63, interface "cnic31").
SHAPES = [DEFAULT, (1, 1, 1, 1), (1, 1, 2, 1), (99, 99, 32, 99), (254, 254, 32, 254)]


# -- counts ------------------------------------------------------------------
def test_2p4d_counts():
    net = net_for(*DEFAULT)
    assert len(net.hosts) == 9            # 2 prefill + 4 decode + 2 storage + the control host
    assert len(net.switches) == 10        # storage fabric + 8 rails + management
    assert len(net.links) == 6 * (1 + 8) + 2 == 56
    assert len(net.control) == 9          # one unshaped management cable per host


def test_2p4d_roles_and_names():
    net = net_for(*DEFAULT)
    assert [h.name for h in net.hosts] == ["pe1", "pe2", "de1", "de2", "de3", "de4", "st1", "st2", "ctl1"]
    assert [h.role for h in net.hosts] == ["pe"] * 2 + ["de"] * 4 + ["st"] * 2 + ["ctl"]
    assert [s.name for s in net.switches] == ["stor"] + [f"rail{r}" for r in range(8)] + ["mgmt"]


@pytest.mark.parametrize("shape", SHAPES)
def test_counts_general(shape):
    p, d, g, s = shape
    net = net_for(*shape)
    assert len(net.hosts) == p + d + s + 1
    assert len(net.switches) == 1 + g + 1
    assert len(net.links) == (p + d) * (1 + g) + s
    assert len(net.control) == p + d + s + 1


def test_every_compute_node_has_snic_and_one_cnic_per_gpu():
    net = net_for(*DEFAULT)
    for h in net.hosts:
        nics = sorted(lk.nic for lk in net.links_of(h.name))
        if h.role == "ctl":
            assert nics == []  # the control host is on the management network only
        elif h.role == "st":
            assert nics == ["nic"]
        else:
            assert nics == sorted(["snic"] + [f"cnic{r}" for r in range(8)])


def test_rail_r_connects_gpu_r_of_every_compute_node():
    net = net_for(*DEFAULT)
    for r in range(8):
        on_rail = [lk for lk in net.links if lk.switch == f"rail{r}"]
        assert sorted(lk.host for lk in on_rail) == sorted(["pe1", "pe2", "de1", "de2", "de3", "de4"])
        assert {lk.nic for lk in on_rail} == {f"cnic{r}"}


def test_storage_fabric_holds_every_snic_and_storage_nic():
    net = net_for(*DEFAULT)
    stor = [lk for lk in net.links if lk.switch == "stor"]
    assert sorted((lk.host, lk.nic) for lk in stor) == sorted(
        [(h, "snic") for h in ("pe1", "pe2", "de1", "de2", "de3", "de4")] + [("st1", "nic"), ("st2", "nic")])


# -- names -------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
def test_interface_names_fit_ifnamsiz(shape):
    net = net_for(*shape)
    for lk in net.links:
        assert len(lk.host_intf) <= IFNAMSIZ_MAX, lk.host_intf
        assert len(lk.switch_intf) <= IFNAMSIZ_MAX, lk.switch_intf
    for name in net.root_objects():
        assert len(name) <= IFNAMSIZ_MAX, name


def test_longest_names_at_the_extremes():
    net = net_for(254, 254, 32, 254)
    longest = max((lk for lk in net.links), key=lambda lk: len(lk.switch_intf))
    assert len(longest.switch_intf) == 15  # e.g. dp-pe254-cnic31: exactly at the limit
    assert "dp-pe254-cnic31" in {lk.switch_intf for lk in net.links}
    assert "dp-rail31" in {s.bridge for s in net.switches}


@pytest.mark.parametrize("shape", SHAPES)
def test_root_namespace_names_are_ours(shape):
    net = net_for(*shape)
    names = net.root_objects()
    assert len(names) == len(net.switches) + len(net.links) + len(net.control) + len(net.hosts)
    for name in names:
        assert name.startswith(PREFIX), name
        assert is_owned(name), name  # cleanup recognizes it


@pytest.mark.parametrize("shape", SHAPES)
def test_interface_names_unique(shape):
    net = net_for(*shape)
    intfs = [lk.host_intf for lk in net.cables()] + [lk.switch_intf for lk in net.cables()]
    assert len(intfs) == len(set(intfs))
    assert len(net.root_objects()) == len(set(net.root_objects()))


def test_host_interfaces_have_no_prefix():
    net = net_for(*DEFAULT)
    assert {lk.host_intf for lk in net.links_of("pe1")} == {"pe1-snic"} | {f"pe1-cnic{r}" for r in range(8)}


# -- addresses ---------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
def test_addresses_unique(shape):
    net = net_for(*shape)
    addrs = [lk.addr for lk in net.links]
    assert len(addrs) == len(set(addrs))


@pytest.mark.parametrize("shape", SHAPES)
def test_addresses_are_valid_host_addresses_of_a_16(shape):
    for lk in net_for(*shape).links:
        iface = ipaddress.ip_interface(lk.ip)
        assert iface.network.prefixlen == 16
        assert iface.ip not in (iface.network.network_address, iface.network.broadcast_address)


def test_address_plan_2p4d():
    net = net_for(*DEFAULT)
    ip = {(lk.host, lk.nic): lk.ip for lk in net.links}
    assert ip[("pe1", "snic")] == "10.10.1.1/16"
    assert ip[("de4", "snic")] == "10.10.2.4/16"
    assert ip[("st2", "nic")] == "10.10.3.2/16"
    assert ip[("pe2", "cnic0")] == "10.32.1.2/16"
    assert ip[("de3", "cnic7")] == "10.39.2.3/16"


@pytest.mark.parametrize("shape", SHAPES)
def test_rail_r_subnet_is_10_32_plus_r(shape):
    net = net_for(*shape)
    for lk in net.links:
        if lk.switch.startswith("rail"):
            r = int(lk.switch.removeprefix("rail"))
            assert lk.nic == f"cnic{r}"
            assert ipaddress.ip_interface(lk.ip).network == ipaddress.ip_network(f"10.{32 + r}.0.0/16")


@pytest.mark.parametrize("shape", SHAPES)
def test_storage_fabric_subnet_is_10_10(shape):
    net = net_for(*shape)
    for lk in net.links:
        if lk.switch == "stor":
            assert ipaddress.ip_interface(lk.ip).network == ipaddress.ip_network("10.10.0.0/16")


def test_role_octet_and_index():
    net = net_for(3, 5, 2, 4)
    role_octet = {"pe": 1, "de": 2, "st": 3}
    for lk in net.links:
        a, b, c, d = (int(x) for x in lk.addr.split("."))
        host = net.host(lk.host)
        assert c == role_octet[host.role]
        assert d == int(lk.host.removeprefix(host.role))


@pytest.mark.parametrize("shape", SHAPES)
def test_rails_and_storage_share_nothing(shape):
    net = net_for(*shape)
    stor = [lk for lk in net.links if lk.switch == "stor"]
    rails = [lk for lk in net.links if lk.switch != "stor"]
    assert {lk.host_intf for lk in stor}.isdisjoint({lk.host_intf for lk in rails})
    stor_net = ipaddress.ip_network("10.10.0.0/16")
    assert all(ipaddress.ip_address(lk.addr) not in stor_net for lk in rails)
    rail_nets = {ipaddress.ip_interface(lk.ip).network for lk in rails}
    assert stor_net not in rail_nets
    # one subnet per rail: no two rails share a subnet
    per_rail = {}
    for lk in rails:
        per_rail.setdefault(lk.switch, set()).add(ipaddress.ip_interface(lk.ip).network)
    assert all(len(nets) == 1 for nets in per_rail.values())
    assert len(set().union(*per_rail.values())) == len(per_rail)


def test_storage_servers_are_on_storage_fabric_only():
    net = net_for(*DEFAULT)
    for h in net.hosts:
        if h.role == "st":
            assert {lk.switch for lk in net.links_of(h.name)} == {"stor"}


# -- rates -------------------------------------------------------------------
@pytest.mark.parametrize("scale", [Scale(1e-4), Scale(2.5e-4, 0.5)])
def test_rates_per_class_equal_scaled_real_rates(scale):
    c = ClusterSpec(2, 4, gpus_per_node=8, cnic_rate_bps=200e9, snic_rate_bps=400e9, storage_nic_rate_bps=1600e9)
    net = cluster_net(c, scale, QUEUE_S)
    real = {"snic": c.snic_rate_bps, "cnic": c.cnic_rate_bps, "stnic": c.storage_nic_rate_bps}
    classes = Counter(lk.link_class for lk in net.links)
    assert classes == {"snic": 6, "cnic": 48, "stnic": 2}
    for lk in net.links:
        assert lk.rate_bps == pytest.approx(scale.rate(real[lk.link_class]), rel=1e-12)
        assert lk.queue_s == pytest.approx(QUEUE_S * scale.time_scale)  # a queue is real time, stretched


def test_link_class_follows_nic():
    net = net_for(*DEFAULT)
    for lk in net.links:
        expected = {"snic": "snic", "nic": "stnic"}.get(lk.nic, "cnic")
        assert lk.link_class == expected


# -- bounds ------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [
    dict(prefill_nodes=0, decode_nodes=1),
    dict(prefill_nodes=1, decode_nodes=0),
    dict(prefill_nodes=255, decode_nodes=1),
    dict(prefill_nodes=1, decode_nodes=1, storage_servers=0),
    dict(prefill_nodes=1, decode_nodes=1, gpus_per_node=0),
    dict(prefill_nodes=1, decode_nodes=1, gpus_per_node=33),
])
def test_out_of_range_cluster_refused(kwargs):
    with pytest.raises(ValueError):
        cluster_net(ClusterSpec(**kwargs), SCALE, QUEUE_S)


def test_net_validates():
    net_for(*DEFAULT).validate()  # raises on duplicates or dangling links


def test_management_network_is_unshaped_and_reaches_every_host():
    net = net_for(*DEFAULT)
    assert {c.host for c in net.control} == {h.name for h in net.hosts}
    assert all(c.switch == "mgmt" and c.nic == "mgmt" for c in net.control)
    addrs = {c.host: c.ip for c in net.control}
    assert addrs["pe2"] == "10.9.1.2/16" and addrs["de4"] == "10.9.2.4/16"
    assert addrs["st1"] == "10.9.3.1/16" and addrs["ctl1"] == "10.9.4.1/16"
    shaped_devs = {op.dev for op in net.tc_ops()}
    for c in net.control:
        assert c.host_intf not in shaped_devs and c.switch_intf not in shaped_devs
    assert net.switch("mgmt").bridge == "dp-mgmt"

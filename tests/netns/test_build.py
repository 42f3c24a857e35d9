"""Build and tear down the DEFAULT cluster (2P4D, 8 GPUs per node) through the library.

Asserts on real kernel state: named namespaces, bridges and their ports, HTB
classes at both ends of the links, TCP reachability over a rail and over the
storage fabric; then that teardown removes every name and the manifest.
"""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from netns_tools import MANIFEST, PYTHON, class_bytes, link_names, netns_names, sh

HOSTS = ["pe1", "pe2", "de1", "de2", "de3", "de4", "st1", "st2", "ctl1"]
COMPUTE = ["pe1", "pe2", "de1", "de2", "de3", "de4"]
RAILS = [f"dp-rail{r}" for r in range(8)]
BRIDGES = ["dp-stor"] + RAILS + ["dp-mgmt"]
PORTS = {"dp-stor": {f"dp-{h}-snic" for h in COMPUTE} | {"dp-st1-nic", "dp-st2-nic"},
         **{f"dp-rail{r}": {f"dp-{h}-cnic{r}" for h in COMPUTE} for r in range(8)},
         "dp-mgmt": {f"dp-{h}-mgmt" for h in HOSTS}}
PORT_COUNT = {"dp-stor": 8, "dp-mgmt": 9, **{r: 6 for r in RAILS}}
# 400 Gbit/s NICs and 1.6 Tbit/s storage NICs at bytes x 1e-4, as tc prints them
RATE = {"snic": "40Mbit", "cnic": "40Mbit", "nic": "160Mbit"}

PROBE_PORT = 7100
SERVER = r"""
import socket, sys
n = int(sys.argv[1])
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", %d))
s.listen(n)
print("listening", flush=True)
for _ in range(n):
    c, peer = s.accept()
    c.settimeout(10)
    data = c.recv(64)
    c.sendall(data[::-1])
    print(c.getsockname()[0], peer[0], data.decode(), flush=True)
    c.close()
""" % PROBE_PORT
CLIENT = r"""
import socket, sys
src, dst, msg = sys.argv[1], sys.argv[2], sys.argv[3]
c = socket.create_connection((dst, %d), timeout=10, source_address=(src, 0))
c.sendall(msg.encode())
print(c.recv(64).decode())
""" % PROBE_PORT


def tc_classes(dev: str, netns: str | None = None) -> dict[str, tuple[str, str]]:
    """{classid: (rate, ceil)} of the HTB classes on `dev`, from `tc class show`."""
    argv = ["tc"] + (["-n", netns] if netns else []) + ["class", "show", "dev", dev]
    out = sh(argv).stdout
    classes = {}
    for line in out.splitlines():
        m = re.match(r"class htb (\S+) .*\brate (\S+) ceil (\S+)", line)
        if m:
            classes[m.group(1)] = (m.group(2), m.group(3))
    return classes


def tc_qdiscs(dev: str, netns: str | None = None) -> list[str]:
    argv = ["tc"] + (["-n", netns] if netns else []) + ["qdisc", "show", "dev", dev]
    return [" ".join(line.split()[:5]) for line in sh(argv).stdout.splitlines() if line.strip()]


@pytest.mark.netns
def test_default_cluster_build_and_teardown():
    from emulator.net import Emulation
    from emulator.registry import Registry
    from scenarios import schema
    from scenarios.plan import make_plan

    plan = make_plan(schema.load("cluster"))
    assert sorted(h.name for h in plan.net.hosts) == sorted(HOSTS)  # the plan is the cluster we check
    netns = {f"dp-{h}" for h in HOSTS}
    switch_ports = {lk.switch_intf for lk in plan.net.cables()}
    assert switch_ports == set().union(*PORTS.values())

    with Registry() as reg:
        emu = Emulation(plan.net, reg, "pytest-default-build")
        try:
            emu.build()
            print(f"\ndefault cluster: build {emu.build_s:.2f}s "
                  f"({len(plan.net.hosts)} hosts, {len(plan.net.switches)} bridges, {len(plan.net.links)} links, "
                  f"{len(plan.tc_ops)} tc ops)")

            # the manifest was written before the objects and names all of them
            manifest = json.loads(MANIFEST.read_text())
            assert set(manifest["netns"]) == netns
            assert set(manifest["links"]) == set(BRIDGES) | switch_ports

            # namespaces, bridges, bridge ports
            assert netns <= netns_names()
            assert set(BRIDGES) <= link_names("type", "bridge")
            for bridge, ports in PORTS.items():
                got = link_names("master", bridge)
                assert len(got) == len(ports) == PORT_COUNT[bridge], (bridge, sorted(got))
                assert got == ports, (bridge, sorted(got))
            # the host side of each link lives in its namespace, not in the root one
            assert "pe1-snic" in link_names(netns="dp-pe1")
            assert "pe1-snic" not in link_names()

            # HTB at both ends: pe1-snic in dp-pe1 and its switch port in the root namespace
            assert tc_classes("pe1-snic", "dp-pe1") == {"1:1": ("40Mbit", "40Mbit"), "1:10": ("40Mbit", "40Mbit")}
            assert tc_classes("dp-pe1-snic") == {"1:1": ("40Mbit", "40Mbit"), "1:10": ("40Mbit", "40Mbit")}
            assert tc_qdiscs("pe1-snic", "dp-pe1") == ["qdisc htb 1: root refcnt", "qdisc bfifo 10: parent 1:10"]
            # ... and on every other link, both ends, at its class's rate; the compute fabric with the traffic
            # classes (collectives 98.5%, KV 1%, unmarked 0.5% of 40 Mbit/s, all borrowing up to the link rate)
            for lk in plan.net.links:
                rate = RATE["cnic" if lk.nic.startswith("cnic") else lk.nic]
                want = {"1:1": (rate, rate), "1:10": (rate, rate)}
                if lk.nic.startswith("cnic"):
                    want = {"1:1": (rate, rate), "1:10": ("200Kbit", rate), "1:11": ("39400Kbit", rate),
                            "1:12": ("400Kbit", rate)}
                assert tc_classes(lk.host_intf, f"dp-{lk.host}") == want, lk.host_intf
                assert tc_classes(lk.switch_intf) == want, lk.switch_intf
            assert sorted(tc_qdiscs("pe1-cnic0", "dp-pe1")) == [
                "qdisc bfifo 10: parent 1:10", "qdisc bfifo 11: parent 1:11", "qdisc bfifo 12: parent 1:12",
                "qdisc htb 1: root refcnt"]
            # the management network is not shaped at either end
            for c in plan.net.control:
                assert tc_classes(c.host_intf, f"dp-{c.host}") == {}, c.host_intf
                assert tc_classes(c.switch_intf) == {}, c.switch_intf

            # TCP from pe1 to de1 over rail0, rail7, the storage fabric and the management network
            probes = [("10.32.1.1", "10.32.2.1"), ("10.39.1.1", "10.39.2.1"), ("10.10.1.1", "10.10.2.1"),
                      ("10.9.1.1", "10.9.2.1")]
            server = emu.procs.start("probe-server", "dp-de1", [PYTHON, "-c", SERVER, str(len(probes))])
            assert server.stdout.readline().strip() == "listening", server.stderr.read()
            for i, (src, dst) in enumerate(probes):
                msg = f"probe{i}"
                res = subprocess.run(["ip", "netns", "exec", "dp-pe1", PYTHON, "-c", CLIENT, src, dst, msg],
                                     capture_output=True, text=True, timeout=30)
                assert res.returncode == 0, f"{src} -> {dst}: {res.stderr}"
                assert res.stdout.strip() == msg[::-1]
            out, err = server.communicate(timeout=10)
            # the lean counter reader agrees with tc on every class of a link that carried the probes
            from emulator.kernel import netlink
            from emulator.tcstats import ClassCounters

            for ns, dev in (("dp-pe1", "pe1-cnic0"), (None, "dp-de1-cnic0"), ("dp-pe1", "pe1-mgmt")):
                ipr = netlink(ns)
                (idx,) = ipr.link_lookup(ifname=dev)
                ipr.close()
                reader = ClassCounters(ns)
                got = reader.dump(idx)
                reader.close()
                for handle, classid in ((0x10001, "1:1"), (0x10010, "1:10")):
                    if dev.endswith("mgmt"):
                        assert handle not in got  # unshaped: no classes at all
                    else:
                        assert got[handle][0] == class_bytes(dev, classid, ns) > 0, (dev, classid)
            seen = [line.split() for line in out.splitlines()]
            assert seen == [[dst, src, f"probe{i}"] for i, (src, dst) in enumerate(probes)], (out, err)
            assert server.returncode == 0, err
        finally:
            left = emu.teardown()
        print(f"default cluster: teardown {emu.teardown_s:.2f}s")

        assert left == []
        assert not (netns & netns_names())
        assert not ((set(BRIDGES) | switch_ports) & link_names())
        assert not MANIFEST.exists()

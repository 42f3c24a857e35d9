"""Traffic classes on the compute fabric: KV and collectives carry their DSCP and land in their HTB class.

A small `dpemu run default_g1` (DualPath, with MoE AllToAll collectives, isolation
on). While it runs, scapy captures on a compute-fabric switch port (in the root
namespace, where the bridge ports live) and the test checks the DSCP of every
data packet; afterwards the per-class HTB counters in links.csv must put the
KV bytes in the kv class (1:12) and the collectives in theirs (1:11).
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from emulator.calibrate import BASE_PORT
from netns_tools import DPEMU, assert_nothing_left, dpemu_env

PORT = "dp-de1-cnic0"  # the decode node's compute NIC, switch side: KV from and to the prefill node crosses it
DSCP_KV, DSCP_COLLECTIVE = 10, 46
CALIBRATION_PORTS = set(range(BASE_PORT, BASE_PORT + 1000))
SMALL = ["--set", "serving.collectives=true", "--set", "serving.modes=[dualpath]",
         "--set", "serving.workload.agents=24", "--set", "serving.workload.turns_per_agent=2"]


@pytest.fixture(scope="module")
def captured_run(tmp_path_factory, machine_free):
    from scapy.all import IP, TCP, AsyncSniffer

    out = tmp_path_factory.mktemp("classes-run")
    proc = subprocess.Popen([DPEMU, "run", "default_g1", *SMALL, "--out", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dpemu_env())
    sniffer = None
    deadline = time.monotonic() + 120
    while sniffer is None and proc.poll() is None and time.monotonic() < deadline:
        if Path(f"/sys/class/net/{PORT}").exists():
            # (DSCP, carries data) of every TCP segment but calibration's (iperf3, unmarked, before serving)
            sniffer = AsyncSniffer(iface=PORT, store=False, lfilter=lambda p: IP in p and TCP in p and not (
                                       {p[TCP].sport, p[TCP].dport} & CALIBRATION_PORTS),
                                   prn=lambda p: seen.update({(p[IP].tos >> 2, len(p[TCP].payload) > 0): 1}))
            seen: Counter = Counter()
            sniffer.start()
        else:
            time.sleep(0.05)
    stdout, stderr = proc.communicate(timeout=600)
    if sniffer is not None:
        try:
            sniffer.stop()
        except Exception:  # noqa: BLE001 - the port vanished with the teardown: the sniffer stopped on its own
            pass
    assert sniffer is not None, f"{PORT} never appeared: {stderr[-2000:]}"
    return proc.returncode, stdout, stderr, out, seen


@pytest.mark.netns
def test_kv_packets_carry_their_dscp_and_land_in_the_kv_class(captured_run):
    rc, stdout, stderr, out, seen = captured_run
    print(stdout[-3000:], dict(seen))
    assert rc in (0, 3), stderr[-3000:]
    data = {dscp: n for (dscp, has_data), n in seen.items() if has_data}
    assert data.get(DSCP_KV, 0) > 50, f"no KV data packets marked {DSCP_KV} on {PORT}: {dict(seen)}"
    assert data.get(DSCP_COLLECTIVE, 0) > 50, f"no collective packets marked {DSCP_COLLECTIVE}: {dict(seen)}"
    assert set(data) == {DSCP_KV, DSCP_COLLECTIVE}, f"data packets with another DSCP on the compute fabric: {data}"

    (run_dir,) = (out / "default_g1").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    first: dict[tuple[str, str, str], int] = {}
    moved: dict[tuple[str, str, str], int] = {}  # bytes this mode moved: counters are cumulative since build
    for r in csv.DictReader((run_dir / "dualpath" / "links.csv").open()):
        if r["link_class"] == "cnic":
            key = (r["link"], r["direction"], r["tclass"])
            first.setdefault(key, int(r["bytes"]))
            moved[key] = int(r["bytes"]) - first[key]
    totals = Counter()
    for (link, direction, tclass), nbytes in moved.items():
        if tclass == "link":
            leaves = sum(moved[(link, direction, t)] for t in ("default", "collective", "kv"))
            assert leaves == nbytes, (link, direction)  # the leaves add up to the link
        totals[tclass] += nbytes
    print(dict(totals))
    assert totals["kv"] > 0 and totals["collective"] > 0
    assert totals["default"] <= 0.01 * totals["link"]  # nothing unmarked on the compute fabric
    coll = summary["modes"]["dualpath"]["collectives"]
    assert coll["prefill"]["count"] > 0 and coll["decode"]["count"] > 0
    assert (run_dir / "dualpath" / "collectives.csv").exists()
    assert summary["ledger"]["blocks_corrupt"] == 0
    assert_nothing_left("after the traffic-class run")


@pytest.mark.netns
def test_reshape_touches_the_compute_fabric_only_and_skbs_are_capped_on_both(machine_free):
    """Emulation.reshape, as the isolation experiment uses it between runs: only the compute-fabric ends
    change, and their class tree is exactly the new plan's. Every end of every link, both fabrics, has its skbs
    capped (emulation.skb) before and after."""
    from emulator.net import Emulation
    from emulator.registry import Registry
    from emulator.tcplan import gso_limits
    from scenarios import schema
    from scenarios.plan import make_plan

    def classes(netns: str | None, dev: str) -> set[str]:
        argv = ["tc"] + (["-n", netns] if netns else []) + ["class", "show", "dev", dev]
        out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
        return {line.split()[2] for line in out.splitlines() if line.startswith("class htb")}

    def gso(netns: str | None, dev: str) -> tuple[int, int]:
        argv = ["ip"] + (["-n", netns] if netns else []) + ["-d", "link", "show", "dev", dev]
        words = subprocess.run(argv, capture_output=True, text=True, check=True).stdout.split()
        return int(words[words.index("gso_max_size") + 1]), int(words[words.index("gso_max_segs") + 1])

    on = make_plan(schema.load("tiny", ["emulation.skb=0.5ms"]))
    off = make_plan(schema.load("tiny", ["traffic_classes.isolation=false", "emulation.skb=0.5ms"]))
    cnics = [lk for lk in on.net.links if lk.link_class == "cnic"]

    def both_ends(lk):
        return [(on.net.host(lk.host).netns, lk.host_intf), (None, lk.switch_intf)]

    with Registry() as reg:
        emu = Emulation(on.net, reg, "pytest-reshape")
        try:
            emu.build()
            ends = [e for lk in cnics for e in both_ends(lk)]
            assert all(classes(*e) == {"1:1", "1:10", "1:11", "1:12"} for e in ends)
            for lk in on.net.links:  # 100 Mbit/s for 0.5 ms = 6250 B: 4 full segments, on both fabrics
                assert lk.skb_segs == 4
                assert all(gso(*e) == gso_limits(4) for e in both_ends(lk)), lk
            assert emu.reshape(off.net) == len(ends)  # the storage fabric is left alone
            assert all(classes(*e) == {"1:1", "1:10"} for e in ends)
            assert emu.reshape(on.net) == len(ends)
            assert all(classes(*e) == {"1:1", "1:10", "1:11", "1:12"} for e in ends)
            assert all(gso(*e) == gso_limits(4) for lk in on.net.links for e in both_ends(lk))
        finally:
            assert emu.teardown() == []


def _quantile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


@pytest.mark.netns
def test_isolation_keeps_collectives_fast_beside_a_kv_bulk_flow_on_the_wire(machine_free, tmp_path):
    """The wire alone, no serving daemons: decode-sized AllToAlls de1 -> de2, de3 (DSCP 46) while an iperf3
    bulk flow marked as KV (DSCP 10) fills de1's CNIC towards pe1. With isolation on they keep their
    unloaded completion times; with isolation off they queue behind the KV bytes in the one FIFO."""
    from emulator.net import Emulation
    from emulator.registry import Registry
    from netns_tools import PYTHON
    from scenarios import schema
    from scenarios.plan import make_plan

    on = make_plan(schema.load("isolation"))
    off = make_plan(schema.load("isolation", ["traffic_classes.isolation=false"]))
    ip = {h: next(lk.ip.split("/")[0] for lk in on.net.links if lk.host == h and lk.link_class == "cnic")
          for h in ("pe1", "de1", "de2", "de3")}
    ms: dict[tuple[str, bool], list[float]] = {}
    with Registry() as reg:
        emu = Emulation(on.net, reg, "pytest-wire-isolation")
        try:
            emu.build()
            for iso, plan in (("on", on), ("off", off)):
                emu.reshape(plan.net)
                receivers = [emu.procs.start(f"recv-{h}", plan.net.host(h).netns, [
                    PYTHON, "-m", "traffic.collectives", "serve", "--listen", f"{ip[h]}:7300", "--dscp", "46"])
                    for h in ("de2", "de3")]
                try:
                    assert all(r.stdout.readline().startswith("ready") for r in receivers)
                    for load in (False, True):
                        bulk = []
                        if load:
                            bulk.append(emu.procs.start("kv-sink", plan.net.host("pe1").netns, [
                                "iperf3", "-s", "-1", "-B", ip["pe1"], "-p", "5990", "--forceflush"]))
                            assert "listening" in bulk[0].stdout.readline() + bulk[0].stdout.readline()
                            bulk.append(emu.procs.start("kv-bulk", plan.net.host("de1").netns, [
                                "iperf3", "-c", ip["pe1"], "-B", ip["de1"], "-p", "5990", "-S", str(10 << 2),
                                "-t", "6"]))
                            time.sleep(1.5)  # the bulk flow fills the link before the first collective
                        out = tmp_path / f"{iso}-{load}.csv"
                        send = emu.procs.start("send", plan.net.host("de1").netns, [
                            PYTHON, "-m", "traffic.collectives", "send", "--peers",
                            f"{ip['de2']}:7300,{ip['de3']}:7300", "--dscp", "46", "--bytes", "1700",
                            "--count", "200", "--gap-ms", "10", "--out", str(out)])
                        assert send.wait(timeout=60) == 0, send.stderr.read()
                        for p in bulk:
                            assert p.wait(timeout=30) == 0, p.stderr.read()
                        ms[iso, load] = [float(r["completion_s"]) * 1e3 for r in csv.DictReader(out.open())]
                finally:
                    for r in receivers:
                        emu.procs.stop(r)
        finally:
            assert emu.teardown() == []
    p50 = {k: _quantile(v, 0.5) for k, v in ms.items()}
    p90 = {k: _quantile(v, 0.9) for k, v in ms.items()}
    print({k: (round(p50[k], 2), round(p90[k], 2), round(_quantile(v, 0.99), 2)) for k, v in ms.items()})
    assert all(len(v) == 200 for v in ms.values())
    assert p50["on", True] < 2 * p50["on", False] + 0.5  # isolated: the KV flow barely shows
    assert p50["off", True] > 4 * p50["off", False]  # one FIFO: each collective waits behind KV bytes
    assert p90["off", True] > 3 * p90["on", True]
    assert_nothing_left("after the wire isolation test")


@pytest.mark.netns
def test_skbs_on_the_wire_stay_within_the_cap_and_dequeue_on_time(machine_free):
    """A bulk TCP flow through a shaped link: the dequeue trace sees GSO skbs (more than one segment) but never
    more segments than the link's cap, and the busy gaps follow the configured rate."""
    from emulator import calibrate, dequeue
    from emulator.monitor import CpuSampler
    from emulator.net import Emulation
    from emulator.registry import Registry
    from scenarios import schema
    from scenarios.plan import make_plan

    plan = make_plan(schema.load("tiny", ["emulation.skb=0.5ms"]))
    test = next(t for t in plan.tests if t.targets[0].link.link_class == "snic")
    target = test.targets[0]  # pe1-snic up: saturated by its own flow
    with Registry() as reg:
        emu = Emulation(plan.net, reg, "pytest-skbcap")
        try:
            emu.build()
            mon = dequeue.DequeueMonitor([dequeue.Watched(target.dev, target.link.rate_bps, "snic")], on_s=10,
                                         off_s=1)
            mon.start()
            try:  # one round's flows, without calibrate.run's own monitor (one tracefs instance at a time)
                calibrate._run_round(emu, [test], 4.0, sys.executable, CpuSampler())
            finally:
                errors = mon.stop()
            port = mon.timing.ports[target.dev]
            assert 1 < port.max_segs <= target.link.skb_segs == 4, port.max_segs
            s = dequeue.summarize(dequeue.histogram(errors["snic"]))
            print(s)
            assert s["gaps"] > 1000 and s["abs_p50"] < 0.1, s
        finally:
            assert emu.teardown() == []
    assert not (dequeue.TRACEFS / "instances" / dequeue.INSTANCE).exists()

"""Traffic classes on the compute fabric: KV is marked with its DSCP and lands in its HTB class.

A `dpemu run serving_tiny` with isolation on (the default). While it runs, scapy
captures on a compute-fabric switch port (in the root namespace, where the
bridge ports live) and the test checks every KV packet's DSCP; afterwards the
per-class HTB counters in links.csv must put the KV bytes in the kv class.
Collectives get their own class too (1:11, DSCP 46); nothing sends them yet,
so their class must stay empty here.
"""

from __future__ import annotations

import csv
import json
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from emulator.calibrate import BASE_PORT
from netns_tools import DPEMU, assert_nothing_left, dpemu_env

PORT = "dp-de1-cnic0"  # the decode node's compute NIC, switch side: KV from and to the prefill node crosses it
DSCP_KV, DSCP_COLLECTIVE = 10, 46
CALIBRATION_PORTS = set(range(BASE_PORT, BASE_PORT + 1000))


@pytest.fixture(scope="module")
def captured_run(tmp_path_factory, machine_free):
    from scapy.all import IP, TCP, AsyncSniffer

    out = tmp_path_factory.mktemp("classes-run")
    proc = subprocess.Popen([DPEMU, "run", "serving_tiny", "--out", str(out)], stdout=subprocess.PIPE,
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
    assert data.get(DSCP_KV, 0) > 100, f"no KV data packets marked {DSCP_KV} on {PORT}: {dict(seen)}"
    assert set(data) == {DSCP_KV}, f"data packets with another DSCP on the compute fabric: {data}"

    (run_dir,) = (out / "serving_tiny").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    for mode in ("basic", "dualpath"):
        first: dict[tuple[str, str, str], int] = {}
        last: dict[tuple[str, str, str], int] = {}  # bytes this mode moved: counters are cumulative since build
        for r in csv.DictReader((run_dir / mode / "links.csv").open()):
            if r["link_class"] == "cnic":
                key = (r["link"], r["direction"], r["tclass"])
                first.setdefault(key, int(r["bytes"]))
                last[key] = int(r["bytes"]) - first[key]
        for (link, direction, tclass), nbytes in last.items():
            if tclass != "link":
                continue
            kv, coll = last[(link, direction, "kv")], last[(link, direction, "collective")]
            default = last[(link, direction, "default")]
            assert kv + coll + default == nbytes, (mode, link, direction)  # the leaves add up to the link
            if nbytes > 100_000:
                assert kv >= 0.95 * nbytes, (mode, link, direction, kv, nbytes)
            assert coll == 0, (mode, link, direction)  # nothing sends collectives in this run
    assert summary["ledger"]["blocks_corrupt"] == 0
    assert_nothing_left("after the traffic-class run")

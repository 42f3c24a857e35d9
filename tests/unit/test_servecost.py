"""scenarios.servecost: role_of on the daemons' argv names, figures from two synthetic snapshots (CPU per turn
per role, "other" as the machine's total less the roles) and rpc_per_turn from a synthetic daemons.status reply
(uint64 counters as strings, as MessageToDict renders them), divided per turn; and snapshot on this process."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from scenarios import servecost


def rpc(method: str, calls: int, mi: int, mo: int, bi: int, bo: int) -> dict:
    return {"method": method, "calls": str(calls), "messages_in": str(mi), "messages_out": str(mo),
            "bytes_in": str(bi), "bytes_out": str(bo)}


STATUS = {
    "nodes": {
        "pe1": {"role": "pe", "rpcs": [rpc("/dualpath.v1.Node/PushKv", 3, 3, 3, 300, 30),
                                       rpc("/dualpath.v1.Node/Prefill", 2, 2, 2, 100, 50)]},
        "de1": {"role": "de", "rpcs": [rpc("/dualpath.v1.Node/PushKv", 4, 4, 4, 400, 40)]},
        "de2": {"role": "de", "rpcs": [rpc("/dualpath.v1.Node/Decode", 1, 1, 5, 10, 500)]},
    },
    "storage": {
        "10.10.3.1:7000": {"rpcs": [rpc("/dualpath.v1.Storage/Read", 2, 2, 6, 60, 6000)]},
        "10.10.3.2:7000": {"rpcs": [rpc("/dualpath.v1.Storage/Read", 1, 1, 3, 30, 3000),
                                    rpc("/dualpath.v1.Storage/Write", 1, 1, 1, 1000, 10)]},
    },
    "scheduler": {"rpcs": [rpc("/dualpath.v1.Scheduler/Route", 5, 5, 5, 250, 250)]},
    "ledger": {},
}

BEFORE = {"daemons": {"storage st1": 1.0, "node pe1": 2.0, "node de1": 3.0, "node de2": None, "scheduler": 0.5,
                      "mystery": 0.0},
          "runner": 10.0, "machine": 100.0}
AFTER = {"daemons": {"storage st1": 3.0, "storage st2": 2.0, "node pe1": 6.0, "node de1": 4.0, "node de2": 9.0,
                     "scheduler": 1.0, "mystery": 5.0},
         "runner": 11.0, "machine": 120.0}


@pytest.mark.parametrize("what, role", [
    ("storage st1", "storage"), ("node pe1", "prefill"), ("node pe12", "prefill"), ("node de3", "decode"),
    ("scheduler", "scheduler"), ("driver", None), ("node ctl1", None), ("storage", None), ("scheduler x", None),
])
def test_role_of(what, role):
    assert servecost.role_of(what) == role


def test_figures_cpu_per_turn():
    f = servecost.figures(BEFORE, AFTER, driver_cpu_s=1.5, turns=4, wall_s=8.0, status=STATUS)
    assert f["turns"] == 4 and f["wall_s"] == 8.0 and f["turns_per_wall_s"] == 0.5
    # storage: st1 3 - 1 = 2 s (st2 was not in `before`: skipped); prefill 6 - 2 = 4; decode de1 4 - 3 = 1 (de2's
    # first sample is None: skipped); scheduler 0.5; "mystery" has no role; driver 1.5; runner 11 - 10 = 1;
    # machine 120 - 100 = 20, so other = 20 - (2 + 4 + 1 + 0.5 + 1.5 + 1) = 10; per turn of 4, in ms
    assert f["cpu_core_ms_per_turn"] == {"storage": 500.0, "prefill": 1000.0, "decode": 250.0, "scheduler": 125.0,
                                         "driver": 375.0, "runner": 250.0, "other": 2500.0, "total": 5000.0}
    assert list(f["cpu_core_ms_per_turn"]) == [*servecost.ROLES, "total"]


def test_figures_other_never_negative_and_edge_cases():
    after = {**AFTER, "machine": 101.0}  # the machine's count says 1 s, less than the roles' 10
    f = servecost.figures(BEFORE, after, driver_cpu_s=None, turns=0, wall_s=0.0, status={})
    cpu = f["cpu_core_ms_per_turn"]
    assert cpu["other"] == 0.0 and cpu["driver"] == 0.0
    assert cpu["total"] == 1000.0 and cpu["storage"] == 2000.0  # 0 turns: divided by 1
    assert f["turns"] == 0 and f["turns_per_wall_s"] is None


def test_rpc_per_turn_from_status():
    r = servecost.figures(BEFORE, AFTER, 1.5, turns=2, wall_s=1.0, status=STATUS)["rpc_per_turn"]
    assert list(r) == ["total", "storage", "prefill", "decode", "scheduler"]
    # storage over both servers: calls 2 + 1 + 1 = 4, messages 8 + 4 + 2 = 14, bytes 6060 + 3030 + 1010 = 10100
    assert r["storage"] == {"calls": 2.0, "messages": 7.0, "bytes": 5050.0, "methods": {
        "Read": {"calls": 1.5, "messages": 6.0, "bytes": 4545.0},
        "Write": {"calls": 0.5, "messages": 1.0, "bytes": 505.0}}}
    # prefill: PushKv 3 calls, 6 messages, 330 B; Prefill 2, 4, 150
    assert r["prefill"] == {"calls": 2.5, "messages": 5.0, "bytes": 240.0, "methods": {
        "PushKv": {"calls": 1.5, "messages": 3.0, "bytes": 165.0},
        "Prefill": {"calls": 1.0, "messages": 2.0, "bytes": 75.0}}}
    # decode over de1 and de2: PushKv 4, 8, 440; Decode 1, 6, 510
    assert r["decode"] == {"calls": 2.5, "messages": 7.0, "bytes": 475.0, "methods": {
        "PushKv": {"calls": 2.0, "messages": 4.0, "bytes": 220.0},
        "Decode": {"calls": 0.5, "messages": 3.0, "bytes": 255.0}}}
    assert r["scheduler"] == {"calls": 2.5, "messages": 5.0, "bytes": 250.0, "methods": {
        "Route": {"calls": 2.5, "messages": 5.0, "bytes": 250.0}}}
    # total: calls 4 + 5 + 5 + 5 = 19, messages 14 + 10 + 14 + 10 = 48, bytes 10100 + 480 + 950 + 500 = 12030
    assert r["total"] == {"calls": 9.5, "messages": 24.0, "bytes": 6015.0}


def test_rpc_per_turn_rounding():
    r = servecost.rpc_per_turn(STATUS, 3)
    assert r["storage"]["calls"] == 1.33 and r["storage"]["messages"] == 4.67  # 4 / 3, 14 / 3
    assert r["storage"]["bytes"] == 3367.0  # 10100 / 3 = 3366.7, bytes to the unit
    assert r["total"]["bytes"] == 4010.0  # 12030 / 3


def test_rpc_per_turn_empty_status():
    assert servecost.rpc_per_turn({}, 1) == {"total": {"calls": 0, "messages": 0, "bytes": 0},
                                             "scheduler": {"calls": 0, "messages": 0, "bytes": 0, "methods": {}}}


def test_snapshot_of_this_process():
    me = SimpleNamespace(pid=os.getpid())
    s = servecost.snapshot([("node pe1", me)])
    assert set(s) == {"daemons", "runner", "machine"}
    assert abs(s["daemons"]["node pe1"] - s["runner"]) < 0.1  # the same process, read twice
    assert s["runner"] > 0 and s["machine"] >= s["runner"]

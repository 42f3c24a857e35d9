"""Faults in namespaces (issue 13): every kind injected into a real DualPath run of the `faults` scenario,
shortened, and what the cluster did about it. Three runs:

- transient faults (a storage server and a decode node stopped, a SNIC and a CNIC down), two replicas: every
  turn finishes, nothing is lost, the ledger adds up exactly, each link's stall is measured;
- kills (a decode node, a prefill node, a storage server), two replicas: the scheduler takes the dead nodes
  out and places their turns again, reads fall back to the live copy: every turn finishes, nothing is lost;
- a storage server killed with one copy of each block: turns fail and are counted, their blocks are counted
  lost, the run still ends with its summary, a paragraph naming the fault and exit code 4.

Each run must leave nothing behind.
"""

from __future__ import annotations

import json

import pytest

from netns_tools import assert_nothing_left, describe, run_dpemu

SHORT = ["--set", "sweep=null", "--set", "serving.workload.agents=32", "--set", "serving.workload.turns_per_agent=4"]
TRANSIENT = "[{at: 1.5, kind: stop, target: st1, for: 1.5}, {at: 3.5, kind: link_down, target: pe1-snic, for: 1.5}, " \
            "{at: 5.5, kind: link_down, target: de1-cnic0, for: 1.5}, {at: 7.5, kind: stop, target: de2, for: 1.5}]"
KILLS = "[{at: 2, kind: kill, target: de2}, {at: 4, kind: kill, target: pe2}, {at: 6, kind: kill, target: st2}]"
STORAGE_KILL = "[{at: 1, kind: kill, target: st2}]"


def _run(tmp_path_factory, name: str, faults: str, replicas: int):
    out = tmp_path_factory.mktemp(name)
    res = run_dpemu("run", "faults", *SHORT, "--set", f"faults={faults}", "--set",
                    f"cluster.storage.replicas={replicas}", "--out", str(out), timeout=600)
    print(res.stdout[-3000:])
    assert_nothing_left(f"after the {name} run")
    (run_dir,) = (out / "faults").iterdir()
    assert "Traceback" not in res.stdout + res.stderr, describe(res)
    return res, json.loads((run_dir / "summary.json").read_text())


@pytest.fixture(scope="module")
def transient(tmp_path_factory, machine_free):
    return _run(tmp_path_factory, "transient", TRANSIENT, 2)


@pytest.fixture(scope="module")
def kills(tmp_path_factory, machine_free):
    return _run(tmp_path_factory, "kills", KILLS, 2)


@pytest.fixture(scope="module")
def storage_kill(tmp_path_factory, machine_free):
    return _run(tmp_path_factory, "storage-kill", STORAGE_KILL, 1)


def _effects(summary: dict) -> dict[str, dict]:
    return {e["target"]: e for e in summary["modes"]["dualpath"]["faults"]["effects"]}


@pytest.mark.netns
@pytest.mark.parametrize("target", ["st1", "pe1-snic", "de1-cnic0", "de2"])
def test_a_transient_fault_delays_turns_and_loses_nothing(transient, target):
    res, summary = transient
    assert res.returncode in (0, 3), describe(res)  # every turn finished: no exit 4
    m = summary["modes"]["dualpath"]
    e = _effects(summary)[target]
    assert e["injected"] and e["undone_s"] is not None and e["undone_s"] > e["injected_s"]
    assert e["requests"]["failed"] == 0 and e["requests"]["retried"] == 0 and e["blocks_lost"] == 0
    if "-" in target:  # a link: TCP stalled while it was down and came back
        assert e["stall"]["resumed"] and e["stall"]["stalled_s"] >= 1.4, e["stall"]
    assert m["requests"] == 32 * 4 and m["failed"]["turns"] == 0
    assert m["ledger"]["blocks_lost"] == m["ledger"]["blocks_corrupt"] == 0
    assert m["ledger"]["unchecked"] == 0  # no transfer was cut: every block moved was checked by its receiver


@pytest.mark.netns
@pytest.mark.parametrize("target", ["de2", "pe2", "st2"])
def test_with_replicas_a_killed_daemon_costs_retries_not_turns(kills, target):
    res, summary = kills
    assert res.returncode in (0, 3), describe(res)
    m = summary["modes"]["dualpath"]
    e = _effects(summary)[target]
    assert e["injected"] and e["blocks_lost"] == 0 and e["requests"]["failed"] == 0
    if not target.startswith("st"):  # the scheduler saw the node die and took it out
        assert target in e["nodes_dead"]
    assert m["requests"] == 32 * 4 and m["failed"]["turns"] == 0 and m["ledger"]["blocks_lost"] == 0
    assert len(m["failed"]["unreachable_daemons"]) == 3  # the three killed, found dead at the end
    assert summary["fidelity"]["ok"] or not any("lost" in r for r in summary["fidelity"]["reasons"])


@pytest.mark.netns
def test_without_replicas_a_killed_storage_server_fails_turns_and_says_so(storage_kill):
    res, summary = storage_kill
    assert res.returncode == 4, describe(res)
    m = summary["modes"]["dualpath"]
    e = _effects(summary)["st2"]
    assert e["requests"]["failed"] > 0 and e["blocks_lost"] > 0
    assert m["failed"]["turns"] == summary["failed_turns"] == e["requests"]["failed"]
    assert m["requests"] + m["failed"]["turns"] + m["failed"]["abandoned"] == 32 * 4  # every turn accounted for
    assert m["ledger"]["blocks_lost"] == e["blocks_lost"]
    assert "kill st2 at" in res.stdout and "failed" in m["faults"]["message"]

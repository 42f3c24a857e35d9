"""How a run with faults is judged and told (no root): the faults' validation, the ledger's verdict, the exit
code and the paragraphs the terminal prints."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from emulator.errors import ConfigError
from scenarios import schema, terminal
from scenarios.results import ledger_problems

CLEAN = {"blocks_read": 10, "blocks_written": 2, "blocks_forwarded": 5, "blocks_verified": 17, "blocks_corrupt": 0,
         "blocks_lost": 0, "unchecked": 0}


def _plan(replicas: int):
    return SimpleNamespace(scenario=SimpleNamespace(cluster=SimpleNamespace(storage=SimpleNamespace(
        replicas=replicas))))


def _fault(injected=True):
    return {"fault": "kill st2 at 19 s", "injected": injected}


def test_every_fault_problem_is_named_with_its_field():
    with pytest.raises(ConfigError) as exc:
        schema.load("faults", ["sweep=null", "cluster.storage.replicas=3",
                               "faults=[{at: 1, kind: kill, target: st9}, {at: 2, kind: link_down, target: pe1-cnic3,"
                               " for: 1}, {at: 3, kind: stop, target: de1, for: 1, modes: [basic]}]"])
    text = str(exc.value)
    for field in ("cluster.storage.replicas", "faults.0.target", "faults.1.target", "faults.2.modes"):
        assert field in text, text
    with pytest.raises(ConfigError, match="needs 'for'"):
        schema.load("faults", ["sweep=null", "faults=[{at: 1, kind: stop, target: de1}]"])
    with pytest.raises(ConfigError, match="past the workload"):
        schema.load("faults", ["sweep=null", "serving.workload.arrival_rate=2",
                               "faults=[{at: 100, kind: kill, target: de1}]"])


def test_a_lost_block_fails_the_verdict_unless_a_fault_lost_it_with_one_copy():
    lost = {**CLEAN, "blocks_lost": 7}
    assert ledger_problems(_plan(1), {"dualpath": {"ledger": CLEAN}}) == []
    assert ledger_problems(_plan(1), {"dualpath": {"ledger": lost}})  # no fault: untrusted
    with_fault = {"ledger": lost, "faults": {"effects": [_fault()]}}
    assert ledger_problems(_plan(1), {"dualpath": with_fault}) == []  # one copy: the fault's, reported
    assert ledger_problems(_plan(2), {"dualpath": with_fault})  # replicas: a fault must lose nothing
    assert ledger_problems(_plan(1), {"dualpath": {"ledger": {**CLEAN, "blocks_corrupt": 1},
                                                   "faults": {"effects": [_fault()]}}})  # corrupt: always
    assert ledger_problems(_plan(1), {"m": {"ledger": {**CLEAN, "unchecked": 3}}})  # does not add up
    assert "was not injected" in ledger_problems(_plan(1), {"m": {"ledger": CLEAN, "faults": {
        "effects": [_fault(injected=False)]}}})[0]


def test_exit_code_and_paragraphs():
    ok = {"fidelity": {"ok": True}, "modes": {"dualpath": {"failed": {"turns": 0}}}}
    assert terminal.exit_code(ok) == terminal.EXIT_OK and terminal.failure_paragraphs(ok) == []
    assert terminal.exit_code({**ok, "fidelity": {"ok": False}}) == terminal.EXIT_UNTRUSTED
    failed = {"fidelity": {"ok": False}, "failed_turns": 3, "modes": {"dualpath": {
        "failed": {"turns": 3, "abandoned": 2, "unreachable_daemons": ["10.9.3.2:7000"]},
        "faults": {"message": "In mode dualpath: kill st2 at 19.0 s: 3 failed."}}}}
    assert terminal.exit_code(failed) == terminal.EXIT_FAILED == 4
    assert terminal.failure_paragraphs(failed) == ["In mode dualpath: kill st2 at 19.0 s: 3 failed."]
    unplanned = {"fidelity": {"ok": True}, "failed_turns": 1, "modes": {"basic": {
        "failed": {"turns": 1, "abandoned": 0, "unreachable_daemons": ["10.9.3.1:7000"]}}},
        "aborted": {"mode": "dualpath", "error": "the workload driver failed."}}
    lines = terminal.failure_paragraphs(unplanned)
    assert "no fault injected" in lines[0] and "10.9.3.1:7000" in lines[0]
    assert lines[1].startswith("Mode dualpath did not finish") and "(basic)" in lines[1]
    assert terminal.exit_code(unplanned) == terminal.EXIT_FAILED

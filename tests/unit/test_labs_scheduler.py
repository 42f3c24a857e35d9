"""Lab 4 (write the scheduler): its policy file checked before anything runs, its sweep, and the grade of
synthetic sweep directories: a starter-like result fails for the right reasons, a solution-like one passes."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import yaml

from emulator.errors import ConfigError
from scenarios import labs, labs_scheduler, schema

LAB = labs.find("4")
STARTER = LAB.path / "policy.py"
SOLUTION = LAB.path / "solution" / "policy.py"
SNIC_BPS = 20e6  # 50 Gbit/s x 6.4e-4 / 1.6


def _run(root: Path, label: str, policy: str, balance: float, jct: float, paths: tuple[int, int],
         events: list | None = None, trusted: bool = True) -> dict:
    """One run directory of the lab's sweep: summary.json, scenario.yaml, links.csv and the scheduler's events."""
    run = root / label
    (run / "dualpath").mkdir(parents=True)
    de_share = paths[1] / sum(paths)
    summary = {
        "modes": {"dualpath": {"jct_s": jct, "requests": sum(paths), "paths": {"pe": paths[0], "de": paths[1],
                                                                                "split": 0, "none": 0},
                               "snic_util": {"pe": 0.9, "de": 0.9 * de_share},
                               "snic_balance": {"max_over_mean": balance, "window_s": 3.2}}},
        "fidelity": {"ok": trusted, "reasons": [] if trusted else ["CPU max 93% > 85%"]},
        "calibration": {"classes": [{"link_class": "snic", "configured_bps": SNIC_BPS}]},
        "failed_turns": 0}
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "scenario.yaml").write_text(yaml.safe_dump({"cluster": {"prefill_nodes": 2, "decode_nodes": 4},
                                                       "scale": {"time": 1.6}}))
    rows = ["t_s,link,link_class,side,direction,tclass,bytes,packets,drops,backlog_bytes"]
    for i in range(120):  # each SNIC's counter: the PE ones read at 0.9 of the rate, the DE ones at their share
        for side, n, util in (("pe", 2, 0.9), ("de", 4, 0.9 * de_share)):
            for k in range(1, n + 1):
                rows.append(f"{i * 0.5:.1f},{side}{k}-snic,snic,{side},down,link,{int(i * 0.5 * util * SNIC_BPS * 1.6 / 8)},"
                            "0,0,0")
    (run / "dualpath" / "links.csv").write_text("\n".join(rows) + "\n")
    if events is not None:
        (run / "dualpath" / "scheduler-events.json").write_text(json.dumps(events))
    return {"label": label, "values": {"serving.policy": policy, "serving.workload.seed": 0}, "status": "done",
            "run_dir": label, "trustworthy": trusted}


def _clean(calls: int = 1536) -> list:
    return [{"t_mono": 1.0, "event": "policy_fallbacks", "calls": {"choose_pe": calls // 2, "read_side": calls // 2},
             "fallbacks": {}, "fallbacks_total": 0}]


def _sweep(root: Path, mine: tuple[float, float, tuple[int, int]], events=None, rr_trusted: bool = True) -> Path:
    spec = f"{STARTER}:StudentPolicy"
    points = [_run(root, "policy=policy.py_StudentPolicy,seed=0", spec, *mine,
                   events=_clean() if events is None else events),
              _run(root, "policy=round_robin,seed=0", "round_robin", 1.08, 40.0, (260, 508), trusted=rr_trusted),
              _run(root, "policy=paper,seed=0", "paper", 1.05, 39.0, (255, 513))]
    (root / "sweep.json").write_text(json.dumps({"scenario": "lab4_write_the_scheduler", "points": points}))
    return root


def _by_key(rows) -> dict:
    return {r.key: r for r in rows}


STARTER_LIKE = (2.95, 76.0, (768, 0))     # every turn read on the prefill side: Basic
SOLUTION_LIKE = (1.06, 39.5, (257, 511))  # the shorter read queue


def test_a_starter_like_result_fails_on_balance_and_jct(tmp_path):
    rows = _by_key(labs_scheduler.grade(_sweep(tmp_path, STARTER_LIKE), {"policy": f"{STARTER}:StudentPolicy"}))
    assert list(rows) == ["policy_fallbacks", "snic_balance_vs_round_robin", "snic_balance_vs_paper",
                          "jct_vs_round_robin"]
    assert rows["policy_fallbacks"].ok  # it is valid code: it just reads on one side
    for key in ("snic_balance_vs_round_robin", "snic_balance_vs_paper", "jct_vs_round_robin"):
        assert not rows[key].ok, key
    assert rows["snic_balance_vs_round_robin"].expected == 1.08 and rows["snic_balance_vs_paper"].expected == 1.05
    why = rows["snic_balance_vs_round_robin"].why
    assert "0% on the decode side" in why and "only the 2 prefill SNICs read" in why and "3.0x" in why
    assert "90% longer" in rows["jct_vs_round_robin"].why


def test_a_solution_like_result_passes(tmp_path):
    rows = labs_scheduler.grade(_sweep(tmp_path, SOLUTION_LIKE), {"policy": f"{STARTER}:StudentPolicy"})
    assert all(r.ok for r in rows), [(r.key, r.why) for r in rows if not r.ok]
    assert "1536 calls returned a valid choice" in rows[0].why


@pytest.mark.parametrize("mine, fails", [
    ((1.08 + labs_scheduler.TOL_BALANCE_RR + 0.01, 39.0, (300, 468)), {"snic_balance_vs_round_robin",
                                                                      "snic_balance_vs_paper"}),
    ((1.05 + labs_scheduler.TOL_BALANCE_PAPER - 0.01, 39.0, (300, 468)), set()),
    ((1.0, 40.0 * (1 + labs_scheduler.TOL_JCT) + 0.5, (256, 512)), {"jct_vs_round_robin"}),
    ((1.0, 40.0 * (1 + labs_scheduler.TOL_JCT) - 0.5, (256, 512)), set()),
])
def test_the_tolerances_are_the_edges(tmp_path, mine, fails):
    rows = labs_scheduler.grade(_sweep(tmp_path, mine), {"policy": "x"})
    assert {r.key for r in rows if not r.ok} == fails


def test_fallbacks_fail_the_policy_even_with_the_papers_numbers(tmp_path):
    events = [{"t_mono": 1.0, "event": "policy_fallback", "method": "read_side", "kind": "raised",
               "detail": "KeyError: 'x' (policy.py, line 30)"},
              {"t_mono": 2.0, "event": "policy_fallbacks", "calls": {"read_side": 768, "choose_pe": 768},
               "fallbacks": {"read_side": {"raised": 768}}, "fallbacks_total": 768}]
    rows = _by_key(labs_scheduler.grade(_sweep(tmp_path, SOLUTION_LIKE, events), {"policy": "x"}))
    assert not rows["policy_fallbacks"].ok and rows["policy_fallbacks"].predicted == 768
    assert "768 of 1536 calls" in rows["policy_fallbacks"].why and "KeyError" in rows["policy_fallbacks"].why


def test_a_sweep_without_the_baselines_fails_every_row(tmp_path):
    _sweep(tmp_path, SOLUTION_LIKE)
    index = json.loads((tmp_path / "sweep.json").read_text())
    index["points"] = index["points"][:1]
    (tmp_path / "sweep.json").write_text(json.dumps(index))
    rows = labs_scheduler.grade(tmp_path, {"policy": "x"})
    assert not any(r.ok for r in rows) and "round_robin, paper" in rows[0].why


def test_the_grade_writes_its_files_and_picture_and_marks_untrusted_runs(tmp_path):
    results = _sweep(tmp_path / "sweep", SOLUTION_LIKE, rr_trusted=False)
    g = labs.grade(LAB, results, {"policy": "x"}, STARTER, tmp_path / "out")
    assert g.passed == 4 and g.picture == "scheduler.png" and (tmp_path / "out" / "scheduler.png").stat().st_size
    assert len(g.distrust) == 1 and g.distrust[0].startswith("policy=round_robin,seed=0: ")
    assert "CPU max 93% > 85%" in g.distrust[0]
    assert json.loads((tmp_path / "out" / "grade.json").read_text())["trustworthy"] is False


def _args(lab: str = "4", **kw) -> argparse.Namespace:
    """`dpemu lab check LAB --KEY VALUE ...` as the command line parses it (every option the parser has)."""
    parser = argparse.ArgumentParser()
    labs.add_parser(parser.add_subparsers())
    return parser.parse_args(["lab", "check", lab, *(a for k, v in kw.items() for a in (f"--{k}", v))])


def test_lab_check_exit_codes_on_recorded_results(tmp_path):
    assert labs.cmd_check(_args(results=str(_sweep(tmp_path / "a", STARTER_LIKE)))) == labs.EXIT_FAILED_PREDICTION
    assert labs.cmd_check(_args(results=str(_sweep(tmp_path / "b", SOLUTION_LIKE)), policy=str(SOLUTION))) == 0
    assert json.loads((tmp_path / "b" / "grade.json").read_text())["predictions"] == str(SOLUTION)


def test_the_policy_file_is_checked_before_anything_runs(tmp_path, monkeypatch):
    pred, path = labs_scheduler.policy_file(LAB, None)  # the starter by default
    assert path == STARTER and pred == {"policy": f"{STARTER}:StudentPolicy"}
    monkeypatch.chdir(LAB.path)
    pred, _ = labs_scheduler.policy_file(LAB, Path("solution/policy.py:StudentPolicy"))
    assert pred["policy"] == f"{SOLUTION}:StudentPolicy"
    (tmp_path / "mine.py").write_text("from daemons.policyapi import Policy\nclass Mine(Policy):\n    pass\n")
    with pytest.raises(ConfigError, match="does not implement read_side"):
        labs_scheduler.policy_file(LAB, tmp_path / "mine.py:Mine")
    with pytest.raises(ConfigError, match="has no class StudentPolicy"):
        labs_scheduler.policy_file(LAB, tmp_path / "mine.py")
    with pytest.raises(ConfigError, match="no such policy file"):
        labs_scheduler.policy_file(LAB, tmp_path / "nope.py")
    with pytest.raises(ConfigError, match="not a --policy"):  # a lab of predictions takes no policy
        labs.cmd_check(_args(lab="1", policy=str(STARTER), results=str(tmp_path)))


def test_the_check_sweeps_the_students_policy_then_the_baselines():
    pred, _ = labs_scheduler.policy_file(LAB, SOLUTION)
    points = schema.sweep_points(str(LAB.scenario), labs_scheduler.sets(pred))
    assert [p.scenario.serving.policy for p in points] == [f"{SOLUTION}:StudentPolicy", "round_robin", "paper"]
    assert [p.label for p in points][0] == "policy=policy.py_StudentPolicy,seed=0"
    assert all(p.scenario.serving.modes == ["dualpath"] for p in points)
    # without the check, the scenario runs the two baselines
    assert [p.scenario.serving.policy for p in schema.sweep_points(str(LAB.scenario))] == ["round_robin", "paper"]


RECORDED = Path(__file__).resolve().parent / "fixtures" / "labs" / "lab4"


@pytest.mark.parametrize("which, passed", [("starter", 1), ("solution", 4)])
def test_the_recorded_checks_grade_as_they_did(tmp_path, which, passed):
    """The two `dpemu lab check 4` runs of 2026-12-06 (TEACHER.md), trimmed to what the grade reads: the
    starter fails on balance and JCT for reading on the prefill side only; the solution passes; both trusted."""
    g = labs.grade(LAB, RECORDED / which, {"policy": "recorded"}, STARTER, tmp_path)
    rows = _by_key(g.rows)
    assert g.passed == passed and not g.distrust and rows["policy_fallbacks"].ok
    if which == "starter":
        assert rows["snic_balance_vs_round_robin"].predicted > 3.0 and "0% on the decode side" in \
            rows["snic_balance_vs_round_robin"].why
        assert rows["jct_vs_round_robin"].predicted > 1.5 * rows["jct_vs_round_robin"].expected
    else:
        assert abs(rows["snic_balance_vs_paper"].predicted - rows["snic_balance_vs_paper"].expected) < 0.05

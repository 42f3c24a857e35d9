"""`dpemu run cluster`: every link class delivers its configured rate, measured
on the wire (HTB counters) under iperf3 load, and the run leaves nothing behind.

The run (about 10 s) is made once per module; the tests read what it wrote and printed.
"""

from __future__ import annotations

import csv
import json
import re

import pytest

from netns_tools import assert_nothing_left, describe, run_dpemu, snapshot

TOL = 0.03
CONFIGURED = {"snic": 40e6, "cnic": 40e6, "stnic": 160e6}  # cluster.yaml at bytes x 1e-4
DIRECTIONS = ("up", "down")


def _fmt(bps):
    return "-" if bps is None else f"{bps / 1e6:9.3f} Mbit/s"


@pytest.fixture(scope="module")
def default_run(tmp_path_factory, machine_free):
    """One `dpemu run cluster`, with its own before/after leak snapshot (the
    per-test leak check runs after module fixtures are set up)."""
    out = tmp_path_factory.mktemp("default-run")
    before = snapshot()
    res = run_dpemu("run", "cluster", "--out", str(out), timeout=300)
    after = snapshot()
    leaked = {k: sorted(map(str, after[k] - before[k])) for k in after if after[k] - before[k]}
    return res, out, leaked


def _finished_and_only_cpu_can_object(res, out) -> None:
    """Exit 0, or 3 when the verdict's ONLY objection is the machine's CPU (a busy moment of a shared 2-core
    machine, seen in fresh-clone CI at 89-93% in this first run of the suite): these tests judge the links, and
    every other reason still fails them."""
    if res.returncode == 3:
        (run_dir,) = (out / "cluster").iterdir()
        reasons = json.loads((run_dir / "summary.json").read_text())["fidelity"]["reasons"]
        assert reasons and all(r.startswith("CPU reached") for r in reasons), describe(res)
        print(f"the verdict objected to the CPU only: {reasons}")
        return
    assert res.returncode == 0, describe(res)


@pytest.mark.netns
def test_default_calibration_within_tolerance(default_run):
    res, out, leaked = default_run
    print(res.stdout)
    _finished_and_only_cpu_can_object(res, out)

    run_dirs = list((out / "cluster").iterdir())
    assert len(run_dirs) == 1, run_dirs
    summary = json.loads((run_dirs[0] / "summary.json").read_text())
    rows = summary["calibration"]["classes"]

    print(f"\ncalibration of `cluster` (run {summary['run_id']}, build {summary['build_s']}s, "
          f"teardown {summary['teardown_s']}s, {summary['calibration']['rounds']} round(s), "
          f"CPU max {summary['fidelity']['cpu_util_max']:.0%})")
    print(f"{'class':6s} {'dir':5s} {'links':>5s} {'configured':>16s} {'achieved':>16s} {'worst err':>9s} "
          f"{'goodput':>16s}  ok")
    for r in rows:
        print(f"{r['link_class']:6s} {r['direction']:5s} {r['links']:5d} {_fmt(r['configured_bps'])} "
              f"{_fmt(r['achieved_bps'])} {r['worst_error']:+9.3%} {_fmt(r['iperf3_goodput_bps'])}  "
              f"{r['within_tolerance']}")

    by_key = {(r["link_class"], r["direction"]): r for r in rows}
    assert set(by_key) == {(c, d) for c in CONFIGURED for d in DIRECTIONS}, sorted(by_key)
    assert len(by_key) == len(rows)
    for (cls, direction), r in by_key.items():
        where = f"{cls} {direction}"
        assert r["configured_bps"] == pytest.approx(CONFIGURED[cls]), where
        # every class of `cluster` can be saturated: nothing is verified against a lower "expected" rate
        assert r["expected_bps"] == r["configured_bps"], (where, r)
        assert r["within_tolerance"] is True, (where, r)
        assert r["worst_error"] is not None and abs(r["worst_error"]) <= TOL, (where, r)
        assert r["achieved_bps"] is not None
        assert abs(r["achieved_bps"] / r["configured_bps"] - 1) <= TOL, (where, r)

    with open(run_dirs[0] / "calibration.csv", newline="") as f:
        measured = list(csv.DictReader(f))
    assert {(m["link_class"], m["direction"]) for m in measured} == set(by_key)
    for m in measured:
        where = f"{m['link']} {m['direction']}"
        goodput, achieved = float(m["iperf3_goodput_bps"]), float(m["achieved_bps"])
        assert float(m["expected_bps"]) == float(m["configured_bps"]), where
        assert goodput > 0, where
        assert goodput < achieved, f"{where}: goodput {goodput} >= wire rate {achieved} (headers are missing)"
        assert abs(achieved / float(m["configured_bps"]) - 1) <= TOL, where
        # iperf3's payload in the window against the counters' wire bytes less 66 B per segment
        payload, window = float(m["payload_bps"]), float(m["window_goodput_bps"])
        assert 0.9 * achieved < payload < achieved, (where, payload, achieved)
        assert abs(window / payload - 1) <= TOL, (where, window, payload)

    # dequeue timing was measured on every class during calibration, and judged
    dq = summary["dequeue"]
    assert set(dq) == set(CONFIGURED), dq
    for cls, d in dq.items():
        assert d["gaps"] >= 100, (cls, d)
        assert 0 < d["abs_p50"] <= d["abs_p90"] <= d["abs_p99"], (cls, d)
        assert d["late_p99"] <= summary["fidelity"]["dequeue_p99_max"], (cls, d)
    assert set(summary["fidelity"]["dequeue_p99"]) == set(CONFIGURED)
    assert (run_dirs[0] / "dequeue.csv").exists()

    # the verdict agrees with every check above; only the CPU may have objected (see above)
    assert all(r.startswith("CPU reached") for r in summary["fidelity"]["reasons"]), summary["fidelity"]
    assert summary["fidelity"]["ok"] is (res.returncode == 0), summary["fidelity"]

    # cleanup on success: nothing of the run is left, as a diff and in absolute terms
    assert leaked == {}, f"the run left objects behind: {leaked}"
    assert_nothing_left("after a successful run")


@pytest.mark.netns
def test_default_run_prints_readable_class_table(default_run):
    res, out, _ = default_run
    _finished_and_only_cpu_can_object(res, out)
    table = res.stdout.split("link calibration:", 1)[1].split("invariants", 1)[0]
    print(table)
    for cls in CONFIGURED:
        for direction in DIRECTIONS:
            assert re.search(rf"^\s*{cls}\s+{direction}\s", table, re.M), f"no readable row for {cls} {direction}"
    assert "…" not in table

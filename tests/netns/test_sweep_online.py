"""A small online sweep end to end: `dpemu run` on a sweep file, then `dpemu report` on its directory.

Two arrival rates x one seed, agents arriving as a Poisson process, modes layerwise (Basic's reads with
layerwise prefill) and dualpath: every point is its own run directory, each turn records its arrival,
allocation time and time to second token, each mode has a steady-state verdict, and the report computes a
capacity per mode.
"""

from __future__ import annotations

import csv
import json

import pytest
import yaml

from netns_tools import assert_nothing_left, describe, run_dpemu


@pytest.fixture(scope="module")
def online_sweep(tmp_path_factory, machine_free):
    tmp = tmp_path_factory.mktemp("online-sweep")
    from scenarios.schema import SCENARIO_DIR

    data = yaml.safe_load((SCENARIO_DIR / "serving_tiny.yaml").read_text())
    data["name"] = "online_tiny"
    data["serving"]["modes"] = ["layerwise", "dualpath"]
    data["serving"]["workload"].update(agents=6, turns_per_agent=2, arrival_rate=1)
    data["sweep"] = {"points": [{"serving.workload.arrival_rate": 1, "serving.workload.agents": 6},
                                {"serving.workload.arrival_rate": 3, "serving.workload.agents": 12}]}
    path = tmp / "online_tiny.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    res = run_dpemu("run", str(path), "--out", str(tmp / "results"), timeout=900)
    return res, tmp / "results" / "online_tiny"


@pytest.mark.netns
def test_an_online_sweep_writes_one_run_per_point_and_a_capacity_report(online_sweep):
    res, root = online_sweep
    print(res.stdout[-4000:])
    assert res.returncode in (0, 3), describe(res)
    (sweep_dir,) = root.iterdir()
    index = json.loads((sweep_dir / "sweep.json").read_text())
    assert [p["label"] for p in index["points"]] == ["arrival_rate=1,agents=6,seed=0",
                                                      "arrival_rate=3,agents=12,seed=0"]
    assert all(p["status"] == "done" for p in index["points"]), index
    for p in index["points"]:
        run = sweep_dir / p["run_dir"]
        summary = json.loads((run / "summary.json").read_text())
        for mode in ("layerwise", "dualpath"):
            on = summary["modes"][mode]["online"]
            assert on["arrival_rate"] == p["values"]["serving.workload.arrival_rate"]
            assert on["turns"] > 0 and isinstance(on["slo_ok"], bool)
            rows = list(csv.DictReader((run / mode / "requests.csv").open()))
            assert len({r["arrival_s"] for r in rows}) == p["values"]["serving.workload.agents"]  # Poisson: distinct
            for r in rows:
                assert float(r["alloc_s"]) >= 0
                if int(r["gen_tokens"]) > 1:
                    assert float(r["ttst_s"]) > float(r["ttft_s"]) > 0
            # the run stops after the steady window: once the turns submitted by the last arrival are done, no
            # agent starts another turn (each agent's first turn is its arrival, at the latest the window's end)
            end = max(float(r["arrival_s"]) for r in rows)
            window_done = max(float(r["done_s"]) for r in rows if float(r["submit_s"]) <= end)
            first = {a: min(int(r["turn"]) for r in rows if r["agent"] == a) for a in {r["agent"] for r in rows}}
            assert all(float(r["submit_s"]) <= window_done for r in rows if int(r["turn"]) > first[r["agent"]])
            paths = {r["path"] for r in rows}
            assert paths == ({"pe"} if mode == "layerwise" else paths) and paths <= {"pe", "de"}
        assert summary["ledger"]["blocks_corrupt"] == 0 and summary["ledger"]["blocks_lost"] == 0
    rep = run_dpemu("report", str(sweep_dir))
    assert rep.returncode == 0, describe(rep)
    text = (sweep_dir / "report.md").read_text()
    assert "## Capacity" in text and "## Online latency against the arrival rate" in text
    trusted = any(p["trustworthy"] for p in index["points"])  # CI's 2 cores may leave none trustworthy
    latency = text.split("## Online latency against the arrival rate", 1)[1].split("## Capacity", 1)[0]
    assert ("| layerwise | " in latency) if trusted else ("No trustworthy run: no latency" in latency), latency
    capacity = text.split("## Capacity", 1)[1].splitlines()
    for mode in ("layerwise", "dualpath"):  # a mode's row has its capacity, or says no run could be trusted
        row = next(line for line in capacity if line.startswith(f"| {mode} |"))
        assert ("seed 0:" in row) if trusted else ("no trustworthy run" in row), row
    assert (sweep_dir / "jct.png").is_file()
    assert_nothing_left("after the online sweep")

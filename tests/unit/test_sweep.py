"""Sweeps (scenarios.schema.sweep_points, scenarios.sweep) and reports (scenarios.report), without root:
points are expanded and validated before anything runs; seeds fold into mean and spread; reports put the
measured figures beside the paper's and the analytic expectation."""

from __future__ import annotations

import csv
import json

import pytest
import yaml

from emulator.errors import ConfigError
from scenarios import report, schema, sweep


@pytest.fixture
def serving_tiny() -> dict:
    return yaml.safe_load((schema.SCENARIO_DIR / "serving_tiny.yaml").read_text())


def test_a_grid_times_seeds_is_every_point_each_with_its_values(serving_tiny, write_scenario):
    serving_tiny["sweep"] = {"grid": {"serving.workload.agents": [4, 8], "cluster.decode_nodes": [1, 2]},
                             "seeds": [3, 5]}
    points = schema.sweep_points(write_scenario(serving_tiny, "sw.yaml"))
    assert len(points) == 8
    assert points[0].label == "agents=4,decode_nodes=1,seed=3"
    assert {(p.scenario.serving.workload.agents, p.scenario.cluster.decode_nodes, p.scenario.serving.workload.seed)
            for p in points} == {(a, d, s) for a in (4, 8) for d in (1, 2) for s in (3, 5)}
    assert all(p.scenario.sweep is None for p in points)  # a point is an ordinary run


def test_listed_points_and_set_overrides(serving_tiny, write_scenario):
    serving_tiny["sweep"] = {"points": [{"cluster.prefill_nodes": 1, "cluster.decode_nodes": 2},
                                        {"cluster.prefill_nodes": 2, "cluster.decode_nodes": 1}]}
    points = schema.sweep_points(write_scenario(serving_tiny, "pd.yaml"), ["serving.workload.agents=6"])
    assert [p.label for p in points] == ["prefill_nodes=1,decode_nodes=2,seed=0",
                                         "prefill_nodes=2,decode_nodes=1,seed=0"]
    assert all(p.scenario.serving.workload.agents == 6 for p in points)


def test_a_scenario_without_sweep_is_one_unlabelled_point():
    (point,) = schema.sweep_points("serving_tiny")
    assert point.label == "" and point.scenario.name == "serving_tiny"


@pytest.mark.parametrize("sweep_section, match", [
    ({"grid": {"serving.workload.agents": [4, 0]}}, r"\[agents=0,seed=0\]: serving.workload.agents"),
    ({"grid": {"serving.workload.agentz": [4]}}, r"agentz.*unknown key"),
    ({"grid": {"serving.workload.agents": []}}, "has no values"),
    ({"grid": {"serving.workload.agents": [4]}, "points": [{"serving.workload.agents": 4}]}, "not both"),
    ({"grid": {"name": ["x"]}}, "cannot sweep 'name'"),
    ({"seeds": [1, 1]}, "seeds repeat"),
    ({"seeds": []}, "seeds"),
])
def test_bad_sweeps_are_refused_naming_the_point_or_field(serving_tiny, write_scenario, sweep_section, match):
    serving_tiny["sweep"] = sweep_section
    with pytest.raises(ConfigError, match=match):
        schema.sweep_points(write_scenario(serving_tiny, "bad.yaml"))


def _summary(jct: dict[str, float], ok: bool = True) -> dict:
    modes = {m: {"jct_s": v, "snic_util": {"pe": 0.9, "de": 0.1}, "cnic_util": {"pe": 0.1, "de": 0.0},
                 "ttft_s": {"p50": 1.0, "p99": 2.0}, "tpot_s": {"p50": 0.015, "p99": 0.02}} for m, v in jct.items()}
    return {"modes": modes, "speedup": {"dualpath_vs_basic": round(jct["basic"] / jct["dualpath"], 4)},
            "fidelity": {"ok": ok, "cpu_util_max": 0.7 if ok else 0.95}}


def test_metrics_flatten_a_run_and_aggregate_folds_seeds_without_untrusted_runs():
    m = sweep.metrics(_summary({"basic": 80.0, "dualpath": 40.0, "oracle": 36.0}))
    assert m["jct_s.basic"] == 80.0 and m["speedup.dualpath_vs_basic"] == 2.0 and m["snic_util.pe.basic"] == 0.9
    assert m["tpot_s.p99.oracle"] == 0.02 and m["cpu_util_max"] == 0.7

    def point(agents, seed, jct_dp, ok=True, status="done"):
        return {"label": f"agents={agents},seed={seed}", "status": status, "trustworthy": ok,
                "values": {"serving.workload.agents": agents, sweep.SEED_KEY: seed},
                "metrics": sweep.metrics(_summary({"basic": 80.0, "dualpath": jct_dp}, ok))}

    index = {"points": [point(8, 0, 40.0), point(8, 1, 50.0), point(8, 2, 10.0, ok=False),
                        point(16, 0, 40.0), point(16, 1, 1.0, status="interrupted")]}
    g8, g16 = sweep.aggregate(index)
    assert g8["values"] == {"serving.workload.agents": 8} and g8["seeds"] == [0, 1] and g8["untrusted"] == [2]
    st = g8["stats"]["jct_s.dualpath"]
    assert (st["mean"], st["min"], st["max"], st["n"]) == (45.0, 40.0, 50.0, 2)
    assert st["sd"] == pytest.approx(7.0711, abs=1e-4)
    assert g16["seeds"] == [0] and g16["stats"]["jct_s.dualpath"]["sd"] == 0.0


def test_expected_speedup_is_usable_snics_capped_by_oracle():
    assert report.storage_bound_speedup({"prefill_nodes": 2, "decode_nodes": 4}) == 3.0
    assert report.expected_speedup({"prefill_nodes": 2, "decode_nodes": 4}, {"basic": 84.0, "oracle": 36.0}) == (
        3.0, pytest.approx(2.3333, abs=1e-4), pytest.approx(2.3333, abs=1e-4))
    assert report.expected_speedup({"prefill_nodes": 1, "decode_nodes": 1}, {"basic": 84.0}) == (2.0, None, 2.0)


def _fake_run(run_dir, jct, ok=True, paper=None):
    """A run directory as a serving run writes it: summary, scenario, per-mode links and requests."""
    run_dir.mkdir(parents=True)
    s = _summary(jct, ok)
    s.update(scenario="fig", run_id=run_dir.name, seed=0, scale={"bytes": 5e-4, "time": 1.0},
             calibration={"classes": [{"link_class": "snic", "configured_bps": 20e6}]})
    s["fidelity"].update(link_rate_error_max=0.01, reasons=[] if ok else ["CPU 95% > 85%"])
    (run_dir / "summary.json").write_text(json.dumps(s))
    (run_dir / "scenario.yaml").write_text(yaml.safe_dump({"cluster": {
        "model": "ds660b", "prefill_nodes": 2, "decode_nodes": 4, "gpus_per_node": 1}, "paper": paper or {}}))
    for mode in jct:
        (run_dir / mode).mkdir()
        with (run_dir / mode / "links.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["t_s", "link", "link_class", "side", "direction", "tclass", "bytes", "packets", "drops",
                        "backlog_bytes"])
            for i in range(5):
                w.writerow([i * 0.1, "pe1-snic", "snic", "pe", "down", "link", i * 250_000, 0, 0, 0])
                w.writerow([i * 0.1, "de1-snic", "snic", "de", "down", "link", i * 50_000, 0, 0, 0])
        with (run_dir / mode / "requests.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["ttft_s"])
            w.writeheader()
            w.writerows({"ttft_s": t} for t in (0.5, 1.0, 2.0))


def test_run_report_sets_the_speedup_beside_paper_and_analytic(tmp_path):
    run = tmp_path / "run1"
    _fake_run(run, {"basic": 84.0, "dualpath": 38.0, "oracle": 36.0}, paper={"speedup.dualpath_vs_basic": 1.87})
    text = report.report(run).read_text()
    assert "**Trustworthy**" in text
    assert "| DualPath / Basic JCT | 2.21x | 1.87x | 2.33x (storage-bound (P+D)/P = 3.00" in text
    assert (run / "snic_util.png").stat().st_size > 1000 and (run / "ttft_cdf.png").stat().st_size > 1000


def test_sweep_report_folds_seeds_and_flags_untrusted_and_unfinished_runs(tmp_path):
    sweep_dir = tmp_path / "sw"
    points = []
    for agents, seed, dp, ok in ((8, 0, 40.0, True), (8, 1, 44.0, True), (16, 0, 60.0, True), (16, 1, 9.0, False)):
        label = f"agents={agents},seed={seed}"
        _fake_run(sweep_dir / label, {"basic": 80.0 + agents, "dualpath": dp, "oracle": 30.0}, ok)
        points.append({"label": label, "run_dir": label, "status": "done", "trustworthy": ok,
                       "values": {"serving.workload.agents": agents, sweep.SEED_KEY: seed},
                       "metrics": sweep.metrics(json.loads((sweep_dir / label / "summary.json").read_text()))})
    points.append({"label": "agents=32,seed=0", "status": "interrupted",
                   "values": {"serving.workload.agents": 32, sweep.SEED_KEY: 0}})
    (sweep_dir / "sweep.json").write_text(json.dumps({"scenario": "fig", "paper": {"speedup.dualpath_vs_basic": 1.87},
                                                      "varied": ["serving.workload.agents"], "points": points}))
    text = report.report(sweep_dir).read_text()
    assert "4 of 5 runs finished" in text
    assert "NOT TRUSTWORTHY, left out of the statistics:** agents=16,seed=1" in text
    assert "agents=32,seed=0 (interrupted)" in text
    row8 = next(line for line in text.splitlines() if line.startswith("| agents=8 |"))
    assert "| 2 | 88.0 +- 0.0 | 42.0 +- 2.8 | 30.0 +- 0.0 | 2.10 +- 0.14 | 2.00-2.20 | 2.93 | 1.87 |" in row8
    row16 = next(line for line in text.splitlines() if line.startswith("| agents=16 |"))
    assert "| 1 (+1 untrusted) |" in row16
    assert (sweep_dir / "jct.png").is_file() and (sweep_dir / "speedup.png").is_file()


def test_report_of_a_directory_that_is_neither_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="neither a run directory"):
        report.report(tmp_path)


def test_ablation_and_balance_sections_set_each_step_beside_the_paper():
    def group(policy, stats):
        return {"values": {"serving.policy": policy}, "seeds": [0], "untrusted": [],
                "stats": {k: {"mean": v, "sd": 0.0, "min": v, "max": v, "n": 1} for k, v in stats.items()}}

    groups = [group("round_robin", {"jct_s.basic": 100.0, "jct_s.layerwise": 80.0, "jct_s.dualpath": 60.0,
                                    "snic_balance.dualpath": 1.5}),
              group("paper", {"jct_s.dualpath": 50.0, "snic_balance.dualpath": 1.2})]
    paper = {"ablation.layerwise.round_robin": "-17.2%", "snic_balance.paper": 1.18}
    text = "\n".join(report._ablation_lines(groups, paper))
    assert "| + layerwise prefill | 80.0 | -20.0% | -17.2% |" in text
    assert "| + dual-path loading | 60.0 | -40.0% | - |" in text and "| + scheduler | 50.0 | -50.0% | - |" in text
    text = "\n".join(report._balance_lines(groups, paper))
    assert "| policy=paper | 1.20 +- 0.00 | 1.20-1.20 | 1.18 |" in text


def test_the_sweep_table_of_an_online_sweep_shows_ttft_and_slo_seeds():
    from rich.console import Console

    from scenarios.terminal import sweep_table as _sweep_table

    def point(rate, seed, ttft, ok):
        return {"label": f"r={rate},seed={seed}", "status": "done", "trustworthy": True,
                "values": {"serving.workload.arrival_rate": rate, sweep.SEED_KEY: seed},
                "metrics": {"online.ttft_s.mean.dualpath": ttft, "online.slo_ok.dualpath": float(ok)}}

    console = Console(width=80, record=True)
    console.print(_sweep_table({"points": [point(3, 0, 1.0, True), point(3, 1, 5.0, False)]}))
    text = console.export_text()
    assert "arrival_rate=3" in text and "3.0+-2.8" in text and "dualpath 1/2" in text


def test_points_that_only_change_serving_share_a_network_and_others_do_not():
    from scenarios.plan import make_plan
    from scenarios.runner import same_network

    fig7 = [make_plan(p.scenario) for p in schema.sweep_points("fig7_agents")]
    assert all(same_network(fig7[0], p) for p in fig7)  # agents and seeds: one build for the sweep
    fig8 = [make_plan(p.scenario) for p in schema.sweep_points("fig8_pd_ratio")]
    assert not same_network(fig8[0], fig8[1])  # 1P1D and 2P1D are different clusters
    assert same_network(fig8[0], fig8[3])  # the same ratio, another seed


# -- capacity search ------------------------------------------------------------------------------------------
def _search_points(serving_tiny, write_scenario, **search):
    serving_tiny["serving"]["workload"]["arrival_rate"] = 1
    serving_tiny["sweep"] = {"points": [{"serving.modes": ["basic"], "serving.workload.arrival_rate": 2.4}],
                             "search": {"window": "30s", **search}}
    return schema.sweep_points(write_scenario(serving_tiny, "cap.yaml"))


def _play(searcher, capacity: float, trusted=lambda rate: True) -> list[float]:
    """Drive a search against a mode whose true capacity is `capacity`: the rates it probed."""
    rates = []
    while (nxt := searcher.next_probe()) is not None:
        pt, entry = nxt
        rate = pt.values[schema.RATE_KEY]
        assert pt.scenario.serving.workload.arrival_rate == rate
        assert pt.scenario.serving.workload.agents == pt.values[schema.AGENTS_KEY]
        rates.append(rate)
        entry.update(status="done", trustworthy=trusted(rate),
                     metrics={"online.slo_ok.basic": 1.0 if rate <= capacity else 0.0})
    return rates


def test_a_search_starts_at_the_points_rate_with_agents_for_the_window(serving_tiny, write_scenario):
    (start,) = _search_points(serving_tiny, write_scenario)
    assert start.label == "modes=basic,arrival_rate=2.4,agents=72,seed=0"
    assert start.search.window == 30 and start.scenario.serving.workload.agents == 72


def test_a_search_steps_up_until_the_slo_fails_then_halves_the_gap(serving_tiny, write_scenario):
    (start,) = _search_points(serving_tiny, write_scenario, factor=1.25, resolution=1.05, probes=6)
    s = sweep.Searcher(start, start.search, {"label": start.label, "values": start.values, "status": "pending"})
    rates = _play(s, capacity=3.2)
    assert rates[:3] == [2.4, 3, 3.75]  # up by 1.25 while it passes
    assert rates[3] == pytest.approx((3 * 3.75) ** 0.5, abs=1e-3)  # then the geometric middle
    assert s.record["bracketed"] and 3 <= s.record["capacity"] <= 3.2
    assert s.record["stopped"] in ("resolved", "probes used up") and len(rates) <= 6


def test_a_search_steps_down_when_the_first_rate_fails(serving_tiny, write_scenario):
    (start,) = _search_points(serving_tiny, write_scenario, factor=1.25, resolution=1.3, probes=4)
    s = sweep.Searcher(start, start.search, {"label": start.label, "values": start.values, "status": "pending"})
    assert _play(s, capacity=1.5) == [2.4, 1.92, 1.536, 1.229]
    assert s.record["capacity"] == 1.229 and s.record["bracketed"] and s.record["stopped"] == "resolved"
    s2 = sweep.Searcher(start, start.search, {"label": start.label, "values": start.values, "status": "pending"})
    assert _play(s2, capacity=2.0) == [2.4, 1.92]
    assert s2.record == {"start": start.label, "probes": {"1.92": True, "2.4": False}, "capacity": 1.92,
                         "bracketed": True, "stopped": "resolved"}


def test_a_search_stops_at_an_untrustworthy_run(serving_tiny, write_scenario):
    (start,) = _search_points(serving_tiny, write_scenario, probes=5)
    s = sweep.Searcher(start, start.search, {"label": start.label, "values": start.values, "status": "pending"})
    assert _play(s, capacity=9, trusted=lambda rate: rate < 3) == [2.4, 3]
    assert "not trustworthy" in s.record["stopped"] and s.record["capacity"] == 2.4


def test_a_searching_sweep_writes_each_searchs_final_record(serving_tiny, write_scenario, tmp_path, monkeypatch):
    """The last probe's verdict reaches sweep.json's search record (it is decided after the run finished)."""
    (start,) = _search_points(serving_tiny, write_scenario, factor=1.25, probes=2)

    def fake_run_group(items, out_root, say, progress, started, done):  # the SLO holds up to 2.8 agents/s
        for i, (plan, run_dir) in enumerate(items):
            started(i)
            rate = plan.scenario.serving.workload.arrival_rate
            summary = {"fidelity": {"ok": True}, "modes": {"basic": {
                "jct_s": 1.0, "snic_util": {}, "cnic_util": {}, "ttft_s": {}, "tpot_s": {},
                "online": {"slo_ok": rate <= 2.8, **{k: {"mean": 1.0} for k in
                                                     ("ttft_s", "ttst_s", "tpot_s", "trajectory_jct_s")}}}}}
            done(i, sweep.runner.RunOutcome(run_dir, summary, None))

    monkeypatch.setattr(sweep.runner, "run_group", fake_run_group)
    out = sweep.run_sweep([start], tmp_path, say=lambda _: None)
    (rec,) = json.loads((out.sweep_dir / "sweep.json").read_text())["search"]["searches"]
    assert rec == {"start": start.label, "probes": {"2.4": True, "3": False}, "capacity": 2.4, "bracketed": True,
                   "stopped": "probes used up"}


def test_a_search_needs_online_runs(serving_tiny, write_scenario):
    serving_tiny["sweep"] = {"points": [{"serving.modes": ["basic"]}], "search": {"window": "30s"}}
    with pytest.raises(ConfigError, match="arrival_rate"):
        schema.sweep_points(write_scenario(serving_tiny, "cap.yaml"))


def _group(values: dict, stats: dict) -> dict:
    return {"values": values, "seeds": [0], "untrusted": [],
            "stats": {k: {"mean": v, "sd": 0.0, "min": v, "max": v, "n": 1} for k, v in stats.items()}}


def test_online_lines_set_basics_ttft_over_dualpaths_per_point():
    groups = [_group({"cluster.snic_rate": "625Mbit"},
                     {"online.ttft_s.mean.basic": 9.0, "online.ttft_s.mean.dualpath": 3.0,
                      "online.tpot_s.mean.basic": 0.02, "online.tpot_s.mean.dualpath": 0.021})]
    heads: list[dict] = []
    text = "\n".join(report._online_lines(groups, {"figure": "trace"}, heads))
    assert "| snic_rate=625Mbit | 9.00 | 3.00 | 20.0 | 21.0 | 3.00 |" in text
    assert heads[0]["ours"] == "3.00" and heads[0]["figure"] == "trace"


def test_the_fabric_section_flags_the_points_the_paper_would_overload():
    from scenarios import fabric

    def point(p, d, over):
        stats = {"fabric.p_over_d.dualpath": p / d, "fabric.g.dualpath": 1, "fabric.s.dualpath": 0.125,
                 "fabric.de_dram.dualpath": 0.5, "snic_util.pe.dualpath": 1.0, "snic_util.de.dualpath": 1.0}
        for lt in fabric.LINK_TYPES:
            stats |= {f"fabric.measured_wire.{lt}.dualpath": 0.22, f"fabric.predicted_wire.{lt}.dualpath": 0.2,
                      f"fabric.with_loopback.{lt}.dualpath": 1.4 if over else 0.4,
                      f"fabric.saturated.{lt}.dualpath": 0.5}
        return _group({"cluster.prefill_nodes": p, "cluster.decode_nodes": d}, stats)

    groups = [point(8, 1, True), point(1, 1, False)]
    text = "\n".join(fabric.report_lines(groups))
    assert "no link over-loaded for 1/7 <= P/D <= 3.5" in text
    assert text.index("| 1 |") < text.index("| 8 |")  # sorted by P/D
    assert "| 8 | **140% / 50%** |" in text and "| 1 | 40% / 50% |" in text
    heads = fabric.headlines(groups, {"figure": "Sec. 3"})
    assert heads[0]["ours"] == "fits at 1; over at 8" and heads[0]["analytic"] == "1/7 to 3.5"
    assert heads[1]["ours"].startswith("1.10 (1.10-1.10 over 2")

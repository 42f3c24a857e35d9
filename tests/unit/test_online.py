"""scenarios.online: the steady-state window, the SLO verdict and capacity, on synthetic requests.csv rows."""

from __future__ import annotations

import pytest

from scenarios import online


def row(agent, arrival, submit, ttft, tpot=0.02, gen=10, done=None, parts=(0.5, 0.1, 0.3, 0.2)):
    wait, alloc, read, prefill = parts
    return {"agent": agent, "arrival_s": arrival, "submit_s": submit,
            "done_s": done if done is not None else submit + 2,
            "ttft_s": ttft, "ttst_s": ttft + tpot if gen > 1 else 0.0, "tpot_s": tpot, "gen_tokens": gen,
            "wait_s": wait, "alloc_s": alloc, "read_s": read, "prefill_s": prefill}


def test_the_window_is_a_quarter_of_the_arrival_span_to_the_last_arrival():
    rows = [row(f"a{i}", i * 10.0, i * 10.0 + 0.5, ttft=1.2) for i in range(5)]  # arrivals 0..40
    rows.append(row("a9", 40.0, 45.0, ttft=99.0))  # submitted after the last arrival: the drain, not counted
    rows.append(row("a0", 0.0, 5.0, ttft=99.0))  # before a quarter of the span: the fill, not counted
    s = online.steady_state(rows)
    assert s["window_s"] == [10.0, 40.0]
    assert s["turns"] == 3 and s["ttft_s"]["mean"] == 1.2 and s["slo_ok"], s["why"]
    assert s["ttft_breakdown_s"] == {"wait": 0.5, "alloc": 0.1, "read": 0.3, "prefill": 0.2, "first_step": 0.1}
    assert s["ttst_s"]["mean"] == pytest.approx(1.22)
    assert s["agents"] == 5  # arrived in [10, 40]: a1..a4, and a9 (at 40)


def test_trajectory_jct_counts_the_agents_that_finished_when_rows_say_which():
    rows = [row("a1", 10.0, 10.0, ttft=1.0, done=14.0), row("a1", 10.0, 14.0, ttft=1.0, done=20.0),
            row("a2", 30.0, 30.0, ttft=1.0, done=33.0), row("a3", 40.0, 40.0, ttft=1.0, done=41.0)]
    assert online.steady_state(rows)["trajectory_jct_s"]["mean"] == pytest.approx((10 + 3 + 1) / 3)
    for r, last in zip(rows, (0, 1, 0, 1), strict=True):  # a2 was stopped before its last turn
        r["last_turn"] = str(last)
    s = online.steady_state(rows)
    assert s["agents"] == 2 and s["trajectory_jct_s"]["mean"] == pytest.approx((10 + 1) / 2)


def test_slo_misses_say_why():
    rows = [row(f"a{i}", float(i), float(i), ttft=5.0, tpot=0.06) for i in range(12)]
    s = online.steady_state(rows)
    assert not s["slo_ok"]
    assert "mean TTFT 5.00 s > 4 s" in s["why"] and "mean TPOT 60.0 ms > 50 ms" in s["why"]


def test_a_queue_still_growing_misses_even_when_the_mean_passes():
    rows = [row(f"a{i}", float(i), float(i), ttft=0.5 if i < 8 else 7.0) for i in range(12)]
    s = online.steady_state(rows)  # window [2.75, 11]: 9 turns, mean (5 x 0.5 + 4 x 7) / 9 = 3.4 s
    assert s["ttft_s"]["mean"] < online.SLO_TTFT_S
    assert not s["slo_ok"] and "the last third of the window has mean TTFT 7.00 s" in s["why"]


def test_single_token_turns_have_no_tpot_or_ttst():
    s = online.steady_state([row("a0", 0.0, 0.0, ttft=1.0, gen=1), row("a1", 4.0, 4.0, ttft=1.0, gen=1)])
    assert s["tpot_s"]["mean"] is None and s["ttst_s"]["mean"] is None and s["slo_ok"]


def test_capacity_is_the_highest_rate_with_every_lower_rate_passing():
    assert online.capacity({1.0: True, 2.0: True, 3.0: False, 4.0: True}) == (2.0, True)
    assert online.capacity({1.0: False, 2.0: True}) == (None, True)
    assert online.capacity({0.5: True, 1.0: True}) == (1.0, False)  # never missed: at least 1.0


def test_capacities_of_an_arrival_rate_sweep_per_mode_and_seed():
    from scenarios.sweep import RATE_KEY, SEED_KEY, capacities

    def point(rate, seed, basic_ok, dp_ok, trusted=True):
        return {"status": "done", "trustworthy": trusted, "values": {RATE_KEY: rate, SEED_KEY: seed},
                "metrics": {"online.slo_ok.basic": float(basic_ok), "online.slo_ok.dualpath": float(dp_ok)}}

    pts = [point(1, 0, True, True), point(2, 0, True, True), point(3, 0, False, True), point(4, 0, False, False),
           point(1, 1, True, True), point(2, 1, False, True), point(3, 1, True, True, trusted=False)]
    assert capacities(pts) == {"basic": {0: (2, True), 1: (1, True)}, "dualpath": {0: (3, True), 1: (2, False)}}


def test_a_capacity_table_names_the_modes_whose_every_run_was_untrusted():
    from scenarios.report import RATE_KEY, SEED_KEY, _capacity_lines

    pts = [{"status": "done", "trustworthy": trusted, "values": {RATE_KEY: rate, SEED_KEY: 0},
            "metrics": {f"online.slo_ok.{mode}": 1.0}} for mode, rate, trusted in
           (("basic", 1, True), ("basic", 2, False), ("dualpath", 1, False), ("dualpath", 2, False))]
    rows = [line for line in _capacity_lines(pts, {}, []) if line.startswith("| ") and "---" not in line]
    assert rows[1:] == ["| basic | seed 0: >= 1 | - |", "| dualpath | no trustworthy run: no capacity | - |"]


def test_snic_balance_is_the_busiest_snic_over_the_mean_weighted_by_each_windows_traffic():
    from emulator.monitor import ClassKey, ClassSample, TcSampler
    from scenarios.modestats import LinkKey, snic_balance

    k1, k2, up = ClassKey("a", "pe1-snic", 1), ClassKey("b", "de1-snic", 1), ClassKey("a", "pe1-snic-up", 1)
    keys = {k1: LinkKey("pe1-snic", "snic", "pe", "down", "link", 20e6),
            k2: LinkKey("de1-snic", "snic", "de", "down", "link", 20e6),
            up: LinkKey("pe1-snic", "snic", "pe", "up", "link", 20e6)}
    sampler = TcSampler(list(keys))
    # [0, 1): pe1 reads 300, de1 100 -> busiest 300, mean 200; [1, 2): both 200 -> 200, 200; [2, 3): pe1 10,
    # de1 0 (the drain) -> 10, 5, a ratio of 2 that weighs 5 bytes' worth; [3, 4): nothing read, skipped
    for t, b1, b2 in ((0.0, 0, 0), (0.5, 200, 50), (1.0, 300, 100), (2.0, 500, 300), (3.0, 510, 300),
                      (4.0, 510, 300)):
        sampler.samples += [ClassSample(t, k1, b1, 0, 0, 0), ClassSample(t, k2, b2, 0, 0, 0),
                            ClassSample(t, up, 10**9, 0, 0, 0)]
    bal = snic_balance(sampler, keys, 0.0, 4.0, 1.0)
    assert bal == {"max_over_mean": round(510 / 405, 4), "unweighted": 1.5, "worst": 2.0, "windows": 3,
                   "window_s": 1.0}
    assert snic_balance(sampler, {k1: keys[k1]}, 0.0, 4.0, 1.0) is None  # one SNIC: nothing to balance


def test_the_capacity_ratio_is_bounded_by_each_searchs_bracket():
    from scenarios.sweep import RATE_KEY, SEED_KEY, ratio_bounds
    from scenarios.sweep import verdicts_of as _verdicts

    def point(mode, rate, ok, seed=0):
        return {"status": "done", "trustworthy": True, "values": {RATE_KEY: rate, SEED_KEY: seed},
                "metrics": {f"online.slo_ok.{mode}": float(ok)}}

    pts = [point("basic", 3, True), point("basic", 3.75, False), point("basic", 5, False),
           point("dualpath", 8.5, True), point("dualpath", 10.625, False), point("dualpath", 8.5, True, seed=1)]
    assert ratio_bounds(_verdicts(pts), 0) == (8.5 / 3.75, 10.625 / 3)
    assert ratio_bounds(_verdicts(pts), 1) is None  # seed 1: neither search bracketed


def test_a_capacity_sweep_reports_latency_against_the_rate_per_mode():
    from scenarios.report import RATE_KEY, _latency_vs_rate

    def group(rate, mode, ttft, ok, n=3):
        return {"values": {RATE_KEY: rate}, "stats": {
            f"online.slo_ok.{mode}": {"mean": ok / n, "n": n}, f"online.ttft_s.mean.{mode}": {"mean": ttft},
            f"online.ttft_s.last_third.{mode}": {"mean": ttft * 1.5}, f"online.tpot_s.mean.{mode}": {"mean": 0.015}}}

    lines = _latency_vs_rate([group(8.5, "dualpath", 2.0, 3), group(3.75, "basic", 3.8, 0), group(3, "basic", 2.0, 3)])
    assert lines[4:7] == ["| basic | 3 | 2.00 | 3.00 | - | 15.0 | 3 of 3 |",  # basic first, rates ascending
                          "| basic | 3.75 | 3.80 | 5.70 | - | 15.0 | 0 of 3 |",
                          "| dualpath | 8.5 | 2.00 | 3.00 | - | 15.0 | 3 of 3 |"]
    assert "No trustworthy run" in _latency_vs_rate([{"values": {RATE_KEY: 1}, "stats": {}}])[2]

"""emulator.fidelity: plans outside the measured limits are refused; runs get a verdict."""

from __future__ import annotations

import pytest

from emulator import fidelity
from emulator.errors import FidelityError
from emulator.fidelity import (CPU_UTIL_MAX, KERNEL_BUDGET_BPS, RATE_MAX_BPS, RATE_MIN_BPS, RATE_TOLERANCE,
                               check_load, check_rates, judge)
from emulator.units import format_rate
from scenarios import schema
from scenarios.plan import make_plan


def test_limits_are_sane():
    # the limits are re-measured with `dpemu bench`; the tests below follow the constants
    assert 0 < RATE_MIN_BPS < RATE_MAX_BPS <= KERNEL_BUDGET_BPS
    assert (RATE_TOLERANCE, CPU_UTIL_MAX) == (0.03, 0.85)


RANGE = f"{format_rate(RATE_MIN_BPS)}..{format_rate(RATE_MAX_BPS)}"


# -- check_rates -------------------------------------------------------------
@pytest.mark.parametrize("rate", [RATE_MIN_BPS, RATE_MIN_BPS * 1.001, (RATE_MIN_BPS * RATE_MAX_BPS) ** 0.5,
                                  RATE_MAX_BPS * 0.999, RATE_MAX_BPS])
def test_check_rates_accepts_inside(rate):
    assert check_rates({"snic": rate}) == []


@pytest.mark.parametrize("rate", [0.4e6, RATE_MIN_BPS * 0.999, RATE_MAX_BPS * 1.001, 400e9])
def test_check_rates_refuses_outside(rate):
    problems = check_rates({"snic": rate})
    assert len(problems) == 1
    assert problems[0].startswith(f"snic links would be shaped to {format_rate(rate)}, outside the {RANGE} ")


def test_check_rates_one_problem_per_bad_class():
    problems = check_rates({"snic": RATE_MIN_BPS / 2, "cnic": RATE_MIN_BPS * 2, "stnic": RATE_MAX_BPS * 2})
    assert [p.split()[0] for p in problems] == ["snic", "stnic"]


# -- check_load --------------------------------------------------------------
@pytest.mark.parametrize("bps", [0.0, KERNEL_BUDGET_BPS / 2, KERNEL_BUDGET_BPS])
def test_check_load_accepts_within_budget(bps):
    assert check_load(bps, "peak") == []


def test_check_load_refuses_over_budget():
    over = KERNEL_BUDGET_BPS * 1.01
    problems = check_load(over, "the cluster's peak traffic")
    assert len(problems) == 1
    assert problems[0].startswith(f"the cluster's peak traffic is predicted at {format_rate(over)} in aggregate, "
                                  f"more than the {format_rate(KERNEL_BUDGET_BPS)}")


# -- judge -------------------------------------------------------------------
def test_judge_passes_when_all_is_well():
    v = judge(0.5, 0.3, {"pe1-snic up": 0.01, "pe1-snic down": -0.02})
    assert v.ok and v.reasons == []
    assert v.link_rate_error_max == pytest.approx(0.02)
    assert (v.cpu_util_max, v.cpu_util_mean) == (0.5, 0.3)


def test_judge_passes_at_the_limits():
    assert judge(CPU_UTIL_MAX, 0.5, {"a up": RATE_TOLERANCE, "a down": -RATE_TOLERANCE}).ok


@pytest.mark.parametrize("cpu", [0.86, 0.99, 1.0])
def test_judge_fails_on_high_cpu(cpu):
    v = judge(cpu, 0.5, {"a up": 0.0})
    assert not v.ok
    assert len(v.reasons) == 1 and "CPU reached" in v.reasons[0]


def test_judge_fails_without_cpu_samples():
    v = judge(None, None, {"a up": 0.0})
    assert not v.ok and "no CPU samples" in v.reasons[0]


@pytest.mark.parametrize("err", [0.031, -0.031, 0.10, -0.5])
def test_judge_fails_on_link_error_over_3_percent(err):
    v = judge(0.5, 0.3, {"a up": 0.0, "st1-nic down": err})
    assert not v.ok
    assert v.link_rate_error_max == pytest.approx(abs(err))
    assert len(v.reasons) == 1
    assert "1 link direction(s)" in v.reasons[0] and "st1-nic down" in v.reasons[0]


def test_judge_counts_every_bad_direction():
    v = judge(0.5, 0.3, {"a up": 0.05, "a down": -0.04, "b up": 0.0})
    assert "2 link direction(s)" in v.reasons[0]
    assert "worst a up: +5.0%" in v.reasons[0]


def test_judge_fails_on_missing_measurement():
    v = judge(0.5, 0.3, {"a up": 0.0, "b down": None})
    assert not v.ok
    assert v.reasons == ["no rate measured for b down"]


def test_judge_fails_when_nothing_was_measured():
    v = judge(0.5, 0.3, {"a up": None})
    assert not v.ok and v.link_rate_error_max is None


def test_judge_collects_every_reason():
    v = judge(0.95, 0.9, {"a up": 0.2, "b up": None})
    assert not v.ok and len(v.reasons) == 3


# -- plans refused before build ---------------------------------------------
def test_bytes_1e6_is_refused():
    plan = make_plan(schema.load("cluster", ["scale.bytes=0.000001"]))  # 400Gbit -> 400Kbit
    assert plan.problems
    assert any(p.startswith("snic links would be shaped to 400Kbit") for p in plan.problems)
    with pytest.raises(FidelityError, match="cannot be emulated faithfully"):
        plan.check()


def test_rates_too_high_are_refused():
    plan = make_plan(schema.load("tiny", ["scale.bytes=0.01"]))  # 400Gbit -> 4Gbit
    assert 4e9 > RATE_MAX_BPS
    assert any(p.startswith("cnic links") for p in plan.problems)


def test_aggregate_over_budget_is_refused():
    # 40 Mbit/s SNICs are fine one by one, but 2 x 80 x 40 Mbit/s = 6.4 Gbit/s in aggregate is not
    plan = make_plan(schema.load("cluster", ["cluster.prefill_nodes=40", "cluster.decode_nodes=40",
                                             "cluster.gpus_per_node=1"]))
    assert plan.predicted_bps == pytest.approx(6.4e9) and 6.4e9 > KERNEL_BUDGET_BPS
    assert len(plan.problems) == 1 and "peak traffic" in plan.problems[0]
    with pytest.raises(FidelityError):
        plan.check()


def test_good_plan_checks():
    plan = make_plan(schema.load("cluster"))
    assert plan.predicted_bps == pytest.approx(480e6)  # 2 x 6 SNICs x 40 Mbit/s
    assert plan.predicted_bps <= KERNEL_BUDGET_BPS
    plan.check()
    assert fidelity.check_rates(plan.rates_bps) == []

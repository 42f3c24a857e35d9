"""emulator.fidelity.judge_links, the link side of the verdict: every class measured, payload goodput against the
counters (GOODPUT_TOLERANCE), dequeue timing measured (DEQUEUE_MIN_GAPS) and on time (DEQUEUE_P99_MAX) or a
reason it could not be, no drops on a lossless fabric; and Verdict.as_dict."""

from __future__ import annotations

from emulator import fidelity
from emulator.fidelity import Verdict, judge_links

CLASSES = ["snic", "cnic", "stnic"]
MEASURED = {"snic": ["snic up", "snic down"], "cnic": ["cnic up"], "stnic": ["stnic down"]}
GOODPUT = {"snic up": 0.004, "cnic up": -0.008, "stnic down": None}
DEQ = {"snic": {"gaps": 500, "late_p99": 0.3}, "cnic": {"gaps": 100, "late_p99": 1.0},
       "stnic": {"gaps": 2000, "late_p99": 0.0}}


def judge(classes=CLASSES, measured=MEASURED, goodput=GOODPUT, deq=DEQ, problem=None, drops=None) -> Verdict:
    v = Verdict()
    judge_links(v, classes, measured, goodput, deq, problem, drops or {})
    return v


def test_constants():
    assert fidelity.GOODPUT_TOLERANCE == 0.01
    assert fidelity.DEQUEUE_P99_MAX == 1.0
    assert fidelity.DEQUEUE_MIN_GAPS == 100


def test_all_good_passes_and_fills_dequeue_p99():
    v = judge(drops={"basic: pe1-cnic0 up": 0})  # a link that dropped nothing is no failure
    assert v.ok and v.reasons == []
    assert v.goodput_error_max == 0.008  # the worst |error|; None entries are skipped
    # boundaries pass: exactly DEQUEUE_MIN_GAPS gaps, late_p99 exactly DEQUEUE_P99_MAX
    assert v.dequeue_p99 == {"snic": 0.3, "cnic": 1.0, "stnic": 0.0}


def test_class_not_measured_fails():
    v = judge(measured={"snic": ["snic up"], "cnic": []})
    assert not v.ok
    assert [r for r in v.reasons if "not measured: no calibration" in r] == [
        "link class cnic was not measured: no calibration test covered it",
        "link class stnic was not measured: no calibration test covered it"]


def test_goodput_over_tolerance_fails():
    v = judge(goodput={"snic up": 0.004, "cnic down": -0.012})
    assert not v.ok
    assert v.goodput_error_max == 0.012
    assert len(v.reasons) == 1
    assert "more than 1%" in v.reasons[0] and "(worst cnic down: -1.2%)" in v.reasons[0]


def test_goodput_within_tolerance_passes():
    v = judge(goodput={"snic up": 0.0099, "cnic down": -0.01})  # |-0.01| is not more than 0.01
    assert v.ok and v.goodput_error_max == 0.01


def test_goodput_none_measured():
    v = judge(goodput={"snic up": None, "cnic up": None})
    assert not v.ok and v.reasons == ["no payload goodput measured against the counters"]
    assert v.goodput_error_max is None
    assert judge(goodput={}).ok  # no iperf3 payload tests at all: nothing to judge


def test_dequeue_late_fails():
    deq = {**DEQ, "cnic": {"gaps": 300, "late_p99": 1.5}}
    v = judge(deq=deq)
    assert not v.ok
    assert v.reasons == ["cnic links dequeue late: p99 of gap/ideal - 1 is 1.50 (limit 1: one skb late)"]
    assert v.dequeue_p99["cnic"] == 1.5  # reported even when it fails


def test_dequeue_too_few_gaps_is_not_measured():
    deq = {"snic": {"gaps": 99, "late_p99": 0.1}, "cnic": DEQ["cnic"]}  # stnic missing altogether
    v = judge(deq=deq)
    assert not v.ok
    assert v.reasons == [
        "dequeue timing of snic links not measured (99 busy gaps, at least 100 needed)",
        "dequeue timing of stnic links not measured (0 busy gaps, at least 100 needed)"]
    assert v.dequeue_p99 == {"cnic": 1.0}


def test_dequeue_problem_fails_and_skips_per_class():
    v = judge(deq={}, problem="dequeue timing needs root (tracefs)")
    assert not v.ok
    assert v.reasons == ["dequeue timing not measured: dequeue timing needs root (tracefs)"]
    assert v.dequeue_p99 == {}


def test_lossless_drops_fail_and_name_links():
    drops = {"basic: pe1-cnic0 up": 3, "dualpath: de1-cnic0 down": 7, "oracle: pe1-cnic0 down": 0}
    v = judge(drops=drops)
    assert not v.ok
    assert len(v.reasons) == 1
    r = v.reasons[0]
    assert "2 of its link direction(s) dropped packets" in r
    assert r.endswith("dualpath: de1-cnic0 down (7), basic: pe1-cnic0 up (3)")  # most drops first
    assert "oracle" not in r


def test_lossless_drops_name_at_most_six():
    drops = {f"basic: pe{i}-cnic0 up": i for i in range(1, 9)}
    r = judge(drops=drops).reasons[0]
    assert "8 of its link direction(s)" in r
    assert "pe8-cnic0 up (8)" in r and "pe3-cnic0 up (3)" in r and "pe2-cnic0" not in r


def test_judge_links_adds_to_a_verdict():
    v = Verdict(cpu_util_max=0.5)
    v.fail("earlier")
    judge_links(v, ["snic"], {"snic": ["x"]}, {}, {"snic": {"gaps": 100, "late_p99": 0.2}}, None, {})
    assert not v.ok and v.reasons == ["earlier"] and v.dequeue_p99 == {"snic": 0.2}


def test_verdict_as_dict():
    v = Verdict(cpu_util_max=0.7, cpu_util_mean=0.4)
    v.notes.append("a note")
    judge_links(v, ["snic"], {"snic": ["x"]}, {"a": 0.002}, {"snic": {"gaps": 100, "late_p99": 0.2}}, None, {})
    d = v.as_dict()
    assert list(d) == ["ok", "cpu_util_max", "cpu_util_mean", "link_rate_error_max", "goodput_error_max",
                       "dequeue_p99", "dequeue_p99_max", "reasons", "notes"]
    assert d == {"ok": True, "cpu_util_max": 0.7, "cpu_util_mean": 0.4, "link_rate_error_max": None,
                 "goodput_error_max": 0.002, "dequeue_p99": {"snic": 0.2}, "dequeue_p99_max": 1.0, "reasons": [],
                 "notes": ["a note"]}

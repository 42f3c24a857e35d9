"""Can this run be trusted? Limits measured on this machine, and the verdict.

Two things make an emulation lie: a link that does not deliver its configured
rate (HTB is exact only within a range of rates on a given machine) and a CPU
that runs out (then the daemons, not the links, set the pace). Plans outside
the measured limits are refused before anything is built; every finished run
gets a verdict from what was actually measured during it.

The limits below were measured with ``dpemu bench`` on the project's 2-core
machine kind (see docs/fidelity.md for the tables). Re-measure after changing
the HTB plan or moving to another machine kind.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .units import format_rate

# One shaped link, both directions, iperf3 (reno) load, 6 s, skbs capped to 1 ms: within 0.05% of the configured
# rate on the wire from 5 Mbit/s to 4 Gbit/s (docs/fidelity.md, 2026-12-02). Below 10 Mbit/s one segment holds a
# port longer than the 1 ms skb the plan promises; above 1 Gbit/s a single link already costs 30-75% of the CPU.
RATE_MIN_BPS = 10e6
RATE_MAX_BPS = 1e9
# Aggregate wire traffic (sum over all shaped directions that carry it once:
# each byte is counted at the host egress of its sender) that the kernel's
# veth + bridge + HTB path carries with the machine below CPU_UTIL_MAX.
KERNEL_BUDGET_BPS = 1e9
CPU_UTIL_MAX = 0.85  # above this (over 0.5 s spans) timing is not trusted
RATE_TOLERANCE = 0.03  # saturated links must be within 3% of configured
# iperf3's payload against the payload the HTB counters imply (wire bytes less 66 B per segment), same window:
# measured within 0.04% on every class of the default cluster (receiver-side intervals); a counter that lies shows
GOODPUT_TOLERANCE = 0.01
# Dequeue timing (emulator.dequeue): over every busy gap of a link class, calibration and serving together, the
# 99th percentile of gap / ideal - 1 must stay at most DEQUEUE_P99_MAX: 99% of packets on a saturated port
# leave less than one skb time (<= emulation.skb, 1 ms of real time) after the rate says, a tenth of the queue
# the port emulates. Calm calibration measures 0.06-0.13, busy serving runs 0.3-0.8 (docs/fidelity.md); a
# starved machine, whose late timers send packets many skb times late, fails it. Fewer than DEQUEUE_MIN_GAPS
# gaps is "not measured".
DEQUEUE_PERCENTILE = 99
DEQUEUE_P99_MAX = 1.0
DEQUEUE_MIN_GAPS = 100


def check_rates(rates_bps: dict[str, float]) -> list[str]:
    """Problems with link classes whose rate is outside the faithful range."""
    problems = []
    for name, rate in rates_bps.items():
        if not RATE_MIN_BPS <= rate <= RATE_MAX_BPS:
            problems.append(f"{name} links would be shaped to {format_rate(rate)}, outside the "
                            f"{format_rate(RATE_MIN_BPS)}..{format_rate(RATE_MAX_BPS)} this machine shapes "
                            f"within {RATE_TOLERANCE:.0%}; change scale.bytes or scale.time")
    return problems


def check_load(predicted_bps: float, what: str) -> list[str]:
    if predicted_bps > KERNEL_BUDGET_BPS:
        return [f"{what} is predicted at {format_rate(predicted_bps)} in aggregate, more than the "
                f"{format_rate(KERNEL_BUDGET_BPS)} this machine carries below {CPU_UTIL_MAX:.0%} CPU; "
                f"lower scale.bytes or raise scale.time"]
    return []


@dataclass
class Verdict:
    ok: bool = True
    reasons: list[str] = field(default_factory=list)
    cpu_util_max: float | None = None
    cpu_util_mean: float | None = None
    link_rate_error_max: float | None = None
    goodput_error_max: float | None = None
    dequeue_p99: dict[str, float] = field(default_factory=dict)  # link class -> |error| p99
    notes: list[str] = field(default_factory=list)  # measured and reported, not failing

    def fail(self, reason: str) -> None:
        self.ok = False
        self.reasons.append(reason)

    def as_dict(self) -> dict:
        return {"ok": self.ok, "cpu_util_max": self.cpu_util_max, "cpu_util_mean": self.cpu_util_mean,
                "link_rate_error_max": self.link_rate_error_max, "goodput_error_max": self.goodput_error_max,
                "dequeue_p99": self.dequeue_p99, "dequeue_p99_max": DEQUEUE_P99_MAX, "reasons": self.reasons,
                "notes": self.notes}


def judge_links(v: Verdict, classes: list[str], measured: dict[str, list[str]], goodput_errors: dict[str, float | None],
                dequeue: dict[str, dict], dequeue_problem: str | None, lossless_drops: dict[str, int]) -> None:
    """The link side of the verdict, added to `v`:
    - every link class of the network had a rate measured (`measured`: class -> labels measured);
    - iperf3's payload matches the counters' within GOODPUT_TOLERANCE;
    - every link class's dequeue timing was measured (DEQUEUE_MIN_GAPS busy gaps) and its p99 lateness is at most
      DEQUEUE_P99_MAX (`dequeue`: class -> ``emulator.dequeue.summarize``);
    - no link of a lossless fabric dropped a packet (`lossless_drops`: link -> drops)."""
    for cls in classes:
        if not measured.get(cls):
            v.fail(f"link class {cls} was not measured: no calibration test covered it")
    errs = {k: e for k, e in goodput_errors.items() if e is not None}
    if errs:
        worst = max(errs, key=lambda k: abs(errs[k]))
        v.goodput_error_max = round(abs(errs[worst]), 5)
        if abs(errs[worst]) > GOODPUT_TOLERANCE:
            v.fail(f"iperf3's payload disagrees with the counters' by more than {GOODPUT_TOLERANCE:.0%} "
                   f"(worst {worst}: {errs[worst]:+.1%})")
    elif goodput_errors:
        v.fail("no payload goodput measured against the counters")
    if dequeue_problem:
        v.fail(f"dequeue timing not measured: {dequeue_problem}")
    else:
        for cls in classes:
            d = dequeue.get(cls, {})
            if d.get("gaps", 0) < DEQUEUE_MIN_GAPS:
                v.fail(f"dequeue timing of {cls} links not measured ({d.get('gaps', 0)} busy gaps, "
                       f"at least {DEQUEUE_MIN_GAPS} needed)")
                continue
            v.dequeue_p99[cls] = d["late_p99"]
            if d["late_p99"] > DEQUEUE_P99_MAX:
                v.fail(f"{cls} links dequeue late: p{DEQUEUE_PERCENTILE} of gap/ideal - 1 is "
                       f"{d['late_p99']:.2f} (limit {DEQUEUE_P99_MAX:g}: one skb late)")
    dropped = {k: n for k, n in lossless_drops.items() if n}
    if dropped:
        names = ", ".join(f"{k} ({n})" for k, n in sorted(dropped.items(), key=lambda kv: -kv[1])[:6])
        v.fail(f"the compute fabric is lossless in the paper, but {len(dropped)} of its link direction(s) dropped "
               f"packets: {names}")


def judge(cpu_util_max: float | None, cpu_util_mean: float | None,
          rate_errors: dict[str, float | None]) -> Verdict:
    """Verdict from measured CPU and per-link rate errors (achieved/configured - 1)."""
    v = Verdict(cpu_util_max=cpu_util_max, cpu_util_mean=cpu_util_mean)
    if cpu_util_max is None:
        v.fail("no CPU samples were taken")
    elif cpu_util_max > CPU_UTIL_MAX:
        v.fail(f"CPU reached {cpu_util_max:.0%} (limit {CPU_UTIL_MAX:.0%}): timing is not trustworthy")
    errs = {k: e for k, e in rate_errors.items() if e is not None}
    missing = sorted(k for k, e in rate_errors.items() if e is None)
    if missing:
        v.fail(f"no rate measured for {', '.join(missing[:5])}")
    if errs:
        worst = max(errs, key=lambda k: abs(errs[k]))
        v.link_rate_error_max = abs(errs[worst])
        if abs(errs[worst]) > RATE_TOLERANCE:
            bad = sum(1 for e in errs.values() if abs(e) > RATE_TOLERANCE)
            v.fail(f"{bad} link direction(s) off by more than {RATE_TOLERANCE:.0%} "
                   f"(worst {worst}: {errs[worst]:+.1%})")
    return v

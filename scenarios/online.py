"""Online serving: the steady state of a run with Poisson agent arrivals, its SLO verdict, and the capacity
(highest arrival rate that meets the SLO) of a sweep over arrival rates.

Steady state (one definition, used everywhere): the turns SUBMITTED between a quarter of the arrival span and
the last agent's arrival, ``[0.25 x T, T]`` with ``T`` the last arrival (real seconds from the first). Before,
the cluster fills from empty; after, no agent arrives any more and it drains, so both ends would flatter the
latencies. Agents' trajectory JCT counts the agents that ARRIVED in that window (arrival -> last turn done)
and finished their trajectory (a run that stops after the window leaves the late agents' unfinished).

The SLO is the paper's: mean TTFT <= 4 s and mean TPOT <= 50 ms over the steady window, and the window's last
third also has a mean TTFT <= 4 s (a queue that keeps growing has not reached a steady state even if its
average still passes). Capacity is the highest swept arrival rate whose run meets the SLO, with every lower
swept rate meeting it too (a pass above a failure is noise, not capacity).
"""

from __future__ import annotations

import statistics

SLO_TTFT_S = 4.0
SLO_TPOT_S = 0.050
WARMUP_FRACTION = 0.25
PARTS = ("wait_s", "alloc_s", "read_s", "prefill_s")  # TTFT breakdown; the rest is the first decode step


def _mean(xs: list[float]) -> float | None:
    return round(statistics.fmean(xs), 6) if xs else None


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (q in 0..100, inclusive method) of `values`; None if empty. The one definition
    every serving figure uses."""
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if q < 100 else max(values)


def _pct(xs: list[float], q: float) -> float | None:
    p = percentile(xs, q * 100)
    return None if p is None else round(p, 6)


def steady_state(rows: list[dict]) -> dict:
    """The online figures of one mode from its requests.csv rows (times in real seconds)."""
    arrivals = [float(r["arrival_s"]) for r in rows]
    if not rows:
        return {"turns": 0, "slo_ok": False, "why": "no turns"}
    end = max(arrivals)
    start = WARMUP_FRACTION * end
    window = sorted((r for r in rows if start <= float(r["submit_s"]) <= end), key=lambda r: float(r["submit_s"]))
    col = {k: [float(r[k]) for r in window] for k in ("ttft_s", *PARTS)}
    ttst = [float(r["ttst_s"]) for r in window if float(r["ttst_s"]) > 0]
    tpot = [float(r["tpot_s"]) for r in window if int(r["gen_tokens"]) > 1]
    last_third = [float(r["ttft_s"]) for r in window[2 * len(window) // 3:]]
    agents: dict[str, list[float]] = {}
    for r in rows:
        a = agents.setdefault(r["agent"], [float(r["arrival_s"]), 0.0])
        a[1] = max(a[1], float(r["done_s"]))
    if "last_turn" in rows[0]:  # a run may stop after the window: only the trajectories that finished count
        finished = {r["agent"] for r in rows if int(r["last_turn"])}
        agents = {k: v for k, v in agents.items() if k in finished}
    jct = [done - arr for arr, done in agents.values() if start <= arr <= end]
    out = {
        "window_s": [round(start, 3), round(end, 3)], "turns": len(window), "agents": len(jct),
        "ttft_s": {"mean": _mean(col["ttft_s"]), "p50": _pct(col["ttft_s"], 0.5), "p90": _pct(col["ttft_s"], 0.9),
                   "p99": _pct(col["ttft_s"], 0.99), "last_third_mean": _mean(last_third)},
        "ttst_s": {"mean": _mean(ttst), "p99": _pct(ttst, 0.99)},
        "tpot_s": {"mean": _mean(tpot), "p99": _pct(tpot, 0.99)},
        "trajectory_jct_s": {"mean": _mean(jct), "p99": _pct(jct, 0.99)},
        "ttft_breakdown_s": {**{k.removesuffix("_s"): _mean(v) for k, v in col.items() if k in PARTS},
                             "first_step": _mean([float(r["ttft_s"]) - sum(float(r[k]) for k in PARTS)
                                                  for r in window])},
    }
    why = []
    if not window:
        why.append("no turn in the steady window")
    else:
        if out["ttft_s"]["mean"] > SLO_TTFT_S:
            why.append(f"mean TTFT {out['ttft_s']['mean']:.2f} s > {SLO_TTFT_S:g} s")
        if out["tpot_s"]["mean"] is not None and out["tpot_s"]["mean"] > SLO_TPOT_S:
            why.append(f"mean TPOT {out['tpot_s']['mean'] * 1e3:.1f} ms > {SLO_TPOT_S * 1e3:g} ms")
        if out["ttft_s"]["last_third_mean"] > SLO_TTFT_S:
            why.append(f"the last third of the window has mean TTFT {out['ttft_s']['last_third_mean']:.2f} s")
    out["slo_ok"] = not why
    out["why"] = "; ".join(why)
    return out


def bracket(results: dict[float, bool]) -> tuple[float | None, float | None]:
    """(highest rate meeting the SLO with every lower rate meeting it too, the lowest rate that missed it);
    None for the first: the lowest rate missed; None for the second: every rate met it."""
    best = None
    for rate in sorted(results):
        if not results[rate]:
            return best, rate
        best = rate
    return best, None


def capacity(results: dict[float, bool]) -> tuple[float | None, bool]:
    """(the capacity, whether a higher swept rate missed the SLO) of ``bracket``. Not bracketed, the capacity
    is only known to be at least that rate; None: the lowest rate missed."""
    cap, miss = bracket(results)
    return cap, miss is not None

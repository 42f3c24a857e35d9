"""``dpemu bench``: re-measure the machine limits that emulator/fidelity.py encodes.

- ``dpemu bench rates``: one small cluster per rate (1 prefill + 1 decode node,
  1 GPU, 1 storage server, every link at the same rate), every link class
  calibrated in both directions, one test at a time; prints the worst rate
  error and the CPU. The faithful range is where the worst error stays within 3%.
- ``dpemu bench serve [SCENARIO] [--set ...]``: a serving run (the default scenario unless named), and per mode
  what a turn costs the machine (``scenarios.servecost``): CPU core-ms per turn in all and per process role,
  gRPC calls, messages and bytes per turn, turns per wall second. It measures the serving plane, so the run's
  fidelity verdict is printed but does not fail the benchmark.
- ``dpemu bench gpu``: the profiled GPU model's checks (no cluster, no root): Fig. 3's relative throughput
  against the paper's, with and without the fitted EP-group cost, and each profiled model's prefill and decode
  times at a few points against the analytic roofline (docs/costmodel.md).
- ``dpemu bench load``: clusters of growing size with every link calibrated at
  once (no CPU budget), at a fixed rate; prints aggregate offered traffic
  against CPU. The kernel budget is the largest aggregate below 85% CPU with
  all links within 3%. With ``--budget 1Gbit`` the links are calibrated in
  rounds as runs do: that measures how large a cluster can be built and still
  have every link within 3%.

Benchmarks bypass the fidelity refusal (they measure it) but still own the
machine through the registry and tear everything down.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from daemons import costprofile
from emulator import calibrate, dequeue, fidelity
from emulator.net import Emulation
from emulator.tcplan import htb_burst_bytes, queue_limit_bytes, skb_wire_bytes
from emulator.registry import Registry
from emulator.units import format_rate, parse_duration, parse_rate
from topologies.cluster import ClusterSpec, Scale, cluster_net

from . import platform, servecost

REAL_BPS = 400e9


def _measure(cluster: ClusterSpec, rate_bps: float, mode: str, duration_s: float, say,
             budget_bps: float) -> dict:
    net = cluster_net(cluster, Scale(rate_bps / REAL_BPS), queue_s=0.01)
    tests = calibrate.plan_tests(net, mode)
    with Registry() as reg:
        emu = Emulation(net, reg, f"bench-{int(time.time())}")
        try:
            emu.build()
            cal = calibrate.run(emu, tests, duration_s, budget_bps=budget_bps)
        finally:
            left = emu.teardown()
    errs = [m.error for m in cal.measurements if m.error is not None]
    gp = [m.goodput_error for m in cal.measurements if m.goodput_error is not None]
    lk = net.links[0]  # every link at the same rate: one skb, burst and queue
    timing = {cls: dequeue.summarize(dequeue.histogram(e)) for cls, e in cal.dequeue.items()}
    late = max((t["late_p99"] for t in timing.values() if t.get("gaps")), default=None)
    row = {"rate_bps": rate_bps, "links": len(net.links), "hosts": len(net.hosts),
           "skb_bytes": skb_wire_bytes(lk.skb_segs), "burst_bytes": htb_burst_bytes(lk.rate_bps, lk.skb_segs),
           "queue_bytes": queue_limit_bytes(lk.rate_bps, lk.queue_s, lk.skb_segs),
           "goodput_error_max": max(gp, key=abs) if gp else None, "dequeue": timing, "dequeue_late_p99_max": late,
           "offered_bps": max(sum(t.offered_bps for t in r) for r in calibrate.schedule(tests, budget_bps)),
           "achieved_up_bps": sum(m.achieved_bps or 0 for m in cal.measurements if m.target.direction == "up"),
           "worst_error": max(errs, key=abs) if errs else None, "measured": len(errs),
           "expected": len(cal.measurements), "cpu_util_max": cal.cpu_util_max,
           "cpu_util_mean": cal.cpu_util_mean, "build_s": emu.build_s, "teardown_s": emu.teardown_s,
           "left": left}
    ms = 8e3 / rate_bps
    say(f"{format_rate(rate_bps):>9s} {row['hosts']:4d} hosts {row['links']:4d} links  offered (peak round) "
        f"{format_rate(row['offered_bps'], 4):>9s}  worst error {row['worst_error']:+.2%}  payload "
        f"{(row['goodput_error_max'] or 0):+.2%}  dequeue p99 late {late if late is not None else '-'}  CPU max "
        f"{row['cpu_util_max']:.0%}  skb {row['skb_bytes']}B ({row['skb_bytes'] * ms:.2f} ms)  burst "
        f"{row['burst_bytes']}B ({row['burst_bytes'] * ms:.2f} ms)  queue {row['queue_bytes']}B "
        f"({row['queue_bytes'] * ms:.1f} ms)  build {emu.build_s:.1f}s")
    return row


def run_rates(rates: list[float], duration_s: float, say) -> list[dict]:
    # budget 0: one test per round, so each link is measured alone
    return [_measure(ClusterSpec(1, 1, gpus_per_node=1, storage_servers=1, storage_nic_rate_bps=REAL_BPS),
                     r, "class", duration_s, say, budget_bps=0) for r in rates]


def run_load(rate_bps: float, sizes: list[tuple[int, int, int]], duration_s: float, say,
             budget_bps: float = float("inf")) -> list[dict]:
    return [_measure(ClusterSpec(p, d, gpus_per_node=g, storage_servers=1, storage_nic_rate_bps=REAL_BPS),
                     rate_bps, "all", duration_s, say, budget_bps=budget_bps) for p, d, g in sizes]


def _parse_sizes(text: str) -> list[tuple[int, int, int]]:
    out = []
    for part in text.split(","):
        p, d, g = (int(x) for x in part.split(":"))
        out.append((p, d, g))
    return out


def run_serve(scenario: str, sets: list[str], out_root: Path, say) -> list[dict]:
    """One run of `scenario`; the cost figures of each mode, as rows."""
    from . import runner, schema  # noqa: PLC0415 - the serving plane only for this benchmark
    from .plan import make_plan

    plan = make_plan(schema.load(scenario, sets))
    plan.check()
    outcome = runner.run(plan, out_root, say=lambda _: None)
    rows = []
    modes = {**outcome.summary.get("modes", {}), **outcome.summary.get("extra_runs", {})}
    for mode, m in modes.items():
        c = m["cost"]
        rows.append({"mode": mode, **c})
        cpu, rpc = c["cpu_core_ms_per_turn"], c["rpc_per_turn"]
        say(f"{mode:9s} {c['turns']:5d} turns {c['turns_per_wall_s']:6.2f}/wall s  CPU {cpu['total']:6.2f} core-ms/turn"
            f" (" + " ".join(f"{k} {cpu[k]:.2f}" for k in servecost.ROLES) + ")")
        say(f"{'':9s} gRPC per turn: {rpc['total']['calls']:.1f} calls, {rpc['total']['messages']:.1f} messages, "
            f"{rpc['total']['bytes'] / 1e3:.1f} kB  (" + ", ".join(
                f"{role} {r['calls']:.1f}" for role, r in rpc.items() if role != "total") + " calls)")
    say(f"run: {outcome.run_dir} (fidelity {'ok' if outcome.summary['fidelity']['ok'] else 'NOT ok'}: "
        f"{'; '.join(outcome.summary['fidelity']['reasons']) or 'trustworthy'})")
    return rows


def run_gpu(say) -> list[dict]:
    """The profiled GPU model's checks (no cluster, no root): Fig. 3 and a few points against the roofline."""
    c = costprofile.checks()
    say(c["source"])
    fig = c["fig3"]
    say(f"Fig. 3 (DS 660B, one prefill engine, 30K cached + 300 new; EP-group cost {c['forward_s'] * 1e3:.2f} ms "
        f"per MoE layer fitted at batch {fig['fit_batch']}):")
    say(f"  {'batch':>5s} {'paper':>6s} {'ours':>6s} {'error':>7s} {'kernels only':>13s}")
    for b, want in fig["paper"].items():
        got = fig["ours"][b]
        say(f"  {b:5d} {want:6.2f} {got:6.2f} {got / want - 1:+7.1%} {fig['kernels_only'][b]:13.2f}"
            + ("  (fitted)" if b == fig["fit_batch"] else ""))
    say("per engine on the paper's Hopper (profiled / analytic roofline):")
    rows = []
    for model, points in c["points"].items():
        for label, (prof, roof) in points.items():
            say(f"  {model:8s} {label:28s} {prof * 1e3:9.1f} ms {roof * 1e3:9.1f} ms")
            rows.append({"model": model, "point": label, "profile_s": prof, "roofline_s": roof})
    rows.append({"fig3": fig, "forward_s": c["forward_s"], "source": c["source"]})
    return rows


def cmd_bench(args) -> int:
    say = print
    if args.what != "gpu":
        platform.require_root()
        platform.require_tools()
    duration = parse_duration(args.duration)
    if args.what == "gpu":
        rows = run_gpu(say)
    elif args.what == "serve":
        rows = run_serve(args.scenario or "default", args.set, Path(args.out), say)
    elif args.what == "rates":
        rows = run_rates([parse_rate(r) for r in args.rates.split(",")], duration, say)
    else:
        budget = float("inf") if args.budget == "none" else parse_rate(args.budget)
        rows = run_load(parse_rate(args.rate), _parse_sizes(args.sizes), duration, say, budget)
    out = Path(args.out) / "bench"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.what}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"what": args.what, "tolerance": fidelity.RATE_TOLERANCE, "rows": rows}, indent=2))
    say(f"written: {path}")
    return 0


def add_parser(sub) -> None:
    b = sub.add_parser("bench", help="re-measure this machine's shaping range and CPU budget")
    b.add_argument("what", choices=["rates", "load", "serve", "gpu"])
    b.add_argument("scenario", nargs="?", default=None, help="bench serve: the scenario (default: default)")
    b.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="bench serve: overrides")
    b.add_argument("--rates", default="5Mbit,10Mbit,20Mbit,50Mbit,100Mbit,500Mbit,1Gbit,2Gbit,4Gbit",
                   help="rates to sweep (bench rates)")
    b.add_argument("--rate", default="100Mbit", help="link rate (bench load)")
    b.add_argument("--sizes", default="1:1:2,2:2:4,2:4:8,4:8:8",
                   help="clusters P:D:GPUs, comma separated (bench load)")
    b.add_argument("--budget", default="none",
                   help="bench load: aggregate rate per round, e.g. 1Gbit as runs use (default none: all at once)")
    b.add_argument("--duration", default="6s")
    b.add_argument("--out", default="results")
    b.set_defaults(func=cmd_bench)

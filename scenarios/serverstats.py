"""Figures of a run spread over several servers, per server, from the run directory's files.

The runner writes ``servers.json`` (what the agents reported: each server's dpemu, underlay and clock offsets,
its CPU in calibration and serving, its dequeue timing); the per-link calibration errors come from
``calibration.csv``. :func:`figures` puts them together for ``summary.json``; the terminal and ``report.md``
read them there. Every timing figure of serving (JCT, TTFT, TPOT) comes from the workload driver, one process
on the first server; link counters read on another server are moved to the first server's clock by that
server's offset, measured by the fastest of five round trips at the start and again at the end.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

TIMING_NOTE = ("JCT, TTFT and TPOT: the workload driver's, one process on {first}; link counters of other "
               "servers: their agents' reads, moved to {first}'s clock by each server's offset")


def write(run_dir: Path, report: dict, calibration_cpu: dict, serving_cpu: dict | None) -> None:
    """The runner's raw record of the servers (once the last clock offsets are in)."""
    (run_dir / "servers.json").write_text(json.dumps(
        {**report, "cpu": {"calibration": calibration_cpu, "serving": serving_cpu or {}}}, indent=1) + "\n")


def figures(run_dir: Path, net) -> dict | None:
    """Per server: where it is, its nodes, CPU, worst link error, dequeue p99 and clock offsets; None for a run
    on one machine (or before the runner wrote servers.json)."""
    path = run_dir / "servers.json"
    if not net.servers or not path.exists():
        return None
    raw = json.loads(path.read_text())
    where = dict(net.placement)
    first = net.servers[0].name
    worst: dict[str, float] = {}
    cal = run_dir / "calibration.csv"
    for row in (csv.DictReader(cal.open()) if cal.exists() else []):
        if row["error"] == "":
            continue
        srv = net.remote_of(row["netns"] or None, row["interface"])
        name = first if srv is None else srv.name
        worst[name] = max(worst.get(name, 0.0), abs(float(row["error"])))
    out = {}
    for s in net.servers:
        info = raw["servers"].get(s.name, {})
        clocks = info.get("clock", [])
        cpu_c = raw["cpu"]["calibration"].get(s.name, {})
        cpu_s = raw["cpu"]["serving"].get(s.name, {})
        out[s.name] = {
            "address": s.address or "this machine",
            "nodes": [h for h, srv in where.items() if srv == s.name and h in {x.name for x in net.hosts}],
            "bridges": [sw.bridge for sw in net.switches if where.get(sw.name) == s.name],
            "cpu_util_max": {"calibration": cpu_c.get("cpu_util_max"), "serving": cpu_s.get("cpu_util_max")},
            "link_error_max": worst.get(s.name),
            "dequeue_p99": {g: d.get("late_p99") for g, d in raw.get("dequeue", {}).get(s.name, {}).items()},
            "clock": None if s.local or not clocks else {
                "mono_offset_s": clocks[0]["mono_offset_s"], "wall_offset_s": clocks[0]["wall_offset_s"],
                "error_s": max(c["error_s"] for c in clocks),
                "drift_s": clocks[-1]["mono_offset_s"] - clocks[0]["mono_offset_s"]},
            "underlay": info.get("underlay") or (None if not s.local else None),
        }
    return {"servers": out, "mtu": raw.get("mtu"), "tunnel": raw.get("tunnel"), "tunnels": raw.get("tunnels"),
            "agents_start_s": raw.get("agents_start_s"), "timing": TIMING_NOTE.format(first=first)}


def lines(fig: dict) -> list[str]:
    """One line per server, for the terminal."""
    def pct(x):
        return "-" if x is None else f"{x:.0%}"
    out = [f"servers: {len(fig['servers'])}, {fig['tunnels']} {fig['tunnel']} tunnels, MTU {fig['mtu']}"]
    for name, s in fig["servers"].items():
        dq = " ".join(f"{g} {p:.2f}" for g, p in s["dequeue_p99"].items() if p is not None) or "-"
        clock = "" if s["clock"] is None else (f"; clock {s['clock']['mono_offset_s'] * 1e3:+.3f} ms "
                                               f"(±{s['clock']['error_s'] * 1e3:.3f}, drift "
                                               f"{s['clock']['drift_s'] * 1e3:+.3f})")
        err = "-" if s["link_error_max"] is None else f"{s['link_error_max']:.2%}"
        out.append(f"  {name} ({s['address']}): {', '.join(s['nodes']) or '-'}; CPU max "
                   f"{pct(s['cpu_util_max']['calibration'])} calibration, {pct(s['cpu_util_max']['serving'])} "
                   f"serving; worst link {err}; dequeue p99 {dq}{clock}")
    return out

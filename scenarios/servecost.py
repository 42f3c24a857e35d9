"""What a serving mode costs the machine: CPU per turn by process role, and gRPC calls, messages and bytes.

The serving plane, not the links, is what limits how large a cluster this machine emulates: every turn costs
CPU in the daemons (gRPC, verifying KV bytes, the event loops) and in the kernel (TCP through veths, bridges
and HTB). A mode's ``cost`` figures, in ``summary.json`` and printed by ``dpemu bench serve``:

- ``cpu_core_ms_per_turn``: core-milliseconds of CPU (user + system) per finished turn while the workload ran,
  per role: ``storage``, ``prefill`` and ``decode`` (the node daemons), ``scheduler``, ``driver`` (the workload
  driver, from its own count), ``runner`` (this process: samplers, dequeue tracing), ``other`` (the rest of the
  machine: kernel work in softirq and kernel threads not charged to a process, and anything else running),
  and ``total`` (the whole machine, from /proc/stat);
- ``rpc_per_turn``: per role that serves RPCs (storage, prefill, decode, scheduler), ``calls``, ``messages``
  (both ways) and ``bytes`` (serialized protobuf, both ways) per turn, and per method;
- ``turns_per_wall_s``: finished turns per wall second.

Wall CPU is what the machine pays; it is not divided by the time scale.
"""

from __future__ import annotations

import os

from emulator.monitor import cpu_times, proc_cpu_s

ROLES = ("storage", "prefill", "decode", "scheduler", "driver", "runner", "other")


def role_of(what: str) -> str | None:
    """The role of a daemon as ``serve.daemon_argvs`` names it ("storage st1", "node pe1", "scheduler")."""
    if what.startswith("storage "):
        return "storage"
    if what.startswith("node pe"):
        return "prefill"
    if what.startswith("node de"):
        return "decode"
    return "scheduler" if what == "scheduler" else None


def machine_busy_s() -> float:
    """Busy CPU seconds of the whole machine so far (all cores), from /proc/stat."""
    return cpu_times()[0] / os.sysconf("SC_CLK_TCK")


def snapshot(procs: list[tuple[str, object]]) -> dict:
    """CPU seconds so far of every daemon (by its argv name), of this process, and of the machine."""
    return {"daemons": {what: proc_cpu_s(p.pid) for what, p in procs}, "runner": proc_cpu_s(os.getpid()),
            "machine": machine_busy_s()}


def figures(before: dict, after: dict, driver_cpu_s: float | None, turns: int, wall_s: float,
            status: dict) -> dict:
    """The cost figures of one mode from two snapshots, the driver's own CPU and the daemons' status replies
    (``daemons.status``: their RPC counts)."""
    per_role = dict.fromkeys(ROLES, 0.0)
    for what, t1 in after["daemons"].items():
        t0 = before["daemons"].get(what)
        role = role_of(what)
        if role is not None and t0 is not None and t1 is not None:
            per_role[role] += t1 - t0
    per_role["driver"] = driver_cpu_s or 0.0
    per_role["runner"] = after["runner"] - before["runner"]
    total = after["machine"] - before["machine"]
    per_role["other"] = max(0.0, total - sum(v for k, v in per_role.items() if k != "other"))
    n = max(turns, 1)
    cpu = {k: round(v * 1e3 / n, 3) for k, v in per_role.items()}
    cpu["total"] = round(total * 1e3 / n, 3)
    return {"turns": turns, "wall_s": round(wall_s, 3), "turns_per_wall_s": round(turns / wall_s, 3) if wall_s else None,
            "cpu_core_ms_per_turn": cpu, "rpc_per_turn": rpc_per_turn(status, n)}


def rpc_per_turn(status: dict, turns: int) -> dict:
    """Calls, messages and bytes per turn, per serving role and method, from ``daemons.status``'s JSON."""
    sources = [("storage", s.get("rpcs", [])) for s in status.get("storage", {}).values()]
    sources += [("prefill" if n.get("role") == "pe" else "decode", n.get("rpcs", []))
                for n in status.get("nodes", {}).values()]
    sources.append(("scheduler", status.get("scheduler", {}).get("rpcs", [])))
    out: dict[str, dict] = {}
    totals = {"calls": 0, "messages": 0, "bytes": 0}
    for role, rpcs in sources:
        r = out.setdefault(role, {"calls": 0, "messages": 0, "bytes": 0, "methods": {}})
        for c in rpcs:
            calls, msgs = int(c["calls"]), int(c["messages_in"]) + int(c["messages_out"])
            nbytes = int(c["bytes_in"]) + int(c["bytes_out"])
            name = c["method"].rsplit("/", 1)[-1]
            m = r["methods"].setdefault(name, {"calls": 0, "messages": 0, "bytes": 0})
            for d in (r, m, totals):
                d["calls"] += calls
                d["messages"] += msgs
                d["bytes"] += nbytes
    for d in [totals, *out.values(), *(m for r in out.values() for m in r["methods"].values())]:
        for k in ("calls", "messages", "bytes"):
            d[k] = round(d[k] / turns, 2 if k != "bytes" else 0)
    return {"total": totals, **out}

"""Faults during a serving mode: injected at their times, and what each cost (docs/faults.md).

:class:`Injector` runs on a thread beside the mode: at each fault's time it kills a daemon (SIGKILL), stops one
(SIGSTOP, then SIGCONT), or takes a link down (then up), on exactly the processes and interfaces this run
created. Each action is logged with its time on the shared monotonic clock, and with the run's ledger as its
daemons' ledger files hold it then (so each fault's lost blocks are known). Whatever is still undone when the
mode ends is undone then.

:func:`effects` turns the log, the driver's rows (finished and failed turns) and the scheduler's events into
each fault's effect: the turns retried (placed again after a node they ran on died), failed, and delayed (in
flight on its target while it lasted - a storage server serves every turn's reads - and finished without a
retry), the blocks lost from it until the next fault, and for a link how long
its traffic stalled. :func:`message` is the paragraph a user reads.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import threading
import time
from pathlib import Path

from daemons.ledger import Ledger
from emulator.kernel import set_link_state

from . import online
from .faultspec import Fault

STALL_HORIZON_S = 60.0  # real seconds after a link came up within which its traffic must have resumed


def ledger_now(ledger_dir: Path) -> Ledger:
    """The run's ledger as its daemons' ledger files hold it now (a dead daemon's included)."""
    return Ledger.total(Ledger.read_file(f) for f in sorted(ledger_dir.glob("*.bin")))


class Injector:
    """Injects one mode's faults. `procs`: daemon name ("storage st1", "node pe1") -> its process."""

    def __init__(self, plan, faults: list[Fault], procs: dict, ledger_dir: Path, time_scale: float):
        self.plan, self.faults, self.procs = plan, faults, procs
        self.ledger_dir, self.time_scale = ledger_dir, time_scale
        self.log: list[dict] = []   # {"fault", "action", "t_s" (real, from t0), "ledger", "error"?}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._undo: dict[int, tuple] = {}  # fault index -> what undoes it, while not undone
        self.t0 = 0.0

    def start(self, t0: float) -> None:
        self.t0 = t0
        if self.faults:
            self._thread = threading.Thread(target=self._run, name="faults", daemon=True)
            self._thread.start()

    def _daemon(self, target: str):
        return self.procs["storage " + target] if target.startswith("st") else self.procs["node " + target]

    def _link(self, target: str) -> tuple[str | None, str]:
        host, nic = target.rsplit("-", 1)
        lk = next(lk for lk in self.plan.net.links_of(host) if lk.nic == nic)
        return self.plan.net.host(host).netns, lk.host_intf

    def _note(self, i: int, action: str, error: str | None = None) -> None:
        entry = {"fault": i, "action": action, "t_s": round((time.monotonic() - self.t0) / self.time_scale, 4),
                 "ledger": ledger_now(self.ledger_dir).as_dict()}
        if error:
            entry["error"] = error
        self.log.append(entry)

    def _wall(self, real_s: float) -> float:
        return self.t0 + real_s * self.time_scale

    def _run(self) -> None:
        steps = sorted([(f.at, i, "inject") for i, f in enumerate(self.faults)] +
                       [(f.until, i, "undo") for i, f in enumerate(self.faults) if f.duration is not None])
        for at, i, what in steps:
            if self._stop.wait(max(0.0, self._wall(at) - time.monotonic())):
                return
            try:
                self._inject(i) if what == "inject" else self._undo_one(i)
            except Exception as exc:  # noqa: BLE001 - netlink, signals: noted, and the next fault still comes
                self._note(i, "failed to " + what, f"{type(exc).__name__}: {exc}")

    def _inject(self, i: int) -> None:
        f = self.faults[i]
        if f.kind == "link_down":
            netns, dev = self._link(f.target)
            set_link_state(netns, dev, False)
            self._undo[i] = ("link", netns, dev)
        else:
            proc = self._daemon(f.target)
            if proc.poll() is not None:
                self._note(i, "not injected", f"{f.target} had already exited")
                return
            os.killpg(proc.pid, signal.SIGKILL if f.kind == "kill" else signal.SIGSTOP)
            if f.kind == "stop":
                self._undo[i] = ("proc", proc)
        self._note(i, "injected")

    def _undo_one(self, i: int) -> None:
        what = self._undo.pop(i, None)
        if what is None:
            return
        if what[0] == "link":
            set_link_state(what[1], what[2], True)
        elif what[1].poll() is None:
            os.killpg(what[1].pid, signal.SIGCONT)
        self._note(i, "undone")

    def stop(self) -> None:
        """The mode is over: no further fault; undo what is still in force (before its daemons are stopped)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        for i in list(self._undo):
            try:
                self._undo_one(i)
            except Exception as exc:  # noqa: BLE001
                self._note(i, "failed to undo", f"{type(exc).__name__}: {exc}")


def read_failed(path: Path) -> list[dict]:
    return list(csv.DictReader(path.open())) if path.exists() else []


def _stall(links_csv: Path, link: str, down_s: float, up_s: float) -> dict | None:
    """How long a link's traffic stalled: from its fault to the first bytes it carried after it came up."""
    if not links_csv.exists():
        return None
    pts: dict[str, list[tuple[float, int]]] = {}
    with links_csv.open() as f:
        for r in csv.DictReader(f):
            if r["link"] == link and r["tclass"] == "link":
                pts.setdefault(r["direction"], []).append((float(r["t_s"]), int(r["bytes"])))
    resumed = []
    for series in pts.values():
        series.sort()
        before = max((b for t, b in series if t <= up_s), default=None)
        after = next((t for t, b in series if t > up_s and before is not None and b > before), None)
        if after is not None and after - up_s <= STALL_HORIZON_S:
            resumed.append(after)
    if not resumed:
        return {"resumed": False}
    first = min(resumed)
    return {"resumed": True, "stalled_s": round(first - down_s, 3), "after_up_s": round(first - up_s, 3)}


def effects(faults: list[Fault], log: list[dict], rows: list[dict], failed: list[dict], sched_events: list[dict],
            mode_dir: Path, end_ledger: Ledger) -> list[dict]:
    """Each fault of the mode with its effect (real seconds from the workload's start)."""
    out = []
    ttft_all = sorted(float(r["ttft_s"]) for r in rows)
    for i, f in enumerate(faults):
        mine = [e for e in log if e["fault"] == i]
        inj = next((e for e in mine if e["action"] == "injected"), None)
        entry = {"fault": f.label(), "kind": f.kind, "target": f.target, "at_s": f.at,
                 "for_s": f.duration, "injected": inj is not None,
                 "log": [{k: v for k, v in e.items() if k != "ledger"} for e in mine]}
        if inj is None:
            out.append(entry)
            continue
        t_in = inj["t_s"]
        undone = next((e for e in mine if e["action"] == "undone"), None)
        t_out = undone["t_s"] if undone else t_in
        later = [e for e in log if e["t_s"] > t_in and e["action"] == "injected"]
        until = min([e["t_s"] for e in later], default=float("inf"))  # its blocks: until the next fault's
        lost_from = Ledger.from_dict(inj["ledger"]).blocks_lost
        lost_to = Ledger.from_dict(later[0]["ledger"]).blocks_lost if later else end_ledger.blocks_lost
        retried = [e for e in sched_events if e["event"] == "turn_retried" and t_in <= e["t_s"] < until]
        failed_here = [r for r in failed if t_in <= float(r["failed_s"]) < until]
        node = f.target.split("-")[0]  # a node, or a node's link; a storage server serves every turn's reads

        def touches(r: dict) -> bool:
            return node.startswith("st") or r["pe"].split("/")[0] == node or r["de"].split("/")[0] == node

        delayed = [r for r in rows if float(r["submit_s"]) <= t_out and float(r["done_s"]) >= t_in
                   and not int(r.get("retries") or 0) and touches(r)]
        ttft = sorted(float(r["ttft_s"]) for r in delayed)
        entry.update({
            "injected_s": t_in, "undone_s": undone["t_s"] if undone else None,
            "requests": {"retried": len(retried), "failed": len(failed_here), "delayed": len(delayed),
                         "abandoned": sum(int(r.get("abandoned") or 0) for r in failed_here)},
            "ttft_s": {"delayed_p50": online.percentile(ttft, 50), "all_p50": online.percentile(ttft_all, 50)},
            "blocks_lost": lost_to - lost_from,
            "nodes_dead": sorted({e["node"] for e in sched_events if e["event"] == "node_dead"
                                  and t_in <= e["t_s"] < until}),
        })
        if f.kind == "link_down" and undone:
            entry["stall"] = _stall(mode_dir / "links.csv", f.target, t_in, t_out)
        out.append(entry)
    return out


def message(mode: str, effs: list[dict]) -> str:
    """One paragraph: each fault, its time, and the turns it affected."""
    parts = []
    for e in effs:
        if not e["injected"]:
            why = e["log"][-1].get("error", "the mode ended first") if e["log"] else "the mode ended first"
            parts.append(f"{e['fault']} was not injected ({why})")
            continue
        r = e["requests"]
        s = (f"{e['kind']} {e['target']} at {e['injected_s']:.1f} s: {r['retried']} turns retried, "
             f"{r['failed']} failed ({r['abandoned']} later turns of their agents not run), {r['delayed']} delayed, "
             f"{e['blocks_lost']} blocks lost")
        if e.get("nodes_dead"):
            s += f"; the scheduler took out {', '.join(e['nodes_dead'])}"
        if (st := e.get("stall")) and st.get("resumed"):
            s += f"; its traffic stalled {st['stalled_s']:.1f} s ({st['after_up_s']:.1f} s after it came up)"
        parts.append(s)
    return f"In mode {mode}: " + "; ".join(parts) + "." if parts else ""


def mode_effects(mode: str, mode_faults: list[Fault], log: list[dict], rows: list[dict], mode_dir: Path, t0: float,
                 time_scale: float, ledger: Ledger) -> dict:
    """A mode's ``faults`` summary: each fault's effect and the paragraph; writes ``faults.json`` (the injector's
    log and the scheduler's events, real seconds from the workload's start)."""
    path = mode_dir / "scheduler-events.json"
    events = json.loads(path.read_text()) if path.exists() else []
    for e in events:  # the scheduler's clock is the machine's monotonic one
        e["t_s"] = round((e.pop("t_mono") - t0) / time_scale, 4)
    (mode_dir / "faults.json").write_text(json.dumps({"log": log, "scheduler": events}, indent=1))
    effs = effects(mode_faults, log, rows, read_failed(mode_dir / "failed.csv"), events, mode_dir, ledger)
    return {"effects": effs, "message": message(mode, effs)}

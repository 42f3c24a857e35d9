"""Sweeps: one scenario run at many points (a grid of values, or listed points) times several seeds.

Every point is a whole run (build, calibrate, serve, tear down) in its own
directory, named by the values it sets, under one sweep directory:

    results/<scenario>/<sweep id>/
        sweep.json                       what was swept, and per point: values, run dir, status, metrics
        agents=32,seed=0/summary.json    ...every file of an ordinary run
        agents=32,seed=1/...

``sweep.json`` is rewritten after every point, so an interrupted sweep keeps
the points it finished (and says which one was interrupted). ``aggregate``
folds the seeds of each point into mean, standard deviation, min and max of
every metric; the CLI's table and ``dpemu report`` read it.
"""

from __future__ import annotations

import json
from collections import defaultdict
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from . import online, runner
from .plan import make_plan
from .schema import RATE_KEY, SEED_KEY, Point, Search, probe


def metrics(summary: dict) -> dict[str, float]:
    """The figures of one run, flat: ``jct_s.<mode>``, ``speedup.<ratio>``, ``snic_util.<side>.<mode>``,
    ``cnic_util.<side>.<mode>``, ``ttft_s.<q>.<mode>``, ``tpot_s.<q>.<mode>``, ``cpu_util_max``; online runs add
    ``online.slo_ok.<mode>`` (1 or 0), ``online.<ttft_s|ttst_s|tpot_s|trajectory_jct_s>.mean.<mode>`` and
    ``online.ttft_s.last_third.<mode>`` (the mean TTFT of the steady state's last third of turns);
    ``snic_balance.<mode>``: over windows of ``serving.balance_window``, the busiest SNIC's reads over the
    mean SNIC's, each window weighted by its traffic (``modestats.snic_balance``);
    ``fabric.<kind>.<link type>.<mode>`` (kind: measured_wire, predicted_wire, with_loopback, saturated,
    peak_wire) and ``fabric.<de_dram|de_read_share|p_over_d|g|s>.<mode>``: the compute fabric beside
    section 3 (``scenarios.fabric``)."""
    out: dict[str, float] = {}
    for mode, m in summary.get("modes", {}).items():
        out[f"jct_s.{mode}"] = m["jct_s"]
        for util in ("snic_util", "cnic_util"):
            for side, v in m[util].items():
                if v is not None:
                    out[f"{util}.{side}.{mode}"] = v
        for lat in ("ttft_s", "tpot_s"):
            for q, v in m[lat].items():
                if v is not None:
                    out[f"{lat}.{q}.{mode}"] = v
        if m.get("snic_balance"):
            out[f"snic_balance.{mode}"] = m["snic_balance"]["max_over_mean"]
        fab = m.get("fabric")
        if fab:
            for kind in ("measured_wire", "predicted_wire", "with_loopback", "saturated", "peak_wire"):
                for lt, v in fab.get(kind, {}).items():
                    if v is not None:
                        out[f"fabric.{kind}.{lt}.{mode}"] = v
            for k in ("de_dram", "de_read_share"):
                if fab.get(k) is not None:
                    out[f"fabric.{k}.{mode}"] = fab[k]
            out[f"fabric.p_over_d.{mode}"] = fab["p"] / fab["d"]
            out[f"fabric.g.{mode}"], out[f"fabric.s.{mode}"] = fab["g"], fab["s"]
        on = m.get("online")
        if on:
            out[f"online.slo_ok.{mode}"] = 1.0 if on["slo_ok"] else 0.0
            for k in ("ttft_s", "ttst_s", "tpot_s", "trajectory_jct_s"):
                if on[k]["mean"] is not None:
                    out[f"online.{k}.mean.{mode}"] = on[k]["mean"]
            if on.get("ttft_s", {}).get("last_third_mean") is not None:
                out[f"online.ttft_s.last_third.{mode}"] = on["ttft_s"]["last_third_mean"]
    for ratio, v in summary.get("speedup", {}).items():
        if v is not None:
            out[f"speedup.{ratio}"] = v
    if summary.get("fidelity", {}).get("cpu_util_max") is not None:
        out["cpu_util_max"] = summary["fidelity"]["cpu_util_max"]
    return out


def slo_verdicts(metrics: dict[str, float]) -> dict[str, bool]:
    """mode -> whether that mode of an online run met the SLO (``online.slo_ok.<mode>`` of ``metrics``)."""
    return {k.removeprefix("online.slo_ok."): v == 1.0 for k, v in metrics.items() if k.startswith("online.slo_ok.")}


@dataclass(frozen=True)
class SweepOutcome:
    sweep_dir: Path
    index: dict


def _write(path: Path, index: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(index, indent=1) + "\n")
    tmp.replace(path)


def run_sweep(points: list[Point], out_root: Path, say: Callable[[str], None] = print,
              progress: Callable[[str, int, int], None] = lambda *_: None) -> SweepOutcome:
    """Run every point. Every plan is checked before the first is built; points whose networks are the same
    (``runner.same_network``: only serving settings or the seed differ) run one after the other on one
    build and one calibration, in the order of the first of them (seed-major within). Points of a capacity
    search (``Point.search``) each start one (``Searcher``), its probes added to the sweep as they run."""
    search = points[0].search
    plans = [make_plan(p.scenario) for p in points]
    for plan in plans:
        plan.check()
    name = points[0].scenario.name
    sweep_dir = out_root / name / (time.strftime("%Y%m%d-%H%M%S") + "-sweep")
    sweep_dir.mkdir(parents=True, exist_ok=False)
    index: dict[str, Any] = {"scenario": name, "paper": points[0].scenario.paper,
                             "varied": sorted({k for p in points for k in p.values if k != SEED_KEY}),
                             "points": [{"label": p.label, "values": p.values, "status": "pending"} for p in points]}
    if search is not None:
        index["search"] = {**search.model_dump(), "searches": []}
    _write(sweep_dir / "sweep.json", index)
    groups: list[list[int]] = []  # points on the same network run together, on one build
    for i, plan in enumerate(plans):
        group = next((g for g in groups if runner.same_network(plans[g[0]], plan)), None)
        if group is None:
            groups.append([i])
        else:
            group.append(i)
    started_runs = 0
    for group in groups:
        # the runs of this group, as they come: a point, or every probe of the search it starts
        running: list[tuple[Point, dict]] = []

        def items(group=group, running=running):
            for i in group:
                if search is None:
                    running.append((points[i], index["points"][i]))
                    yield make_plan(points[i].scenario), sweep_dir / points[i].label
                    continue
                s = Searcher(points[i], search, index["points"][i])
                index["search"]["searches"].append(s.record)
                while (nxt := s.next_probe()) is not None:
                    pt, entry = nxt
                    if entry not in index["points"]:
                        index["points"].append(entry)
                    running.append((pt, entry))
                    yield make_plan(pt.scenario), sweep_dir / pt.label

        def started(k: int, running=running) -> None:
            nonlocal started_runs
            pt, entry = running[k]
            started_runs += 1
            n = started_runs if search else f"{started_runs}/{len(points)}"
            say(f"[bold]point {n}: {pt.label}[/]")
            entry["status"] = "running"
            _write(sweep_dir / "sweep.json", index)

        def finished(k: int, outcome: runner.RunOutcome, running=running) -> None:
            s = outcome.summary
            pt, entry = running[k]
            entry.update(status="done", run_dir=pt.label, trustworthy=s["fidelity"]["ok"], metrics=metrics(s),
                         failed_turns=s.get("failed_turns", 0))
            _write(sweep_dir / "sweep.json", index)

        try:
            runner.run_group(items(), out_root, say=say, progress=progress, started=started, done=finished)
            _write(sweep_dir / "sweep.json", index)  # a search's record ends after its last run has finished
        except BaseException as exc:
            status = "interrupted" if isinstance(exc, (runner.Interrupted, KeyboardInterrupt)) else "failed"
            for _, e in running:
                if e["status"] == "running":
                    e.update(status=status, error=str(exc))
            _write(sweep_dir / "sweep.json", index)
            raise
    return SweepOutcome(sweep_dir, index)


class Searcher:
    """One capacity search: from a start point, the next rate to probe given every verdict so far (the
    SLO verdict of the point's mode(s), from the finished entries of sweep.json)."""

    def __init__(self, start: Point, cfg: Search, entry: dict):
        self.start, self.cfg = start, cfg
        self.entries: list[dict] = []
        self._first = entry
        self.record: dict[str, Any] = {"start": start.label, "probes": {}, "capacity": None, "bracketed": False,
                                       "stopped": None}

    def _verdicts(self) -> dict[float, bool]:
        out = {}
        for e in self.entries:
            oks = slo_verdicts(e.get("metrics", {}))
            if e.get("status") == "done" and e.get("trustworthy") and oks:
                out[e["values"][RATE_KEY]] = all(oks.values())
        return out

    def next_probe(self) -> tuple[Point, dict] | None:
        """(the next probe's point, its sweep.json entry), or None: the search is over (``record`` says how)."""
        if not self.entries:
            rate = self.start.values[RATE_KEY]
        else:
            last = self.entries[-1]
            if last.get("status") != "done":
                return self._stop(f"the run at {last['values'][RATE_KEY]:g}/s did not finish")
            if not last.get("trustworthy"):
                return self._stop(f"the run at {last['values'][RATE_KEY]:g}/s was not trustworthy")
            verdicts = self._verdicts()
            self.record["probes"] = {f"{r:g}": ok for r, ok in sorted(verdicts.items())}
            cap, miss = online.bracket(verdicts)
            self.record.update(capacity=cap, bracketed=miss is not None)
            if cap is None:
                rate = min(verdicts) / self.cfg.factor
            elif miss is None:
                rate = max(verdicts) * self.cfg.factor
            elif miss / cap <= self.cfg.resolution:
                return self._stop("resolved")
            else:
                rate = (cap * miss) ** 0.5
            if len(self.entries) >= self.cfg.probes:
                return self._stop("probes used up")
        pt = probe(self.start, rate, self.cfg.window)
        entry = self._first if not self.entries else {"label": pt.label, "values": pt.values, "status": "pending"}
        if pt.label != entry["label"] or any(e["label"] == pt.label for e in self.entries):
            return self._stop(f"rate {rate:g}/s rounds to a probe already made")
        self.entries.append(entry)
        return pt, entry

    def _stop(self, why: str) -> None:
        self.record["stopped"] = why
        return None


def aggregate(index: dict) -> list[dict]:
    """Points that differ only in seed, folded: [{values, seeds, untrusted, stats: {metric: {mean, sd, min,
    max, n}}}], in sweep order. Untrusted runs are counted, and kept out of the statistics."""
    groups: dict[str, dict] = {}
    for p in index["points"]:
        if p.get("status") != "done":
            continue
        values = {k: v for k, v in p["values"].items() if k != SEED_KEY}
        g = groups.setdefault(json.dumps(values, sort_keys=True), {"values": values, "seeds": [], "untrusted": [],
                                                                   "samples": {}})
        seed = p["values"].get(SEED_KEY)
        if not p.get("trustworthy", False):
            g["untrusted"].append(seed)
            continue
        g["seeds"].append(seed)
        for k, v in p["metrics"].items():
            g["samples"].setdefault(k, []).append(v)
    out = []
    for g in groups.values():
        stats = {k: {"mean": statistics.fmean(v), "sd": statistics.stdev(v) if len(v) > 1 else 0.0,
                     "min": min(v), "max": max(v), "n": len(v)} for k, v in g.pop("samples").items()}
        out.append({**g, "stats": stats})
    return out


def verdicts_of(points: list[dict]) -> dict[str, dict[int, dict[float, bool]]]:
    """mode -> seed -> rate -> whether the SLO held, from the trustworthy finished points of a sweep."""
    passed: dict[str, dict[int, dict[float, bool]]] = defaultdict(lambda: defaultdict(dict))
    for p in points:
        if p.get("status") != "done" or not p.get("trustworthy"):
            continue
        rate, seed = p["values"].get(RATE_KEY), p["values"].get(SEED_KEY)
        for mode, ok in slo_verdicts(p["metrics"]).items():
            passed[mode][seed][rate] = ok
    return passed


def capacities(points: list[dict], verdicts: dict | None = None) -> dict[str, dict[int, tuple[float | None, bool]]]:
    """mode -> seed -> (capacity in agents/s, bracketed: a higher swept rate missed the SLO), from the
    trustworthy finished points of an arrival-rate sweep (``online.capacity``; ``verdicts``: their
    ``verdicts_of``, when already at hand)."""
    return {mode: {seed: online.capacity(r) for seed, r in by_seed.items()}
            for mode, by_seed in (verdicts if verdicts is not None else verdicts_of(points)).items()}


def ratio_bounds(verdicts: dict[str, dict[int, dict[float, bool]]], seed: int
                 ) -> tuple[float, float] | None:
    """The range the DualPath / Basic capacity ratio of one seed lies in, given each search's bracket
    (``online.bracket`` of ``verdicts_of``): (DualPath's met / Basic's missed, DualPath's missed / Basic's met);
    None unless both are bracketed."""
    ends = [online.bracket(verdicts.get(mode, {}).get(seed, {})) for mode in ("dualpath", "basic")]
    if any(met is None or miss is None for met, miss in ends):
        return None
    (d_met, d_miss), (b_met, b_miss) = ends
    return d_met / b_miss, d_miss / b_met

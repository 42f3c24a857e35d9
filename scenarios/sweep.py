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
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from . import runner
from .plan import make_plan
from .schema import Point

SEED_KEY = "serving.workload.seed"


def metrics(summary: dict) -> dict[str, float]:
    """The figures of one run, flat: ``jct_s.<mode>``, ``speedup.<ratio>``, ``snic_util.<side>.<mode>``,
    ``cnic_util.<side>.<mode>``, ``ttft_s.<q>.<mode>``, ``tpot_s.<q>.<mode>``, ``cpu_util_max``; online runs add
    ``online.slo_ok.<mode>`` (1 or 0) and ``online.<ttft_s|ttst_s|tpot_s|trajectory_jct_s>.mean.<mode>``;
    ``snic_balance.<mode>``: the mean over 1 s windows of the busiest SNIC's reads over the mean SNIC's."""
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
        on = m.get("online")
        if on:
            out[f"online.slo_ok.{mode}"] = 1.0 if on["slo_ok"] else 0.0
            for k in ("ttft_s", "ttst_s", "tpot_s", "trajectory_jct_s"):
                if on[k]["mean"] is not None:
                    out[f"online.{k}.mean.{mode}"] = on[k]["mean"]
    for ratio, v in summary.get("speedup", {}).items():
        if v is not None:
            out[f"speedup.{ratio}"] = v
    if summary.get("fidelity", {}).get("cpu_util_max") is not None:
        out["cpu_util_max"] = summary["fidelity"]["cpu_util_max"]
    return out


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
    """Run every point in order. Every plan is checked before the first is built; consecutive points whose
    networks are the same (``runner.same_network``: only serving settings or the seed differ) share one
    build and one calibration."""
    plans = [make_plan(p.scenario) for p in points]
    for plan in plans:
        plan.check()
    name = points[0].scenario.name
    sweep_dir = out_root / name / (time.strftime("%Y%m%d-%H%M%S") + "-sweep")
    sweep_dir.mkdir(parents=True, exist_ok=False)
    index: dict[str, Any] = {"scenario": name, "paper": points[0].scenario.paper,
                             "varied": sorted({k for p in points for k in p.values if k != SEED_KEY}),
                             "points": [{"label": p.label, "values": p.values, "status": "pending"} for p in points]}
    _write(sweep_dir / "sweep.json", index)
    groups: list[list[int]] = []
    for i, plan in enumerate(plans):
        if groups and runner.same_network(plans[groups[-1][0]], plan):
            groups[-1].append(i)
        else:
            groups.append([i])
    for group in groups:
        entries = [index["points"][i] for i in group]

        def started(k: int) -> None:
            i = group[k]
            say(f"[bold]point {i + 1}/{len(points)}: {points[i].label}[/]")
            entries[k]["status"] = "running"
            _write(sweep_dir / "sweep.json", index)

        def finished(k: int, outcome: runner.RunOutcome) -> None:
            s = outcome.summary
            entries[k].update(status="done", run_dir=points[group[k]].label, trustworthy=s["fidelity"]["ok"],
                              metrics=metrics(s))
            _write(sweep_dir / "sweep.json", index)

        try:
            runner.run_group([(plans[i], sweep_dir / points[i].label) for i in group], out_root, say=say,
                             progress=progress, started=started, done=finished)
        except BaseException as exc:
            status = "interrupted" if isinstance(exc, (runner.Interrupted, KeyboardInterrupt)) else "failed"
            for e in entries:
                if e["status"] == "running":
                    e.update(status=status, error=str(exc))
            _write(sweep_dir / "sweep.json", index)
            raise
    return SweepOutcome(sweep_dir, index)


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

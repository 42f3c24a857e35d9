"""The run directory: provenance first, then results; reports read only this.

``results/<scenario>/<run-id>/`` holds (columns documented in docs/results.md):
- ``scenario.yaml``  the resolved scenario (every default filled in)
- ``plan.txt``       the plan `dpemu plan` prints: nodes, links, tc ops, processes
- ``provenance.json`` versions, kernel, git revision, command line
- ``calibration.csv`` one row per measured (link, direction)
- ``summary.json``   scale, invariants, per-class calibration, timings, fidelity
"""

from __future__ import annotations

import csv
import json
import platform as pyplatform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import yaml

from daemons.ledger import Ledger
from emulator import fidelity
from emulator.calibrate import Calibration
from topologies.cluster import real_link_rates

from . import linkstats, serverstats
from .plan import Plan, plan_text

CAL_COLUMNS = ["link", "link_class", "direction", "interface", "netns", "configured_bps", "expected_bps",
               "achieved_bps", "error", "iperf3_goodput_bps", "payload_bps", "window_goodput_bps", "goodput_error",
               "cpu_util_max", "stage"]


def make_run_dir(root: Path, scenario: str, run_id: str) -> Path:
    d = root / scenario / run_id
    d.mkdir(parents=True, exist_ok=False)
    return d


def _git_rev() -> str | None:
    try:
        res = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return res.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def write_provenance(run_dir: Path, plan: Plan) -> None:
    (run_dir / "scenario.yaml").write_text(yaml.safe_dump(plan.scenario.resolved(), sort_keys=False))
    (run_dir / "plan.txt").write_text(plan_text(plan))
    try:
        from mininet.net import VERSION as mn_version
    except ImportError:
        mn_version = None
    prov = {"argv": sys.argv, "python": sys.version.split()[0], "kernel": pyplatform.release(),
            "git_rev": _git_rev(), "mininet": mn_version,
            "packages": {p: _version(p) for p in ("dpemu", "pyroute2", "iperf3", "grpcio", "pydantic", "PyYAML")}}
    (run_dir / "provenance.json").write_text(json.dumps(prov, indent=2) + "\n")


def class_table(plan: Plan, calib: Calibration) -> list[dict]:
    """Per link class and direction: configured, achieved (worst and mean), goodput."""
    rows = []
    for cls in dict.fromkeys(lk.link_class for lk in plan.net.links):
        for direction in ("up", "down"):
            ms = [m for m in calib.measurements
                  if m.target.link.link_class == cls and m.target.direction == direction]
            if not ms:
                continue
            ok = [m for m in ms if m.achieved_bps is not None]
            worst = max(ok, key=lambda m: abs(m.error)) if ok else None
            rows.append({
                "link_class": cls, "direction": direction, "links": len(ms),
                "configured_bps": ms[0].configured_bps,
                "expected_bps": min(m.expected_bps for m in ms),
                "real_bps": real_link_rates(plan.scenario.cluster_spec()).get(cls) or
                plan.scenario.scale_spec().real_rate(ms[0].configured_bps),
                "achieved_bps": sum(m.achieved_bps for m in ok) / len(ok) if ok else None,
                "worst_error": worst.error if worst else None,
                "worst_link": worst.target.label if worst else None,
                "iperf3_goodput_bps": sum(m.goodput_bps for m in ms) / len(ms),
                "within_tolerance": bool(ok) and all(abs(m.error) <= fidelity.RATE_TOLERANCE for m in ok),
            })
    return rows


def achieved_invariants(rows: list[dict], plan: Plan) -> dict[str, float | None]:
    mean = {}
    for r in rows:  # a class its peers could not fill says nothing about its rate
        ok = r["expected_bps"] == r["configured_bps"]
        mean.setdefault(r["link_class"], []).append(r["achieved_bps"] if ok else None)
    rate = {k: sum(v) / len(v) for k, v in mean.items() if None not in v}
    c = plan.scenario.cluster
    out: dict[str, float | None] = {"snic_per_node_to_cnic_per_node": None, "snic_to_cnic_per_gpu": None,
                                    "p_to_d": c.prefill_nodes / c.decode_nodes, "storage_to_snic_total": None}
    if "snic" in rate and "cnic" in rate:
        out["snic_to_cnic_per_gpu"] = rate["snic"] / rate["cnic"]
        out["snic_per_node_to_cnic_per_node"] = rate["snic"] / (rate["cnic"] * c.gpus_per_node)
    if "snic" in rate and "stnic" in rate:
        out["storage_to_snic_total"] = (rate["stnic"] * c.storage.servers) / (
            rate["snic"] * (c.prefill_nodes + c.decode_nodes))
    return out


def _serving_summary(serving: dict) -> dict:
    modes = serving["modes"]
    total = Ledger.total(Ledger.from_dict(m["ledger"]) for m in [*modes.values(),
                                                                *serving.get("extra_runs", {}).values()])
    ledger = {**total.as_dict(), "unchecked": total.unchecked}

    def ratio(a: str, b: str) -> float | None:
        if a in modes and b in modes and modes[b]["jct_s"]:
            return round(modes[a]["jct_s"] / modes[b]["jct_s"], 4)
        return None

    every_run = [*modes.values(), *serving.get("extra_runs", {}).values()]
    out = {"modes": modes, "speedup": {"dualpath_vs_basic": ratio("basic", "dualpath"),
                                       "oracle_vs_dualpath": ratio("dualpath", "oracle")}, "ledger": ledger,
           "failed_turns": sum(m.get("failed", {}).get("turns", 0) for m in every_run)}
    if "aborted" in serving:  # a mode that did not finish: the ones before it are all here
        out["aborted"] = serving["aborted"]
    if "isolation" in serving:  # the flipped-isolation DualPath run and the comparison (docs/traffic-classes.md)
        out["extra_runs"] = serving["extra_runs"]
        out["isolation"] = serving["isolation"]
    return out


def write_summary(run_dir: Path, plan: Plan, calib: Calibration, build_s: float, teardown_s: float | None,
                      serving: dict | None = None, shared_by: int | None = 1) -> dict:
    """summary.json of a run. `teardown_s` is None until the emulation is gone (a run of a group is summarized
    as it ends, and again with the teardown time); `shared_by` runs used the same build and calibration
    (None while a group of runs is still going)."""
    net = plan.net
    recal: Calibration | None = (serving or {}).get("recalibration")
    stages = [("build", calib)] + ([("reshaped", recal)] if recal else [])
    with open(run_dir / "calibration.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CAL_COLUMNS)
        w.writeheader()
        for stage, cal in stages:
            for m in cal.measurements:
                key = m.target.key(net)
                w.writerow({"link": f"{m.target.link.host}-{m.target.link.nic}",
                            "link_class": m.target.link.link_class, "direction": m.target.direction,
                            "interface": key.dev, "netns": key.netns or "", "configured_bps": round(m.configured_bps),
                            "expected_bps": round(m.expected_bps), "achieved_bps": _round(m.achieved_bps),
                            "error": _round(m.error, 5), "iperf3_goodput_bps": _round(m.goodput_bps),
                            "payload_bps": _round(m.payload_bps), "window_goodput_bps": _round(m.window_goodput_bps),
                            "goodput_error": _round(m.goodput_error, 5), "cpu_util_max": _round(m.cpu_util_max, 3),
                            "stage": stage})
    linkstats.write_dequeue(run_dir / "dequeue.csv", _merged(c.dequeue for _, c in stages))
    rows = class_table(plan, calib)
    cpu_max, cpu_mean = calib.cpu_util_max, calib.cpu_util_mean
    if recal and recal.cpu_util_max is not None:
        cpu_max = max(cpu_max or 0.0, recal.cpu_util_max)
    if serving and serving["cpu"]["cpu_util_max"] is not None:
        cpu_max = max(cpu_max or 0.0, serving["cpu"]["cpu_util_max"])
        cpu_mean = serving["cpu"]["cpu_util_mean"]
    measurements = [m for _, c in stages for m in c.measurements]
    verdict = fidelity.judge(cpu_max, cpu_mean, {f"{st} {m.target.label}": m.error for st, c in stages
                                                 for m in c.measurements})
    serving_part = _serving_summary(serving) if serving else {}
    mode_dirs = [run_dir / m for m in [*serving_part.get("modes", {}), *serving_part.get("extra_runs", {})]]
    dequeue_figs = linkstats.dequeue_figures([run_dir / "dequeue.csv"] + [d / "dequeue.csv" for d in mode_dirs])
    classes = list(dict.fromkeys(lk.link_class for lk in net.links))
    measured: dict[str, list[str]] = {}
    for m in measurements:
        if m.achieved_bps is not None:
            measured.setdefault(m.target.link.link_class, []).append(m.target.label)
    fidelity.judge_links(verdict, classes, measured, {m.target.label: m.goodput_error for m in measurements},
                         dequeue_figs, next((c.dequeue_problem for _, c in stages if c.dequeue_problem), None),
                         linkstats.lossless_drops({**serving_part.get("modes", {}),
                                                   **serving_part.get("extra_runs", {})}))
    if serving and serving.get("reshaped") and recal is None:
        verdict.fail(f"the compute fabric was re-shaped ({serving['reshaped']}) without being measured again")
    if serving_part:
        for problem in ledger_problems(plan, {**serving_part["modes"], **serving_part.get("extra_runs", {})}):
            verdict.fail(problem)
        if "aborted" in serving_part:
            verdict.fail(f"mode {serving_part['aborted']['mode']} did not finish: its figures are missing")
    sc = plan.scenario
    summary = {
        "scenario": sc.name,
        "run_id": run_dir.name,
        "seed": sc.serving.workload.seed if sc.serving else None,  # the workload's; calibration has none
        "scale": {"bytes": sc.scale.bytes, "time": sc.scale.time, "rate_factor": sc.scale_spec().rate_factor},
        "cluster": {"hosts": len(net.hosts), "bridges": len(net.switches), "links": len(net.links),
                    "control_links": len(net.control), "tc_ops": len(plan.tc_ops)},
        "invariants": {"configured": plan.invariants, "achieved": achieved_invariants(rows, plan)},
        "build_s": round(build_s, 3), "teardown_s": None if teardown_s is None else round(teardown_s, 3),
        "build_shared_by": shared_by,
        "calibration": {"mode": sc.calibration.mode, "rounds": calib.rounds,
                        "duration_s": round(calib.duration_s, 2), "classes": rows,
                        **({"reshaped": class_table(plan, recal)} if recal else {})},
        "dequeue": dequeue_figs,
        **({"servers": servers} if (servers := serverstats.figures(run_dir, net)) else {}),
        **serving_part,
        "fidelity": verdict.as_dict(),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def ledger_problems(plan: Plan, modes: dict) -> list[str]:
    """What the modes' ledgers say against trusting the run: a corrupt block ever; a lost block, unless an
    injected fault lost it with a single copy of each block (with replicas a fault must lose nothing); a ledger
    that does not add up where no fault cut a transfer short; a fault that was never injected."""
    out = []
    replicas = plan.scenario.cluster.storage.replicas
    for name, m in modes.items():
        lg, effs = m["ledger"], m.get("faults", {}).get("effects", [])
        if lg.get("blocks_corrupt"):
            out.append(f"{name}: {lg['blocks_corrupt']} corrupt KV blocks")
        if lg.get("blocks_lost") and (not effs or replicas > 1):
            out.append(f"{name}: {lg['blocks_lost']} KV blocks lost" +
                       (f" with {replicas} replicas of each" if effs else ""))
        if lg.get("unchecked") and not effs:
            out.append(f"{name}: the KV ledger does not add up: {lg['unchecked']} blocks moved that no receiver "
                       "checked (verified + corrupt != read + forwarded + written)")
        out += [f"{name}: {e['fault']} was not injected" for e in effs if not e["injected"]]
    return out


def _merged(parts) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for part in parts:
        for cls, errs in part.items():
            out.setdefault(cls, []).extend(errs)
    return out


def _round(x: float | None, nd: int = 0):
    if x is None:
        return ""
    return round(x, nd) if nd else round(x)


def isolation_comparison(configured_on: bool, modes: dict, flipped: dict) -> dict:
    """The isolation experiment: collectives with no KV (oracle, the reference), next to DualPath's KV with
    isolation on and with it off. Slowdowns are p99 completion over the reference's p99."""
    on, off = (modes["dualpath"], flipped) if configured_on else (flipped, modes["dualpath"])
    ref = modes["oracle"]

    def side(m: dict) -> dict:
        c = m["collectives"]
        out = {"collective_s": {ph: {"p50": c[ph]["p50_s"], "p99": c[ph]["p99_s"]} for ph in ("prefill", "decode")},
               "tpot_s": m["tpot_s"], "ttft_s": {"p50": m["ttft_s"]["p50"]}, "cnic_util": m["cnic_util"],
               "cnic_kv_gbps": m.get("cnic_kv_gbps"), "jct_s": m["jct_s"]}
        if m is not ref:
            out["slowdown_p99"] = {ph: (round(c[ph]["p99_s"] / ref["collectives"][ph]["p99_s"], 3)
                                        if c[ph]["p99_s"] and ref["collectives"][ph]["p99_s"] else None)
                                   for ph in ("prefill", "decode")}
            if "basic" in modes and m["tpot_s"]["p99"] and modes["basic"]["tpot_s"]["p99"]:
                out["tpot_p99_vs_basic"] = round(m["tpot_s"]["p99"] / modes["basic"]["tpot_s"]["p99"], 3)
        return out

    return {"reference": side(ref), "on": side(on), "off": side(off)}

"""Lab 4, write the scheduler (``labs/4-write-the-scheduler``): the student's policy class run against round
robin and the paper's scheduler, graded on SNIC balance and JCT, and its picture.

The lab's answer is a policy file (``dpemu lab check 4 --policy FILE``, default the lab's starter
``policy.py``), not predictions: ``policy_file`` loads and checks it (``daemons.policyapi.resolve``) before
anything runs, and ``sets`` makes the lab's sweep run ``serving.policy`` = that file's class, ``round_robin``
and ``paper``, one run each on one build and calibration (``runner.run_group`` via the sweep). The grade
reads each run's DualPath figures from its ``summary.json`` (``snic_balance.max_over_mean``, ``jct_s``,
``paths``) and the student's fallbacks from its ``dualpath/scheduler-events.json`` (``policy_fallbacks``).
No expected value is typed here: the bar is what round robin and the paper's policy measured in the same
sweep, on the same build; the tolerances are below, TEACHER.md says how they were measured. With several
seeds, each policy's figures are the mean over its seeds. Called by ``scenarios.labs``.
"""

from __future__ import annotations

import csv
import json
import os
import statistics
from collections import defaultdict
from pathlib import Path

import yaml

from daemons import policyapi
from emulator.errors import ConfigError

from . import report
from .labs import Lab, LabDir, Row, load_json, sweep_trust

CLASS = "StudentPolicy"  # the class a policy file defines, unless --policy FILE.py:Class names another
BASELINES = ("round_robin", "paper")
POLICY_KEY, MODE = "serving.policy", "dualpath"
#: SNIC max/mean may exceed round robin's by this much. Measured on this scenario (TEACHER.md: 10 runs, 2
#: seeds, 3 clocks and loads): round robin 1.16-1.24, the paper's policy and the reference solution 1.28-1.32,
#: i.e. 0.05-0.16 above round robin (round robin's fixed DE cycle spreads the decode-side reads evenly; the
#: paper's DE choice follows decode tokens); a policy reading on one side only: 3.0 by construction (2 of 6
#: SNICs read). 0.25 passes the paper's own rule with margin and fails any policy that leaves a side idle.
TOL_BALANCE_RR = 0.25
#: ... and the paper's by this much: "close to the paper's" (a better balance always passes). The reference
#: solution, the paper's rule written out, measured 0.01-0.03 above the paper's in the same sweep: 0.10 is
#: three times that.
TOL_BALANCE_PAPER = 0.10
#: JCT may exceed round robin's by this fraction: on one seed the three policies that read on the shorter
#: queue finish within ~3% of each other run to run (up to 4% apart across configurations); reading on the
#: prefill side only makes the two prefill SNICs the bottleneck.
TOL_JCT = 0.10


# -- the answer: a policy file --------------------------------------------------------------------------------
def policy_file(lab_dir: LabDir, given: Path | None) -> tuple[dict, Path]:
    """The student's policy (``--policy FILE`` or ``FILE.py:Class``; default the lab's starter), loaded and
    checked: ({"policy": the absolute spec}, the file). Raises ConfigError naming the problem."""
    text = str(given) if given is not None else str(lab_dir.path / "policy.py")
    file, cls = text, CLASS
    head, sep, tail = text.rpartition(":")
    if sep and head.endswith(".py") and tail.isidentifier():
        file, cls = head, tail
    path = Path(os.path.normpath(Path.cwd() / Path(file).expanduser()))
    if not path.is_file():
        raise ConfigError(str(path), "no such policy file")
    try:
        spec = policyapi.resolve(f"{path}:{cls}")
    except ValueError as exc:
        raise ConfigError(str(path), str(exc)) from None
    return {"policy": spec}, path


def sets(pred: dict) -> list[str]:
    """The lab's sweep: the student's policy, then round robin and the paper's, on one build."""
    return ["sweep.grid=" + json.dumps({POLICY_KEY: [pred["policy"], *BASELINES]})]


# -- what the sweep measured ----------------------------------------------------------------------------------
def fallbacks(mode_dir: Path) -> dict:
    """The policy's calls and fallbacks in one mode, from the scheduler's events: {total, calls, first: [...]}
    (total None when the scheduler did not stop cleanly and only the first fallbacks are known)."""
    path = mode_dir / "scheduler-events.json"
    events = json.loads(path.read_text()) if path.is_file() else []
    first = [f"{e['method']} {e['kind']}: {e['detail']}" for e in events if e.get("event") == "policy_fallback"]
    final = [e for e in events if e.get("event") == "policy_fallbacks"]
    if final:
        return {"total": final[-1]["fallbacks_total"], "calls": final[-1]["calls"], "first": first}
    return {"total": len(first) if first else (0 if path.is_file() else None), "calls": {}, "first": first}


def runs(sweep_dir: Path) -> dict[str, list[dict]]:
    """policy -> its finished runs' DualPath figures: label, run, balance (SNIC max/mean), window_s (of the
    balance, real s), jct (real s), paths, snic_util, fallbacks (the student's policy only)."""
    out: dict[str, list[dict]] = defaultdict(list)
    for p in load_json(sweep_dir / "sweep.json")["points"]:
        if p.get("status") != "done":
            continue
        run = sweep_dir / p["run_dir"]
        m = load_json(run / "summary.json").get("modes", {}).get(MODE)
        if m:
            bal = m.get("snic_balance") or {}
            scale = yaml.safe_load((run / "scenario.yaml").read_text())["scale"]["time"]
            out[p["values"].get(POLICY_KEY, "paper")].append({
                "label": p["label"], "run": run, "balance": bal.get("max_over_mean"),
                "window_s": bal["window_s"] / scale if bal else None,  # real seconds (the summary's are wall)
                "time_scale": scale,
                "jct": m["jct_s"], "paths": m["paths"],
                "snic_util": m["snic_util"], "fallbacks": fallbacks(run / MODE) if p["values"].get(POLICY_KEY)
                not in BASELINES else None})
    return dict(out)


def _mean(rs: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rs if r[key] is not None]
    return statistics.fmean(vals) if vals else None


def student_policy(by_policy: dict[str, list[dict]], pred: dict) -> str | None:
    """The student's policy in the sweep: the one graded (``pred``), else the one that is no baseline."""
    if pred.get("policy") in by_policy:
        return pred["policy"]
    return next((p for p in by_policy if p not in BASELINES), None)


def name(policy: str) -> str:
    return policy.rsplit("/", 1)[-1] if policyapi.is_plugin(policy) else policy


def _de_share(rs: list[dict]) -> float | None:
    pe, de = sum(r["paths"]["pe"] for r in rs), sum(r["paths"]["de"] for r in rs)
    return de / (pe + de) if pe + de else None


# -- the grade ------------------------------------------------------------------------------------------------
def grade(sweep_dir: Path, pred: dict) -> list[Row]:
    by = runs(sweep_dir)
    mine = student_policy(by, pred)
    keys = ("policy_fallbacks", "snic_balance_vs_round_robin", "snic_balance_vs_paper", "jct_vs_round_robin")
    missing = [what for what, p in (("your policy", mine), *((b, b) for b in BASELINES)) if p not in by]
    if missing:
        return [Row(k, None, None, "measured", "-", False, f"the sweep has no finished run of {', '.join(missing)}")
                for k in keys]
    me, rr, pp = by[mine], by["round_robin"], by["paper"]
    cl = yaml.safe_load((me[0]["run"] / "scenario.yaml").read_text())["cluster"]
    p, d = cl["prefill_nodes"], cl["decode_nodes"]
    share = _de_share(me)
    fb = [r["fallbacks"] for r in me]
    total = None if any(f["total"] is None for f in fb) else sum(f["total"] for f in fb)
    calls = sum(sum(f["calls"].values()) for f in fb)
    if total == 0:
        why = f"every one of its {calls} calls returned a valid choice" if calls else "no call fell back"
    elif total is None:
        why = "the scheduler did not stop cleanly: its count of fallbacks is lost"
    else:
        why = (f"{total} of {calls} calls raised or returned no valid choice, and the scheduler used the paper's "
               f"choice instead (the balance and JCT below are partly the paper's); first: "
               + "; ".join(f for r in fb for f in r["first"][:2]))
    rows = [Row("policy_fallbacks", total, 0, "measured", "0", total == 0, why)]
    bal, jct = _mean(me, "balance"), _mean(me, "jct")
    rr_bal, pp_bal, rr_jct = _mean(rr, "balance"), _mean(pp, "balance"), _mean(rr, "jct")
    window = me[0]["window_s"]
    reads = (f"your turns read {share:.0%} on the decode side (all {p + d} SNICs equally busy: D / (P + D) = "
             f"{d / (p + d):.0%})" if share is not None else "your run read nothing")
    if share is not None and share < 0.05:
        reads += f"; only the {p} prefill SNICs read, so the busiest reads ~(P + D) / P = {(p + d) / p:.1f}x the mean"
    elif share is not None and share > 0.95:
        reads += f"; only the {d} decode SNICs read: the busiest reads ~(P + D) / D = {(p + d) / d:.1f}x the mean"
    if bal is None or rr_bal is None or pp_bal is None:
        rows += [Row(k, bal, None, "measured", "-", False, "a run has no SNIC balance (too short, or no reads)")
                 for k in keys[1:3]]
    else:
        w = f"over {window:g} s windows" if window else ""
        rows.append(Row("snic_balance_vs_round_robin", round(bal, 3), round(rr_bal, 3), "measured",
                        f"<= +{TOL_BALANCE_RR:g}", bal <= rr_bal + TOL_BALANCE_RR,
                        f"busiest SNIC's read bytes / mean SNIC's {w} (1.0: all equally busy); round robin cycles "
                        f"the engines and reads on the shorter queue; {reads}"))
        rows.append(Row("snic_balance_vs_paper", round(bal, 3), round(pp_bal, 3), "measured",
                        f"<= +{TOL_BALANCE_PAPER:g}", bal <= pp_bal + TOL_BALANCE_PAPER,
                        "the paper's scheduler: shorter read queue, least-loaded engines (section 5)"))
    slower = jct / rr_jct - 1
    rows.append(Row("jct_vs_round_robin", round(jct, 2), round(rr_jct, 2), "measured", f"<= +{TOL_JCT:.0%}",
                    jct <= rr_jct * (1 + TOL_JCT),
                    f"real seconds until every turn finished: yours {abs(slower):.0%} "
                    f"{'longer' if slower > 0 else 'shorter'} than round robin's (the paper's: "
                    f"{_mean(pp, 'jct'):.1f} s); SNICs left idle make the others the bottleneck: JCT >= the bytes to "
                    f"read / the rate of the SNICs that read them"))
    return rows


# -- the picture ----------------------------------------------------------------------------------------------
def snic_series(links_csv: Path, window_s: float) -> dict[str, tuple[list[float], list[float]]]:
    """Per SNIC (link name): (window end in real s, read bytes per real s over the window) from links.csv's
    counters (its times are real seconds; its bytes are the wire's, whose configured rate is per wall second)."""
    pts: dict[str, list[tuple[float, int]]] = defaultdict(list)
    with links_csv.open() as f:
        for r in csv.DictReader(f):
            if (r["link_class"], r["direction"], r["tclass"]) == ("snic", "down", "link"):
                pts[r["link"]].append((float(r["t_s"]), int(r["bytes"])))
    out = {}
    for link, series in sorted(pts.items()):
        series.sort()
        ts, rates, (t0, b0) = [], [], series[0]
        for t, b in series[1:]:
            if t - t0 >= window_s:
                ts.append(t)
                rates.append((b - b0) / (t - t0))
                t0, b0 = t, b
        out[link] = (ts, rates)
    return out


def picture(sweep_dir: Path, pred: dict, out: Path) -> str | None:
    """scheduler.png: per policy, the SNIC balance, JCT and decode-side read share (bars, the pass lines
    dashed), and every SNIC's read utilization over time (its first seed's run)."""
    by = runs(sweep_dir)
    mine = student_policy(by, pred)
    order = [p for p in (mine, *BASELINES) if p in by]
    if not order:
        return None
    labels = [("yours: " + name(p)) if p == mine else p for p in order]
    plt = report._plt()
    fig = plt.figure(figsize=(12, 6.5))
    grid = fig.add_gridspec(2, max(3, len(order)))
    colors = ["tab:red" if p == mine else "tab:gray" for p in order]
    rr = by.get("round_robin")
    for i, (key, title) in enumerate((("balance", "SNIC max / mean (1.0 = even)"), ("jct", "JCT, real s"),
                                      ("share", "turns read on the decode side"))):
        ax = fig.add_subplot(grid[0, i])
        vals = [(_de_share(by[p]) if key == "share" else _mean(by[p], key)) or 0 for p in order]
        ax.bar(range(len(order)), vals, color=colors)
        ax.set_xticks(range(len(order)), labels, fontsize=7, rotation=10)
        ax.set_title(title, fontsize=9)
        if rr and key == "balance" and _mean(rr, "balance"):
            ax.axhline(_mean(rr, "balance") + TOL_BALANCE_RR, color="k", linestyle="--", linewidth=1,
                       label="pass: at most round robin's + tolerance")
            ax.legend(fontsize=7)
        if rr and key == "jct":
            ax.axhline(_mean(rr, "jct") * (1 + TOL_JCT), color="k", linestyle="--", linewidth=1,
                       label="pass: at most round robin's + tolerance")
            ax.legend(fontsize=7)
    s = load_json(by[order[0]][0]["run"] / "summary.json")
    rate = next(c["configured_bps"] for c in s["calibration"]["classes"] if c["link_class"] == "snic")
    for i, (p, label) in enumerate(zip(order, labels, strict=True)):
        ax = fig.add_subplot(grid[1, i])
        r = by[p][0]
        links = r["run"] / MODE / "links.csv"
        if links.is_file():
            for link, (ts, bps) in snic_series(links, r["window_s"] or 1.0).items():
                ax.plot(ts, [b * 8 / (rate * r["time_scale"]) for b in bps], linewidth=0.9,  # bytes per real s
                        label=link.removesuffix("-snic"),
                        linestyle="-" if link.startswith("pe") else ":")
        ax.set_ylim(0, 1.15)
        ax.set_title(f"{label}: each SNIC's reads", fontsize=9, loc="left")
        ax.set_xlabel("real s since the workload started", fontsize=8)
        ax.grid(alpha=0.3)
        if i == 0:
            ax.set_ylabel("read utilization")
        if i == 0 and links.is_file():
            ax.legend(fontsize=6, ncol=2, loc="lower left")
    fig.tight_layout()
    path = out / "scheduler.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


LAB = Lab(title="Lab 4: write the scheduler", keys=(), grades="sweep", grade=grade, picture=picture, trust=sweep_trust,
          policy=policy_file, sets=sets)

"""Lab 1, the storage bottleneck (``labs/1-storage-bottleneck``): its predictions, how each is graded against
one run of Basic and DualPath (Oracle too when it ran), and its picture.

Every expected value comes from the run directory: the cluster's P and D from its resolved ``scenario.yaml``
(the usable SNICs and ``report.storage_bound_speedup``), the rest measured (``summary.json``: per mode
``snic_util``, ``paths``, ``jct_s``; ``speedup``). The picture is the SNICs' read utilization over time from
each mode's ``links.csv`` (``report._side_rate_series``, the series ``dpemu report`` plots). TEACHER.md
explains every tolerance. Called by ``scenarios.labs``.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from . import report
from .labs import Key, Lab, Row, load_json, run_trust, within

#: Basic's PE SNICs: storage-bound, Basic reads at the full rate while turns queue, then the last agents' turns
#: drain with the SNICs partly idle; over the middle 80% of its JCT five runs measured 0.82-0.87 (0.92 with
#: 128 agents). +-0.2 takes "saturated" (1.0) and the drain-aware 0.8-0.9, and rejects reads spread over every
#: SNIC (0.33) or half-idle SNICs (0.5).
TOL_UTIL_PE = 0.2
#: Basic's DE SNICs read nothing (write-backs leave them upwards and are not reads): measured 0.0003-0.0004.
TOL_UTIL_DE = 0.05
#: DualPath's decode-side share of the reads: D / (P + D) = 0.67 if the shorter-read-queue choice balances
#: the six SNICs; runs measured 0.64-0.67. +-0.1 rejects "half and half" (0.5) and "all on DE" (1.0).
TOL_SHARE = 0.10
#: The measured DualPath / Basic speedup: 1.31-1.39 over four runs of the lab's 96 agents, whose own
#: Oracle / Basic ratios, the handout's estimate, were 1.31-1.39 too. +-0.25 takes any estimate made from the
#: compute bound, and rejects the storage-only bound (3), 2, and "no gain" (1).
TOL_SPEEDUP = 0.25

def _cluster(run: Path) -> dict:
    return yaml.safe_load((run / "scenario.yaml").read_text())["cluster"]


def grade(run: Path, pred: dict) -> list[Row]:
    s = load_json(run / "summary.json")
    cl = _cluster(run)
    p, d = cl["prefill_nodes"], cl["decode_nodes"]
    modes = s.get("modes", {})
    basic, dual = modes.get("basic"), modes.get("dualpath")
    rows = []
    bp = basic["paths"] if basic else None
    dp = dual["paths"] if dual else None
    reads = (lambda paths: f"the run read {paths['pe']} turns on the PE side, {paths['de']} on the DE side"
             if paths else "the run has no such mode")
    rows.append(within("basic_usable_snics", pred["basic_usable_snics"], p, "formula",
                       f"Basic reads only through the P = {p} prefill nodes' SNICs ({reads(bp)})", abs_tol=0))
    rows.append(within("dualpath_usable_snics", pred["dualpath_usable_snics"], p + d, "formula",
                       f"DualPath reads through every compute node's SNIC: P + D = {p} + {d} ({reads(dp)})",
                       abs_tol=0))
    bound = report.storage_bound_speedup(cl)
    rows.append(within("speedup_bound", pred["speedup_bound"], bound, "formula",
                       f"storage-bound, JCT = bytes to read / usable SNIC bandwidth, so the speedup is the ratio "
                       f"of usable SNICs: (P + D) / P = {p + d}/{p} = {bound:.2f}", rel_tol=0.01))
    if basic:
        u = basic["snic_util"]
        rows.append(within("basic_snic_util_pe", pred["basic_snic_util_pe"], u["pe"], "measured",
                           f"every Basic turn reads through the {p} PE SNICs: storage-bound, they read at their full "
                           f"rate while turns queue, falling off only as the last agents drain; {u['pe']:.2f} over "
                           f"the middle 80% of the run",
                           abs_tol=TOL_UTIL_PE))
        rows.append(within("basic_snic_util_de", pred["basic_snic_util_de"], u["de"], "measured",
                           f"Basic never reads on the decode side: its {d} DE SNICs carry only write-backs, which "
                           f"leave them (up) and are no reads; {u['de']:.2f} measured", abs_tol=TOL_UTIL_DE))
    else:
        rows += [_missing(k, pred, "basic") for k in ("basic_snic_util_pe", "basic_snic_util_de")]
    if dual and dp["pe"] + dp["de"]:
        share = dp["de"] / (dp["pe"] + dp["de"])
        rows.append(within("dualpath_de_read_share", pred["dualpath_de_read_share"], share, "measured",
                           f"each turn reads on the side whose read queue is shorter, so the reads spread over all "
                           f"{p + d} SNICs: D / (P + D) = {d / (p + d):.2f} of them on the DE side; "
                           f"{dp['de']} of {dp['pe'] + dp['de']} measured", abs_tol=TOL_SHARE))
    else:
        rows.append(_missing("dualpath_de_read_share", pred, "dualpath"))
    sp = s.get("speedup", {}).get("dualpath_vs_basic")
    if sp is not None:
        rows.append(within("speedup", pred["speedup"], sp, "measured", _speedup_why(s, sp, bound),
                           abs_tol=TOL_SPEEDUP))
    else:
        rows.append(_missing("speedup", pred, "basic and dualpath"))
    return rows


def _speedup_why(s: dict, sp: float, bound: float) -> str:
    m = s["modes"]
    dual_u = m["dualpath"]["snic_util"]
    why = f"measured {sp:.2f}x against the {bound:.2f}x SNIC bound"
    if sp >= 0.9 * bound:
        return why + f": DualPath stays storage-bound, its SNICs reading at {dual_u['pe']:.2f} / {dual_u['de']:.2f}"
    if "oracle" in m and m["oracle"]["jct_s"]:
        cap = m["basic"]["jct_s"] / m["oracle"]["jct_s"]
        why += (f": Oracle, which loads nothing, is only {cap:.2f}x faster than Basic, so once DualPath reads on "
                f"every SNIC the prefill GPUs and the agents' chains of turns are the limit, not storage")
    else:
        why += ": once DualPath reads on every SNIC the prefill GPUs and the agents' chains of turns are the limit"
    return why + f" (its SNICs read at {dual_u['pe']:.2f} PE / {dual_u['de']:.2f} DE)"


def _missing(key: str, pred: dict, modes: str) -> Row:
    return Row(key, pred[key], None, "measured", "-", False, f"the run has no {modes} mode to measure it in")


def _smooth(ts: list[float], ys: list[float], window_s: float) -> tuple[list[float], list[float]]:
    """A trailing mean over `window_s`: HTB's byte counters move in steps, so 100 ms samples jump 0 <-> 1.2."""
    out, lo, acc = [], 0, 0.0
    for i, y in enumerate(ys):
        acc += y
        while ts[i] - ts[lo] >= window_s:
            acc -= ys[lo]
            lo += 1
        out.append(acc / (i - lo + 1))
    return ts, out


def picture(run: Path, pred: dict, out: Path) -> str | None:
    """snic_over_time.png: Basic and DualPath, the mean read utilization of the PE side's and the DE side's
    SNICs over time (1 s means of the 100 ms samples), the student's predictions for Basic dashed."""
    s = load_json(run / "summary.json")
    modes = [m for m in ("basic", "dualpath") if (run / m / "links.csv").is_file()]
    if not modes:
        return None
    rate = next(c["configured_bps"] for c in s["calibration"]["classes"] if c["link_class"] == "snic")
    plt = report._plt()
    fig, axes = plt.subplots(len(modes), 1, figsize=(8, 2.6 * len(modes)), sharex=True, squeeze=False)
    colors = {"pe": "tab:orange", "de": "tab:green"}
    for ax, mode in zip(axes[:, 0], modes, strict=True):
        for side, (ts, bps) in report._side_rate_series(run / mode / "links.csv", "snic", "down",
                                                            s["scale"]["time"]).items():
            ts, util = _smooth(ts, [b / rate for b in bps], 1.0)
            ax.plot(ts, util, color=colors[side], linewidth=1.2,
                    label=f"{side.upper()} SNICs (middle-80% mean {s['modes'][mode]['snic_util'][side]:.2f})")
        if mode == "basic":
            for side in ("pe", "de"):
                ax.axhline(pred[f"basic_snic_util_{side}"], color=colors[side], linestyle="--", linewidth=1,
                           label=f"{side.upper()}: your prediction")
        jct = s["modes"][mode]["jct_s"]
        title = f"{mode}: JCT {jct:.1f} s"
        if mode == "dualpath" and s["modes"].get("oracle", {}).get("jct_s"):
            title += f" (oracle, which reads nothing: {s['modes']['oracle']['jct_s']:.1f} s)"
        ax.set_ylim(0, 1.15)
        ax.set_ylabel("SNIC read util")
        ax.set_title(title, fontsize=9, loc="left")
        ax.legend(fontsize=7, loc="lower left")
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("real seconds since the workload started")
    fig.tight_layout()
    path = out / "snic_over_time.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


LAB = Lab(
    title="Lab 1: the storage bottleneck",
    keys=(
        Key("basic_usable_snics", "a count: SNICs that read KV from storage in Basic"),
        Key("dualpath_usable_snics", "a count: SNICs that read KV from storage in DualPath"),
        Key("speedup_bound", "x: DualPath / Basic JCT if both were storage-bound (the ratio of usable SNICs)"),
        Key("basic_snic_util_pe", "a fraction 0..1: Basic's mean read utilization of the prefill nodes' SNICs"),
        Key("basic_snic_util_de", "a fraction 0..1: Basic's mean read utilization of the decode nodes' SNICs"),
        Key("dualpath_de_read_share", "a fraction 0..1: the share of DualPath's turns read on the decode side"),
        Key("speedup", "x: the measured DualPath / Basic JCT"),
    ),
    grades="run", grade=grade, picture=picture, trust=run_trust)

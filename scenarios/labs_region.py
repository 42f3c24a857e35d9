"""Lab 2, the congestion-free P/D region (``labs/2-congestion-free-region``): its predictions, how each is
graded against a sweep of DualPath over P/D points, and its picture.

The expected bounds and the links that bind at them are the paper's section 3 formulas as
``scenarios.fabric.region`` writes them, evaluated at the g and s the sweep's runs recorded
(``modes.dualpath.fabric``); the measured figures are each run's ``modes.dualpath.fabric`` (wire utilization
per CNIC link type, the formula at the reads that run made, with the host <-> GPU copies) and ``snic_util``.
The picture is ``fabric.plot``: the measured points against the formula. TEACHER.md explains every
tolerance. Called by ``scenarios.labs``.
"""

from __future__ import annotations

import math
from pathlib import Path

from . import fabric, report, sweep
from .labs import Key, Lab, Row, load_json, sweep_trust, within

#: what can congest: the four CNIC link types of section 3 and the DE node's DRAM
LINKS = (*fabric.LINK_TYPES, "de_dram")
NAMES = {**fabric.NAMES, "de_dram": "DE DRAM"}
#: the bounds are exact fractions (1/7, 7/2); 2% takes them written to two digits (0.14, 3.5)
TOL_BOUND = 0.02
#: the point past the upper bound whose DE CNIC write and read split the lab asks about
TOP_RATIO = 4.0
#: the DE side's share of the reads: D / (P + D) = 0.2 at 4P1D if the SNICs are balanced; runs measured
#: 0.21 (and 0.78-0.87 at 1P4D-1P8D against 0.8-0.89); +-0.05 rejects the PE/DE node split ignored (0.5)
#: and the shares swapped (0.8)
TOL_SHARE = 0.05


def _ratio(x: float) -> str:
    return "inf" if math.isinf(x) else (f"{x:g}" if x >= 1 else f"1/{1 / x:.4g}")


def points(sweep_dir: Path) -> list[dict]:
    """The sweep's finished points, in increasing P/D: label, P/D, the run's DualPath ``fabric`` figures and
    SNIC utilization, and the run directory."""
    index = load_json(sweep_dir / "sweep.json")
    out = []
    for p in index["points"]:
        if p.get("status") != "done":
            continue
        run = sweep_dir / p["run_dir"]
        m = load_json(run / "summary.json").get("modes", {}).get("dualpath")
        if m and m.get("fabric"):
            fab = m["fabric"]
            out.append({"label": p["label"], "p_over_d": fab["p"] / fab["d"], "fabric": fab,
                        "snic_util": m["snic_util"], "run": run})
    return sorted(out, key=lambda pt: pt["p_over_d"])


def _busiest(pt: dict) -> tuple[str, float]:
    """The most loaded of the CNIC link types (wire + copies, at the reads the run made) and the DE DRAM."""
    fab = pt["fabric"]
    loads = {**fab["with_loopback"], "de_dram": fab["de_dram"]}
    lt = max(LINKS, key=lambda k: loads[k] or 0)
    return lt, loads[lt]


def _choice(key: str, pred: str, binding: list[str], end: str, bound: float, pt: dict | None) -> Row:
    names = " and ".join(NAMES[b] for b in binding)
    why = f"{names} {'set' if len(binding) > 1 else 'sets'} the {end} bound, P/D = {_ratio(bound)}"
    if pt is not None:
        lt, load = _busiest(pt)
        why += (f"; at P/D = {_ratio(pt['p_over_d'])} the run's reads load {NAMES[lt]} most: {load:.0%} with the "
                f"copies, {(pt['fabric']['measured_wire'].get(lt) or 0):.0%} measured on the wire"
                if lt != "de_dram" else f"; at P/D = {_ratio(pt['p_over_d'])} the DE DRAM is the most loaded, "
                                        f"{load:.0%}")
    return Row(key, pred, " or ".join(binding), "formula", "exact", pred in binding, why)


def grade(sweep_dir: Path, pred: dict) -> list[Row]:
    pts = points(sweep_dir)
    if not pts:
        return [Row(k.name, pred[k.name], None, "measured", "-", False, "the sweep has no finished DualPath point")
                for k in LAB.keys]
    g, s = pts[0]["fabric"]["g"], pts[0]["fabric"]["s"]
    bounds = fabric.region(g, s)
    lo, hi = bounds["all"]
    below = [k for k in LINKS if math.isclose(bounds[k][0], lo)]
    above = [k for k in LINKS if math.isclose(bounds[k][1], hi)]
    where = f"g = {g:g} GPU per node, s = SNIC / CNIC = {s:g}"
    rows = [
        within("lower_bound", pred["lower_bound"], lo, "formula",
               f"PE CNIC write (Bs/g)(1 + D/P) <= B gives P/D >= s/(g - s) = {_ratio(lo)} at {where}",
               rel_tol=TOL_BOUND),
        within("upper_bound", pred["upper_bound"], hi, "formula",
               f"the tightest of DE CNIC read (g - 2s)/s = {_ratio(bounds['de_up'][1])}, DE CNIC write "
               f"(g - s)/(2s) = {_ratio(bounds['de_down'][1])} and DE DRAM (M/(Bs) - 3)/2 = "
               f"{_ratio(bounds['de_dram'][1])} at {where}", rel_tol=TOL_BOUND),
        _choice("first_link_below", pred["first_link_below"], below, "lower", lo,
                pts[0] if pts[0]["p_over_d"] < lo else None),
        _choice("first_link_above", pred["first_link_above"], above, "upper", hi,
                pts[-1] if pts[-1]["p_over_d"] > hi else None),
    ]
    top = next((pt for pt in pts if math.isclose(pt["p_over_d"], TOP_RATIO)), None)
    sat = fabric.saturated(TOP_RATIO, 1.0, g, s)["de_down"]
    wire = TOP_RATIO * s / g  # the PE path's KV into the DE: r_pe / (D g) with r_pe = P s B
    why = (f"(2Tp + Tc) P g / B = (P/D)(s/g) on the wire + (1 + P/D)(s/g) of buffer -> HBM copies = {wire:.3g} + "
           f"{sat - wire:.3g}: {'over' if sat > 1 else 'under'} 100%")
    if top is not None:
        fab = top["fabric"]
        why += (f"; the run's SNICs read at {top['snic_util']['pe']:.2f} PE / {top['snic_util']['de']:.2f} DE of "
                f"their rate, so at its own reads {fab['with_loopback']['de_down']:.0%}, of which "
                f"{fab['measured_wire']['de_down']:.0%} measured on the wire (formula {fab['predicted_wire']['de_down']:.0%})")
    rows.append(within("de_write_load_at_4", pred["de_write_load_at_4"], sat, "formula", why, rel_tol=TOL_BOUND))
    if top is None:
        rows.append(Row("de_read_share_at_4", pred["de_read_share_at_4"], None, "measured", "-", False,
                        f"the sweep has no point at P/D = {TOP_RATIO:g}"))
    else:
        share, p, d = top["fabric"]["de_read_share"], top["fabric"]["p"], top["fabric"]["d"]
        rows.append(within(
            "de_read_share_at_4", pred["de_read_share_at_4"], share, "measured",
            f"each turn reads on the side with the shorter read queue, so the reads spread evenly over the "
            f"{p + d} SNICs: D / (P + D) = {d / (p + d):.2f} on the DE side, the paper's balanced reads; "
            f"{share:.2f} of the bytes measured", abs_tol=TOL_SHARE))
    return rows


def picture(sweep_dir: Path, _pred: dict, out: Path) -> str | None:
    """fabric.png (``fabric.plot``): per CNIC link type the measured wire utilization against P/D, beside the
    paper's formula with every SNIC saturated, the congestion-free region shaded."""
    index = load_json(sweep_dir / "sweep.json")
    for p in index["points"]:  # each point's figures from its summary, as `dpemu report` does
        summary = sweep_dir / p.get("run_dir", "-") / "summary.json"
        if p.get("status") == "done" and summary.is_file():
            p["metrics"] = sweep.metrics(load_json(summary))
    groups = sweep.aggregate(index)
    if len(groups) < 2:
        return None
    return fabric.plot(report._plt(), groups, out / "fabric.png")


LAB = Lab(
    title="Lab 2: the congestion-free region",
    keys=(
        Key("lower_bound", "a ratio P/D: the lowest P/D at which no link is over-loaded (section 3)"),
        Key("upper_bound", "a ratio P/D: the highest P/D at which no link is over-loaded (section 3)"),
        Key("first_link_below", "the link that congests first below the lower bound: one of " + ", ".join(LINKS),
            choices=LINKS),
        Key("first_link_above", "the link that congests first above the upper bound: one of " + ", ".join(LINKS),
            choices=LINKS),
        Key("de_write_load_at_4", "a fraction of one CNIC: a DE CNIC's write load at P/D = 4 with every SNIC "
                                  "saturated, host <-> GPU copies included (section 3's accounting)"),
        Key("de_read_share_at_4", "a fraction 0..1: the share of DualPath's reads made by the decode side at "
                                  "P/D = 4 (measured)"),
    ),
    grades="sweep", grade=grade, picture=picture, trust=sweep_trust)

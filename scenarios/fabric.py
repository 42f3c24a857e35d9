"""The compute fabric under the second read path: the paper's section 3 beside what a run measured.

Notation as in the paper: g GPUs per node, one CNIC of bandwidth B per GPU, an
SNIC of s*B per node, DRAM bandwidth M per node, P prefill and D decode nodes.
The paper assumes every SNIC saturated and the reads balanced, so the PE path
carries P*s*B and the DE path D*s*B. Here the same accounting is written for
any measured read rates r_pe (bytes/s read through the PE nodes' SNICs) and
r_de (through the DE nodes'), so a run's measured CNIC utilization can be set
beside the formula evaluated at the reads that run really made.

Per CNIC and direction ("up" = host -> fabric, the paper's NIC *read*;
"down" = fabric -> host, its *write*), the KV bytes are of two kinds:

- wire: what crosses the compute fabric between nodes, which dpemu emulates:
  PE-path KV PE -> DE (PE up, DE down) and DE-path KV DE -> PE (DE up, PE down);
- loopback: the host <-> GPU copies the paper also routes through the GPU's
  CNIC (so that its QoS arbitrates them): the PE's buffer -> GPU copy of
  PE-path KV (PE up and down), and the DE's buffer -> HBM copy of all KV
  before decode (DE up and down). dpemu does not put these on the wire (a
  node's DRAM and its GPU are one process), so they are added from the
  measured reads.

Summed over both kinds and with r_pe = P*s*B, r_de = D*s*B these are the
paper's four CNIC constraints; ``region`` gives the P/D range each allows. The
DE DRAM carries the DE-path reads in, out to the PE and into HBM, plus the
PE-path KV in and into HBM: (3*r_de + 2*r_pe) / D per node, the fifth.
The appended tokens' KV (PE -> DE, ~1-2% of the bytes at the paper's hit
rates) and TCP/gRPC framing (a few %) are left out, as in the paper.
"""

from __future__ import annotations

LINK_TYPES = ("pe_up", "pe_down", "de_up", "de_down")
#: the paper's DRAM bandwidth per node over SNIC bandwidth per node: M = 500 GB/s, s*B = 50 GB/s
DRAM_PER_SNIC = 10.0


def cnic_loads(r_pe: float, r_de: float, p: float, d: float, g: int) -> dict[str, dict[str, float]]:
    """Bytes/s per CNIC of each link type: {"wire": {...}, "loopback": {...}} from the two paths' read
    rates (bytes/s, whole cluster)."""
    pe, de = p * g, d * g  # CNICs on each side
    return {
        "wire": {"pe_up": r_pe / pe, "pe_down": r_de / pe, "de_up": r_de / de, "de_down": r_pe / de},
        "loopback": {"pe_up": r_pe / pe, "pe_down": r_pe / pe,
                     "de_up": (r_pe + r_de) / de, "de_down": (r_pe + r_de) / de},
    }


def de_dram_load(r_pe: float, r_de: float, d: int) -> float:
    """Bytes/s through one DE node's DRAM."""
    return (3 * r_de + 2 * r_pe) / d


def saturated(p: float, d: float, g: int, s: float) -> dict[str, float]:
    """The paper's utilizations (fractions of B, of M for ``de_dram``) with every SNIC saturated:
    per link type wire + loopback, and the DE DRAM. Only P/D matters, so P and D may be any positive reals."""
    loads = cnic_loads(p * s, d * s, p, d, g)  # in units of B
    out = {lt: loads["wire"][lt] + loads["loopback"][lt] for lt in LINK_TYPES}
    out["de_dram"] = de_dram_load(p * s, d * s, d) / (DRAM_PER_SNIC * s)
    return out


def region(g: int, s: float, dram_per_snic: float = DRAM_PER_SNIC) -> dict[str, tuple[float, float]]:
    """The P/D range each constraint of section 3 allows (lo, hi), and "all" (their intersection), and
    "wire": the range in which the inter-node bytes alone fit (what dpemu's wire can show congesting)."""
    inf = float("inf")
    bounds = {
        "pe_up": (0.0, inf) if 2 * s <= g else (inf, 0.0),  # 2Bs/g <= B, whatever P/D
        "pe_down": (s / (g - s) if s < g else inf, inf),  # (Bs/g)(1 + D/P) <= B
        "de_up": (0.0, (g - 2 * s) / s),  # (s/g)(P/D + 2) B <= B
        "de_down": (0.0, (g - s) / (2 * s)),  # (2Tp + Tc) P g <= B
        "de_dram": (0.0, (dram_per_snic - 3) / 2),  # (3 + 2P/D) Bs <= M
        "wire": (s / g, g / s),
    }
    lo = max(b[0] for k, b in bounds.items() if k != "wire")
    hi = min(b[1] for k, b in bounds.items() if k != "wire")
    bounds["all"] = (lo, hi)
    return bounds


def compare(measured_util: dict[str, float | None], r_pe: float, r_de: float, p: int, d: int, g: int,
            cnic_bps: float, snic_bps: float) -> dict:
    """One run's compute fabric beside section 3. `measured_util`: mean wire utilization per link type;
    r_pe, r_de: measured read rates (whole cluster), in the unit of the rates of one CNIC and one SNIC.
    Utilizations are fractions of a CNIC (of the DRAM for ``de_dram``)."""
    loads = cnic_loads(r_pe, r_de, p, d, g)
    s = snic_bps / cnic_bps
    return {
        "measured_wire": {lt: measured_util.get(lt) for lt in LINK_TYPES},
        "predicted_wire": {lt: round(loads["wire"][lt] / cnic_bps, 4) for lt in LINK_TYPES},
        "with_loopback": {lt: round((loads["wire"][lt] + loads["loopback"][lt]) / cnic_bps, 4)
                          for lt in LINK_TYPES},
        "de_dram": round(de_dram_load(r_pe, r_de, d) / (DRAM_PER_SNIC * snic_bps), 4),
        "saturated": {k: round(v, 4) for k, v in saturated(p, d, g, s).items()},
        "de_read_share": round(r_de / (r_pe + r_de), 4) if r_pe + r_de > 0 else None,
        "p": p, "d": d, "g": g, "s": s,
    }


# -- the sweep's report section ---------------------------------------------------------------------------------
NAMES = {"pe_up": "PE up", "pe_down": "PE down", "de_up": "DE up", "de_down": "DE down"}


def _ratio(x: float) -> str:
    return f"{x:g}" if x >= 1 else f"1/{1 / x:g}"


def _points(groups: list[dict], mode: str) -> list[dict]:
    """The stats of the sweep's points that have section 3 figures, in increasing P/D."""
    return sorted((g["stats"] for g in groups if f"fabric.p_over_d.{mode}" in g["stats"]),
                  key=lambda st: st[f"fabric.p_over_d.{mode}"]["mean"])


def _mean(st: dict, key: str, mode: str) -> float | None:
    """The mean over seeds of ``fabric.<key>.<mode>`` at one point, or None when it has no such figure."""
    return st.get(f"fabric.{key}.{mode}", {}).get("mean")


def report_lines(groups: list[dict], mode: str = "dualpath") -> list[str]:
    """Markdown for a P/D sweep: per point the CNIC utilization per link type, measured on the wire beside
    the formula at the measured reads, then with the host <-> GPU copies beside the paper's saturated
    value; fractions of a CNIC (of the DRAM for the DE DRAM)."""
    pts = _points(groups, mode)
    if not pts:
        return []

    def m(st: dict, key: str) -> float | None:
        return _mean(st, key, mode)

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.0f}%"

    first = pts[0]  # g and s do not vary in a P/D sweep
    bounds = region(round(m(first, "g")), m(first, "s"))
    lo, hi = bounds["all"]
    wlo, whi = bounds["wire"]
    lines = ["## The compute fabric against section 3 (DualPath; % of one CNIC, of DRAM for the DE DRAM)", "",
             f"Section 3 at this cluster's g = {m(first, 'g'):g} GPU(s) per node and SNIC = {m(first, 's'):g} x CNIC: "
             f"no link over-loaded for {_ratio(lo)} <= P/D <= {_ratio(hi)}; the inter-node bytes alone fit for "
             f"{_ratio(wlo)} <= P/D <= {_ratio(whi)}.", "",
             "Wire: the KV that crosses the compute fabric between nodes, which dpemu emulates; measured (mean over "
             "the whole run: every byte read crosses it within) / the formula at the reads the run made. "
             "SNIC: read utilization PE side / DE side; DE share: the DE path's part of the reads.", "",
             "| P/D | SNIC PE / DE | DE share | PE up | PE down | DE up | DE down |", "|---|---|---|---|---|---|---|"]
    for st in pts:
        r = m(st, "p_over_d")
        cells = " | ".join(f"{pct(m(st, f'measured_wire.{lt}'))} / {pct(m(st, f'predicted_wire.{lt}'))}"
                           for lt in LINK_TYPES)
        snic = " / ".join(pct(st.get(f"snic_util.{side}.{mode}", {}).get("mean")) for side in ("pe", "de"))
        lines.append(f"| {_ratio(r)} | {snic} | {pct(m(st, 'de_read_share'))} | {cells} |")
    lines += ["", "With the host <-> GPU copies the paper also routes through the CNICs (added from the measured "
              "reads; not on dpemu's wire) and the DE DRAM: at the measured reads / the paper's value with every "
              "SNIC saturated. Over 100% (bold) is a congested link.", "",
              "| P/D | PE up | PE down | DE up | DE down | DE DRAM |", "|---|---|---|---|---|---|"]

    def both(st, lt: str, kind: str) -> str:
        at, sat = m(st, f"{kind}.{lt}" if kind else lt), m(st, f"saturated.{lt}")
        cell = f"{pct(at)} / {pct(sat)}"
        return f"**{cell}**" if (sat or 0) > 1 or (at or 0) > 1 else cell

    for st in pts:
        cells = " | ".join(both(st, lt, "with_loopback") for lt in LINK_TYPES)
        lines.append(f"| {_ratio(m(st, 'p_over_d'))} | {cells} | {both(st, 'de_dram', '')} |")
    return lines + [""]


def plot(plt, groups: list[dict], path, mode: str = "dualpath") -> str | None:
    """fabric.png: per link type the measured wire utilization (markers) and its busiest window (open
    markers) against P/D, beside the paper's utilization with every SNIC saturated (dashed: wire +
    loopback; dotted: the wire alone), with the congestion-free region shaded."""
    pts = _points(groups, mode)
    if not pts:
        return None
    xs = [_mean(st, "p_over_d", mode) for st in pts]
    g, s = round(_mean(pts[0], "g", mode)), _mean(pts[0], "s", mode)
    dense = [xs[0] * (xs[-1] / xs[0]) ** (i / 100) for i in range(101)]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    colors = dict(zip(LINK_TYPES, ("tab:red", "tab:orange", "tab:blue", "tab:green"), strict=True))
    for lt in LINK_TYPES:
        ax.plot(dense, [saturated(r, 1.0, g, s)[lt] for r in dense], color=colors[lt], linestyle="--",
                alpha=0.7, label=f"{NAMES[lt]}: paper, SNICs saturated")
        ax.plot(dense, [cnic_loads(r * s, s, r, 1.0, g)["wire"][lt] for r in dense], color=colors[lt],
                linestyle=":", linewidth=0.8, alpha=0.7,
                label="its inter-node part (dpemu's wire)" if lt == LINK_TYPES[-1] else None)
        meas = [(x, _mean(st, f"measured_wire.{lt}", mode)) for x, st in zip(xs, pts, strict=True)]
        ax.plot([x for x, v in meas if v is not None], [v for _, v in meas if v is not None], color=colors[lt],
                marker="o", label=f"{NAMES[lt]}: measured wire")
        peak = [(x, _mean(st, f"peak_wire.{lt}", mode)) for x, st in zip(xs, pts, strict=True)]
        ax.plot([x for x, v in peak if v is not None], [v for _, v in peak if v is not None], color=colors[lt],
                marker="o", fillstyle="none", linestyle="none")
    lo, hi = region(g, s)["all"]
    ax.axvspan(lo, hi, color="tab:gray", alpha=0.12, label="section 3: no link over-loaded")
    ax.axhline(1.0, color="k", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [_ratio(x) for x in xs])
    ax.set_xlabel("P / D")
    ax.set_ylabel("utilization of one CNIC")
    ax.legend(fontsize=6, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def headlines(groups: list[dict], paper: dict, mode: str = "dualpath") -> list[dict]:
    """For ``dpemu reproduce``: the P/D range of the sweep's points in which no CNIC (with the copies) and no
    DE DRAM is over-loaded at the measured reads, and how well the measured wire matches the accounting."""
    pts = _points(groups, mode)
    if not pts:
        return []

    def m(st: dict, key: str) -> float | None:
        return _mean(st, key, mode)

    over = {m(st, "p_over_d"): max(m(st, f"with_loopback.{lt}") or 0 for lt in LINK_TYPES) > 1
            or (m(st, "de_dram") or 0) > 1 for st in pts}
    lo, hi = region(round(m(pts[0], "g")), m(pts[0], "s"))["all"]
    ratios = []
    for st in pts:  # the busiest link type of each point: measured wire over the formula at its reads
        lt = max(LINK_TYPES, key=lambda t: m(st, f"predicted_wire.{t}") or 0)
        if m(st, f"predicted_wire.{lt}") and m(st, f"measured_wire.{lt}") is not None:
            ratios.append(m(st, f"measured_wire.{lt}") / m(st, f"predicted_wire.{lt}"))
    fig = paper.get("figure", "")
    ours = "; ".join(f"{what} at {', '.join(_ratio(r) for r, o in over.items() if o == flag)}"
                     for what, flag in (("fits", False), ("over", True)) if flag in over.values())
    heads = [{"figure": fig, "what": "P/D: a CNIC (copies included) or the DE DRAM over 100% at the measured reads?",
              "ours": ours, "paper": "fits 1/7 to 7/2",
              "analytic": f"{_ratio(lo)} to {_ratio(hi)}", "seeds": None}]
    if ratios:
        mean = sum(ratios) / len(ratios)
        heads.append({"figure": fig, "what": "busiest CNIC type: measured wire / section 3 at the measured reads",
                      "ours": f"{mean:.2f} ({min(ratios):.2f}-{max(ratios):.2f} over {len(ratios)} P/D points)",
                      "paper": None, "analytic": 1.0, "seeds": None})
    return heads

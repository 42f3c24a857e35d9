"""The tables of one run's summary, as plain data: the terminal (``cli``, with rich) and ``report.md``
(``report``, as markdown) render the same rows, so the two never disagree on what a run measured.

A table is (title, columns, rows); a column name may hold a line break (the terminal stacks it, markdown
joins it with a space); every cell is a string.
"""

from __future__ import annotations

from typing import NamedTuple


class Grid(NamedTuple):
    title: str
    columns: tuple[str, ...]
    rows: list[tuple[str, ...]]


def fmt_num(x: float | None, spec: str = "{:.2f}") -> str:
    """A figure for a table: "-" when there is none."""
    return "-" if x is None else spec.format(x)


def fmt_ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def online(summary: dict) -> Grid | None:
    """Online runs: the steady state of each mode against the SLO (``scenarios.online``)."""
    modes = {m: v["online"] for m, v in summary.get("modes", {}).items() if "online" in v}
    if not modes:
        return None
    rows = []
    for mode, o in modes.items():
        b = o.get("ttft_breakdown_s", {})
        rows.append((mode, f"{o['arrival_rate']:g}", str(o["turns"]),
                     f"{fmt_num(o['ttft_s']['mean'], '{:.1f}')}/{fmt_num(o['ttft_s']['p99'], '{:.1f}')}",
                     fmt_num(o["ttst_s"]["mean"], "{:.1f}"), fmt_ms(o["tpot_s"]["mean"]),
                     "/".join(fmt_num(b.get(k), "{:.1f}") for k in ("wait", "alloc", "read", "prefill")),
                     "ok" if o["slo_ok"] else "missed"))
    return Grid("online, steady state (turns submitted in [T/4, T], T = last arrival); real s, TPOT ms",
                ("mode", "APS", "turns", "TTFT\nmean/p99", "TTST\nmean", "TPOT\nmean", "queue/alloc/read\n/prefill",
                 "SLO"), rows)


def collectives(summary: dict) -> Grid | None:
    """Per mode: AllToAll completion times of the prefill and decode groups (real ms), if collectives ran."""
    rows = []
    for mode, m in summary.get("modes", {}).items():
        if c := m.get("collectives"):
            p, d = c["prefill"], c["decode"]
            rows.append((mode, str(p["count"]), f"{fmt_ms(p['p50_s'])}/{fmt_ms(p['p99_s'])}", str(d["count"]),
                         f"{fmt_ms(d['p50_s'])}/{fmt_ms(d['p99_s'])}"))
    if not rows:
        return None
    return Grid("collectives (MoE AllToAll completion, real ms)",
                ("mode", "prefill\ncount", "prefill\np50/p99", "decode\ncount", "decode\np50/p99"), rows)


def lockstep(summary: dict) -> Grid | None:
    """Per mode: the prefill EP groups' lockstep (``scenarios.gpustats``): Fig. 14's attention max/avg and the
    share of GPU time spent waiting for the group's slowest engine."""
    rows = []
    for mode, m in summary.get("modes", {}).items():
        if ls := m.get("gpu", {}).get("lockstep"):
            rows.append((mode, str(ls["forwards"]), fmt_num(ls["engines_per_forward"], "{:.1f}"),
                         fmt_num(ls["attention_max_over_avg"]), fmt_num(ls["attention_max_over_avg_full"]),
                         f"{ls['full_forwards']}",
                         fmt_num(None if ls["bubble_share"] is None else ls["bubble_share"] * 100, "{:.1f}"),
                         str(ls["timeouts"])))
    if not rows:
        return None
    return Grid("lockstep (prefill EP groups): attention max/avg per forward (paper Fig. 14: ~1.06 with its "
                "scheduler);\nfull: forwards with every engine of the group; wait = share of engine time in forwards "
                "spent waiting beyond its own work",
                ("mode", "forwards", "engines\n/forward", "attn\nmax/avg", "full fwd\nmax/avg",
                 "full\nforwards", "wait\n%", "time-\nouts"), rows)


def isolation(summary: dict) -> Grid | None:
    """The isolation experiment: reference (no KV), isolation on, isolation off."""
    iso = summary.get("isolation")
    if not iso:
        return None
    rows = []
    for run, label in (("reference", "reference"), ("on", "isolation on"), ("off", "isolation off")):
        r = iso[run]
        c, sd = r["collective_s"], r.get("slowdown_p99", {})
        rows.append((label, f"{fmt_ms(c['prefill']['p50'])}/{fmt_ms(c['prefill']['p99'])}",
                     fmt_num(sd.get("prefill"), "{:.2f}x"),
                     f"{fmt_ms(c['decode']['p50'])}/{fmt_ms(c['decode']['p99'])}",
                     fmt_num(sd.get("decode"), "{:.2f}x"),
                     f"{fmt_ms(r['tpot_s']['p50'])}/{fmt_ms(r['tpot_s']['p99'])}",
                     "-" if r["ttft_s"]["p50"] is None else f"{r['ttft_s']['p50']:.1f}",
                     fmt_num(r.get("cnic_kv_gbps"), "{:.0f}")))
    return Grid("isolation: collectives and TPOT in real ms, slow = p99 / reference p99 (oracle: no KV);\n"
                "KV: KV over the compute fabric, real Gbit/s",
                ("run", "prefill\np50/p99", "\nslow", "decode\np50/p99", "\nslow", "TPOT\np50/p99", "TTFT s\np50",
                 "KV\nGbit/s"), rows)


def markdown(grid: Grid) -> list[str]:
    """A grid as a markdown section: its title in bold, then the table."""
    cols = [" ".join(c.split()) or "-" for c in grid.columns]
    return ([f"**{' '.join(grid.title.split())}**", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            + ["| " + " | ".join(r) + " |" for r in grid.rows] + [""])


def links(summary: dict) -> Grid | None:
    """Per link class and direction: packets dropped per mode, the busiest link's mean queue and the peak
    queue (real ms at the link's rate, the worst mode), and the class's dequeue timing (p99 of |gap/ideal - 1|
    over calibration and serving: p99 of gap/ideal - 1). The paper's compute fabric (cnic) is lossless: a drop there fails the run."""
    modes = {**summary.get("modes", {}), **summary.get("extra_runs", {})}
    figs = {m: v.get("links", {}) for m, v in modes.items()}
    pairs = list(dict.fromkeys((c, d) for f in figs.values() for c in f for d in f[c]))
    if not pairs:
        return None
    dq = summary.get("dequeue", {})
    rows = []
    for cls, d in pairs:
        per = [f[cls][d] for f in figs.values() if cls in f and d in f[cls]]
        rows.append((cls, d, "/".join(str(f[cls][d]["drops"]) if cls in f and d in f[cls] else "-"
                                     for f in figs.values()),
                     fmt_num(max(p["backlog_busiest_mean_ms"] for p in per), "{:.1f}"),
                     fmt_num(max(p["backlog_max_ms"] for p in per), "{:.1f}"),
                     fmt_num(per[0]["queue_limit_bytes"] / 1e3, "{:.1f}"),
                     fmt_num(dq.get(cls, {}).get("late_p99"), "{:.2f}")))
    return Grid(f"links (drops per mode: {'/'.join(figs)}; queues in real ms)",
                ("class", "dir", "drops", "queue ms\nbusiest", "queue ms\npeak", "limit\nKB", "dequeue\np99 late"),
                rows)

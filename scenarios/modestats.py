"""One serving mode's figures from what it measured: the HTB classes sampled on every shaped link, the driver's
rows, the nodes' collectives. ``scenarios.serve`` runs the mode and calls these; the summary's per-mode keys are
made here (docs/results.md).
"""

from __future__ import annotations

import bisect
import csv
import itertools
import statistics
from pathlib import Path
from typing import NamedTuple

from daemons.gpu import COLLECTIVE_COLUMNS
from emulator.monitor import ClassKey, TcSampler
from emulator.tcplan import DEFAULT_CLASS, LINK_CLASS

from . import fabric, online

LINK_COLUMNS = ["t_s", "link", "link_class", "side", "direction", "tclass", "bytes", "packets", "drops",
                "backlog_bytes"]


class LinkKey(NamedTuple):
    """What one sampled HTB class measures."""
    link: str        # "<host>-<nic>", e.g. "pe1-cnic0"
    link_class: str  # "snic", "cnic" or "stnic"
    side: str        # the host's role: "pe", "de" or "st"
    direction: str   # "up" (host -> switch) or "down" (switch -> host)
    tclass: str      # "link", "default" or a traffic class name (below)
    rate_bps: float  # the link's configured rate


def link_keys(plan) -> dict[ClassKey, LinkKey]:
    """HTB classes of every shaped link (SNIC, CNIC, storage NIC), both ends. Traffic class "link" is the link's
    root class 1:1 (all its traffic), "default" its leaf 1:10 (everything without traffic classes, unmarked
    traffic with them), then e.g. "collective", "kv"."""
    keys = {}
    for lk in plan.net.links:
        side = plan.net.host(lk.host).role
        leaves = [("link", LINK_CLASS), ("default", DEFAULT_CLASS)]  # 1:10 is the FIFO when no classes
        leaves += [(c.name, c.handle) for c in lk.traffic_classes]
        for direction, netns, dev in (("up", plan.net.host(lk.host).netns, lk.host_intf),
                                      ("down", None, lk.switch_intf)):
            for tclass, handle in leaves:
                keys[ClassKey(netns, dev, handle)] = LinkKey(f"{lk.host}-{lk.nic}", lk.link_class, side, direction,
                                                             tclass, lk.rate_bps)
    return keys


def whole(keys: dict[ClassKey, LinkKey], link_class: str, direction: str, side: str | None = None
          ) -> list[ClassKey]:
    """The root classes (all the link's traffic) of one link class and direction, of one side or both."""
    return [k for k, v in keys.items() if (v.link_class, v.direction, v.tclass) == (link_class, direction, "link")
            and side in (None, v.side)]


def cnic_kv_gbps(sampler: TcSampler, keys, t0: float, t1: float, collective_bytes: int,
                 rate_scale: float) -> float | None:
    """KV throughput over the compute fabric, real Gbit/s, averaged over the mode's JCT: every byte that
    crosses the fabric leaves one CNIC upwards, so it is the CNICs' upward wire bytes less the collectives'
    payload (what remains is KV, plus TCP/IP headers and gRPC framing: a few %). Isolation on or off alike."""
    moved = [sampler.delta(k, t0, t1) for k in whole(keys, "cnic", "up")]
    moved = [m for m in moved if m is not None]
    if not moved:
        return None
    seconds = max(s for _, s in moved)
    kv = max(0, sum(b for b, _ in moved) - collective_bytes)
    return round(kv * 8 / seconds / rate_scale / 1e9, 2)


def merge_collectives(mode_dir: Path, nodes: list[str]) -> dict:
    """The nodes' collectives-<node>.csv into collectives.csv; completion p50/p99 per phase (real s)."""
    rows = []
    for name in nodes:
        part = mode_dir / f"collectives-{name}.csv"
        if part.exists():
            rows += list(csv.DictReader(part.open()))
            part.unlink()
    with (mode_dir / "collectives.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLLECTIVE_COLUMNS)
        w.writeheader()
        w.writerows(sorted(rows, key=lambda r: float(r["start_s"])))
    out = {}
    for phase in ("prefill", "decode"):
        times = sorted(float(r["completion_s"]) for r in rows if r["phase"] == phase)
        out[phase] = {"count": len(times), "p50_s": online.percentile(times, 50), "p99_s": online.percentile(times, 99),
                      "bytes": sum(int(r["bytes"]) for r in rows if r["phase"] == phase)}
    return out


def write_links(path: Path, sampler: TcSampler, keys, t0: float, time_scale: float) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(LINK_COLUMNS)
        for s in sampler.samples:
            lk = keys[s.key]
            w.writerow([round((s.t_s - t0) / time_scale, 4), lk.link, lk.link_class, lk.side, lk.direction,
                        lk.tclass, s.bytes, s.packets, s.drops, s.backlog_bytes])


def mean_utils(sampler: TcSampler, keys, a: float, b: float, cls: str, direction: str) -> dict[str, float | None]:
    out = {}
    for side in ("pe", "de"):
        vals = [r / keys[k].rate_bps for k in whole(keys, cls, direction, side)
                if (r := sampler.rate_bps(k, a, b)) is not None]
        out[side] = round(sum(vals) / len(vals), 4) if vals else None
    return out


def fabric_figures(sampler: TcSampler, keys, a: float, b: float, window_s: float) -> dict | None:
    """The compute fabric between a and b (the whole run: every byte read then crosses the wire inside it,
    even when reads run ahead of a compute-bound prefill) beside the paper's section 3
    (``scenarios.fabric``): mean wire utilization of the CNICs per link type (side x direction), the formula
    at the reads measured, and ``peak_wire``: the busiest CNIC of each type in its busiest window."""
    links = {v.link: v for v in keys.values() if v.tclass == "link"}  # one per link (keys: per direction)
    snics = {side: [v for v in links.values() if v.link_class == "snic" and v.side == side] for side in ("pe", "de")}
    cnics = [v for v in links.values() if v.link_class == "cnic"]
    if not snics["pe"] or not snics["de"] or not cnics:
        return None
    up, down = mean_utils(sampler, keys, a, b, "cnic", "up"), mean_utils(sampler, keys, a, b, "cnic", "down")
    measured = {"pe_up": up["pe"], "pe_down": down["pe"], "de_up": up["de"], "de_down": down["de"]}
    reads = {}
    for side in ("pe", "de"):
        rates = [sampler.rate_bps(k, a, b) for k in whole(keys, "snic", "down", side)]
        reads[side] = sum(r for r in rates if r is not None)
    p, d = len(snics["pe"]), len(snics["de"])  # one SNIC per node
    g = sum(1 for v in cnics if v.side == "pe") // p
    out = fabric.compare(measured, reads["pe"], reads["de"], p, d, g, cnics[0].rate_bps, snics["pe"][0].rate_bps)
    peak: dict[str, float | None] = {}
    edges = [a + i * window_s for i in range(int((b - a) / window_s) + 1)]
    for lt in fabric.LINK_TYPES:
        side, direction = lt.split("_")
        utils = [r / keys[k].rate_bps for k in whole(keys, "cnic", direction, side)
                 for lo, hi in itertools.pairwise(edges)
                 if (r := sampler.rate_bps(k, lo, hi)) is not None]
        peak[lt] = round(max(utils), 4) if utils else None
    out["peak_wire"] = peak
    return out


def snic_balance(sampler: TcSampler, keys, a: float, b: float, window_s: float) -> dict | None:
    """SNIC load balance (the paper's Fig. 13, "max/avg traffic over short windows"): in each window of
    `window_s` (wall) between a and b, the busiest compute-node SNIC's read bytes and the mean SNIC's;
    ``max_over_mean`` sums both over the windows before dividing, so each window counts by the traffic it
    carried. The end of a run, when fewer reads are left than SNICs, would otherwise dominate: there one
    SNIC reads the last contexts while the others idle (ratios of 2-6 in 3 s windows at the end of
    fig13_balance, 1.0-1.4 before), which is the drain, not the placement. ``unweighted`` is the plain
    mean of the windows' ratios, ``worst`` the highest; windows in which no SNIC read are skipped. 1.0 is
    perfect balance."""
    series = []
    for k in whole(keys, "snic", "down"):
        pts = sorted((s.t_s, s.bytes) for s in sampler.samples if s.key == k)
        if pts:
            series.append(pts)
    if len(series) < 2 or b - a < window_s:
        return None

    def at(pts: list[tuple[float, int]], t: float) -> int:  # the counter as last sampled by t
        i = bisect.bisect_right(pts, (t, float("inf"))) - 1
        return pts[max(i, 0)][1]

    windows = []  # (busiest SNIC's bytes, mean SNIC's bytes) per window with reads
    edges = [a + i * window_s for i in range(int((b - a) / window_s) + 1)]
    for lo, hi in itertools.pairwise(edges):
        moved = [at(p, hi) - at(p, lo) for p in series]
        if (mean := sum(moved) / len(moved)) > 0:
            windows.append((max(moved), mean))
    if not windows:
        return None
    ratios = [top / mean for top, mean in windows]
    return {"max_over_mean": round(sum(t for t, _ in windows) / sum(m for _, m in windows), 4),
            "unweighted": round(statistics.fmean(ratios), 4), "worst": round(max(ratios), 4),
            "windows": len(windows), "window_s": window_s}


def summarize(rows, sampler, keys, t0, t1, driver_summary, ledger, time_scale: float,
              window_s: float) -> dict:
    span = t1 - t0
    a, b = t0 + 0.1 * span, t0 + 0.9 * span  # the middle 80% of the mode's JCT
    ttft = sorted(float(r["ttft_s"]) for r in rows)
    tpot = sorted(float(r["tpot_s"]) for r in rows)
    return {
        "jct_s": round(driver_summary["jct_s"], 3), "requests": len(rows),
        "paths": {p: sum(1 for r in rows if r["path"] == p) for p in ("pe", "de", "split", "none")},
        "snic_util": mean_utils(sampler, keys, a, b, "snic", "down"),  # storage -> node: reads
        "cnic_util": mean_utils(sampler, keys, a, b, "cnic", "down"),  # KV arriving at PE GPUs / DE buffers
        "ttft_s": {"p50": online.percentile(ttft, 50), "p99": online.percentile(ttft, 99)},
        "tpot_s": {"p50": online.percentile(tpot, 50), "p99": online.percentile(tpot, 99)},
        "ledger": ledger,
        "snic_balance": snic_balance(sampler, keys, a, b, window_s * time_scale),
        "fabric": fabric_figures(sampler, keys, t0, t1, window_s * time_scale),
    }

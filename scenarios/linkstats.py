"""Link figures of a run, from its files: queues and drops per link class, and dequeue timing.

- :func:`queue_figures` reads a mode's ``links.csv`` (every SNIC, CNIC and storage NIC, both directions, every
  100 ms of real time): per link class and direction the packets dropped (and by which links), and the queue's
  occupancy, mean and peak, in bytes and in real milliseconds at the link's rate.
- Dequeue timing (``emulator.dequeue``) is kept as histograms of |gap / ideal - 1| per link class, in
  ``dequeue.csv`` (the calibration's in the run directory, each mode's in its own): :func:`write_dequeue`,
  :func:`read_dequeue`, and :func:`dequeue_figures` adds them up and summarizes.
- :func:`serving_watch` picks the interfaces a serving mode times: the ports that queue when the storage or the
  compute fabric is the bottleneck.

The summary, the verdict and the terminal read these figures; nothing recomputes them.
"""

from __future__ import annotations

import csv
from pathlib import Path

from emulator import dequeue
from emulator.tcplan import queue_limit_bytes

DEQUEUE_COLUMNS = ["link_class", "side", "error_lo", "error_hi", "gaps"]


def serving_watch(net) -> list[dequeue.Watched]:
    """Ports that queue while a mode serves: the first prefill and decode node's SNIC port (storage -> node:
    reads), their first CNIC's port (KV arriving) and the first decode node's CNIC egress (KV it forwards),
    and the first storage server's egress (reads leaving storage). A handful, so tracing stays cheap."""
    out, seen = [], set()

    def pick(link_class: str, role: str, direction: str) -> None:
        lk = next((lk for lk in net.links if lk.link_class == link_class and net.host(lk.host).role == role
                   and lk.nic in ("snic", "cnic0", "nic")), None)
        if lk is None:
            return
        dev = lk.host_intf if direction == "up" else lk.switch_intf
        if dev not in seen:
            seen.add(dev)
            out.append(dequeue.Watched(dev, lk.rate_bps, link_class))

    for link_class, role, direction in (("snic", "pe", "down"), ("snic", "de", "down"), ("cnic", "pe", "down"),
                                        ("cnic", "de", "up"), ("cnic", "de", "down"), ("stnic", "st", "up")):
        pick(link_class, role, direction)
    return out


def write_dequeue(path: Path, errors: dict[str, list[float]]) -> None:
    """Histograms of the busy gaps' |error| per link class."""
    edges = dequeue.bin_edges()
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(DEQUEUE_COLUMNS)
        for cls, errs in sorted(errors.items()):
            for side, counts in dequeue.histogram(errs).items():
                for i, c in enumerate(counts):
                    if c:
                        w.writerow([cls, side, f"{edges[i]:.6g}", f"{edges[i + 1]:.6g}", c])


def read_dequeue(path: Path) -> dict[str, dict[str, list[int]]]:
    """{link class: {"early"|"late": counts per bin of emulator.dequeue.bin_edges()}}; {} if the file is missing."""
    if not path.exists():
        return {}
    edges = dequeue.bin_edges()
    index = {f"{e:.6g}": i for i, e in enumerate(edges[:-1])}
    out: dict[str, dict[str, list[int]]] = {}
    for row in csv.DictReader(path.open()):
        hist = out.setdefault(row["link_class"], {s: [0] * (len(edges) - 1) for s in ("early", "late")})
        hist[row["side"]][index[row["error_lo"]]] += int(row["gaps"])
    return out


def dequeue_figures(paths: list[Path]) -> dict[str, dict]:
    """The histograms of `paths` added up per link class and summarized (``emulator.dequeue.summarize``)."""
    total: dict[str, dict[str, list[int]]] = {}
    for p in paths:
        for cls, hist in read_dequeue(p).items():
            acc = total.setdefault(cls, {s: [0] * len(c) for s, c in hist.items()})
            for side, counts in hist.items():
                for i, c in enumerate(counts):
                    acc[side][i] += c
    return {cls: dequeue.summarize(h) for cls, h in sorted(total.items())}


def queue_figures(links_csv: Path, net, time_scale: float) -> dict:
    """Per link class and direction, from a mode's links.csv: ``drops`` (all its links), ``dropped`` ({"<link>
    <dir>": drops} of those that dropped), ``backlog_mean_bytes`` (over links and samples),
    ``backlog_busiest_mean_bytes`` (the link with the highest mean), ``backlog_max_bytes``, the same three in
    real ms at the link's rate (``*_ms``), and ``queue_limit_bytes``. Backlog and drops are the leaf classes'
    (the root class 1:1 holds no queue)."""
    links = {f"{lk.host}-{lk.nic}": lk for lk in net.links}
    first: dict[tuple, int] = {}
    last: dict[tuple, int] = {}
    backlog: dict[tuple[str, str], dict[str, int]] = {}  # (link, dir) -> {t: bytes summed over leaves}
    for r in csv.DictReader(links_csv.open()):
        if r["tclass"] == "link":
            continue
        key = (r["link"], r["direction"], r["tclass"])
        first.setdefault(key, int(r["drops"]))
        last[key] = int(r["drops"])
        per_t = backlog.setdefault((r["link"], r["direction"]), {})
        per_t[r["t_s"]] = per_t.get(r["t_s"], 0) + int(r["backlog_bytes"])
    out: dict[str, dict] = {}
    for (link, direction), per_t in sorted(backlog.items()):
        lk = links[link]
        fig = out.setdefault(lk.link_class, {}).setdefault(direction, {
            "links": 0, "drops": 0, "dropped": {}, "_sum": 0, "_n": 0, "backlog_busiest_mean_bytes": 0.0,
            "backlog_max_bytes": 0, "queue_limit_bytes": queue_limit_bytes(lk.rate_bps, lk.queue_s, lk.skb_segs),
            "_rate": lk.rate_bps})
        drops = sum(last[k] - first[k] for k in last if k[:2] == (link, direction))
        fig["links"] += 1
        fig["drops"] += drops
        if drops:
            fig["dropped"][f"{link} {direction}"] = drops
        vals = list(per_t.values())
        fig["_sum"] += sum(vals)
        fig["_n"] += len(vals)
        fig["backlog_busiest_mean_bytes"] = max(fig["backlog_busiest_mean_bytes"], sum(vals) / len(vals))
        fig["backlog_max_bytes"] = max(fig["backlog_max_bytes"], max(vals))
    for per_dir in out.values():
        for fig in per_dir.values():
            fig["backlog_mean_bytes"] = round(fig.pop("_sum") / max(fig.pop("_n"), 1), 1)
            fig["backlog_busiest_mean_bytes"] = round(fig["backlog_busiest_mean_bytes"], 1)
            ms = 8 / fig.pop("_rate") / time_scale * 1000
            for k in ("backlog_mean", "backlog_busiest_mean", "backlog_max"):
                fig[f"{k}_ms"] = round(fig[f"{k}_bytes"] * ms, 3)
    return out


def lossless_drops(modes: dict[str, dict], fabric_classes: tuple[str, ...] = ("cnic",)) -> dict[str, int]:
    """{"<mode>: <link> <dir>": drops} of every link of the lossless compute fabric that dropped, over modes."""
    out = {}
    for mode, summary in modes.items():
        for cls in fabric_classes:
            for fig in summary.get("links", {}).get(cls, {}).values():
                out.update({f"{mode}: {k}": n for k, n in fig["dropped"].items()})
    return out

"""The serving plane inside a built emulation: daemons, the driver, samples and per-mode results.

For each mode of ``serving.modes`` (basic, dualpath, oracle) a fresh set of
daemons is started in the namespaces (storage servers with the agents'
existing context preloaded, one node daemon per compute node, the scheduler
and the workload driver on the control host), the driver plays the workload,
the HTB counters of every SNIC and CNIC are sampled every 100 ms of real time,
and the daemons are stopped again. Written per mode under ``<run>/<mode>/``:
``requests.csv`` (the driver's rows) and ``links.csv``; the caller merges the
per-mode summaries.

Ports: storage 7000 (storage fabric and management), node management 7100,
engine CNICs 7200, scheduler 7000 on the control host.
"""

from __future__ import annotations

import bisect
import csv
import dataclasses
import itertools
import json
import select
import shutil
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from daemons import costmodel
from daemons.kvbytes import KvGeometry
from daemons.lockstep import groups as lockstep_groups
from daemons.gpu import COLLECTIVE_COLUMNS
from emulator import dequeue
from emulator.monitor import ClassKey, TcSampler
from emulator.tcplan import DEFAULT_CLASS, LINK_CLASS
from scenarios.schema import trace_path
from topologies.cluster import CONTROL_HOST
from traffic.driver import preload_list
from traffic.traces import play
from traffic.workload import WorkloadSpec

from . import fabric, gpustats, linkstats, online, schedcfg, servecost

STORAGE_PORT, NODE_PORT, ENGINE_PORT, SCHED_PORT = 7000, 7100, 7200, 7000
COLLECTIVE_PORT = 7300  # an engine's collective endpoint, on its CNIC address
READY_TIMEOUT_S = 60.0
LINK_COLUMNS = ["t_s", "link", "link_class", "side", "direction", "tclass", "bytes", "packets", "drops",
                "backlog_bytes"]


@dataclass(frozen=True)
class ServingLayout:
    geom: KvGeometry
    model: costmodel.ModelSpec
    storage: list[tuple[str, str, str]]  # (host, storage-fabric addr:port, management addr:port)
    nodes: list[dict]  # scheduler's node entries: name, role, mgmt, cnics


def layout(plan) -> ServingLayout:
    sc, net = plan.scenario, plan.net
    model = costmodel.MODELS[sc.cluster.model]
    geom = KvGeometry.scaled(model.layers, sc.serving.block_tokens, costmodel.kv_bytes_per_token(model),
                             sc.scale.bytes)
    mgmt = {c.host: c.addr for c in net.control}
    storage = [(lk.host, f"{lk.addr}:{STORAGE_PORT}", f"{mgmt[lk.host]}:{STORAGE_PORT}")
               for lk in net.links if lk.link_class == "stnic"]
    nodes = []
    for h in net.hosts:
        if h.role not in ("pe", "de"):
            continue
        cnics = sorted((lk for lk in net.links_of(h.name) if lk.link_class == "cnic"),
                       key=lambda lk: int(lk.nic.removeprefix("cnic")))  # engine i = GPU i = cnic i
        nodes.append({"name": h.name, "role": h.role, "mgmt": f"{mgmt[h.name]}:{NODE_PORT}",
                      "cnics": [f"{lk.addr}:{ENGINE_PORT}" for lk in cnics]})
    return ServingLayout(geom, model, storage, nodes)


def daemon_argvs(plan, mode_dir: Path, python: str = sys.executable) -> list[tuple[str, str, list[str]]]:
    """(what, namespace, argv) of every daemon of one mode: storage servers, node daemons, the scheduler.
    The same for the run and for `dpemu plan`; files named here live in `mode_dir`."""
    sc, net = plan.scenario, plan.net
    lay = layout(plan)
    geom_args = ["--layers", str(lay.geom.layers), "--block-tokens", str(lay.geom.block_tokens),
                 "--block-bytes", str(lay.geom.block_bytes)]
    dscp_kv = str(sc.traffic_classes.dscp_kv)  # every KV byte is marked, isolation on or off
    out = []
    for i, (host, data_addr, mgmt_addr) in enumerate(lay.storage):
        out.append((f"storage {host}", net.host(host).netns, [
            python, "-m", "daemons.storage", "--listen", f"{data_addr},{mgmt_addr}",
            "--dir", str(mode_dir / "storage" / host), *geom_args, "--server-index", str(i),
            "--servers", str(len(lay.storage)), "--preload", str(mode_dir / "preload.json"), "--dscp", dscp_kv]))
    storage_addrs = ",".join(a for _, a, _ in lay.storage)
    buffer_bytes = max(1, round(sc.cluster.dram_buffer * sc.scale.bytes))
    groups = {role: [f"{c.rsplit(':', 1)[0]}:{COLLECTIVE_PORT}" for n in lay.nodes if n["role"] == role
                     for c in n["cnics"]] for role in ("pe", "de")}
    def rcvbuf(host: str) -> list[str]:
        snic = next(lk for lk in net.links_of(host) if lk.link_class == "snic")
        size = net.rcvbuf_bytes(host, snic.switch)
        return [] if size is None else ["--storage-rcvbuf", str(size)]

    lockstep = _lockstep(plan, lay, mode_dir)
    for n in lay.nodes:
        coll = ["--collective-group", ",".join(groups[n["role"]]), "--dscp-collective",
                str(sc.traffic_classes.dscp_collective), "--byte-scale", str(sc.scale.bytes),
                "--collectives-out", str(mode_dir / f"collectives-{n['name']}.csv")] if sc.serving.collectives else []
        out.append((f"node {n['name']}", net.host(n["name"]).netns, [
            python, "-m", "daemons.node", "--name", n["name"], "--role", n["role"], "--mgmt", n["mgmt"],
            "--cnic", ",".join(n["cnics"]), "--storage", storage_addrs, "--model", lay.model.name, *geom_args,
            "--dram-buffer-bytes", str(buffer_bytes), "--time-scale", str(sc.scale.time), "--dscp-kv", dscp_kv,
            "--gpu-model", sc.cluster.gpu_model, "--gpu-out", str(mode_dir / f"gpu-{n['name']}.json"),
            *rcvbuf(n["name"]), *coll, *lockstep[n["name"]]]))
    ctl_addr = next(c.addr for c in net.control if c.host == CONTROL_HOST)
    out.append(("scheduler", net.host(CONTROL_HOST).netns, [
        python, "-m", "daemons.scheduler", "--listen", f"{ctl_addr}:{SCHED_PORT}",
        "--config", str(mode_dir / "scheduler.json")]))
    return out


def _lockstep(plan, lay: ServingLayout, mode_dir: Path) -> dict[str, list[str]]:
    """Per node, its lockstep flags: its engines' EP group @ host (--lockstep) and the groups it hosts
    (--lockstep-host). The prefill engines of an EP model, in (node, engine) order, form groups of the model's
    prefill EP width (all of them where there are fewer); each group's first node hosts its rendezvous, which
    writes lockstep-<group>.csv (daemons/lockstep.py)."""
    flags: dict[str, list[str]] = {n["name"]: [] for n in lay.nodes}
    if not (plan.scenario.serving.lockstep and lay.model.experts):
        return flags
    members: dict[str, list[str]] = {n: [] for n in flags}
    hosted: dict[str, list[str]] = {n: [] for n in flags}
    pe = [(n["name"], n["mgmt"]) for n in lay.nodes if n["role"] == "pe" for _ in n["cnics"]]
    for gi, group in enumerate(lockstep_groups(pe, lay.model.prefill_ep_gpus)):
        host, host_mgmt = group[0]
        hosted[host].append(f"pe{gi}:{len(group)}")
        for node, _ in group:  # in engine order within each node
            members[node].append(f"pe{gi}@{host_mgmt}")
    for n in flags:
        if members[n]:
            flags[n] += ["--lockstep", ",".join(members[n])]
        if hosted[n]:
            flags[n] += ["--lockstep-host", ",".join(hosted[n]), "--lockstep-out", str(mode_dir)]
    return flags


def driver_argv(plan, mode: str, mode_dir: Path, python: str = sys.executable) -> list[str]:
    """The workload driver of one mode (in the control host's namespace)."""
    sc, net = plan.scenario, plan.net
    ctl_addr = next(c.addr for c in net.control if c.host == CONTROL_HOST)
    return [python, "-m", "traffic.driver", "run", "--scheduler", f"{ctl_addr}:{SCHED_PORT}",
            "--workload", str(mode_dir / "workload.json"), "--block-tokens", str(sc.serving.block_tokens),
            "--layer-chunks", str(sc.serving.layer_chunks), "--time-scale", str(sc.scale.time), "--tag", f"{mode}-",
            "--out", str(mode_dir / "requests.csv")] + (
        ["--stop-after-window"] if sc.serving.workload.arrival_rate is not None and not sc.serving.workload.drain
        else [])


def stderr_path(mode_dir: Path, what: str) -> Path:
    """Where a daemon's stderr goes: a file in the mode's directory ("node pe1" -> node-pe1.stderr.log), so a
    chatty daemon never blocks on a pipe nobody reads, and its last words stay for the user."""
    return mode_dir / (what.replace(" ", "-") + ".stderr.log")


def wait_ready(proc, what: str, log: Path, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Wait up to `timeout_s` for a daemon's "ready" line; a daemon that exits or stays silent is an error that
    names it and quotes the end of its stderr."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        readable, _, _ = select.select([proc.stdout], [], [], max(0.0, left))
        if readable:
            line = proc.stdout.readline().split()
            if line and line[0] == "ready":
                return
            if line:  # some other output first: keep waiting for "ready"
                continue
            why = f"exited with code {proc.wait(timeout=5)}"
        elif left <= 0:
            why = f"was not ready after {timeout_s:g} s"
        else:
            continue
        tail = log.read_text(errors="replace")[-800:] if log.exists() else ""
        raise RuntimeError(f"{what} did not start: it {why}; its stderr ({log}): {tail.strip() or '(empty)'}")


def workload_spec(plan) -> WorkloadSpec:
    w = plan.scenario.serving.workload
    t = w.trace
    return WorkloadSpec(set_name=w.set, seed=w.seed, agents=w.agents, turns_per_agent=w.turns_per_agent,
                        append_scale=w.append_scale, gen_scale=w.gen_scale, arrival_rate_per_s=w.arrival_rate,
                        sampling=w.sampling, trace_file=None if t is None else str(trace_path(t.file)),
                        trace_requests=None if t is None else t.requests, trace_speed=1.0 if t is None else t.speed,
                        trace_skip=0 if t is None else t.skip)


def _workload_json(spec: WorkloadSpec) -> dict:
    return dataclasses.asdict(spec)


class LinkKey(NamedTuple):
    """What one sampled HTB class measures."""
    link: str        # "<host>-<nic>", e.g. "pe1-cnic0"
    link_class: str  # "snic", "cnic" or "stnic"
    side: str        # the host's role: "pe", "de" or "st"
    direction: str   # "up" (host -> switch) or "down" (switch -> host)
    tclass: str      # "link", "default" or a traffic class name (below)
    rate_bps: float  # the link's configured rate


def _link_keys(plan) -> dict[ClassKey, LinkKey]:
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


def _whole(keys: dict[ClassKey, LinkKey], link_class: str, direction: str, side: str | None = None
           ) -> list[ClassKey]:
    """The root classes (all the link's traffic) of one link class and direction, of one side or both."""
    return [k for k, v in keys.items() if (v.link_class, v.direction, v.tclass) == (link_class, direction, "link")
            and side in (None, v.side)]


def _drain(stream) -> tuple[threading.Thread, list[str]]:
    """Read a child's stream to its end in a thread (so a chatty stderr never blocks it): (reader, lines)."""
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(stream), daemon=True)
    reader.start()
    return reader, lines


def run_mode(emu, plan, mode: str, mode_dir: Path,
             progress: Callable[[str, int, int], None] = lambda *_: None) -> tuple[dict, tuple[float, float]]:
    """Run one mode; return its summary and the (start, end) of the driver's run. `progress(what, done,
    total)` is told every finished turn."""
    sc, net = plan.scenario, plan.net
    lay = layout(plan)
    spec = workload_spec(plan)
    py = sys.executable
    mode_dir.mkdir(parents=True)
    (mode_dir / "workload.json").write_text(json.dumps(_workload_json(spec)))
    preload = mode_dir / "preload.json"
    trajectories, starts = play(spec)
    preload.write_text(json.dumps(preload_list(trajectories, lay.geom.block_tokens)))
    sched_cfg = schedcfg.scheduler_config(sc, mode, lay.model, lay.nodes, trajectories)
    (mode_dir / "scheduler.json").write_text(json.dumps(sched_cfg, indent=1))
    ctl = net.host(CONTROL_HOST).netns
    procs = []
    logs = []
    monitor = None
    try:
        for what, netns, argv in daemon_argvs(plan, mode_dir, py):
            logs.append(stderr_path(mode_dir, what).open("w"))
            procs.append((what, emu.procs.start(what, netns, argv, stderr=logs[-1])))
        for what, proc in procs:
            wait_ready(proc, what, stderr_path(mode_dir, what))
        keys = _link_keys(plan)
        sampler = TcSampler(list(keys), period_s=0.1 * sc.scale.time)
        monitor = emu.dequeue_monitor(linkstats.serving_watch(net), on_s=1.0, off_s=3.0) \
            if dequeue.available() is None and sc.emulation.dequeue_timing else None
        driver = emu.procs.start("driver", ctl, driver_argv(plan, mode, mode_dir, py))
        sampler.start()
        reader, errors = _drain(driver.stderr)
        if driver.stdout.readline().strip() != "start":  # the driver's own start-up is not the workload
            driver.wait(timeout=30)
            reader.join(timeout=10)
            raise RuntimeError(f"workload driver did not start in mode {mode}: {''.join(errors)[-1500:]}")
        t0 = time.monotonic()
        cpu_before = servecost.snapshot(procs)
        total = sum(len(t.turns) for t in trajectories)
        out = ""
        for line in driver.stdout:  # "done N" per finished turn, then the summary
            if line.startswith("done "):
                progress(f"serving {mode}", int(line.split()[1]), total)
            else:
                out += line
        driver.wait()
        t1 = time.monotonic()
        cpu_after = servecost.snapshot(procs)
        reader.join(timeout=10)
        err = "".join(errors)
        sampler.stop()
        if monitor:
            linkstats.write_dequeue(mode_dir / "dequeue.csv", monitor.stop())
            monitor = None
        if driver.returncode != 0:
            raise RuntimeError(f"workload driver failed in mode {mode}: {err[-1500:]}")
        driver_summary = json.loads(out.strip().splitlines()[-1])
        status = emu.procs.start("status", ctl, [
            py, "-m", "daemons.status", "--nodes", ",".join(n["mgmt"] for n in lay.nodes),
            "--storage", ",".join(m for _, _, m in lay.storage),
            "--scheduler", f"{next(c.addr for c in net.control if c.host == CONTROL_HOST)}:{SCHED_PORT}"])
        s_out, s_err = status.communicate(timeout=60)
        if status.returncode != 0:
            raise RuntimeError(f"status collection failed: {s_err[-800:]}")
        status_out = json.loads(s_out)
        ledger = status_out["ledger"]
    finally:
        if monitor:
            monitor.stop()
        for _, proc in procs:
            emu.procs.stop(proc)
        for log in logs:
            log.close()
        # the storage servers' block files are scratch (derived contents, ~85 MB a mode in the headline):
        # what they held is in the ledger and the storage stats, so they do not pile up run after run
        shutil.rmtree(mode_dir / "storage", ignore_errors=True)
    _write_links(mode_dir / "links.csv", sampler, keys, t0, sc.scale.time)
    rows = list(csv.DictReader((mode_dir / "requests.csv").open()))
    summary = _summarize(rows, sampler, keys, t0, t1, driver_summary, ledger, sc.scale.time,
                         sc.serving.balance_window)
    summary["links"] = linkstats.queue_figures(mode_dir / "links.csv", net, sc.scale.time)
    summary["cost"] = servecost.figures(cpu_before, cpu_after, driver_summary.get("cpu_s"), len(rows), t1 - t0,
                                        status_out)
    summary["dequeue"] = linkstats.dequeue_figures([mode_dir / "dequeue.csv"])
    if not spec.offline:  # Poisson agents, or a trace's arrivals (its mean rate)
        rate = spec.arrival_rate_per_s or round(len(starts) / max(max(starts), 1e-9), 4)
        summary["online"] = {"arrival_rate": rate, **online.steady_state(rows)}
    summary["gpu"] = gpustats.merge_gpu(mode_dir, [n["name"] for n in lay.nodes])
    collective_bytes = 0
    if sc.serving.collectives:
        summary["collectives"] = _merge_collectives(mode_dir, [n["name"] for n in lay.nodes])
        collective_bytes = sum(c["bytes"] for c in summary["collectives"].values())
    summary["cnic_kv_gbps"] = _cnic_kv_gbps(sampler, keys, t0, t1, collective_bytes,
                                            sc.scale.bytes / sc.scale.time)
    return summary, (t0, t1)


def _cnic_kv_gbps(sampler: TcSampler, keys, t0: float, t1: float, collective_bytes: int,
                  rate_scale: float) -> float | None:
    """KV throughput over the compute fabric, real Gbit/s, averaged over the mode's JCT: every byte that
    crosses the fabric leaves one CNIC upwards, so it is the CNICs' upward wire bytes less the collectives'
    payload (what remains is KV, plus TCP/IP headers and gRPC framing: a few %). Isolation on or off alike."""
    moved = [sampler.delta(k, t0, t1) for k in _whole(keys, "cnic", "up")]
    moved = [m for m in moved if m is not None]
    if not moved:
        return None
    seconds = max(s for _, s in moved)
    kv = max(0, sum(b for b, _ in moved) - collective_bytes)
    return round(kv * 8 / seconds / rate_scale / 1e9, 2)


def _merge_collectives(mode_dir: Path, nodes: list[str]) -> dict:
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


def _write_links(path: Path, sampler: TcSampler, keys, t0: float, time_scale: float) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(LINK_COLUMNS)
        for s in sampler.samples:
            lk = keys[s.key]
            w.writerow([round((s.t_s - t0) / time_scale, 4), lk.link, lk.link_class, lk.side, lk.direction,
                        lk.tclass, s.bytes, s.packets, s.drops, s.backlog_bytes])


def _utils(sampler: TcSampler, keys, a: float, b: float, cls: str, direction: str) -> dict[str, float | None]:
    out = {}
    for side in ("pe", "de"):
        vals = [r / keys[k].rate_bps for k in _whole(keys, cls, direction, side)
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
    up, down = _utils(sampler, keys, a, b, "cnic", "up"), _utils(sampler, keys, a, b, "cnic", "down")
    measured = {"pe_up": up["pe"], "pe_down": down["pe"], "de_up": up["de"], "de_down": down["de"]}
    reads = {}
    for side in ("pe", "de"):
        rates = [sampler.rate_bps(k, a, b) for k in _whole(keys, "snic", "down", side)]
        reads[side] = sum(r for r in rates if r is not None)
    p, d = len(snics["pe"]), len(snics["de"])  # one SNIC per node
    g = sum(1 for v in cnics if v.side == "pe") // p
    out = fabric.compare(measured, reads["pe"], reads["de"], p, d, g, cnics[0].rate_bps, snics["pe"][0].rate_bps)
    peak: dict[str, float | None] = {}
    edges = [a + i * window_s for i in range(int((b - a) / window_s) + 1)]
    for lt in fabric.LINK_TYPES:
        side, direction = lt.split("_")
        utils = [r / keys[k].rate_bps for k in _whole(keys, "cnic", direction, side)
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
    for k in _whole(keys, "snic", "down"):
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


def _summarize(rows, sampler, keys, t0, t1, driver_summary, ledger, time_scale: float,
               window_s: float) -> dict:
    span = t1 - t0
    a, b = t0 + 0.1 * span, t0 + 0.9 * span  # the middle 80% of the mode's JCT
    ttft = sorted(float(r["ttft_s"]) for r in rows)
    tpot = sorted(float(r["tpot_s"]) for r in rows)
    return {
        "jct_s": round(driver_summary["jct_s"], 3), "requests": len(rows),
        "paths": {p: sum(1 for r in rows if r["path"] == p) for p in ("pe", "de", "split", "none")},
        "snic_util": _utils(sampler, keys, a, b, "snic", "down"),  # storage -> node: reads
        "cnic_util": _utils(sampler, keys, a, b, "cnic", "down"),  # KV arriving at PE GPUs / DE buffers
        "ttft_s": {"p50": online.percentile(ttft, 50), "p99": online.percentile(ttft, 99)},
        "tpot_s": {"p50": online.percentile(tpot, 50), "p99": online.percentile(tpot, 99)},
        "ledger": ledger,
        "snic_balance": snic_balance(sampler, keys, a, b, window_s * time_scale),
        "fabric": fabric_figures(sampler, keys, t0, t1, window_s * time_scale),
    }

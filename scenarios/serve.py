"""The serving plane inside a built emulation: daemons, the driver, samples and per-mode results.

For each mode of ``serving.modes`` (basic, dualpath, oracle) a fresh set of
daemons is started in the namespaces (storage servers with the agents'
existing context preloaded, one node daemon per compute node, the scheduler
and the workload driver on the control host), the driver plays the workload,
the HTB counters of every SNIC and CNIC are sampled every 100 ms of real time,
and the daemons are stopped again. Written per mode under ``<run>/<mode>/``:
``requests.csv`` (the driver's rows) and ``links.csv``; the caller merges the
per-mode summaries.

Ports: storage 7000 (storage fabric: Read, Write; management: Stats), node
management 7100, engine CNICs 7200, scheduler 7000 on the control host. Every
daemon keeps its ledger in ``<mode>/ledger/<daemon>.bin``; the mode's ledger is
summed from those files, so a daemon killed by a fault still counts.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import select
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from daemons import costmodel
from daemons.kvbytes import KvGeometry
from daemons.lockstep import groups as lockstep_groups
from emulator import dequeue
from scenarios.schema import trace_path
from topologies.cluster import CONTROL_HOST
from traffic.driver import preload_list
from traffic.traces import play
from traffic.workload import WorkloadSpec

from . import faults, gpustats, linkstats, modestats, online, schedcfg, servecost

STORAGE_PORT, NODE_PORT, ENGINE_PORT, SCHED_PORT = 7000, 7100, 7200, 7000
COLLECTIVE_PORT = 7300  # an engine's collective endpoint, on its CNIC address
READY_TIMEOUT_S = 60.0


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
    replicas = str(sc.cluster.storage.replicas)
    for i, (host, data_addr, mgmt_addr) in enumerate(lay.storage):
        out.append((f"storage {host}", net.host(host).netns, [
            python, "-m", "daemons.storage", "--listen", data_addr, "--mgmt", mgmt_addr,
            "--dir", str(mode_dir / "storage" / host), *geom_args, "--server-index", str(i),
            "--servers", str(len(lay.storage)), "--replicas", replicas, "--preload", str(mode_dir / "preload.json"),
            "--dscp", dscp_kv, "--ledger-file", str(ledger_path(mode_dir, f"storage {host}"))]))
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
            "--cnic", ",".join(n["cnics"]), "--storage", storage_addrs, "--storage-replicas", replicas,
            "--ledger-file", str(ledger_path(mode_dir, f"node {n['name']}")), "--model", lay.model.name, *geom_args,
            "--dram-buffer-bytes", str(buffer_bytes), "--time-scale", str(sc.scale.time), "--dscp-kv", dscp_kv,
            "--gpu-model", sc.cluster.gpu_model, "--gpu-out", str(mode_dir / f"gpu-{n['name']}.json"),
            *rcvbuf(n["name"]), *coll, *lockstep[n["name"]]]))
    ctl_addr = next(c.addr for c in net.control if c.host == CONTROL_HOST)
    out.append(("scheduler", net.host(CONTROL_HOST).netns, [
        python, "-m", "daemons.scheduler", "--listen", f"{ctl_addr}:{SCHED_PORT}",
        "--config", str(mode_dir / "scheduler.json"), "--events", str(mode_dir / "scheduler-events.json")]))
    return out


def ledger_path(mode_dir: Path, what: str) -> Path:
    """Where a daemon keeps its ledger ("node pe1" -> <mode>/ledger/node-pe1.bin)."""
    return mode_dir / "ledger" / (what.replace(" ", "-") + ".bin")


def lockstep_members(plan, lay: ServingLayout) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Per node, its engines' EP group @ host ("pe0@10.9.1.1:7100" per engine) and the groups it hosts
    ("pe0:16"). The prefill engines of an EP model, in (node, engine) order, form groups of the model's prefill
    EP width (all of them where there are fewer); each group's first node hosts its rendezvous, which writes
    lockstep-<group>.csv (daemons/lockstep.py)."""
    members: dict[str, list[str]] = {n["name"]: [] for n in lay.nodes}
    hosted: dict[str, list[str]] = {n["name"]: [] for n in lay.nodes}
    if not (plan.scenario.serving.lockstep and lay.model.experts):
        return members, hosted
    pe = [(n["name"], n["mgmt"]) for n in lay.nodes if n["role"] == "pe" for _ in n["cnics"]]
    for gi, group in enumerate(lockstep_groups(pe, lay.model.prefill_ep_gpus)):
        host, host_mgmt = group[0]
        hosted[host].append(f"pe{gi}:{len(group)}")
        for node, _ in group:  # in engine order within each node
            members[node].append(f"pe{gi}@{host_mgmt}")
    return members, hosted


def _lockstep(plan, lay: ServingLayout, mode_dir: Path) -> dict[str, list[str]]:
    """Per node, its lockstep flags (--lockstep, --lockstep-host)."""
    members, hosted = lockstep_members(plan, lay)
    flags: dict[str, list[str]] = {n: [] for n in members}
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


def _drain(stream) -> tuple[threading.Thread, list[str]]:
    """Read a child's stream to its end in a thread (so a chatty stderr never blocks it): (reader, lines)."""
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(stream), daemon=True)
    reader.start()
    return reader, lines


def start_plane(emu, plan, mode: str, mode_dir: Path, trajectories, procs: list, logs: list,
                preload: bool = True) -> None:
    """Start one mode's daemons (storage servers, node daemons, the scheduler) and wait until each is ready.
    The storage servers hold the `trajectories`' earlier context when `preload`, nothing otherwise (an idle
    plane); the scheduler's beta comes from the `trajectories` either way. Appends (what, Popen) to `procs` and
    each daemon's open stderr log to `logs` as they start, so the caller stops what started even when a later
    one fails."""
    lay = layout(plan)
    (mode_dir / "preload.json").write_text(json.dumps(
        preload_list(trajectories, lay.geom.block_tokens) if preload else []))
    members, _ = lockstep_members(plan, lay)
    sched_cfg = schedcfg.scheduler_config(plan.scenario, mode, lay.model,
                                          [{**n, "lockstep": members[n["name"]]} for n in lay.nodes], trajectories)
    (mode_dir / "scheduler.json").write_text(json.dumps(sched_cfg, indent=1))
    (mode_dir / "ledger").mkdir()
    started = len(procs)
    emu.push(mode_dir)  # the other servers' daemons read and write their own copy of the mode's directory
    for what, netns, argv in daemon_argvs(plan, mode_dir, sys.executable):
        logs.append(stderr_path(mode_dir, what).open("w"))
        procs.append((what, emu.procs.start(what, netns, emu.there(netns, argv, mode_dir), stderr=logs[-1])))
    for what, proc in procs[started:]:
        wait_ready(proc, what, stderr_path(mode_dir, what))


def stop_plane(emu, procs: list, logs: list, mode_dir: Path | None = None) -> None:
    """Stop the daemons `start_plane` started and close their logs; collect what the daemons on other servers
    wrote into `mode_dir` (their storage servers' block files stay there: scratch)."""
    for _, proc in procs:
        emu.procs.stop(proc)
    for log in logs:
        log.close()
    if mode_dir is not None:
        emu.pull(mode_dir, exclude=("storage",))


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
    trajectories, starts = play(spec)
    ctl = net.host(CONTROL_HOST).netns
    procs = []
    logs = []
    monitor = None
    mode_faults = [f for f in sc.faults if f.modes is None or mode in f.modes]
    injector = faults.Injector(plan, mode_faults, {}, mode_dir / "ledger", sc.scale.time)
    try:
        start_plane(emu, plan, mode, mode_dir, trajectories, procs, logs, preload=True)
        injector.procs.update(procs)
        keys = modestats.link_keys(plan)
        sampler = emu.tc_sampler(list(keys), period_s=0.1 * sc.scale.time)
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
        injector.start(t0)
        here = [(what, p) for what, p in procs if p.pid not in emu.procs.remote_pids]  # CPU is read here only
        cpu_before = servecost.snapshot(here)
        total = sum(len(t.turns) for t in trajectories)
        out = ""
        for line in driver.stdout:  # "done N" per finished turn, then the summary
            if line.startswith("done "):
                progress(f"serving {mode}", int(line.split()[1]), total)
            else:
                out += line
        driver.wait()
        t1 = time.monotonic()
        injector.stop()  # before the status calls: a stopped daemon continues, a downed link comes up
        cpu_after = servecost.snapshot(here)
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
        try:
            s_out, s_err = status.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            emu.procs.stop(status)
            raise RuntimeError("status collection did not answer within 120 s") from None
        if status.returncode != 0:
            raise RuntimeError(f"status collection failed: {s_err[-800:]}")
        status_out = json.loads(s_out)
    finally:
        injector.stop()
        if monitor:
            monitor.stop()
        stop_plane(emu, procs, logs, mode_dir)
        # the storage servers' block files are scratch (derived contents, ~85 MB a mode in the headline):
        # what they held is in the ledger and the storage stats, so they do not pile up run after run
        shutil.rmtree(mode_dir / "storage", ignore_errors=True)
    ledger = faults.ledger_now(mode_dir / "ledger")  # every daemon's, a killed one's included
    modestats.write_links(mode_dir / "links.csv", sampler, keys, t0, sc.scale.time)
    rows = list(csv.DictReader((mode_dir / "requests.csv").open()))
    summary = modestats.summarize(rows, sampler, keys, t0, t1, driver_summary,
                                  {**ledger.as_dict(), "unchecked": ledger.unchecked}, sc.scale.time,
                                  sc.serving.balance_window)
    summary["failed"] = {"turns": driver_summary.get("failed", 0), "abandoned": driver_summary.get("abandoned", 0),
                         "unreachable_daemons": sorted(status_out.get("unreachable", []))}
    if mode_faults:
        summary["faults"] = faults.mode_effects(mode, mode_faults, injector.log, rows, mode_dir, t0, sc.scale.time,
                                                ledger)
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
        summary["collectives"] = modestats.merge_collectives(mode_dir, [n["name"] for n in lay.nodes])
        collective_bytes = sum(c["bytes"] for c in summary["collectives"].values())
    summary["cnic_kv_gbps"] = modestats.cnic_kv_gbps(sampler, keys, t0, t1, collective_bytes,
                                                     sc.scale.bytes / sc.scale.time)
    return summary, (t0, t1)

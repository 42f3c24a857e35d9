"""Run a scenario: preflight, build, calibrate, report, and always tear down.

The run owns the machine through :class:`emulator.registry.Registry` (lock +
manifest) and tears the emulation down in a ``finally``: on success, on an
exception anywhere inside, on Ctrl-C (SIGINT) and on SIGTERM/SIGHUP (turned
into an exception here). A SIGKILLed run leaves its manifest; the next run, or
``dpemu clean``, removes what it lists.

Results go to ``results/<scenario>/<run-id>/`` (see docs/results.md).
"""

from __future__ import annotations

import csv
import itertools
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from emulator import calibrate, cleanup, fidelity
from emulator.monitor import CpuSampler
from emulator.errors import DpemuError, PlatformError
from emulator.net import Emulation
from emulator.registry import Registry

from . import live, platform, results, serve, serverstats
from .plan import Plan, make_plan


class Interrupted(DpemuError):
    """The run was stopped by a signal; everything it built was removed."""


@dataclass
class RunOutcome:
    run_dir: Path
    summary: dict
    calibration: calibrate.Calibration


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _raise_on_signal(signum, _frame):
    raise Interrupted(f"stopped by {signal.Signals(signum).name}")


def new_run_id() -> str:
    """``YYYYmmdd-HHMMSS-<pid>``: the run directory's name, unique on this machine."""
    return time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"


def clean_leftovers(reg: Registry, say) -> None:
    """With the lock held: remove what a killed run left, and say so."""
    if reg.leftover():
        report = cleanup.clean(reg)
        say(f"removed leftovers of a killed run: {len(report.netns)} namespaces, "
            f"{len(report.links)} interfaces, {len(report.procs)} processes")


def teardown(emu: Emulation, say) -> None:
    """Tear the emulation down (signals deferred); PlatformError naming whatever could not be removed."""
    left = teardown_shielded(emu, say)
    if left:
        raise PlatformError(f"teardown could not remove: {', '.join(left)}; run `dpemu clean`")


def teardown_shielded(emu: Emulation, say) -> list[str]:
    """Tear down with stop signals deferred: a second Ctrl-C must not abort the
    removal of what the run built (every wait inside teardown is bounded)."""
    def _notice(signum, _frame):
        say(f"{signal.Signals(signum).name} received: still removing what the run built, please wait")

    old = {s: signal.signal(s, _notice) for s in STOP_SIGNALS}
    try:
        return emu.teardown()
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def run(plan: Plan, out_root: Path, say: Callable[[str], None] = print,
        progress: Callable[[str, int, int], None] = lambda *_: None, run_dir: Path | None = None) -> RunOutcome:
    """Execute `plan` into `run_dir` (default: a new ``out_root/<scenario>/<run id>``). Raises DpemuError
    subclasses; never leaves objects behind."""
    return run_group([(plan, run_dir)], out_root, say, progress)[0]


def same_network(a: Plan, b: Plan) -> bool:
    """Runs of these plans can share one build and one calibration."""
    return a.net == b.net and a.tests == b.tests and a.scenario.calibration == b.scenario.calibration


def run_group(items: Iterable[tuple[Plan, Path | None]], out_root: Path, say: Callable[[str], None] = print,
              progress: Callable[[str, int, int], None] = lambda *_: None,
              started: Callable[[int], None] = lambda _: None,
              done: Callable[[int, RunOutcome], None] = lambda *_: None) -> list[RunOutcome]:
    """Runs whose plans build the same network (``same_network``), on one build and one calibration: each
    run's serving in its own run directory (made when it starts), with the shared calibration and build in
    its summary. `started(i)` and `done(i, outcome)` are told as each run starts and finishes. `items` may be
    a generator that decides the next run from the outcomes so far (a capacity search); a list is checked
    whole before the build. The teardown time, known at the end, is written into every summary then.
    Raises DpemuError subclasses; never leaves objects behind."""
    checked = isinstance(items, list)  # a list is checked whole before the build; a generator run by run
    if checked:
        for plan, _ in items:
            check_same(items[0][0], plan)
    items_it = iter(items)
    try:
        head = next(items_it)
    except StopIteration:
        return []
    first = head[0]
    platform.require_root()
    platform.require_tools()
    run_id = new_run_id()
    outcomes: list[RunOutcome] = []
    pending: list[tuple[Plan, Path, dict | None]] = []  # finished runs, their summary written again at the end
    old = {s: signal.signal(s, _raise_on_signal) for s in STOP_SIGNALS}
    try:
        with Registry() as reg:
            clean_leftovers(reg, say)
            emu = Emulation(first.net, reg, run_id, log_dir=reg.dir)  # other servers' agents log there
            try:
                calib = build_calibrated(emu, first, say, progress)
                for i, (plan, run_dir) in enumerate(itertools.chain([head], items_it)):
                    if not checked:
                        check_same(first, plan)
                    started(i)
                    if run_dir is None:
                        run_dir = results.make_run_dir(out_root, plan.scenario.name,
                                                       run_id if i == 0 else f"{run_id}-{i}")
                    else:
                        run_dir.mkdir(parents=True, exist_ok=False)
                    results.write_provenance(run_dir, plan)
                    live.publish("run", run_id, run_dir, None, time.time())  # `dpemu top` watches it
                    serving = serve_modes(emu, plan, run_dir, say, progress) if plan.scenario.serving else None
                    if emu.reshape(first.net):  # a run that re-shaped the fabric leaves it as built
                        say("compute fabric re-shaped back to the plan")
                    summary = results.write_summary(run_dir, plan, calib, emu.build_s, None, serving, None)
                    pending.append((plan, run_dir, serving))
                    outcomes.append(RunOutcome(run_dir, summary, calib))
                    done(i, outcomes[-1])
            finally:
                live.withdraw()
                teardown(emu, say)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    for o, (plan, run_dir, serving) in zip(outcomes, pending, strict=True):
        if emu.spread:
            serving_cpu = (serving or {}).get("cpu", {}).get("servers")
            serverstats.write(run_dir, emu.spread.report(), calib.cpu_servers, serving_cpu)
        o.summary = results.write_summary(run_dir, plan, calib, emu.build_s, emu.teardown_s, serving, len(outcomes))
    return outcomes


def build_calibrated(emu: Emulation, plan: Plan, say, progress) -> calibrate.Calibration:
    """Build the emulation, calibrate its links, and leave TCP as serving sees it (lossless fabrics)."""
    sc = plan.scenario
    say(f"building {len(plan.net.hosts)} hosts, {len(plan.net.switches)} bridges, "
        f"{len(plan.net.links)} shaped links ({len(plan.tc_ops)} tc operations) "
        f"+ {len(plan.net.control)} management links")
    emu.build()
    _fault("after_build")
    say(f"built in {emu.build_s:.1f}s; calibrating {len(plan.tests)} test(s) in "
        f"{len(plan.rounds)} round(s) of {sc.calibration.duration:g}s")
    rounds = len(plan.rounds)
    calib = calibrate.run(emu, list(plan.tests), sc.calibration.duration, fidelity.KERNEL_BUDGET_BPS,
                          timing=sc.emulation.dequeue_timing,
                          progress=lambda i, rnd: progress(f"calibration round {i}: {len(rnd)} test(s)", i - 1,
                                                           rounds))
    progress("calibration", rounds, rounds)
    _fault("after_calibration")
    emu.lossless_tcp(True)  # serving sees the lossless fabrics; calibration measured the links
    return calib


def check_same(first: Plan, plan: Plan) -> None:
    """`plan` is valid and builds the network `first` built (so it can run on that build)."""
    plan.check()
    if not same_network(first, plan):
        raise ValueError(f"{plan.scenario.name}: not the same network as {first.scenario.name}")


def serve_modes(emu: Emulation, plan: Plan, run_dir: Path, say, progress) -> dict:
    """Every serving mode on the built cluster; the CPU is watched all along."""
    cpu = emu.cpu_sampler()  # every server's, where the cluster spans several
    cpu.start()
    modes, windows = {}, []
    names = list(plan.scenario.serving.modes)
    flipped = extra = None
    aborted = None
    try:
        for mode in plan.scenario.serving.modes:
            w = plan.scenario.serving.workload
            say(f"serving mode {mode}: " + (f"{w.agents} agents" if w.trace is None else
                                             f"trace replay, {w.trace.requests or 'all'} requests"))
            try:
                modes[mode], window = serve.run_mode(emu, plan, mode, run_dir / mode, progress)
            except DpemuError:  # interrupted, or the platform failed: the run stops here
                raise
            except Exception as exc:  # noqa: BLE001 - a daemon died, a call failed: the run goes on
                aborted = {"mode": mode, "error": str(exc)}       # to its summary with the modes that finished
                say(f"  {mode}: [red]did not finish[/]: {str(exc)[:300]}")
                break
            windows.append(window)
            failed = modes[mode]["failed"]["turns"]
            say(f"  {mode}: JCT {modes[mode]['jct_s']:.1f}s (real), {modes[mode]['requests']} turns"
                + (f", [red]{failed} failed[/]" if failed else ""))
        if plan.scenario.serving.isolation_compare and aborted is None:
            flipped = _flip_isolation(plan)
            name = f"dualpath-isolation-{'on' if flipped.scenario.traffic_classes.isolation else 'off'}"
            reshaped = sorted({a.link_class for a, b in zip(plan.net.links, flipped.net.links, strict=True) if a != b})
            say(f"serving mode dualpath again, compute fabric re-shaped: {name} "
                f"({emu.reshape(flipped.net)} interfaces); measuring {', '.join(reshaped)} links again")
            tests = [t for t in flipped.tests if t.targets[0].link.link_class in reshaped]
            emu.lossless_tcp(False)
            recal = calibrate.run(emu, tests, plan.scenario.calibration.duration, fidelity.KERNEL_BUDGET_BPS,
                                  timing=plan.scenario.emulation.dequeue_timing)
            emu.lossless_tcp(True)
            extra, window = serve.run_mode(emu, flipped, "dualpath", run_dir / name, progress)
            windows.append(window)
            names.append(name)
            say(f"  {name}: JCT {extra['jct_s']:.1f}s (real), {extra['requests']} turns")
    finally:
        cpu.stop()
        _write_cpu(run_dir / "cpu.csv", cpu, windows, names)
    # Judged while the workload runs (daemon start-up is not the emulation), over spans of
    # 0.5 s of REAL time: a CPU-starved wall second distorts real timing by 1/time_scale s.
    span_s = 0.5 * plan.scenario.scale.time
    out = {"modes": modes, "cpu": cpu.summary(windows, span_s=span_s)}
    if hasattr(cpu, "by_server"):
        out["cpu"]["servers"] = cpu.by_server(windows, span_s=span_s)
    if aborted:
        out["aborted"] = aborted
    if flipped is not None:
        out["reshaped"], out["recalibration"] = reshaped, recal
        out["extra_runs"] = {names[-1]: extra}
        out["isolation"] = results.isolation_comparison(plan.scenario.traffic_classes.isolation, modes, extra)
    return out


def _flip_isolation(plan: Plan) -> Plan:
    """The same plan with the compute fabric's traffic classes the other way (on <-> off)."""
    sc = plan.scenario
    flipped = sc.model_copy(update={"traffic_classes": sc.traffic_classes.model_copy(
        update={"isolation": not sc.traffic_classes.isolation})})
    return make_plan(flipped)


def _write_cpu(path: Path, cpu: CpuSampler, windows: list[tuple[float, float]], modes: list[str]) -> None:
    """The machine's busy fraction every sample (wall seconds since the first), with the mode running then."""
    if not cpu.samples:
        return
    t0 = cpu.samples[0][0]
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["t_s", "mode", "cpu_busy"])
        for t, u in cpu.samples:
            mode = next((m for m, (a, b) in zip(modes, windows) if a <= t <= b), "")
            w.writerow([f"{t - t0:.2f}", mode, f"{u:.3f}"])


def _fault(stage: str) -> None:
    """Test hook: DPEMU_FAULT=<stage> makes the run crash there (tests prove cleanup)."""
    if os.environ.get("DPEMU_FAULT") == stage:
        raise RuntimeError(f"injected fault at {stage} (DPEMU_FAULT)")

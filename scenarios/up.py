"""A cluster that stays up: ``dpemu up`` builds and calibrates it, starts its serving plane idle, takes loads,
and tears it all down on Ctrl-C, ``dpemu down`` or SIGTERM.

The owner process holds the registry's lock for the cluster's whole life, as a run does, and publishes it in
``live.json`` (scenarios/live.py). Its main thread owns the cluster: it alone starts and stops daemons (their
parent-death signal is tied to the thread that started them) and runs every load, one at a time, from a queue.
Loads come from the interactive prompt (a thread, scenarios/shell.py) and from ``dpemu load`` through a Unix
socket in /run/dpemu (a thread, :class:`LoadServer`), which speaks JSON lines: the request
``{"sets": [...]}``, then ``{"say": text}`` and ``{"progress": [what, done, total]}`` as the load goes, and
finally ``{"done": run_dir}`` or ``{"error": text}``.

A load is a run's serving on the live cluster: the same scenario with some keys set (a mode, a number of
agents...), served exactly as ``dpemu run`` serves a mode (fresh daemons with the load's earlier context in
storage), written as a run directory ``<cluster run dir>/load<k>/`` with its own ``summary.json``. Between loads
the idle plane runs again: the scenario's first mode's daemons with nothing in storage, so ``dpemu top`` shows a
serving plane at rest.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from emulator.errors import ConfigError, DpemuError
from emulator.net import Emulation
from emulator.registry import Registry
from traffic.traces import play

from . import live, platform, results, runner, schema, serve
from .plan import Plan, make_plan

#: `dpemu load` / the prompt's short keys, and the scenario keys they set
LOAD_KEYS = {"mode": "serving.modes", "modes": "serving.modes", "agents": "serving.workload.agents",
             "turns": "serving.workload.turns_per_agent", "seed": "serving.workload.seed",
             "set": "serving.workload.set", "policy": "serving.policy", "read_path": "serving.read_path",
             "rate": "serving.workload.arrival_rate", "gen_scale": "serving.workload.gen_scale",
             "append_scale": "serving.workload.append_scale"}
REQUEST_TIMEOUT_S = 10.0      # a client has this long to send its request line
SILENCE_TIMEOUT_S = 900.0     # a load that says nothing for this long is given up by its client


def load_sets(words: list[str]) -> list[str]:
    """``["mode=dualpath", "agents=32"]`` -> ``--set`` strings; a dotted key is a scenario key as is.
    Every bad word is named in one ConfigError."""
    out, problems = [], []
    for w in words:
        key, eq, value = w.partition("=")
        if not eq or not key or not value:
            problems.append(f"{w!r}: not KEY=VALUE (e.g. mode=dualpath agents=32)")
        elif key in ("mode", "modes"):
            out.append(f"serving.modes=[{value}]")
        elif key in LOAD_KEYS:
            out.append(f"{LOAD_KEYS[key]}={value}")
        elif "." in key:
            out.append(w)
        else:
            problems.append(f"{key!r}: no such load key; use {', '.join(LOAD_KEYS)} or a scenario key "
                            "(serving.workload.agents=32)")
    if problems:
        raise ConfigError("load", "\n  ".join(problems))
    return out


def load_plan(live_scenario: str, base: Plan, sets: list[str]) -> Plan:
    """The plan of a load: the live cluster's resolved scenario with `sets`; it must serve and build the same
    network (only serving keys may change)."""
    sc = schema.load(live_scenario, sets)
    if sc.sweep is not None:
        raise ConfigError("load", "a load is one run: it cannot set sweep keys")
    if sc.serving is None:
        raise ConfigError("load", "the scenario has no serving section: set serving.modes=[dualpath] to serve")
    plan = make_plan(sc)
    try:
        runner.check_same(base, plan)
    except ValueError:
        raise ConfigError("load", "these keys change the cluster's network or calibration, which a live "
                                  "cluster cannot change: a load may set serving.* keys only") from None
    return plan


@dataclass
class Load:
    """One load, queued for the owner's main thread."""
    plan: Plan
    say: Callable[[str], None]
    progress: Callable[[str, int, int], None]
    done: threading.Event = field(default_factory=threading.Event)
    run_dir: Path | None = None
    error: str | None = None


class Cluster:
    """The built, calibrated cluster of a ``dpemu up``: its idle plane and its loads (main thread only)."""

    def __init__(self, emu, plan: Plan, calib, run_dir: Path):
        self.emu, self.plan, self.calib, self.run_dir = emu, plan, calib, run_dir
        self.loads = 0
        self._procs: list = []
        self._logs: list = []
        self.jobs: queue.Queue[Load | None] = queue.Queue()  # None: go down
        self.busy = threading.Event()  # a load is running
        self.cancelled = threading.Event()  # Ctrl-C during the running load

    def start_idle(self) -> None:
        """The scenario's first mode's daemons, nothing in storage (no serving section: no plane)."""
        if self.plan.scenario.serving is None:
            return
        d = self.run_dir / "idle"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
        trajectories, _ = play(serve.workload_spec(self.plan))
        try:
            serve.start_plane(self.emu, self.plan, self.plan.scenario.serving.modes[0], d, trajectories,
                              self._procs, self._logs, preload=False)
        except BaseException:
            self.stop_idle()
            raise

    def stop_idle(self) -> None:
        serve.stop_plane(self.emu, self._procs, self._logs)
        self._procs, self._logs = [], []
        shutil.rmtree(self.run_dir / "idle" / "storage", ignore_errors=True)

    def interrupt(self) -> None:
        """Ctrl-C during a load (called in the signal handler): stop the load's processes, without waiting. The
        load's own code then sees its daemons or driver gone, says so, and returns: nothing is interrupted
        half-way inside Python (an exception raised at any instruction could leave a lock or a thread stuck)."""
        self.cancelled.set()
        self.emu.procs.signal_all(signal.SIGTERM)

    def run_load(self, load: Load) -> None:
        """Serve `load` as a run serves (fresh daemons per mode), into ``load<k>/``; the idle plane again after.
        Ctrl-C (``interrupt``) ends this load only; an Interrupted (SIGTERM) goes on up."""
        self.cancelled.clear()
        self.busy.set()
        try:
            self.loads += 1
            d = self.run_dir / f"load{self.loads}"
            d.mkdir()
            results.write_provenance(d, load.plan)
            self.stop_idle()
            serving = runner.serve_modes(self.emu, load.plan, d, load.say, load.progress)
            results.write_summary(d, load.plan, self.calib, self.emu.build_s, None, serving, None)
            if self.cancelled.is_set():
                load.error = f"interrupted by Ctrl-C; the cluster stays up (what the load finished: {d})"
            else:
                load.run_dir = d
        except runner.Interrupted:
            load.error = "the cluster went down during the load"
            raise
        except DpemuError as exc:
            load.error = str(exc)
        except Exception as exc:  # noqa: BLE001 - a load that fails leaves the cluster up, and says why
            load.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.busy.clear()
            load.done.set()
        if self.emu.reshape(self.plan.net):  # a load that re-shaped the fabric leaves it as built
            load.say("compute fabric re-shaped back to the plan")
        self.start_idle()

    def serve_forever(self) -> None:
        """Run loads from the queue until a None arrives (go down); signals arrive here (main thread)."""
        while True:
            try:
                job = self.jobs.get(timeout=0.5)  # a bounded wait, so that signal handlers run promptly
            except queue.Empty:
                continue
            if job is None:
                return
            self.run_load(job)


class LoadServer(threading.Thread):
    """``dpemu load``'s end of the Unix socket: one connection at a time, each one load."""

    def __init__(self, path: Path, cluster: Cluster, live_scenario: str):
        super().__init__(daemon=True, name="load-server")
        self.path, self.cluster, self.live_scenario = path, cluster, live_scenario
        self._closing = threading.Event()
        path.unlink(missing_ok=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        path.chmod(0o600)  # root's, as the cluster is
        self.sock.listen(4)
        self.sock.settimeout(0.5)

    def run(self) -> None:
        while not self._closing.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                self._handle(conn)

    def _handle(self, conn: socket.socket) -> None:
        alive = [True]

        def send(obj: dict) -> None:
            if alive[0]:
                try:
                    conn.sendall((json.dumps(obj) + "\n").encode())
                except OSError:  # the client went away; the load goes on, its results in its directory
                    alive[0] = False

        conn.settimeout(REQUEST_TIMEOUT_S)
        try:
            with conn.makefile("r") as f:
                request = json.loads(f.readline() or "null")
            sets = list(request["sets"])
        except (OSError, ValueError, TypeError, KeyError):
            send({"error": "bad request: expected one JSON line {\"sets\": [...]}"})
            return
        try:
            plan = load_plan(self.live_scenario, self.cluster.plan, sets)
        except DpemuError as exc:
            send({"error": str(exc)})
            return
        job = Load(plan, say=lambda text: send({"say": text}),
                   progress=lambda what, done, total: send({"progress": [what, done, total]}))
        if self.cluster.busy.is_set():
            send({"say": "another load is running: this one is queued after it"})
        self.cluster.jobs.put(job)
        while not job.done.wait(0.5):
            if self._closing.is_set():
                send({"error": "the cluster went down before the load finished"})
                return
        send({"done": str(job.run_dir)} if job.run_dir else {"error": job.error or "the load did not finish"})

    def close(self) -> None:
        self._closing.set()
        self.sock.close()
        self.join(timeout=5)
        self.path.unlink(missing_ok=True)


def request_load(path: str, sets: list[str], on_say: Callable[[str], None],
                 on_progress: Callable[[str, int, int], None]) -> Path:
    """Send a load to the live cluster at socket `path` and follow it: the finished load's run directory.
    Each answer must come within SILENCE_TIMEOUT_S (a mode reports every turn it finishes)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(REQUEST_TIMEOUT_S)
    try:
        sock.connect(path)
        sock.sendall((json.dumps({"sets": sets}) + "\n").encode())
        sock.settimeout(SILENCE_TIMEOUT_S)
        with sock.makefile("r") as f:
            for line in f:
                msg = json.loads(line)
                if "say" in msg:
                    on_say(msg["say"])
                elif "progress" in msg:
                    on_progress(*msg["progress"])
                elif "done" in msg:
                    return Path(msg["done"])
                elif "error" in msg:
                    raise DpemuError(f"the load failed: {msg['error']}")
    except TimeoutError:
        raise DpemuError(f"the live cluster said nothing for {SILENCE_TIMEOUT_S:g} s; the load's results, if "
                         "any, are under its run directory") from None
    except (ConnectionError, FileNotFoundError) as exc:
        raise live.NoCluster(f"cannot reach the live cluster at {path}: {exc}") from None
    finally:
        sock.close()
    raise DpemuError("the live cluster closed the connection before the load finished (did it go down?)")


def stop_owner(cluster: live.LiveCluster, timeout_s: float = 120.0) -> float:
    """SIGTERM the owner of a live cluster and wait (bounded) until it has torn down: the seconds it took."""
    t0 = time.monotonic()
    try:
        os.kill(cluster.owner_pid, signal.SIGTERM)
    except ProcessLookupError:
        return 0.0
    while cluster.alive():
        if time.monotonic() - t0 > timeout_s:
            raise DpemuError(f"dpemu up (pid {cluster.owner_pid}) did not go down within {timeout_s:g} s; "
                             "stop it with SIGKILL, then run `dpemu clean`")
        time.sleep(0.2)
    return time.monotonic() - t0


def own(plan: Plan, out_root: Path, say: Callable[[str], None], progress: Callable[[str, int, int], None],
        on_up: Callable[[Cluster], Callable[[], bool] | None]) -> dict:
    """Be the owner of a live cluster: build and calibrate `plan`'s cluster, start its idle plane and the load
    socket, publish it, call `on_up(cluster)` and run loads until told to go down (a None job, SIGTERM, SIGHUP,
    or SIGINT outside a load); then tear everything down, always. `on_up` may return `hold()`: while it is
    true a SIGINT is left to the prompt's foreground command (a ping). A SIGINT during a load ends that load
    only (``Cluster.interrupt``). Returns the cluster's summary (its calibration, build and teardown times)."""
    platform.require_root()
    platform.require_tools()
    plan.check()
    if plan.net.servers:
        raise ConfigError(plan.scenario.name, "servers: a live cluster runs on one machine (dpemu run spreads "
                                              "a cluster over several; docs/distributed.md)")
    run_id = runner.new_run_id()
    state: dict = {"cluster": None, "hold": lambda: False}

    def on_signal(signum, _frame):
        c = state["cluster"]
        if signum == signal.SIGINT and c is not None:
            if c.busy.is_set():
                c.interrupt()
                return
            if state["hold"]():
                return
        raise runner.Interrupted(f"stopped by {signal.Signals(signum).name}")

    old = {s: signal.signal(s, on_signal) for s in runner.STOP_SIGNALS}
    try:
        with Registry() as reg:
            runner.clean_leftovers(reg, say)
            emu = Emulation(plan.net, reg, run_id)
            server = cluster = None
            try:
                calib = runner.build_calibrated(emu, plan, say, progress)
                run_dir = results.make_run_dir(out_root, plan.scenario.name, run_id)
                results.write_provenance(run_dir, plan)
                results.write_summary(run_dir, plan, calib, emu.build_s, None, None, None)
                cluster = Cluster(emu, plan, calib, run_dir)
                if plan.scenario.serving is not None:
                    say(f"starting the serving plane, idle ({plan.scenario.serving.modes[0]} mode's daemons)")
                cluster.start_idle()
                server = LoadServer(live.socket_path(), cluster, str(run_dir / "scenario.yaml"))
                server.start()
                live.publish("up", run_id, run_dir, live.socket_path(), time.time())
                state["cluster"] = cluster
                state["hold"] = on_up(cluster) or state["hold"]
                try:
                    cluster.serve_forever()
                except runner.Interrupted as exc:  # Ctrl-C or `dpemu down`: how a live cluster is meant to end
                    say(f"{exc}: the cluster goes down")
            finally:
                state["cluster"] = None
                live.withdraw()
                if server is not None:
                    server.close()
                if cluster is not None:
                    cluster.stop_idle()
                runner.teardown(emu, say)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return results.write_summary(run_dir, plan, calib, emu.build_s, emu.teardown_s, None, None)

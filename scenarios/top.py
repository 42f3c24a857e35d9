"""``dpemu top``: a live view of the cluster live on this machine (a ``dpemu up``, or a ``dpemu run`` while it
runs). Per NIC (every shaped link, both ends): the rate each way in real units and as a bar of the configured
rate, the queue (wall KB, real ms) and the drops since top started, per traffic class where classes are on; per
node, turns reading, prefilling, decoding, and the scheduler's turns waiting (``daemons.statuswatch``, started
once in the control host's namespace and stopped, by its pid, when top exits). A refresh is one netlink pass
and no new process: top's CPU counts against the run's fidelity verdict. ``measure`` computes a frame and
``render`` draws it, so tests check numbers without a screen. top changes nothing; ``scenarios.cli`` calls
``add_parser``."""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import select
import signal
import sys
import termios
import threading
import time
import tty
from dataclasses import dataclass

from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from daemons.statuswatch import PlaneLoads, parse_line
from emulator.errors import ConfigError
from emulator.procs import ProcessGroup
from emulator.monitor import ClassKey, TcSampler, proc_cpu_s
from emulator.units import format_rate
from topologies.cluster import CONTROL_HOST

from . import live, modestats, platform, serve

CLASS_ORDER = ("snic", "cnic", "stnic")
Snapshot = dict[ClassKey, tuple[int, int, int, int]]  # {class: (bytes, packets, drops, backlog bytes)}


class ClusterGone(Exception):
    """The live cluster went away while top watched it (not an error: top says so and exits 0)."""


@dataclass(frozen=True)
class Flow:
    """One link x direction x traffic class over one refresh; tclass "link" is the whole link (its queue and
    drops: its leaf classes', the root class holds no queue). None: not measured this refresh."""
    link: str
    link_class: str
    direction: str            # "up" (host -> fabric) | "down" (fabric -> host)
    tclass: str               # "link", "default", "kv", "collective", ...
    rate_bps: float           # the link's configured wall rate
    wall_bps: float | None
    real_bps: float | None    # in the paper's units
    util: float | None        # wall bytes / configured wall rate
    backlog_bytes: int | None
    backlog_ms: float | None  # real ms at the link's rate
    drops_total: int | None   # since top started
    drops_new: int | None     # in this refresh


@dataclass(frozen=True)
class Frame:
    scenario: str
    kind: str
    run_id: str
    owner_pid: int
    uptime_s: float
    scale_bytes: float
    scale_time: float
    interval_s: float
    flows: list[Flow]
    serving: PlaneLoads
    top_cpu: float | None = None  # top and its watcher: cores busy over the refresh


def measure(keys: dict[ClassKey, modestats.LinkKey], prev: Snapshot, cur: Snapshot, dt_s: float,
            drops_before: dict[ClassKey, int], scale_bytes: float, scale_time: float
            ) -> tuple[list[Flow], dict[ClassKey, int]]:
    """Flows between two snapshots `dt_s` wall seconds apart, in the order of `keys` grouped by link class,
    and the drops counted so far per class (pass them to the next call). A class first seen in `cur` has no
    rate yet and its past drops are not counted; a counter that went down was reset (its class re-created):
    no rate this refresh, its drops count from zero."""
    per: dict[ClassKey, tuple] = {}  # classes in `cur`: wall bps, backlog, new drops, drops so far
    leaves: dict[tuple[str, str], list[int]] = {}  # (link, direction): the same summed over its leaf classes
    totals = dict(drops_before)
    for k, v in keys.items():
        if k not in cur:
            continue
        nbytes, _, drops, backlog = cur[k]
        old = prev.get(k)
        if old is None or nbytes < old[0] or drops < old[2]:  # first seen, or re-created
            wall, new = None, 0 if old is None else drops
        else:
            wall, new = (nbytes - old[0]) * 8 / dt_s if dt_s > 0 else None, drops - old[2]
        totals[k] = totals.get(k, 0) + new
        per[k] = (wall, backlog, new, totals[k])
        if v.tclass != "link":
            acc = leaves.setdefault((v.link, v.direction), [0, 0, 0])
            acc[0], acc[1], acc[2] = acc[0] + backlog, acc[1] + new, acc[2] + totals[k]
    flows = []
    for k, v in sorted(keys.items(), key=lambda kv: CLASS_ORDER.index(kv[1].link_class)):
        wall, backlog, new, total = per.get(k, (None, None, None, None))
        if v.tclass == "link":  # the whole link: its leaves' queues and drops (the root class holds no queue)
            backlog, new, total = leaves.get((v.link, v.direction), (None, None, None))
        flows.append(Flow(
            v.link, v.link_class, v.direction, v.tclass, v.rate_bps, wall,
            None if wall is None else wall * scale_time / scale_bytes,
            None if wall is None else wall / v.rate_bps, backlog,
            None if backlog is None else backlog * 8 / v.rate_bps / scale_time * 1000, total, new))
    return flows, totals


def _sum(vals) -> float | None:
    known = [v for v in vals if v is not None]
    return sum(known) if known else None


def fold(flows: list[Flow]) -> list[Flow]:
    """Each node's CNICs as one row ("pe1-cnic×8"): rates, queues and drops summed, utilization over the
    summed rate, the longest queue in ms; for clusters whose every NIC does not fit the screen."""
    groups: dict[tuple[str, str, str], list[Flow]] = {}
    for f in flows:
        name = f"{f.link.rsplit('-', 1)[0]}-cnic" if f.link_class == "cnic" else f.link
        groups.setdefault((name, f.direction, f.tclass), []).append(f)
    out = []
    for (name, direction, tclass), fs in groups.items():
        if len(fs) == 1:
            out.append(fs[0])
            continue
        rate, wall = sum(f.rate_bps for f in fs), _sum(f.wall_bps for f in fs)
        ms = [f.backlog_ms for f in fs if f.backlog_ms is not None]
        out.append(Flow(f"{name}×{len(fs)}", fs[0].link_class, direction, tclass, rate, wall,
                        _sum(f.real_bps for f in fs), None if wall is None else wall / rate,
                        _sum(f.backlog_bytes for f in fs), max(ms) if ms else None,
                        _sum(f.drops_total for f in fs), _sum(f.drops_new for f in fs)))
    return out


def watcher_argv(plan, period_s: float, python: str = sys.executable) -> list[str]:
    """The status watcher, in the control host's namespace (the management network is reachable only there)."""
    lay = serve.layout(plan)
    ctl = plan.net.host(CONTROL_HOST)
    ctl_addr = next(c.addr for c in plan.net.control if c.host == CONTROL_HOST)
    return ["ip", "netns", "exec", ctl.netns, python, "-m", "daemons.statuswatch",
            "--nodes", ",".join(f"{n['name']}={n['mgmt']}" for n in lay.nodes),
            "--scheduler", f"{ctl_addr}:{serve.SCHED_PORT}", "--period", f"{period_s:g}"]


class Counters(TcSampler):
    """TcSampler's netlink reads, once per refresh, keeping no history (top may run for hours)."""

    def __init__(self, keys: dict[ClassKey, modestats.LinkKey]):
        super().__init__(list(keys))
        try:
            self.setup()
        except (OSError, ValueError) as exc:  # a namespace, or an interface (link_lookup finds none), gone
            self.teardown()
            raise ClusterGone(f"{exc}") from exc

    def read(self) -> Snapshot:
        try:
            new = self.sample(time.monotonic())
        except OSError as exc:
            raise ClusterGone(f"{exc}") from exc
        self.samples.clear()
        return {c.key: (c.bytes, c.packets, c.drops, c.backlog_bytes) for c in new}


class StatusWatcher:
    """The ``daemons.statuswatch`` child (its own session: Ctrl-C is top's); threads keep its last line, stderr."""

    def __init__(self, argv: list[str]):
        self._group = ProcessGroup()  # its own session, and it dies with top (parent-death signal)
        self.proc = self._group.start("statuswatch", None, argv)
        self.latest: PlaneLoads | None = None
        self.err: collections.deque[str] = collections.deque(maxlen=3)
        threading.Thread(target=self._lines, daemon=True).start()
        threading.Thread(target=self._errors, daemon=True).start()

    def _lines(self) -> None:
        with contextlib.suppress(ValueError, OSError):  # the pipe closed by stop()
            for line in self.proc.stdout:
                with contextlib.suppress(ValueError):  # not a status line
                    self.latest = parse_line(line)

    def _errors(self) -> None:
        with contextlib.suppress(ValueError, OSError):  # the pipe closed by stop()
            self.err.extend(self.proc.stderr)

    def wait_running(self, timeout_s: float) -> None:
        """Until a line shows the serving plane running, or the timeout (between modes none will)."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end and self.proc.poll() is None and getattr(self.latest, "state", "") != "running":
            time.sleep(0.1)

    def loads(self) -> PlaneLoads:
        if self.proc.poll() is not None:
            why = " | ".join(e.strip() for e in self.err)[-200:]
            return PlaneLoads(f"status watcher exited ({self.proc.returncode}): {why}")
        return self.latest or PlaneLoads("starting the status watcher")

    def stop(self) -> None:
        """SIGTERM, SIGKILL 2 s later, by its process group (ours, not yet reaped: never a recycled one)."""
        self._group.stop(self.proc, grace_s=2.0)


class Session:
    """What top holds while it watches: counters, watcher, the last snapshot; `frame()` measures a refresh."""

    def __init__(self, lc: live.LiveCluster, interval_s: float):
        self.lc, self.interval_s, self.plan, self.watcher = lc, interval_s, lc.plan(), None
        if self.plan.net.servers:
            raise ConfigError("dpemu top", "this run is spread over several servers, and top reads one machine's "
                                           "counters; each server's figures are in the run's summary "
                                           "(docs/distributed.md)")
        self.keys = modestats.link_keys(self.plan)
        self.counters = Counters(self.keys)
        try:
            if self.plan.scenario.serving is not None:
                self.watcher = StatusWatcher(watcher_argv(self.plan, interval_s))
            self.prev, self.t_prev, self.totals, self.cpu_prev = self.counters.read(), time.monotonic(), {}, self._cpu()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.watcher:
            self.watcher.stop()
        self.counters.teardown()

    def _cpu(self) -> float | None:  # CPU seconds of top and its watcher so far
        mine, w = proc_cpu_s(os.getpid()), self.watcher
        theirs = proc_cpu_s(w.proc.pid) if w and w.proc.poll() is None else 0.0
        return None if mine is None or theirs is None else mine + theirs

    def frame(self) -> Frame:
        now = live.current()
        if now is None or (now.owner_pid, now.owner_start) != (self.lc.owner_pid, self.lc.owner_start):
            raise ClusterGone(f"dpemu {self.lc.kind} pid {self.lc.owner_pid} has ended")
        cur, t, cpu, sc = self.counters.read(), time.monotonic(), self._cpu(), self.plan.scenario.scale
        if not cur:  # every interface is gone (the dump of a deleted one is empty)
            raise ClusterGone("its interfaces are gone")
        flows, self.totals = measure(self.keys, self.prev, cur, t - self.t_prev, self.totals, sc.bytes, sc.time)
        busy = None if None in (cpu, self.cpu_prev) else max(0.0, cpu - self.cpu_prev) / (t - self.t_prev)
        self.prev, self.t_prev, self.cpu_prev = cur, t, cpu
        return Frame(self.plan.scenario.name, now.kind, now.run_id, now.owner_pid, time.time() - now.started_at,
                     sc.bytes, sc.time, self.interval_s, flows,
                     self.watcher.loads() if self.watcher else PlaneLoads("none (the scenario serves nothing)"), busy)


def bar(util: float | None, width: int = 10) -> Text:
    if util is None:
        return Text(" " * width + "    -")
    eighths = round(min(max(util, 0.0), 1.0) * width * 8)
    body = "█" * (eighths // 8) + ("▏▎▍▌▋▊▉"[eighths % 8 - 1] if eighths % 8 else "")
    return Text(body.ljust(width), "green" if util < 0.7 else "yellow" if util < 0.95 else "red") + f" {util:4.0%}"


def _rate(f: Flow | None) -> str:
    return "-" if f is None or f.real_bps is None else "0" if not f.real_bps else f"{format_rate(f.real_bps, 3)}/s"


def _queue(f: Flow | None) -> str:
    b = None if f is None else f.backlog_bytes
    return "-" if b is None else "0" if not b else f"{b / 1000:.1f}KB {f.backlog_ms:.1f}ms"


def _drops(up: Flow | None, down: Flow | None) -> Text:
    tot = "/".join("-" if f is None or f.drops_total is None else str(f.drops_total) for f in (up, down))
    new = sum(f.drops_new or 0 for f in (up, down) if f is not None)
    return Text(tot) + (Text(f" (+{new})", "red") if new else "")


NIC_COLS = (("class", -5), ("node/NIC", -13), ("up", 10), ("up / rate", -15), ("down", 10), ("down / rate", -15),
            ("queue up", 14), ("queue down", 14), ("drops", 12))
NODE_COLS = (("node", -6), ("role", -4), ("reading", 8), ("prefilling", 10), ("decoding", 8),
             ("read queue tokens", 17))


def _grid(cols: tuple[tuple[str, int], ...], rows: list) -> Text:
    """Fixed-width columns (a negative width: left-aligned) as one Text; rows: (cells, style), None a blank line.
    rich's Table measured and rendered every cell: 0.19 s of CPU a frame for the default cluster's 208 rows."""
    def line(cells, style: str = "") -> Text:
        out = Text(style=style)
        for cell, (_, w) in zip(cells, cols, strict=True):
            cell = Text(cell) if isinstance(cell, str) else cell.copy()
            cell.align("left" if w < 0 else "right", abs(w))
            out.append_text(cell + "  ")
        return out
    lines = [line([name for name, _ in cols], "bold"), Text("─" * sum(abs(w) + 2 for _, w in cols), "dim")]
    return Text("\n", no_wrap=True).join(lines + [Text("") if r is None else line(*r) for r in rows])


def render(frame: Frame, class_detail: bool = True, folded: bool = False) -> Group:
    """Header, NICs by link class (`class_detail`: a row per traffic class of a link with several), serving plane."""
    up_s, cpu = round(frame.uptime_s), "" if frame.top_cpu is None else f"; top's CPU {frame.top_cpu:.0%} of a core"
    head = Text.from_markup(
        f"[bold]dpemu top[/]  {frame.scenario}  run {frame.run_id} (dpemu {frame.kind}, pid {frame.owner_pid})  "
        f"up {up_s // 60}m{up_s % 60:02d}s = {frame.uptime_s / frame.scale_time:.0f} s real\n"
        f"scale: bytes x{frame.scale_bytes:g}, time x{frame.scale_time:g}; refresh {frame.interval_s:g}s{cpu}\n"
        "[dim]rates in real units; bar: wall bytes / configured rate; queue: wall KB, real ms at its rate; "
        "drops up/down since top began (+ last refresh)[/]\n")
    by: dict[tuple[str, str], dict[str, Flow]] = {}
    for f in fold(frame.flows) if folded else frame.flows:
        by.setdefault((f.link, f.tclass), {})[f.direction] = f
    leaves = collections.Counter(link for link, tclass in by if tclass != "link")
    rows, last = [], None
    for (link, tclass), d in by.items():
        leaf = tclass != "link"
        if leaf and not (class_detail and leaves[link] > 1):
            continue
        up, down = d.get("up"), d.get("down")
        lc = (up or down).link_class
        rows += [None] if last not in (None, lc) else []
        rows.append(([lc if lc != last else "", f"  {tclass}" if leaf else link, _rate(up), bar(up and up.util),
                      _rate(down), bar(down and down.util), _queue(up), _queue(down), _drops(up, down)],
                     "dim" if leaf else ""))
        last = lc
    nics, sv = _grid(NIC_COLS, rows), frame.serving
    if sv.state != "running":
        why = " (no daemon answers: before, between or after modes)" if sv.state == "not running" else ""
        return Group(head, nics, Text(f"\nserving plane: {sv.state}{why}"))
    sched = "-" if sv.waiting is None else f"{sv.waiting} waiting, {sv.running} running"
    nodes = _grid(NODE_COLS, [([n.name, *("-" if v is None else str(v) for v in (
        n.role, n.reading, n.prefilling, n.decoding, n.read_queue_tokens))],) for n in sv.nodes])
    return Group(head, nics, Text.from_markup(
        f"\nserving plane: turns in the scheduler: {sched}\n[dim]per node: reading = in its storage read queue, "
        "prefilling = on its prefill engines (reads included), decoding; - = no answer[/]\n"), nodes)


@contextlib.contextmanager
def _keys():
    """stdin (a terminal) in cbreak mode while top draws; yields `wait(seconds)`: True when q was pressed."""
    fd = sys.stdin.fileno() if sys.stdin.isatty() else None
    saved = None if fd is None else termios.tcgetattr(fd)

    def wait(seconds: float) -> bool:
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            if fd is None:
                time.sleep(left)
            elif select.select([fd], [], [], left)[0] and b"q" in os.read(fd, 64).lower():
                return True
        return False
    try:
        if fd is not None:
            tty.setcbreak(fd)
        yield wait
    finally:
        if fd is not None:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def cmd_top(args) -> int:
    if not 0.1 <= args.interval <= 3600:
        raise ConfigError("dpemu top --interval", f"{args.interval:g}: give seconds between 0.1 and 3600")
    platform.require_root()
    console, session = Console(highlight=False, width=None if sys.stdout.isatty() else 140), None

    def draw(f: Frame, height: int | None) -> Group:  # height: the screen's, when folding may be needed
        rows = len({(x.link, x.tclass) for x in f.flows if x.tclass == "link" or args.class_detail})
        too_tall = height is not None and rows + len(f.serving.nodes) + 12 > height
        return render(f, args.class_detail, args.fold == "yes" or (args.fold == "auto" and too_tall))

    handlers = {sig: signal.signal(sig, signal.default_int_handler)  # SIGTERM, SIGHUP: as Ctrl-C
                for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        session = Session(live.require(), args.interval)
        if args.once:
            time.sleep(args.interval)
            if session.watcher:  # its start (grpc's import, first connections) takes seconds on a busy machine
                session.watcher.wait_running(max(5.0, 2 * args.interval))
            console.print(draw(session.frame(), None))
            return 0
        with _keys() as wait:
            if sys.stdout.isatty():
                with Live(console=console, screen=True, auto_refresh=False) as screen:
                    while not wait(args.interval):
                        screen.update(draw(session.frame(), console.height), refresh=True)
            else:  # a pipe or a file: one frame after the other
                while not wait(args.interval):
                    console.print(draw(session.frame(), None), "")
    except ClusterGone as exc:
        console.print(f"dpemu top: cluster went down ({exc})")
    except KeyboardInterrupt:
        pass
    finally:
        if session is not None:
            session.close()
        for sig, h in handlers.items():
            signal.signal(sig, h)
    return 0


def add_parser(sub) -> None:
    t = sub.add_parser("top", help="a live view of the live cluster: NIC rates, queues, drops, the serving plane")
    t.add_argument("--interval", type=float, default=1.0, metavar="S", help="seconds between refreshes (default 1)")
    t.add_argument("--once", action="store_true", help="measure one interval, print a frame, exit (no full screen)")
    t.add_argument("--class-detail", action=argparse.BooleanOptionalAction, default=True,
                   help="a row per traffic class under each link that has traffic classes (default: on)")
    t.add_argument("--fold", choices=["auto", "yes", "no"], default="auto",
                   help="each node's CNICs as one row (auto: when every NIC does not fit the screen)")
    t.set_defaults(func=cmd_top)

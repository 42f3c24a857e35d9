"""Dequeue timing, in the way of Mininet-HiFi: does each packet leave a busy port when its rate says it should?

A rate counter can be exact while single packets leave early and late (HTB catches up on a late timer by
sending the next packets back to back). Mininet-HiFi's check (Handigol et al., CoNEXT 2012) records every
dequeue on a saturated link and compares each gap between dequeues, while the queue is not empty, with the
time the previous packet takes on the wire at the configured rate. This module does that with the kernel's
own tracepoints, in a tracefs instance of our own (``dp-dequeue``) so nothing else's tracing is touched:

- ``net:net_dev_queue`` (a skb handed to the device: its qdisc enqueue) and ``net:net_dev_start_xmit`` (the
  skb leaving the root qdisc for the driver: its dequeue), both filtered by interface name, which is unique
  across the run's namespaces (``qdisc:qdisc_dequeue`` carries only an ifindex, which is not);
- a gap counts when the next skb was already queued when the previous one left, with at least
  :data:`MIN_BACKLOG` skbs waiting then (a standing queue: the link is saturated, not just catching one skb);
- ideal gap = wire bytes of the previous skb x 8 / rate, wire bytes as HTB charges them: the skb's length
  plus one more header per extra GSO segment (Ethernet + IP + TCP, from the skb's own transport offset);
- error = gap / ideal - 1 (0: on time; -1: sent back to back, HTB spending its burst; 1: a gap twice the ideal,
  one skb late). The verdict judges the late side: 99% of busy gaps must be shorter than two ideal gaps
  (``emulator.fidelity``). Only skbs of at least
  :data:`MIN_WIRE_BYTES` set an ideal gap: a 66-byte ACK's ideal is a few microseconds, below what the trace's
  microsecond stamps resolve.

Tracing costs CPU in the kernel and in the parser, so it runs in a duty cycle (on ``on_s``, off ``off_s``)
over a few chosen interfaces. tracefs is mounted if it is not, and unmounted again only if we mounted it.
The caller (``scenarios``) picks the interfaces and judges the result; nothing here knows about serving.
"""

from __future__ import annotations

import bisect
import errno
import math
import os
import select
import subprocess
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from .names import PREFIX
from .tcplan import SEG_HEADER_BYTES

TRACEFS = Path("/sys/kernel/tracing")
INSTANCE = PREFIX + "dequeue"
MIN_WIRE_BYTES = 1000
MIN_BACKLOG = 2  # skbs still queued when the previous one left: a standing queue, not one skb that just arrived
STALE_S = 1.0  # an skb queued this long ago was dropped, not delayed (no queue here holds 1 s)
BUFFER_KB = 4096  # per CPU
_EVENTS = ("net/net_dev_queue", "net/net_dev_start_xmit")
TCP_HEADER_BYTES = SEG_HEADER_BYTES - 34  # TCP with timestamps; Ethernet 14 + IP 20 are the transport offset
# |error| thresholds of the CCDF that results keep: each is read at the histogram edge nearest it (within 0.3%)
CCDF_POINTS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
HIST_LO, HIST_HI, BINS_PER_DECADE = 1e-3, 1e2, 20


@dataclass(frozen=True)
class Watched:
    """One interface to time: its name, its configured rate, and the group whose CCDF it joins."""

    dev: str
    rate_bps: float
    group: str  # e.g. "snic down"


@dataclass
class _Port:
    rate_bps: float
    group: str
    queued: OrderedDict = field(default_factory=OrderedDict)  # skbaddr -> enqueue time
    last: tuple[float, int, int] | None = None  # (dequeue time, wire bytes, skbs left queued) of the previous skb
    max_segs: int = 0  # the most GSO segments seen in one skb (0: none had more than one)


def available() -> str | None:
    """None if the dequeue tracepoints can be used here, else why not."""
    if os.geteuid() != 0:
        return "dequeue timing needs root (tracefs)"
    if not Path("/proc/filesystems").read_text().count("tracefs"):
        return "this kernel has no tracefs"
    return None


def wire_bytes(length: int, transport_offset: int, gso_segs: int) -> int:
    """What HTB charges for a skb: its length, plus one header per GSO segment beyond the first."""
    if gso_segs <= 1 or transport_offset <= 0:
        return length
    return length + (gso_segs - 1) * (transport_offset + TCP_HEADER_BYTES)


class Timing:
    """The errors of every busy gap, per group; fed line by line (the parser, also used by tests)."""

    def __init__(self, watched: list[Watched]):
        self.ports = {w.dev: _Port(w.rate_bps, w.group) for w in watched}
        self.errors: dict[str, list[float]] = {w.group: [] for w in watched}
        self.lines = 0

    def feed(self, line: str) -> None:
        """One line of trace_pipe (split by position: a regex cost 13 us a line, too much at 60k lines/s)."""
        i = line.find(": net_dev_")
        if i < 0:
            return
        self.lines += 1
        t = float(line[line.rfind(" ", 0, i) + 1:i])
        f = line[i + 10:].split(" ")
        if f[0] == "queue:":  # queue: dev=X skbaddr=Y len=N
            port = self.ports.get(f[1][4:])
            if port is not None:
                port.queued.pop(f[2][8:], None)  # a reused address moves to the back: pruning looks at the front
                port.queued[f[2][8:]] = t
                if len(port.queued) > 4096:  # dropped skbs never leave; forget the oldest
                    port.queued.popitem(last=False)
            return
        if f[0] != "start_xmit:" or len(f) < 17:
            return
        port = self.ports.get(f[1][4:])  # dev=X queue_mapping= skbaddr= ... len= ... transport_offset= ... gso_segs=
        if port is None:
            return
        queued_at = port.queued.pop(f[3][8:], None)
        while port.queued and next(iter(port.queued.values())) < t - STALE_S:  # dropped: never dequeued
            port.queued.popitem(last=False)
        segs = int(f[16][9:])
        port.max_segs = max(port.max_segs, segs)
        wire = wire_bytes(int(f[9][4:]), int(f[13][17:]), segs)
        if port.last is not None and queued_at is not None and queued_at <= port.last[0] \
                and port.last[2] >= MIN_BACKLOG and port.last[1] >= MIN_WIRE_BYTES:
            ideal = port.last[1] * 8 / port.rate_bps
            self.errors[port.group].append((t - port.last[0]) / ideal - 1)
        port.last = (t, wire, len(port.queued))

    def pause(self) -> None:
        """Tracing stops: the next skb's gap would span the pause."""
        for port in self.ports.values():
            port.last = None
            port.queued.clear()


def bin_edges() -> list[float]:
    """Edges of the |error| histogram: 0, then BINS_PER_DECADE log bins from HIST_LO to HIST_HI, then infinity.
    Histograms add up across modes and runs; a percentile read off one is good to one bin (12%)."""
    n = BINS_PER_DECADE * round(math.log10(HIST_HI / HIST_LO))
    return [0.0] + [HIST_LO * 10 ** (i / BINS_PER_DECADE) for i in range(n + 1)] + [math.inf]


def histogram(errors: list[float]) -> dict[str, list[int]]:
    """Counts per bin of :func:`bin_edges` of the early gaps' |error| (``early``: shorter than the ideal, HTB
    spending its burst) and of the late gaps' error (``late``: the ideal or longer)."""
    edges = bin_edges()
    out = {"early": [0] * (len(edges) - 1), "late": [0] * (len(edges) - 1)}
    for e in errors:
        out["early" if e < 0 else "late"][max(0, bisect.bisect_right(edges, abs(e)) - 1)] += 1
    return out


def summarize(hist: dict[str, list[int]]) -> dict:
    """``gaps``; ``late_p99``: the 99th percentile of the signed error (how late the 1% latest gaps are, 0 when
    fewer than 1% are late); ``abs_p50/p90/p99``: percentiles of |error|; each percentile the upper edge of its
    bin; ``early``: the share of gaps shorter than ideal; ``ccdf``: the share of gaps whose |error| exceeds each
    of CCDF_POINTS, and ``late_ccdf`` the share later than each."""
    early, late = hist.get("early", []), hist.get("late", [])
    n = sum(early) + sum(late)
    if not n:
        return {"gaps": 0}
    edges = bin_edges()
    both = [a + b for a, b in zip(early, late, strict=True)]

    def q(counts: list[int], p: float, base: int = 0) -> float:
        need, seen = p / 100 * n - base, 0
        if need <= 0:
            return 0.0
        for i, c in enumerate(counts):
            seen += c
            if seen >= need:
                return round(min(edges[i + 1], HIST_HI * 10), 4)
        return round(HIST_HI * 10, 4)

    def above(counts: list[int], x: float) -> float:  # at the bin edge nearest x (within 0.3% of it)
        edge = min(edges[1:-1], key=lambda e: abs(math.log(e / x)))
        return round(sum(c for i, c in enumerate(counts) if edges[i] >= edge * (1 - 1e-9)) / n, 5)

    return {"gaps": n, "late_p99": q(late, 99, base=sum(early)), "abs_p50": q(both, 50), "abs_p90": q(both, 90),
            "abs_p99": q(both, 99), "early": round(sum(early) / n, 4),
            "ccdf": {f"{x:g}": above(both, x) for x in CCDF_POINTS},
            "late_ccdf": {f"{x:g}": above(late, x) for x in CCDF_POINTS}}


class DequeueMonitor:
    """Trace the watched interfaces in a duty cycle from :meth:`start` to :meth:`stop`."""

    def __init__(self, watched: list[Watched], on_s: float = 1.0, off_s: float = 2.0):
        self.watched = list(watched)
        self.on_s, self.off_s = on_s, off_s
        self.timing = Timing(self.watched)
        self.error: str | None = None
        self._mounted = False
        self._dir = TRACEFS / "instances" / INSTANCE
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._exited = threading.Event()  # set by the reader once trace_pipe is closed
        self.traced_s = 0.0

    # -- tracefs ---------------------------------------------------------------
    def _write(self, rel: str, text: str) -> None:
        (self._dir / rel).write_text(text)

    def _setup(self) -> None:
        if not (TRACEFS / "instances").is_dir():
            subprocess.run(["mount", "-t", "tracefs", "nodev", str(TRACEFS)], check=True, capture_output=True,
                           timeout=10)
            self._mounted = True
        remove_instance()  # a killed run's
        self._dir.mkdir()
        self._write("buffer_size_kb", str(BUFFER_KB))
        self._write("trace_clock", "mono")  # one clock for every CPU: a gap may start on one and end on another
        names = " || ".join(f'name == "{w.dev}"' for w in self.watched)
        for ev in _EVENTS:
            self._write(f"events/{ev}/filter", names)
            self._write(f"events/{ev}/enable", "1")
        self._write("tracing_on", "0")

    def _teardown(self) -> None:
        try:
            if self._dir.is_dir():
                self._write("tracing_on", "0")
                for ev in _EVENTS:
                    self._write(f"events/{ev}/enable", "0")
            remove_instance()
        finally:
            if self._mounted:
                subprocess.run(["umount", str(TRACEFS)], capture_output=True, timeout=10)
                self._mounted = False

    # -- the reader ------------------------------------------------------------
    def start(self) -> None:
        if not self.watched:
            return
        self._setup()
        self._thread = threading.Thread(target=self._run, daemon=True, name="dequeue-monitor")
        self._thread.start()

    def _run(self) -> None:
        try:
            fd = os.open(self._dir / "trace_pipe", os.O_RDONLY | os.O_NONBLOCK)
        except OSError as exc:
            self.error = f"dequeue tracing failed: {exc}"
            self._exited.set()
            return
        rest = ""
        try:
            on, switch_at = False, time.monotonic()
            on_since = switch_at
            while True:
                now = time.monotonic()
                stopping = self._stop.is_set()
                if stopping or now >= switch_at:
                    if on:
                        self._write("tracing_on", "0")
                        self.traced_s += now - on_since
                    if stopping:
                        break
                    on = not on
                    if on:
                        self._write("tracing_on", "1")
                        on_since = now
                    switch_at = now + (self.on_s if on else self.off_s)
                    if not on:
                        rest = self._drain(fd, rest)
                        self.timing.pause()
                select.select([fd], [], [], 0.2)
                rest = self._drain(fd, rest)
            self._drain(fd, rest)
        except OSError as exc:
            self.error = f"dequeue tracing failed: {exc}"
        finally:
            os.close(fd)
            self._exited.set()

    def _drain(self, fd: int, rest: str) -> str:
        while True:
            try:
                chunk = os.read(fd, 1 << 16)
            except OSError as exc:
                if exc.errno == errno.EAGAIN:
                    return rest
                raise
            if not chunk:
                return rest
            text = rest + chunk.decode(errors="replace")
            lines = text.split("\n")
            rest = lines.pop()
            for line in lines:
                self.timing.feed(line)

    def stop(self) -> dict[str, list[float]]:
        """Stop tracing, remove the instance; the errors of every busy gap, per group. Safe to call again after
        an interrupted call (the owner's teardown stops whatever an interrupted run left running): each step
        is done until it is done."""
        if self._thread is not None:
            self._stop.set()
            # our own event, not Thread.join/is_alive: a join interrupted by a signal can leave is_alive() False
            # while the reader still runs with trace_pipe open (and the instance then cannot be removed)
            if not self._exited.wait(timeout=15):
                self.error = "dequeue monitor did not stop within 15s"
        self._teardown()
        return self.timing.errors


def remove_instance() -> bool:
    """Remove our tracefs instance if one is left (a killed run's); True if there was one."""
    d = TRACEFS / "instances" / INSTANCE
    if not d.is_dir():
        return False
    try:
        (d / "tracing_on").write_text("0")
        for ev in _EVENTS:
            (d / "events" / ev / "enable").write_text("0")
    except OSError:
        pass
    d.rmdir()
    return True

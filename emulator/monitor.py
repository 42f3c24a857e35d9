"""Samplers: CPU use of the machine and per-class tc byte counters over time.

Both run in a background thread at a fixed period (default 100 ms), keep every
sample in memory, and stop when asked; the run turns them into links.csv rows,
achieved rates and the CPU part of the fidelity verdict. The tc sampler reads
HTB class counters through netlink; these count every byte HTB charged (one
Ethernet header per segment, even for GSO packets), which is what "on the
wire" means in dpemu. Interface counters would under-count GSO headers.
"""

from __future__ import annotations

import bisect
import os
import threading
import time
from dataclasses import dataclass

from pyroute2 import IPRoute

from .kernel import netlink
from .tcstats import ClassCounters


@dataclass(frozen=True)
class ClassKey:
    """One HTB class to watch: namespace (None = root), interface, class handle."""

    netns: str | None
    dev: str
    classid: int


@dataclass(frozen=True)
class ClassSample:
    t_s: float  # time.monotonic()
    key: ClassKey
    bytes: int
    packets: int
    drops: int
    backlog_bytes: int


def cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs, from the first line of /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])  # user..steal; guest time is already in user
    return total - idle, total


def proc_cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system, all threads, plus children it waited for) of a live process; None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")  # utime stime cutime cstime


class _Periodic(threading.Thread):
    def __init__(self, period_s: float):
        super().__init__(daemon=True)
        self.period_s = period_s
        self._stop_evt = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.setup()
            next_t = time.monotonic()
            while not self._stop_evt.is_set():
                self.sample(time.monotonic())
                next_t += self.period_s
                self._stop_evt.wait(max(0.0, next_t - time.monotonic()))
            self.sample(time.monotonic())
        except BaseException as exc:  # noqa: BLE001 - reported by stop()
            self.error = exc
        finally:
            self.teardown()

    def setup(self) -> None: ...

    def teardown(self) -> None: ...

    def sample(self, now: float) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        self._stop_evt.set()
        self.join(timeout=10)
        if self.is_alive():
            raise RuntimeError(f"{type(self).__name__} did not stop within 10s (stuck in a kernel call?)")
        if self.error is not None:
            raise RuntimeError(f"{type(self).__name__} failed: {self.error}") from self.error


class CpuSampler(_Periodic):
    """Busy fraction (0..1) of the whole machine per period."""

    def __init__(self, period_s: float = 0.1):
        super().__init__(period_s)
        self.samples: list[tuple[float, float]] = []  # (t_s, busy fraction of the last period)
        self._last: tuple[int, int] | None = None

    def sample(self, now: float) -> None:
        busy, total = cpu_times()
        if self._last is not None and total > self._last[1]:
            self.samples.append((now, (busy - self._last[0]) / (total - self._last[1])))
        self._last = (busy, total)

    def summary(self, windows: list[tuple[float, float]] | None = None, span_s: float = 0.5) -> dict:
        """Mean and max busy fraction inside `windows` (all samples if None);
        the max is taken over consecutive spans of `span_s`, not single samples."""
        pts = [(t, u) for t, u in self.samples if windows is None or any(a <= t <= b for a, b in windows)]
        if not pts:
            return {"cpu_util_mean": None, "cpu_util_max": None}
        per = max(1, round(span_s / self.period_s))
        spans = [pts[i:i + per] for i in range(0, len(pts), per)]
        return {"cpu_util_mean": sum(u for _, u in pts) / len(pts),
                "cpu_util_max": max(sum(u for _, u in sp) / len(sp) for sp in spans)}


class TcSampler(_Periodic):
    """Counters of a fixed set of HTB classes, every period (``start``/``stop``),
    or at chosen instants (``setup``, ``sample(now)`` ..., ``teardown``)."""

    def __init__(self, keys: list[ClassKey], period_s: float = 0.1, remote=None):
        """`remote(netns, dev)`: for an interface on another server, (its agent, that server's monotonic clock
        less ours); None for one here. Remote counters are read by the agent and stamped by its clock, moved to
        ours."""
        super().__init__(period_s)
        self.keys = list(keys)
        self._remote = remote
        self.samples: list[ClassSample] = []
        # per key, its samples sorted by time and their times (for bisect), built from `samples` on demand:
        # a run's figures ask for thousands of windows, and scanning every sample per window was quadratic
        self._by_key: dict[ClassKey, tuple[list[float], list[ClassSample]]] = {}
        self._indexed = 0
        self._counters: dict[str | None, ClassCounters] = {}
        self._index: dict[tuple[str | None, str], int] = {}

    def setup(self) -> None:
        """Resolve interface indexes (pyroute2, once) and open one lean counter socket per namespace."""
        for netns in {k.netns for k in self.keys if not self._elsewhere(k)}:
            ipr: IPRoute = netlink(netns)
            try:
                for key in self.keys:
                    if key.netns == netns and (netns, key.dev) not in self._index and not self._elsewhere(key):
                        (idx,) = ipr.link_lookup(ifname=key.dev)
                        self._index[(netns, key.dev)] = idx
            finally:
                ipr.close()
            self._counters[netns] = ClassCounters(netns)

    def _elsewhere(self, key: ClassKey) -> bool:
        return self._remote is not None and self._remote(key.netns, key.dev) is not None

    def teardown(self) -> None:
        for c in self._counters.values():
            c.close()

    def sample(self, now: float) -> list[ClassSample]:
        """Read every watched class once; each device's classes are stamped with
        the time of their own read (a pass over hundreds of classes takes tens
        of ms, which would otherwise skew short windows)."""
        del now  # stamps are per read, see above
        wanted: dict[tuple[str | None, str], dict[int, ClassKey]] = {}
        for key in self.keys:
            wanted.setdefault((key.netns, key.dev), {})[key.classid] = key
        new: list[ClassSample] = []
        remote: dict[int, tuple] = {}
        for (netns, dev), by_id in wanted.items():
            where = self._remote(netns, dev) if self._remote else None
            if where is not None:
                remote.setdefault(id(where[0]), (where, []))[1].append([netns, dev, sorted(by_id)])
                continue
            classes = self._counters[netns].dump(self._index[(netns, dev)])
            t_read = time.monotonic()
            for handle, key in by_id.items():
                if handle in classes:
                    nbytes, packets, drops, backlog = classes[handle]
                    new.append(ClassSample(t_read, key, nbytes, packets, drops, backlog))
        for (agent, offset), groups in remote.values():
            for netns, dev, t_read, classes in agent.call("counters", groups=groups):
                for handle, (nbytes, packets, drops, backlog) in classes.items():
                    new.append(ClassSample(t_read - offset, wanted[(netns, dev)][int(handle)], nbytes, packets,
                                           drops, backlog))
        self.samples += new
        return new

    def counts(self, key: ClassKey, t0: float, t1: float) -> tuple[int, int, float] | None:
        """(bytes, packets, seconds) that `key` sent between the samples nearest to t0 and t1. Packets are
        segments: HTB counts a GSO skb as its segments, each with its own headers in the bytes."""
        times, pts = self._series(key)
        if len(pts) < 2:
            return None
        a, b = pts[_nearest(times, t0)], pts[_nearest(times, t1)]
        if b.t_s <= a.t_s:
            return None
        return b.bytes - a.bytes, b.packets - a.packets, b.t_s - a.t_s

    def _series(self, key: ClassKey) -> tuple[list[float], list[ClassSample]]:
        """`key`'s samples in time order (ties in the order they were taken) and their times."""
        if self._indexed < len(self.samples):
            touched = set()
            for smp in self.samples[self._indexed:]:
                times, pts = self._by_key.setdefault(smp.key, ([], []))
                if times and smp.t_s < times[-1]:
                    touched.add(smp.key)
                times.append(smp.t_s)
                pts.append(smp)
            for k in touched:  # appended out of time order (only ever by hand): sort, stably
                pts = sorted(self._by_key[k][1], key=lambda smp: smp.t_s)
                self._by_key[k] = ([smp.t_s for smp in pts], pts)
            self._indexed = len(self.samples)
        return self._by_key.get(key, ([], []))

    def delta(self, key: ClassKey, t0: float, t1: float) -> tuple[int, float] | None:
        """(bytes, seconds) that `key` sent between the samples nearest to t0 and t1."""
        c = self.counts(key, t0, t1)
        return None if c is None else (c[0], c[2])

    def rate_bps(self, key: ClassKey, t0: float, t1: float) -> float | None:
        """Average wire rate of `key` between the samples nearest to t0 and t1."""
        d = self.delta(key, t0, t1)
        return None if d is None else d[0] * 8 / d[1]


def _nearest(times: list[float], t: float) -> int:
    """Index of the time nearest to t in sorted `times` (the earliest of equally near ones)."""
    i = bisect.bisect_left(times, t)
    if i == len(times):
        i -= 1
    if i > 0 and t - times[i - 1] <= times[i] - t:
        i = bisect.bisect_left(times, times[i - 1])  # the first of a run of equal times
    return i

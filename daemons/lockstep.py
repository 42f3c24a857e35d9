"""Lockstep: the GPUs of an expert-parallel group run each layer chunk of a forward together.

The DS models run expert parallelism with DP attention (paper section 7): each GPU of an EP group holds its
own requests, and all of them meet at every MoE layer's AllToAll, so no GPU gets past a layer before the
slowest one. A layer chunk of a forward therefore lasts its slowest engine's chunk, and the others wait in
bubbles. This is what the prefill engines' 300 ms attention quota exists to bound, and what the paper's
Fig. 14 measures: attention time max / avg across the GPUs of an EP group per forward (~1.06 with its
scheduler). Equal batches (Fig. 3's) pay nothing for lockstep; unequal ones pay the gap.

The rendezvous: the first node of each EP group hosts a :class:`LockstepGroup`; every engine of the group is a
:class:`LockstepMember` calling it on the management network. The messages carry times only, never KV (the
AllToAll's bytes are ``serving.collectives``). A member arrives when its next chunk is ready to compute (its
KV is on the GPU); the group's chunk starts once every engine of the current forward has arrived, and every
member sleeps until that start plus the slowest arrival's cost, on the host's monotonic clock. All namespaces
share one kernel's ``CLOCK_MONOTONIC``, so the RPC's latency is not added to GPU time.

Forwards: an engine that joins while the group is inside a forward (a chunk past its first) waits in the lobby
for the next forward, as a GPU cannot join a forward half way. An engine with no work leaves the group; the
others do not wait for it (on GPUs it runs an empty forward that costs nothing).
"""

from __future__ import annotations

import asyncio
import csv
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from daemons import dualpath_pb2 as pb

LOCKSTEP_DEADLINE_S = 300.0  # real seconds one chunk may wait for its group (a stalled member, a dead host)
# one row per group chunk, real seconds (lockstep-<group>.csv; docs/results.md)
LOCKSTEP_COLUMNS = ["t_s", "chunk", "members", "group_size", "chunk_s", "cost_max_s", "cost_mean_s", "waited_s",
                    "attention_max_s", "attention_sum_s"]


def groups(members: list, width: int) -> list[list]:
    """EP groups of `width` consecutive engines, in (node, engine) order; fewer engines make one group."""
    width = max(1, min(width, len(members)))
    return [members[i:i + width] for i in range(0, len(members), width)]


@dataclass
class Arrival:
    """One engine ready to compute one layer chunk: its own costs (wall seconds)."""
    chunk: int
    chunks: int
    cost_s: float                 # its own time for the chunk, as if its group had like batches
    attention_s: float
    parts: object | None = None   # its own share of each layer kind (costprofile.LayerParts), if the model splits
    pre_s: float = 0.0            # its own time before the layers (Basic's copy into HBM)
    layers: tuple[int, int] = (0, 0)  # (layer_first, layers) of the chunk
    go: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


def slowest(arrivals: list[Arrival], group_size: int) -> float:
    """The group's chunk time where the GPU model cannot split a layer: its slowest engine's own cost."""
    return max(a.cost_s for a in arrivals)


Combine = Callable[[list[Arrival], int], float]


class LockstepGroup:
    """The host's side: which engines are in the current forward, who has arrived, and one row per chunk."""

    def __init__(self, name: str, size: int, clock: Callable[[], float] = time.monotonic,
                 combine: Combine = slowest):
        self.name, self.size, self.clock, self.combine = name, size, clock, combine
        self.active: set[str] = set()         # engines in the current forward
        self.arrived: dict[str, Arrival] = {}
        self.joiners: dict[str, asyncio.Future] = {}  # asked to join inside a forward: wait for its end
        self.lobby: dict[str, Arrival] = {}   # arrived unjoined inside a forward (a late call): the next one
        self.at_boundary = True               # the last chunk ended every forward in it
        self.forward_end = clock()            # when the last chunk started ends
        self.seq: dict[str, int] = {}
        self.rows: list[tuple] = []
        self.t0 = clock()

    def _fresh(self, member: str, seq: int) -> None:
        if seq <= self.seq.get(member, -1):
            raise ValueError(f"lockstep {self.name}: call {seq} of {member} is older than its call "
                             f"{self.seq[member]}")
        self.seq[member] = seq

    def join(self, member: str, seq: int) -> asyncio.Future:
        """`member` has work: a future of (when it may form its batch, 0). At once where no forward runs (at the
        end of the last chunk, if that still runs); inside a forward, at that forward's end: a GPU starts its
        batch at a forward boundary, with every ready request it holds then."""
        self._fresh(member, seq)
        go = asyncio.get_running_loop().create_future()
        if member in self.active or self.at_boundary or not self.active:
            self.active.add(member)
            go.set_result((self.forward_end if self.at_boundary else self.clock(), 0.0))
        else:
            self.joiners[member] = go
        return go

    def arrive(self, member: str, seq: int, a: Arrival) -> asyncio.Future:
        """`member` is ready to compute chunk `a.chunk` of its forward: a future of (start, group chunk time)."""
        self._fresh(member, seq)
        for old in (self.arrived.pop(member, None), self.lobby.pop(member, None)):
            if old is not None:  # it gave up waiting (its deadline) and computed alone: this call replaces it
                old.go.cancel()
        if member in self.active or self.at_boundary:
            self.active.add(member)
            self.arrived[member] = a
        else:
            self.lobby[member] = a
        self._settle()
        return a.go

    def leave(self, member: str, seq: int) -> None:
        """`member` has no forward to run: the group stops waiting for it."""
        self._fresh(member, seq)
        self.active.discard(member)
        for waiting in (self.arrived, self.lobby):  # a dead member's (the scheduler retires it)
            if (old := waiting.pop(member, None)) is not None:
                old.go.cancel()
        self.joiners.pop(member, None)
        if not self.active:  # nobody left in the forward: it has ended
            self.at_boundary = True
            self._admit_joiners()
        self._settle()

    def _admit_joiners(self) -> None:
        for m, go in self.joiners.items():
            self.active.add(m)
            if not go.done():
                go.set_result((self.forward_end, 0.0))
        self.joiners.clear()

    def _settle(self) -> None:
        if self.lobby and (self.at_boundary or not self.active):
            self.at_boundary = True
            self.active |= self.lobby.keys()
            self.arrived.update(self.lobby)
            self.lobby.clear()
        if self.active and self.active <= self.arrived.keys():
            self._fire()
            if self.lobby and self.at_boundary:  # joiners wait for the continuing engines' next arrival
                self._settle()

    def _fire(self) -> None:
        now = self.clock()
        arrivals = list(self.arrived.values())
        try:
            cost = self.combine(arrivals, self.size)
        except Exception:  # noqa: BLE001 - arrivals the GPU model cannot combine (unlike chunks): the slowest
            cost = slowest(arrivals, self.size)
        own = [a.cost_s for a in arrivals]
        attention = [a.attention_s for a in arrivals]
        self.rows.append((now - self.t0, min(a.chunk for a in arrivals), len(arrivals), self.size, cost, max(own),
                          sum(own) / len(own), sum(max(0.0, cost - c) for c in own), max(attention), sum(attention)))
        for a in arrivals:
            if not a.go.done():
                a.go.set_result((now, cost))
        self.arrived = {}
        self.forward_end = now + cost
        self.at_boundary = all(a.chunk + 1 >= a.chunks for a in arrivals)
        if self.at_boundary:
            self._admit_joiners()

    def write_csv(self, path: str, time_scale: float) -> None:
        """One row per group chunk; the group runs on wall seconds, the file holds real ones (/ time scale)."""
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(LOCKSTEP_COLUMNS)
            w.writerows([round(r[0] / time_scale, 4), r[1], r[2], r[3], *(round(x / time_scale, 6) for x in r[4:])]
                        for r in self.rows)


Call = Callable[[pb.LockstepArrival, float], Awaitable[pb.LockstepGo]]


class LockstepMember:
    """One engine's side: arrive with a chunk's cost, get the seconds to sleep; leave when idle."""

    def __init__(self, group: str, member: str, arrive: Call, leave: Call, join: Call,
                 deadline_s: float = LOCKSTEP_DEADLINE_S, clock: Callable[[], float] = time.monotonic):
        self.group, self.member, self._arrive, self._leave, self._join = group, member, arrive, leave, join
        self.deadline_s, self.clock = deadline_s, clock
        self.seq = 0
        self.in_group = False
        self.waited_s = 0.0   # seconds slept beyond its own chunks' costs (the bubbles)
        self.timeouts = 0     # chunks that ran on their own cost because the group did not answer in time

    def _msg(self, **kw) -> pb.LockstepArrival:
        self.seq += 1
        return pb.LockstepArrival(group=self.group, member=self.member, seq=self.seq, **kw)

    async def chunk(self, chunk: int, chunks: int, cost_s: float, attention_s: float, parts=None,
                    pre_s: float = 0.0, layers: tuple[int, int] = (0, 0)) -> float:
        """Wait for the group's chunk to start; the seconds to sleep from now until it ends."""
        self.in_group = True
        msg = self._msg(chunk=chunk, chunks=chunks, cost_s=cost_s, attention_s=attention_s, pre_s=pre_s,
                        layer_first=layers[0], layers=layers[1])
        if parts is not None:
            msg.parts.CopyFrom(pb.LayerParts(dense=parts.dense, common=parts.common, normal=parts.normal,
                                             head=parts.head, tokens=parts.tokens))
        try:
            go = await self._arrive(msg, self.deadline_s)
        except Exception:  # noqa: BLE001 - the host did not answer: this engine computes on its own time
            self.timeouts += 1
            return cost_s
        self.waited_s += max(0.0, go.cost_s - cost_s)
        return max(0.0, go.start + go.cost_s - self.clock())

    async def join(self) -> None:
        """Before forming a batch from idle: wait for the group's next forward boundary."""
        if self.in_group:
            return
        self.in_group = True
        try:
            go = await self._join(self._msg(), self.deadline_s)
        except Exception:  # noqa: BLE001 - the host did not answer: its chunks will compute on their own time
            self.timeouts += 1
            return
        wait = go.start - self.clock()
        if wait > 0:
            self.waited_s += wait
            await asyncio.sleep(wait)  # the group's forward running on the GPUs: no batch can start before it ends

    async def leave(self) -> None:
        if not self.in_group:
            return
        self.in_group = False
        try:
            await self._leave(self._msg(), self.deadline_s)
        except Exception:  # noqa: BLE001 - its next arrival re-joins it; until then the host waits for it
            self.timeouts += 1

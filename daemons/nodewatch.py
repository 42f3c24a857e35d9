"""The scheduler's view of its nodes: their storage read queues as the nodes report them, and which are alive.

The paper's scheduler compares the nodes' storage read queues (section 5). Each node reports its own in
``Status``: ``read_queue_tokens``, the tokens of the requests it has taken and not yet read, and
``read_tokens``, every token it has ever taken. While turns are in flight every node is asked every
``period_s``. The scheduler counts every token it places on a node to read (``placed``); what it placed and the
node had not yet taken when it answered is on its way (a Prefill or Fetch in flight) and is added to the
report: queue = reported + placed - taken. So a burst placed between two reports does not land on one side.
(A turn whose reader died before it arrived stays counted as on its way to that node; the dead node is out.)

A node that refuses its status call twice running (UNAVAILABLE: its daemon is gone, the connection refused) is dead:
the scheduler takes its engines out and re-queues its turns. One that does not answer in time (stopped,
its link down) is unresponsive: its last report stands until it answers again.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import grpc

from daemons import dualpath_pb2 as pb
from daemons import dualpath_pb2_grpc as pb_grpc
from daemons.policy import NodeLoad

STATUS_PERIOD_S = 0.1     # wall seconds between a node's reports while turns are in flight (default)
STATUS_DEADLINE_S = 2.0   # a node that has not answered in this time is unresponsive
DEAD_AFTER = 2            # refused status calls in a row that make a node dead


@dataclass
class Watched:
    name: str
    stub: Callable[[], pb_grpc.NodeStub]
    reported: int = 0              # read-queue tokens of its last report
    taken: int = 0                 # tokens it had ever taken into its read queue, as of that report
    placed: int = 0                # tokens the scheduler ever placed on it to read
    alive: bool = True
    refused: int = 0               # status calls refused in a row
    unresponsive: int = 0          # status calls past their deadline, in all


@dataclass
class NodeWatch:
    """Polls every node's Status while `busy()`; `on_dead(name)` is told once when a node dies."""

    nodes: dict[str, Callable[[], pb_grpc.NodeStub]]  # name -> its stub (made when first asked)
    busy: Callable[[], bool]
    on_dead: Callable[[str], Awaitable[None]]
    period_s: float = STATUS_PERIOD_S
    deadline_s: float = STATUS_DEADLINE_S
    watched: dict[str, Watched] = field(init=False)
    work: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task] = field(default_factory=list)

    def __post_init__(self):
        self.watched = {n: Watched(n, s) for n, s in self.nodes.items()}

    def start(self) -> None:
        if not self.tasks:
            self.tasks = [asyncio.ensure_future(self._poll(w)) for w in self.watched.values()]

    def stop(self) -> None:
        for t in self.tasks:
            t.cancel()

    def alive(self, node: str) -> bool:
        return self.watched[node].alive

    def read_queue(self, node: str) -> int:
        """The node's read queue: its last report, plus what was placed there that it had not taken by then."""
        w = self.watched[node]
        return w.reported + max(0, w.placed - w.taken)

    def load(self, node: str) -> NodeLoad:
        return NodeLoad(node, self.read_queue(node), self.watched[node].placed)

    def charge(self, node: str, tokens: int) -> None:
        """A turn was placed that `node` will read `tokens` of."""
        self.watched[node].placed += tokens

    async def probe(self, node: str) -> bool:
        """Ask `node` now (a turn on it failed): is it alive? A refused call counts toward its death."""
        w = self.watched[node]
        for _ in range(DEAD_AFTER):
            await self._ask(w)
            if not w.alive or w.refused == 0:
                break
            await asyncio.sleep(self.period_s)
        return w.alive

    async def _ask(self, w: Watched) -> None:
        if not w.alive:
            return
        try:
            st = await w.stub().Status(pb.StatusRequest(brief=True), timeout=self.deadline_s)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE:  # past its deadline (stopped), or an error: not dead
                w.unresponsive += 1
                return
            w.refused += 1
            if w.refused >= DEAD_AFTER and w.alive:
                w.alive = False
                await self.on_dead(w.name)
            return
        w.refused = 0
        if st.read_tokens >= w.taken:  # a slower, older answer never overwrites a newer one
            w.reported, w.taken = st.read_queue_tokens, st.read_tokens

    async def _poll(self, w: Watched) -> None:
        while w.alive:
            if not self.busy():
                self.work.clear()
                await self.work.wait()
                continue
            await self._ask(w)
            await asyncio.sleep(self.period_s)

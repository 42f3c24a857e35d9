"""daemons.nodewatch: the read queues the nodes report, the turns placed since, and a dead node told apart
from a stopped one (no network: the stubs are fakes)."""

from __future__ import annotations

import asyncio

import grpc

from daemons import dualpath_pb2 as pb
from daemons.nodewatch import NodeWatch


class _Error(grpc.aio.AioRpcError):
    def __init__(self, code):
        super().__init__(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=str(code))


class _Node:
    def __init__(self):
        self.queue, self.taken, self.mode = 0, 0, "ok"

    async def Status(self, request, timeout=None):  # noqa: N802 - gRPC's name
        if self.mode == "dead":
            raise _Error(grpc.StatusCode.UNAVAILABLE)
        if self.mode == "stopped":
            raise _Error(grpc.StatusCode.DEADLINE_EXCEEDED)
        assert request.brief
        return pb.NodeStatus(read_queue_tokens=self.queue, read_tokens=self.taken)


def test_the_read_queue_is_the_nodes_report_plus_what_is_on_its_way():
    async def go():
        nodes = {"pe1": _Node(), "de1": _Node()}
        died = []

        async def on_dead(name):
            died.append(name)

        w = NodeWatch({n: (lambda n=n: nodes[n]) for n in nodes}, lambda: True, on_dead)
        w.charge("pe1", 100)  # placed, before any report
        assert w.read_queue("pe1") == 100 and w.read_queue("de1") == 0
        assert await w.probe("pe1")  # the Prefill has not reached it yet: still on its way
        assert w.read_queue("pe1") == 100
        nodes["pe1"].queue, nodes["pe1"].taken = 100, 100  # the node has taken it
        assert await w.probe("pe1") and w.read_queue("pe1") == 100  # the report, not report + placement
        w.charge("pe1", 50)
        assert w.read_queue("pe1") == 150
        nodes["pe1"].queue, nodes["pe1"].taken = 0, 150  # taken and read
        assert await w.probe("pe1") and w.read_queue("pe1") == 0
        assert w.load("pe1").placed_tokens == 150 and w.load("de1").placed_tokens == 0  # the tie-break
        nodes["de1"].mode = "stopped"
        assert await w.probe("de1") and w.watched["de1"].unresponsive == 1 and not died  # stopped is not dead
        nodes["de1"].mode = "dead"
        assert not await w.probe("de1") and died == ["de1"]  # refused twice: dead, told once
        assert not await w.probe("de1") and died == ["de1"]

    asyncio.run(go())

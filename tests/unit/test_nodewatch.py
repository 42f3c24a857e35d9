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
        self.queue, self.mode = 0, "ok"

    async def Status(self, request, timeout=None):  # noqa: N802 - gRPC's name
        if self.mode == "dead":
            raise _Error(grpc.StatusCode.UNAVAILABLE)
        if self.mode == "stopped":
            raise _Error(grpc.StatusCode.DEADLINE_EXCEEDED)
        assert request.brief
        return pb.NodeStatus(read_queue_tokens=self.queue)


def test_reports_replace_the_turns_placed_before_they_were_asked_for():
    async def go():
        nodes = {"pe1": _Node(), "de1": _Node()}
        died = []

        async def on_dead(name):
            died.append(name)

        clock = [0.0]
        w = NodeWatch({n: (lambda n=n: nodes[n]) for n in nodes}, lambda: True, on_dead, clock=lambda: clock[0])
        w.charge("pe1", 100)  # placed at t=0, before any report
        assert w.read_queue("pe1") == 100 and w.read_queue("de1") == 0
        clock[0] = 1.0
        nodes["pe1"].queue = 100  # the node has counted it
        assert await w.probe("pe1") and await w.probe("de1")
        assert w.read_queue("pe1") == 100  # the report, not report + placement
        clock[0] = 2.0
        w.charge("pe1", 50)  # placed after that report was asked for: added to it
        assert w.read_queue("pe1") == 150
        nodes["de1"].mode = "stopped"
        assert await w.probe("de1") and w.watched["de1"].unresponsive == 1 and not died  # stopped is not dead
        nodes["de1"].mode = "dead"
        assert not await w.probe("de1") and died == ["de1"]  # refused twice: dead, told once
        assert not await w.probe("de1") and died == ["de1"]

    asyncio.run(go())

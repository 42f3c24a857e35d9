"""Collective traffic: the AllToAll byte model, and the marked transport timed to its last ack (127.0.0.1)."""

from __future__ import annotations

import asyncio
import csv
import socket

import pytest

from daemons.costmodel import MODELS
from traffic.collectives import (AllToAll, CollectiveAgent, ReceiverStats, alltoall_bytes_per_token, layer_bytes,
                                 remote_ranks_per_token, start_receiver, write_csv)

DS = MODELS["ds660b"]


def test_remote_ranks_per_token():
    assert remote_ranks_per_token(1, 8) == 0  # one rank: every expert is local
    assert remote_ranks_per_token(2, 8) == pytest.approx(1 - 0.5 ** 8)
    assert remote_ranks_per_token(4, 8) == pytest.approx(3 * (1 - 0.75 ** 8))
    assert remote_ranks_per_token(64, 8) < 8  # never more ranks than experts a token picks


def test_alltoall_bytes_follow_the_model():
    # DS 660B: hidden 7168 -> FP8 dispatch 7168 B + 56 FP32 scales + BF16 combine 14336 B per remote rank
    per_rank = 7168 + 56 * 4 + 2 * 7168
    assert alltoall_bytes_per_token(DS, 2) == pytest.approx(remote_ranks_per_token(2, 8) * per_rank)
    assert alltoall_bytes_per_token(MODELS["qwen32b"], 4) == 0  # dense: no AllToAll
    # 61 layers, the first 3 dense: 58 MoE layers; 400 tokens on a 2-engine group at byte scale 5e-4
    full = layer_bytes(DS, 0, 61, 400, 2, 5e-4)
    assert full == round(58 * 400 * alltoall_bytes_per_token(DS, 2) * 5e-4)
    assert layer_bytes(DS, 0, 3, 400, 2, 5e-4) == 0  # dense layers only
    assert layer_bytes(DS, 0, 30, 400, 2, 5e-4) + layer_bytes(DS, 30, 31, 400, 2, 5e-4) == pytest.approx(full, abs=1)


def test_alltoall_reaches_every_peer_and_is_timed_to_the_last_ack():
    async def go():
        stats = [ReceiverStats(), ReceiverStats()]
        servers = [await start_receiver("127.0.0.1", 0, 46, s) for s in stats]
        peers = [f"127.0.0.1:{srv.sockets[0].getsockname()[1]}" for srv in servers]
        a2a = AllToAll(peers, dscp=46)
        await a2a.connect()
        tos = [p._writer.get_extra_info("socket").getsockopt(socket.IPPROTO_IP, socket.IP_TOS) for p in a2a.peers]
        done = [await a2a.run(10_000) for _ in range(5)]
        await a2a.close()
        for srv in servers:
            srv.close()
            await srv.wait_closed()
        return stats, done, tos, a2a

    stats, done, tos, a2a = asyncio.run(go())
    assert tos == [46 << 2, 46 << 2]  # DSCP 46 (EF) in the TOS byte of every connection
    assert [c.collective for c in done] == [1, 2, 3, 4, 5]
    assert all(c.bytes == 10_000 and c.seconds > 0 for c in done)
    assert [(s.messages, s.bytes) for s in stats] == [(5, 25_000), (5, 25_000)]  # half to each peer
    assert a2a.completions == done


def test_collectives_csv(tmp_path):
    from traffic.collectives import Completion
    path = tmp_path / "collectives.csv"
    write_csv(str(path), [Completion(1, 10.5, 4096, 0.002)], t0=10.0, engine="pe1/0", time_scale=2.0)
    (row,) = list(csv.DictReader(path.open()))
    assert row == {"engine": "pe1/0", "collective": "1", "start_s": "0.25", "bytes": "4096", "completion_s": "0.001"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_decode_step_ends_with_its_alltoall_and_every_step_is_recorded(tmp_path):
    """A decode engine with collectives: one AllToAll per step, sized by the batch, delivered to its peer."""
    from daemons import dualpath_pb2 as pb
    from daemons.kvbytes import KvGeometry
    from daemons.gpu import Collectives
    from daemons.node import NodeService

    class NoStorage:
        async def write(self, *a):
            return 0

        async def write_blocks(self, *a):
            return 0

        async def close(self):
            pass

    class Gpu:
        def decode_step_s(self, contexts):
            return 0.001

        def prefill_layers_s(self, batch):
            return (0.0,) * 61

    group = [f"127.0.0.1:{_free_port()}", f"127.0.0.1:{_free_port()}"]

    async def go():
        mine = Collectives(DS, 5e-4, group, [group[0]], dscp=46)
        peer = Collectives(DS, 5e-4, group, [group[1]], dscp=46)
        await mine.start()
        await peer.start()
        svc = NodeService("de1", "de", KvGeometry(61, 64, 1281), 1, NoStorage(), Gpu(), 1 << 20,
                          collectives=mine)
        spec = pb.RequestSpec(request_id="r", trajectory="t", hit_blocks=0, new_tokens=10, gen_tokens=12,
                              layer_chunks=2)
        reply = await svc.Decode(pb.DecodeRequest(request=spec, de_engine=0, context_tokens=10,
                                                   path=pb.READ_PATH_NONE), None)
        await svc.close()
        await peer.close()
        return mine, peer, reply

    mine, peer, reply = asyncio.run(go())
    assert [phase for _, phase, _ in mine.records] == ["decode"] * 12  # one per generated token
    step_bytes = layer_bytes(DS, 0, 61, 1, 2, 5e-4)
    assert all(c.bytes == step_bytes and c.seconds > 0 for _, _, c in mine.records)
    assert (peer.received.messages, peer.received.bytes) == (12, 12 * step_bytes)  # told by its agent
    assert reply.tpot_s >= 0.001  # each step lasted its compute plus its collective
    path = tmp_path / "c.csv"
    mine.write_csv(str(path), "de1")
    rows = list(csv.DictReader(path.open()))
    assert len(rows) == 12 and rows[0]["engine"] == "de1/0" and rows[0]["phase"] == "decode"


def test_collective_agent_never_outlives_its_node():
    """The agent leaves when its control socket closes, even without a STOP (its node was killed)."""
    group = [f"127.0.0.1:{_free_port()}", f"127.0.0.1:{_free_port()}"]

    async def go():
        agent = CollectiveAgent(group, [group[0]], dscp=None)
        await agent.start()
        agent._writer.transport.abort()  # the node dies: the kernel closes its end
        return agent.proc

    proc = asyncio.run(go())
    assert proc.wait(timeout=10) == 0


def test_collective_agent_runs_alltoalls_and_reports_what_it_received():
    group = [f"127.0.0.1:{_free_port()}", f"127.0.0.1:{_free_port()}", f"127.0.0.1:{_free_port()}"]

    async def go():
        a, b = CollectiveAgent(group, [group[0]], dscp=46), CollectiveAgent(group, group[1:], dscp=46)
        await a.start()
        await b.start()
        done = await asyncio.gather(a.run(0, 3000), b.run(0, 1000), b.run(1, 10))
        stats = await a.close(), await b.close()
        return done, stats

    done, (sa, sb) = asyncio.run(go())
    assert [c.bytes for c in done] == [3000, 1000, 10]  # even shares to 2 peers
    assert all(c.seconds > 0 for c in done)
    assert (sa.messages, sa.bytes) == (2, 500 + 5)  # b's two engines each sent a its share
    assert (sb.messages, sb.bytes) == (4, 1500 * 2 + 500 + 5)

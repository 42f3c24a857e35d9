"""The event-driven decode loop, in process with a fake storage and a fake GPU."""

from __future__ import annotations

import asyncio

from daemons import dualpath_pb2 as pb
from daemons.kvbytes import KvGeometry
from daemons.node import NodeService

GEOM = KvGeometry(layers=61, block_tokens=64, block_bytes=256)
STEP_S = 0.002


class FakeStorage:
    def __init__(self):
        self.writes: list[tuple[str, int, int]] = []
        self.calls = 0  # write calls made by the decode loop

    async def write(self, request_id, trajectory, first_block, blocks, ledger):
        self.writes.append((trajectory, first_block, blocks))
        ledger.blocks_written += blocks
        return blocks * GEOM.block_bytes

    async def write_blocks(self, request_id, blocks, ledger):
        self.calls += 1
        for trajectory, block in blocks:
            await self.write(request_id, trajectory, block, 1, ledger)
        return len(blocks) * GEOM.block_bytes

    async def close(self):
        pass


class FakeGpu:
    def __init__(self):
        self.batches: list[int] = []

    def prefill_layers_s(self, batch):
        return (0.0,) * GEOM.layers

    def decode_step_s(self, contexts):
        self.batches.append(len(contexts))
        return STEP_S


def _req(rid, traj, ctx, gen):
    spec = pb.RequestSpec(request_id=rid, trajectory=traj, hit_blocks=ctx // 64, new_tokens=ctx % 64, gen_tokens=gen,
                          layer_chunks=4)
    return pb.DecodeRequest(request=spec, de_engine=0, context_tokens=ctx, path=pb.READ_PATH_NONE)  # no KV moved


def test_blocks_written_exactly_once_each_and_joins_share_the_batch():
    storage, gpu = FakeStorage(), FakeGpu()

    async def go():
        svc = NodeService("de1", "de", GEOM, 1, storage, gpu, 1 << 20)
        first = asyncio.ensure_future(svc.Decode(_req("r1", "a", 1000, 200), None))
        await asyncio.sleep(20 * STEP_S)  # the second request joins while the first decodes
        second = await svc.Decode(_req("r2", "b", 130, 10), None)
        return await first, second, svc

    r1, r2, svc = asyncio.run(go())
    # a: context 1000 -> 1200; blocks 15 (960..1023) .. 17 (1088..1151) complete during decode
    a_blocks = sorted(f for t, f, n in storage.writes if t == "a")
    assert a_blocks == [15, 16, 17]
    # b: context 130 -> 140: block 1 (64..127) was completed by prefill (hit_blocks=2 covers 0..127: none new);
    # no boundary (192) is crossed during decode
    assert [f for t, f, n in storage.writes if t == "b"] == []
    assert r1.blocks_written == 3 and r2.blocks_written == 0
    assert max(gpu.batches) == 2  # the join shared the batch instead of waiting for the first to finish
    assert r1.tpot_s >= STEP_S * 0.9 and r2.first_token_s >= 0
    eng = svc.engines[0]
    assert eng.unfinished_tokens == 0 and eng.unfinished_requests == 0 and not eng.batch


def test_wake_ups_are_per_event_not_per_token():
    storage, gpu = FakeStorage(), FakeGpu()

    async def go():
        svc = NodeService("de1", "de", GEOM, 1, storage, gpu, 1 << 20)
        return await svc.Decode(_req("r1", "a", 64, 256), None)

    asyncio.run(go())
    # 256 tokens from a block boundary: events at 64, 128, 192, 256 -> about 4 segments, not 256 steps
    assert len(gpu.batches) <= 8
    assert [f for _, f, _ in storage.writes] == [1, 2, 3, 4]


def test_blocks_completed_at_the_same_step_go_to_storage_in_one_call():
    storage, gpu = FakeStorage(), FakeGpu()

    async def go():
        svc = NodeService("de1", "de", GEOM, 1, storage, gpu, 1 << 20)
        # both cross a block boundary at their 4th token: 60 -> 64 and 124 -> 128
        return await asyncio.gather(svc.Decode(_req("r1", "a", 60, 10), None),
                                    svc.Decode(_req("r2", "b", 124, 10), None))

    r1, r2 = asyncio.run(go())
    assert sorted((t, f) for t, f, _ in storage.writes) == [("a", 0), ("b", 1)]
    assert storage.calls == 1  # one write for the batch, not one per sequence
    assert r1.blocks_written == r2.blocks_written == 1

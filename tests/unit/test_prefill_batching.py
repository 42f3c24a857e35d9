"""A PE engine's batching (paper section 5): FIFO batches under the compute quota, chunked prefill.

In process, with a fake GPU whose prefill costs 1 ms per new token, and oracle
requests (no KV moves), so only the engine's scheduling is under test.
"""

from __future__ import annotations

import asyncio
import time

from daemons import dualpath_pb2 as pb
from daemons.kvbytes import KvGeometry
from daemons.gpu import layer_chunks
from daemons.node import NodeService
from daemons.prefill_engine import PrefillEngine, PrefillJob

GEOM = KvGeometry(layers=4, block_tokens=64, block_bytes=64)
MS_PER_TOKEN = 0.001


class LinearGpu:
    """Prefill: 1 ms per new token, spread evenly over the layers; records every batch it is asked to predict
    (asked) and every batch it computes (ran)."""

    def prefill_layers_s(self, batch):
        self.ran.append(list(batch))
        total = sum(new for _, new in batch) * MS_PER_TOKEN
        return (total / GEOM.layers,) * GEOM.layers

    def prefill_attention_s(self, batch):  # the quota's measure: here all of the 1 ms per token
        self.asked.append(list(batch))
        return sum(new for _, new in batch) * MS_PER_TOKEN

    def decode_step_s(self, contexts):
        return 0.0

    def __init__(self, hbm_tokens: int = 10**9):
        self.asked: list[list[tuple[int, int]]] = []
        self.ran: list[list[tuple[int, int]]] = []
        self.hbm_tokens = hbm_tokens

    def prefill_hbm_tokens(self):
        return self.hbm_tokens

    def h2d_s(self, tokens):
        return 0.0


def _service(quota_s: float, hbm_tokens: int = 10**9) -> NodeService:
    return NodeService("pe1", "pe", GEOM, 1, storage=None, compute=LinearGpu(hbm_tokens), buffer_bytes=1 << 20,
                       prefill_quota_s=quota_s)


def _request(rid: str, new: int, hit_blocks: int = 10, layerwise: bool = True) -> pb.PrefillRequest:
    spec = pb.RequestSpec(request_id=rid, trajectory=rid, hit_blocks=hit_blocks, new_tokens=new, gen_tokens=1,
                          layer_chunks=2)
    return pb.PrefillRequest(request=spec, pe_engine=0, path=pb.READ_PATH_NONE, layerwise=layerwise)


def _queue(eng: PrefillEngine, *news: int, layerwise: bool = True) -> list[PrefillJob]:
    jobs = [PrefillJob(_request(f"r{i}", n, layerwise=layerwise), layer_chunks(GEOM.layers, 2))
            for i, n in enumerate(news)]
    eng.prefills.extend(jobs)
    return jobs


def test_basic_batches_only_what_the_free_hbm_holds_and_layerwise_ignores_it():
    async def go():
        out = {}
        for layerwise in (False, True):
            svc = _service(10.0, hbm_tokens=2 * 640 + 50)  # two requests of 10 blocks x 64 + a few tokens
            jobs = _queue(svc.engines[0], 20, 20, 20, layerwise=layerwise)
            out[layerwise] = ([n for _, n in svc.engines[0].form_batch()], jobs)
        return out

    out = asyncio.run(go())
    assert out[False][0] == [20, 20]      # the third's 660 context tokens do not fit what is left
    assert out[True][0] == [20, 20, 20]   # layerwise holds one layer chunk at a time


def test_basic_runs_a_request_larger_than_the_hbm_alone():
    async def go():
        svc = _service(10.0, hbm_tokens=100)
        _queue(svc.engines[0], 20, 20, layerwise=False)
        return [n for _, n in svc.engines[0].form_batch()]

    assert asyncio.run(go()) == [20]


def test_whole_requests_fifo_then_the_next_one_chunked_to_fill_the_quota():
    async def go():
        svc = _service(0.050)
        j = _queue(svc.engines[0], 20, 20, 20, 5)
        return svc.engines[0].form_batch(), j

    batch, j = asyncio.run(go())
    # 20 + 20 ms fit the 50 ms quota; 10 of the third request's 20 tokens fill it; the fourth waits its turn
    assert batch == [(j[0], 20), (j[1], 20), (j[2], 10)]


def test_a_request_larger_than_the_quota_runs_alone_in_pieces():
    async def go():
        svc = _service(0.050)
        eng = svc.engines[0]
        (big, small) = _queue(eng, 120, 5)
        first = eng.form_batch()
        big.computed = 50  # as the engine loop records after running a piece
        second = eng.form_batch()
        big.computed = 100
        third = eng.form_batch()
        return first, second, third, big, small

    first, second, third, big, small = asyncio.run(go())
    assert first == [(big, 50)] and second == [(big, 50)]
    assert third == [(big, 20), (small, 5)]  # the rest of it, then the next request shares the batch


def test_the_prediction_sees_the_tokens_already_computed_as_cached():
    async def go():
        svc = _service(0.050)
        eng = svc.engines[0]
        (job,) = _queue(eng, 80)
        job.computed = 50
        svc.compute.asked.clear()
        eng.form_batch()
        return svc.compute.asked, job

    asked, job = asyncio.run(go())
    cached = job.spec.hit_blocks * GEOM.block_tokens + 50
    assert asked == [[(cached, 30)]]  # the last 30 tokens attend to the hit KV plus the 50 computed already


def test_even_one_token_over_the_quota_still_makes_progress():
    async def go():
        svc = _service(0.0005)  # less than one token's 1 ms
        eng = svc.engines[0]
        (job,) = _queue(eng, 3)
        return eng.form_batch(), job

    batch, job = asyncio.run(go())
    assert batch == [(job, 1)]


def test_prefills_complete_in_fifo_order_and_the_gpu_is_never_double_booked():
    async def go():
        svc = _service(0.050)
        done: list[str] = []

        async def one(rid, new):
            await svc.Prefill(_request(rid, new), None)
            done.append(rid)

        t0 = time.monotonic()
        await asyncio.gather(*(one(rid, new) for rid, new in (("a", 30), ("b", 30), ("c", 70), ("d", 10))))
        return done, time.monotonic() - t0, svc

    done, elapsed, svc = asyncio.run(go())
    assert done == ["a", "b", "c", "d"]
    gpu_s = 140 * MS_PER_TOKEN  # every token computed exactly once, one batch at a time
    assert elapsed >= gpu_s
    eng = svc.engines[0]
    assert not eng.prefills and eng.unfinished_requests == 0 and eng.unfinished_tokens == 0
    # batches: [a 30, b 20] [b 10, c 40] [c 30, d 10]: each at most the quota, FIFO
    run = [b for b in svc.compute.ran if len(b) > 1]
    assert [[new for _, new in b] for b in run] == [[30, 20], [10, 40], [30, 10]]

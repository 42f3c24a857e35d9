"""The scheduler's placement pass, without any RPC: a burst of queued turns is charged as it is placed."""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter

import pytest

from daemons import dualpath_pb2 as pb
from daemons.scheduler import SchedulerConfig, SchedulerService, _Pending

GPUS, HIT_BLOCKS, BLOCK_TOKENS, NEW = 8, 500, 64, 400


def _service(mode: str, policy: str, beta: float = 1e12) -> SchedulerService:
    nodes = [{"name": name, "role": role, "mgmt": f"127.0.0.1:{7100 + i}",
              "cnics": [f"127.0.0.1:{8000 + 10 * i + g}" for g in range(GPUS)]}
             for i, (name, role) in enumerate([("pe1", "pe"), ("pe2", "pe"), ("de1", "de"), ("de2", "de")])]
    cfg = SchedulerConfig.from_json({"mode": mode, "policy": policy, "layer_chunks": 2, "alpha_tokens": 1e12,
                                     "beta_tokens": beta, "hbm_tokens": 10**9, "nodes": nodes})
    return SchedulerService(cfg)


def _burst(service: SchedulerService, n: int) -> list:
    loop = asyncio.new_event_loop()
    try:
        for i in range(n):
            spec = pb.RequestSpec(request_id=f"r{i}", trajectory=f"a{i}", hit_blocks=HIT_BLOCKS,
                                  new_tokens=NEW, gen_tokens=10)
            turn = pb.TurnRequest(agent=f"a{i}", request=spec, context_tokens=HIT_BLOCKS * BLOCK_TOKENS + NEW)
            service.queue.append(_Pending(turn, loop.create_future()))
        return service._place_ready()
    finally:
        loop.close()


@pytest.mark.parametrize("policy", ["paper", "round_robin"])
def test_a_burst_spreads_over_every_engine_and_both_read_sides(policy):
    placed = _burst(_service("dualpath", policy), 64)
    assert len(placed) == 64
    pe = Counter((c.pe_eng.node, c.pe_eng.engine) for _, c in placed)
    de = Counter((c.de_eng.node, c.de_eng.engine) for _, c in placed)
    assert len(pe) == 2 * GPUS and max(pe.values()) == 4  # 64 turns over 16 PE engines, 4 each
    assert len(de) == 2 * GPUS and max(de.values()) == 4
    readers = Counter(node for _, c in placed for node in c.reads)
    assert set(readers) == {"pe1", "pe2", "de1", "de2"}, readers
    assert max(readers.values()) - min(readers.values()) <= 2  # each turn: the shorter of its two queues


def test_round_robin_read_side_variants():
    sides = {}
    for policy in ("round_robin_pe_reads", "round_robin_alternating"):
        placed = _burst(_service("dualpath", policy), 64)
        sides[policy] = [c.path for _, c in placed]
    assert set(sides["round_robin_pe_reads"]) == {pb.READ_PATH_PE}
    alt = sides["round_robin_alternating"]
    assert alt[:4] == [pb.READ_PATH_PE, pb.READ_PATH_DE] * 2 and alt.count(pb.READ_PATH_DE) == 32
    # the engines still cycle as plain round robin does
    placed = _burst(_service("dualpath", "round_robin_alternating"), 16)
    assert len({(c.pe_eng.node, c.pe_eng.engine) for _, c in placed}) == 16


def test_split_reads_fill_both_queues_level():
    service = _service("dualpath", "paper")
    service.cfg = dataclasses.replace(service.cfg, read_path="split")
    placed = _burst(service, 16)
    assert {c.path for _, c in placed} == {pb.READ_PATH_SPLIT}
    hit = HIT_BLOCKS * BLOCK_TOKENS
    for _, c in placed:  # every turn's hit tokens charged once, across its two readers
        assert sum(c.reads.values()) == hit and c.reads.get(c.pe_eng.node, 0) == c.pe_blocks * BLOCK_TOKENS
    q = {n: service.watch.read_queue(n) for n in service.nodes}  # no report yet: the turns placed since
    assert sum(q.values()) == 16 * hit
    # the first turn on empty queues splits in half; later ones keep each PE / DE pair of queues level
    assert placed[0][1].pe_blocks == HIT_BLOCKS // 2
    assert max(q.values()) - min(q.values()) <= 2 * hit


def test_basic_reads_on_the_prefill_side_under_every_policy():
    for policy in ("round_robin_alternating", "paper"):
        placed = _burst(_service("basic", policy), 8)
        assert {c.path for _, c in placed} == {pb.READ_PATH_PE}


def test_the_loads_are_charged_at_placement_and_returned_exactly_once():
    service = _service("dualpath", "paper")
    placed = _burst(service, 10)
    assert sum(ld.requests for ld in service.pe_load.values()) == 10
    # until the nodes report, the read queues are the turns placed on them (the scheduler keeps no copy)
    assert sum(service.watch.read_queue(n) for n in service.nodes) == 10 * (HIT_BLOCKS * BLOCK_TOKENS)
    for _, claim in placed:
        for what in ("pe", "de", "pe"):  # a second release of the same account is a no-op
            service._release(claim, what)
    assert all(ld.requests == ld.tokens == 0 for ld in [*service.pe_load.values(), *service.de_load.values()])


def test_the_head_waits_once_every_engine_is_above_beta():
    service = _service("dualpath", "paper", beta=NEW * 2)  # an engine takes at most 3 turns' new tokens
    placed = _burst(service, 100)
    assert len(placed) == 3 * 2 * GPUS and len(service.queue) == 100 - 48

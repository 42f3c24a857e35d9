"""Lockstep: an EP group's layer chunk starts when every engine of its forward is ready and lasts the slowest
engine's cost; joiners wait for the next forward; an engine that leaves is not waited for."""

import asyncio
import csv

import pytest

from daemons import dualpath_pb2 as pb
from daemons.lockstep import Arrival, LockstepGroup, LockstepMember, groups
from scenarios.gpustats import lockstep_figures


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def run(coro):
    return asyncio.run(coro)


def arrive(g: LockstepGroup, member: str, seq: int, chunk: int, chunks: int, cost_s: float, attention_s: float):
    return g.arrive(member, seq, Arrival(chunk, chunks, cost_s, attention_s))


def test_groups_of_the_ep_width():
    engines = [f"pe{n}/{i}" for n in (1, 2) for i in range(8)]
    assert groups(engines, 16) == [engines]
    assert groups(engines, 8) == [engines[:8], engines[8:]]
    assert groups(engines[:2], 16) == [engines[:2]]  # fewer engines than the width: one group


def test_a_chunk_waits_for_every_engine_and_lasts_the_slowest():
    async def body():
        clock = Clock()
        g = LockstepGroup("pe0", 3, clock)
        assert arrive(g, "a", 1, 0, 1, 0.1, 0.05).done()  # an idle group: a's forward starts at once, alone
        b = arrive(g, "b", 1, 0, 2, 0.3, 0.2)  # a forward ended: b and c join the next one, with a
        c = arrive(g, "c", 1, 0, 2, 0.2, 0.1)
        assert not b.done() and not c.done()
        clock.t = 101.0
        a = arrive(g, "a", 2, 0, 2, 0.1, 0.05)
        assert a.result() == b.result() == c.result() == (101.0, 0.3)
        # chunk 1: a is slow now
        d = [arrive(g, m, seq, 1, 2, cost, cost / 2) for m, seq, cost in (("a", 3, 0.5), ("b", 2, 0.1), ("c", 2, 0.1))]
        assert all(f.result()[1] == 0.5 for f in d)
        assert len(g.rows) == 3 and g.rows[1][1:6] == (0, 3, 3, 0.3, 0.3)
        assert g.rows[1][7] == pytest.approx(0.2 + 0.1)  # waited: a 0.2, c 0.1
        assert g.rows[1][9] == pytest.approx(0.35)
    run(body())


def test_a_joiner_waits_for_the_next_forward():
    async def body():
        g = LockstepGroup("pe0", 2, Clock())
        arrive(g, "a", 1, 0, 2, 0.1, 0.0)  # a alone: its chunk 0 starts at once
        assert g.rows and g.rows[-1][2] == 1
        late = arrive(g, "b", 1, 0, 2, 0.2, 0.0)  # inside a's forward: waits in the lobby
        a1 = arrive(g, "a", 2, 1, 2, 0.1, 0.0)   # a's chunk 1 does not wait for b
        assert a1.done() and not late.done()
        a2 = arrive(g, "a", 3, 0, 2, 0.1, 0.0)   # the next forward: a and b together
        assert late.done() and a2.done() and a2.result()[1] == 0.2
    run(body())


def test_an_engine_with_work_joins_at_the_next_forward_boundary():
    async def body():
        clock = Clock()
        g = LockstepGroup("pe0", 2, clock)
        assert g.join("a", 1).result() == (clock.t, 0.0)  # an idle group: at once
        arrive(g, "a", 2, 0, 2, 0.5, 0.0)  # a's forward: chunk 0 runs
        b = g.join("b", 1)
        assert not b.done()  # inside a's forward
        clock.t = 100.5
        arrive(g, "a", 3, 1, 2, 0.25, 0.0)  # a's last chunk: b may form its batch when it ends
        assert b.result() == (100.75, 0.0) and g.active == {"a", "b"}
        nxt = arrive(g, "a", 4, 0, 2, 0.1, 0.0)
        assert not nxt.done()  # the next forward waits for b's batch
        arrive(g, "b", 2, 0, 2, 0.3, 0.0)
        assert nxt.result()[1] == 0.3
    run(body())


def test_a_leaver_is_not_waited_for_and_an_old_call_is_refused():
    async def body():
        g = LockstepGroup("pe0", 2, Clock())
        arrive(g, "a", 1, 0, 1, 0.1, 0.0)  # alone
        arrive(g, "b", 1, 0, 1, 0.1, 0.0)
        assert arrive(g, "a", 2, 0, 1, 0.1, 0.0).done()  # a and b
        nxt = arrive(g, "a", 3, 0, 1, 0.1, 0.0)
        assert not nxt.done()
        g.leave("b", 2)
        assert nxt.done()
        with pytest.raises(ValueError, match="older"):
            g.leave("b", 2)
    run(body())


def test_a_member_sleeps_until_the_group_chunk_ends_and_counts_its_bubble():
    async def body():
        clock = Clock()
        g = LockstepGroup("pe0", 2, clock)
        arrive(g, "x", 1, 0, 2, 0.1, 0.0)  # x alone: its forward starts at once

        async def call(msg: pb.LockstepArrival, deadline: float) -> pb.LockstepGo:
            start, cost = await arrive(g, msg.member, msg.seq, msg.chunk, msg.chunks, msg.cost_s, msg.attention_s)
            clock.t += 0.05  # the reply's latency is not GPU time
            return pb.LockstepGo(start=start, cost_s=cost)

        async def leave(msg, deadline):
            g.leave(msg.member, msg.seq)
            return pb.LockstepGo()

        async def join(msg, deadline):
            start, _ = await g.join(msg.member, msg.seq)
            return pb.LockstepGo(start=start)
        m = LockstepMember("pe0", "y", call, leave, join, clock=clock)
        y = asyncio.create_task(m.chunk(0, 1, 0.1, 0.0))  # inside x's forward: the lobby
        await asyncio.sleep(0)
        arrive(g, "x", 2, 1, 2, 0.1, 0.0)  # x's last chunk; then x's next forward, with y
        await asyncio.sleep(0)
        assert not y.done()
        other = arrive(g, "x", 3, 0, 1, 0.4, 0.0)
        assert await asyncio.wait_for(y, 5) == pytest.approx(0.35)
        assert m.waited_s == pytest.approx(0.3) and other.done()
        await m.leave()
        assert "y" not in g.active
    run(body())


def test_a_member_whose_group_does_not_answer_computes_alone():
    async def body():
        async def never(msg, deadline):
            await asyncio.wait_for(asyncio.Event().wait(), deadline)
        m = LockstepMember("pe0", "y", never, never, never, deadline_s=0.01)
        await m.join()
        assert await m.chunk(0, 1, 0.25, 0.0) == 0.25
        assert m.timeouts == 2
    run(body())


def test_fig14_and_the_bubble_share_from_the_rows(tmp_path):
    async def body():
        g = LockstepGroup("pe0", 2, Clock())
        arrive(g, "a", 1, 0, 1, 0.1, 0.1)  # a alone (b idle)
        arrive(g, "b", 1, 0, 1, 0.3, 0.3)
        arrive(g, "a", 2, 0, 1, 0.2, 0.2)  # a and b: 0.2 and 0.3
        arrive(g, "a", 3, 0, 1, 0.2, 0.2)
        arrive(g, "b", 2, 0, 1, 0.2, 0.2)  # a and b: equal
        g.write_csv(str(tmp_path / "lockstep-pe0.csv"), 1.0)
        g.write_csv(str(tmp_path / "x2.csv"), 2.0)  # wall seconds at time x2: half as many real ones
    run(body())
    real = [float(r["chunk_s"]) for r in csv.DictReader((tmp_path / "x2.csv").open())]
    assert real == pytest.approx([0.05, 0.15, 0.1])
    f = lockstep_figures([tmp_path / "lockstep-pe0.csv"])
    assert f["forwards"] == 3 and f["full_forwards"] == 2
    assert f["attention_max_over_avg_full"] == pytest.approx((0.3 * 2 / 0.5 + 1.0) / 2, abs=1e-4)
    assert f["attention_max_over_avg_group"] == pytest.approx((2.0 + 1.2 + 1.0) / 3, abs=1e-4)
    # waited: a's 0.1 of the 0.3 chunk, of 0.1 + 2 x 0.3 + 2 x 0.2 engine-seconds in forwards
    assert f["bubble_share"] == pytest.approx(0.1 / 1.1, abs=1e-4)


def test_the_group_chunk_waits_for_the_slowest_own_part_and_shares_the_experts():
    from daemons import costmodel
    from daemons.gpu import CostModelCompute
    c = CostModelCompute(costmodel.MODELS["ds660b"], 1.0, "profile")
    small, big = [(32_768, 429)], [(32_768, 429)] * 6
    layers = c.model.layers

    def own(batch, lf, nl):
        return sum(c.prefill_layers_s(batch)[lf:lf + nl])
    # like batches on every GPU of the group: lockstep costs nothing
    for lf, nl in ((0, 30), (30, layers - 30)):
        assert c.group_chunk_s([c.prefill_parts(small)] * 16, 16, lf, nl) == pytest.approx(own(small, lf, nl))
    # one busy engine among light ones: slower than the light ones' own, faster than the busy one's own (its
    # tokens' routed experts are spread over the group, not repeated on every GPU as like batches would be)
    mixed = c.group_chunk_s([c.prefill_parts(big)] + [c.prefill_parts(small)] * 15, 16, 0, layers)
    assert own(small, 0, layers) < mixed < own(big, 0, layers)
    # alone in a group of 16: its tokens' experts are spread over 16 GPUs
    assert c.group_chunk_s([c.prefill_parts(big)], 16, 0, layers) < own(big, 0, layers)
    assert CostModelCompute(costmodel.MODELS["ds660b"], 1.0, "roofline").prefill_parts(small) is None

"""A decode engine (DE): one GPU of a decode node, its continuous decode batch and its write-backs.

A request joins the engine's batch at the next step boundary once its KV is in the node's DRAM buffer (it
is then copied to HBM: the buffer is free again). Every step generates one token for each sequence of the
batch and lasts the cost model's step time for the batch's contexts; every Full Block a step completes is
written back to storage through the node's SNIC, all sequences' blocks of a step in one write.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from daemons import dualpath_pb2 as pb
from daemons.gpu import Compute, Gpu
from daemons.runtime import Tasks
from daemons.traffic_manager import TrafficManager


@dataclass
class Decoding:
    """One request in a decode batch."""

    spec: pb.RequestSpec
    context: int
    generated: int = 0
    started: float = field(default_factory=time.monotonic)
    first_token: float | None = None
    second_token: float | None = None
    last_token: float | None = None
    blocks_written: int = 0
    done: asyncio.Future | None = None
    writes: list = field(default_factory=list)  # write-back tasks of this request


class DecodeEngine:
    """One DE GPU: its decode batch and its load (what the scheduler balances)."""

    def __init__(self, index: int, name: str, tm: TrafficManager, compute: Compute, gpu: Gpu, tasks: Tasks):
        self.index, self.name, self.tm, self.compute, self.gpu, self.tasks = index, name, tm, compute, gpu, tasks
        self.geom = tm.geom
        self.unfinished_requests = 0
        self.unfinished_tokens = 0
        self.batch: list[Decoding] = []  # decoding now
        self.joining: list[Decoding] = []  # join the batch at the next step boundary
        self.wake = asyncio.Event()  # set when a request joins
        self.loop_task: asyncio.Task | None = None

    async def decode(self, request: pb.DecodeRequest) -> pb.DecodeReply:
        spec, tm = request.request, self.tm
        ctx = request.context_tokens
        try:
            if request.path != pb.READ_PATH_NONE:  # the oracle moves no KV
                tm.check_kv(spec)  # every block of every layer is here: pushed, or read by this node
        except Exception:
            tm.forget(spec.request_id)
            await tm.release(spec.request_id)
            raise
        # the KV is copied from the DRAM buffer into HBM: the buffer is free again
        tm.forget(spec.request_id)
        await tm.release(spec.request_id)
        # blocks completed by the prefilled tokens go to storage first
        first_new = spec.hit_blocks
        done_blocks = ctx // self.geom.block_tokens
        d = Decoding(spec, ctx, done=asyncio.get_running_loop().create_future())
        if done_blocks > first_new:
            d.writes.append(self.tasks.spawn(tm.write(spec.request_id, spec.trajectory, first_new,
                                                      done_blocks - first_new)))
        d.blocks_written = max(0, done_blocks - first_new)
        self.unfinished_requests += 1
        self.unfinished_tokens += spec.gen_tokens
        self.joining.append(d)
        self.wake.set()
        if self.loop_task is None or self.loop_task.done():
            loop = self._loop if self.gpu.collectives is None else self._loop_stepwise
            self.loop_task = self.tasks.spawn(loop())
        await d.done
        await asyncio.gather(*d.writes)  # persisted before the turn counts as done
        elapsed = time.monotonic() - d.started
        first = d.first_token or d.started
        last = d.last_token or first
        # time per output token after the first, as generated (the write-back of the last blocks is not decode)
        tpot = (last - first) / (spec.gen_tokens - 1) if spec.gen_tokens > 1 else first - d.started
        second = 0.0 if d.second_token is None else d.second_token - d.started
        return pb.DecodeReply(first_token_s=first - d.started, decode_s=elapsed, tpot_s=tpot, second_token_s=second,
                              blocks_written=d.blocks_written)

    async def _loop(self) -> None:
        """Event-driven decode: one wake-up per event, not per token.

        Between events (a sequence finishes, a Full Block completes, a request
        joins), nothing changes but the token counts, so the loop sleeps until the
        next event and advances by the whole number of steps that fit in the time
        slept. A virtual clock carries the fraction of a step left when a join
        interrupts, so no GPU time is lost or invented.
        """
        bt = self.geom.block_tokens
        clock = time.monotonic()  # when the next step starts
        while self.batch or self.joining:
            self.batch += self.joining
            self.joining.clear()
            self.wake.clear()
            step_s = self.compute.decode_step_s([d.context + d.generated for d in self.batch])
            until_event = min(min(d.spec.gen_tokens - d.generated, bt - (d.context + d.generated) % bt)
                              for d in self.batch)
            if step_s > 0:
                timeout = clock + until_event * step_s - time.monotonic()
                if timeout > 0:
                    try:
                        await asyncio.wait_for(self.wake.wait(), timeout)
                    except asyncio.TimeoutError:
                        pass
                steps = min(until_event, int((time.monotonic() - clock) / step_s + 1e-9))
            else:
                steps = until_event
            self._advance(steps, clock, step_s)
            clock += steps * step_s

    async def _loop_stepwise(self) -> None:
        """Decode with collectives: one wake-up per step, since every step ends with the batch's AllToAll
        (the event-driven loop above cannot skip steps whose length depends on the network)."""
        while self.batch or self.joining:
            self.batch += self.joining
            self.joining.clear()
            self.wake.clear()
            start = time.monotonic()
            await self.gpu.run(self.compute.decode_step_s([d.context + d.generated for d in self.batch]),
                               0, self.geom.layers, len(self.batch), "decode")
            self._advance(1, start, time.monotonic() - start)

    def _advance(self, steps: int, start: float, step_s: float) -> None:
        """Every sequence of the batch generated `steps` more tokens since `start`."""
        if steps <= 0:
            return
        bt = self.geom.block_tokens
        completed: list[tuple[str, int]] = []  # Full Blocks completed in these steps, all sequences
        writers: list[Decoding] = []
        for d in list(self.batch):
            before = d.context + d.generated
            if d.generated == 0:
                d.first_token = start + step_s
            if d.generated < 2 <= d.generated + steps:
                d.second_token = start + (2 - d.generated) * step_s
            d.generated += steps
            self.unfinished_tokens -= steps
            after = d.context + d.generated
            for boundary in range((before // bt + 1) * bt, after + 1, bt):
                d.blocks_written += 1
                completed.append((d.spec.trajectory, boundary // bt - 1))
                if not writers or writers[-1] is not d:
                    writers.append(d)
            if d.generated >= d.spec.gen_tokens:
                d.last_token = start + steps * step_s
                self.batch.remove(d)
                self.unfinished_requests -= 1
                d.done.set_result(None)
        if completed:  # persisted together: one write call per storage server for the whole batch
            write = self.tasks.spawn(self.tm.write_blocks(f"{self.name}-e{self.index}", completed))
            for d in writers:
                d.writes.append(write)

"""A prefill engine (PE): one GPU of a prefill node, its FIFO of ready requests and its batches.

A request's life on the PE (docs/serving-design.md): its DE reserves buffer room for the request's KV, its
hit KV is loaded into a DRAM buffer (PE read path: this node's SNIC; DE read path: the DE reads it and pushes
it here chunk by chunk), then it waits in the engine's FIFO. The engine batches ready requests while their
predicted compute fits the quota (paper section 5) and sends each layer chunk's KV to the DE engine as soon
as the chunk is computed. Basic mode (``layerwise`` false) reads everything, computes everything, then copies
the KV to the DE.
"""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass, field

from daemons import dualpath_pb2 as pb
from daemons.gpu import Compute, Gpu, layer_chunks
from daemons.kvbytes import span_content
from daemons.runtime import CONTROL_DEADLINE_S, TURN_DEADLINE_S, Tasks
from daemons.traffic_manager import TrafficManager

# Paper section 5: a PE engine batches ready requests FIFO while the batch's predicted attention time per
# layer fits this quota (real GPU seconds); the request that does not fit is chunked (binary search on its
# tokens). Basic (no layerwise prefill) also needs the whole batch's KV in the GPU's free HBM.
PREFILL_QUOTA_S = 0.300


@dataclass(eq=False)
class PrefillJob:
    """One request on its way through a PE engine: ready (its hit KV is in a DRAM buffer) when queued."""

    request: pb.PrefillRequest
    chunks: list[tuple[int, int]]       # layer groups of its layerwise transfers
    hit: bytes = b""                    # PE read path: the hit Full Blocks as read from storage (split: its part)
    fetch: asyncio.Task | None = None   # DE read path: the DE's Fetch call (it pushes the hit KV here)
    computed: int = 0                   # new tokens prefilled so far (a chunked request spans batches)
    new_full: bytes = b""               # the new tokens' Full Blocks, derived once
    pushes: list = field(default_factory=list)
    kv_bytes: int = 0
    done: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())

    @property
    def spec(self) -> pb.RequestSpec:
        return self.request.request

    @property
    def layerwise(self) -> bool:
        return self.request.layerwise

    @property
    def path(self) -> int:
        return self.request.path

    @property
    def own_blocks(self) -> int:
        """Hit blocks this PE node read itself (the first ones): all on the PE path, none on the DE path."""
        if self.path == pb.READ_PATH_PE:
            return self.spec.hit_blocks
        return min(self.request.pe_blocks, self.spec.hit_blocks) if self.path == pb.READ_PATH_SPLIT else 0


class PrefillEngine:
    """One PE GPU: a FIFO of ready prefills run in batches, and its load (what the scheduler balances)."""

    def __init__(self, index: int, tm: TrafficManager, compute: Compute, gpu: Gpu, tasks: Tasks,
                 quota_s: float = PREFILL_QUOTA_S):
        self.index, self.tm, self.compute, self.gpu, self.tasks = index, tm, compute, gpu, tasks
        self.geom = tm.geom
        self.quota_s = quota_s
        self.unfinished_requests = 0
        self.unfinished_tokens = 0
        self.prefills: collections.deque[PrefillJob] = collections.deque()  # ready, FIFO
        self.loop_task: asyncio.Task | None = None

    # -- a request's life ----------------------------------------------------------
    async def prefill(self, request: pb.PrefillRequest) -> pb.PrefillReply:
        """Reserve the DE buffer, load the hit KV into a DRAM buffer (PE or DE side), then queue on this
        engine; the batch loop computes it and sends its KV to the DE."""
        spec, tm = request.request, self.tm
        if spec.new_tokens < 1:
            raise ValueError(f"request {spec.request_id}: a prefill computes at least one new token")
        self.unfinished_requests += 1
        self.unfinished_tokens += spec.new_tokens
        job = PrefillJob(request, layer_chunks(self.geom.layers, spec.layer_chunks or 1))
        read_s = alloc_s = 0.0
        reserved = False
        try:
            with tm.queued(job.own_blocks):  # in this node's read queue from now until read
                if request.path == pb.READ_PATH_PE:  # the DE buffer first, all at once (see Node.Reserve)
                    alloc_s = (await tm.stub(request.de_mgmt, kv=False).Reserve(
                        pb.ReserveRequest(request_id=spec.request_id, bytes=tm.de_buffer_bytes(spec)),
                        timeout=TURN_DEADLINE_S)).waited_s
                    reserved = True
                elif request.path in (pb.READ_PATH_DE, pb.READ_PATH_SPLIT):  # Fetch reserves it: one call less
                    reserved = True
                if request.path in (pb.READ_PATH_DE, pb.READ_PATH_SPLIT):  # the DE reads (its part), then pushes
                    job.fetch = self.tasks.spawn(tm.stub(request.de_cnic, kv=True).Fetch(  # a data call: on its CNIC
                        pb.FetchRequest(request=spec, pe_cnic=request.pe_cnic, de_engine=request.de_engine,
                                        first_block=job.own_blocks), timeout=TURN_DEADLINE_S))
                if request.path in (pb.READ_PATH_PE, pb.READ_PATH_SPLIT):  # this node reads (its part)
                    job.hit, own_alloc_s, read_s = await tm.read(spec, reserve=True, blocks=job.own_blocks)
                    alloc_s += own_alloc_s
                    job.kv_bytes += len(job.hit)
            if job.fetch is not None:
                # ready once the DE holds the hit KV in its buffer: its first layer chunk has arrived
                await self._arrived(job, 1)
            t_ready = time.monotonic()
            self.prefills.append(job)
            if self.loop_task is None or self.loop_task.done():
                self.loop_task = self.tasks.spawn(self._loop())
            await job.done
            if job.fetch is not None:  # split: both sides read at once, the slower one counts
                fetched = await job.fetch
                read_s, alloc_s = max(read_s, fetched.read_s), max(alloc_s, fetched.alloc_s)
        except BaseException:
            if job.fetch is not None:
                job.fetch.cancel()
            if reserved:  # no Decode will come for it: give the DE its buffer back
                try:
                    await tm.stub(request.de_mgmt, kv=False).Release(pb.ReserveRequest(request_id=spec.request_id),
                                                                     timeout=CONTROL_DEADLINE_S)
                except Exception:  # noqa: BLE001 - a dead DE holds no buffer; the request's own error is raised
                    pass
            raise
        finally:
            if job in self.prefills:
                self.prefills.remove(job)
            tm.forget(spec.request_id)
            await tm.release(spec.request_id)
            self.unfinished_requests -= 1
            self.unfinished_tokens -= spec.new_tokens
        return pb.PrefillReply(wait_s=0.0, read_s=read_s, prefill_s=time.monotonic() - t_ready,
                               kv_bytes=job.kv_bytes, alloc_s=alloc_s)

    # -- batches -------------------------------------------------------------------
    def _cached(self, job: PrefillJob) -> int:
        return job.spec.hit_blocks * self.geom.block_tokens + job.computed

    def _predict_s(self, job: PrefillJob, tokens: int) -> float:
        return self.compute.prefill_attention_s([(self._cached(job), tokens)])

    def form_batch(self) -> list[tuple[PrefillJob, int]]:
        """The next batch, FIFO: whole requests while their predicted attention time per layer fits the quota
        (Basic: and their KV the free HBM), then as many tokens of the next one as fit the quota (binary
        search); a batch always makes progress."""
        batch: list[tuple[PrefillJob, int]] = []
        left = self.quota_s
        head = self.prefills[0]
        hbm_left = self.compute.prefill_hbm_tokens()
        for job in self.prefills:
            if job.done.done():
                continue
            if (job.layerwise, job.chunks) != (head.layerwise, head.chunks):
                break  # one batch, one way of moving KV
            remaining = job.spec.new_tokens - job.computed
            if not job.layerwise:  # Basic holds every layer's KV of the whole batch in HBM at once
                context = self._cached(job) + remaining
                if batch and context > hbm_left:
                    break
                hbm_left -= context
            t = self._predict_s(job, remaining)
            if t <= left:
                batch.append((job, remaining))
                left -= t
                continue
            lo, hi = 0, remaining  # the most tokens of this request that fit what is left of the quota
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if self._predict_s(job, mid) <= left:
                    lo = mid
                else:
                    hi = mid - 1
            if lo == 0 and not batch:
                lo = 1  # not even one token fits an empty quota: run one anyway
            if lo:
                batch.append((job, lo))
            break
        return batch

    async def _loop(self) -> None:
        """The PE engine's GPU: batches of ready requests, one after the other; idle (out of its EP group's
        lockstep) once none is left."""
        while True:
            await self.gpu.join()  # an EP group's GPUs start a batch only at a forward boundary
            await self._batches()
            await self.gpu.idle()
            if not self.prefills:  # none came while it left the group
                return

    async def _batches(self) -> None:
        while self.prefills:
            if self.prefills[0].done.done():  # failed while queued (a chunked request's first part)
                self.prefills.popleft()
                continue
            batch = self.form_batch()
            for job, tokens in batch:
                if job.computed + tokens == job.spec.new_tokens:
                    self.prefills.remove(job)  # leaves the queue with this batch (a chunked one stays first)
            try:
                await self._run_batch(batch)
            except Exception as exc:  # noqa: BLE001 - the requests fail, the engine goes on
                for job, _ in batch:
                    if not job.done.done():
                        job.done.set_exception(exc)
                    if job in self.prefills:
                        self.prefills.remove(job)

    async def _run_batch(self, batch: list[tuple[PrefillJob, int]]) -> None:
        """Compute one batch; layerwise, each layer chunk's KV leaves as soon as the chunk is computed."""
        head = batch[0][0]
        shape = [(self._cached(j), n) for j, n in batch]
        per_layer = self.compute.prefill_layers_s(shape)
        attention_s, parts = 0.0, None  # per layer, and each layer kind's own share: what lockstep combines
        if self.gpu.lockstep is not None:
            attention_s, parts = self.compute.prefill_attention_s(shape), self.compute.prefill_parts(shape)
        live = list(batch)
        if not head.layerwise:  # basic: every hit chunk present, the whole prefill, then the whole copy
            for job, _ in live:
                await self._arrived(job, len(job.chunks))
            # the whole hit KV goes DRAM -> HBM before the first layer: on the critical path, unlike layerwise
            copy_s = self.compute.h2d_s(sum(self._cached(j) for j, _ in live if j.computed == 0))
            await self.gpu.run(copy_s + sum(per_layer), 0, self.geom.layers, sum(n for _, n in live), "prefill",
                               attention_s=attention_s * self.geom.layers, parts=parts, pre_s=copy_s)
            for ci, chunk in enumerate(head.chunks):
                self._send(live, chunk, last=ci == len(head.chunks) - 1)
        else:
            for ci, chunk in enumerate(head.chunks):
                ok = []
                for job, n in live:  # this chunk's hit KV must be on the PE GPU
                    try:
                        await self._arrived(job, ci + 1)
                        ok.append((job, n))
                    except Exception as exc:  # noqa: BLE001 - that request fails, the batch goes on
                        job.done.set_exception(exc)
                live = ok
                lf, nl = chunk
                await self.gpu.run(sum(per_layer[lf:lf + nl]), lf, nl, sum(n for _, n in live), "prefill",
                                   chunk=(ci, len(head.chunks)), attention_s=attention_s * nl, parts=parts)
                self._send(live, chunk, last=ci == len(head.chunks) - 1)
        for job, n in live:
            job.computed += n
            if job.computed == job.spec.new_tokens:
                self.tasks.spawn(self._finish(job))

    async def _arrived(self, job: PrefillJob, chunks: int) -> None:
        """Wait until the first `chunks` layer chunks of a DE-read request's hit KV are here, every block of
        every layer of them (a chunk the DE never pushed is counted lost, and the request fails)."""
        if job.fetch is None or job.computed:
            return
        for chunk in job.chunks[:chunks]:
            await self.tm.await_kv(job.spec, chunk, job.own_blocks, job.spec.hit_blocks - job.own_blocks, job.fetch)

    def _send(self, live: list[tuple[PrefillJob, int]], chunk: tuple[int, int], last: bool) -> None:
        """Start sending a computed layer chunk of each request's KV PE -> DE, one call per request.
        PE read path: its hit KV with its first part and its new tokens' KV with its last part, layer chunk
        by layer chunk. DE read path: only the new tokens' KV (the DE holds the hit KV), all layers at once
        after the last chunk - it is ~2% of the bytes and one call instead of one per chunk. Split reads: the
        hit blocks this node read, and the new tokens' KV, layer chunk by layer chunk as on the PE path."""
        tm = self.tm
        for job, n in live:
            spec, msgs = job.spec, []
            final_part = job.computed + n == spec.new_tokens
            per_chunk = job.path in (pb.READ_PATH_PE, pb.READ_PATH_SPLIT)
            if per_chunk and job.computed == 0 and job.own_blocks:
                msgs += tm.kv_msgs(spec, job.hit, 0, job.own_blocks, chunk)
            if final_part and (per_chunk or (job.path == pb.READ_PATH_DE and last)):
                nb = tm.new_blocks(spec)
                if not job.new_full:
                    job.new_full = span_content(self.geom, spec.trajectory, spec.hit_blocks, nb)
                msgs += tm.kv_msgs(spec, job.new_full, spec.hit_blocks, nb, chunk if per_chunk else (0, 0))
            if msgs:
                job.kv_bytes += sum(len(m.data) for m in msgs)
                job.pushes.append(self.tasks.spawn(tm.push(job.request.de_cnic, msgs)))

    async def _finish(self, job: PrefillJob) -> None:
        """The request is prefilled: done once every KV message of it reached the DE."""
        try:
            await asyncio.gather(*job.pushes)
            if job.path in (pb.READ_PATH_DE, pb.READ_PATH_SPLIT):  # what the DE read itself
                job.kv_bytes += self.geom.span_bytes(job.spec.hit_blocks - job.own_blocks)
        except Exception as exc:  # noqa: BLE001 - handed to the waiting Prefill call
            if not job.done.done():
                job.done.set_exception(exc)
            return
        if not job.done.done():
            job.done.set_result(None)

"""Compute node daemon: a prefill (PE) or decode (DE) node with its g engines and traffic manager.

    python -m daemons.node --name pe1 --role pe --mgmt 10.9.1.1:7100 \
        --cnic 10.32.1.1:7200,10.33.1.1:7200,... --storage 10.10.3.1:7000,10.10.3.2:7000 \
        --model ds660b --layers 61 --block-tokens 64 --block-bytes 256 --dram-buffer-bytes N

One process per node. Engine i is reachable on the address of its own CNIC i
(``--cnic``, one entry per GPU); PushKv calls arriving there carry KV over the
compute fabric. Control calls (Prefill, Fetch, Decode, Status) arrive on the
management address. The traffic manager owns the node's SNIC (storage reads and
write-backs leave through it because the storage servers sit on the storage
fabric's subnet), its DRAM buffer (bounded: a read waits for room) and its
storage read queue (tokens waiting to be read, which the scheduler compares).

Data paths, per request (docs/serving-design.md):
- PE read: this PE node reads the hit blocks; per layer chunk it computes and
  pushes the chunk's hit + new KV to the DE engine.
- DE read: the PE asks the DE node to Fetch: the DE reads the hit blocks into
  its buffer and pushes them chunk by chunk to the PE engine; per chunk the PE
  computes and pushes only the new tokens' KV back.
- none (oracle): compute only.
Basic mode (``layerwise`` false) reads everything, computes everything, then
copies the KV to the DE. Decode runs per engine in batches; every completed
Full Block is written back to storage through this node's SNIC.

GPU compute is ``asyncio.sleep`` of the cost model's time x time scale: a
stand-in for GPU work only. Every KV byte moved is real and verified.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import csv
import functools
import itertools
import sys
import time
from dataclasses import dataclass, field
from typing import Protocol

import grpc

from daemons import costmodel
from daemons import dualpath_pb2 as pb
from daemons import dualpath_pb2_grpc as pb_grpc
from daemons.kvbytes import ExpectedSpans, KvGeometry, layer_slices, span_content, verify_span
from daemons.kvclient import Ledger, StorageClient, calls_of
from daemons.runtime import RpcCounter, grpc_options, rpc_counts, serve_until_stopped
from traffic.collectives import ROW_COLUMNS, CollectiveAgent, Completion, ReceiverStats, csv_row, layer_bytes

COLLECTIVE_COLUMNS = ["engine", "phase", *ROW_COLUMNS]  # a node's collectives.csv


# Paper section 5: a PE engine batches ready requests FIFO while the batch's predicted compute fits this
# quota (real GPU seconds); the request that does not fit is chunked (binary search on its tokens).
PREFILL_QUOTA_S = 0.300


class Compute(Protocol):
    """How long GPU work takes, in wall seconds (already multiplied by the time scale)."""

    def prefill_layers_s(self, batch: list[tuple[int, int]]) -> tuple[float, ...]: ...

    def decode_step_s(self, contexts: list[int]) -> float: ...


@dataclass(frozen=True)
class CostModelCompute:
    model: costmodel.ModelSpec
    time_scale: float

    def prefill_layers_s(self, batch: list[tuple[int, int]]) -> tuple[float, ...]:
        """Per-layer seconds of prefilling a batch of (cached, new) token counts on one engine."""
        return tuple(t * self.time_scale for t in _prefill_layers(self.model, tuple(batch)))

    def decode_step_s(self, contexts: list[int]) -> float:
        return costmodel.decode_step_time_s(self.model, contexts) * self.time_scale


@functools.lru_cache(maxsize=4096)
def _prefill_layers(model: costmodel.ModelSpec, batch: tuple[tuple[int, int], ...]) -> tuple[float, ...]:
    return costmodel.prefill_layer_times_s(model, list(batch))


class Collectives:
    """This node's engines' side of their group's MoE AllToAlls (``traffic.collectives``).

    The engine group is every engine of the same role (all PEs, or all DEs), each
    reachable on its CNIC address at the collective port. An engine cannot finish
    a prefill layer chunk or a decode step before its AllToAll for those layers
    completed (every peer acknowledged its share): a slow collective shows in
    TTFT and TPOT, as on GPUs. The bytes move in the node's collective agent, a
    process of its own (GPUs and NICs run collectives beside the host's work, not
    in its event loop). Completion times are kept for collectives.csv."""

    def __init__(self, model: costmodel.ModelSpec, byte_scale: float, group: list[str], own: list[str],
                 dscp: int | None, time_scale: float = 1.0):
        missing = [a for a in own if a not in group]
        if missing:
            raise ValueError(f"engine addresses {missing} are not in the collective group {group}")
        self.model, self.byte_scale, self.ranks = model, byte_scale, len(group)
        self.time_scale = time_scale
        self.agent = CollectiveAgent(group, own, dscp)
        self.records: list[tuple[int, str, Completion]] = []  # (engine, phase, completion)
        self.received: ReceiverStats | None = None  # what this node's receivers got, known at close
        self.t0 = time.monotonic()

    async def start(self) -> None:
        await self.agent.start()

    async def run(self, engine: int, layer_first: int, layers: int, tokens: int, phase: str) -> None:
        nbytes = layer_bytes(self.model, layer_first, layers, tokens, self.ranks, self.byte_scale)
        if nbytes <= 0 or self.ranks < 2:
            return
        self.records.append((engine, phase, await self.agent.run(engine, nbytes)))

    def write_csv(self, path: str, node: str) -> None:
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(COLLECTIVE_COLUMNS)
            w.writerows([f"{node}/{engine}", phase, *csv_row(c, self.t0, self.time_scale)]
                        for engine, phase, c in self.records)

    async def close(self) -> None:
        self.received = await self.agent.close()


def layer_chunks(layers: int, chunks: int) -> list[tuple[int, int]]:
    """Split `layers` into `chunks` contiguous groups: [(layer_first, layers), ...]."""
    chunks = max(1, min(chunks, layers))
    edges = [layers * i // chunks for i in range(chunks + 1)]
    return [(a, b - a) for a, b in itertools.pairwise(edges) if b > a]


class Buffer:
    """The node's DRAM KV buffer: reservations wait until there is room."""

    def __init__(self, capacity_bytes: int):
        self.capacity = capacity_bytes
        self.used = 0
        self._cond = asyncio.Condition()

    async def reserve(self, nbytes: int) -> None:
        if nbytes > self.capacity:
            raise ValueError(f"{nbytes} bytes can never fit a {self.capacity}-byte buffer")
        async with self._cond:
            await self._cond.wait_for(lambda: self.used + nbytes <= self.capacity)
            self.used += nbytes

    async def release(self, nbytes: int) -> None:
        async with self._cond:
            self.used -= nbytes
            self._cond.notify_all()


@dataclass
class _Decoding:
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


@dataclass(eq=False)
class _PrefillJob:
    """One request on its way through a PE engine: ready (its hit KV is in a DRAM buffer) when queued."""

    request: pb.PrefillRequest
    chunks: list[tuple[int, int]]       # layer groups of its layerwise transfers
    hit: bytes = b""                    # PE read path: the hit Full Blocks as read from storage
    arrivals: asyncio.Queue | None = None  # DE read path: hit KV layer chunks pushed by the DE
    fetch: asyncio.Task | None = None   # DE read path: the DE's Fetch call
    chunks_in: int = 0                  # DE read path: hit KV layer chunks arrived so far
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


class Engine:
    """One GPU: a FIFO of ready prefills run in batches, a decode batch, and its load."""

    def __init__(self, index: int):
        self.index = index
        self.unfinished_requests = 0
        self.unfinished_tokens = 0
        self.prefills: collections.deque[_PrefillJob] = collections.deque()  # ready, FIFO
        self.prefill_task: asyncio.Task | None = None
        self.batch: list[_Decoding] = []  # decoding now
        self.joining: list[_Decoding] = []  # join the batch at the next step boundary
        self.wake = asyncio.Event()  # set when a request joins
        self.loop_task: asyncio.Task | None = None


PUSH_BYTES = 16 << 20  # KV bytes per PushKv call at most: well inside gRPC's message limit (runtime.py)


class NodeService(pb_grpc.NodeServicer):
    def __init__(self, name: str, role: str, geom: KvGeometry, engines: int, storage: StorageClient,
                 compute: Compute, buffer_bytes: int, dscp_kv: int | None = None,
                 prefill_quota_s: float = PREFILL_QUOTA_S, collectives: Collectives | None = None,
                 push_bytes: int = PUSH_BYTES):
        self.name, self.role, self.geom = name, role, geom
        self.push_bytes = push_bytes
        self.engines = [Engine(i) for i in range(engines)]
        self.storage = storage
        self.compute = compute
        self.buffer = Buffer(buffer_bytes)
        self.read_queue_tokens = 0
        self.ledger = Ledger()
        self.rpcs: RpcCounter | None = None  # what this server served (set by serve)
        self.dscp_kv = dscp_kv
        self.prefill_quota_s = prefill_quota_s
        self.collectives = collectives
        self.expected = ExpectedSpans(geom)  # what the KV pushed to this node must be
        self._inboxes: dict[str, asyncio.Queue] = {}
        self._held: dict[str, int] = {}  # DE: buffer bytes a request holds until its decode starts
        self._channels: dict[str, tuple[grpc.aio.Channel, pb_grpc.NodeStub]] = {}
        self._tasks: set[asyncio.Task] = set()

    # -- plumbing --------------------------------------------------------------
    def _stub(self, address: str, kv: bool) -> pb_grpc.NodeStub:
        if address not in self._channels:
            ch = grpc.aio.insecure_channel(address, options=grpc_options(self.dscp_kv if kv else None))
            self._channels[address] = (ch, pb_grpc.NodeStub(ch))
        return self._channels[address][1]

    def _inbox(self, request_id: str) -> asyncio.Queue:
        return self._inboxes.setdefault(request_id, asyncio.Queue())

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        if self.collectives is not None:
            await self.collectives.close()
        for ch, _ in self._channels.values():
            await ch.close()
        await self.storage.close()

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _read(self, spec: pb.RequestSpec, reserve: bool) -> tuple[bytes, float, float]:
        """Storage -> this node's buffer, through the SNIC: the hit blocks' bytes (verified), the seconds
        waiting for buffer room and the seconds spent reading. `reserve` False: the buffer space was
        reserved already (a DE's Reserve)."""
        tokens = spec.hit_blocks * self.geom.block_tokens
        self.read_queue_tokens += tokens
        try:
            t_alloc = time.monotonic()
            if reserve:
                await self._reserve(spec.request_id, self.geom.span_bytes(spec.hit_blocks))
            t0 = time.monotonic()
            data = await self.storage.read(spec.request_id, spec.trajectory, 0, spec.hit_blocks, self.ledger)
            return data, t0 - t_alloc, time.monotonic() - t0
        finally:
            self.read_queue_tokens -= tokens

    async def _reserve(self, request_id: str, nbytes: int) -> None:
        await self.buffer.reserve(nbytes)
        self._held[request_id] = self._held.get(request_id, 0) + nbytes

    async def _release(self, request_id: str) -> None:
        held = self._held.pop(request_id, 0)
        if held:
            await self.buffer.release(held)

    def _forget(self, request_id: str) -> None:
        self._inboxes.pop(request_id, None)
        self.expected.drop(request_id)

    async def _next_chunk(self, inbox: asyncio.Queue, fetch: asyncio.Task):
        """The next chunk pushed by the DE, or the DE's failure: never wait forever on a dead fetch."""
        if not inbox.empty():
            return inbox.get_nowait()
        get = asyncio.ensure_future(inbox.get())
        await asyncio.wait({get, fetch}, return_when=asyncio.FIRST_COMPLETED)
        if get.done():
            return get.result()
        fetch.result()  # raises the DE's error, if any
        try:  # the fetch pushed every chunk before it returned: the item must be there
            return await asyncio.wait_for(get, timeout=5.0)
        except asyncio.TimeoutError:
            raise RuntimeError("the DE finished its fetch without pushing every chunk") from None

    def _new_blocks(self, spec: pb.RequestSpec) -> int:
        return self.geom.blocks_for_tokens(spec.new_tokens)

    def _kv_msgs(self, spec: pb.RequestSpec, full: bytes, first_block: int, blocks: int,
                 chunk: tuple[int, int]) -> list[pb.KvData]:
        """One layer chunk of `blocks` Full Blocks this node holds (`full`), as KV messages: pieces of whole
        blocks of at most ``push_bytes`` each (a long context at a large byte scale would otherwise exceed
        gRPC's message limit), in block order; the last piece ends at the chunk's last block."""
        lf, n = chunk
        lo, hi = self.geom.layer_range(lf, n)
        step = max(1, self.push_bytes // max(1, hi - lo))
        bb, view, out = self.geom.block_bytes, memoryview(full), []
        for b0 in range(0, max(blocks, 1), step):  # a chunk of no blocks is still one (empty) message
            k = min(step, blocks - b0)
            out.append(pb.KvData(request_id=spec.request_id,
                                 data=layer_slices(self.geom, view[b0 * bb:(b0 + k) * bb], k, lf, n),
                                 span=pb.BlockSpan(trajectory=spec.trajectory, first_block=first_block + b0,
                                                   blocks=k, layer_first=lf, layers=n)))
        return out

    async def _push(self, address: str, msgs: list[pb.KvData]) -> None:
        """The messages to `address` in order, in calls of at most ``push_bytes`` (one call if they fit:
        a gRPC call costs ~1 ms of CPU whatever its size)."""
        for call in calls_of(msgs, self.push_bytes):
            ack = await self._stub(address, kv=True).PushKv(pb.KvBatch(items=call))
            self.ledger.blocks_forwarded += sum(c.span.blocks for c in call)
            if ack.corrupt_blocks:
                raise RuntimeError(f"{address} received {ack.corrupt_blocks} corrupt blocks")

    # -- compute fabric ----------------------------------------------------------
    async def PushKv(self, request: pb.KvBatch, context):  # noqa: N802 - gRPC's name
        nbytes = corrupt = 0
        for msg in request.items:
            s = msg.span
            expected = self.expected.layer_slice(msg.request_id, s.trajectory, s.first_block, s.blocks,
                                                 s.layer_first, s.layers)
            bad = verify_span(self.geom, s.trajectory, s.first_block, s.blocks, s.layer_first, s.layers, msg.data,
                              expected)
            self.ledger.blocks_verified += s.blocks - len(bad)
            self.ledger.blocks_corrupt += len(bad)
            corrupt += len(bad)
            nbytes += len(msg.data)
            self._inbox(msg.request_id).put_nowait((s.layer_first, s.layers, s.first_block, s.blocks))
        return pb.PushAck(bytes=nbytes, corrupt_blocks=corrupt)

    # -- decode side: buffer admission ---------------------------------------------
    async def Reserve(self, request: pb.ReserveRequest, context):  # noqa: N802
        t0 = time.monotonic()
        await self._reserve(request.request_id, request.bytes)
        return pb.ReserveReply(waited_s=time.monotonic() - t0)

    async def Release(self, request: pb.ReserveRequest, context):  # noqa: N802
        self._forget(request.request_id)
        await self._release(request.request_id)
        return pb.ReserveReply()

    def de_buffer_bytes(self, spec: pb.RequestSpec) -> int:
        """What a request occupies in the DE buffer until its decode starts: hit + new KV."""
        return self.geom.span_bytes(spec.hit_blocks + self._new_blocks(spec))

    # -- prefill side ------------------------------------------------------------
    async def Prefill(self, request: pb.PrefillRequest, context):  # noqa: N802
        """Reserve the DE buffer, load the hit KV into a DRAM buffer (PE or DE side), then queue on the PE
        engine; the engine's batch loop computes it and sends its KV to the DE."""
        spec, eng = request.request, self.engines[request.pe_engine]
        if spec.new_tokens < 1:
            raise ValueError(f"request {spec.request_id}: a prefill computes at least one new token")
        eng.unfinished_requests += 1
        eng.unfinished_tokens += spec.new_tokens
        job = _PrefillJob(request, layer_chunks(self.geom.layers, spec.layer_chunks or 1))
        read_s = alloc_s = 0.0
        reserved = False
        try:
            if request.path == pb.READ_PATH_PE:  # the DE buffer first, all at once (see Reserve)
                alloc_s = (await self._stub(request.de_mgmt, kv=False).Reserve(
                    pb.ReserveRequest(request_id=spec.request_id, bytes=self.de_buffer_bytes(spec)))).waited_s
                reserved = True
            elif request.path == pb.READ_PATH_DE:  # Fetch reserves it: one call less per request
                reserved = True
            if request.path == pb.READ_PATH_PE:
                job.hit, own_alloc_s, read_s = await self._read(spec, reserve=True)
                alloc_s += own_alloc_s
                job.kv_bytes += len(job.hit)
            elif request.path == pb.READ_PATH_DE:
                job.arrivals = self._inbox(spec.request_id)
                job.fetch = self._spawn(self._stub(request.de_mgmt, kv=False).Fetch(
                    pb.FetchRequest(request=spec, pe_cnic=request.pe_cnic, de_engine=request.de_engine)))
                # ready once the DE holds the hit KV in its buffer: its first layer chunk has arrived
                await self._arrived(job, 1)
            t_ready = time.monotonic()
            eng.prefills.append(job)
            if eng.prefill_task is None or eng.prefill_task.done():
                eng.prefill_task = self._spawn(self._prefill_loop(eng))
            await job.done
            if job.fetch is not None:
                fetched = await job.fetch
                read_s, alloc_s = fetched.read_s, fetched.alloc_s
        except BaseException:
            if job.fetch is not None:
                job.fetch.cancel()
            if reserved:  # no Decode will come for it: give the DE its buffer back
                await self._stub(request.de_mgmt, kv=False).Release(
                    pb.ReserveRequest(request_id=spec.request_id))
            raise
        finally:
            if job in eng.prefills:
                eng.prefills.remove(job)
            self._forget(spec.request_id)
            await self._release(spec.request_id)
            eng.unfinished_requests -= 1
            eng.unfinished_tokens -= spec.new_tokens
        return pb.PrefillReply(wait_s=0.0, read_s=read_s, prefill_s=time.monotonic() - t_ready,
                               kv_bytes=job.kv_bytes, alloc_s=alloc_s)

    def _predict_s(self, job: _PrefillJob, tokens: int) -> float:
        cached = job.spec.hit_blocks * self.geom.block_tokens + job.computed
        return sum(self.compute.prefill_layers_s([(cached, tokens)]))

    def _form_batch(self, eng: Engine) -> list[tuple[_PrefillJob, int]]:
        """The next batch, FIFO: whole requests while their predicted compute fits the quota, then as many
        tokens of the next one as fit (binary search); a batch always makes progress."""
        batch: list[tuple[_PrefillJob, int]] = []
        left = self.prefill_quota_s
        head = eng.prefills[0]
        for job in eng.prefills:
            if job.done.done():
                continue
            if (job.layerwise, job.chunks) != (head.layerwise, head.chunks):
                break  # one batch, one way of moving KV
            remaining = job.spec.new_tokens - job.computed
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

    async def _prefill_loop(self, eng: Engine) -> None:
        """The PE engine's GPU: batches of ready requests, one after the other."""
        while eng.prefills:
            if eng.prefills[0].done.done():  # failed while queued (a chunked request's first part)
                eng.prefills.popleft()
                continue
            batch = self._form_batch(eng)
            for job, tokens in batch:
                if job.computed + tokens == job.spec.new_tokens:
                    eng.prefills.remove(job)  # leaves the queue with this batch (a chunked one stays first)
            try:
                await self._run_batch(eng, batch)
            except Exception as exc:  # noqa: BLE001 - the requests fail, the engine goes on
                for job, _ in batch:
                    if not job.done.done():
                        job.done.set_exception(exc)
                    if job in eng.prefills:
                        eng.prefills.remove(job)

    async def _compute(self, eng: Engine, seconds: float, layer_first: int, layers: int, tokens: int,
                       phase: str) -> None:
        """GPU time for some layers of the engine's batch, then (with collectives) their AllToAll."""
        await asyncio.sleep(seconds)
        if self.collectives is not None:
            await self.collectives.run(eng.index, layer_first, layers, tokens, phase)

    async def _run_batch(self, eng: Engine, batch: list[tuple[_PrefillJob, int]]) -> None:
        """Compute one batch; layerwise, each layer chunk's KV leaves as soon as the chunk is computed."""
        head = batch[0][0]
        per_layer = self.compute.prefill_layers_s(
            [(j.spec.hit_blocks * self.geom.block_tokens + j.computed, n) for j, n in batch])
        live = list(batch)
        if not head.layerwise:  # basic: every hit chunk present, the whole prefill, then the whole copy
            for job, _ in live:
                await self._arrived(job, len(job.chunks))
            await self._compute(eng, sum(per_layer), 0, self.geom.layers, sum(n for _, n in live), "prefill")
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
                await self._compute(eng, sum(per_layer[lf:lf + nl]), lf, nl, sum(n for _, n in live), "prefill")
                self._send(live, chunk, last=ci == len(head.chunks) - 1)
        for job, n in live:
            job.computed += n
            if job.computed == job.spec.new_tokens:
                self._spawn(self._finish(job))

    async def _arrived(self, job: _PrefillJob, chunks: int) -> None:
        """Wait until the first `chunks` layer chunks of a DE-read request's hit KV are here."""
        if job.arrivals is None or job.computed:
            return
        while job.chunks_in < chunks:
            _, _, first_block, blocks = await self._next_chunk(job.arrivals, job.fetch)
            if first_block + blocks >= job.spec.hit_blocks:  # the piece that ends a layer chunk
                job.chunks_in += 1

    def _send(self, live: list[tuple[_PrefillJob, int]], chunk: tuple[int, int], last: bool) -> None:
        """Start sending a computed layer chunk of each request's KV PE -> DE, one call per request.
        PE read path: its hit KV with its first part and its new tokens' KV with its last part, layer chunk
        by layer chunk. DE read path: only the new tokens' KV (the DE holds the hit KV), all layers at once
        after the last chunk - it is ~2% of the bytes and one call instead of one per chunk."""
        for job, n in live:
            spec, msgs = job.spec, []
            final_part = job.computed + n == spec.new_tokens
            if job.path == pb.READ_PATH_PE and job.computed == 0 and spec.hit_blocks:
                msgs += self._kv_msgs(spec, job.hit, 0, spec.hit_blocks, chunk)
            if final_part and (job.path == pb.READ_PATH_PE or (job.path == pb.READ_PATH_DE and last)):
                nb = self._new_blocks(spec)
                if not job.new_full:
                    job.new_full = span_content(self.geom, spec.trajectory, spec.hit_blocks, nb)
                msgs += self._kv_msgs(spec, job.new_full, spec.hit_blocks, nb,
                                      chunk if job.path == pb.READ_PATH_PE else (0, 0))
            if msgs:
                job.kv_bytes += sum(len(m.data) for m in msgs)
                job.pushes.append(self._spawn(self._push(job.request.de_cnic, msgs)))

    async def _finish(self, job: _PrefillJob) -> None:
        """The request is prefilled: done once every KV message of it reached the DE."""
        try:
            await asyncio.gather(*job.pushes)
            if job.path == pb.READ_PATH_DE:
                job.kv_bytes += self.geom.span_bytes(job.spec.hit_blocks)
        except Exception as exc:  # noqa: BLE001 - handed to the waiting Prefill call
            if not job.done.done():
                job.done.set_exception(exc)
            return
        if not job.done.done():
            job.done.set_result(None)

    # -- decode side -------------------------------------------------------------
    async def Fetch(self, request: pb.FetchRequest, context):  # noqa: N802
        """DE read path: storage -> this node's buffer, then the hit KV to the PE engine chunk by chunk,
        forwarding the very bytes read."""
        spec = request.request
        t0 = time.monotonic()
        await self._reserve(spec.request_id, self.de_buffer_bytes(spec))  # held until its decode starts
        alloc_s = time.monotonic() - t0
        data, _, read_s = await self._read(spec, reserve=False)
        for chunk in layer_chunks(self.geom.layers, spec.layer_chunks or 1):
            await self._push(request.pe_cnic, self._kv_msgs(spec, data, 0, spec.hit_blocks, chunk))
        return pb.FetchReply(read_s=read_s, alloc_s=alloc_s)

    async def Decode(self, request: pb.DecodeRequest, context):  # noqa: N802
        spec, eng = request.request, self.engines[request.de_engine]
        ctx = request.context_tokens
        # the KV is copied from the DRAM buffer into HBM: the buffer is free again
        self._forget(spec.request_id)
        await self._release(spec.request_id)
        # blocks completed by the prefilled tokens go to storage first
        first_new = spec.hit_blocks
        done_blocks = ctx // self.geom.block_tokens
        d = _Decoding(spec, ctx, done=asyncio.get_running_loop().create_future())
        if done_blocks > first_new:
            d.writes.append(self._spawn(self.storage.write(spec.request_id, spec.trajectory, first_new,
                                                           done_blocks - first_new, self.ledger)))
        d.blocks_written = max(0, done_blocks - first_new)
        eng.unfinished_requests += 1
        eng.unfinished_tokens += spec.gen_tokens
        eng.joining.append(d)
        eng.wake.set()
        if eng.loop_task is None or eng.loop_task.done():
            loop = self._decode_loop if self.collectives is None else self._decode_loop_stepwise
            eng.loop_task = self._spawn(loop(eng))
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

    async def _decode_loop(self, eng: Engine) -> None:
        """Event-driven decode: one wake-up per event, not per token.

        Every step generates one token for each sequence in the batch and lasts
        the cost model's step time for the batch's current contexts. Between
        events (a sequence finishes, a Full Block completes, a request joins),
        nothing changes but the token counts, so the loop sleeps until the next
        event and advances by the whole number of steps that fit in the time
        slept. A virtual clock carries the fraction of a step left when a join
        interrupts, so no GPU time is lost or invented.
        """
        bt = self.geom.block_tokens
        clock = time.monotonic()  # when the next step starts
        while eng.batch or eng.joining:
            eng.batch += eng.joining
            eng.joining.clear()
            eng.wake.clear()
            step_s = self.compute.decode_step_s([d.context + d.generated for d in eng.batch])
            until_event = min(min(d.spec.gen_tokens - d.generated, bt - (d.context + d.generated) % bt)
                              for d in eng.batch)
            if step_s > 0:
                timeout = clock + until_event * step_s - time.monotonic()
                if timeout > 0:
                    try:
                        await asyncio.wait_for(eng.wake.wait(), timeout)
                    except asyncio.TimeoutError:
                        pass
                steps = min(until_event, int((time.monotonic() - clock) / step_s + 1e-9))
            else:
                steps = until_event
            self._advance(eng, steps, clock, step_s)
            clock += steps * step_s

    async def _decode_loop_stepwise(self, eng: Engine) -> None:
        """Decode with collectives: one wake-up per step, since every step ends with the batch's AllToAll
        (the event-driven loop above cannot skip steps whose length depends on the network)."""
        while eng.batch or eng.joining:
            eng.batch += eng.joining
            eng.joining.clear()
            eng.wake.clear()
            start = time.monotonic()
            await self._compute(eng, self.compute.decode_step_s([d.context + d.generated for d in eng.batch]),
                                0, self.geom.layers, len(eng.batch), "decode")
            self._advance(eng, 1, start, time.monotonic() - start)

    def _advance(self, eng: Engine, steps: int, start: float, step_s: float) -> None:
        """Every sequence of the batch generated `steps` more tokens since `start`."""
        if steps <= 0:
            return
        bt = self.geom.block_tokens
        completed: list[tuple[str, int]] = []  # Full Blocks completed in these steps, all sequences
        writers: list[_Decoding] = []
        for d in list(eng.batch):
            before = d.context + d.generated
            if d.generated == 0:
                d.first_token = start + step_s
            if d.generated < 2 <= d.generated + steps:
                d.second_token = start + (2 - d.generated) * step_s
            d.generated += steps
            eng.unfinished_tokens -= steps
            after = d.context + d.generated
            for boundary in range((before // bt + 1) * bt, after + 1, bt):
                d.blocks_written += 1
                completed.append((d.spec.trajectory, boundary // bt - 1))
                if not writers or writers[-1] is not d:
                    writers.append(d)
            if d.generated >= d.spec.gen_tokens:
                d.last_token = start + steps * step_s
                eng.batch.remove(d)
                eng.unfinished_requests -= 1
                d.done.set_result(None)
        if completed:  # persisted together: one write call per storage server for the whole batch
            write = self._spawn(self.storage.write_blocks(f"{self.name}-e{eng.index}", completed, self.ledger))
            for d in writers:
                d.writes.append(write)

    async def Status(self, request, context):  # noqa: N802
        lg = self.ledger
        return pb.NodeStatus(
            name=self.name, role=self.role, read_queue_tokens=self.read_queue_tokens, buffer_bytes=self.buffer.used,
            engines=[pb.EngineStatus(engine=e.index, unfinished_requests=e.unfinished_requests,
                                     unfinished_tokens=max(0, e.unfinished_tokens)) for e in self.engines],
            ledger=pb.Ledger(blocks_read=lg.blocks_read, blocks_written=lg.blocks_written,
                             blocks_forwarded=lg.blocks_forwarded, blocks_verified=lg.blocks_verified,
                             blocks_corrupt=lg.blocks_corrupt, blocks_lost=lg.blocks_lost),
            rpcs=rpc_counts(self.rpcs))


async def serve(args) -> None:
    geom = KvGeometry(args.layers, args.block_tokens, args.block_bytes)
    model = costmodel.MODELS[args.model]
    storage = StorageClient(args.storage.split(","), geom, dscp=args.dscp_kv, rcvbuf=args.storage_rcvbuf)
    cnics = args.cnic.split(",")
    collectives = None
    if args.collective_group:
        cport = args.collective_group.split(",")[0].rsplit(":", 1)[1]
        collectives = Collectives(model, args.byte_scale, args.collective_group.split(","),
                                  [f"{c.rsplit(':', 1)[0]}:{cport}" for c in cnics], args.dscp_collective,
                                  args.time_scale)
        await collectives.start()
    service = NodeService(args.name, args.role, geom, len(cnics), storage,
                          CostModelCompute(model, args.time_scale), args.dram_buffer_bytes, args.dscp_kv,
                          prefill_quota_s=args.prefill_quota_s * args.time_scale, collectives=collectives,
                          push_bytes=args.push_bytes)
    service.rpcs = RpcCounter()
    server = grpc.aio.server(options=grpc_options(args.dscp_kv), interceptors=[service.rpcs])
    pb_grpc.add_NodeServicer_to_server(service, server)
    async def stop() -> None:
        if collectives is not None and args.collectives_out:
            collectives.write_csv(args.collectives_out, args.name)
        await service.close()

    await serve_until_stopped(server, [args.mgmt, *cnics], stop)


def parse_args(argv: list[str] | None = None):
    p = argparse.ArgumentParser(prog="python -m daemons.node", description=__doc__.splitlines()[0])
    p.add_argument("--name", required=True)
    p.add_argument("--role", choices=["pe", "de"], required=True)
    p.add_argument("--mgmt", required=True, help="ADDR:PORT on the management network")
    p.add_argument("--cnic", required=True, help="ADDR:PORT per engine (GPU), comma separated, engine 0 first")
    p.add_argument("--storage", required=True, help="storage servers ADDR:PORT, comma separated, in index order")
    p.add_argument("--model", choices=sorted(costmodel.MODELS), required=True)
    p.add_argument("--layers", type=int, required=True)
    p.add_argument("--block-tokens", type=int, required=True)
    p.add_argument("--block-bytes", type=int, required=True)
    p.add_argument("--dram-buffer-bytes", type=int, required=True)
    p.add_argument("--time-scale", type=float, default=1.0)
    p.add_argument("--prefill-quota-s", type=float, default=PREFILL_QUOTA_S,
                   help="compute quota of one PE batch, real GPU seconds (default: %(default)s, the paper's)")
    p.add_argument("--dscp-kv", type=int, default=None)
    p.add_argument("--storage-rcvbuf", type=int, default=None,
                   help="receive buffer of the storage reads' sockets, bytes (a lossless storage fabric's share)")
    p.add_argument("--push-bytes", type=int, default=PUSH_BYTES,
                   help="KV bytes per compute-fabric push call at most (default: %(default)s)")
    p.add_argument("--collective-group", default="",
                   help="ADDR:PORT of every engine of this role (this node's included): MoE AllToAll per layer "
                        "chunk / decode step; empty = no collectives")
    p.add_argument("--dscp-collective", type=int, default=None)
    p.add_argument("--byte-scale", type=float, default=1.0, help="scale of collective bytes (as of KV)")
    p.add_argument("--collectives-out", default="", help="write this node's collectives.csv here at stop")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    asyncio.run(serve(parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

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
import itertools
import sys
import time
from dataclasses import dataclass, field
from typing import Protocol

import grpc

from daemons import costmodel
from daemons import dualpath_pb2 as pb
from daemons import dualpath_pb2_grpc as pb_grpc
from daemons.kvbytes import KvGeometry, span_content, verify_span
from daemons.kvclient import Ledger, StorageClient
from daemons.runtime import grpc_options, serve_until_stopped


class Compute(Protocol):
    """How long GPU work takes, in wall seconds (already multiplied by the time scale)."""

    def prefill_s(self, cached_tokens: int, new_tokens: int, layer_first: int, layers: int) -> float: ...

    def decode_step_s(self, contexts: list[int]) -> float: ...


@dataclass(frozen=True)
class CostModelCompute:
    model: costmodel.ModelSpec
    time_scale: float

    def prefill_s(self, cached_tokens: int, new_tokens: int, layer_first: int, layers: int) -> float:
        times = costmodel.prefill_layer_times_s(self.model, [(cached_tokens, new_tokens)])
        return sum(times[layer_first:layer_first + layers]) * self.time_scale

    def decode_step_s(self, contexts: list[int]) -> float:
        return costmodel.decode_step_time_s(self.model, contexts) * self.time_scale


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
    blocks_written: int = 0
    done: asyncio.Future | None = None
    writes: list = field(default_factory=list)  # write-back tasks of this request


class Engine:
    """One GPU: a compute lock for prefill, a decode batch for decode, and its load."""

    def __init__(self, index: int):
        self.index = index
        self.gpu = asyncio.Lock()
        self.unfinished_requests = 0
        self.unfinished_tokens = 0
        self.batch: list[_Decoding] = []  # decoding now
        self.joining: list[_Decoding] = []  # join the batch at the next step boundary
        self.wake = asyncio.Event()  # set when a request joins
        self.loop_task: asyncio.Task | None = None


class NodeService(pb_grpc.NodeServicer):
    def __init__(self, name: str, role: str, geom: KvGeometry, engines: int, storage: StorageClient,
                 compute: Compute, buffer_bytes: int, dscp_kv: int | None = None):
        self.name, self.role, self.geom = name, role, geom
        self.engines = [Engine(i) for i in range(engines)]
        self.storage = storage
        self.compute = compute
        self.buffer = Buffer(buffer_bytes)
        self.read_queue_tokens = 0
        self.ledger = Ledger()
        self.dscp_kv = dscp_kv
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
        for ch, _ in self._channels.values():
            await ch.close()
        await self.storage.close()

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _read(self, spec: pb.RequestSpec, reserve: bool) -> float:
        """Storage -> this node's buffer, through the SNIC; returns seconds spent reading.
        `reserve` False: the buffer space was reserved already (a DE's Reserve)."""
        tokens = spec.hit_blocks * self.geom.block_tokens
        self.read_queue_tokens += tokens
        try:
            if reserve:
                await self._reserve(spec.request_id, self.geom.span_bytes(spec.hit_blocks))
            t0 = time.monotonic()
            await self.storage.read(spec.request_id, spec.trajectory, 0, spec.hit_blocks, self.ledger)
            return time.monotonic() - t0
        finally:
            self.read_queue_tokens -= tokens

    async def _reserve(self, request_id: str, nbytes: int) -> None:
        await self.buffer.reserve(nbytes)
        self._held[request_id] = self._held.get(request_id, 0) + nbytes

    async def _release(self, request_id: str) -> None:
        held = self._held.pop(request_id, 0)
        if held:
            await self.buffer.release(held)

    async def _next_chunk(self, inbox: asyncio.Queue, fetch: asyncio.Task):
        """The next chunk pushed by the DE, or the DE's failure: never wait forever on a dead fetch."""
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

    def _chunk_msgs(self, spec: pb.RequestSpec, chunk: tuple[int, int], hit: bool, new: bool) -> list[pb.KvData]:
        lf, n = chunk
        spans = ([(0, spec.hit_blocks)] if hit and spec.hit_blocks else []) + \
                ([(spec.hit_blocks, self._new_blocks(spec))] if new and spec.new_tokens else [])
        return [pb.KvData(request_id=spec.request_id, data=span_content(self.geom, spec.trajectory, f, c, lf, n),
                          span=pb.BlockSpan(trajectory=spec.trajectory, first_block=f, blocks=c, layer_first=lf,
                                            layers=n)) for f, c in spans]

    async def _push(self, address: str, msgs: list[pb.KvData]) -> None:
        if not msgs:
            return
        ack = await self._stub(address, kv=True).PushKv(iter(msgs))
        self.ledger.blocks_forwarded += sum(m.span.blocks for m in msgs)
        if ack.corrupt_blocks:
            raise RuntimeError(f"{address} received {ack.corrupt_blocks} corrupt blocks")

    # -- compute fabric ----------------------------------------------------------
    async def PushKv(self, request_iterator, context):  # noqa: N802 - gRPC's name
        nbytes = corrupt = 0
        async for msg in request_iterator:
            s = msg.span
            bad = verify_span(self.geom, s.trajectory, s.first_block, s.blocks, s.layer_first, s.layers, msg.data)
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
        self._inboxes.pop(request.request_id, None)
        await self._release(request.request_id)
        return pb.ReserveReply()

    def de_buffer_bytes(self, spec: pb.RequestSpec) -> int:
        """What a request occupies in the DE buffer until its decode starts: hit + new KV."""
        return self.geom.span_bytes(spec.hit_blocks + self._new_blocks(spec))

    # -- prefill side ------------------------------------------------------------
    async def Prefill(self, request: pb.PrefillRequest, context):  # noqa: N802
        spec, eng = request.request, self.engines[request.pe_engine]
        cached = spec.hit_blocks * self.geom.block_tokens
        eng.unfinished_requests += 1
        eng.unfinished_tokens += spec.new_tokens
        fetch = None
        read_s = 0.0
        kv_bytes = 0
        chunks = layer_chunks(self.geom.layers, spec.layer_chunks or 1)
        reserved = False
        try:
            if request.path != pb.READ_PATH_NONE:  # the DE buffer first, all at once (see Reserve)
                await self._stub(request.de_mgmt, kv=False).Reserve(
                    pb.ReserveRequest(request_id=spec.request_id, bytes=self.de_buffer_bytes(spec)))
                reserved = True
            if request.path == pb.READ_PATH_PE:
                read_s = await self._read(spec, reserve=True)
                kv_bytes += self.geom.span_bytes(spec.hit_blocks)
            elif request.path == pb.READ_PATH_DE:
                fetch = self._spawn(self._stub(request.de_mgmt, kv=False).Fetch(
                    pb.FetchRequest(request=spec, pe_cnic=request.pe_cnic, de_engine=request.de_engine)))
            t_compute = time.monotonic()
            if not request.layerwise:  # basic: the whole prefill, then the whole copy
                async with eng.gpu:
                    await asyncio.sleep(self.compute.prefill_s(cached, spec.new_tokens, 0, self.geom.layers))
            inbox = self._inbox(spec.request_id)
            for chunk in chunks:
                if request.path == pb.READ_PATH_DE:
                    await self._next_chunk(inbox, fetch)  # this chunk's hit KV arrived from the DE buffer
                    kv_bytes += self.geom.span_bytes(spec.hit_blocks, *chunk)
                if request.layerwise:
                    async with eng.gpu:
                        await asyncio.sleep(self.compute.prefill_s(cached, spec.new_tokens, *chunk))
                if request.path != pb.READ_PATH_NONE:
                    msgs = self._chunk_msgs(spec, chunk, hit=request.path == pb.READ_PATH_PE, new=True)
                    await self._push(request.de_cnic, msgs)
                    kv_bytes += sum(len(m.data) for m in msgs)
            if fetch is not None:
                read_s = (await fetch).read_s
        except BaseException:
            if reserved:  # no Decode will come for it: give the DE its buffer back
                await self._stub(request.de_mgmt, kv=False).Release(
                    pb.ReserveRequest(request_id=spec.request_id))
            raise
        finally:
            self._inboxes.pop(spec.request_id, None)
            await self._release(spec.request_id)
            eng.unfinished_requests -= 1
            eng.unfinished_tokens -= spec.new_tokens
        return pb.PrefillReply(wait_s=0.0, read_s=read_s, prefill_s=time.monotonic() - t_compute, kv_bytes=kv_bytes)

    # -- decode side -------------------------------------------------------------
    async def Fetch(self, request: pb.FetchRequest, context):  # noqa: N802
        spec = request.request
        read_s = await self._read(spec, reserve=False)  # reserved by the PE's Reserve; held until decode
        for chunk in layer_chunks(self.geom.layers, spec.layer_chunks or 1):
            await self._push(request.pe_cnic, self._chunk_msgs(spec, chunk, hit=True, new=False))
        return pb.FetchReply(read_s=read_s)

    async def Decode(self, request: pb.DecodeRequest, context):  # noqa: N802
        spec, eng = request.request, self.engines[request.de_engine]
        ctx = request.context_tokens
        # the KV is copied from the DRAM buffer into HBM: the buffer is free again
        self._inboxes.pop(spec.request_id, None)
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
            eng.loop_task = self._spawn(self._decode_loop(eng))
        await d.done
        await asyncio.gather(*d.writes)  # persisted before the turn counts as done
        elapsed = time.monotonic() - d.started
        return pb.DecodeReply(first_token_s=(d.first_token or d.started) - d.started, decode_s=elapsed,
                              tpot_s=elapsed / max(1, spec.gen_tokens), blocks_written=d.blocks_written)

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

    def _advance(self, eng: Engine, steps: int, start: float, step_s: float) -> None:
        """Every sequence of the batch generated `steps` more tokens since `start`."""
        if steps <= 0:
            return
        bt = self.geom.block_tokens
        for d in list(eng.batch):
            before = d.context + d.generated
            if d.generated == 0:
                d.first_token = start + step_s
            d.generated += steps
            eng.unfinished_tokens -= steps
            after = d.context + d.generated
            for boundary in range((before // bt + 1) * bt, after + 1, bt):  # Full Blocks completed: persist
                d.blocks_written += 1
                d.writes.append(self._spawn(self.storage.write(
                    d.spec.request_id, d.spec.trajectory, boundary // bt - 1, 1, self.ledger)))
            if d.generated >= d.spec.gen_tokens:
                eng.batch.remove(d)
                eng.unfinished_requests -= 1
                d.done.set_result(None)

    async def Status(self, request, context):  # noqa: N802
        lg = self.ledger
        return pb.NodeStatus(
            name=self.name, role=self.role, read_queue_tokens=self.read_queue_tokens, buffer_bytes=self.buffer.used,
            engines=[pb.EngineStatus(engine=e.index, unfinished_requests=e.unfinished_requests,
                                     unfinished_tokens=max(0, e.unfinished_tokens)) for e in self.engines],
            ledger=pb.Ledger(blocks_read=lg.blocks_read, blocks_written=lg.blocks_written,
                             blocks_forwarded=lg.blocks_forwarded, blocks_verified=lg.blocks_verified,
                             blocks_corrupt=lg.blocks_corrupt, blocks_lost=lg.blocks_lost))


async def serve(args) -> None:
    geom = KvGeometry(args.layers, args.block_tokens, args.block_bytes)
    model = costmodel.MODELS[args.model]
    storage = StorageClient(args.storage.split(","), geom, dscp=args.dscp_kv)
    cnics = args.cnic.split(",")
    service = NodeService(args.name, args.role, geom, len(cnics), storage,
                          CostModelCompute(model, args.time_scale), args.dram_buffer_bytes, args.dscp_kv)
    server = grpc.aio.server(options=grpc_options(args.dscp_kv))
    pb_grpc.add_NodeServicer_to_server(service, server)
    await serve_until_stopped(server, [args.mgmt, *cnics], service.close)


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
    p.add_argument("--dscp-kv", type=int, default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    asyncio.run(serve(parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

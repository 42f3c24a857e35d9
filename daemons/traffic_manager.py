"""A compute node's traffic manager (paper section 4): its SNIC, its DRAM buffer, its storage read queue, and
the KV it pushes to and receives from other nodes' engines over the compute fabric.

Storage reads and write-backs leave through the node's SNIC (the storage servers sit on the storage fabric's
subnet). The DRAM buffer is bounded: a read waits for room. The read queue is the tokens waiting to be read,
which the scheduler compares. Pushes go to an engine's CNIC address, marked with the KV traffic class; every
KV byte pushed here is verified against its derived contents, and every block of every layer a request needs
is checked to be here (:mod:`daemons.coverage`) before an engine uses it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import grpc

from daemons import dualpath_pb2 as pb
from daemons import dualpath_pb2_grpc as pb_grpc
from daemons.coverage import Received
from daemons.gpu import layer_chunks
from daemons.kvbytes import KvGeometry, layer_slices, verify_span
from daemons.kvclient import KvIncomplete, StorageClient, calls_of
from daemons.ledger import Ledger
from daemons.runtime import DATA_DEADLINE_S, grpc_options

PUSH_BYTES = 16 << 20  # KV bytes per PushKv call at most: well inside gRPC's message limit (runtime.py)


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


class TrafficManager:
    def __init__(self, geom: KvGeometry, storage: StorageClient, buffer_bytes: int, dscp_kv: int | None = None,
                 push_bytes: int = PUSH_BYTES, ledger: Ledger | None = None):
        self.geom = geom
        self.storage = storage
        self.buffer = Buffer(buffer_bytes)
        self.push_bytes = push_bytes
        self.dscp_kv = dscp_kv
        self.read_queue_tokens = 0
        self.read_tokens = 0  # ever taken into the read queue: the scheduler adds what it placed since
        self.read_queue_requests = 0  # requests with blocks in the read queue (`dpemu top` shows them)
        self.ledger = Ledger() if ledger is None else ledger  # the node's (a file: Ledger.in_file)
        self._received: dict[str, Received] = {}
        self._held: dict[str, int] = {}  # buffer bytes a request holds (a DE: until its decode starts)
        self._channels: dict[str, tuple[grpc.aio.Channel, pb_grpc.NodeStub]] = {}

    async def close(self) -> None:
        for ch, _ in self._channels.values():
            await ch.close()
        if self.storage is not None:
            await self.storage.close()

    def stub(self, address: str, kv: bool) -> pb_grpc.NodeStub:
        """A peer node: on its management address (kv False) or an engine's CNIC (kv True, marked as KV)."""
        if address not in self._channels:
            ch = grpc.aio.insecure_channel(address, options=grpc_options(self.dscp_kv if kv else None))
            self._channels[address] = (ch, pb_grpc.NodeStub(ch))
        return self._channels[address][1]

    # -- sizes -------------------------------------------------------------------
    def new_blocks(self, spec: pb.RequestSpec) -> int:
        return self.geom.blocks_for_tokens(spec.new_tokens)

    def de_buffer_bytes(self, spec: pb.RequestSpec) -> int:
        """What a request occupies in the DE buffer until its decode starts: hit + new KV."""
        return self.geom.span_bytes(spec.hit_blocks + self.new_blocks(spec))

    # -- DRAM buffer ---------------------------------------------------------------
    async def reserve(self, request_id: str, nbytes: int) -> None:
        await self.buffer.reserve(nbytes)
        self._held[request_id] = self._held.get(request_id, 0) + nbytes

    async def release(self, request_id: str) -> None:
        held = self._held.pop(request_id, 0)
        if held:
            await self.buffer.release(held)

    def forget(self, request_id: str) -> None:
        """The request left this node: drop what was kept of its KV's spans."""
        self._received.pop(request_id, None)

    # -- SNIC ----------------------------------------------------------------------
    async def read(self, spec: pb.RequestSpec, reserve: bool, first_block: int = 0,
                   blocks: int | None = None) -> tuple[bytes, float, float]:
        """Storage -> this node's buffer, through the SNIC: the bytes (verified) of hit blocks `first_block`
        .. + `blocks` (default: all of them), the seconds waiting for buffer room and the seconds spent reading.
        `reserve` False: the buffer space was reserved already (a DE's Reserve)."""
        blocks = spec.hit_blocks - first_block if blocks is None else blocks
        t_alloc = time.monotonic()
        if reserve:
            await self.reserve(spec.request_id, self.geom.span_bytes(blocks))
        t0 = time.monotonic()
        data = await self.storage.read(spec.request_id, spec.trajectory, first_block, blocks, self.ledger) \
            if blocks else b""
        return data, t0 - t_alloc, time.monotonic() - t0

    @contextlib.contextmanager
    def queued(self, blocks: int):
        """`blocks` hit blocks in this node's storage read queue (the paper's, which the scheduler reads in this
        node's Status) from the moment the request reaches the node until they are read."""
        tokens = blocks * self.geom.block_tokens
        self.read_queue_tokens += tokens
        self.read_tokens += tokens
        self.read_queue_requests += blocks > 0
        try:
            yield
        finally:
            self.read_queue_tokens -= tokens
            self.read_queue_requests -= blocks > 0

    async def fetch(self, request: pb.FetchRequest) -> pb.FetchReply:
        """DE read path: storage -> this node's buffer, then the hit KV to the PE engine chunk by chunk,
        forwarding the very bytes read. Split reads: only hit blocks from `first_block` on (the PE node
        reads the ones before)."""
        spec, first = request.request, request.first_block
        if first > spec.hit_blocks:
            raise ValueError(f"request {spec.request_id}: first block {first} past its {spec.hit_blocks} hit blocks")
        try:
            with self.queued(spec.hit_blocks - first):
                t0 = time.monotonic()
                await self.reserve(spec.request_id, self.de_buffer_bytes(spec))  # held until its decode starts
                alloc_s = time.monotonic() - t0
                data, _, read_s = await self.read(spec, reserve=False, first_block=first)
            self.received(spec.request_id).add(spec.trajectory, 0, 0, first, spec.hit_blocks - first)  # verified
            for chunk in layer_chunks(self.geom.layers, spec.layer_chunks or 1):
                await self.push(request.pe_cnic, self.kv_msgs(spec, data, first, spec.hit_blocks - first, chunk))
        except BaseException:  # failed or cancelled: no decode will come for it (a PE's Release may come first)
            self.forget(spec.request_id)
            await self.release(spec.request_id)
            raise
        return pb.FetchReply(read_s=read_s, alloc_s=alloc_s)

    def write(self, request_id: str, trajectory: str, first_block: int, blocks: int):
        """Write-back of a request's Full Blocks through the SNIC (a coroutine)."""
        return self.storage.write(request_id, trajectory, first_block, blocks, self.ledger)

    def write_blocks(self, request_id: str, blocks: list[tuple[str, int]]):
        """Write-back of (trajectory, block) Full Blocks of several requests at once (a coroutine)."""
        return self.storage.write_blocks(request_id, blocks, self.ledger)

    # -- compute fabric: pushes out --------------------------------------------------
    def kv_msgs(self, spec: pb.RequestSpec, full: bytes, first_block: int, blocks: int,
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

    async def push(self, address: str, msgs: list[pb.KvData]) -> None:
        """The messages to `address` in order, in calls of at most ``push_bytes`` (one call if they fit:
        a gRPC call costs ~0.4 ms of CPU whatever its size)."""
        for call in calls_of(msgs, self.push_bytes):
            ack = await self.stub(address, kv=True).PushKv(pb.KvBatch(items=call), timeout=DATA_DEADLINE_S)
            self.ledger.blocks_forwarded += sum(c.span.blocks for c in call)
            if ack.corrupt_blocks:
                raise RuntimeError(f"{address} received {ack.corrupt_blocks} corrupt blocks")

    # -- compute fabric: pushes in ---------------------------------------------------
    def received(self, request_id: str) -> Received:
        """The spans of a request's KV on this node: pushed here (verified) or read here."""
        return self._received.setdefault(request_id, Received())

    def receive(self, batch: pb.KvBatch) -> pb.PushAck:
        """Verify every byte of a push against the span it names, count it, record its intact blocks."""
        nbytes = corrupt = 0
        for msg in batch.items:
            s = msg.span
            bad = verify_span(self.geom, s.trajectory, s.first_block, s.blocks, s.layer_first, s.layers, msg.data)
            self.ledger.blocks_verified += s.blocks - len(bad)
            self.ledger.blocks_corrupt += len(bad)
            corrupt += len(bad)
            nbytes += len(msg.data)
            self.received(msg.request_id).add(s.trajectory, s.layer_first, s.layers, s.first_block, s.blocks, bad)
        return pb.PushAck(bytes=nbytes, corrupt_blocks=corrupt)

    def _shortfall(self, spec: pb.RequestSpec, missing: int, where: str) -> KvIncomplete:
        self.ledger.blocks_lost += missing
        return KvIncomplete(f"{spec.request_id}: {missing} blocks of its KV never arrived ({where})")

    async def await_kv(self, spec: pb.RequestSpec, chunk: tuple[int, int], first_block: int, blocks: int,
                       fetch: asyncio.Task) -> None:
        """Wait until blocks [first_block, +blocks) of layer chunk `chunk` of the request are here, pushed by the
        DE's `fetch`. Its failure is raised; a fetch that ended without pushing them all is a shortfall: the
        missing blocks are counted lost and KvIncomplete is raised."""
        got = self.received(spec.request_id)
        while missing := got.missing(spec.trajectory, chunk, first_block, blocks):
            if fetch.done():
                fetch.result()  # raises the DE's error, if any
                raise self._shortfall(spec, len(missing), f"layers {chunk[0]}..{sum(chunk) - 1} from the DE")
            got.changed.clear()
            changed = asyncio.ensure_future(got.changed.wait())
            await asyncio.wait({changed, fetch}, return_when=asyncio.FIRST_COMPLETED)
            changed.cancel()

    def check_kv(self, spec: pb.RequestSpec) -> None:
        """Before decode: every block of the request (hit and new) of every layer chunk is here, pushed or read
        by this node; what is not is counted lost and KvIncomplete raised."""
        got = self._received.get(spec.request_id, Received())
        blocks = spec.hit_blocks + self.new_blocks(spec)
        missing = sum(len(got.missing(spec.trajectory, c, 0, blocks))
                      for c in layer_chunks(self.geom.layers, spec.layer_chunks or 1))
        if missing:
            raise self._shortfall(spec, missing, "checked before decode")

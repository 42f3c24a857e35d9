"""Client side of KV movement: read a context from the storage servers, write blocks back,
and keep the ledger that every run must close clean.

The node daemons' traffic managers use this; so do tests (on 127.0.0.1). A read
of a trajectory's blocks is split by :func:`daemons.storage.server_for` and
issued to every storage server at once (one stream each), so a node's SNIC is
filled from all servers as in the paper's striped 3FS. Every block received is
verified against its derived contents (:mod:`daemons.kvbytes`); a corrupt block
or one that never arrives is counted, never silently accepted.
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass

import grpc

from daemons import dualpath_pb2 as pb
from daemons import dualpath_pb2_grpc as pb_grpc
from daemons.kvbytes import KvGeometry, span_content, verify_span
from daemons.runtime import grpc_options
from daemons.storage import server_for


class KvIncomplete(RuntimeError):
    """A read did not deliver every block intact (already counted in the ledger): nothing to forward."""


@dataclass
class Ledger:
    """Block counts of one node (or of the whole run, summed). A clean run has
    corrupt == lost == 0."""

    blocks_read: int = 0
    blocks_written: int = 0
    blocks_forwarded: int = 0
    blocks_verified: int = 0
    blocks_corrupt: int = 0
    blocks_lost: int = 0

    def add(self, other: "Ledger") -> "Ledger":
        return Ledger(**{k: v + getattr(other, k) for k, v in asdict(self).items()})

    @property
    def clean(self) -> bool:
        return self.blocks_corrupt == 0 and self.blocks_lost == 0


WRITE_BYTES = 16 << 20  # KV bytes per storage Write call at most: well inside gRPC's message limit


def calls_of(msgs: list[pb.KvData], limit: int) -> list[list[pb.KvData]]:
    """The messages in order, grouped into calls of at most `limit` bytes (a message larger than that alone)."""
    out: list[list[pb.KvData]] = []
    size = 0
    for m in msgs:
        if not out or size + len(m.data) > limit:
            out.append([])
            size = 0
        out[-1].append(m)
        size += len(m.data)
    return out


def _runs(blocks: list[int], longest: int = 1 << 30) -> list[tuple[int, int]]:
    """[3, 4, 5, 9] -> [(3, 3), (9, 1)]: (first block, count) of consecutive runs, none longer than
    `longest` blocks."""
    out: list[tuple[int, int]] = []
    for b in blocks:
        if out and out[-1][0] + out[-1][1] == b and out[-1][1] < longest:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((b, 1))
    return out


class StorageClient:
    """Channels to every storage server, opened once per node (as its SNIC's sessions)."""

    def __init__(self, addresses: list[str], geom: KvGeometry, dscp: int | None = None, rcvbuf: int | None = None):
        self.geom = geom
        # `rcvbuf`: the socket's receive buffer (a lossless fabric's share of the reader's SNIC queue); the kernel
        # doubles what SO_RCVBUF asks for, so half of it is asked
        opts = grpc_options(dscp) + ([("grpc.tcp_receive_buffer_size", rcvbuf // 2)] if rcvbuf else [])
        self._channels = [grpc.aio.insecure_channel(a, options=opts) for a in addresses]
        self._stubs = [pb_grpc.StorageStub(c) for c in self._channels]

    async def close(self) -> None:
        for ch in self._channels:
            await ch.close()

    def _by_server(self, trajectory: str, first_block: int, blocks: int) -> dict[int, list[int]]:
        n = len(self._stubs)
        per: dict[int, list[int]] = {}
        for b in range(first_block, first_block + blocks):
            per.setdefault(server_for(trajectory, b, n), []).append(b)
        return per

    async def read(self, request_id: str, trajectory: str, first_block: int, blocks: int,
                   ledger: Ledger) -> bytes:
        """Read and verify Full Blocks [first_block, first_block + blocks); return their bytes in block
        order (the node's buffer contents: what it forwards). A block that never arrived is counted lost,
        a damaged one corrupt, and then KvIncomplete is raised: a node never forwards KV it does not hold."""
        per = self._by_server(trajectory, first_block, blocks)
        bb = self.geom.block_bytes
        span = bytearray(blocks * bb)

        bad_blocks: list[int] = []

        async def one(server: int, wanted: list[int]) -> int:
            req = pb.ReadRequest(request_id=request_id, spans=[
                pb.BlockSpan(trajectory=trajectory, first_block=f, blocks=c) for f, c in _runs(wanted)])
            got: set[int] = set()
            try:
                async for msg in self._stubs[server].Read(req):
                    s = msg.span
                    if s.trajectory != trajectory or s.first_block < first_block or \
                            s.first_block + s.blocks > first_block + blocks:
                        continue  # not what was asked: whatever is missing is counted lost below
                    bad = verify_span(self.geom, s.trajectory, s.first_block, s.blocks, 0, 0, msg.data)
                    bad_blocks.extend(bad)
                    ledger.blocks_corrupt += len(bad)
                    ledger.blocks_verified += s.blocks - len(bad)
                    got.update(range(s.first_block, s.first_block + s.blocks))
                    at = (s.first_block - first_block) * bb
                    data = msg.data[:s.blocks * bb]
                    span[at:at + len(data)] = data
            except grpc.aio.AioRpcError:
                pass  # whatever did not arrive is counted as lost below
            ledger.blocks_read += len(got & set(wanted))
            ledger.blocks_lost += len(set(wanted) - got)
            return len(set(wanted) - got)

        lost = sum(await asyncio.gather(*(one(s, w) for s, w in per.items())))
        if lost or bad_blocks:
            raise KvIncomplete(f"{request_id}: reading {blocks} blocks of {trajectory} from storage: "
                               f"{lost} lost, {len(bad_blocks)} corrupt")
        return bytes(span)

    async def write(self, request_id: str, trajectory: str, first_block: int, blocks: int,
                    ledger: Ledger) -> int:
        """Write Full Blocks [first_block, first_block + blocks) of a trajectory; return bytes sent."""
        return await self.write_blocks(request_id, [(trajectory, b) for b in range(first_block, first_block + blocks)],
                                       ledger)

    async def write_blocks(self, request_id: str, blocks: list[tuple[str, int]], ledger: Ledger) -> int:
        """Write Full Blocks, given as (trajectory, block), with their derived contents: one call per storage
        server whatever the number of trajectories (a decode batch completes blocks of several at once)."""
        per: dict[int, list[tuple[str, int]]] = {}
        for traj, b in blocks:
            per.setdefault(server_for(traj, b, len(self._stubs)), []).append((traj, b))

        async def one(server: int, wanted: list[tuple[str, int]]) -> int:
            by_traj: dict[str, list[int]] = {}
            for traj, b in wanted:
                by_traj.setdefault(traj, []).append(b)
            longest = max(1, WRITE_BYTES // self.geom.block_bytes)
            msgs = [pb.KvData(request_id=request_id, span=pb.BlockSpan(trajectory=traj, first_block=f, blocks=c),
                              data=span_content(self.geom, traj, f, c))
                    for traj, bs in by_traj.items() for f, c in _runs(sorted(bs), longest)]
            sent = 0
            for call in calls_of(msgs, WRITE_BYTES):  # usually one call; a long request's blocks in several
                blocks = sum(m.span.blocks for m in call)
                try:
                    ack = await self._stubs[server].Write(pb.KvBatch(items=call))
                except grpc.aio.AioRpcError:
                    ledger.blocks_lost += blocks
                    continue
                ledger.blocks_written += ack.blocks
                ledger.blocks_lost += blocks - ack.blocks
                sent += ack.bytes
            return sent

        return sum(await asyncio.gather(*(one(s, w) for s, w in per.items())))

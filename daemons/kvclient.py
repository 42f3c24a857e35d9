"""Client side of KV movement: read a context from the storage servers, write blocks back,
and keep the ledger that every run must close clean.

The node daemons' traffic managers use this; so do tests (on 127.0.0.1). A read
of a trajectory's blocks is split by :func:`daemons.storage.server_for` and
issued to every storage server at once (one stream each), so a node's SNIC is
filled from all servers as in the paper's striped 3FS. Every block received is
verified against its derived contents (:mod:`daemons.kvbytes`); a corrupt block
or one that never arrives is counted, never silently accepted. With replicas
(:func:`daemons.storage.replicas_for`) a write goes to every replica and a read
falls back to the next replica for whatever a server did not deliver.
"""

from __future__ import annotations

import asyncio

import grpc

from daemons import dualpath_pb2 as pb
from daemons import dualpath_pb2_grpc as pb_grpc
from daemons.kvbytes import KvGeometry, span_content, verify_span
from daemons.ledger import Ledger
from daemons.runtime import DATA_DEADLINE_S, grpc_options
from daemons.storage import replicas_for, server_for


class KvIncomplete(RuntimeError):
    """A read did not deliver every block intact (already counted in the ledger): nothing to forward."""


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

    def __init__(self, addresses: list[str], geom: KvGeometry, dscp: int | None = None, rcvbuf: int | None = None,
                 replicas: int = 1, deadline_s: float = DATA_DEADLINE_S):
        self.geom = geom
        self.replicas, self.deadline_s = min(replicas, len(addresses)), deadline_s
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
            got: set[int] = set()
            left = list(wanted)
            for replica in replicas_for(trajectory, wanted[0], len(self._stubs), self.replicas):
                await self._read_from(replica, request_id, trajectory, first_block, blocks, left, got, span,
                                      bad_blocks, ledger)
                left = [b for b in wanted if b not in got]
                if not left:
                    break  # else: the next replica, for what this one did not deliver
            ledger.blocks_lost += len(left)
            return len(left)

        lost = sum(await asyncio.gather(*(one(s, w) for s, w in per.items())))
        if lost or bad_blocks:
            raise KvIncomplete(f"{request_id}: reading {blocks} blocks of {trajectory} from storage: "
                               f"{lost} lost, {len(bad_blocks)} corrupt")
        return bytes(span)

    async def _read_from(self, server: int, request_id: str, trajectory: str, first_block: int, blocks: int,
                         wanted: list[int], got: set[int], span: bytearray, bad_blocks: list[int],
                         ledger: Ledger) -> None:
        """One server's stream of `wanted` blocks into `span`, each message verified; what arrives goes in
        `got`. A server that fails (dead, refusing, past the deadline) ends its stream: the caller goes on."""
        bb = self.geom.block_bytes
        req = pb.ReadRequest(request_id=request_id, spans=[
            pb.BlockSpan(trajectory=trajectory, first_block=f, blocks=c) for f, c in _runs(wanted)])
        try:
            async for msg in self._stubs[server].Read(req, timeout=self.deadline_s):
                s = msg.span
                if s.trajectory != trajectory or s.first_block < first_block or \
                        s.first_block + s.blocks > first_block + blocks:
                    continue  # not what was asked: whatever is missing is counted lost
                bad = verify_span(self.geom, s.trajectory, s.first_block, s.blocks, 0, 0, msg.data)
                bad_blocks.extend(bad)
                ledger.blocks_read += s.blocks  # as it arrives: a node killed mid-read still adds up
                ledger.blocks_corrupt += len(bad)
                ledger.blocks_verified += s.blocks - len(bad)
                got.update(range(s.first_block, s.first_block + s.blocks))
                at = (s.first_block - first_block) * bb
                data = msg.data[:s.blocks * bb]
                span[at:at + len(data)] = data
        except grpc.aio.AioRpcError:
            pass

    async def write(self, request_id: str, trajectory: str, first_block: int, blocks: int,
                    ledger: Ledger) -> int:
        """Write Full Blocks [first_block, first_block + blocks) of a trajectory; return bytes sent."""
        return await self.write_blocks(request_id, [(trajectory, b) for b in range(first_block, first_block + blocks)],
                                       ledger)

    async def write_blocks(self, request_id: str, blocks: list[tuple[str, int]], ledger: Ledger) -> int:
        """Write Full Blocks, given as (trajectory, block), with their derived contents, to every replica of
        each: one call per storage server whatever the number of trajectories (a decode batch completes blocks
        of several at once). A block no replica took is lost; every copy a server took counts as written."""
        per: dict[int, list[tuple[str, int]]] = {}
        for traj, b in blocks:
            for server in replicas_for(traj, b, len(self._stubs), self.replicas):
                per.setdefault(server, []).append((traj, b))
        taken: dict[tuple[str, int], int] = dict.fromkeys(blocks, 0)  # replicas that took each block

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
                try:
                    ack = await self._stubs[server].Write(pb.KvBatch(items=call), timeout=self.deadline_s)
                except grpc.aio.AioRpcError:
                    continue  # lost below unless another replica took them
                if ack.blocks == sum(m.span.blocks for m in call):
                    for m in call:
                        for b in range(m.span.first_block, m.span.first_block + m.span.blocks):
                            taken[(m.span.trajectory, b)] += 1
                ledger.blocks_written += ack.blocks
                sent += ack.bytes
            return sent

        sent = sum(await asyncio.gather(*(one(s, w) for s, w in per.items())))
        ledger.blocks_lost += sum(1 for n in taken.values() if n == 0)
        return sent

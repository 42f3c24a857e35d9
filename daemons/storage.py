"""Storage server daemon (3FS in the paper): holds Full Blocks as real bytes in files.

    python -m daemons.storage --listen 10.10.3.1:7000 --mgmt 10.9.3.1:7000 --dir RUN/storage/st1 \
        --layers 61 --block-tokens 64 --block-bytes 256 [--preload FILE] [--dscp N] [--replicas R]

Blocks of a trajectory are striped over the storage servers in runs of
STRIPE_BLOCKS (the rule is :func:`server_for`), each run on ``--replicas``
consecutive servers (:func:`replicas_for`); this server keeps the blocks it
holds in one sparse file per trajectory, block b at offset b x block_bytes. It
serves Full Block reads and writes only (storage I/O is always Full Blocks, as
in the paper), on its storage-fabric address (``--listen``) only; its Stats on
the management address (``--mgmt``) only. It verifies every block written to
it against the derived contents, stores only intact ones and counts the others
corrupt; the reader verifies every byte it reads in turn.

``--preload`` names a JSON file ``[{"trajectory": "a7", "blocks": 412}, ...]``
whose blocks are written locally at start-up, before ``ready`` is printed:
the context an agent already had before the emulated turns began (the paper's
trajectories start with their history in storage). Runnable without root on
127.0.0.1; everything arrives as arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from daemons import dualpath_pb2 as pb
from daemons import dualpath_pb2_grpc as pb_grpc
from daemons.kvbytes import KvGeometry, block_content, verify_span
from daemons.ledger import Ledger
from daemons.runtime import RpcCounter, grpc_options, plane_servers, rpc_counts, run_event_loop, serve_until_stopped

DEFAULT_MESSAGE_BYTES = 256 * 1024
_SAFE = re.compile(r"^[A-Za-z0-9_.-]+$")


STRIPE_BLOCKS = 128  # consecutive Full Blocks on one server (8192 tokens)


def server_for(trajectory: str, block: int, servers: int) -> int:
    """Index of the storage server holding `block` of `trajectory`.

    Blocks are striped in runs of STRIPE_BLOCKS: a long context is read from
    every server at once, yet each server sends long runs in large messages
    (one block per message would cost a gRPC message per 256 bytes at 1e-4).
    """
    return (zlib.crc32(trajectory.encode()) + block // STRIPE_BLOCKS) % servers


def replicas_for(trajectory: str, block: int, servers: int, replicas: int = 1) -> list[int]:
    """The servers holding `block`, in the order a reader tries them: its stripe's server, then the next
    ``replicas - 1`` ones (every block of a stripe has the same replicas, so a fallback is one call)."""
    first = server_for(trajectory, block, servers)
    return [(first + k) % servers for k in range(min(replicas, servers))]


@dataclass
class Counters:
    blocks_read: int = 0
    bytes_read: int = 0
    blocks_written: int = 0
    bytes_written: int = 0
    blocks_missing: int = 0
    ledger: Ledger = field(default_factory=Ledger)  # the writes it checked: verified, corrupt


@dataclass
class BlockStore:
    """Blocks in sparse files; `held` says which blocks were ever written."""

    root: Path
    geom: KvGeometry
    held: dict[str, set[int]] = field(default_factory=dict)

    def _path(self, trajectory: str) -> Path:
        if not _SAFE.match(trajectory):
            raise ValueError(f"trajectory id {trajectory!r} is not a safe file name")
        return self.root / f"{trajectory}.kv"

    def write(self, trajectory: str, first_block: int, data: bytes, bad: tuple[int, ...] = ()) -> int:
        """Store whole blocks; those in `bad` (failed verification) are not held: a read of one is missing."""
        size = self.geom.block_bytes
        if len(data) % size:
            raise ValueError(f"{len(data)} bytes is not a whole number of {size}-byte blocks")
        fd = os.open(self._path(trajectory), os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.pwrite(fd, data, first_block * size)
        finally:
            os.close(fd)
        n = len(data) // size
        held = self.held.setdefault(trajectory, set())
        held.update(range(first_block, first_block + n))
        held.difference_update(bad)
        return n

    def read(self, trajectory: str, first_block: int, blocks: int) -> bytes:
        held = self.held.get(trajectory, set())
        missing = [b for b in range(first_block, first_block + blocks) if b not in held]
        if missing:
            raise KeyError(f"{trajectory}: blocks {missing[:5]}{'...' if len(missing) > 5 else ''} not held here")
        size = self.geom.block_bytes
        fd = os.open(self._path(trajectory), os.O_RDONLY)
        try:
            return os.pread(fd, blocks * size, first_block * size)
        finally:
            os.close(fd)


class StorageService(pb_grpc.StorageServicer):
    def __init__(self, store: BlockStore, message_bytes: int = DEFAULT_MESSAGE_BYTES, rpcs: RpcCounter | None = None):
        self.store = store
        self.message_bytes = message_bytes
        self.counters = Counters()
        self.rpcs = rpcs

    async def Read(self, request: pb.ReadRequest, context):  # noqa: N802 - gRPC's name
        size = self.store.geom.block_bytes
        per_msg = max(1, (request.max_message_bytes or self.message_bytes) // size)
        for span in request.spans:
            if span.layers != 0:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "storage serves Full Blocks only (layers=0)")
            for first in range(span.first_block, span.first_block + span.blocks, per_msg):
                n = min(per_msg, span.first_block + span.blocks - first)
                try:
                    data = self.store.read(span.trajectory, first, n)
                except KeyError as exc:
                    self.counters.blocks_missing += n
                    await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
                self.counters.blocks_read += n
                self.counters.bytes_read += len(data)
                yield pb.KvData(request_id=request.request_id, data=data,
                                span=pb.BlockSpan(trajectory=span.trajectory, first_block=first, blocks=n))

    async def Write(self, request: pb.KvBatch, context):  # noqa: N802
        """Store each written span's intact blocks: every byte is checked against the derived contents of the
        span's (trajectory, block), and a damaged block is counted corrupt and not stored."""
        blocks = nbytes = corrupt = 0
        geom, lg = self.store.geom, self.counters.ledger
        for msg in request.items:
            s = msg.span
            if s.layers != 0:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "storage stores Full Blocks only (layers=0)")
            if len(msg.data) != geom.span_bytes(s.blocks):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"span says {s.blocks} blocks, data holds {len(msg.data)} bytes")
            bad = verify_span(geom, s.trajectory, s.first_block, s.blocks, 0, 0, msg.data)
            try:
                n = self.store.write(s.trajectory, s.first_block, msg.data, tuple(bad))
            except ValueError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            lg.blocks_verified += n - len(bad)
            lg.blocks_corrupt += len(bad)
            corrupt += len(bad)
            blocks += n
            nbytes += len(msg.data)
        self.counters.blocks_written += blocks
        self.counters.bytes_written += nbytes
        return pb.WriteAck(blocks=blocks, bytes=nbytes, corrupt_blocks=corrupt)

    async def Stats(self, request, context):  # noqa: N802
        c = self.counters
        return pb.StorageStats(blocks_read=c.blocks_read, bytes_read=c.bytes_read, blocks_written=c.blocks_written,
                               bytes_written=c.bytes_written, blocks_missing=c.blocks_missing,
                               rpcs=rpc_counts(self.rpcs), ledger=c.ledger.to_proto())


def preload(store: BlockStore, items: list[dict], server_index: int, servers: int, replicas: int = 1) -> int:
    """Write locally the blocks this server holds (as a replica or not) of each trajectory's existing context."""
    written = 0
    for item in items:
        traj, blocks = item["trajectory"], int(item["blocks"])
        for b in range(blocks):
            if server_index in replicas_for(traj, b, servers, replicas):
                written += store.write(traj, b, block_content(store.geom, traj, b))
    return written


async def serve(args) -> None:
    geom = KvGeometry(args.layers, args.block_tokens, args.block_bytes)
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    store = BlockStore(root, geom)
    if args.preload:
        preload(store, json.loads(Path(args.preload).read_text()), args.server_index, args.servers, args.replicas)
    rpcs = RpcCounter()
    service = StorageService(store, args.max_message_bytes, rpcs)
    if args.ledger_file:
        service.counters.ledger = Ledger.in_file(args.ledger_file)
    servers = plane_servers([args.mgmt] if args.mgmt else [], [args.listen], grpc_options(args.dscp), [rpcs])
    for server, _ in servers:
        pb_grpc.add_StorageServicer_to_server(service, server)
    await serve_until_stopped(servers)


def parse_args(argv: list[str] | None = None):
    p = argparse.ArgumentParser(prog="python -m daemons.storage", description=__doc__.splitlines()[0])
    p.add_argument("--listen", required=True,
                   help="ADDR:PORT on the storage fabric: Read and Write (port 0: any free port; the ports are "
                        "printed as 'ready [MGMT_PORT] PORT')")
    p.add_argument("--mgmt", default="", help="ADDR:PORT on the management network: Stats")
    p.add_argument("--dir", required=True)
    p.add_argument("--layers", type=int, required=True)
    p.add_argument("--block-tokens", type=int, required=True)
    p.add_argument("--block-bytes", type=int, required=True)
    p.add_argument("--server-index", type=int, default=0)
    p.add_argument("--servers", type=int, default=1)
    p.add_argument("--replicas", type=int, default=1, help="servers holding each block (default: %(default)s)")
    p.add_argument("--preload")
    p.add_argument("--ledger-file", default="", help="keep the ledger of the writes it checked in this file")
    p.add_argument("--max-message-bytes", type=int, default=DEFAULT_MESSAGE_BYTES)
    p.add_argument("--dscp", type=int, default=None)
    args = p.parse_args(argv)
    if not 0 <= args.server_index < args.servers:
        p.error("--server-index must be in 0..servers-1")
    if not 1 <= args.replicas <= args.servers:
        p.error("--replicas must be in 1..servers")
    return args


def main(argv: list[str] | None = None) -> int:
    run_event_loop(serve(parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Compute node daemon: a prefill (PE) or decode (DE) node with its g engines and traffic manager.

    python -m daemons.node --name pe1 --role pe --mgmt 10.9.1.1:7100 \
        --cnic 10.32.1.1:7200,10.33.1.1:7200,... --storage 10.10.3.1:7000,10.10.3.2:7000 \
        --model ds660b --layers 61 --block-tokens 64 --block-bytes 256 --dram-buffer-bytes N

One process per node. Engine i is reachable on the address of its own CNIC i
(``--cnic``, one entry per GPU); the data calls arriving there (PushKv, Fetch)
carry KV over the compute fabric and are served there only. Control calls
(Reserve, Release, Prefill, Decode, Status, Lockstep*) are served on the
management address only (:class:`daemons.runtime.PlaneGuard`). The traffic
manager owns the node's SNIC (storage reads and write-backs leave through it
because the storage servers sit on the storage fabric's subnet), its DRAM buffer (bounded: a read waits for room)
and its storage read queue (tokens waiting to be read, which the scheduler compares).

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

This module is the node's thin gRPC service; the work is done by the paper's
parts: :mod:`daemons.traffic_manager` (SNIC, DRAM buffer, read queue, pushes),
:mod:`daemons.prefill_engine`, :mod:`daemons.decode_engine` and
:mod:`daemons.gpu` (cost model and collectives).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from daemons import costmodel
from daemons import dualpath_pb2 as pb
from daemons import dualpath_pb2_grpc as pb_grpc
from daemons.decode_engine import DecodeEngine
from daemons.gpu import GPU_MODELS, Collectives, Compute, CostModelCompute, Gpu
from daemons.kvbytes import KvGeometry
from daemons.kvclient import StorageClient
from daemons.costprofile import LayerParts
from daemons.ledger import Ledger
from daemons.lockstep import Arrival, LockstepGroup, LockstepMember, slowest
from daemons.prefill_engine import PREFILL_QUOTA_S, PrefillEngine
from daemons.runtime import (RpcCounter, Tasks, grpc_options, plane_servers, rpc_counts, run_event_loop,
                             serve_until_stopped)
from daemons.traffic_manager import PUSH_BYTES, TrafficManager


class NodeService(pb_grpc.NodeServicer):
    """The node's gRPC face: each call goes to the traffic manager or to one of the node's engines."""

    def __init__(self, name: str, role: str, geom: KvGeometry, engines: int, storage: StorageClient,
                 compute: Compute, buffer_bytes: int, dscp_kv: int | None = None,
                 prefill_quota_s: float = PREFILL_QUOTA_S, collectives: Collectives | None = None,
                 push_bytes: int = PUSH_BYTES, lockstep: list[tuple[str, str] | None] | None = None,
                 hosted: dict[str, int] | None = None, ledger: Ledger | None = None):
        self.name, self.role, self.geom = name, role, geom
        self.compute = compute
        self.collectives = collectives
        self.tm = TrafficManager(geom, storage, buffer_bytes, dscp_kv, push_bytes, ledger)
        self.tasks = Tasks()
        self.rpcs: RpcCounter | None = None  # what this server served (set by serve)
        # lockstep: engine i's EP group (name, host's management address), and the groups this node hosts
        self.groups = {g: LockstepGroup(g, size, combine=self._combine) for g, size in (hosted or {}).items()}
        self.members = [self._member(i, m) for i, m in enumerate(lockstep or [None] * engines)]
        gpus = [Gpu(i, compute, collectives, self.members[i]) for i in range(engines)]
        self.engines: list[PrefillEngine] | list[DecodeEngine]
        if role == "pe":
            self.engines = [PrefillEngine(i, self.tm, compute, g, self.tasks, prefill_quota_s)
                            for i, g in enumerate(gpus)]
        else:
            self.engines = [DecodeEngine(i, name, self.tm, compute, g, self.tasks) for i, g in enumerate(gpus)]

    def _member(self, index: int, group: tuple[str, str] | None) -> LockstepMember | None:
        if group is None:
            return None
        name, host = group
        return LockstepMember(name, f"{self.name}/{index}",
                              lambda msg, t: self.tm.stub(host, kv=False).LockstepArrive(msg, timeout=t),
                              lambda msg, t: self.tm.stub(host, kv=False).LockstepLeave(msg, timeout=t),
                              lambda msg, t: self.tm.stub(host, kv=False).LockstepJoin(msg, timeout=t))

    def _combine(self, arrivals: list[Arrival], group_size: int) -> float:
        """A hosted group's chunk time: every layer at its slowest engine, the routed experts over the group's
        tokens (CostModelCompute.group_chunk_s); the slowest engine's own cost where the model cannot split."""
        if any(a.parts is None for a in arrivals) or len({a.layers for a in arrivals}) != 1:
            return slowest(arrivals, group_size)
        first, layers = arrivals[0].layers
        pre = max(a.pre_s for a in arrivals)
        return pre + self.compute.group_chunk_s([a.parts for a in arrivals], group_size, first, layers)

    def lockstep_stats(self, time_scale: float) -> dict:
        """What this node's engines waited for their EP groups (the bubbles), real seconds (wall / time scale)."""
        members = [m for m in self.members if m is not None]
        return {"engines": len(members), "waited_s": round(sum(m.waited_s for m in members) / time_scale, 4),
                "timeouts": sum(m.timeouts for m in members)}

    @property
    def ledger(self):
        return self.tm.ledger

    def _engine(self, index: int, kind: type, call: str):
        if not isinstance(self.engines[0], kind):
            raise ValueError(f"{self.name} is a {self.role} node: it does not serve {call}")
        return self.engines[index]

    async def close(self) -> None:
        self.tasks.cancel()
        if self.collectives is not None:
            await self.collectives.close()
        await self.tm.close()

    # -- buffer admission (a DE's DRAM buffer, asked by the PE before any KV moves) ---------------------------
    async def Reserve(self, request: pb.ReserveRequest, context):  # noqa: N802 - gRPC's name
        t0 = time.monotonic()
        await self.tm.reserve(request.request_id, request.bytes)
        return pb.ReserveReply(waited_s=time.monotonic() - t0)

    async def Release(self, request: pb.ReserveRequest, context):  # noqa: N802
        self.tm.forget(request.request_id)
        await self.tm.release(request.request_id)
        return pb.ReserveReply()

    # -- KV movement ---------------------------------------------------------------------------------------
    async def Fetch(self, request: pb.FetchRequest, context):  # noqa: N802
        return await self.tm.fetch(request)

    async def PushKv(self, request: pb.KvBatch, context):  # noqa: N802
        return self.tm.receive(request)

    # -- engines -------------------------------------------------------------------------------------------
    async def Prefill(self, request: pb.PrefillRequest, context):  # noqa: N802
        return await self._engine(request.pe_engine, PrefillEngine, "Prefill").prefill(request)

    async def Decode(self, request: pb.DecodeRequest, context):  # noqa: N802
        return await self._engine(request.de_engine, DecodeEngine, "Decode").decode(request)

    # -- lockstep (the host of an EP group's rendezvous) ----------------------------------------------------
    def _group(self, name: str) -> LockstepGroup:
        if name not in self.groups:
            raise ValueError(f"{self.name} does not host lockstep group {name!r}")
        return self.groups[name]

    async def LockstepArrive(self, request: pb.LockstepArrival, context):  # noqa: N802
        r = request
        parts = LayerParts(r.parts.dense, r.parts.common, r.parts.normal, r.parts.head, r.parts.tokens) \
            if r.HasField("parts") else None
        start, cost = await self._group(r.group).arrive(r.member, r.seq, Arrival(
            r.chunk, r.chunks, r.cost_s, r.attention_s, parts, r.pre_s, (r.layer_first, r.layers)))
        return pb.LockstepGo(start=start, cost_s=cost)

    async def LockstepJoin(self, request: pb.LockstepArrival, context):  # noqa: N802
        start, _ = await self._group(request.group).join(request.member, request.seq)
        return pb.LockstepGo(start=start)

    async def LockstepLeave(self, request: pb.LockstepArrival, context):  # noqa: N802
        self._group(request.group).leave(request.member, request.seq)
        return pb.LockstepGo()

    async def Status(self, request, context):  # noqa: N802
        lg, tm = self.ledger, self.tm
        return pb.NodeStatus(
            name=self.name, role=self.role, read_queue_tokens=tm.read_queue_tokens, read_tokens=tm.read_tokens,
            buffer_bytes=tm.buffer.used, read_queue_requests=tm.read_queue_requests,
            engines=[pb.EngineStatus(engine=e.index, unfinished_requests=e.unfinished_requests,
                                     unfinished_tokens=max(0, e.unfinished_tokens)) for e in self.engines],
            ledger=lg.to_proto(), rpcs=[] if request.brief else rpc_counts(self.rpcs))


async def serve(args) -> None:
    geom = KvGeometry(args.layers, args.block_tokens, args.block_bytes)
    model = costmodel.MODELS[args.model]
    storage = StorageClient(args.storage.split(","), geom, dscp=args.dscp_kv, rcvbuf=args.storage_rcvbuf,
                            replicas=args.storage_replicas)
    cnics = args.cnic.split(",")
    collectives = None
    if args.collective_group:
        cport = args.collective_group.split(",")[0].rsplit(":", 1)[1]
        collectives = Collectives(model, args.byte_scale, args.collective_group.split(","),
                                  [f"{c.rsplit(':', 1)[0]}:{cport}" for c in cnics], args.dscp_collective,
                                  args.time_scale)
        await collectives.start()
    compute = CostModelCompute(model, args.time_scale, args.gpu_model)
    service = NodeService(args.name, args.role, geom, len(cnics), storage, compute, args.dram_buffer_bytes,
                          args.dscp_kv, prefill_quota_s=args.prefill_quota_s * args.time_scale, collectives=collectives,
                          push_bytes=args.push_bytes, lockstep=_lockstep_members(args.lockstep, len(cnics)),
                          hosted={g: int(n) for g, n in (e.split(":") for e in args.lockstep_host.split(",") if e)},
                          ledger=Ledger.in_file(args.ledger_file) if args.ledger_file else None)
    service.rpcs = RpcCounter()
    servers = plane_servers([args.mgmt], cnics, grpc_options(args.dscp_kv), [service.rpcs])
    for server, _ in servers:
        pb_grpc.add_NodeServicer_to_server(service, server)

    async def stop() -> None:
        if args.gpu_out:
            Path(args.gpu_out).write_text(json.dumps({"model": compute.describe(),
                                                      "outside_grid": compute.outside_grid(),
                                                      "lockstep": service.lockstep_stats(args.time_scale)}))
        for name, group in service.groups.items():
            group.write_csv(str(Path(args.lockstep_out) / f"lockstep-{name}.csv"), args.time_scale)
        if collectives is not None and args.collectives_out:
            collectives.write_csv(args.collectives_out, args.name)
        await service.close()

    await serve_until_stopped(servers, stop)


def _lockstep_members(spec: str, engines: int) -> list[tuple[str, str] | None]:
    """--lockstep GROUP@HOST per engine, comma separated ("" = none): [(group, host address) | None]."""
    if not spec:
        return [None] * engines
    entries = spec.split(",")
    if len(entries) != engines:
        raise ValueError(f"--lockstep names {len(entries)} engines' groups, this node has {engines} engines")
    return [tuple(e.split("@", 1)) if e else None for e in entries]  # type: ignore[misc]


def parse_args(argv: list[str] | None = None):
    p = argparse.ArgumentParser(prog="python -m daemons.node", description=__doc__.splitlines()[0])
    p.add_argument("--name", required=True)
    p.add_argument("--role", choices=["pe", "de"], required=True)
    p.add_argument("--mgmt", required=True, help="ADDR:PORT on the management network")
    p.add_argument("--cnic", required=True, help="ADDR:PORT per engine (GPU), comma separated, engine 0 first")
    p.add_argument("--storage", required=True, help="storage servers ADDR:PORT, comma separated, in index order")
    p.add_argument("--storage-replicas", type=int, default=1, help="servers holding each block (default: %(default)s)")
    p.add_argument("--model", choices=sorted(costmodel.MODELS), required=True)
    p.add_argument("--layers", type=int, required=True)
    p.add_argument("--block-tokens", type=int, required=True)
    p.add_argument("--block-bytes", type=int, required=True)
    p.add_argument("--dram-buffer-bytes", type=int, required=True)
    p.add_argument("--time-scale", type=float, default=1.0)
    p.add_argument("--gpu-model", choices=GPU_MODELS, default="profile",
                   help="GPU time from the measured layer profile or the analytic roofline (default: %(default)s)")
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
    p.add_argument("--lockstep", default="",
                   help="GROUP@HOST_MGMT per engine, comma separated: the EP group each engine runs its layer chunks "
                        "in lockstep with, and the management address of the node hosting it; empty = none")
    p.add_argument("--lockstep-host", default="", help="GROUP:SIZE of each EP group this node hosts, comma separated")
    p.add_argument("--lockstep-out", default=".", help="directory of the hosted groups' lockstep-GROUP.csv")
    p.add_argument("--ledger-file", default="", help="keep this node's ledger in this file (daemons/ledger.py)")
    p.add_argument("--gpu-out", default="", help="write where GPU time came from (JSON) here at stop")
    p.add_argument("--collectives-out", default="", help="write this node's collectives.csv here at stop")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    run_event_loop(serve(parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Collect the ledgers and loads of every node and storage server: ``python -m daemons.status``.

    python -m daemons.status --nodes 10.9.1.1:7100,10.9.2.1:7100 --storage 10.10.3.1:7000

Runs on the control host, on the management network only (nodes and storage
servers serve their Status and Stats there, and only there). Prints one JSON
object: per node its ledger, buffer, read queue and the RPCs it served; per
storage server its counters, RPCs and the ledger of the writes it checked; the
scheduler's RPCs (with ``--scheduler``); and the ledger summed over all of them
(:class:`daemons.ledger.Ledger`).
"""

from __future__ import annotations

import argparse
import json
import sys

import grpc
from google.protobuf.json_format import MessageToDict

from daemons import dualpath_pb2 as pb
from daemons import dualpath_pb2_grpc as pb_grpc
from daemons.ledger import Ledger


def collect(nodes: list[str], storage: list[str], timeout_s: float = 10.0, scheduler: str | None = None) -> dict:
    out: dict = {"nodes": {}, "storage": {}, "unreachable": []}
    parts: list[Ledger] = []
    if scheduler:
        with grpc.insecure_channel(scheduler) as ch:  # the run's own process: it must answer
            stats = pb_grpc.SchedulerStub(ch).Stats(pb.StatsRequest(), timeout=timeout_s)
        out["scheduler"] = MessageToDict(stats, preserving_proto_field_name=True,
                                         always_print_fields_with_no_presence=True)
    for addr in nodes:
        try:
            with grpc.insecure_channel(addr) as ch:
                st = pb_grpc.NodeStub(ch).Status(pb.StatusRequest(), timeout=timeout_s)
        except grpc.RpcError:  # dead (a fault killed it): its ledger file still counts (daemons/ledger.py)
            out["unreachable"].append(addr)
            continue
        out["nodes"][st.name] = MessageToDict(st, preserving_proto_field_name=True,
                                              always_print_fields_with_no_presence=True)
        parts.append(Ledger.from_proto(st.ledger))
    for addr in storage:
        try:
            with grpc.insecure_channel(addr) as ch:
                stats = pb_grpc.StorageStub(ch).Stats(pb.StatsRequest(), timeout=timeout_s)
        except grpc.RpcError:
            out["unreachable"].append(addr)
            continue
        out["storage"][addr] = MessageToDict(stats, preserving_proto_field_name=True,
                                             always_print_fields_with_no_presence=True)
        parts.append(Ledger.from_proto(stats.ledger))
    out["ledger"] = Ledger.total(parts).as_dict()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m daemons.status", description=__doc__.splitlines()[0])
    p.add_argument("--nodes", required=True)
    p.add_argument("--storage", default="")
    p.add_argument("--scheduler", default=None, help="the scheduler's address: its RPC counts too")
    args = p.parse_args(argv)
    print(json.dumps(collect(args.nodes.split(","), [a for a in args.storage.split(",") if a],
                             scheduler=args.scheduler)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Collect the ledgers and loads of every node and storage server: ``python -m daemons.status``.

    python -m daemons.status --nodes 10.9.1.1:7100,10.9.2.1:7100 --storage 10.10.3.1:7000

Runs on the control host (the management network reaches every node; the
storage servers are asked through their storage-fabric address only for their
small Stats reply). Prints one JSON object: per node its ledger, buffer, read
queue and the RPCs it served; per storage server its counters and RPCs; the
scheduler's RPCs (with ``--scheduler``); and the summed ledger.
"""

from __future__ import annotations

import argparse
import json
import sys

import grpc
from google.protobuf.json_format import MessageToDict

from daemons import dualpath_pb2 as pb
from daemons import dualpath_pb2_grpc as pb_grpc

LEDGER_KEYS = ("blocks_read", "blocks_written", "blocks_forwarded", "blocks_verified", "blocks_corrupt",
               "blocks_lost")


def collect(nodes: list[str], storage: list[str], timeout_s: float = 10.0, scheduler: str | None = None) -> dict:
    out: dict = {"nodes": {}, "storage": {}, "ledger": dict.fromkeys(LEDGER_KEYS, 0)}
    if scheduler:
        with grpc.insecure_channel(scheduler) as ch:
            stats = pb_grpc.SchedulerStub(ch).Stats(pb.StatsRequest(), timeout=timeout_s)
        out["scheduler"] = MessageToDict(stats, preserving_proto_field_name=True,
                                         always_print_fields_with_no_presence=True)
    for addr in nodes:
        with grpc.insecure_channel(addr) as ch:
            st = pb_grpc.NodeStub(ch).Status(pb.StatusRequest(), timeout=timeout_s)
        out["nodes"][st.name] = MessageToDict(st, preserving_proto_field_name=True,
                                              always_print_fields_with_no_presence=True)
        for k in LEDGER_KEYS:
            out["ledger"][k] += getattr(st.ledger, k)
    for addr in storage:
        with grpc.insecure_channel(addr) as ch:
            stats = pb_grpc.StorageStub(ch).Stats(pb.StatsRequest(), timeout=timeout_s)
        out["storage"][addr] = MessageToDict(stats, preserving_proto_field_name=True,
                                             always_print_fields_with_no_presence=True)
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

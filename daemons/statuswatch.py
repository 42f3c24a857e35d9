"""Watch the serving plane's loads: ``python -m daemons.statuswatch``, one JSON line per period.

    python -m daemons.statuswatch --nodes pe1=10.9.1.1:7100,de1=10.9.2.1:7100 --scheduler 10.9.0.1:7000

``dpemu top`` starts it once, inside the control host's namespace (the management network, where nodes serve
their Status and the scheduler its Stats, is reachable only from there), and reads its lines. Each period it
asks every node for a brief Status and the scheduler for its Stats, all at once, each with a short deadline,
and prints::

    {"t": 1733.2, "nodes": {"pe1": {"role": "pe", "reading": 2, "prefilling": 3, "decoding": 0,
     "read_queue_tokens": 4096, "buffer_bytes": 0}, "de1": null}, "scheduler": {"waiting": 5, "running": 3}}

A node or scheduler that does not answer in time is ``null`` (between the modes of a run there are no
daemons at all). ``reading``: requests with blocks in the node's storage read queue; ``prefilling``: requests
on its prefill engines (from the scheduler's placement until their KV is sent, their reads included);
``decoding``: requests on its decode engines. ``parse_line`` reads a line back. It stops on SIGTERM, when its
stdout closes, or when the process that started it is gone. It changes nothing and holds no state between
periods.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass

import grpc

from daemons import dualpath_pb2 as pb
from daemons import dualpath_pb2_grpc as pb_grpc

# a daemon that went away (between modes) and came back: reconnect within a period, not after grpc's
# default backoff (up to 2 minutes)
CHANNEL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 200), ("grpc.min_reconnect_backoff_ms", 200),
                   ("grpc.max_reconnect_backoff_ms", 1000)]


@dataclass(frozen=True)
class NodeLoads:
    """One node in a line: every count None when it did not answer."""
    name: str
    role: str | None
    reading: int | None = None
    prefilling: int | None = None
    decoding: int | None = None
    read_queue_tokens: int | None = None


@dataclass(frozen=True)
class PlaneLoads:
    """A line, read back: ``state`` "running", or "not running" when no daemon answered (``dpemu top`` adds
    states of its own: "starting", "none", "watcher exited ...")."""
    state: str
    nodes: tuple[NodeLoads, ...] = ()
    waiting: int | None = None   # the scheduler's: None when it did not answer
    running: int | None = None


def parse_line(line: str) -> PlaneLoads:
    """One line of this watcher's output, read back (ValueError if it is not one)."""
    try:
        d = json.loads(line)
        nodes = tuple(NodeLoads(name, None) if n is None else NodeLoads(
            name, n["role"], n["reading"], n["prefilling"], n["decoding"], n["read_queue_tokens"])
            for name, n in d["nodes"].items())
        sched = d["scheduler"]
        if sched is None and all(n.role is None for n in nodes):
            return PlaneLoads("not running", nodes)
        return PlaneLoads("running", nodes, *((None, None) if sched is None else (sched["waiting"], sched["running"])))
    except (KeyError, TypeError, AttributeError) as exc:  # json's own errors are ValueErrors
        raise ValueError(f"not a status line: {line[:80]!r}") from exc


def node_loads(st: pb.NodeStatus) -> dict:
    """What `dpemu top` shows of one node's brief Status."""
    engines = sum(e.unfinished_requests for e in st.engines)
    return {"role": st.role, "reading": st.read_queue_requests,
            "prefilling": engines if st.role == "pe" else 0, "decoding": engines if st.role == "de" else 0,
            "read_queue_tokens": st.read_queue_tokens, "buffer_bytes": st.buffer_bytes}


def parse_nodes(text: str) -> dict[str, str]:
    """"pe1=10.9.1.1:7100,de1=..." -> {name: address}."""
    out = {}
    for item in (x for x in text.split(",") if x):
        name, sep, addr = item.partition("=")
        if not sep or not name or not addr:
            raise ValueError(f"--nodes: {item!r} is not NAME=ADDRESS:PORT")
        out[name] = addr
    return out


class Watch:
    """Persistent channels to every node and the scheduler; `poll()` asks all of them once."""

    def __init__(self, nodes: dict[str, str], scheduler: str | None, deadline_s: float):
        self.deadline_s = deadline_s
        self.channels: list[grpc.Channel] = []
        self.nodes = {n: pb_grpc.NodeStub(self._channel(a)) for n, a in nodes.items()}
        self.scheduler = pb_grpc.SchedulerStub(self._channel(scheduler)) if scheduler else None

    def _channel(self, address: str) -> grpc.Channel:
        self.channels.append(grpc.insecure_channel(address, options=CHANNEL_OPTIONS))
        return self.channels[-1]

    def close(self) -> None:
        for ch in self.channels:
            ch.close()

    def poll(self) -> dict:
        calls = {n: stub.Status.future(pb.StatusRequest(brief=True), timeout=self.deadline_s)
                 for n, stub in self.nodes.items()}
        sched = None if self.scheduler is None else self.scheduler.Stats.future(pb.StatsRequest(),
                                                                                timeout=self.deadline_s)
        out: dict = {"t": round(time.time(), 3), "nodes": {}, "scheduler": None}
        for name, call in calls.items():
            try:
                out["nodes"][name] = node_loads(call.result())
            except grpc.RpcError:
                out["nodes"][name] = None
        if sched is not None:
            try:
                st = sched.result()
                out["scheduler"] = {"waiting": st.waiting_turns, "running": st.running_turns}
            except grpc.RpcError:
                pass
        return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m daemons.statuswatch", description=__doc__.splitlines()[0])
    p.add_argument("--nodes", required=True, help="NAME=ADDRESS:PORT of every compute node, comma separated")
    p.add_argument("--scheduler", default=None, help="the scheduler's ADDRESS:PORT")
    p.add_argument("--period", type=float, default=1.0, help="seconds between lines (default 1)")
    p.add_argument("--deadline", type=float, default=None,
                   help="seconds each call may take (default: 0.8 x period, at most 2)")
    args = p.parse_args(argv)
    parent = os.getppid()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    watch = Watch(parse_nodes(args.nodes), args.scheduler, args.deadline or min(0.8 * args.period, 2.0))
    try:
        next_t = time.monotonic()
        while not stop.is_set() and os.getppid() == parent:  # orphaned: whoever read us is gone
            sys.stdout.write(json.dumps(watch.poll()) + "\n")
            sys.stdout.flush()
            next_t = max(next_t + args.period, time.monotonic())
            stop.wait(next_t - time.monotonic())
    except BrokenPipeError:  # the reader is gone: no "Exception ignored" when Python flushes stdout at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except KeyboardInterrupt:
        pass
    finally:
        watch.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

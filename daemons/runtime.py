"""What every dpemu daemon does the same way: channel options, listening, 'ready', stopping.

A daemon listens on its addresses, prints ``ready PORT...`` once it serves (the
runner and the tests wait for that line instead of sleeping), and stops on
SIGTERM or SIGINT with a short grace period.
"""

from __future__ import annotations

import asyncio
import signal
from typing import Any, Awaitable, Callable, Coroutine

import uvloop

import grpc

from daemons import dualpath_pb2 as pb

MAX_MESSAGE_BYTES = 64 << 20


def run_event_loop(main: Coroutine[Any, Any, Any]) -> Any:
    """``asyncio.run`` on uvloop: every process of the serving plane runs its event loop this way (a gRPC call
    costs ~10% less CPU than on asyncio's own loop; docs/fidelity.md)."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


class Tasks:
    """The background tasks of a daemon (engine loops, pushes, write-backs): spawned here, cancelled at close."""

    def __init__(self):
        self._tasks: set[asyncio.Task] = set()

    def spawn(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def cancel(self) -> None:
        for t in list(self._tasks):
            t.cancel()


def grpc_options(dscp: int | None = None) -> list[tuple[str, int]]:
    """Channel/server options; `dscp` marks the packets (KV vs collective traffic classes)."""
    opts = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
    return opts + ([("grpc.dscp", dscp)] if dscp is not None else [])


# Data calls move KV (or start a node's KV moving) and are served only on the data fabrics (storage fabric, a
# CNIC); every other call is control and is served only on the management network. One wrong address would
# otherwise move KV unshaped with a clean ledger.
DATA_CALLS = frozenset({"/dualpath.v1.Storage/Read", "/dualpath.v1.Storage/Write", "/dualpath.v1.Node/PushKv",
                        "/dualpath.v1.Node/Fetch"})

# Deadlines of the serving plane's calls (wall seconds). A turn's own calls (Submit, Prefill, Decode, Reserve)
# wait in queues behind others, so theirs is generous; every other call is bounded tighter.
TURN_DEADLINE_S = 1800.0
DATA_DEADLINE_S = 300.0      # one storage read or write, one push: long contexts over a slow, scaled link
CONTROL_DEADLINE_S = 10.0    # a status call, a release


class PlaneGuard(grpc.aio.ServerInterceptor):
    """Serves, on one listening plane, only the calls that belong to it; refuses the others with
    PERMISSION_DENIED naming the call and where it is served."""

    def __init__(self, data: bool):
        self.data = data

    async def intercept_service(self, continuation, details):
        if (details.method in DATA_CALLS) == self.data:
            return await continuation(details)
        why = (f"{details.method} is a control call: served on the management network only, not on a data fabric"
               if self.data else
               f"{details.method} is a data call: served on the data fabrics only, not on the management network")

        async def refuse(request, context):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, why)

        return grpc.unary_unary_rpc_method_handler(refuse)


def plane_servers(control: list[str], data: list[str], options=None, interceptors=()) -> list[tuple[grpc.aio.Server,
                                                                                                    list[str]]]:
    """One server for the control addresses and one for the data addresses (either may be empty), each with its
    PlaneGuard before `interceptors`: register the servicer on both, then ``serve_until_stopped``."""
    out = []
    for addrs, data_plane in ((control, False), (data, True)):
        if addrs:
            out.append((grpc.aio.server(options=options, interceptors=[PlaneGuard(data_plane), *interceptors]),
                        addrs))
    return out


async def serve_until_stopped(servers: list[tuple[grpc.aio.Server, list[str]]],
                              on_stop: Callable[[], Awaitable[None]] | None = None) -> None:
    """Listen on each server's addresses, print 'ready PORT...' (every port, in order), run until
    SIGTERM/SIGINT, then stop."""
    ports = []
    for server, addresses in servers:
        ports += [server.add_insecure_port(a) for a in addresses]
        if 0 in ports:
            raise SystemExit(f"cannot listen on one of {addresses}")
    for server, _ in servers:
        await server.start()
    print("ready " + " ".join(map(str, ports)), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await asyncio.gather(*(server.stop(grace=1.0) for server, _ in servers))
    if on_stop is not None:
        await on_stop()


class RpcCounter(grpc.aio.ServerInterceptor):
    """Counts, per method this server serves: calls, messages each way and their serialized bytes (what gRPC
    frames: protobuf bytes, without HTTP/2 and TCP/IP overhead). It wraps the method's (de)serializers, so it
    costs one small function call per message, not per byte. Every request here is unary: one request message
    is one call. ``snapshot()`` is what a daemon's status reply carries (``pb.RpcCount``)."""

    def __init__(self):
        self.counts: dict[str, list[int]] = {}  # method -> [calls, messages_in, messages_out, bytes_in, bytes_out]
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(self, continuation, details):
        method = details.method
        if method in self._handlers:
            return self._handlers[method]
        handler = await continuation(details)
        if handler is None:
            return None
        c = self.counts.setdefault(method, [0, 0, 0, 0, 0])
        deser, ser = handler.request_deserializer, handler.response_serializer

        def request_deserializer(data: bytes):
            c[0] += 1
            c[1] += 1
            c[3] += len(data)
            return deser(data) if deser else data

        def response_serializer(msg) -> bytes:
            data = ser(msg) if ser else msg
            c[2] += 1
            c[4] += len(data)
            return data

        wrapped = handler._replace(request_deserializer=request_deserializer, response_serializer=response_serializer)
        self._handlers[method] = wrapped
        return wrapped

    def snapshot(self) -> list[tuple[str, int, int, int, int, int]]:
        """(method, calls, messages_in, messages_out, bytes_in, bytes_out) of every method served so far."""
        return [(m, *c) for m, c in sorted(self.counts.items())]


def rpc_counts(counter: RpcCounter | None) -> list[pb.RpcCount]:
    """A counter's snapshot as the status replies carry it."""
    if counter is None:
        return []
    return [pb.RpcCount(method=m, calls=c, messages_in=mi, messages_out=mo, bytes_in=bi, bytes_out=bo)
            for m, c, mi, mo, bi, bo in counter.snapshot()]

"""Collective communication on the compute fabric: what an engine group's MoE layers send, and a
DSCP-marked transport that times each collective to its last acknowledgement.

Byte counts (expert-parallel AllToAll of one MoE layer, per engine, DeepEP-like):
a token is dispatched once to every remote rank that hosts at least one of its
top-k experts and combined back from each of them. With the layer's routed
experts spread evenly over the group's n ranks, the expected number of remote
ranks a token visits is ``(n - 1) x (1 - (1 - 1/n)^k)``; dispatch carries the
hidden state in FP8 plus one FP32 scale per 128 values, combine carries it back
in BF16. Dense layers (the first ``dense_layers``) have no AllToAll. Everything
is multiplied by the run's byte scale, like KV. ReduceScatter / AllGather of
tensor parallelism are not modelled (the paper's engines are expert-parallel).

Transport: one TCP connection per (engine, peer engine), the socket's IP TOS
set to the collective DSCP (so u32 classifies it into its HTB class), messages
of ``id, size, payload``; the receiver acknowledges each whole message with its
id. A collective is complete when every peer acknowledged its share: its
completion time is what the isolation experiment compares (KV traffic in the
same queue delays exactly that). Plain asyncio streams, not gRPC: a collective
is many small messages per layer, and one gRPC call costs ~1 ms of CPU here.

A node daemon runs its engines' collectives in an agent process of its own
(``CollectiveAgent``), as GPUs and NICs run them beside the host's CPU work: a
collective then waits for the network and the peers' agents, not for the node
daemon's event loop to get through a burst of KV calls. The agent exits when its
control socket closes, so it never outlives its node.

    python -m traffic.collectives serve --listen 10.32.1.1:7300 --dscp 46
    python -m traffic.collectives send --peers 10.32.1.2:7300 --dscp 46 --bytes 4096 --count 100 \
        --gap-ms 2 --out collectives.csv      # alone: the reference completion times
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass

from daemons.costmodel import ModelSpec

HEADER = struct.Struct("!QI")  # message id, payload bytes
ACK = struct.Struct("!Q")  # message id
SCALE_GROUP = 128  # FP8 dispatch: one FP32 scale per 128 values
MAX_MESSAGE_BYTES = 64 << 20


def remote_ranks_per_token(ranks: int, top_k: int) -> float:
    """Expected distinct remote ranks a token's top-k experts live on, experts spread evenly over `ranks`."""
    if ranks < 1 or top_k < 1:
        raise ValueError(f"ranks ({ranks}) and top_k ({top_k}) must be >= 1")
    return (ranks - 1) * (1 - (1 - 1 / ranks) ** top_k)


def alltoall_bytes_per_token(m: ModelSpec, ranks: int) -> float:
    """Real bytes one engine sends per token for one MoE layer (dispatch FP8 + scales, combine BF16)."""
    if not m.experts:
        return 0.0
    per_rank = m.hidden * 1 + (m.hidden // SCALE_GROUP) * 4 + m.hidden * 2
    return remote_ranks_per_token(ranks, m.experts_per_token) * per_rank


def layer_bytes(m: ModelSpec, layer_first: int, layers: int, tokens: int, ranks: int, byte_scale: float) -> int:
    """Scaled bytes one engine sends for the MoE layers among [layer_first, layer_first + layers)."""
    moe = sum(1 for layer in range(layer_first, layer_first + layers) if layer >= m.dense_layers)
    return round(moe * tokens * alltoall_bytes_per_token(m, ranks) * byte_scale)


def set_dscp(sock: socket.socket, dscp: int | None) -> None:
    if dscp is not None:
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, dscp << 2)


# -- receiver ---------------------------------------------------------------------------------------------
@dataclass
class ReceiverStats:
    messages: int = 0
    bytes: int = 0


async def _receive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stats: ReceiverStats,
                   dscp: int | None) -> None:
    set_dscp(writer.get_extra_info("socket"), dscp)  # the acks travel in the same class
    try:
        while True:
            msg_id, size = HEADER.unpack(await reader.readexactly(HEADER.size))
            if size > MAX_MESSAGE_BYTES:
                raise ValueError(f"collective message of {size} bytes (limit {MAX_MESSAGE_BYTES})")
            await reader.readexactly(size)
            stats.messages += 1
            stats.bytes += size
            writer.write(ACK.pack(msg_id))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def start_receiver(host: str, port: int, dscp: int | None, stats: ReceiverStats) -> asyncio.base_events.Server:
    return await asyncio.start_server(lambda r, w: _receive(r, w, stats, dscp), host, port)


# -- sender -----------------------------------------------------------------------------------------------
class Peer:
    """One connection to a peer engine; acks resolve the futures of the messages in flight."""

    def __init__(self, address: str, dscp: int | None):
        self.address = address
        self.dscp = dscp
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._waiting: dict[int, asyncio.Future] = {}
        self._acks: asyncio.Task | None = None

    async def connect(self) -> None:
        host, port = self.address.rsplit(":", 1)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        set_dscp(sock, self.dscp)  # before connect: the SYN is marked too
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
        self._reader, self._writer = await asyncio.open_connection(sock=sock)
        self._acks = asyncio.ensure_future(self._read_acks())

    async def _read_acks(self) -> None:
        try:
            while True:
                (msg_id,) = ACK.unpack(await self._reader.readexactly(ACK.size))
                fut = self._waiting.pop(msg_id, None)
                if fut is not None and not fut.done():
                    fut.set_result(time.monotonic())
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            for fut in self._waiting.values():
                if not fut.done():
                    fut.set_exception(ConnectionError(f"{self.address}: {exc!r}"))

    async def send(self, msg_id: int, payload: bytes) -> float:
        """Send one message; return the monotonic time its ack arrived."""
        fut = asyncio.get_running_loop().create_future()
        self._waiting[msg_id] = fut
        self._writer.write(HEADER.pack(msg_id, len(payload)) + payload)
        await self._writer.drain()
        return await fut

    async def close(self) -> None:
        if self._acks is not None:
            self._acks.cancel()
        if self._writer is not None:
            self._writer.close()


@dataclass(frozen=True)
class Completion:
    collective: int
    start: float  # monotonic
    bytes: int  # sent by this engine, all peers
    seconds: float  # until the last peer acknowledged


class AllToAll:
    """One engine's side of its group's AllToAlls: its share to every peer, timed to the last ack."""

    def __init__(self, peers: list[str], dscp: int | None):
        self.peers = [Peer(a, dscp) for a in peers]
        self.completions: list[Completion] = []
        self._next = 0

    async def connect(self) -> None:
        await asyncio.gather(*(p.connect() for p in self.peers))

    async def run(self, nbytes: int) -> Completion:
        """Send `nbytes` spread evenly over the peers; done when all acknowledged."""
        self._next += 1
        cid, t0 = self._next, time.monotonic()
        if not self.peers or nbytes <= 0:
            done = Completion(cid, t0, 0, 0.0)
        else:
            share = -(-nbytes // len(self.peers))
            payload = bytes(share)
            acks = await asyncio.gather(*(p.send(cid, payload) for p in self.peers))
            done = Completion(cid, t0, share * len(self.peers), max(acks) - t0)
        self.completions.append(done)
        return done

    async def close(self) -> None:
        await asyncio.gather(*(p.close() for p in self.peers))


ROW_COLUMNS = ["collective", "start_s", "bytes", "completion_s"]


def csv_row(c: Completion, t0: float, time_scale: float = 1.0) -> list:
    """A completion as ROW_COLUMNS, times in real seconds (wall / time scale) since `t0`."""
    return [c.collective, round((c.start - t0) / time_scale, 6), c.bytes, round(c.seconds / time_scale, 6)]


def write_csv(path: str, completions: list[Completion], t0: float, engine: str = "", time_scale: float = 1.0) -> None:
    """collectives.csv of one engine running alone: one row per collective."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["engine", *ROW_COLUMNS])
        w.writerows([engine, *csv_row(c, t0, time_scale)] for c in completions)


# -- agent: one node's collectives in a process of their own ---------------------------------------------
CTRL = struct.Struct("!BIIQdd")  # kind, request id, engine (RUN) or collective id, bytes, start, seconds
RUN, DONE, FAILED, READY, STOP, STATS = range(6)
# On GPUs, collectives are driven by the GPU and NIC (DeepEP's GPU-initiated RDMA), never waiting for a host
# CPU. The agent is the emulation's stand-in for that hardware: it runs at a higher CPU priority than the
# daemons, so the few microseconds of CPU each message needs are not queued behind a node's KV work.
AGENT_NICE = -10


class _Agent:
    """The agent process: receivers on the node's engine addresses, one AllToAll per engine (connected
    on first use), RUN requests served concurrently, each answered DONE with its completion."""

    def __init__(self, group: list[str], own: list[str], dscp: int | None):
        self.own, self.dscp = own, dscp
        self.by_engine = [AllToAll([a for a in group if a != mine], dscp) for mine in own]
        self._connected: list[asyncio.Future | None] = [None] * len(own)
        self.received = ReceiverStats()
        self._tasks: set[asyncio.Task] = set()

    async def _connect(self, engine: int) -> None:
        for _ in range(200):  # peers start at about the same time: retry for up to ~10 s
            try:
                await self.by_engine[engine].connect()
                return
            except OSError:
                await asyncio.sleep(0.05)
        raise ConnectionError(f"engine {engine}: collective peers unreachable")

    async def _run(self, writer: asyncio.StreamWriter, req: int, engine: int, nbytes: int) -> None:
        try:
            if self._connected[engine] is None:
                self._connected[engine] = asyncio.ensure_future(self._connect(engine))
            await self._connected[engine]
            c = await self.by_engine[engine].run(nbytes)
            writer.write(CTRL.pack(DONE, req, c.collective, c.bytes, c.start, c.seconds))
        except (OSError, ConnectionError) as exc:
            print(f"collective agent: engine {engine}: {exc!r}", file=sys.stderr, flush=True)
            writer.write(CTRL.pack(FAILED, req, engine, nbytes, 0.0, 0.0))

    async def main(self, fd: int) -> None:
        reader, writer = await asyncio.open_unix_connection(sock=socket.socket(fileno=fd))
        servers = []
        for addr in self.own:
            host, port = addr.rsplit(":", 1)
            servers.append(await start_receiver(host, int(port), self.dscp, self.received))
        writer.write(CTRL.pack(READY, 0, 0, 0, 0.0, 0.0))
        try:
            while True:
                kind, req, engine, nbytes, _, _ = CTRL.unpack(await reader.readexactly(CTRL.size))
                if kind == STOP:
                    break
                if kind != RUN or not 0 <= engine < len(self.own):
                    raise ValueError(f"bad control message kind {kind} engine {engine}")
                task = asyncio.ensure_future(self._run(writer, req, engine, nbytes))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            writer.write(CTRL.pack(STATS, 0, self.received.messages, self.received.bytes, 0.0, 0.0))
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the node is gone: so is its agent
        finally:
            for task in self._tasks:
                task.cancel()
            for a2a in self.by_engine:
                await a2a.close()
            for srv in servers:
                srv.close()
            writer.close()


class CollectiveAgent:
    """A node's handle on its collective agent process (``python -m traffic.collectives agent``)."""

    def __init__(self, group: list[str], own: list[str], dscp: int | None, nice: int = AGENT_NICE,
                 python: str = sys.executable):
        self.argv = [python, "-m", "traffic.collectives", "agent", "--group", ",".join(group),
                     "--own", ",".join(own), "--nice", str(nice)] + ([] if dscp is None else ["--dscp", str(dscp)])
        self.proc: subprocess.Popen | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._waiting: dict[int, asyncio.Future] = {}
        self._next = 0
        self._stats: asyncio.Future | None = None
        self._replies: asyncio.Task | None = None

    async def start(self, timeout_s: float = 30.0) -> None:
        mine, theirs = socket.socketpair()
        try:
            self.proc = subprocess.Popen([*self.argv, "--fd", str(theirs.fileno())], pass_fds=(theirs.fileno(),))
        finally:
            theirs.close()
        reader, self._writer = await asyncio.open_unix_connection(sock=mine)
        try:
            kind = CTRL.unpack(await asyncio.wait_for(reader.readexactly(CTRL.size), timeout_s))[0]
        except (asyncio.IncompleteReadError, asyncio.TimeoutError) as exc:
            await self.close()
            raise RuntimeError(f"collective agent did not start ({' '.join(self.argv)})") from exc
        if kind != READY:
            raise RuntimeError(f"collective agent said {kind} instead of ready")
        self._stats = asyncio.get_running_loop().create_future()
        self._replies = asyncio.ensure_future(self._read(reader))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                kind, req, ident, nbytes, start, seconds = CTRL.unpack(await reader.readexactly(CTRL.size))
                if kind == STATS:
                    self._stats.set_result(ReceiverStats(messages=ident, bytes=nbytes))
                    return
                fut = self._waiting.pop(req, None)
                if fut is None or fut.done():
                    continue
                if kind == DONE:
                    fut.set_result(Completion(ident, start, nbytes, seconds))
                else:
                    fut.set_exception(ConnectionError(f"collective of engine {ident} failed (agent stderr)"))
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            for fut in [*self._waiting.values(), self._stats]:
                if fut is not None and not fut.done():
                    fut.set_exception(ConnectionError(f"collective agent gone: {exc!r}"))

    async def run(self, engine: int, nbytes: int) -> Completion:
        """Engine `engine`'s share of one AllToAll, `nbytes` to its peers; returns when all acknowledged."""
        self._next += 1
        fut = asyncio.get_running_loop().create_future()
        self._waiting[self._next] = fut
        self._writer.write(CTRL.pack(RUN, self._next, engine, nbytes, 0.0, 0.0))
        return await fut

    async def close(self, timeout_s: float = 5.0) -> ReceiverStats | None:
        """Stop the agent; return what its receivers got (None if it could not say)."""
        stats = None
        if self._writer is not None and not self._writer.is_closing():
            try:
                self._writer.write(CTRL.pack(STOP, 0, 0, 0, 0.0, 0.0))
                if self._stats is not None:
                    stats = await asyncio.wait_for(asyncio.shield(self._stats), timeout_s)
            except (ConnectionError, asyncio.TimeoutError):
                stats = None
            self._writer.close()
        if self._replies is not None:
            self._replies.cancel()
        if self.proc is not None:
            try:
                await asyncio.to_thread(self.proc.wait, timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return stats


def _agent(args) -> None:
    # the node's process group gets the node's SIGTERM / Ctrl-C; the agent leaves when its node closes it
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        os.setpriority(os.PRIO_PROCESS, 0, args.nice)
    except PermissionError:  # not root: run at the daemons' priority, and say so
        print(f"collective agent: cannot set nice {args.nice} (not root); collectives share the CPU evenly",
              file=sys.stderr, flush=True)
    asyncio.run(_Agent(args.group.split(","), args.own.split(","), args.dscp).main(args.fd))


# -- command line ---------------------------------------------------------------------------------------
async def _serve(args) -> None:
    host, port = args.listen.rsplit(":", 1)
    stats = ReceiverStats()
    server = await start_receiver(host, int(port), args.dscp, stats)
    print(f"ready {port}", flush=True)
    async with server:
        await server.serve_forever()


async def _send(args) -> None:
    a2a = AllToAll(args.peers.split(","), args.dscp)
    await a2a.connect()
    t0 = time.monotonic()
    for _ in range(args.count):
        await a2a.run(args.bytes)
        await asyncio.sleep(args.gap_ms / 1000)
    await a2a.close()
    write_csv(args.out, a2a.completions, t0, engine=args.engine)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m traffic.collectives", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="receive and acknowledge collectives")
    s.add_argument("--listen", required=True, help="ADDR:PORT (an engine's CNIC address)")
    s.add_argument("--dscp", type=int, default=None)
    t = sub.add_parser("send", help="run AllToAlls of a fixed size at a fixed rhythm (the reference, alone)")
    t.add_argument("--peers", required=True, help="ADDR:PORT of every peer engine, comma separated")
    t.add_argument("--dscp", type=int, default=None)
    t.add_argument("--bytes", type=int, required=True, help="bytes this engine sends per collective, all peers")
    t.add_argument("--count", type=int, default=100)
    t.add_argument("--gap-ms", type=float, default=0.0, help="idle time between collectives (compute)")
    t.add_argument("--engine", default="")
    t.add_argument("--out", required=True)
    a = sub.add_parser("agent", help="a node's collectives, run for it over a control socket (CollectiveAgent)")
    a.add_argument("--fd", type=int, required=True, help="the control socket, inherited")
    a.add_argument("--group", required=True, help="ADDR:PORT of every engine of the group")
    a.add_argument("--own", required=True, help="ADDR:PORT of this node's engines, engine 0 first")
    a.add_argument("--dscp", type=int, default=None)
    a.add_argument("--nice", type=int, default=AGENT_NICE, help="CPU priority (default: %(default)s)")
    args = p.parse_args(argv)
    if args.cmd == "agent":
        _agent(args)
    else:
        asyncio.run(_serve(args) if args.cmd == "serve" else _send(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())


"""Scheduler daemon: a global FIFO of turns, the paper's placement rules, and the request's life.

    python -m daemons.scheduler --listen 10.9.4.1:7000 --config RUN/scheduler.json

Runs on the control host, on the management network only. The workload driver
calls ``Submit`` for every turn; the turn waits in one global FIFO queue until
a PE engine may take it (:func:`daemons.policy.choose_pe`; above ``beta`` an
engine takes nothing), then gets a DE engine (:func:`daemons.policy.choose_de`)
and a read side, and runs: PE ``Prefill`` (which drives the storage reads and
the layerwise transfers) and then DE ``Decode``. ``Submit`` returns the turn's
timings when its last token is out.

Engine loads are the scheduler's own exact accounts of what it dispatched and
what has finished (the paper's engine reports carry the same numbers):
unfinished requests and tokens per engine. Each node's storage read queue is
the node's own figure, from its Status (:mod:`daemons.nodewatch`), which also
tells the scheduler when a node has died: its engines are taken out (of
placement, and of their EP groups' lockstep) and the turns that were running
on it are placed again, reading their context from storage again.

The config file (JSON) holds ``mode`` (basic | dualpath | oracle), ``policy``
(paper | round_robin | ..., or a class of one's own: ``/abs/file.py:Class`` or ``module:Class``,
:mod:`daemons.policyapi`), ``layer_chunks``, ``alpha_tokens``, ``beta_tokens``,
``hbm_tokens`` (context tokens one DE engine holds) and ``nodes``: a list of
``{"name", "role", "mgmt", "cnics": [ADDR:PORT per engine], "lockstep": [GROUP@HOST per engine]}``
(lockstep optional), ``status_period_s`` (wall seconds between the nodes' load
reports, optional). ``--events FILE`` writes what the scheduler saw of the
nodes (deaths, retried and failed turns) as JSON at stop.

A policy class of one's own is loaded at start and asked for the PE engine and
the read side where the paper's rules are otherwise used (the DE engine stays
the paper's), through :class:`daemons.policyapi.Guarded`: a call that raises or
returns no valid choice falls back to the paper's choice for that turn. Its
first fallback of each kind is an event ``policy_fallback``; at stop, an event
``policy_fallbacks`` counts every call and fallback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import grpc

from daemons import dualpath_pb2 as pb
from daemons import dualpath_pb2_grpc as pb_grpc
from daemons.nodewatch import STATUS_PERIOD_S, NodeWatch
from daemons.policyapi import Guarded, is_plugin, load_policy
from daemons.policy import (POLICIES, READ_PATHS, EngineLoad, RoundRobin, choose_de, choose_pe,
                            choose_read_side, split_blocks)
from daemons.runtime import CONTROL_DEADLINE_S, TURN_DEADLINE_S, RpcCounter, rpc_counts, run_event_loop, \
    serve_until_stopped

MAX_RETRIES = 3  # placements of a turn after the first, each time a node it ran on died
RETIRED = 1 << 62  # the lockstep call number that retires a dead engine (daemons/lockstep.py: newer than any)

MODES = ("basic", "layerwise", "dualpath", "oracle")  # layerwise: Basic's PE-side reads, layerwise prefill
PATH_NAMES = {pb.READ_PATH_PE: "pe", pb.READ_PATH_DE: "de", pb.READ_PATH_SPLIT: "split"}  # requests.csv "path"


@dataclass(frozen=True)
class NodeInfo:
    name: str
    role: str
    mgmt: str
    cnics: tuple[str, ...]
    lockstep: tuple[str, ...] = ()  # GROUP@HOST_MGMT per engine


@dataclass(frozen=True)
class SchedulerConfig:
    mode: str
    policy: str
    layer_chunks: int
    alpha_tokens: float
    beta_tokens: float
    hbm_tokens: int
    nodes: tuple[NodeInfo, ...]
    read_path: str = "choose"
    status_period_s: float = STATUS_PERIOD_S  # wall seconds between a node's load reports

    @classmethod
    def from_json(cls, data: dict) -> "SchedulerConfig":
        if data["mode"] not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {data['mode']!r}")
        if data["policy"] not in POLICIES and not is_plugin(data["policy"]):
            raise ValueError(f"policy must be one of {POLICIES} or FILE.py:Class, not {data['policy']!r}")
        if data.get("read_path", "choose") not in READ_PATHS:
            raise ValueError(f"read_path must be one of {READ_PATHS}, not {data['read_path']!r}")
        nodes = tuple(NodeInfo(n["name"], n["role"], n["mgmt"], tuple(n["cnics"]), tuple(n.get("lockstep", ())))
                      for n in data["nodes"])
        if not any(n.role == "pe" for n in nodes) or not any(n.role == "de" for n in nodes):
            raise ValueError("the cluster needs at least one prefill and one decode node")
        return cls(data["mode"], data["policy"], int(data["layer_chunks"]), float(data["alpha_tokens"]),
                   float(data["beta_tokens"]), int(data["hbm_tokens"]), nodes, data.get("read_path", "choose"),
                   float(data.get("status_period_s", STATUS_PERIOD_S)))


@dataclass
class _Load:
    requests: int = 0
    tokens: int = 0


@dataclass
class _Claim:
    """What one placed turn holds: its engines' loads and its readers' queues, until each is released."""
    pe_eng: EngineLoad
    de_eng: EngineLoad
    path: int
    pe_blocks: int                # split reads: the hit blocks the PE node reads
    reads: dict[str, int]         # node -> hit tokens it reads for this turn
    new_tokens: int
    de_tokens: int
    wait_s: float
    held: set[str] = field(default_factory=lambda: {"pe", "de"})


@dataclass
class _Pending:
    turn: pb.TurnRequest
    done: asyncio.Future
    submitted: float = field(default_factory=time.monotonic)
    retries: int = 0


class SchedulerService(pb_grpc.SchedulerServicer):
    def __init__(self, config: SchedulerConfig):
        self.cfg = config
        self.nodes = {n.name: n for n in config.nodes}
        self.pe_load = {(n.name, i): _Load() for n in config.nodes if n.role == "pe" for i in range(len(n.cnics))}
        self.de_load = {(n.name, i): _Load() for n in config.nodes if n.role == "de" for i in range(len(n.cnics))}
        # the nodes' read queues and liveness, from their Status
        self.watch = NodeWatch({n: (lambda n=n: self._stub(n)) for n in self.nodes},
                               lambda: bool(self.queue or self.running), self._node_died,
                               period_s=config.status_period_s)
        self.events: list[dict] = []  # nodes that died, turns placed again or failed
        self.on_event: Callable[[], None] = lambda: None
        self.running = 0
        self.queue: deque[_Pending] = deque()
        self._changed = asyncio.Event()
        self._rr = RoundRobin()
        self.plugin = Guarded(load_policy(config.policy), self._policy_fallback) if is_plugin(config.policy) \
            else None  # a policy class of one's own (daemons/policyapi.py)
        self._channels: dict[str, tuple[grpc.aio.Channel, pb_grpc.NodeStub]] = {}
        self._dispatcher: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self.rpcs: RpcCounter | None = None  # what this server served (set by serve)

    def _stub(self, node: str) -> pb_grpc.NodeStub:
        return self._stub_at(self.nodes[node].mgmt)

    def _stub_at(self, mgmt: str) -> pb_grpc.NodeStub:
        if mgmt not in self._channels:
            ch = grpc.aio.insecure_channel(mgmt)
            self._channels[mgmt] = (ch, pb_grpc.NodeStub(ch))
        return self._channels[mgmt][1]

    def _policy_fallback(self, method: str, kind: str, detail: str) -> None:
        self._event("policy_fallback", method=method, kind=kind, detail=detail)

    async def close(self) -> None:
        if self.plugin is not None:
            self._event("policy_fallbacks", **self.plugin.totals())
        if self._dispatcher:
            self._dispatcher.cancel()
        self.watch.stop()
        for ch, _ in self._channels.values():
            await ch.close()

    async def Submit(self, request: pb.TurnRequest, context):  # noqa: N802 - gRPC's name
        if self._dispatcher is None:
            self.watch.start()
            self._dispatcher = asyncio.ensure_future(self._dispatch())
        item = _Pending(request, asyncio.get_running_loop().create_future())
        for role, loads in (("prefill", self._pe_loads()), ("decode", self._de_loads())):
            if not loads:
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"no live {role} node left")
        self.queue.append(item)
        self.watch.work.set()
        self._changed.set()
        return await item.done

    def _event(self, what: str, **kw) -> None:
        self.events.append({"t_mono": time.monotonic(), "event": what, **kw})  # CLOCK_MONOTONIC: one per machine
        self.on_event()

    async def _node_died(self, node: str) -> None:
        """Take a dead node's engines out: of placement (its loads are no longer offered) and of their EP groups'
        lockstep (their hosts stop waiting for them). Its running turns fail over in ``_run``."""
        self._event("node_dead", node=node)
        info = self.nodes[node]
        for engine, entry in enumerate(info.lockstep):
            group, host = entry.split("@", 1)
            if host == info.mgmt:
                continue  # the group's host died with it: the others compute on their own
            try:
                await self._stub_at(host).LockstepLeave(pb.LockstepArrival(
                    group=group, member=f"{node}/{engine}", seq=RETIRED), timeout=CONTROL_DEADLINE_S)
            except grpc.aio.AioRpcError:
                pass
        if not any(self.watch.alive(n.name) for n in self.cfg.nodes if n.role == info.role):
            while self.queue:  # no live node of that role: no queued turn can ever be placed
                item = self.queue.popleft()
                self._event("turn_failed", turn=item.turn.request.request_id, why=f"no live {info.role} node")
                if not item.done.done():
                    item.done.set_exception(RuntimeError(f"no live {info.role} node left ({node} was the last)"))
        self._changed.set()

    async def Stats(self, request, context):  # noqa: N802
        waiting = sum(1 for item in self.queue if not item.done.done())  # a cancelled Submit is not waiting
        return pb.SchedulerStats(rpcs=rpc_counts(self.rpcs), waiting_turns=waiting, running_turns=self.running)

    # -- placement ---------------------------------------------------------------
    def _pe_loads(self) -> list[EngineLoad]:
        return [EngineLoad(n, i, ld.requests, ld.tokens) for (n, i), ld in self.pe_load.items()
                if self.watch.alive(n)]

    def _de_loads(self) -> list[EngineLoad]:
        return [EngineLoad(n, i, ld.requests, ld.tokens, self.cfg.hbm_tokens - ld.tokens)
                for (n, i), ld in self.de_load.items() if self.watch.alive(n)]

    def _place(self, turn: pb.TurnRequest) -> tuple[EngineLoad, EngineLoad] | None:
        pe_loads, de_loads = self._pe_loads(), self._de_loads()
        if not pe_loads or not de_loads:
            return None  # none alive of a role (its queued turns were failed)
        if self.cfg.policy.startswith("round_robin"):
            return self._rr.choose("pe", pe_loads), self._rr.choose("de", de_loads)
        nodes = {n: self.watch.load(n) for n in self.nodes}
        if self.plugin is not None:  # idle: nothing placed is unfinished, so a wait would never end
            idle = not any(e.unfinished_requests for e in pe_loads + de_loads)
            pe_eng = self.plugin.choose_pe(pe_loads, nodes, self.cfg.alpha_tokens, self.cfg.beta_tokens, idle)
        else:
            pe_eng = choose_pe(self._pe_loads(), nodes, self.cfg.alpha_tokens, self.cfg.beta_tokens)
        if pe_eng is None:
            return None
        de_eng = choose_de(self._de_loads(), turn.context_tokens + turn.request.gen_tokens)
        return None if de_eng is None else (pe_eng, de_eng)

    def _path(self, pe_node: str, de_node: str, spec: pb.RequestSpec, hit_tokens: int) -> tuple[int, int]:
        """(read path, hit blocks the PE node reads) of a turn placed on these nodes."""
        if self.cfg.mode == "oracle":
            return pb.READ_PATH_NONE, 0
        if self.cfg.mode in ("basic", "layerwise"):
            return pb.READ_PATH_PE, spec.hit_blocks
        if self.cfg.read_path == "split" and spec.hit_blocks:
            pe_blocks = split_blocks(spec.hit_blocks, hit_tokens // spec.hit_blocks, self.watch.read_queue(pe_node),
                                     self.watch.read_queue(de_node))
            return pb.READ_PATH_SPLIT, pe_blocks
        if self.cfg.policy == "round_robin_pe_reads":
            side = "pe"
        elif self.cfg.policy == "round_robin_alternating":
            side = self._rr.alternate("read", ("pe", "de"))
        elif self.plugin is not None:
            side = self.plugin.read_side(self.watch.load(pe_node), self.watch.load(de_node))
        else:
            side = choose_read_side(self.watch.load(pe_node), self.watch.load(de_node))
        return (pb.READ_PATH_PE, spec.hit_blocks) if side == "pe" else (pb.READ_PATH_DE, 0)

    def _place_ready(self) -> list[tuple[_Pending, _Claim]]:
        """Place turns from the head of the FIFO while the head can be placed; each is charged to its
        engines and read queue as it is placed, before the next placement reads the loads (a burst placed
        in one pass on stale loads would all land on one engine and one read side)."""
        placed_now = []
        while self.queue:  # FIFO: the head waits until it can be placed
            if self.queue[0].done.done():  # its Submit was cancelled (deadline, driver gone)
                self.queue.popleft()
                continue
            placed = self._place(self.queue[0].turn)
            if placed is None:
                break
            item = self.queue.popleft()
            placed_now.append((item, self._claim(item, *placed)))
        return placed_now

    async def _dispatch(self) -> None:
        while True:
            await self._changed.wait()
            self._changed.clear()
            for item, claim in self._place_ready():
                task = asyncio.ensure_future(self._run(item, claim))
                self._tasks.add(task)
                self.running += 1
                task.add_done_callback(self._ran)

    def _ran(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        self.running -= 1

    # -- one turn ------------------------------------------------------------------
    def _claim(self, item: _Pending, pe_eng: EngineLoad, de_eng: EngineLoad) -> _Claim:
        """Charge the turn to its engines, and tell the node watch what its readers will read, at the moment it
        is placed."""
        turn, spec = item.turn, item.turn.request
        hit = turn.context_tokens - spec.new_tokens
        path, pe_blocks = self._path(pe_eng.node, de_eng.node, spec, hit)
        if path == pb.READ_PATH_NONE:
            reads = {}
        else:  # the PE node reads its first pe_blocks, the DE node the rest
            pe_tokens = hit if path == pb.READ_PATH_PE else pe_blocks * (hit // max(1, spec.hit_blocks))
            reads = {n: t for n, t in ((pe_eng.node, pe_tokens), (de_eng.node, hit - pe_tokens)) if t}
        claim = _Claim(pe_eng, de_eng, path, pe_blocks, reads, spec.new_tokens,
                       turn.context_tokens + spec.gen_tokens, time.monotonic() - item.submitted)
        self._charge(claim, +1)
        for node, tokens in reads.items():
            self.watch.charge(node, tokens)
        return claim

    def _charge(self, claim: _Claim, sign: int, what: tuple[str, ...] = ("pe", "de")) -> None:
        """Add (sign +1) or return (-1) the claim's accounts named in `what`."""
        if "pe" in what:
            ld = self.pe_load[(claim.pe_eng.node, claim.pe_eng.engine)]
            ld.requests += sign
            ld.tokens += sign * claim.new_tokens
        if "de" in what:
            ld = self.de_load[(claim.de_eng.node, claim.de_eng.engine)]
            ld.requests += sign
            ld.tokens += sign * claim.de_tokens

    def _release(self, claim: _Claim, what: str) -> None:
        """Return one account of the claim ("pe" or "de"), exactly once."""
        if what not in claim.held:
            return
        claim.held.discard(what)
        self._charge(claim, -1, (what,))
        self._changed.set()

    async def _run(self, item: _Pending, claim: _Claim) -> None:
        spec, pe_eng, de_eng, path = item.turn.request, claim.pe_eng, claim.de_eng, claim.path
        turn = item.turn
        try:
            pe_node, de_node = self.nodes[pe_eng.node], self.nodes[de_eng.node]
            pre = await self._stub(pe_eng.node).Prefill(pb.PrefillRequest(
                request=spec, pe_engine=pe_eng.engine, path=path, layerwise=self.cfg.mode != "basic",
                de_mgmt=de_node.mgmt, de_cnic=de_node.cnics[de_eng.engine], de_engine=de_eng.engine,
                pe_cnic=pe_node.cnics[pe_eng.engine], pe_blocks=claim.pe_blocks), timeout=TURN_DEADLINE_S)
            self._release(claim, "pe")
            dec = await self._stub(de_eng.node).Decode(pb.DecodeRequest(
                request=spec, de_engine=de_eng.engine, context_tokens=turn.context_tokens, path=path),
                timeout=TURN_DEADLINE_S)
            decode_start = time.monotonic() - dec.decode_s
            first_token_at = decode_start + dec.first_token_s
            ttst = decode_start + dec.second_token_s - item.submitted if dec.second_token_s else 0.0
            item.done.set_result(pb.TurnResult(
                pe=f"{pe_eng.node}/{pe_eng.engine}", de=f"{de_eng.node}/{de_eng.engine}",
                path=PATH_NAMES.get(path, "none"),
                kv_bytes=pre.kv_bytes, wait_s=claim.wait_s, read_s=pre.read_s, prefill_s=pre.prefill_s,
                decode_s=dec.decode_s, ttft_s=first_token_at - item.submitted, tpot_s=dec.tpot_s,
                alloc_s=pre.alloc_s, ttst_s=ttst, retries=item.retries))
        except Exception as exc:  # noqa: BLE001 - the driver gets the error; the scheduler goes on
            await self._failed(item, claim, exc)
        finally:
            for what in ("pe", "de"):
                self._release(claim, what)

    async def _failed(self, item: _Pending, claim: _Claim, exc: Exception) -> None:
        """A turn's call failed. If a node it ran on has died, place it again (at the head of the queue: it
        was admitted first), up to MAX_RETRIES times; else the driver gets the error."""
        rid = item.turn.request.request_id
        dead = [n for n in dict.fromkeys((claim.pe_eng.node, claim.de_eng.node)) if not await self.watch.probe(n)]
        why = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
        de = claim.de_eng.node
        if claim.pe_eng.node in dead and de not in dead:  # the dead PE cannot return the DE buffer it reserved
            try:
                await self._stub(de).Release(pb.ReserveRequest(request_id=rid), timeout=CONTROL_DEADLINE_S)
            except grpc.aio.AioRpcError:
                pass
        if dead and item.retries < MAX_RETRIES and self._pe_loads() and self._de_loads():
            item.retries += 1
            self._event("turn_retried", turn=rid, dead=dead, retries=item.retries)
            self.queue.appendleft(item)
            self._changed.set()
        elif not item.done.done():
            self._event("turn_failed", turn=rid, dead=dead, why=(why or "")[:300])
            item.done.set_exception(exc)


async def serve(args) -> None:
    cfg = SchedulerConfig.from_json(json.loads(Path(args.config).read_text()))
    service = SchedulerService(cfg)
    service.rpcs = RpcCounter()
    server = grpc.aio.server(interceptors=[service.rpcs])
    pb_grpc.add_SchedulerServicer_to_server(service, server)

    def write_events() -> None:
        if args.events:
            Path(args.events).write_text(json.dumps(service.events, indent=1))

    service.on_event = write_events  # on each event: a scheduler stopped hard still leaves them

    async def stop() -> None:
        await service.close()
        write_events()

    await serve_until_stopped([(server, [args.listen])], stop)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m daemons.scheduler", description=__doc__.splitlines()[0])
    p.add_argument("--listen", required=True)
    p.add_argument("--config", required=True)
    p.add_argument("--events", default="", help="write the nodes' deaths and the retried and failed turns here")
    run_event_loop(serve(p.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Workload driver: plays agentic trajectories against the scheduler and records every turn.

    python -m traffic.driver preload --workload W.json --block-tokens 64 --out preload.json
    python -m traffic.driver run --scheduler 10.9.4.1:7000 --workload W.json --block-tokens 64 \
        --time-scale 1 --out requests.csv

``W.json`` holds the fields of :class:`traffic.workload.WorkloadSpec`. Both
subcommands generate the same trajectories from the same seed: ``preload``
lists, per agent, the Full Blocks its context already has in storage before
its first emulated turn (the storage daemons write them at start-up);
``run`` starts every agent (offline: all at t=0; online: at its Poisson
arrival), submits its turns one after the other (tool latency 0, as in the
paper) and writes one CSV row per turn. With ``--stop-after-window`` (online
runs), once every turn submitted up to the last arrival (the end of the
steady window, ``scenarios.online``) has finished, no agent starts another
turn: the load stays on until the last measured turn is done, and the run does
not wait for the late agents' remaining trajectories.

A turn's request: the context before the turn is cached in storage as
``context // block_tokens`` Full Blocks; the partial last block is recomputed
with the appended tokens (prefix caching works on whole blocks). Times in the
CSV are REAL seconds (wall seconds / time scale). Runs on the control host.

A turn the scheduler could not finish (a fault: its KV lost, no live node left)
is written to ``failed.csv`` beside ``--out`` (FAILED_COLUMNS) with the error;
its agent then stops, as its later turns would need the KV this turn did not
leave in storage (``abandoned``: the turns it did not run).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import sys
import time
from pathlib import Path

import grpc

from daemons import dualpath_pb2 as pb
from daemons import dualpath_pb2_grpc as pb_grpc
from daemons.runtime import run_event_loop
from traffic.traces import play
from traffic.workload import Trajectory, Turn, WorkloadSpec

COLUMNS = ["agent", "turn", "pe", "de", "path", "context_tokens", "hit_tokens", "new_tokens", "gen_tokens",
           "kv_bytes", "arrival_s", "submit_s", "done_s", "wait_s", "alloc_s", "read_s", "prefill_s", "decode_s",
           "ttft_s", "ttst_s", "tpot_s", "last_turn", "retries"]
FAILED_COLUMNS = ["agent", "turn", "submit_s", "failed_s", "abandoned", "error"]
SUBMIT_DEADLINE_S = 3600.0  # wall seconds one turn may take, queued and placed again included


def trajectory_id(agent: int) -> str:
    return f"a{agent}"


def preload_list(trajectories: list[Trajectory], block_tokens: int) -> list[dict]:
    return [{"trajectory": trajectory_id(t.agent), "blocks": t.preloaded_tokens // block_tokens}
            for t in trajectories]


def turn_request(turn: Turn, block_tokens: int, layer_chunks: int, tag: str = "") -> pb.TurnRequest:
    hit_blocks = turn.context_before_tokens // block_tokens
    new_tokens = turn.context_before_tokens - hit_blocks * block_tokens + turn.append_tokens
    spec = pb.RequestSpec(request_id=f"{tag}{trajectory_id(turn.agent)}-t{turn.index}",
                          trajectory=trajectory_id(turn.agent), hit_blocks=hit_blocks, new_tokens=new_tokens,
                          gen_tokens=turn.gen_tokens, layer_chunks=layer_chunks)
    return pb.TurnRequest(agent=trajectory_id(turn.agent), turn=turn.index, request=spec,
                          context_tokens=turn.context_before_tokens + turn.append_tokens)


class _Window:
    """Turns submitted up to the last arrival (wall time ``end``) and not yet finished; ``stop`` is set once
    ``end`` has passed with none left (only when the run stops after the window)."""

    def __init__(self, end: float, enabled: bool):
        self.end, self.enabled, self.open = end, enabled, 0
        self.stop = asyncio.Event()

    def started(self, t: float) -> bool:
        measured = t <= self.end
        self.open += measured
        return measured

    def finished(self, measured: bool) -> None:
        self.open -= measured
        self.check()

    def check(self) -> None:
        if self.enabled and self.open == 0 and time.monotonic() > self.end:
            self.stop.set()

    async def watch(self) -> None:  # the window may end with no measured turn in flight
        await asyncio.sleep(max(0.0, self.end - time.monotonic()) + 1e-3)
        self.check()


async def _agent(stub, traj: Trajectory, start_s: float, t0: float, args, rows: list[dict], window: _Window,
                 failed: list[dict]) -> None:
    await asyncio.sleep(max(0.0, t0 + start_s * args.time_scale - time.monotonic()))  # its arrival time
    for i, turn in enumerate(traj.turns):
        if i and window.stop.is_set():  # its first turn is its arrival: load that always comes
            return
        req = turn_request(turn, args.block_tokens, args.layer_chunks, args.tag)
        submit = time.monotonic()
        measured = window.started(submit)
        real = 1.0 / args.time_scale
        try:
            res = await stub.Submit(req, timeout=SUBMIT_DEADLINE_S)
        except grpc.aio.AioRpcError as exc:
            failed.append({"agent": req.agent, "turn": turn.index, "submit_s": round((submit - t0) * real, 6),
                           "failed_s": round((time.monotonic() - t0) * real, 6),
                           "abandoned": len(traj.turns) - i - 1, "error": (exc.details() or str(exc.code()))[:500]})
            print(f"done {len(rows) + len(failed)}", flush=True)
            return  # its later turns would read the KV this one did not leave
        finally:
            window.finished(measured)
        done = time.monotonic()
        rows.append({
            "agent": req.agent, "turn": turn.index, "pe": res.pe, "de": res.de, "path": res.path,
            "context_tokens": req.context_tokens, "hit_tokens": req.request.hit_blocks * args.block_tokens,
            "new_tokens": req.request.new_tokens, "gen_tokens": turn.gen_tokens, "kv_bytes": res.kv_bytes,
            "arrival_s": round(start_s, 6),
            "submit_s": round((submit - t0) * real, 6), "done_s": round((done - t0) * real, 6),
            **{k: round(getattr(res, k) * real, 6) for k in
               ("wait_s", "alloc_s", "read_s", "prefill_s", "decode_s", "ttft_s", "ttst_s", "tpot_s")},
            "last_turn": int(i == len(traj.turns) - 1), "retries": res.retries})
        print(f"done {len(rows) + len(failed)}", flush=True)  # progress, for whoever runs the driver


async def play_agents(stub, trajectories: list[Trajectory], starts: list[float], args,
                      failed: list[dict] | None = None) -> list[dict]:
    """Every agent's turns against the scheduler `stub`; one row per finished turn (each failed one in
    `failed`)."""
    rows: list[dict] = []
    failed = [] if failed is None else failed
    t0 = time.monotonic()
    window = _Window(t0 + max(starts) * args.time_scale, args.stop_after_window)
    watcher = asyncio.ensure_future(window.watch())
    try:
        await asyncio.gather(*(_agent(stub, t, s, t0, args, rows, window, failed)
                               for t, s in zip(trajectories, starts, strict=True)))
    finally:
        watcher.cancel()
    return rows


async def run(args) -> dict:
    spec = WorkloadSpec(**json.loads(Path(args.workload).read_text()))
    trajectories, starts = play(spec)
    async with grpc.aio.insecure_channel(args.scheduler) as channel:
        stub = pb_grpc.SchedulerStub(channel)
        await channel.channel_ready()
        print("start", flush=True)  # set up (imports, connection): the workload starts now
        cpu0 = time.process_time()
        t0 = time.monotonic()
        failed: list[dict] = []
        rows = await play_agents(stub, trajectories, starts, args, failed)
        jct_wall = time.monotonic() - t0
        cpu1 = time.process_time()
    rows.sort(key=lambda r: (r["submit_s"], r["agent"], r["turn"]))
    with open(args.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    with open(Path(args.out).with_name("failed.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FAILED_COLUMNS)
        w.writeheader()
        w.writerows(sorted(failed, key=lambda r: r["failed_s"]))
    return {"jct_s": jct_wall / args.time_scale, "requests": len(rows), "agents": len(trajectories),
            "failed": len(failed), "abandoned": sum(r["abandoned"] for r in failed),
            "cpu_s": round(cpu1 - cpu0, 4)}  # this process's CPU while the workload ran (all its threads)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m traffic.driver", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pre = sub.add_parser("preload")
    pre.add_argument("--workload", required=True)
    pre.add_argument("--block-tokens", type=int, required=True)
    pre.add_argument("--out", required=True)
    r = sub.add_parser("run")
    r.add_argument("--scheduler", required=True)
    r.add_argument("--workload", required=True)
    r.add_argument("--block-tokens", type=int, required=True)
    r.add_argument("--layer-chunks", type=int, default=4)
    r.add_argument("--time-scale", type=float, default=1.0)
    r.add_argument("--tag", default="", help="prefix of request ids (e.g. the mode)")
    r.add_argument("--stop-after-window", action="store_true",
                   help="start no turn once every turn submitted up to the last arrival has finished")
    r.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.cmd == "preload":
        spec = WorkloadSpec(**json.loads(Path(args.workload).read_text()))
        Path(args.out).write_text(json.dumps(preload_list(play(spec)[0], args.block_tokens)))
        return 0
    summary = run_event_loop(run(args))
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

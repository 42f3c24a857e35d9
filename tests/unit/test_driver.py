"""The workload driver end to end on 127.0.0.1: preload, turns through the scheduler, clean ledgers.

A second turn of an agent reads blocks that the first turn's decode wrote back:
a lost block here means write-back and the next read disagree.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import grpc

from daemon_procs import BLOCK_TOKENS, Procs
from daemons import dualpath_pb2 as pb
from daemons import dualpath_pb2_grpc as pb_grpc
from traffic.driver import COLUMNS, turn_request
from traffic.workload import Turn, WorkloadSpec, generate

WORKLOAD = {"set_name": "32K", "seed": 3, "agents": 3, "turns_per_agent": 2}


def test_turn_request_caches_whole_blocks_and_recomputes_the_tail():
    req = turn_request(Turn(agent=7, index=4, context_before_tokens=1000, append_tokens=300, gen_tokens=50), 64, 4)
    assert req.request.hit_blocks == 15  # 960 tokens in whole blocks
    assert req.request.new_tokens == 40 + 300
    assert req.context_tokens == 1300 and req.request.trajectory == "a7" and req.turn == 4


def test_driver_runs_every_turn_with_clean_ledgers(tmp_path):
    workload = tmp_path / "workload.json"
    workload.write_text(json.dumps(WORKLOAD))
    preload = tmp_path / "preload.list.json"
    subprocess.run([sys.executable, "-m", "traffic.driver", "preload", "--workload", str(workload),
                    "--block-tokens", str(BLOCK_TOKENS), "--out", str(preload)], check=True)
    expected_turns = sum(len(t.turns) for t in generate(WorkloadSpec(**WORKLOAD)))
    procs = Procs()
    try:
        st = procs.storage(tmp_path, json.loads(preload.read_text()))
        nodes = [procs.node("pe1", "pe", st), procs.node("de1", "de", st)]
        cfg = tmp_path / "sched.json"
        cfg.write_text(json.dumps({"mode": "dualpath", "policy": "paper", "layer_chunks": 4, "alpha_tokens": 1e9,
                                   "beta_tokens": 1e9, "hbm_tokens": 10**7, "nodes": nodes}))
        (port,) = procs.start(["-m", "daemons.scheduler", "--listen", "127.0.0.1:0", "--config", str(cfg)])
        out = tmp_path / "requests.csv"
        res = subprocess.run([sys.executable, "-m", "traffic.driver", "run", "--scheduler", f"127.0.0.1:{port}",
                              "--workload", str(workload), "--block-tokens", str(BLOCK_TOKENS),
                              "--time-scale", "0.01", "--out", str(out)], capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr
        summary = json.loads(res.stdout.strip().splitlines()[-1])
        rows = list(csv.DictReader(out.open()))
        assert list(rows[0].keys()) == COLUMNS
        assert summary["requests"] == len(rows) == expected_turns
        assert summary["jct_s"] >= max(float(r["done_s"]) for r in rows) * 0.99
        for r in rows:
            assert float(r["ttft_s"]) > 0 and float(r["tpot_s"]) > 0 and r["path"] in ("pe", "de")
            assert int(r["hit_tokens"]) + int(r["new_tokens"]) == int(r["context_tokens"])
        ledgers = [pb_grpc.NodeStub(grpc.insecure_channel(n["mgmt"])).Status(pb.StatusRequest()).ledger
                   for n in nodes]
        assert sum(lg.blocks_lost for lg in ledgers) == 0 and sum(lg.blocks_corrupt for lg in ledgers) == 0
        assert sum(lg.blocks_read for lg in ledgers) == sum(int(r["hit_tokens"]) // BLOCK_TOKENS for r in rows)
        assert sum(lg.blocks_written for lg in ledgers) > 0
    finally:
        procs.stop()


def test_an_online_run_stops_once_the_steady_windows_turns_are_done():
    """Agents arrive at 0, 0.1 and 0.2 s with 6 turns of 0.08 s each: stopping after the window, every turn
    submitted by the last arrival (0.2 s) finishes and the load stays on until then, but no agent starts a
    turn after; without the stop every turn runs."""
    import argparse
    import asyncio
    import time

    from traffic.driver import play_agents
    from traffic.workload import Trajectory

    class Scheduler:  # answers a turn after 80 ms, as a loaded cluster would
        async def Submit(self, req, timeout=None):  # noqa: N802 - gRPC's name
            await asyncio.sleep(0.08)
            return pb.TurnResult(pe="pe1", de="de1", path="pe")

    trajs = [Trajectory(a, 0, tuple(Turn(a, i, 1000 * i, 100, 10) for i in range(6))) for a in range(3)]

    def play(stop: bool) -> list[dict]:
        args = argparse.Namespace(block_tokens=64, layer_chunks=2, tag="", time_scale=1.0, stop_after_window=stop)
        return asyncio.run(play_agents(Scheduler(), trajs, [0.0, 0.1, 0.2], args))

    rows = play(True)
    assert len(rows) < 18 and {r["agent"] for r in rows} == {"a0", "a1", "a2"}
    by_agent = {a: sorted(r["turn"] for r in rows if r["agent"] == a) for a in ("a0", "a1", "a2")}
    assert all(turns == list(range(len(turns))) for turns in by_agent.values())  # each in order, none skipped
    window_done = max(r["done_s"] for r in rows if r["submit_s"] <= 0.2)  # the window's last turn finished
    assert max(r["submit_s"] for r in rows) <= window_done  # nothing started after that
    assert all(r["last_turn"] == int(r["turn"] == 5) for r in rows)
    rows = play(False)
    assert len(rows) == 18 and sum(r["last_turn"] for r in rows) == 3

    # an agent whose arrival the scheduler of the event loop delayed past the stop still makes its first turn
    from traffic.driver import _agent, _Window

    async def late() -> list[dict]:
        window, rows = _Window(end=0.0, enabled=True), []
        window.check()
        assert window.stop.is_set()
        args = argparse.Namespace(block_tokens=64, layer_chunks=2, tag="", time_scale=1.0)
        await _agent(Scheduler(), trajs[0], 0.0, time.monotonic(), args, rows, window, [])
        return rows

    assert [r["turn"] for r in asyncio.run(late())] == [0]

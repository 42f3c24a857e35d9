"""Scheduler daemon driving a PE node, a DE node and a storage server on 127.0.0.1."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from daemon_procs import BLOCK_TOKENS, Procs
from daemons import dualpath_pb2 as pb
from daemons import dualpath_pb2_grpc as pb_grpc
from daemons.scheduler import SchedulerConfig

HIT, NEW, GEN, AGENTS = 30, 80, 20, 6


@pytest.fixture
def plant(tmp_path):
    procs = Procs()
    try:
        st = procs.storage(tmp_path, [{"trajectory": f"a{i}", "blocks": HIT} for i in range(AGENTS)])
        nodes = [procs.node("pe1", "pe", st), procs.node("de1", "de", st)]

        def scheduler(mode: str, policy: str = "paper") -> pb_grpc.SchedulerStub:
            cfg = tmp_path / f"sched-{mode}-{policy}.json"
            cfg.write_text(json.dumps({"mode": mode, "policy": policy, "layer_chunks": 4, "alpha_tokens": 1e9,
                                       "beta_tokens": 1e9, "hbm_tokens": 10**7, "nodes": nodes}))
            (port,) = procs.start(["-m", "daemons.scheduler", "--listen", "127.0.0.1:0", "--config", str(cfg)])
            return pb_grpc.SchedulerStub(grpc.insecure_channel(f"127.0.0.1:{port}"))

        yield scheduler, nodes
    finally:
        procs.stop()


def _turn(i: int, mode: str) -> pb.TurnRequest:
    spec = pb.RequestSpec(request_id=f"{mode}-a{i}", trajectory=f"a{i}", hit_blocks=HIT, new_tokens=NEW,
                          gen_tokens=GEN, layer_chunks=4)
    return pb.TurnRequest(agent=f"a{i}", turn=0, request=spec, context_tokens=HIT * BLOCK_TOKENS + NEW)


def _submit_all(stub, mode: str) -> list[pb.TurnResult]:
    with ThreadPoolExecutor(AGENTS) as pool:
        return list(pool.map(lambda i: stub.Submit(_turn(i, mode), timeout=120), range(AGENTS)))


def _ledgers(nodes) -> list[pb.Ledger]:
    return [pb_grpc.NodeStub(grpc.insecure_channel(n["mgmt"])).Status(pb.StatusRequest()).ledger for n in nodes]


def test_dualpath_uses_both_read_paths_and_moves_clean_bytes(plant):
    scheduler, nodes = plant
    results = _submit_all(scheduler("dualpath"), "dualpath")
    assert {r.path for r in results} == {"pe", "de"}  # concurrent turns spread over both SNICs
    assert all(r.ttft_s > 0 and r.tpot_s > 0 and r.kv_bytes > 0 for r in results)
    assert {r.pe.split("/")[0] for r in results} == {"pe1"} and {r.de.split("/")[0] for r in results} == {"de1"}
    pe, de = _ledgers(nodes)
    assert pe.blocks_read + de.blocks_read == AGENTS * HIT
    assert pe.blocks_corrupt == de.blocks_corrupt == pe.blocks_lost == de.blocks_lost == 0


def test_basic_reads_only_on_the_prefill_side(plant):
    scheduler, nodes = plant
    results = _submit_all(scheduler("basic"), "basic")
    assert {r.path for r in results} == {"pe"}
    pe, de = _ledgers(nodes)
    assert pe.blocks_read == AGENTS * HIT and de.blocks_read == 0


def test_oracle_moves_no_kv(plant):
    scheduler, nodes = plant
    results = _submit_all(scheduler("oracle"), "oracle")
    assert {r.path for r in results} == {"none"} and all(r.kv_bytes == 0 for r in results)
    pe, de = _ledgers(nodes)
    assert pe.blocks_read == de.blocks_read == pe.blocks_forwarded == 0


def test_round_robin_spreads_over_every_engine(plant):
    scheduler, _ = plant
    results = _submit_all(scheduler("dualpath", "round_robin"), "rr")
    assert {r.pe for r in results} == {"pe1/0", "pe1/1"} and {r.de for r in results} == {"de1/0", "de1/1"}


@pytest.mark.parametrize("bad, message", [({"mode": "fast"}, "mode"), ({"policy": "random"}, "policy"),
                                          ({"nodes": []}, "at least one prefill")])
def test_bad_config_is_refused(bad, message):
    data = {"mode": "dualpath", "policy": "paper", "layer_chunks": 4, "alpha_tokens": 1, "beta_tokens": 1,
            "hbm_tokens": 1, "nodes": [{"name": "pe1", "role": "pe", "mgmt": "x", "cnics": ["y"]},
                                       {"name": "de1", "role": "de", "mgmt": "x", "cnics": ["y"]}]}
    data.update(bad)
    with pytest.raises(ValueError, match=message):
        SchedulerConfig.from_json(data)


def test_a_full_decode_buffer_queues_requests_instead_of_deadlocking(tmp_path):
    """The DE buffer holds one request at a time: every request still completes.

    Before Reserve, a DE holding part of several requests' KV while waiting for
    room for the rest could wait forever (seen with 256 agents at 2P4D)."""
    procs = Procs()
    try:
        st = procs.storage(tmp_path, [{"trajectory": f"a{i}", "blocks": HIT} for i in range(AGENTS)])
        one_request = (HIT + -(-NEW // BLOCK_TOKENS)) * 256
        nodes = [procs.node("pe1", "pe", st), procs.node("de1", "de", st, buffer_bytes=one_request + 100)]
        cfg = tmp_path / "sched.json"
        cfg.write_text(json.dumps({"mode": "dualpath", "policy": "paper", "layer_chunks": 4, "alpha_tokens": 1e9,
                                   "beta_tokens": 1e9, "hbm_tokens": 10**7, "nodes": nodes}))
        (port,) = procs.start(["-m", "daemons.scheduler", "--listen", "127.0.0.1:0", "--config", str(cfg)])
        stub = pb_grpc.SchedulerStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        results = _submit_all(stub, "small-buffer")
        assert len(results) == AGENTS and {r.path for r in results} <= {"pe", "de"}
        pe, de = _ledgers(nodes)
        assert pe.blocks_lost == de.blocks_lost == 0 and pe.blocks_corrupt == de.blocks_corrupt == 0
    finally:
        procs.stop()


def test_a_dead_decode_node_is_taken_out_and_its_turns_placed_again(tmp_path):
    """de1 is killed: the turns placed on it fail over to de2 (placed again, retries counted), none is lost, and
    the scheduler's events name the dead node."""
    procs = Procs()
    try:
        st = procs.storage(tmp_path, [{"trajectory": f"a{i}", "blocks": HIT} for i in range(AGENTS)])
        nodes = [procs.node("pe1", "pe", st), procs.node("de1", "de", st), procs.node("de2", "de", st)]
        cfg, events = tmp_path / "sched.json", tmp_path / "events.json"
        cfg.write_text(json.dumps({"mode": "dualpath", "policy": "round_robin", "layer_chunks": 4,
                                   "alpha_tokens": 1e9, "beta_tokens": 1e9, "hbm_tokens": 10**7, "nodes": nodes}))
        (port,) = procs.start(["-m", "daemons.scheduler", "--listen", "127.0.0.1:0", "--config", str(cfg),
                               "--events", str(events)])
        procs.procs[2].kill()  # de1
        procs.procs[2].wait(timeout=10)
        results = _submit_all(pb_grpc.SchedulerStub(grpc.insecure_channel(f"127.0.0.1:{port}")), "dualpath")
        assert {r.de.split("/")[0] for r in results} == {"de2"}
        assert sum(r.retries for r in results) >= 1  # round robin placed some on de1 before it was seen dead
        scheduler = procs.procs[-1]
        scheduler.terminate()
        scheduler.wait(timeout=10)
        seen = json.loads(events.read_text())
        assert [e["node"] for e in seen if e["event"] == "node_dead"] == ["de1"]
        assert sum(1 for e in seen if e["event"] == "turn_retried") == sum(r.retries for r in results)
    finally:
        procs.stop()

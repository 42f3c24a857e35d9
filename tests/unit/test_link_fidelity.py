"""The link side of fidelity: dequeue timing from trace lines, skb caps and lossless buffers in the plan, queue
and drop figures from links.csv, the verdict's link checks, and the RPC counter every daemon carries."""

from __future__ import annotations

import asyncio
import csv

import grpc
import pytest

from daemons import dualpath_pb2 as pb
from daemons import dualpath_pb2_grpc as pb_grpc
from daemons.runtime import RpcCounter, rpc_counts
from emulator import dequeue, fidelity
from emulator.dequeue import Timing, Watched, histogram, summarize, wire_bytes
from emulator.tcplan import WINDOW_MIN_SKBS, skb_wire_bytes
from scenarios import linkstats, schema, servecost
from scenarios.plan import make_plan
from topologies.cluster import ClusterSpec, Scale, cluster_net

DEV = "dp-st1-nic"


def _queue(t: float, skb: str, dev: str = DEV) -> str:
    return f"           python-3218    [001] bNs..   {t:.6f}: net_dev_queue: dev={dev} skbaddr={skb} len=54"


def _xmit(t: float, skb: str, length: int = 3000, segs: int = 2, dev: str = DEV) -> str:
    return (f"           python-3218    [001] bNs..   {t:.6f}: net_dev_start_xmit: dev={dev} queue_mapping=0 "
            f"skbaddr={skb} vlan_tagged=0 vlan_proto=0x0000 vlan_tci=0x0000 protocol=0x0800 ip_summed=2 "
            f"len={length} data_len=0 network_offset=14 transport_offset_valid=1 transport_offset=34 tx_flags=0 "
            f"gso_size=1448 gso_segs={segs} gso_type=0x0")


# -- dequeue timing ------------------------------------------------------------
def test_wire_bytes_adds_one_header_per_extra_segment():
    assert wire_bytes(3000, 34, 2) == 3000 + 66  # Ethernet+IP (34, the transport offset) + TCP 32
    assert wire_bytes(1514, 34, 0) == 1514  # not GSO
    assert wire_bytes(54, 38, 1) == 54


def test_busy_gaps_are_timed_against_the_previous_skb_at_the_rate():
    tm = Timing([Watched(DEV, 80e6, "stnic")])
    for i in range(4):  # four skbs queued at once: a standing queue
        tm.feed(_queue(10.0, f"s{i}"))
    ideal = 3066 * 8 / 80e6  # 306.6 us
    t = 10.001
    tm.feed(_xmit(t, "s0"))
    tm.feed(_xmit(t + ideal, "s1"))          # on time: 3 queued when s0 left, s1 among them
    tm.feed(_xmit(t + 3 * ideal, "s2"))      # one skb late: 2 still queued when s1 left
    tm.feed(_xmit(t + 3 * ideal + 5e-6, "s3"))  # only s3 queued when s2 left: not a standing queue
    errs = tm.errors["stnic"]
    assert len(errs) == 2
    assert errs[0] == pytest.approx(0, abs=0.01)
    assert errs[1] == pytest.approx(1, abs=0.01)
    assert tm.ports[DEV].max_segs == 2


def test_gaps_need_a_queued_next_skb_a_data_sized_previous_one_and_no_pause():
    tm = Timing([Watched(DEV, 80e6, "stnic"), Watched("other", 1e9, "cnic")])
    tm.feed(_xmit(1.0, "a"))  # never seen queued
    tm.feed(_xmit(1.001, "b"))
    assert tm.errors["stnic"] == []
    for skb in ("c", "d", "e", "f"):
        tm.feed(_queue(2.0, skb))
    tm.feed(_xmit(2.0001, "c", length=66, segs=0))  # an ack sets no ideal gap
    tm.feed(_xmit(2.0002, "d"))
    assert tm.errors["stnic"] == []
    tm.pause()  # a gap across a pause in tracing is not a gap
    tm.feed(_xmit(3.0, "e"))
    assert tm.errors["stnic"] == []
    tm.feed(_xmit(4.0, "x", dev="unwatched"))
    tm.feed("some other line without the event")
    assert tm.errors == {"stnic": [], "cnic": []}


def test_skbs_queued_long_ago_were_dropped_and_are_forgotten():
    tm = Timing([Watched(DEV, 80e6, "stnic")])
    tm.feed(_queue(1.0, "dropped"))
    tm.feed(_queue(5.0, "live"))
    tm.feed(_xmit(5.001, "live"))
    assert list(tm.ports[DEV].queued) == []  # the drop (4 s old) is gone, not counted as backlog


def test_histogram_splits_early_and_late_and_summarize_reads_percentiles():
    errors = [-1.0] * 10 + [0.0] * 80 + [0.05] * 9 + [3.0]  # 100 gaps, one 3 skb times late
    hist = histogram(errors)
    assert sum(hist["early"]) == 10 and sum(hist["late"]) == 90
    s = summarize(hist)
    assert s["gaps"] == 100 and s["early"] == 0.1
    # p99 of the signed error: 99 gaps are <= 0.05, the 100th is 3.0 -> the bin holding 0.05 (upper edge 0.0562)
    assert 0.05 < s["late_p99"] < 0.06
    assert s["late_ccdf"]["2"] == 0.01 and s["late_ccdf"]["5"] == 0.0
    assert summarize({"early": [], "late": []}) == {"gaps": 0}


# -- the plan: skb caps and lossless receive buffers ---------------------------------
def test_skb_caps_come_from_the_slowest_link_of_each_fabric():
    plan = make_plan(schema.load("default_g1"))
    caps = {lk.link_class: lk.skb_segs for lk in plan.net.links}
    # 1 ms x 1.6 of real time: SNIC 20 Mbit/s -> 4000 B -> 2 segments; the storage NIC (80 Mbit/s) shares the
    # storage fabric with the SNICs and gets their cap; CNIC 160 Mbit/s -> 32000 B -> 21 segments by time, but
    # its queue (320000 B) shared by 5 senders must hold 4 skbs each plus 2: 211 segments // 22 -> 9
    assert caps == {"snic": 2, "stnic": 2, "cnic": 9}


def test_every_lossless_sender_gets_a_window_of_several_skbs():
    for name in ("default", "cluster"):
        net = make_plan(schema.load(name)).net
        for lk in net.links:
            buf = net.rcvbuf_bytes(lk.host, lk.switch)
            assert buf is not None and buf >= WINDOW_MIN_SKBS * skb_wire_bytes(lk.skb_segs), (name, lk)


def test_lossless_receive_buffers_share_each_port_queue_among_its_senders():
    plan = make_plan(schema.load("default_g1"))
    net = plan.net
    # SNIC: queue 20e6/8 x 16 ms = 40000 B, less 2 skbs of 3028 B, shared by 2 storage servers
    assert net.rcvbuf_bytes("pe1", "stor") == (40000 - 2 * 3028) // 2
    # CNIC: 160e6/8 x 16 ms = 320000 B, less 2 x 9 x 1514, shared by the 5 other nodes of the rail
    assert net.rcvbuf_bytes("pe1", "rail0") == int((320000 - 2 * 9 * 1514) / 5)
    # storage NIC: 80e6/8 x 16 ms = 160000 B, less 2 x 3028, shared by the 6 compute nodes
    assert net.rcvbuf_bytes("st1", "stor") == int((160000 - 2 * 3028) / 6)
    assert net.default_rcvbuf_bytes("pe1") == net.rcvbuf_bytes("pe1", "rail0")  # the larger one
    assert net.default_rcvbuf_bytes("ctl1") is None  # management only
    assert net.rcvbuf_bytes("pe1", "mgmt") is None
    lossy = cluster_net(ClusterSpec(1, 1, gpus_per_node=1, storage_servers=1), Scale(1e-4), lossless=False)
    assert all(lossy.default_rcvbuf_bytes(h.name) is None for h in lossy.hosts)


def test_queue_and_skb_are_stretched_with_time():
    for time_scale in (1.0, 2.0):
        net = cluster_net(ClusterSpec(1, 1, gpus_per_node=1, storage_servers=1), Scale(1e-4 * time_scale,
                                                                                       time_scale))
        snic = next(lk for lk in net.links if lk.link_class == "snic")
        assert snic.rate_bps == pytest.approx(40e6)
        assert snic.queue_s == pytest.approx(0.010 * time_scale)
        assert snic.skb_segs == int(40e6 / 8 * 0.001 * time_scale // 1514)


def test_emulation_settings_are_validated():
    with pytest.raises(Exception, match="more than half the queue"):
        schema.load("default", ["emulation.skb=6ms"])
    with pytest.raises(Exception, match="skb"):
        schema.load("default", ["emulation.skb=0ms"])


# -- queues and drops from links.csv -------------------------------------------------
def test_queue_figures_from_links_csv(tmp_path):
    net = cluster_net(ClusterSpec(1, 1, gpus_per_node=1, storage_servers=1), Scale(1e-4))
    path = tmp_path / "links.csv"
    rows = []
    for t, backlog, drops in ((0.0, 0, 5), (0.1, 5000, 5), (0.2, 15000, 9)):
        for tclass, share in (("link", 0), ("default", 1), ("kv", 1)):
            rows.append([t, "pe1-cnic0", "cnic", "pe", "down", tclass, 0, 0, drops * share, backlog * share // 2])
        rows.append([t, "pe1-snic", "snic", "pe", "down", "default", 0, 0, 0, 0])
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["t_s", "link", "link_class", "side", "direction", "tclass", "bytes", "packets", "drops",
                    "backlog_bytes"])
        w.writerows(rows)
    figs = linkstats.queue_figures(path, net, time_scale=1.0)
    cnic = figs["cnic"]["down"]
    assert cnic["drops"] == 8 and cnic["dropped"] == {"pe1-cnic0 down": 8}  # (9 - 5) in each of two leaves
    assert cnic["backlog_mean_bytes"] == pytest.approx((0 + 5000 + 15000) / 3, abs=1)
    assert cnic["backlog_max_bytes"] == 15000
    assert cnic["backlog_max_ms"] == pytest.approx(15000 * 8 / 40e6 * 1e3, abs=1e-3)  # 40 Mbit/s CNIC
    assert figs["snic"]["down"]["drops"] == 0
    assert linkstats.lossless_drops({"dualpath": {"links": figs}}) == {"dualpath: pe1-cnic0 down": 8}


def test_dequeue_histograms_round_trip_and_add_up(tmp_path):
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    linkstats.write_dequeue(a, {"snic": [0.0] * 60 + [-0.5] * 40})
    linkstats.write_dequeue(b, {"snic": [2.0] * 100, "cnic": [0.01] * 150})
    figs = linkstats.dequeue_figures([a, b, tmp_path / "missing.csv"])
    assert figs["snic"]["gaps"] == 200 and figs["snic"]["early"] == 0.2
    assert figs["snic"]["late_ccdf"]["1"] == 0.5  # the 100 gaps of 2.0
    assert figs["cnic"]["gaps"] == 150


# -- the verdict's link checks ---------------------------------------------------------
def _good_dequeue() -> dict:
    return {c: {"gaps": 500, "late_p99": 0.1} for c in ("snic", "cnic")}


def _judge(**kw) -> fidelity.Verdict:
    args = {"classes": ["snic", "cnic"], "measured": {"snic": ["x"], "cnic": ["y"]},
            "goodput_errors": {"x": 0.001}, "dequeue": _good_dequeue(), "dequeue_problem": None,
            "lossless_drops": {}}
    args.update(kw)
    v = fidelity.Verdict()
    fidelity.judge_links(v, **args)
    return v


def test_judge_links_passes_when_all_is_measured_and_within_limits():
    v = _judge()
    assert v.ok and v.reasons == [] and v.dequeue_p99 == {"snic": 0.1, "cnic": 0.1}
    assert set(v.as_dict()) >= {"ok", "goodput_error_max", "dequeue_p99", "dequeue_p99_max", "reasons"}


@pytest.mark.parametrize("kw, words", [
    ({"measured": {"snic": ["x"]}}, "link class cnic was not measured"),
    ({"goodput_errors": {"x": 0.02}}, "payload disagrees"),
    ({"dequeue": {"snic": {"gaps": 500, "late_p99": 1.5}, "cnic": {"gaps": 500, "late_p99": 0.1}}}, "dequeue late"),
    ({"dequeue": {"snic": {"gaps": 10, "late_p99": 0.1}, "cnic": {"gaps": 500, "late_p99": 0.1}}}, "not measured"),
    ({"dequeue_problem": "this kernel has no tracefs"}, "no tracefs"),
    ({"lossless_drops": {"basic: de4-cnic0 down": 30}}, "de4-cnic0 down (30)"),
])
def test_judge_links_fails_and_says_why(kw, words):
    v = _judge(**kw)
    assert not v.ok
    assert any(words in r for r in v.reasons), v.reasons


# -- what a turn costs ---------------------------------------------------------------
def test_cost_figures_per_turn_and_role():
    before = {"daemons": {"storage st1": 1.0, "node pe1": 2.0, "node de1": 3.0, "scheduler": 0.5}, "runner": 1.0,
              "machine": 10.0}
    after = {"daemons": {"storage st1": 2.0, "node pe1": 4.0, "node de1": 6.0, "scheduler": 1.0}, "runner": 1.5,
             "machine": 20.0}
    rpc = {"method": "/dualpath.v1.Node/PushKv", "calls": "4", "messages_in": "4", "messages_out": "4",
           "bytes_in": "4000", "bytes_out": "40"}
    status = {"nodes": {"pe1": {"role": "pe", "rpcs": [rpc]}, "de1": {"role": "de", "rpcs": []}},
              "storage": {"a": {"rpcs": []}}, "scheduler": {"rpcs": []}}
    c = servecost.figures(before, after, 0.5, turns=100, wall_s=10.0, status=status)
    cpu = c["cpu_core_ms_per_turn"]
    assert cpu["storage"] == 10.0 and cpu["prefill"] == 20.0 and cpu["decode"] == 30.0 and cpu["scheduler"] == 5.0
    assert cpu["driver"] == 5.0 and cpu["runner"] == 5.0 and cpu["total"] == 100.0
    assert cpu["other"] == pytest.approx(25.0)  # 100 less the roles' 75
    assert c["turns_per_wall_s"] == 10.0
    assert c["rpc_per_turn"]["prefill"]["calls"] == 0.04
    assert c["rpc_per_turn"]["total"]["bytes"] == 40  # 4040 bytes over 100 turns
    assert c["rpc_per_turn"]["prefill"]["methods"]["PushKv"]["messages"] == 0.08


def test_rpc_counter_counts_calls_messages_and_serialized_bytes():
    class Store(pb_grpc.StorageServicer):
        async def Stats(self, request, context):  # noqa: N802
            return pb.StorageStats(blocks_read=7)

        async def Read(self, request, context):  # noqa: N802
            for i in range(3):
                yield pb.KvData(request_id="r", data=bytes(100 + i))

    async def go():
        counter = RpcCounter()
        server = grpc.aio.server(interceptors=[counter])
        pb_grpc.add_StorageServicer_to_server(Store(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = pb_grpc.StorageStub(ch)
                await stub.Stats(pb.StatsRequest())
                await stub.Stats(pb.StatsRequest())
                req = pb.ReadRequest(request_id="r", spans=[pb.BlockSpan(trajectory="t", blocks=3)])
                got = [m async for m in stub.Read(req)]
        finally:
            await server.stop(None)
        return counter, req, got

    counter, req, got = asyncio.run(go())
    counts = {m: c for m, *c in counter.snapshot()}
    stats = counts["/dualpath.v1.Storage/Stats"]
    assert stats[:3] == [2, 2, 2] and stats[3] == 0  # an empty request serializes to 0 bytes
    assert stats[4] == 2 * len(pb.StorageStats(blocks_read=7).SerializeToString())
    read = counts["/dualpath.v1.Storage/Read"]
    assert read[:3] == [1, 1, 3]
    assert read[3] == len(req.SerializeToString())
    assert read[4] == sum(len(m.SerializeToString()) for m in got)
    assert [r.method for r in rpc_counts(counter)] == sorted(counts)
    assert rpc_counts(None) == []


def test_available_says_why_not():
    why = dequeue.available()
    assert why is None or "tracefs" in why or "root" in why

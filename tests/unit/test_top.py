"""`dpemu top` without a cluster: a frame's numbers from two counter snapshots, its rendering, the status
watcher's lines (and the watcher against gRPC servers on 127.0.0.1), and the errors a user sees."""

from __future__ import annotations

import json
import sys
from concurrent import futures

import grpc
import pytest
from rich.console import Console

from daemons import dualpath_pb2 as pb
from daemons import dualpath_pb2_grpc as pb_grpc
from daemons import statuswatch
from emulator.monitor import ClassKey
from emulator.tcplan import DEFAULT_CLASS, LINK_CLASS
from scenarios import cli, live, modestats, platform, top
from scenarios.plan import make_plan
from scenarios.schema import load

KV, COLL = 0x10020, 0x10030  # two traffic classes' leaves
RATE = 32e6                  # wall bit/s of every link here
SCALE_BYTES, SCALE_TIME = 6.4e-4, 8.0  # the default's: every 400Gbit NIC is 32Mbit


def _keys() -> dict[ClassKey, modestats.LinkKey]:
    """pe1-cnic0 with two traffic classes (up: in pe1's namespace; down: its switch port), pe1-snic without."""
    keys = {}
    for direction, netns, dev in (("up", "dp-pe1", "pe1-cnic0"), ("down", None, "dp-s1-p1")):
        for tclass, handle in (("link", LINK_CLASS), ("default", DEFAULT_CLASS), ("kv", KV), ("collective", COLL)):
            keys[ClassKey(netns, dev, handle)] = modestats.LinkKey("pe1-cnic0", "cnic", "pe", direction, tclass, RATE)
    for tclass, handle in (("link", LINK_CLASS), ("default", DEFAULT_CLASS)):
        keys[ClassKey("dp-pe1", "pe1-snic", handle)] = modestats.LinkKey("pe1-snic", "snic", "pe", "up", tclass, RATE)
    return keys


def _flow(flows, link, direction, tclass) -> top.Flow:
    (f,) = [f for f in flows if (f.link, f.direction, f.tclass) == (link, direction, tclass)]
    return f


def test_a_frame_from_two_snapshots_in_real_units():
    keys = _keys()
    up = {k: v for k, v in keys.items() if v.direction == "up" and v.link == "pe1-cnic0"}
    kv_up = next(k for k, v in up.items() if v.tclass == "kv")
    link_up = next(k for k, v in up.items() if v.tclass == "link")
    coll_up = next(k for k, v in up.items() if v.tclass == "collective")
    prev = {k: (1000, 10, 3, 0) for k in keys}
    cur = dict(prev)
    cur[link_up] = (1000 + 4_000_000, 3000, 3, 0)  # 4 MB in 2 s: 16 Mbit/s wall, half the link
    cur[kv_up] = (1000 + 3_000_000, 2000, 5, 40960)  # 2 new drops; 40960 B queued
    cur[coll_up] = (1000 + 1_000_000, 1000, 4, 8192)  # 1 new drop
    flows, totals = top.measure(keys, prev, cur, 2.0, {}, SCALE_BYTES, SCALE_TIME)

    link = _flow(flows, "pe1-cnic0", "up", "link")
    assert link.wall_bps == pytest.approx(16e6) and link.util == pytest.approx(0.5)
    assert link.real_bps == pytest.approx(16e6 * SCALE_TIME / SCALE_BYTES)  # 200 Gbit/s: half of 400
    assert link.backlog_bytes == 40960 + 8192  # the leaves' queues (the root class holds none)
    assert link.backlog_ms == pytest.approx((40960 + 8192) * 8 / RATE / SCALE_TIME * 1000)  # real ms
    assert (link.drops_new, link.drops_total) == (3, 3)
    kv = _flow(flows, "pe1-cnic0", "up", "kv")
    assert kv.wall_bps == pytest.approx(12e6) and kv.util == pytest.approx(0.375)
    assert kv.backlog_ms == pytest.approx(1.28) and (kv.drops_new, kv.drops_total) == (2, 2)
    assert _flow(flows, "pe1-snic", "up", "link").util == 0.0
    assert [f.link_class for f in flows] == ["snic"] * 2 + ["cnic"] * 8  # grouped: snic, cnic, stnic

    # the next refresh: drops add up; a class re-created (its counters went down) shows no rate, counts anew;
    # one gone from the dump shows nothing
    nxt = dict(cur)
    nxt[kv_up] = (5000, 50, 1, 0)
    nxt[coll_up] = (1000 + 1_500_000, 1500, 6, 0)
    del nxt[link_up]
    flows, totals = top.measure(keys, cur, nxt, 1.0, totals, SCALE_BYTES, SCALE_TIME)
    kv = _flow(flows, "pe1-cnic0", "up", "kv")
    assert kv.wall_bps is None and (kv.drops_new, kv.drops_total) == (1, 3)
    coll = _flow(flows, "pe1-cnic0", "up", "collective")
    assert coll.wall_bps == pytest.approx(4e6) and (coll.drops_new, coll.drops_total) == (2, 3)
    link = _flow(flows, "pe1-cnic0", "up", "link")
    assert link.wall_bps is None and link.drops_total == 3 + 3 and link.drops_new == 1 + 2  # its leaves still


def test_a_class_first_seen_has_no_rate_and_its_past_drops_are_not_counted():
    keys = _keys()
    k = next(k for k, v in keys.items() if v.tclass == "kv")
    flows, totals = top.measure(keys, {}, {k: (10**9, 1, 500, 0)}, 1.0, {}, 1.0, 1.0)
    f = _flow(flows, keys[k].link, keys[k].direction, keys[k].tclass)
    assert f.wall_bps is None and f.drops_total == 0 and totals[k] == 0
    assert all(fl.wall_bps is None for fl in flows)


def test_folding_a_nodes_cnics_into_one_row():
    keys = {}
    for i in range(4):
        for tclass, handle in (("link", LINK_CLASS), ("default", DEFAULT_CLASS)):
            keys[ClassKey("dp-de1", f"de1-cnic{i}", handle)] = modestats.LinkKey(f"de1-cnic{i}", "cnic", "de", "up",
                                                                                tclass, RATE)
    prev = {k: (0, 0, 0, 0) for k in keys}
    cur = {k: (1_000_000 * (i + 1), 0, 0, 1000 * (i + 1)) for i, k in enumerate(keys)}
    flows, _ = top.measure(keys, prev, cur, 1.0, {}, 1.0, 1.0)
    folded = top.fold(flows)
    link = _flow(folded, "de1-cnic×4", "up", "link")
    assert link.rate_bps == 4 * RATE
    assert link.wall_bps == pytest.approx(8e6 * (1 + 3 + 5 + 7))
    assert link.util == pytest.approx(link.wall_bps / (4 * RATE))
    assert link.backlog_bytes == 1000 * (2 + 4 + 6 + 8)  # the leaves' (default) backlog, summed
    assert len(folded) == 2


def _frame(flows, serving) -> top.Frame:
    return top.Frame("default", "run", "20261206-120000-42", 42, 125.0, SCALE_BYTES, SCALE_TIME, 1.0, flows, serving,
                     0.03)


def _text(renderable) -> str:
    console = Console(record=True, width=140)
    console.print(renderable)
    return console.export_text()


def test_the_rendered_frame_names_every_nic_in_real_units():
    keys = _keys()
    prev = {k: (0, 0, 0, 0) for k in keys}
    cur = {k: (0, 0, 0, 0) for k in keys}
    link_up = next(k for k, v in keys.items() if (v.link, v.direction, v.tclass) == ("pe1-cnic0", "up", "link"))
    kv_up = next(k for k, v in keys.items() if (v.link, v.direction, v.tclass) == ("pe1-cnic0", "up", "kv"))
    cur[link_up] = (4_000_000, 0, 0, 0)
    cur[kv_up] = (4_000_000, 0, 7, 40960)
    flows, _ = top.measure(keys, prev, cur, 1.0, {}, SCALE_BYTES, SCALE_TIME)
    serving = statuswatch.PlaneLoads("running", (
        statuswatch.NodeLoads("pe1", "pe", 2, 5, 0, 8192), statuswatch.NodeLoads("de1", None)), 11, 6)
    text = _text(top.render(_frame(flows, serving)))
    print(text)
    assert "default" in text and "run 20261206-120000-42 (dpemu run, pid 42)" in text and "up 2m05s = 16 s real" in text
    assert "scale: bytes x0.00064, time x8" in text
    row = next(line for line in text.splitlines() if "pe1-cnic0" in line)
    assert "400Gbit/s" in row and "100%" in row and "41.0KB 1.3ms" in row and "7/0 (+7)" in row
    assert any(line.split()[:1] == ["kv"] for line in text.splitlines())  # the traffic classes, under the link
    assert "pe1-snic" in text and text.index("pe1-snic") < text.index("pe1-cnic0")  # snic first, then cnic
    assert "11 waiting, 6 running" in text
    pe1 = next(line.split() for line in text.splitlines() if line.split()[:1] == ["pe1"])
    de1 = next(line.split() for line in text.splitlines() if line.split()[:1] == ["de1"])
    assert pe1 == ["pe1", "pe", "2", "5", "0", "8192"] and de1 == ["de1"] + ["-"] * 5
    bare = _text(top.render(_frame(flows, serving), class_detail=False))
    assert not any(line.split()[:1] == ["kv"] for line in bare.splitlines())
    idle = _text(top.render(_frame(flows, statuswatch.PlaneLoads("not running"))))
    assert "serving plane: not running" in idle


def test_a_status_line_read_back():
    st = pb.NodeStatus(name="pe1", role="pe", read_queue_tokens=4096, read_queue_requests=2,
                       engines=[pb.EngineStatus(engine=0, unfinished_requests=3),
                                pb.EngineStatus(engine=1, unfinished_requests=1)])
    line = json.dumps({"t": 1.0, "nodes": {"pe1": statuswatch.node_loads(st), "de1": None},
                       "scheduler": {"waiting": 4, "running": 2}})
    got = statuswatch.parse_line(line)
    assert got.state == "running" and (got.waiting, got.running) == (4, 2)
    assert got.nodes == (statuswatch.NodeLoads("pe1", "pe", 2, 4, 0, 4096), statuswatch.NodeLoads("de1", None))
    de = statuswatch.node_loads(pb.NodeStatus(role="de", engines=[pb.EngineStatus(unfinished_requests=5)]))
    assert (de["prefilling"], de["decoding"]) == (0, 5)
    down = statuswatch.parse_line(json.dumps({"t": 2.0, "nodes": {"pe1": None}, "scheduler": None}))
    assert down.state == "not running"
    for bad in ("", "{}", "[1]", '{"nodes": {"pe1": {"role": "pe"}}, "scheduler": null}'):
        with pytest.raises(ValueError):
            statuswatch.parse_line(bad)
    assert statuswatch.parse_nodes("pe1=10.9.1.1:7100,de1=10.9.2.1:7100") == {"pe1": "10.9.1.1:7100",
                                                                              "de1": "10.9.2.1:7100"}
    with pytest.raises(ValueError):
        statuswatch.parse_nodes("10.9.1.1:7100")


class _Node(pb_grpc.NodeServicer):
    def Status(self, request, context):  # noqa: N802 - gRPC's name
        assert request.brief
        return pb.NodeStatus(name="pe1", role="pe", read_queue_requests=1,
                             engines=[pb.EngineStatus(unfinished_requests=2)])


class _Scheduler(pb_grpc.SchedulerServicer):
    def Stats(self, request, context):  # noqa: N802
        return pb.SchedulerStats(waiting_turns=3, running_turns=1)


@pytest.fixture
def servers():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_NodeServicer_to_server(_Node(), server)
    pb_grpc.add_SchedulerServicer_to_server(_Scheduler(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(None)


def test_the_watch_asks_every_daemon_and_shows_a_silent_one_as_null(servers):
    watch = statuswatch.Watch({"pe1": servers, "de1": "127.0.0.1:1"}, servers, 1.0)  # nothing listens on :1
    try:
        out = watch.poll()
    finally:
        watch.close()
    assert out["nodes"]["pe1"] == {"role": "pe", "reading": 1, "prefilling": 2, "decoding": 0,
                                   "read_queue_tokens": 0, "buffer_bytes": 0}
    assert out["nodes"]["de1"] is None and out["scheduler"] == {"waiting": 3, "running": 1}


def test_top_starts_the_watcher_once_reads_its_lines_and_stops_it(servers):
    w = top.StatusWatcher([sys.executable, "-m", "daemons.statuswatch", "--nodes", f"pe1={servers}",
                           "--scheduler", servers, "--period", "0.2"])
    try:
        w.wait_running(30)
        got = w.loads()
        assert got.state == "running" and got.waiting == 3 and got.nodes[0].prefilling == 2
    finally:
        w.stop()
    assert w.proc.returncode == 0  # SIGTERM: a clean exit
    assert w.loads().state.startswith("status watcher exited (0)")


def test_the_watcher_argv_runs_in_the_control_hosts_namespace():
    plan = make_plan(load("serving_tiny"))
    argv = top.watcher_argv(plan, 1.0, python="/venv/bin/python")
    assert argv[:4] == ["ip", "netns", "exec", plan.net.host("ctl1").netns]
    assert argv[4:7] == ["/venv/bin/python", "-m", "daemons.statuswatch"]
    nodes = statuswatch.parse_nodes(argv[argv.index("--nodes") + 1])
    assert set(nodes) == {"pe1", "de1"} and all(a.startswith("10.9.") and a.endswith(":7100") for a in nodes.values())
    assert argv[argv.index("--scheduler") + 1].endswith(":7000")


def test_no_cluster_is_a_one_line_error(monkeypatch, capsys):
    monkeypatch.setattr(platform, "require_root", lambda: None)
    monkeypatch.setattr(live, "current", lambda state_dir=None: None)
    assert cli.main(["top", "--once"]) == 1
    err = capsys.readouterr().err
    assert "dpemu: no dpemu cluster is live on this machine" in err and "Traceback" not in err
    assert cli.main(["top", "--interval", "0"]) == 1
    assert "--interval" in capsys.readouterr().err

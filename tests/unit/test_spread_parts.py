"""The parts of a run spread over servers that work without them: processes started over ssh (ProcessGroup),
remote tc counters (TcSampler) and CPU (ServersCpu, RemoteCpuSampler), the per-server figures
(scenarios.serverstats) and which servers `dpemu clean --servers` cleans. Nothing is started, nothing sshes."""

from __future__ import annotations

import csv
import json
import shlex
from functools import lru_cache

import pytest

from emulator import dequeue, monitor, procs
from emulator.errors import ConfigError
from emulator.monitor import ClassKey, CpuSampler, TcSampler
from emulator.servers import ServerSpec
from emulator.spread import RemoteCpuSampler, ServersCpu, Spread
from scenarios import plan, schema, servercli, serverstats
from scenarios.results import CAL_COLUMNS

SETPRIV = ["setpriv", "--pdeathsig", "TERM", "--"]
REMOTE = ServerSpec("s2", address="10.199.0.2", key="/k/id", known_hosts="/k/kh")


# -- ProcessGroup ---------------------------------------------------------------------------------------------------
class FakePopen:
    started: list["FakePopen"] = []
    next_pid = 4000

    def __init__(self, argv, **kwargs):
        self.argv, self.kwargs = argv, kwargs
        FakePopen.next_pid += 1
        self.pid = FakePopen.next_pid
        FakePopen.started.append(self)

    def poll(self):
        return 0


@pytest.fixture
def fake_popen(monkeypatch):
    FakePopen.started = []
    monkeypatch.setattr(procs.subprocess, "Popen", FakePopen)
    return FakePopen


def test_process_in_a_remote_namespace_runs_over_ssh(fake_popen):
    seen: list[str | None] = []
    registered: list[int] = []

    def remote(ns):
        seen.append(ns)
        return REMOTE if ns == "dp-x" else None

    group = procs.ProcessGroup(on_start=registered.append, remote=remote)
    argv = ["iperf3", "-s", "-p", "5201", "--logfile", "/tmp/a b.log"]
    proc = group.start("server", "dp-x", argv)
    assert proc is fake_popen.started[0]
    assert seen == ["dp-x"]
    inner = [*SETPRIV, "ip", "netns", "exec", "dp-x", *argv]
    assert proc.argv == [*SETPRIV, *REMOTE.ssh_argv(), "--", shlex.join(inner)]
    assert shlex.split(proc.argv[-1]) == inner  # the remote side runs exactly this, under its own setpriv
    assert proc.pid in group.remote_pids
    assert registered == [proc.pid]
    assert proc.kwargs["start_new_session"] is True and proc.kwargs["text"] is True


def test_process_in_a_local_namespace_is_unchanged(fake_popen):
    group = procs.ProcessGroup(remote=lambda ns: REMOTE if ns == "dp-x" else None)
    argv = ["iperf3", "-c", "10.0.0.1"]
    local = group.start("client", "dp-y", argv)
    root = group.start("root", None, ["sleep", "1"])
    assert local.argv == [*SETPRIV, "ip", "netns", "exec", "dp-y", *argv]
    assert root.argv == [*SETPRIV, "sleep", "1"]
    assert "ssh" not in local.argv
    assert group.remote_pids == set()
    remote = group.start("server", "dp-x", ["true"])
    assert group.remote_pids == {remote.pid}


def test_process_group_without_remote_never_asks(fake_popen):
    group = procs.ProcessGroup()
    p = group.start("a", "dp-x", ["true"])
    assert p.argv == procs.netns_argv("dp-x", ["true"]) == [*SETPRIV, "ip", "netns", "exec", "dp-x", "true"]
    assert group.remote_pids == set()


# -- TcSampler with remote keys --------------------------------------------------------------------------------------
class FakeAgent:
    def __init__(self, replies):
        self.replies = list(replies)
        self.calls: list[tuple[str, dict]] = []

    def call(self, op, **args):
        self.calls.append((op, args))
        return self.replies.pop(0)


@pytest.fixture
def no_local_netlink(monkeypatch):
    def refuse(netns=None):
        raise AssertionError(f"netlink opened for {netns!r}: a remote key must not be read here")

    class NoCounters:
        def __init__(self, netns=None):
            raise AssertionError(f"ClassCounters opened for {netns!r}")

    monkeypatch.setattr(monitor, "netlink", refuse)
    monkeypatch.setattr(monitor, "ClassCounters", NoCounters)


def test_tc_sampler_reads_remote_keys_through_the_agent(no_local_netlink):
    up = ClassKey("dp-de1", "de1-snic", 0x10001)
    down = ClassKey(None, "dp-de1-snic", 0x10001)
    kv = ClassKey(None, "dp-de1-snic", 0x10012)
    offset = 100.0  # the server's monotonic clock is 100 s ahead of ours
    agent = FakeAgent([
        [["dp-de1", "de1-snic", 1000.5, {"65537": [1500, 1, 0, 0]}],
         [None, "dp-de1-snic", 1000.6, {"65537": [3000, 2, 1, 64], "65554": [10, 1, 0, 0]}]],
        [["dp-de1", "de1-snic", 1001.5, {"65537": [126500, 85, 0, 0]}],
         [None, "dp-de1-snic", 1001.6, {"65537": [3000, 2, 1, 0]}]],  # no reading of kv this time
    ])
    s = TcSampler([up, down, kv], remote=lambda netns, dev: (agent, offset))
    s.setup()  # nothing local to resolve
    first = s.sample(0.0)
    assert agent.calls == [("counters", {"groups": [["dp-de1", "de1-snic", [0x10001]],
                                                    [None, "dp-de1-snic", [0x10001, 0x10012]]]})]
    assert [(smp.key, smp.t_s, smp.bytes, smp.packets, smp.drops, smp.backlog_bytes) for smp in first] == [
        (up, 900.5, 1500, 1, 0, 0), (down, pytest.approx(900.6), 3000, 2, 1, 64),
        (kv, pytest.approx(900.6), 10, 1, 0, 0)]
    s.sample(0.0)
    s.teardown()
    assert len(agent.calls) == 2  # one call per sample for every key of that agent
    assert len(s.samples) == 5
    assert s.rate_bps(up, 900.0, 902.0) == pytest.approx(125000 * 8 / 1.0)
    assert s.counts(up, 900.5, 901.5) == (125000, 84, pytest.approx(1.0))
    assert s.counts(kv, 900, 902) is None  # one sample only


def test_tc_sampler_groups_by_agent_and_keeps_local_keys_out_of_netlink_for_remote_ones(no_local_netlink):
    a2, a3 = FakeAgent([[["dp-a", "a-snic", 5.0, {"1": [1, 1, 0, 0]}]]]), \
        FakeAgent([[["dp-b", "b-snic", 7.0, {"1": [2, 1, 0, 0]}]]])
    where = {"dp-a": (a2, -1.0), "dp-b": (a3, 2.0)}
    ka, kb = ClassKey("dp-a", "a-snic", 1), ClassKey("dp-b", "b-snic", 1)
    s = TcSampler([ka, kb], remote=lambda netns, dev: where.get(netns))
    s.setup()
    got = {smp.key: smp.t_s for smp in s.sample(0.0)}
    assert got == {ka: 6.0, kb: 5.0}
    assert a2.calls == [("counters", {"groups": [["dp-a", "a-snic", [1]]]})]
    assert a3.calls == [("counters", {"groups": [["dp-b", "b-snic", [1]]]})]


def test_tc_sampler_thread_with_only_remote_keys(no_local_netlink):
    class Counting:
        calls = 0

        def call(self, op, groups):
            Counting.calls += 1
            return [[g[0], g[1], 50.0 + Counting.calls, {"1": [Counting.calls * 100, Counting.calls, 0, 0]}]
                    for g in groups]

    key = ClassKey("dp-de1", "de1-snic", 1)
    s = TcSampler([key], period_s=0.01, remote=lambda netns, dev: (Counting(), 50.0))
    s.start()
    s.stop()  # raises if the thread failed (a local netlink would have)
    assert s.error is None
    assert len(s.samples) == Counting.calls >= 1
    assert [smp.t_s for smp in s.samples] == [float(i) for i in range(1, Counting.calls + 1)]


def test_local_keys_still_use_netlink(monkeypatch):
    opened: list = []

    def fake_netlink(netns=None):
        opened.append(netns)
        raise RuntimeError("stop here")

    monkeypatch.setattr(monitor, "netlink", fake_netlink)
    s = TcSampler([ClassKey("dp-pe1", "pe1-snic", 1), ClassKey("dp-de1", "de1-snic", 1)],
                  remote=lambda netns, dev: (object(), 0.0) if netns == "dp-de1" else None)
    with pytest.raises(RuntimeError, match="stop here"):
        s.setup()
    assert opened == ["dp-pe1"]


# -- CPU of every server ----------------------------------------------------------------------------------------------
def _cpu(samples) -> CpuSampler:
    s = CpuSampler(period_s=0.1)
    s.samples = list(samples)
    return s


def test_servers_cpu_summary_is_the_busiest_servers():
    here = _cpu([(i * 0.1, 0.2) for i in range(10)])
    there = _cpu([(i * 0.1, 0.9 if i < 5 else 0.1) for i in range(10)])
    idle = _cpu([])
    cpu = ServersCpu({"s1": here, "s2": there, "s3": idle})
    assert cpu.samples is here.samples
    assert cpu.local is here
    by = cpu.by_server()
    assert by["s1"] == {"cpu_util_mean": pytest.approx(0.2), "cpu_util_max": pytest.approx(0.2)}
    assert by["s2"] == {"cpu_util_mean": pytest.approx(0.5), "cpu_util_max": pytest.approx(0.9)}
    assert by["s3"] == {"cpu_util_mean": None, "cpu_util_max": None}
    assert cpu.summary() == {"cpu_util_mean": pytest.approx(0.5), "cpu_util_max": pytest.approx(0.9)}
    # inside a window that only s1's and s2's calm half cover
    late = cpu.summary(windows=[(0.55, 1.0)])
    assert late == {"cpu_util_mean": pytest.approx(0.2), "cpu_util_max": pytest.approx(0.2)}


def test_servers_cpu_with_no_samples_anywhere():
    cpu = ServersCpu({"s1": _cpu([]), "s2": _cpu([])})
    assert cpu.summary() == {"cpu_util_mean": None, "cpu_util_max": None}


def test_remote_cpu_sampler_busy_fraction_on_our_clock():
    agent = FakeAgent([[500.0, 1000, 4000], [500.1, 1050, 4100], [500.2, 1050, 4100], [500.3, 1150, 4200]])
    s = RemoteCpuSampler(agent, mono_offset_s=400.0)
    for _ in range(4):
        s.sample(0.0)
    assert [op for op, _ in agent.calls] == ["cpu"] * 4
    # the first read is the base; one with no jiffies elapsed gives nothing
    assert s.samples == [(pytest.approx(100.1), pytest.approx(0.5)), (pytest.approx(100.3), pytest.approx(1.0))]
    assert s.summary()["cpu_util_max"] == pytest.approx(0.75)


# -- serverstats ------------------------------------------------------------------------------------------------------
@lru_cache(maxsize=None)
def two_net():
    return plan.make_plan(schema.load("two_servers")).net


CLOCKS = [{"mono_offset_s": 0.002, "wall_offset_s": -0.001, "error_s": 0.0001, "at": 1.0},
          {"mono_offset_s": 0.0025, "wall_offset_s": -0.001, "error_s": 0.0003, "at": 60.0}]
ERR_S1 = [0.01] * 50 + [0.3] * 50  # half the gaps late by 30 %: p99 in 0.3's bin
ERR_S2 = [0.02] * 100


def _report(net) -> dict:
    sp = Spread(net, "r1")
    sp.mtu = 1450
    sp.start_s = 1.25
    sp.tunnels = {i: None for i in range(len(net.tunnelled()))}
    sp.hello = {"s2": {"server": "s2", "digest": "abc"}}
    sp.underlay = {"s2": {"dev": "eth0", "src": "10.199.0.2", "mtu": 1500}}
    sp.here = {"s2": {"dev": "veth0", "src": "10.199.0.1", "mtu": 1500}}
    sp.clocks = {"s2": list(CLOCKS)}
    sp.add_dequeue("s1", {"snic": ERR_S1[:60]})
    sp.add_dequeue("s1", {"snic": ERR_S1[60:]})  # adds up
    sp.add_dequeue("s2", {"cnic": ERR_S2, "empty": []})
    return sp.report()


def _cal_rows(net):
    def row(netns, intf, error):
        return {**{c: "" for c in CAL_COLUMNS}, "netns": netns, "interface": intf, "error": error}
    return [row("dp-pe1", "pe1-snic", "-0.01"),       # pe1 here
            row("", "dp-pe1-snic", "0.04"),           # its switch port: the stor bridge on s2
            row("dp-de1", "de1-cnic0", "-0.03"),      # de1 on s2
            row("", "dp-de1-cnic0", "0.02"),          # its rail port here
            row("", "dp-pe1-cnic0", "-0.025"),        # here
            row("dp-st1", "st1-nic", ""),             # not measured: skipped
            row("", "dp-st1-nic", "0.015")]           # s2


@pytest.fixture
def run_dir(tmp_path):
    net = two_net()
    serverstats.write(tmp_path, _report(net), {"s1": {"cpu_util_max": 0.4, "cpu_util_mean": 0.2},
                                               "s2": {"cpu_util_max": 0.7, "cpu_util_mean": 0.3}}, None)
    with open(tmp_path / "calibration.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CAL_COLUMNS)
        w.writeheader()
        w.writerows(_cal_rows(net))
    return tmp_path


def test_servers_json_is_the_report_and_cpu(run_dir):
    raw = json.loads((run_dir / "servers.json").read_text())
    assert raw["mtu"] == 1450 and raw["tunnels"] == 5 and raw["tunnel"] == "vxlan"
    assert list(raw["servers"]) == ["s2"]  # the remote servers only
    assert raw["servers"]["s2"]["clock"] == CLOCKS
    assert raw["cpu"] == {"calibration": {"s1": {"cpu_util_max": 0.4, "cpu_util_mean": 0.2},
                                          "s2": {"cpu_util_max": 0.7, "cpu_util_mean": 0.3}}, "serving": {}}
    assert set(raw["dequeue"]) == {"s1", "s2"} and set(raw["dequeue"]["s2"]) == {"cnic"}  # no empty group
    assert raw["dequeue"]["s1"]["snic"]["gaps"] == 100
    assert raw["placement"]["de1"] == "s2" and raw["placement"]["stor"] == "s2"


def test_figures_per_server(run_dir):
    fig = serverstats.figures(run_dir, two_net())
    assert fig["mtu"] == 1450 and fig["tunnels"] == 5 and fig["tunnel"] == "vxlan" and fig["agents_start_s"] == 1.25
    assert "s1" in fig["timing"]
    s1, s2 = fig["servers"]["s1"], fig["servers"]["s2"]
    assert list(fig["servers"]) == ["s1", "s2"]
    assert s1["address"] == "this machine" and s2["address"] == "10.199.0.2"
    assert s1["nodes"] == ["pe1", "ctl1"] and s2["nodes"] == ["de1", "st1"]
    assert s1["bridges"] == ["dp-rail0", "dp-rail1", "dp-mgmt"] and s2["bridges"] == ["dp-stor"]
    assert s1["cpu_util_max"] == {"calibration": 0.4, "serving": None}
    assert s2["cpu_util_max"] == {"calibration": 0.7, "serving": None}
    # worst |error| per server: dp-pe1-snic (0.04) is a port of the stor bridge, so it counts for s2
    assert s1["link_error_max"] == pytest.approx(0.025)
    assert s2["link_error_max"] == pytest.approx(0.04)
    # dequeue p99 per server and group, from late_p99
    p99_s1 = dequeue.summarize(dequeue.histogram(ERR_S1))["late_p99"]
    p99_s2 = dequeue.summarize(dequeue.histogram(ERR_S2))["late_p99"]
    assert 0.3 < p99_s1 < 0.3 * 1.13 and 0.02 < p99_s2 < 0.02 * 1.13
    assert s1["dequeue_p99"] == {"snic": p99_s1}
    assert s2["dequeue_p99"] == {"cnic": p99_s2}
    # clocks: the remote one's, from the first offset, worst error and the drift between start and end
    assert s1["clock"] is None
    assert s2["clock"] == {"mono_offset_s": 0.002, "wall_offset_s": -0.001, "error_s": 0.0003,
                           "drift_s": pytest.approx(0.0005)}
    assert s2["underlay"] == {"dev": "eth0", "src": "10.199.0.2", "mtu": 1500}
    assert s1["underlay"] is None


def test_lines_name_every_server_and_the_clock(run_dir):
    out = serverstats.lines(serverstats.figures(run_dir, two_net()))
    assert out[0] == "servers: 2, 5 vxlan tunnels, MTU 1450"
    assert len(out) == 3
    assert out[1].startswith("  s1 (this machine): pe1, ctl1; CPU max 40% calibration, - serving; worst link 2.50%")
    assert "clock" not in out[1]
    assert out[2].startswith("  s2 (10.199.0.2): de1, st1; CPU max 70% calibration")
    assert "worst link 4.00%" in out[2]
    assert out[2].endswith("; clock +2.000 ms (±0.300, drift +0.500)")
    assert "dequeue p99 cnic 0.02" in out[2]


def test_figures_without_servers_or_servers_json(run_dir, tmp_path_factory):
    one = plan.make_plan(schema.load("two_servers", ["servers=null"])).net
    assert serverstats.figures(run_dir, one) is None  # one machine: nothing, even with a servers.json
    empty = tmp_path_factory.mktemp("empty")
    assert serverstats.figures(empty, two_net()) is None  # no servers.json yet


def test_figures_without_calibration_csv(run_dir):
    (run_dir / "calibration.csv").unlink()
    fig = serverstats.figures(run_dir, two_net())
    assert fig["servers"]["s1"]["link_error_max"] is None and fig["servers"]["s2"]["link_error_max"] is None
    assert "worst link -" in serverstats.lines(fig)[1]


# -- dpemu clean --servers ----------------------------------------------------------------------------------------
def test_servers_to_clean_manifest_wins():
    recorded = [REMOTE.as_dict(), ServerSpec("s3", address="10.0.0.3").as_dict()]
    got = servercli.servers_to_clean(recorded, "two_servers")
    assert got == [REMOTE, ServerSpec("s3", address="10.0.0.3")]


def test_servers_to_clean_needs_a_manifest_or_a_scenario():
    with pytest.raises(ConfigError, match=r"dpemu clean --servers SCENARIO"):
        servercli.servers_to_clean([], None)


def test_servers_to_clean_from_the_scenario_is_its_remote_servers():
    (srv,) = servercli.servers_to_clean([], "two_servers")
    assert srv.name == "s2" and srv.address == "10.199.0.2" and not srv.local
    assert srv.key == "/tmp/dpt-srv2-testbed/client_key"


def test_servers_to_clean_of_a_scenario_without_servers():
    with pytest.raises(ConfigError, match="has no servers"):
        servercli.servers_to_clean([], "tiny")

"""The live cluster's pieces that need no root: live.json, load keys, load plans, the prompt's addresses."""

from __future__ import annotations

import json
import os

import pytest

from emulator.errors import ConfigError
from scenarios import live, schema, shell, up
from scenarios.plan import make_plan


def test_a_published_cluster_is_current_until_withdrawn(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    pub = live.publish("up", "r1", run_dir, tmp_path / "control.sock", 12.5, state_dir=tmp_path)
    assert live.current(tmp_path) == pub and pub.owner_pid == os.getpid()
    assert live.require("up", tmp_path).scenario_file == str(run_dir / "scenario.yaml")
    with pytest.raises(live.NoCluster, match="not a `dpemu run`"):
        live.require("run", tmp_path)
    live.withdraw(tmp_path)
    assert live.current(tmp_path) is None
    with pytest.raises(live.NoCluster, match="sudo dpemu up SCENARIO"):
        live.require(state_dir=tmp_path)


def test_a_killed_owners_file_is_not_a_live_cluster(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    live.publish("up", "r1", run_dir, None, 0.0, state_dir=tmp_path)
    data = json.loads(live.path(tmp_path).read_text())
    live.path(tmp_path).write_text(json.dumps({**data, "owner_start": data["owner_start"] + 1}))  # a recycled pid
    assert live.current(tmp_path) is None
    live.path(tmp_path).write_text("{not json")
    assert live.current(tmp_path) is None


def test_an_owner_that_exited_unreaped_is_gone(tmp_path):
    """A `dpemu up` that has exited is a zombie until its parent (a tmux server, a shell) reaps it: `dpemu down`
    must see it gone at once, not wait for its parent (this once made `down` wait its full 120 s)."""
    import subprocess
    import time

    from emulator.registry import proc_stat, proc_start_time

    child = subprocess.Popen(["sleep", "0.05"])
    try:
        start = proc_start_time(child.pid)
        cluster = live.LiveCluster("up", "r1", child.pid, start, "s.yaml", str(tmp_path), None, 0.0)
        assert cluster.alive()
        deadline = time.monotonic() + 10
        while proc_stat(child.pid)[0] != "Z" and time.monotonic() < deadline:  # exited, not reaped
            time.sleep(0.01)
        assert proc_stat(child.pid)[0] == "Z" and proc_start_time(child.pid) == start
        assert not cluster.alive()
    finally:
        child.wait()


def test_load_words_become_scenario_keys():
    assert up.load_sets(["mode=dualpath", "agents=32", "turns=2", "serving.workload.seed=3"]) == [
        "serving.modes=[dualpath]", "serving.workload.agents=32", "serving.workload.turns_per_agent=2",
        "serving.workload.seed=3"]
    assert up.load_sets(["modes=basic,dualpath"]) == ["serving.modes=[basic,dualpath]"]


def test_every_bad_load_word_is_named():
    with pytest.raises(ConfigError) as exc:
        up.load_sets(["agents", "colour=red", "mode="])
    text = str(exc.value)
    assert "'agents': not KEY=VALUE" in text and "'colour': no such load key" in text and "'mode='" in text


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """serving_tiny resolved as `dpemu up` writes it, and its plan."""
    d = tmp_path_factory.mktemp("up")
    plan = make_plan(schema.load("serving_tiny"))
    import yaml
    (d / "scenario.yaml").write_text(yaml.safe_dump(plan.scenario.resolved(), sort_keys=False))
    return str(d / "scenario.yaml"), plan


def test_a_load_may_change_serving_keys_only(tiny):
    path, base = tiny
    plan = up.load_plan(path, base, up.load_sets(["mode=dualpath", "agents=6"]))
    assert plan.scenario.serving.modes == ["dualpath"] and plan.scenario.serving.workload.agents == 6
    with pytest.raises(ConfigError, match="serving.\\* keys only"):
        up.load_plan(path, base, ["cluster.snic_rate=100Gbit"])
    with pytest.raises(ConfigError, match="agents"):
        up.load_plan(path, base, ["serving.workload.agents=-3"])
    with pytest.raises(ConfigError, match="mode"):
        up.load_plan(path, base, up.load_sets(["mode=fast"]))


def test_a_node_name_becomes_the_address_on_the_first_shared_fabric(tiny):
    net = tiny[1].net
    addr = shell.addresses(net)
    assert shell.address_for(net, "pe1", "de1") == addr["de1"]["snic"]       # storage fabric first
    assert shell.address_for(net, "pe1", "de1.cnic1") == addr["de1"]["cnic1"]
    assert shell.address_for(net, "ctl1", "pe1") == addr["pe1"]["mgmt"]      # ctl1 shares only management
    assert shell.address_for(net, "pe1", "st1") == addr["st1"]["nic"]
    assert shell.address_for(net, "pe1", "-c") is None
    assert shell.node_argv(net, "pe1", ["ping", "-c", "1", "de1"]) == [
        "ip", "netns", "exec", "dp-pe1", "ping", "-c", "1", addr["de1"]["snic"]]


def test_the_nodes_lines_name_every_node_and_namespace(tiny):
    lines = shell.node_lines(tiny[1].net)
    assert [ln.split()[0] for ln in lines[1:]] == ["pe1", "de1", "st1", "ctl1"]
    assert "dp-pe1" in lines[1] and "snic 10.10.1.1" in lines[1]

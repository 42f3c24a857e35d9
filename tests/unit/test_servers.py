"""emulator.servers: ssh argv of a server, its file paths, dpemu's source digest, and the agent client (Agent)
against a local agent process and against fakes that never answer or exit at once. No root, no ssh."""

from __future__ import annotations

import os
import shlex
import stat
import sys
import time
from pathlib import Path

import pytest

from emulator import servers
from emulator.errors import PlatformError
from emulator.servers import SOURCE_PACKAGES, Agent, AgentError, ServerSpec, source_digest

REMOTE = ServerSpec("s2", address="10.199.0.2", user="dp", key="/keys/id_dp", known_hosts="/keys/known_hosts",
                    python="/opt/dpemu/.venv/bin/python", workdir="/var/tmp/dpemu", underlay_bps=25e9)


# -- ServerSpec -------------------------------------------------------------------------------------------------------
def test_ssh_argv_asks_no_questions():
    argv = REMOTE.ssh_argv()
    assert argv[0] == "ssh"
    assert argv[-1] == "dp@10.199.0.2"
    opts = [argv[i + 1] for i, a in enumerate(argv) if a == "-o"]
    assert "BatchMode=yes" in opts
    assert f"ConnectTimeout={servers.CONNECT_TIMEOUT_S}" in opts
    # the key, and only the key
    i = argv.index("-i")
    assert argv[i + 1] == "/keys/id_dp"
    assert "IdentitiesOnly=yes" in opts
    # the given known_hosts, strictly
    assert "UserKnownHostsFile=/keys/known_hosts" in opts
    assert "StrictHostKeyChecking=yes" in opts


def test_ssh_argv_without_key_or_known_hosts_uses_ssh_defaults():
    argv = ServerSpec("s3", address="10.0.0.3").ssh_argv()
    assert "-i" not in argv
    assert not any(a.startswith(("IdentitiesOnly", "UserKnownHostsFile", "StrictHostKeyChecking")) for a in argv)
    assert "BatchMode=yes" in argv
    assert argv[-1] == "root@10.0.0.3"


def test_ssh_argv_expands_home_in_key_and_known_hosts(monkeypatch):
    monkeypatch.setenv("HOME", "/home/someone")
    argv = ServerSpec("s3", address="h3", key="~/.ssh/dpemu", known_hosts="~/.ssh/kh").ssh_argv()
    assert argv[argv.index("-i") + 1] == "/home/someone/.ssh/dpemu"
    assert "UserKnownHostsFile=/home/someone/.ssh/kh" in argv


def test_wrap_of_the_local_server_is_the_argv_itself():
    argv = ["ip", "netns", "exec", "dp-x", "echo", "a b"]
    local = ServerSpec("s1")
    assert local.local
    assert local.wrap(argv) == argv


def test_wrap_of_a_remote_server_is_ssh_and_one_quoted_string_that_round_trips():
    argv = ["setpriv", "--pdeathsig", "TERM", "--", "ip", "netns", "exec", "dp-de1", "sh", "-c",
            "echo 'it''s' \"quoted\" $HOME; true", "a b", "", "*"]
    out = REMOTE.wrap(argv)
    assert out[:-2] == REMOTE.ssh_argv()
    assert out[-2] == "--"
    assert isinstance(out[-1], str)
    assert shlex.split(out[-1]) == argv  # what the remote shell runs is exactly argv
    assert not REMOTE.local


def test_remote_path_is_the_same_absolute_path_under_workdir_and_run():
    assert REMOTE.remote_path("r1", "/work/results/two_servers/r1") == "/var/tmp/dpemu/r1/work/results/two_servers/r1"
    assert REMOTE.remote_path("r1", Path("/a/b")) == "/var/tmp/dpemu/r1/a/b"
    other = ServerSpec("s4", address="h4", workdir="/tmp/dpt-srv2-testbed")
    assert other.remote_path("20240101-x", "/x") == "/tmp/dpt-srv2-testbed/20240101-x/x"


def test_server_spec_round_trips_through_a_dict():
    d = REMOTE.as_dict()
    assert d["address"] == "10.199.0.2" and d["underlay_bps"] == 25e9 and d["python"] == "/opt/dpemu/.venv/bin/python"
    assert ServerSpec.from_dict(d) == REMOTE
    local = ServerSpec("s1")
    assert ServerSpec.from_dict(local.as_dict()) == local


def test_tunnel_overheads():
    # vxlan: outer Ethernet 14 + IPv4 20 + UDP 8 + VXLAN 8; gretap: 14 + 20 + GRE with key 8 (but not the FCS)
    assert servers.TUNNEL_OVERHEAD == {"vxlan": 50, "gretap": 38}


# -- source_digest -------------------------------------------------------------------------------------------------
def _fake_tree(root: Path) -> Path:
    for i, pkg in enumerate(SOURCE_PACKAGES):
        (root / pkg / "sub").mkdir(parents=True)
        (root / pkg / "__init__.py").write_text(f"# {pkg}\n")
        (root / pkg / "sub" / f"m{i}.py").write_text(f"X = {i}\n")
    (root / "daemons" / "rpc.proto").write_text("syntax = 'proto3';\n")
    return root


def test_source_digest_is_stable_and_follows_py_and_proto_only(tmp_path):
    root = _fake_tree(tmp_path / "tree")
    first = source_digest(root)
    assert len(first) == 16 and int(first, 16) >= 0
    assert source_digest(root) == first
    # a copy of the same tree elsewhere: the same digest (paths are relative to the root)
    copy = _fake_tree(tmp_path / "copy")
    assert source_digest(copy) == first
    # files that are not source, and byte-code caches, do not count
    (root / "emulator" / "notes.txt").write_text("anything")
    (root / "emulator" / "__pycache__").mkdir()
    (root / "emulator" / "__pycache__" / "x.py").write_text("cached = 1\n")
    (root / "README.py").write_text("outside the packages\n")
    assert source_digest(root) == first


def test_source_digest_changes_with_a_py_file(tmp_path):
    root = _fake_tree(tmp_path)
    before = source_digest(root)
    (root / "emulator" / "sub" / "m0.py").write_text("X = 1\n")  # one byte differs
    changed = source_digest(root)
    assert changed != before
    (root / "emulator" / "sub" / "m0.py").write_text("X = 0\n")
    assert source_digest(root) == before
    (root / "scenarios" / "new.py").write_text("")  # an empty new file still counts, by its name
    assert source_digest(root) != before


def test_source_digest_changes_with_a_proto_file(tmp_path):
    root = _fake_tree(tmp_path)
    before = source_digest(root)
    (root / "daemons" / "rpc.proto").write_text("syntax = 'proto2';\n")
    assert source_digest(root) != before


def test_source_digest_of_this_checkout_matches_the_default_root():
    assert source_digest() == source_digest(Path(servers.__file__).resolve().parents[1])


# -- Agent against a local agent process ------------------------------------------------------------------------------
@pytest.fixture
def local_agent(tmp_path, monkeypatch):
    """An Agent whose server is this machine (no address: wrap() adds no ssh), so that its process is
    `setpriv --pdeathsig TERM -- setpriv --pdeathsig TERM -- python -m emulator.agent ...` here."""
    monkeypatch.setenv("DPEMU_STATE_DIR", str(tmp_path / "state"))  # the agent's registry, never /run/dpemu
    monkeypatch.chdir(Path(servers.__file__).resolve().parents[1])
    workdir = tmp_path / "work"
    workdir.mkdir()
    agent = Agent(ServerSpec("s9", python=sys.executable, workdir=str(workdir)), "r1", log=tmp_path / "agent.log")
    yield agent
    agent.close(timeout_s=5)


def test_agent_clock_op(local_agent):
    before_m, before_w = time.monotonic(), time.time()
    r = local_agent.call("clock", timeout_s=20)
    after_m, after_w = time.monotonic(), time.time()
    assert set(r) == {"mono", "wall"}
    assert isinstance(r["mono"], float) and isinstance(r["wall"], float)
    # one machine: CLOCK_MONOTONIC is shared, so the agent's reading lies between ours
    assert before_m <= r["mono"] <= after_m
    assert before_w - 0.01 <= r["wall"] <= after_w + 0.01


def test_agent_cpu_op(local_agent):
    t, busy, total = local_agent.call("cpu", timeout_s=20)
    assert isinstance(t, float) and abs(t - time.monotonic()) < 5
    assert isinstance(busy, int) and isinstance(total, int)
    assert 0 <= busy <= total and total > 0


def test_agent_unknown_op_is_an_error_naming_it(local_agent):
    with pytest.raises(AgentError) as exc:
        local_agent.call("no_such_op", timeout_s=20)
    msg = str(exc.value)
    assert "s9" in msg and "no op 'no_such_op'" in msg
    assert isinstance(exc.value, PlatformError)
    # the agent survives a failed call
    assert set(local_agent.call("clock", timeout_s=20)) == {"mono", "wall"}


def test_agent_private_op_is_refused_and_not_run(local_agent, tmp_path):
    """An op starting with "_" is refused, and NOT run: `_drop_files` would remove workdir/<run_id>."""
    victim = tmp_path / "work" / "victim"
    (victim / "inner").mkdir(parents=True)
    with pytest.raises(AgentError, match="no op '_drop_files'"):
        local_agent.call("_drop_files", timeout_s=20, run_id="victim")
    assert (victim / "inner").is_dir()
    with pytest.raises(AgentError, match="no op '__init__'"):
        local_agent.call("__init__", timeout_s=20, server="x", run_id="y")
    assert local_agent.call("clock", timeout_s=20)["mono"] > 0  # and the Ops object is still the same


def test_agent_clock_offsets_on_one_machine_are_zero(local_agent):
    c = local_agent.clock()
    assert set(c) == {"mono_offset_s", "wall_offset_s", "error_s", "at"}
    assert abs(c["mono_offset_s"]) < 0.05
    assert abs(c["wall_offset_s"]) < 0.05
    assert 0 <= c["error_s"] < 0.05
    # the offset is known to within the half round trip (plus float noise)
    assert abs(c["mono_offset_s"]) <= c["error_s"] + 1e-6
    assert abs(c["at"] - time.time()) < 5


def test_agent_calls_are_numbered(local_agent):
    for _ in range(3):
        local_agent.call("clock", timeout_s=20)
    assert local_agent._n == 3  # noqa: SLF001


def test_agent_close_ends_the_process(local_agent, tmp_path):
    assert local_agent.proc.poll() is None
    assert local_agent.pid == local_agent.proc.pid
    local_agent.close(timeout_s=10)
    assert local_agent.proc.returncode == 0  # stdin closed: the agent cleans up and exits normally
    assert local_agent.proc.stdout.closed
    assert not (tmp_path / "state" / "manifest.json").exists()  # it began no run, so it left no manifest


# -- Agent against fakes ---------------------------------------------------------------------------------------------
def _fake_python(tmp_path: Path, body: str, name: str = "fakepy") -> str:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return str(path)


def test_agent_that_never_answers_times_out(tmp_path):
    fake = _fake_python(tmp_path, "exec sleep 30")  # reads nothing, answers nothing
    agent = Agent(ServerSpec("s9", python=fake, workdir=str(tmp_path)), "r1")
    try:
        t0 = time.monotonic()
        with pytest.raises(AgentError) as exc:
            agent.call("clock", timeout_s=0.5)
        took = time.monotonic() - t0
        assert 0.45 <= took < 1.5
        assert "did not answer" in str(exc.value) and "s9" in str(exc.value) and "clock" in str(exc.value)
    finally:
        agent.close(timeout_s=0.5)  # stdin closed, still no exit: terminated
    assert agent.proc.returncode is not None


def test_agent_that_exits_at_once_is_gone(tmp_path):
    fake = _fake_python(tmp_path, "exit 3")
    agent = Agent(ServerSpec("s9", python=fake, workdir=str(tmp_path)), "r1")
    try:
        agent.proc.wait(timeout=10)
        t0 = time.monotonic()
        with pytest.raises(AgentError) as exc:
            agent.call("clock", timeout_s=5)
        assert time.monotonic() - t0 < 1  # not the deadline: EOF (or a broken pipe) at once
        msg = str(exc.value)
        assert "gone" in msg and "clock" in msg and "s9" in msg
        assert "ssh exit 3" in msg and fake in msg
    finally:
        agent.close(timeout_s=1)
    assert agent.proc.returncode == 3


_ECHO_LATE = """
import json, sys, time
for line in sys.stdin:
    req = json.loads(line)
    time.sleep(0.4)
    sys.stdout.write(json.dumps({"id": req["id"], "ok": True, "result": req["op"]}) + "\\n")
    sys.stdout.flush()
"""


def test_agent_call_after_a_timeout_does_not_take_the_late_reply(tmp_path):
    script = tmp_path / "echo_late.py"
    script.write_text(_ECHO_LATE)
    fake = _fake_python(tmp_path, f'exec "{sys.executable}" "{script}"')
    agent = Agent(ServerSpec("s9", python=fake, workdir=str(tmp_path)), "r1")
    try:
        with pytest.raises(AgentError, match="did not answer"):
            agent.call("first", timeout_s=0.1)
        try:
            got = agent.call("second", timeout_s=3)
        except AgentError:
            got = "refused"
        assert got == "second"  # the late reply to "first" is skipped
    finally:
        agent.close(timeout_s=2)


def test_fake_python_is_what_the_agent_runs(tmp_path):
    """The fixture's premise: Agent runs `server.python -m emulator.agent --server --run --workdir` under
    setpriv, with no ssh for a local server."""
    out = tmp_path / "argv.txt"
    fake = _fake_python(tmp_path, f'printf "%s\\n" "$@" > "{out}"')
    agent = Agent(ServerSpec("s9", python=fake, workdir="/w"), "r7")
    agent.proc.wait(timeout=10)
    agent.close(timeout_s=1)
    assert out.read_text().split("\n")[:-1] == ["-m", "emulator.agent", "--server", "s9", "--run", "r7",
                                                "--workdir", "/w"]
    assert os.path.basename(agent.proc.args[0]) == "setpriv"
    assert agent.proc.args[:4] == ["setpriv", "--pdeathsig", "TERM", "--"]
    assert agent.proc.args[4:8] == ["setpriv", "--pdeathsig", "TERM", "--"]
    assert agent.proc.args[8] == fake

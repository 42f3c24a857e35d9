"""The one-machine testbed of distributed runs: a second "server" reached over ssh.

Each test starts its own server (name ``tbtest``, 10.199.7.0/24), so that it cannot
meet a testbed started by hand (``srv2``, 10.199.0.0/24), and checks that
:func:`emulator.testbed.stop` leaves nothing behind.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from emulator import testbed
from netns_tools import PYTHON, link_names, netns_names, sh, wait_for

NAME, INDEX = "tbtest", 7


def _remote(server: testbed.TestServer, command: str) -> str:
    return sh(server.ssh_argv() + [command], timeout=30).stdout


def _pids_of(argv: str) -> list[int]:
    """Live processes (root pid namespace) whose argv is exactly `argv` (words joined by spaces)."""
    found = []
    for d in Path("/proc").glob("[0-9]*"):
        try:
            if d.joinpath("cmdline").read_bytes().replace(b"\0", b" ").decode().strip() == argv:
                found.append(int(d.name))
        except OSError:
            continue
    return found


def _assert_gone(server: testbed.TestServer) -> None:
    assert server.netns not in netns_names() and server.netns not in link_names()
    for pid in (server.sshd_pid, server.holder_pid):  # gone, or a recycled pid that is not the server's
        try:
            assert str(server.workdir) not in Path(f"/proc/{pid}/cmdline").read_text(errors="replace")
        except OSError:
            pass
    assert not server.workdir.exists()


@pytest.mark.netns
def test_ssh_and_run_isolation():
    """Login works; the server has its own hostname, pid 1 and /run/netns; a root namespace is not pinned."""
    sh(["ip", "netns", "add", "dpx-probe"])
    try:
        sh(["ip", "link", "add", "dpx-a", "type", "veth", "peer", "name", "dpx-b", "netns", "dpx-probe"])
        t0 = time.monotonic()
        server = testbed.start(NAME, INDEX)
        print(f"\nstart: {time.monotonic() - t0:.2f}s")
        try:
            out = _remote(server, "hostname; ip -o -4 addr show dev eth0; echo netns=[$(ls /run/netns)];"
                                  " cat /proc/1/comm; ip netns add dp-probe2 && ip netns list;"
                                  f" {PYTHON} -c 'import emulator, pyroute2; print(\"imports-ok\")'")
            lines = out.splitlines()
            assert lines[0] == NAME, out
            assert f"inet {server.address}/24" in lines[1], out
            assert lines[2] == "netns=[]" and lines[3] == "sshd", out  # dpx-probe of the root is not there
            assert "dp-probe2" in out and "imports-ok" in out, out
            assert "dp-probe2" not in netns_names()
            sh(["ip", "netns", "del", "dpx-probe"])  # the server's mount namespace must not keep it alive
            wait_for(lambda: "dpx-a" not in link_names(), 5, "dpx-a to go with namespace dpx-probe")
        finally:
            t0 = time.monotonic()
            assert testbed.stop(server) == []
            print(f"stop: {time.monotonic() - t0:.2f}s")
        _assert_gone(server)
    finally:
        if "dpx-probe" in netns_names():
            sh(["ip", "netns", "del", "dpx-probe"], check=False)
        if "dpx-a" in link_names():
            sh(["ip", "link", "del", "dpx-a"], check=False)


@pytest.mark.netns
def test_pdeathsig_on_disconnect():
    """A remote process under setpriv --pdeathsig dies when the local ssh client is killed; stop kills the rest."""
    with testbed.running(NAME, INDEX) as server:
        guarded = subprocess.Popen(server.ssh_argv() + ["setpriv --pdeathsig TERM -- sleep 4242.1"],
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        bare = subprocess.Popen(server.ssh_argv() + ["sleep 4242.2"], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            (remote,) = wait_for(lambda: _pids_of("sleep 4242.1"), 10, "the remote guarded sleep")
            (survivor,) = wait_for(lambda: _pids_of("sleep 4242.2"), 10, "the remote bare sleep")
            guarded.send_signal(signal.SIGTERM)
            bare.send_signal(signal.SIGTERM)
            wait_for(lambda: not _pids_of("sleep 4242.1"), 5, f"remote sleep {remote} to die with the connection")
            time.sleep(0.5)
            assert _pids_of("sleep 4242.2") == [survivor]  # without pdeathsig it outlives its session
        finally:
            for proc in (guarded, bare):
                proc.kill()
                proc.wait(timeout=10)
    assert not _pids_of("sleep 4242.2"), "stop left a process of the server running"
    _assert_gone(server)

"""A second "server" on this machine, to test multi-server (ssh-driven) runs on one VM.

A test server is a named network namespace ``dpt-<name>`` cabled to the root
namespace by a veth pair (root side ``dpt-<name>`` = 10.199.<k>.1/24, server side
``eth0`` = 10.199.<k>.2/24), running its own sshd in its own pid, mount and UTS
namespaces. The filesystem is shared with the root server (same paths, same venv)
except ``/run``, a fresh tmpfs: each server has its own ``/run/netns`` and
``/run/dpemu``. The prefix is ``dpt-``, never ``dp-``, which dpemu's cleanup owns.
The sshd is pid 1 of the server, so its end kills every process of the server, and
the server's mount namespace (holding the namespaces it created) goes with them.

    python -m emulator.testbed up [--name srv2] [--index 0] [--mtu 1500] [--state FILE]
    python -m emulator.testbed down|status [--name srv2] [--state FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

PREFIX = "dpt-"
STATE_DIR = Path("/run/dpemu-testbed")
SSHD = "/usr/sbin/sshd"
_NAME = re.compile(r"^[a-z][a-z0-9]{0,10}$")  # dpt-<name> must fit IFNAMSIZ (15)
_CHILDREN: dict[int, subprocess.Popen] = {}  # holders started by this process, reaped by stop()

# Runs inside the new mount/pid/UTS namespaces, then becomes the sshd (pid 1 there). What the
# root server mounted under /run (its /run/netns/*) is unmounted, then hidden by the new tmpfs.
_INIT = r"""set -e
umask 022
mount --make-rprivate /
awk '$5 == "/run" || index($5, "/run/") == 1 {print $5}' /proc/self/mountinfo | sort -r \
  | xargs -r umount -l 2>/dev/null || true
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run
mkdir -p /run/sshd /run/netns
hostname "$1"
exec "$2" -D -e -f "$3"
"""


@dataclass(frozen=True)
class TestServer:
    """One running test server, as :func:`start` made it (JSON-able via :meth:`to_json`)."""

    __test__ = False  # not a pytest test class

    name: str
    address: str  # the server's end of the underlay (10.199.<k>.2)
    local_address: str  # the root server's end (10.199.<k>.1)
    user: str
    key: Path  # client private key
    known_hosts: Path
    mtu: int
    netns: str  # dpt-<name>, also the root-side veth
    sshd_pid: int  # the sshd, init of the server's pid namespace (pid in the root pid namespace)
    holder_pid: int  # its parent, the `unshare` process
    workdir: Path

    def ssh_argv(self) -> list[str]:
        return ["ssh", "-i", str(self.key), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
                "-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "IdentitiesOnly=yes",
                "-o", "ConnectTimeout=5", f"{self.user}@{self.address}"]

    def to_json(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, data: dict) -> "TestServer":
        return cls(**{k: Path(v) if k in ("key", "known_hosts", "workdir") else v for k, v in data.items()})


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and res.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed: {res.stderr.strip()}")
    return res


def _netns_exists(netns: str) -> bool:
    return any(line.split()[0] == netns for line in _ip("netns", "list").stdout.splitlines() if line.strip())


def _link_exists(link: str) -> bool:
    return _ip("link", "show", "dev", link, check=False).returncode == 0


def _stat(pid: int) -> list[str]:
    """Fields of /proc/PID/stat after the command name (state, ppid, ...); [] if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return []


def _running(pid: int, workdir: Path) -> bool:
    """True if `pid` is a live (not zombie) process of the server in `workdir` (its argv names our config)."""
    if pid <= 0 or (pid in _CHILDREN and _CHILDREN[pid].poll() is not None):
        return False  # (the poll reaps a holder this process started)
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False
    return _stat(pid)[:1] not in ([], ["Z"]) and str(workdir / "sshd_config") in cmdline


def _child_of(ppid: int) -> int:
    return next((int(d.name) for d in Path("/proc").iterdir() if d.name.isdigit()
                 and _stat(int(d.name))[1:2] == [str(ppid)]), 0)


def _kill(pids: list[int], sig: int, workdir: Path, wait_s: float) -> bool:
    """Send `sig` to those of `pids` still ours; wait until all are gone (True) or `wait_s` passed."""
    for pid in pids:
        if _running(pid, workdir):
            with suppress(ProcessLookupError):
                os.kill(pid, sig)
    deadline = time.monotonic() + wait_s
    while any(_running(p, workdir) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def leftovers(name: str) -> list[str]:
    """What a testbed called `name` has on the machine now (empty: nothing)."""
    netns = PREFIX + name
    left = [f"netns {netns}"] if _netns_exists(netns) else []
    left += [f"link {netns}"] if _link_exists(netns) else []
    return left + ([f"state file {state_path(name)}"] if state_path(name).exists() else [])


def state_path(name: str) -> Path:
    return STATE_DIR / f"{name}.json"


def start(name: str = "srv2", index: int = 0, mtu: int = 1500, workdir: Path | None = None,
          timeout_s: float = 20) -> TestServer:
    """Build the server and return once an ssh login with its key works (RuntimeError if not)."""
    if not _NAME.match(name) or not 0 <= index <= 255 or not 68 <= mtu <= 65535:
        raise ValueError(f"bad testbed name/index/mtu {name!r}/{index}/{mtu} (name: [a-z][a-z0-9]{{0,10}})")
    if workdir is not None and Path("/run") in [workdir.resolve(), *workdir.resolve().parents]:
        raise ValueError(f"workdir {workdir} is under /run, which the server mounts over")
    if left := leftovers(name):
        raise RuntimeError(f"a previous testbed {name!r} is left over ({', '.join(left)}); "
                           f"remove it with `python -m emulator.testbed down --name {name}`")
    local, address, netns = f"10.199.{index}.1", f"10.199.{index}.2", PREFIX + name
    if f" {local}/" in _ip("-o", "-4", "addr", "show").stdout:
        raise RuntimeError(f"{local} is already assigned on this machine (another testbed with index {index}?)")
    if not os.access(SSHD, os.X_OK):
        raise RuntimeError(f"{SSHD} not found: install openssh-server")
    workdir = Path(tempfile.mkdtemp(prefix=f"{netns}-", dir="/tmp")) if workdir is None else workdir.resolve()
    workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
    server = TestServer(name, address, local, "root", workdir / "client_key", workdir / "known_hosts", mtu,
                        netns, 0, 0, workdir)
    try:
        for key in ("host_key", "client_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{netns}-{key}",
                            "-f", str(workdir / key)], check=True, capture_output=True, timeout=30)
        shutil.copyfile(workdir / "client_key.pub", workdir / "authorized_keys")
        host_key = (workdir / "host_key.pub").read_text().split()[:2]
        server.known_hosts.write_text(f"{address} {' '.join(host_key)}\n")
        (workdir / "sshd_config").write_text("\n".join([
            f"ListenAddress {address}", "Port 22", f"HostKey {workdir / 'host_key'}",
            f"AuthorizedKeysFile {workdir / 'authorized_keys'}", f"PidFile {workdir / 'sshd.pid'}",
            "PermitRootLogin prohibit-password", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
            "UsePAM no", "UseDNS no", "StrictModes no", "LogLevel ERROR", "PrintMotd no", "PrintLastLog no",
            "MaxStartups 64", "MaxSessions 64", "ClientAliveInterval 5", ""]))
        _ip("netns", "add", netns)
        _ip("link", "add", netns, "mtu", str(mtu), "type", "veth", "peer", "name", "eth0", "mtu", str(mtu),
            "netns", netns)
        _ip("addr", "add", f"{local}/24", "dev", netns)
        _ip("link", "set", netns, "up")
        _ip("-n", netns, "addr", "add", f"{address}/24", "dev", "eth0")
        _ip("-n", netns, "link", "set", "eth0", "up")
        _ip("-n", netns, "link", "set", "lo", "up")
        with open(workdir / "sshd.log", "wb") as log:  # `ip netns exec` execs unshare: same pid
            holder = subprocess.Popen(
                ["ip", "netns", "exec", netns, "unshare", "--pid", "--mount", "--uts", "--fork", "--mount-proc",
                 "--kill-child", "sh", "-c", _INIT, "init", name, SSHD, str(workdir / "sshd_config")],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        _CHILDREN[holder.pid] = holder
        server = TestServer(**{**asdict(server), "holder_pid": holder.pid})
        _wait_ssh(server, holder, time.monotonic() + timeout_s)
        return TestServer(**{**asdict(server), "sshd_pid": _child_of(holder.pid)})
    except BaseException:
        stop(server)
        raise


def _wait_ssh(server: TestServer, holder: subprocess.Popen, deadline: float) -> None:
    """Poll (TCP connect, then `ssh true`) until a login works; RuntimeError with sshd's log if not."""
    why = "no answer"
    while time.monotonic() < deadline:
        if holder.poll() is not None:
            why = f"the server exited with status {holder.returncode}"
            break
        try:
            socket.create_connection((server.address, 22), timeout=1).close()
            res = subprocess.run(server.ssh_argv() + ["true"], capture_output=True, text=True,
                                 timeout=max(1.0, deadline - time.monotonic()), stdin=subprocess.DEVNULL)
            if res.returncode == 0:
                return
            why = f"ssh exited {res.returncode}: {res.stderr.strip()}"
        except (OSError, subprocess.TimeoutExpired) as exc:
            why = str(exc)
        time.sleep(0.05)
    log = (server.workdir / "sshd.log").read_text(errors="replace").strip()
    raise RuntimeError(f"test server {server.name!r} ({server.address}) refused ssh: {why}\n"
                       f"sshd stderr: {log or '(empty)'}")


def clean(name: str) -> None:
    """Remove a testbed known only by name: SIGKILL what runs in netns dpt-<name>, delete the link, the
    netns and the default workdirs (/tmp/dpt-<name>-*)."""
    netns = PREFIX + name
    if _netns_exists(netns):
        for pid in map(int, _ip("netns", "pids", netns).stdout.split()):
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)  # the server's pid 1 takes all of it along
    if _link_exists(netns):
        _ip("link", "del", netns, check=False)
    if _netns_exists(netns):
        _ip("netns", "del", netns, check=False)
    for workdir in Path("/tmp").glob(f"{netns}-*"):  # start's default workdirs, known by their config
        if (workdir / "sshd_config").is_file():
            shutil.rmtree(workdir, ignore_errors=True)


def stop(server: TestServer) -> list[str]:
    """Stop the server and remove all of it; return what could not be removed (empty: clean)."""
    pids = [server.sshd_pid, server.holder_pid]
    # SIGTERM to the sshd, pid 1 of the server: the kernel kills the rest of the server when it exits,
    # and its parent `unshare` (which blocks SIGTERM) follows. SIGKILL both if that has not done it.
    if not _kill(pids, signal.SIGTERM, server.workdir, 3.0 if server.sshd_pid else 0.0):
        _kill(pids, signal.SIGKILL, server.workdir, 3.0)  # --kill-child: the sshd dies with unshare
    clean(server.name)
    if (child := _CHILDREN.get(server.holder_pid)) and child.poll() is not None:
        del _CHILDREN[server.holder_pid]
    shutil.rmtree(server.workdir, ignore_errors=True)
    left = [f"process {p}" for p in pids if _running(p, server.workdir)]
    left += [x for x in leftovers(server.name) if not x.startswith("state file")]
    return left + ([f"workdir {server.workdir}"] if server.workdir.exists() else [])


@contextmanager
def running(name: str = "srv2", index: int = 0, mtu: int = 1500, timeout_s: float = 20) -> Iterator[TestServer]:
    """`start` a server, yield it, `stop` it (RuntimeError if something is left)."""
    server = start(name, index, mtu, timeout_s=timeout_s)
    try:
        yield server
    finally:
        if left := stop(server):
            raise RuntimeError(f"test server {name!r} left behind: {', '.join(left)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m emulator.testbed", description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=["up", "down", "status"])
    parser.add_argument("--name", default="srv2")
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--mtu", type=int, default=1500)
    parser.add_argument("--timeout", type=float, default=20.0)
    parser.add_argument("--state", type=Path, help=f"state file (default {STATE_DIR}/<name>.json)")
    parser.add_argument("--workdir", type=Path, help="the server's keys and sshd files (default: a new /tmp dir)")
    args = parser.parse_args(argv)
    path = args.state or state_path(args.name)
    if args.action == "up":
        try:
            server = start(args.name, args.index, args.mtu, workdir=args.workdir, timeout_s=args.timeout)
        except (RuntimeError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(server.to_json(), indent=2) + "\n")
        print(json.dumps(server.to_json(), indent=2))
        return 0
    server = TestServer.from_json(json.loads(path.read_text())) if path.exists() else None
    if args.action == "status":
        ok = server is not None and _running(server.sshd_pid, server.workdir)
        print(json.dumps({"server": server.to_json() if server else None, "running": ok,
                          "objects": leftovers(args.name)}, indent=2))
        return 0 if ok else 1
    left = stop(server) if server else (clean(args.name) or leftovers(args.name))
    if not left:
        path.unlink(missing_ok=True)
        with suppress(OSError):
            path.parent.rmdir()  # only if empty
    print(f"testbed {args.name!r}: " + (f"could not remove {', '.join(left)}" if left else "removed"))
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main())

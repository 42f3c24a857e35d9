"""The servers one emulated cluster is spread over, and how dpemu talks to them.

A :class:`ServerSpec` names a machine: the first of a run's servers is the one dpemu runs on (no address); every
other is reached by ssh as ``user@address`` with a key. On each remote server dpemu starts one **agent**
(``python -m emulator.agent``, :mod:`emulator.agent`) over ssh and speaks JSON lines to it on stdin/stdout: the
agent applies tc plans, reads counters and the CPU, holds that server's lock and manifest and removes what the run
made there. The agent dies with its ssh connection, and removes everything of the run on its server when it does,
so a dpemu that is killed leaves nothing behind on any server.

Processes of the run on a remote server (daemons, iperf3) are started by ssh directly, one connection each
(:meth:`ServerSpec.wrap`): their stdin, stdout and stderr come back through ssh as those of a local process. The
remote command runs under ``setpriv --pdeathsig TERM``: when its ssh connection ends (the local ssh is stopped,
or dies with dpemu), sshd's session process exits and the command gets SIGTERM, as a local one does when dpemu
dies. Files cross with ``tar`` over ssh (:meth:`ServerSpec.push`, :meth:`ServerSpec.pull`).
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import PlatformError

AGENT_TIMEOUT_S = 30.0  # every agent call has a deadline
CONNECT_TIMEOUT_S = 10
TUNNEL_OVERHEAD = {"vxlan": 50, "gretap": 38}  # bytes each tunnelled frame carries on the underlay, L2 to L2
SOURCE_PACKAGES = ("emulator", "topologies", "traffic", "daemons", "scenarios")


@dataclass(frozen=True)
class ServerSpec:
    """One machine of a run. ``address`` None: the machine dpemu runs on."""

    name: str
    address: str | None = None
    user: str = "root"
    key: str | None = None  # private key for ssh (None: ssh's own defaults, e.g. an agent or ~/.ssh/id_*)
    known_hosts: str | None = None  # None: ssh's own (~/.ssh/known_hosts)
    python: str = sys.executable  # the interpreter of the same dpemu checkout on that server
    workdir: str = "/var/tmp/dpemu"  # where the run's files live on that server until they are collected
    underlay_bps: float = 10e9  # what the network between the servers carries, each way

    @property
    def local(self) -> bool:
        return self.address is None

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ServerSpec":
        return cls(**d)

    def ssh_argv(self) -> list[str]:
        """ssh to this server with no questions asked (a missing key or unknown host is an error)."""
        argv = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={CONNECT_TIMEOUT_S}",
                "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3", "-o", "LogLevel=ERROR"]
        if self.key:
            argv += ["-i", os.path.expanduser(self.key), "-o", "IdentitiesOnly=yes"]
        if self.known_hosts:
            argv += ["-o", f"UserKnownHostsFile={os.path.expanduser(self.known_hosts)}",
                     "-o", "StrictHostKeyChecking=yes"]
        return argv + [f"{self.user}@{self.address}"]

    def wrap(self, argv: list[str]) -> list[str]:
        """`argv` (already wrapped for its namespace) run on this server over its own ssh connection."""
        if self.local:
            return argv
        return [*self.ssh_argv(), "--", shlex.join(argv)]

    def remote_path(self, run_id: str, path: Path | str) -> str:
        """Where a file of the run directory lives on this server: the same absolute path under the workdir."""
        return str(Path(self.workdir) / run_id / str(path).lstrip("/"))

    def push(self, run_id: str, local_dir: Path, timeout_s: float = 120) -> None:
        """Copy `local_dir` (and what it holds) to this server's copy of it."""
        remote = self.remote_path(run_id, local_dir)
        _pipe(["tar", "-C", str(local_dir), "-cf", "-", "."],
              self.wrap(["sh", "-c", f"mkdir -p {shlex.quote(remote)} && tar -C {shlex.quote(remote)} -xf -"]),
              f"copy {local_dir} to {self.name}", timeout_s)

    def pull(self, run_id: str, local_dir: Path, exclude: tuple[str, ...] = (), timeout_s: float = 300) -> None:
        """Copy this server's copy of `local_dir` back into it (files there win), leaving out `exclude`."""
        remote = self.remote_path(run_id, local_dir)
        ex = " ".join(f"--exclude=./{shlex.quote(e)}" for e in exclude)
        local_dir.mkdir(parents=True, exist_ok=True)
        _pipe(self.wrap(["sh", "-c", f"test -d {shlex.quote(remote)} && tar -C {shlex.quote(remote)} {ex} -cf - ."]),
              ["tar", "-C", str(local_dir), "-xf", "-"], f"collect {local_dir} from {self.name}", timeout_s)


def _pipe(src: list[str], dst: list[str], what: str, timeout_s: float) -> None:
    a = subprocess.Popen(src, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    b = subprocess.Popen(dst, stdin=a.stdout, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         start_new_session=True)
    a.stdout.close()
    try:
        _, b_err = b.communicate(timeout=timeout_s)
        _, a_err = a.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        a.kill()
        b.kill()
        a.wait()
        b.wait()
        raise PlatformError(f"{what}: no end within {timeout_s:.0f} s") from None
    if a.returncode or b.returncode:
        raise PlatformError(f"{what} failed: {(a_err + b_err).decode(errors='replace').strip()[-400:]}")


def source_digest(root: Path | None = None) -> str:
    """A digest of dpemu's own source (every .py and .proto of its packages): two servers run the same dpemu
    when their digests match, whatever their version strings say."""
    root = root or Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for pkg in SOURCE_PACKAGES:
        for p in sorted((root / pkg).rglob("*")):
            if p.suffix in (".py", ".proto") and "__pycache__" not in p.parts:
                h.update(str(p.relative_to(root)).encode())
                h.update(p.read_bytes())
    return h.hexdigest()[:16]


class AgentError(PlatformError):
    """An agent call failed or did not answer in time."""


class Agent:
    """The agent of one remote server: ``call(op, **args)`` with a deadline. Calls are serialized."""

    def __init__(self, server: ServerSpec, run_id: str, log: Path | None = None):
        self.server = server
        self.run_id = run_id
        self._lock = threading.Lock()
        self._n = 0
        self._buf = b""
        self._log_path = log
        self._log = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 - closed in close()
        inner = ["setpriv", "--pdeathsig", "TERM", "--", server.python, "-m", "emulator.agent",
                 "--server", server.name, "--run", run_id, "--workdir", server.workdir]
        self.proc = subprocess.Popen(["setpriv", "--pdeathsig", "TERM", "--", *server.wrap(inner)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                     start_new_session=True)
        self.pid = self.proc.pid

    def call(self, op: str, timeout_s: float = AGENT_TIMEOUT_S, **args):
        with self._lock:
            self._n += 1
            msg = json.dumps({"id": self._n, "op": op, "args": args}) + "\n"
            try:
                self.proc.stdin.write(msg.encode())
                self.proc.stdin.flush()
            except (BrokenPipeError, OSError, ValueError):
                raise AgentError(self._gone(op)) from None
            reply = self._reply(self._n, timeout_s, op)
        if not reply.get("ok"):
            raise AgentError(f"server {self.server.name}: {op} failed: {reply.get('error')}")
        return reply.get("result")

    def _reply(self, want: int, timeout_s: float, op: str) -> dict:
        """The reply to request `want`; a late reply to an earlier call that timed out is skipped."""
        deadline = time.monotonic() + timeout_s
        fd = self.proc.stdout.fileno()
        while True:
            while b"\n" in self._buf:
                line, self._buf = self._buf.split(b"\n", 1)
                if line.strip():
                    reply = json.loads(line)
                    if reply.get("id") == want:
                        return reply
            left = deadline - time.monotonic()
            if left <= 0:
                raise AgentError(f"server {self.server.name}: {op} did not answer within {timeout_s:g} s")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    raise AgentError(self._gone(op))
                self._buf += chunk

    def _gone(self, op: str) -> str:
        try:
            code = self.proc.wait(timeout=2)  # its output ended: its exit follows
        except subprocess.TimeoutExpired:
            code = None
        said = ""
        if self._log_path is not None and self._log_path.exists():
            said = self._log_path.read_text(errors="replace").strip()[-300:]
        return (f"server {self.server.name}: the agent is gone during {op} (ssh exit {code}"
                + (f": {said}" if said else "") + f"; is dpemu installed at {self.server.python} there, and does "
                f"`{shlex.join(self.server.ssh_argv())} true` work?)")

    def clock(self) -> dict:
        """This server's clocks against ours, from the fastest of five round trips: ``mono_offset_s`` and
        ``wall_offset_s`` (theirs minus ours) within ``error_s`` (half that round trip)."""
        best = None
        for _ in range(5):
            t0m, t0w = time.monotonic(), time.time()
            r = self.call("clock")
            t1m, t1w = time.monotonic(), time.time()
            rtt = t1m - t0m
            if best is None or rtt < best[0]:
                best = (rtt, r["mono"] - (t0m + t1m) / 2, r["wall"] - (t0w + t1w) / 2)
        return {"mono_offset_s": best[1], "wall_offset_s": best[2], "error_s": best[0] / 2, "at": time.time()}

    def close(self, timeout_s: float = 30.0) -> None:
        """End the agent: it removes what is left of the run on its server, then exits."""
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                self.proc.wait(timeout=5)
        if self.proc.stdout:
            self.proc.stdout.close()
        if self._log is not subprocess.DEVNULL:
            self._log.close()

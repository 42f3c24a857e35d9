"""Processes that a run starts inside its namespaces, and how they stop.

Every process is started from an argv list (never a shell string) with
``ip netns exec``, in its own session (so its children can be signalled as a
group) and with a parent-death signal set by ``setpriv --pdeathsig`` (not by a
Python ``preexec_fn``, which is unsafe while sampler threads run), so that even
a SIGKILLed dpemu does not leave daemons behind. Stopping is SIGTERM -> wait -> SIGKILL, on exactly the
processes this group started.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import IO, Callable

def netns_argv(netns: str | None, argv: list[str]) -> list[str]:
    """The argv that runs `argv` inside `netns` and dies with its parent."""
    inner = argv if netns is None else ["ip", "netns", "exec", netns, *argv]
    return ["setpriv", "--pdeathsig", "TERM", "--", *inner]


class ProcessGroup:
    """The processes of one run. `on_start(pid)` lets the registry record them. `remote(netns)` names the
    server (an :class:`emulator.servers.ServerSpec`) that holds a namespace on another machine, or None: such a
    process is started there over its own ssh connection, with the same parent-death chain (a stopped or dead
    ssh ends the remote process), and its pipes come back through ssh. `cwd` and `env` apply here only."""

    def __init__(self, on_start: Callable[[int], None] | None = None, remote: Callable | None = None):
        self._procs: list[tuple[str, subprocess.Popen]] = []
        self._on_start = on_start
        self._remote = remote
        self.remote_pids: set[int] = set()  # local ssh clients of processes that run on another server

    def start(self, name: str, netns: str | None, argv: list[str], *,
              stdin: IO | int | None = subprocess.DEVNULL,
              stdout: IO | int | None = subprocess.PIPE, stderr: IO | int | None = subprocess.PIPE,
              cwd: Path | None = None, env: dict | None = None) -> subprocess.Popen:
        srv = self._remote(netns) if self._remote else None
        full = netns_argv(netns, argv) if srv is None else netns_argv(None, srv.wrap(netns_argv(netns, argv)))
        proc = subprocess.Popen(full, stdin=stdin, stdout=stdout, stderr=stderr, text=True,
                                cwd=cwd, env=env, start_new_session=True)
        self._procs.append((name, proc))
        if srv is not None:
            self.remote_pids.add(proc.pid)
        if self._on_start:
            self._on_start(proc.pid)
        return proc

    def stop(self, proc: subprocess.Popen, grace_s: float = 3.0) -> int | None:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=grace_s)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream and not stream.closed:
                stream.close()
        return proc.returncode

    def signal_all(self, sig: int) -> int:
        """Send `sig` to the process group of every live process of this group, without waiting (safe in a
        signal handler): how many were signalled."""
        sent = 0
        for _, proc in list(self._procs):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, sig)
                    sent += 1
                except ProcessLookupError:
                    pass
        return sent

    def stop_all(self) -> None:
        while self._procs:
            _, proc = self._procs.pop()
            self.stop(proc)

    def alive(self) -> list[str]:
        return [name for name, p in self._procs if p.poll() is None]

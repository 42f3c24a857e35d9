"""Helpers of the privileged test suite: read real kernel state, run the CLI, poll.

Everything here only READS the machine (``ip netns list``, ``ip -o link``,
``/proc``) or runs ``dpemu``; nothing deletes by pattern. Tests remove only the
objects they created themselves, by name or pid.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

from emulator.registry import STATE_DIR, proc_start_time, proc_stat

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent if (Path(sys.executable).parent / "dpemu").exists() else REPO / ".venv" / "bin"
DPEMU = str(VENV_BIN / "dpemu")
PYTHON = str(VENV_BIN / "python")
MANIFEST = STATE_DIR / "manifest.json"
LOCK = STATE_DIR / "lock"
PREFIX = "dp-"
PROC_MARKERS = ("traffic.iperf", "traffic.driver", "traffic.collectives", "-m daemons.", "mininet:")


# -- kernel state -------------------------------------------------------------
def sh(argv: list[str], check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"`{' '.join(argv)}` exited {res.returncode}: {res.stderr.strip()}")
    return res


def netns_names() -> set[str]:
    """Names `ip netns list` prints (first word of each line)."""
    out = sh(["ip", "netns", "list"]).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def link_names(*extra: str, netns: str | None = None) -> set[str]:
    """Interface names of `ip -o link [extra...]` in the root namespace (or `netns`)."""
    argv = ["ip"] + (["-n", netns] if netns else []) + ["-o", "link", "show", *extra]
    out = sh(argv).stdout
    names = set()
    for line in out.splitlines():
        parts = line.split(":", 2)
        if len(parts) >= 2:
            names.add(parts[1].strip().split("@")[0])
    return names


def class_bytes(dev: str, classid: str = "1:1", netns: str | None = None) -> int | None:
    """Bytes an HTB class has sent (`tc -s class show`), None if the class or device is not there."""
    argv = ["tc"] + (["-n", netns] if netns else []) + ["-s", "class", "show", "dev", dev]
    res = sh(argv, check=False)
    m = re.search(rf"^class htb {re.escape(classid)} .*?\n\s*Sent (\d+) bytes", res.stdout, re.M)
    return int(m.group(1)) if m else None


def proc_ppid(pid: int) -> int | None:
    fields = proc_stat(pid)
    return int(fields[1]) if fields else None


def marked_procs() -> dict[tuple[int, int], str]:
    """{(pid, start time): argv} of live processes whose argv holds "traffic.iperf" or "mininet:"."""
    found = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            argv = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if any(m in argv for m in PROC_MARKERS):
            start = proc_start_time(int(d.name))
            if start is not None:
                found[(int(d.name), start)] = argv
    return found


def alive(pid: int, start: int) -> bool:
    """True if `pid` still is the process that started at `start` (and is not a zombie)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return int(fields[19]) == start and fields[0] != "Z"


def iperf_children(ppid: int) -> dict[tuple[int, int], str]:
    """The traffic.iperf processes whose parent is `ppid` (a dpemu run)."""
    return {k: v for k, v in marked_procs().items() if "traffic.iperf" in v and proc_ppid(k[0]) == ppid}


def snapshot() -> dict[str, set]:
    return {
        "netns": netns_names(),
        "links": link_names(),
        "procs": set(marked_procs()),
        "manifest": {str(MANIFEST)} if MANIFEST.exists() else set(),
    }


def leftovers() -> dict[str, object]:
    """Everything of dpemu's that is on the machine now (all empty when clean)."""
    return {
        "netns": sorted(n for n in netns_names() if n.startswith(PREFIX)),
        "links": sorted(n for n in link_names() if n.startswith(PREFIX)),
        "procs": sorted(f"{pid}: {argv}" for (pid, _), argv in marked_procs().items()),
        "manifest": MANIFEST.exists(),
    }


def assert_nothing_left(what: str = "") -> None:
    left = leftovers()
    assert left == {"netns": [], "links": [], "procs": [], "manifest": False}, \
        f"dpemu objects left behind{' ' + what if what else ''}: {left}"


# -- running dpemu --------------------------------------------------------------
def dpemu_env(**extra: str) -> dict[str, str]:
    # no inherited fault injection, and rich's default 80 columns whatever terminal runs pytest
    env = {k: v for k, v in os.environ.items() if k not in ("DPEMU_FAULT", "COLUMNS", "LINES")}
    env.update(extra)
    return env


def run_dpemu(*args: str, timeout: float = 120, env: dict | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
    t0 = time.monotonic()
    res = subprocess.run([DPEMU, *args], capture_output=True, text=True, timeout=timeout,
                         env=env or dpemu_env(), cwd=cwd)
    print(f"\n$ dpemu {' '.join(args)}  -> exit {res.returncode} in {time.monotonic() - t0:.1f}s")
    return res


def describe(res: subprocess.CompletedProcess) -> str:
    return f"exit {res.returncode}\n--- stdout ---\n{res.stdout}\n--- stderr ---\n{res.stderr}"


class Background:
    """`dpemu ...` started with Popen, output to files (no pipe can fill up)."""

    def __init__(self, tmp: Path, *args: str, env: dict | None = None):
        self.out_path, self.err_path = tmp / "dpemu.stdout", tmp / "dpemu.stderr"
        self._out, self._err = open(self.out_path, "w"), open(self.err_path, "w")
        self.proc = subprocess.Popen([DPEMU, *args], stdout=self._out, stderr=self._err, env=env or dpemu_env(),
                                     cwd=REPO, start_new_session=True)
        self.pid = self.proc.pid

    def output(self) -> str:
        self._out.flush()
        self._err.flush()
        return (f"--- stdout ---\n{self.out_path.read_text()}\n--- stderr ---\n{self.err_path.read_text()}")

    @property
    def stderr(self) -> str:
        self._err.flush()
        return self.err_path.read_text()

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"dpemu (pid {self.pid}) did not exit within {timeout:g}s\n{self.output()}") from None

    def close(self) -> None:
        """Never leave the run behind if a test fails half-way (SIGKILL it; its pid only)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._out.close()
        self._err.close()


def wait_for(predicate, timeout: float, what: str, run: Background | None = None, period: float = 0.05):
    """Poll `predicate` until it returns something truthy; fail after `timeout` seconds.

    If `run` is given, fail at once when that dpemu process exits first."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if run is not None and run.proc.poll() is not None:
            raise AssertionError(f"dpemu exited ({run.proc.returncode}) before {what}\n{run.output()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}"
                                 + (f"\n{run.output()}" if run else ""))
        time.sleep(period)

"""Which cluster is live on this machine right now, for the commands that look at one from outside.

A ``dpemu up`` (and a ``dpemu run``, while it runs) writes ``/run/dpemu/live.json`` once its cluster is built:
who owns it (pid and start time, so a recycled pid is never taken for it), its resolved scenario, its run
directory and, for ``up``, the Unix socket where it takes loads. ``dpemu top``, ``exec``, ``load`` and ``down``
read it; the owner removes it when it tears down, and ``dpemu clean`` removes one that a killed owner left.

The file holds no copy of the cluster: a reader rebuilds the plan from the scenario the owner resolved
(``plan()``), the same pure function the owner built from, so names, addresses and rates cannot disagree.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from emulator.errors import DpemuError
from emulator.registry import STATE_DIR, proc_start_time, proc_stat

LIVE_FILE = "live.json"
SOCKET_FILE = "control.sock"


class NoCluster(DpemuError):
    """No dpemu cluster is live on this machine."""


@dataclass(frozen=True)
class LiveCluster:
    kind: str                 # "up" (a live cluster that waits for loads) | "run" (a dpemu run, while it runs)
    run_id: str
    owner_pid: int
    owner_start: int          # /proc/<pid>/stat start time of the owner, in clock ticks
    scenario_file: str        # the resolved scenario.yaml in the run directory
    run_dir: str
    socket: str | None        # where `dpemu load` reaches an `up` (None for a run)
    started_at: float         # time.time() when the cluster was ready

    def alive(self) -> bool:
        """The owner still runs: same pid and start time, and not a zombie (an owner that has exited but that
        its parent, e.g. a tmux server, has not reaped yet has ended: it holds nothing any more)."""
        fields = proc_stat(self.owner_pid)
        return proc_start_time(self.owner_pid) == self.owner_start and fields is not None and fields[0] != "Z"

    def plan(self):
        """The plan the owner built (scenario resolved by the owner, planned again here)."""
        from .plan import make_plan
        from .schema import load
        return make_plan(load(self.scenario_file))


def path(state_dir: Path = STATE_DIR) -> Path:
    return state_dir / LIVE_FILE


def socket_path(state_dir: Path = STATE_DIR) -> Path:
    return state_dir / SOCKET_FILE


def publish(kind: str, run_id: str, run_dir: Path, socket: Path | None, started_at: float,
            state_dir: Path = STATE_DIR) -> LiveCluster:
    """Say that this process's cluster is live (call with the registry's lock held)."""
    pid = os.getpid()
    live = LiveCluster(kind, run_id, pid, proc_start_time(pid) or 0, str(run_dir / "scenario.yaml"), str(run_dir),
                       None if socket is None else str(socket), started_at)
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = path(state_dir).with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(live), indent=1))
    tmp.replace(path(state_dir))
    return live


def withdraw(state_dir: Path = STATE_DIR) -> None:
    """The cluster is going away: remove the live file and the load socket."""
    path(state_dir).unlink(missing_ok=True)
    socket_path(state_dir).unlink(missing_ok=True)


def current(state_dir: Path = STATE_DIR) -> LiveCluster | None:
    """The live cluster, or None: no file, an unreadable one, or one whose owner is gone (a killed owner's)."""
    try:
        live = LiveCluster(**json.loads(path(state_dir).read_text()))
    except (OSError, ValueError, TypeError):
        return None
    return live if live.alive() else None


def require(kind: str | None = None, state_dir: Path = STATE_DIR) -> LiveCluster:
    """The live cluster (of `kind`, if given), or NoCluster saying what to do."""
    live = current(state_dir)
    if live is None:
        raise NoCluster("no dpemu cluster is live on this machine: start one with `sudo dpemu up SCENARIO` "
                        "(or watch a `dpemu run` while it runs)")
    if kind is not None and live.kind != kind:
        raise NoCluster(f"the live cluster is a `dpemu {live.kind}` (pid {live.owner_pid}), not a `dpemu {kind}`")
    return live

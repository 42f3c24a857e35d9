"""Small, named operations on kernel objects: list, delete, kill - by name or pid.

Everything here acts only on the names or pids it is given; callers pass only
names that carry the project prefix (see :mod:`emulator.names`) or pids they
started. There is deliberately no "delete everything that looks like X" here
except :func:`owned_root_objects`, which matches the exact prefix grammar.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from pyroute2 import IPRoute

from .names import is_owned
from .registry import proc_start_time

NETNS_DIR = Path("/run/netns")


def run_argv(argv: list[str], check: bool = True) -> subprocess.CompletedProcess:
    """Run a short command (argv list, never a shell string) and capture its output."""
    return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=30)


def list_netns() -> list[str]:
    try:
        return sorted(p.name for p in NETNS_DIR.iterdir())
    except FileNotFoundError:
        return []


def root_link_names() -> list[str]:
    with IPRoute() as ipr:
        return sorted(link.get_attr("IFLA_IFNAME") for link in ipr.get_links())


def owned_root_objects() -> dict[str, list[str]]:
    """Objects in the root namespace whose names match our prefix grammar."""
    return {
        "netns": [n for n in list_netns() if is_owned(n)],
        "links": [n for n in root_link_names() if is_owned(n)],
    }


def netns_pids(name: str) -> list[int]:
    res = run_argv(["ip", "netns", "pids", name], check=False)
    return [int(x) for x in res.stdout.split() if x.isdigit()]


def kill_pid(pid: int, start_time: int | None = None, grace_s: float = 2.0) -> None:
    """SIGTERM, wait up to `grace_s`, then SIGKILL; skip a recycled pid."""
    if start_time is not None and proc_start_time(pid) != start_time:
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if proc_start_time(pid) is None or _is_zombie(pid):
            return
        time.sleep(0.02)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def delete_netns(name: str) -> None:
    """Kill what runs inside namespace `name` (it is ours), then remove its name."""
    for pid in netns_pids(name):
        kill_pid(pid, grace_s=1.0)
    if (NETNS_DIR / name).exists():
        run_argv(["ip", "netns", "delete", name], check=False)


def delete_links(names: list[str], grace_s: float = 1.0, wait_s: float = 5.0) -> list[str]:
    """Delete root-namespace links by name; return those still present at the end.

    A veth whose peer sat in a namespace that just died disappears on its own a
    moment later (the kernel frees namespaces asynchronously): we give it
    `grace_s` before deleting what is left explicitly.
    """
    wanted = set(names)
    start = time.monotonic()
    with IPRoute() as ipr:
        while True:
            present = [n for n in root_link_names() if n in wanted]
            elapsed = time.monotonic() - start
            if not present or elapsed > wait_s:
                return present
            if elapsed >= grace_s:
                for n in present:
                    for idx in ipr.link_lookup(ifname=n):
                        try:
                            ipr.link("del", index=idx)
                        except Exception:  # noqa: BLE001 - gone meanwhile; re-checked next turn
                            pass
            time.sleep(0.05)

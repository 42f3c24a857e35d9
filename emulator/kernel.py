"""Small, named operations on kernel objects: list, delete, kill - by name or pid.

Everything here acts only on the names or pids it is given; callers pass only
names that carry the project prefix (see :mod:`emulator.names`) or pids they
started. There is deliberately no "delete everything that looks like X" here
except :func:`owned_root_objects`, which matches the exact prefix grammar.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

from pyroute2 import IPRoute

from .names import is_owned
from .registry import proc_start_time, proc_stat

NETNS_DIR = Path("/run/netns")
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


@contextmanager
def thread_in_netns(name: str):
    """Move the CALLING THREAD (setns is per thread) into namespace `name`, then back."""
    with open("/proc/thread-self/ns/net") as home, open(NETNS_DIR / name) as target:
        if _libc.setns(target.fileno(), _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {name}: {os.strerror(err)}")
        try:
            yield
        finally:
            if _libc.setns(home.fileno(), _CLONE_NEWNET) != 0:  # pragma: no cover - cannot really fail
                raise OSError(ctypes.get_errno(), "setns back to the original namespace failed")


def netlink(netns: str | None) -> IPRoute:
    """An rtnetlink socket bound to namespace `netns` (None: root).

    pyroute2's own ``IPRoute(netns=...)`` forks a helper process to open the
    socket; forking a process that runs sampler threads can deadlock the child
    (seen here: a hang in about one run out of three). A socket belongs to the
    namespace of the thread that opened it, so we open it from this thread,
    briefly moved into `netns`, with no fork at all.
    """
    if netns is None:
        return IPRoute()
    with thread_in_netns(netns):
        return IPRoute()


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


def kill_pids(pids: list[tuple[int, int | None]], grace_s: float = 2.0) -> None:
    """SIGTERM all of (pid, start time), wait up to `grace_s` for all, SIGKILL the rest.

    A pid whose start time no longer matches was recycled: it is not ours and is
    left alone. (An interactive shell ignores SIGTERM; it gets the SIGKILL.)
    """
    mine = [pid for pid, start in pids if start is None or proc_start_time(pid) == start]
    for pid in mine:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    while mine and time.monotonic() < deadline:
        mine = [pid for pid in mine if proc_start_time(pid) is not None and not _is_zombie(pid)]
        if mine:
            time.sleep(0.02)
    for pid in mine:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _is_zombie(pid: int) -> bool:
    fields = proc_stat(pid)
    return fields is None or fields[0] == "Z"


def delete_netns(name: str) -> None:
    """Kill what runs inside namespace `name` (it is ours), then remove its name."""
    kill_pids([(pid, proc_start_time(pid)) for pid in netns_pids(name)], grace_s=0.5)
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


def set_link_state(netns: str | None, dev: str, up: bool) -> None:
    """Bring interface `dev` of `netns` up or down (the link's qdiscs and addresses stay; its connected routes
    come back with it)."""
    ipr = netlink(netns)
    try:
        (index,) = ipr.link_lookup(ifname=dev)
        ipr.link("set", index=index, state="up" if up else "down")
    finally:
        ipr.close()

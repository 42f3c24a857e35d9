"""What this machine has: root, Mininet, iperf3, iproute2, and the kernel's qdiscs.

``dpemu check`` prints every item; ``dpemu run`` requires them and stops with a
one-line message naming what is missing. The qdisc probe builds a throwaway
namespace ``dp-check`` and removes it again.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass

from emulator import kernel
from emulator.errors import PlatformError

PROBE_NS = "dp-check"


@dataclass
class Item:
    name: str
    ok: bool | None  # None: could not be checked (needs root)
    detail: str


def require_root() -> None:
    if os.geteuid() != 0:
        raise PlatformError("dpemu needs root to build namespaces and shape links: use sudo")


def _mininet() -> Item:
    try:
        import mininet.net  # noqa: F401
    except ImportError:
        return Item("mininet", False, "Python package not importable (apt-get install mininet; "
                                      "the venv must be made with --system-site-packages)")
    if not shutil.which("mnexec"):
        return Item("mininet", False, "mnexec not on PATH (apt-get install mininet)")
    import mininet
    from mininet.net import VERSION

    return Item("mininet", True, f"{VERSION} ({os.path.dirname(mininet.__file__)})")


def _iperf3() -> Item:
    try:
        import iperf3

        version = iperf3.Client().iperf_version
    except Exception as exc:  # noqa: BLE001 - any failure means "not usable"
        return Item("iperf3", False, f"libiperf not usable through the Python wrapper: {exc} "
                                     "(apt-get install iperf3; pip install iperf3)")
    return Item("iperf3", True, version)


def _iproute() -> Item:
    if not shutil.which("ip"):
        return Item("iproute2", False, "`ip` not found (apt-get install iproute2)")
    out = subprocess.run(["ip", "-V"], capture_output=True, text=True).stdout.strip()
    return Item("iproute2", True, out)


def _qdiscs() -> Item:
    if os.geteuid() != 0:
        return Item("kernel qdiscs", None, "htb, bfifo, u32: not checked (needs root)")
    kernel.delete_netns(PROBE_NS)
    try:
        steps = [
            ["ip", "netns", "add", PROBE_NS],
            ["ip", "-n", PROBE_NS, "link", "add", "dp-c0", "type", "veth", "peer", "name", "dp-c1"],
            ["tc", "-n", PROBE_NS, "qdisc", "add", "dev", "dp-c0", "root", "handle", "1:", "htb", "default", "10"],
            ["tc", "-n", PROBE_NS, "class", "add", "dev", "dp-c0", "parent", "1:", "classid", "1:10",
             "htb", "rate", "10Mbit"],
            ["tc", "-n", PROBE_NS, "qdisc", "add", "dev", "dp-c0", "parent", "1:10", "bfifo", "limit", "100000"],
            ["tc", "-n", PROBE_NS, "filter", "add", "dev", "dp-c0", "parent", "1:", "protocol", "ip", "u32",
             "match", "ip", "dsfield", "0x28", "0xfc", "flowid", "1:10"],
        ]
        for argv in steps:
            res = subprocess.run(argv, capture_output=True, text=True)
            if res.returncode != 0:
                return Item("kernel qdiscs", False, f"`{' '.join(argv[3:6])}...` failed: {res.stderr.strip()}")
        return Item("kernel qdiscs", True, "htb, bfifo, u32 (dsfield) work")
    finally:
        kernel.delete_netns(PROBE_NS)


def check() -> list[Item]:
    root = os.geteuid() == 0
    return [Item("root", root, "yes" if root else "not root: `sudo dpemu ...`"),
            Item("cpus", os.cpu_count() >= 2, f"{os.cpu_count()} (the limits in emulator/fidelity.py "
                                               "were measured on 2)"),
            _mininet(), _iperf3(), _iproute(), _qdiscs(), _servers()]


def _servers() -> Item:
    """What a run over several servers needs here: Cluster Edition, ssh, and sshd for the testbed."""
    try:
        import mininet.examples.cluster  # noqa: F401 - importable on Debian 12's Python 3.11 (it uses distutils)
    except Exception as exc:  # noqa: BLE001 - any import failure means the same to the user
        return Item("servers", None, f"Mininet's Cluster Edition not importable ({exc}): runs stay on one machine")
    missing = [t for t in ("ssh", "/usr/sbin/sshd") if shutil.which(t) is None]
    if missing:
        return Item("servers", None, f"{', '.join(missing)} missing (apt-get install openssh-client "
                                     "openssh-server): no runs over several servers, no testbed")
    return Item("servers", True, "Cluster Edition, ssh and sshd (runs over several servers, the testbed)")


def require_tools() -> None:
    missing = [f"{i.name}: {i.detail}" for i in (_mininet(), _iperf3(), _iproute()) if not i.ok]
    if missing:
        raise PlatformError("this machine lacks what a run needs: " + "; ".join(missing))

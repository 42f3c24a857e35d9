"""Build a :class:`~emulator.spec.NetSpec` with Mininet, shape it, tear it down.

Mininet builds hosts (network namespaces held by a shell) and veth links;
switches are Linux bridges (no controller, no Open vSwitch, STP off). We do NOT
use Mininet's TCLink: it refuses rates above 1 Gbit/s and silently leaves such
links unshaped. Instead every link is shaped at both ends by the HTB plan of
:meth:`NetSpec.tc_ops`, applied through pyroute2.

Each host namespace is also given a name (``ip netns``) with the project prefix,
so users can look inside (``ip netns exec dp-pe1 tc -s class show dev pe1-snic``)
and cleanup can find it after a crash. Teardown is ours, not Mininet's
``net.stop()``: it kills exactly the processes of the run, drops the named
namespaces (which destroys their veths), deletes the bridges, and then checks
that none of the run's names is left.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from pyroute2 import IPRoute

from . import kernel
from .errors import PlatformError
from .procs import ProcessGroup
from .registry import Registry
from .spec import NetSpec
from .dequeue import DequeueMonitor, Watched, remove_instance
from .tcplan import apply as apply_tc, gso_limits

log = logging.getLogger(__name__)
_TCP_RMEM_DEFAULT = Path("/proc/sys/net/ipv4/tcp_rmem").read_text().strip().replace("\t", " ") \
    if Path("/proc/sys/net/ipv4/tcp_rmem").exists() else "4096 131072 6291456"  # new namespaces copy the root's


def _mininet():
    """Import Mininet lazily: `dpemu plan` and unit tests must work without it."""
    try:
        from mininet.log import setLogLevel
        from mininet.net import Mininet
        from mininet.node import Host, Switch
        from mininet.topo import Topo
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise PlatformError("Mininet is not importable; run `sudo make run` to install it") from exc
    return Mininet, Host, Switch, Topo, setLogLevel


def _bridge_class(Switch):
    class Bridge(Switch):
        """A plain Linux bridge made through netlink (no brctl, no shell strings)."""

        def start(self, _controllers) -> None:
            with IPRoute() as ipr:
                ipr.link("add", ifname=self.name, kind="bridge", br_stp_state=0)
                (br,) = ipr.link_lookup(ifname=self.name)
                for intf in self.intfList():
                    if intf.name == "lo":
                        continue
                    (idx,) = ipr.link_lookup(ifname=intf.name)
                    ipr.link("set", index=idx, master=br)
                    ipr.link("set", index=idx, state="up")
                ipr.link("set", index=br, state="up")

        def stop(self, deleteIntfs: bool = True) -> None:  # noqa: N803 - Mininet's name
            pass  # Emulation.teardown owns deletion

        def connected(self) -> bool:
            return True

    return Bridge


class Emulation:
    """One built network. Create, :meth:`build`, use, and always :meth:`teardown`."""

    def __init__(self, spec: NetSpec, registry: Registry, run_id: str):
        spec.validate()
        self.spec = spec
        self.registry = registry
        self.run_id = run_id
        self.procs = ProcessGroup(on_start=registry.add_proc)
        self._monitors: list[DequeueMonitor] = []
        self._net = None
        self._iprs: dict[str | None, IPRoute] = {}
        self.build_s: float | None = None
        self.teardown_s: float | None = None

    # -- build ---------------------------------------------------------------
    def build(self) -> None:
        t0 = time.monotonic()
        self.registry.begin(self.run_id, [h.netns for h in self.spec.hosts],
                            [s.bridge for s in self.spec.switches] + [c.switch_intf for c in self.spec.cables()])
        Mininet, Host, Switch, Topo, setLogLevel = _mininet()
        setLogLevel("error")
        spec = self.spec

        class _Topo(Topo):
            def build(self) -> None:  # noqa: D102 - Mininet's hook
                for h in spec.hosts:
                    self.addHost(h.name, ip=None)  # addresses are per link, below
                for i, s in enumerate(spec.switches, start=1):
                    self.addSwitch(s.bridge, dpid=f"{i:016x}")
                for lk in spec.cables():
                    self.addLink(lk.host, spec.switch(lk.switch).bridge, intfName1=lk.host_intf,
                                 intfName2=lk.switch_intf, params1={"ip": lk.ip})

        self._net = Mininet(topo=_Topo(), switch=_bridge_class(Switch), host=Host, controller=None,
                            autoSetMacs=False, autoStaticArp=False, build=False, waitConnected=False)
        self._net.build()
        for h in spec.hosts:  # name the namespaces before anything else can fail
            node = self._net.get(h.name)
            self.registry.add_proc(node.pid)
            kernel.run_argv(["ip", "netns", "attach", h.netns, str(node.pid)])
        for sw in self._net.switches:
            self.registry.add_proc(sw.pid)
        self._net.start()
        self._sysctls()
        self._gso_caps()
        for op_ns, ops in self._ops_by_ns().items():
            apply_tc(self.ipr(op_ns), ops)
        self.build_s = time.monotonic() - t0

    def _gso_caps(self) -> None:
        """Cap GSO/TSO skbs at both ends of every link that asks (``LinkSpec.skb_segs``): HTB never splits a skb
        it started, so a 64 KiB skb holds a 20 Mbit/s port for 26 ms and every packet behind it waits."""
        for lk in self.spec.links:
            if lk.skb_segs is None:
                continue
            size, segs = gso_limits(lk.skb_segs)
            for netns, dev in self.spec.ends(lk):
                ipr = self.ipr(netns)
                (idx,) = ipr.link_lookup(ifname=dev)
                ipr.link("set", index=idx, gso_max_size=size, gso_max_segs=segs)

    def reshape(self, spec: NetSpec) -> int:
        """Re-shape the built network to `spec` (same hosts, switches and links; other tc plans, e.g. traffic
        classes on or off): each interface whose plan differs gets its root qdisc replaced. Returns how many
        interfaces changed."""
        def by_dev(net: NetSpec) -> dict[tuple[str | None, str], list]:
            out: dict[tuple[str | None, str], list] = {}
            for op in net.tc_ops():
                out.setdefault((op.netns, op.dev), []).append(op)
            return out

        if spec.root_objects() != self.spec.root_objects():
            raise ValueError("reshape needs the same hosts, switches and links")
        old, new = by_dev(self.spec), by_dev(spec)
        changed = [end for end in new if new[end] != old.get(end)]
        for netns, dev in changed:
            ipr = self.ipr(netns)
            (idx,) = ipr.link_lookup(ifname=dev)
            ipr.tc("del", index=idx, handle=0x10000, parent=0xFFFFFFFF)  # the root qdisc, its classes, filters
            apply_tc(ipr, new[(netns, dev)])
        self.spec = spec
        return len(changed)

    def _ops_by_ns(self):
        grouped: dict[str | None, list] = {}
        for op in self.spec.tc_ops():
            grouped.setdefault(op.netns, []).append(op)
        return grouped

    def _sysctls(self) -> None:
        """No IPv6 on our interfaces (no router solicitations or MLD in the
        counters) and the spec's TCP congestion control in every host."""
        for h in self.spec.hosts:
            kernel.run_argv(["ip", "netns", "exec", h.netns, "sysctl", "-q", "-w",
                             "net.ipv6.conf.all.disable_ipv6=1",
                             f"net.ipv4.tcp_congestion_control={self.spec.tcp_cc}"])

    def lossless_tcp(self, on: bool) -> None:
        """On: every host of a lossless switch gets a fixed TCP receive buffer (``NetSpec.default_rcvbuf_bytes``,
        receive autotuning off), so the windows its peers may fill never overflow its ports: a loss-based TCP
        behaves as on a credit-based fabric. Off: the kernel's defaults again (what calibration measures with:
        one bulk flow per direction needs a window larger than a port's share). Sockets opened afterwards get
        it. (Route metrics cannot do this here: a locked ``cwnd`` applies only once the kernel has cached
        metrics for the peer, and receive autotuning lifts a route's ``window`` clamp.)"""
        for h in self.spec.hosts:
            rcvbuf = self.spec.default_rcvbuf_bytes(h.name)
            if rcvbuf is None:
                continue
            rmem, moderate = (f"4096 {rcvbuf} {rcvbuf}", 0) if on else (_TCP_RMEM_DEFAULT, 1)
            kernel.run_argv(["ip", "netns", "exec", h.netns, "sysctl", "-q", "-w", f"net.ipv4.tcp_rmem={rmem}",
                             f"net.ipv4.tcp_moderate_rcvbuf={moderate}"])
        for name in [s.bridge for s in self.spec.switches] + [c.switch_intf for c in self.spec.cables()]:
            path = Path(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6")
            if path.exists():
                path.write_text("1")

    def ipr(self, netns: str | None) -> IPRoute:
        """A netlink socket in `netns` (None: root), kept open for the run."""
        if netns not in self._iprs:
            self._iprs[netns] = kernel.netlink(netns)
        return self._iprs[netns]

    def dequeue_monitor(self, watched: list[Watched], on_s: float, off_s: float) -> DequeueMonitor:
        """A started dequeue-timing monitor of this emulation's interfaces; stop it with its ``stop()``, or
        teardown stops it (a run interrupted while tracing leaves no tracefs instance behind)."""
        mon = DequeueMonitor(watched, on_s=on_s, off_s=off_s)
        self._monitors.append(mon)
        mon.start()
        return mon

    # -- teardown ------------------------------------------------------------
    def teardown(self) -> list[str]:
        """Remove everything this run created; return what could not be removed."""
        t0 = time.monotonic()
        left_tracing = []
        for mon in self._monitors:
            mon.stop()
        try:
            remove_instance()
        except OSError as exc:
            left_tracing.append(f"tracefs instance ({exc})")
        self.procs.stop_all()
        for ipr in self._iprs.values():
            ipr.close()
        self._iprs.clear()
        inside = [pid for h in self.spec.hosts for pid in kernel.netns_pids(h.netns)]
        kernel.kill_pids([(pid, kernel.proc_start_time(pid)) for pid in inside], grace_s=0.5)
        for h in self.spec.hosts:
            kernel.delete_netns(h.netns)
        if self._net is not None:
            for node in self._net.hosts + self._net.switches:
                node.terminate()
        bridges = [s.bridge for s in self.spec.switches]
        kernel.delete_links(bridges, grace_s=0)
        left = kernel.delete_links([c.switch_intf for c in self.spec.cables()])
        left += [n for n in kernel.list_netns() if n in {h.netns for h in self.spec.hosts}]
        left += [n for n in kernel.root_link_names() if n in set(bridges)]
        left += left_tracing
        if not left:
            self.registry.end()
        self.teardown_s = time.monotonic() - t0
        return left

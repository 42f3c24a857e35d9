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
from dataclasses import asdict
from pathlib import Path

from pyroute2 import IPRoute

from . import kernel
from .errors import PlatformError
from .procs import ProcessGroup
from .registry import Registry
from .spec import NetSpec
from .monitor import CpuSampler, TcSampler
from .dequeue import DequeueMonitor, Watched, remove_instance
from .tcplan import apply as apply_tc, gso_limits
from . import cluster_edition
from .spread import Spread, as_dicts

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

    def __init__(self, spec: NetSpec, registry: Registry, run_id: str, log_dir: Path | None = None):
        spec.validate()
        self.spec = spec
        self.registry = registry
        self.run_id = run_id
        # several servers: the remote half (agents, tunnels); processes in its namespaces start there over ssh
        self.spread = Spread(spec, run_id, log_dir) if len(spec.servers) > 1 else None
        self.procs = ProcessGroup(on_start=registry.add_proc, remote=spec.remote_of if self.spread else None)
        self._monitors: list[DequeueMonitor] = []
        self._net = None
        self._iprs: dict[str | None, IPRoute] = {}
        self.build_s: float | None = None
        self.teardown_s: float | None = None

    # -- build ---------------------------------------------------------------
    def build(self) -> None:
        t0 = time.monotonic()
        spec = self.spec
        here = spec.servers[0].name if self.spread else None
        netns, links = spec.objects_on(here)
        self.registry.begin(self.run_id, netns, links, as_dicts(spec.servers[1:]) if self.spread else None)
        if self.spread:
            self.spread.start()
        Mininet, Host, Switch, Topo, setLogLevel = _mininet()
        setLogLevel("error")
        where: dict[str, dict] = {}
        tunnels = {}
        if self.spread:
            Mininet, Host, bridge, link, placer, _ = cluster_edition.classes(self.spread.make_tunnel,
                                                                             _bridge_class(Switch))
            for node in [h.name for h in spec.hosts] + [s.name for s in spec.switches]:
                srv = spec.server(spec.server_of(node))
                where[node] = {"dp_server": srv, "user": srv.user}
            tunnels = {id(c): self.spread.tunnels[i] for i, c in enumerate(spec.tunnelled())}
        else:
            bridge = _bridge_class(Switch)

        class _Topo(Topo):
            def build(self) -> None:  # noqa: D102 - Mininet's hook
                for h in spec.hosts:
                    self.addHost(h.name, ip=None, **where.get(h.name, {}))  # addresses are per link, below
                for i, s in enumerate(spec.switches, start=1):
                    self.addSwitch(s.bridge, dpid=f"{i:016x}", **where.get(s.name, {}))
                for lk in spec.cables():
                    extra = {"tunnel": tunnels[id(lk)]} if id(lk) in tunnels else {}
                    self.addLink(lk.host, spec.switch(lk.switch).bridge, intfName1=lk.host_intf,
                                 intfName2=lk.switch_intf, params1={"ip": lk.ip}, **extra)

        opts = dict(topo=_Topo(), switch=bridge, host=Host, controller=None, autoSetMacs=False, autoStaticArp=False,
                    build=False, waitConnected=False)
        if self.spread:
            by_bridge = {s.bridge: s.name for s in spec.switches}
            servers = [s.name if s.address else "localhost" for s in spec.servers]
            self._net = Mininet(**opts, link=link, servers=servers,
                                serverIP={"localhost": "127.0.0.1",
                                          **{s.name: s.address for s in spec.servers if s.address}},
                                placement=placer(lambda n: self._ce_server(by_bridge.get(n, n))))
        else:
            self._net = Mininet(**opts)
        self._net.build()
        for h in spec.hosts:  # name the namespaces before anything else can fail
            node = self._net.get(h.name)
            agent = self.spread.agent_of(h.netns) if self.spread else None
            if agent:
                agent.call("attach", netns=h.netns, pid=node.pid)
                self.registry.add_proc(node.shell.pid)  # the local ssh that holds the remote shell
                continue
            self.registry.add_proc(node.pid)
            kernel.run_argv(["ip", "netns", "attach", h.netns, str(node.pid)])
        for sw in self._net.switches:
            self.registry.add_proc(sw.shell.pid if getattr(sw, "isRemote", False) else sw.pid)
        self._net.start()
        if self.spread:
            self._mtus()
        self._sysctls()
        self._gso_caps()
        self._apply(spec.tc_ops())
        self.build_s = time.monotonic() - t0

    def _ce_server(self, node: str) -> str:
        """Cluster Edition's name of the server a node sits on ('localhost': this machine)."""
        srv = self.spec.server(self.spec.server_of(node))
        return "localhost" if srv.local else srv.name

    def _by_server(self, items, netns_dev) -> tuple[list, dict[str, list]]:
        """Split `items` into this machine's and each remote server's, by the (netns, dev) `netns_dev` gives."""
        local: list = []
        remote: dict[str, list] = {}
        for it in items:
            srv = self.spec.remote_of(*netns_dev(it)) if self.spread else None
            (local if srv is None else remote.setdefault(srv.name, [])).append(it)
        return local, remote

    def _apply(self, ops, replace: bool = False) -> None:
        """tc ops on the servers that hold their devices (`replace`: each device's root qdisc goes first)."""
        local, remote = self._by_server(ops, lambda op: (op.netns, op.dev))
        if self.spread:
            self.spread.each("tc", {n: {"ops": [asdict(op) for op in group], "replace": replace}
                                    for n, group in remote.items()})
        grouped: dict[str | None, list] = {}
        for op in local:
            grouped.setdefault(op.netns, []).append(op)
        for op_ns, group in grouped.items():
            apply_tc(self.ipr(op_ns), group, replace)

    def _mtus(self) -> None:
        """Every interface of a network with tunnels takes the tunnels' MTU (a bridge drops a frame larger than
        a port's MTU, so a segment has one MTU)."""
        ends = [(self.spec.host(c.host).netns, c.host_intf) for c in self.spec.cables()] + \
            [(None, c.switch_intf) for c in self.spec.cables()]
        local, remote = self._by_server(ends, lambda e: e)
        mtu = self.spread.mtu
        self.spread.each("mtu", {n: {"items": [[ns, dev, mtu] for ns, dev in group]} for n, group in remote.items()})
        for netns, dev in local:
            ipr = self.ipr(netns)
            (idx,) = ipr.link_lookup(ifname=dev)
            ipr.link("set", index=idx, mtu=mtu)

    def _gso_caps(self) -> None:
        """Cap GSO/TSO skbs at both ends of every link that asks (``LinkSpec.skb_segs``): HTB never splits a skb
        it started, so a 64 KiB skb holds a 20 Mbit/s port for 26 ms and every packet behind it waits."""
        ends = [(netns, dev, *gso_limits(lk.skb_segs)) for lk in self.spec.links if lk.skb_segs is not None
                for netns, dev in self.spec.ends(lk)]
        local, remote = self._by_server(ends, lambda e: (e[0], e[1]))
        if self.spread:
            self.spread.each("gso", {n: {"items": [list(e) for e in group]} for n, group in remote.items()})
        for netns, dev, size, segs in local:
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
        self._apply([op for end in changed for op in new[end]], replace=True)
        self.spec = spec
        return len(changed)

    def _sysctls(self) -> None:
        """No IPv6 on our interfaces (no router solicitations or MLD in the
        counters) and the spec's TCP congestion control in every host."""
        self._sysctl([(h.netns, ["net.ipv6.conf.all.disable_ipv6=1",
                                 f"net.ipv4.tcp_congestion_control={self.spec.tcp_cc}"]) for h in self.spec.hosts])

    def _sysctl(self, settings: list[tuple[str, list[str]]]) -> None:
        """(host namespace, ["key=value", ...]) on the servers that hold them."""
        local, remote = self._by_server(settings, lambda st: (st[0], None))
        if self.spread:
            for name, group in remote.items():
                for netns, kv in group:
                    self.spread.agents[name].call("sysctl", netns=netns, settings=kv)
        for netns, kv in local:
            kernel.run_argv(["ip", "netns", "exec", netns, "sysctl", "-q", "-w", *kv])

    def lossless_tcp(self, on: bool) -> None:
        """On: every host of a lossless switch gets a fixed TCP receive buffer (``NetSpec.default_rcvbuf_bytes``,
        receive autotuning off), so the windows its peers may fill never overflow its ports: a loss-based TCP
        behaves as on a credit-based fabric. Off: the kernel's defaults again (what calibration measures with:
        one bulk flow per direction needs a window larger than a port's share). Sockets opened afterwards get
        it. (Route metrics cannot do this here: a locked ``cwnd`` applies only once the kernel has cached
        metrics for the peer, and receive autotuning lifts a route's ``window`` clamp.)"""
        settings = []
        for h in self.spec.hosts:
            rcvbuf = self.spec.default_rcvbuf_bytes(h.name)
            if rcvbuf is None:
                continue
            rmem, moderate = (f"4096 {rcvbuf} {rcvbuf}", 0) if on else (_TCP_RMEM_DEFAULT, 1)
            settings.append((h.netns, [f"net.ipv4.tcp_rmem={rmem}", f"net.ipv4.tcp_moderate_rcvbuf={moderate}"]))
        self._sysctl(settings)
        names = [s.bridge for s in self.spec.switches] + [c.switch_intf for c in self.spec.cables()]
        local, remote = self._by_server(names, lambda n: (None, n))
        if self.spread:
            self.spread.each("no_ipv6", {n: {"names": group} for n, group in remote.items()})
        for name in local:
            path = Path(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6")
            if path.exists():
                path.write_text("1")

    def there(self, netns: str | None, argv: list[str], root: Path) -> list[str]:
        """`argv` as it runs in `netns`: on another server, paths under `root` name that server's copy of it."""
        srv = self.spec.remote_of(netns) if self.spread else None
        if srv is None:
            return argv
        return [a.replace(str(root), srv.remote_path(self.run_id, root)) for a in argv]

    def push(self, root: Path) -> None:
        """Copy directory `root` to every other server (before processes there use it)."""
        for srv in (self.spread.remotes if self.spread else []):
            srv.push(self.run_id, root)

    def pull(self, root: Path, exclude: tuple[str, ...] = ()) -> None:
        """Collect every other server's copy of `root` into it."""
        for srv in (self.spread.remotes if self.spread else []):
            srv.pull(self.run_id, root, exclude)

    def cpu_sampler(self):
        """A sampler of the CPU of every server of the run (one machine: a CpuSampler), not started."""
        return self.spread.cpu_sampler() if self.spread else CpuSampler()

    def tc_sampler(self, keys: list, period_s: float = 0.1) -> TcSampler:
        """A counter sampler of `keys` on whichever servers hold them (not started)."""
        return TcSampler(keys, period_s, remote=self._remote_counters if self.spread else None)

    def _remote_counters(self, netns: str | None, dev: str):
        agent = self.spread.agent_of(netns, dev)
        return None if agent is None else (agent, self.spread.clocks[agent.server.name][0]["mono_offset_s"])

    def ipr(self, netns: str | None) -> IPRoute:
        """A netlink socket in `netns` (None: root), kept open for the run."""
        if netns not in self._iprs:
            self._iprs[netns] = kernel.netlink(netns)
        return self._iprs[netns]

    def dequeue_monitor(self, watched: list[Watched], on_s: float, off_s: float) -> DequeueMonitor:
        """A started dequeue-timing monitor of this emulation's interfaces; stop it with its ``stop()``, or
        teardown stops it (a run interrupted while tracing leaves no tracefs instance behind). Interfaces on
        other servers are timed there, by their agents, with the same monitor."""
        local, remote = self._by_server(watched, lambda w: self.spec.end_of(w.dev))
        mon = DequeueMonitor(local, on_s=on_s, off_s=off_s)
        if remote:
            mon = _SpreadMonitor(mon, self.spread, {n: [[w.dev, w.rate_bps, w.group] for w in group]
                                                    for n, group in remote.items()}, on_s, off_s)
        self._monitors.append(mon)
        mon.start()
        return mon

    # -- teardown ------------------------------------------------------------
    def teardown(self) -> list[str]:
        """Remove everything this run created, on every server; return what could not be removed."""
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
        netns, links = self.spec.objects_on(self.spec.servers[0].name if self.spread else None)
        inside = [pid for name in netns for pid in kernel.netns_pids(name)]
        kernel.kill_pids([(pid, kernel.proc_start_time(pid)) for pid in inside], grace_s=0.5)
        for name in netns:
            kernel.delete_netns(name)
        left = self.spread.teardown() if self.spread else []
        if self._net is not None:
            for node in self._net.hosts + self._net.switches:
                node.terminate()
        bridges = [s.bridge for s in self.spec.switches if s.bridge in links]
        kernel.delete_links(bridges, grace_s=0)
        left += kernel.delete_links([n for n in links if n not in bridges])
        left += [n for n in kernel.list_netns() if n in set(netns)]
        left += [n for n in kernel.root_link_names() if n in set(bridges)]
        left += left_tracing
        if not left:
            self.registry.end()
        self.teardown_s = time.monotonic() - t0
        return left


class _SpreadMonitor:
    """Dequeue timing on several servers: this machine's monitor, and each remote server's agent's."""

    def __init__(self, local: DequeueMonitor, spread: Spread, remote: dict[str, list], on_s: float, off_s: float):
        self.local, self.spread, self.remote = local, spread, remote
        self.on_s, self.off_s = on_s, off_s
        self.error: str | None = None
        self._started: list[str] = []

    def start(self) -> None:
        self.local.start()
        for name, problem in self.spread.each("dequeue_start", {n: {"watched": w, "on_s": self.on_s,
                                                                      "off_s": self.off_s}
                                                                 for n, w in self.remote.items()}).items():
            if problem:
                self.error = f"dequeue timing on {name}: {problem}"
            else:
                self._started.append(name)

    def stop(self) -> dict[str, list[float]]:
        errors = {k: list(v) for k, v in self.local.stop().items()}
        self.error = self.error or self.local.error
        started, self._started = self._started, []
        self.spread.add_dequeue(self.spread.spec.servers[0].name, errors)
        for name, res in self.spread.each("dequeue_stop", {n: {} for n in started}).items():
            self.spread.add_dequeue(name, res["errors"])
            for group, errs in res["errors"].items():
                errors.setdefault(group, []).extend(errs)
            if res["error"]:
                self.error = self.error or f"dequeue timing on {name}: {res['error']}"
        return errors

"""One network over several servers, built by Mininet's Cluster Edition (``mininet/examples/cluster.py``).

What Cluster Edition gives, used as it is: :class:`RemoteMixin` (a node whose shell runs on another server,
through ``ssh -tt``: a host's namespace and a switch's root shell there), :class:`RemoteLink` (a veth where
both ends share a server, a tunnel where they do not), the :class:`Placer` interface and
:class:`MininetCluster`'s placement of nodes on servers. What dpemu changes, and why:

- **ssh and sudo**: our options, key and known-hosts file (:meth:`ServerSpec.ssh_argv`), and no ``sudo`` where
  the server's user is root (Cluster Edition always prefixes ``sudo -E``: needless for root, and on a host that
  cannot resolve its own name sudo prints a warning that aborts a build).
- **precheck**: every server is tried, and all failures are named in one error, instead of ``sys.exit``.
- **cleanup**: Cluster Edition registers ``ssh server sudo mn -c`` for every server as a cleanup callback; dpemu
  never removes what it did not create, so that registration is switched off (:func:`_cluster`) and each
  server's agent removes exactly the run's objects (:mod:`emulator.agent`).
- **switches**: a Linux bridge made on its server through the switch node's open shell (``ip link``: 0.3 ms a
  command, where a fresh ``rcmd`` ssh costs 100-300 ms). Upstream's ``LinuxBridge`` needs ``brctl``/``ifconfig``.
- **tunnels**: VXLAN by default, gretap where the kernel has it (this kernel has no GRE, so upstream's
  ``RemoteGRELink`` cannot work; its SSH tunnel hard-codes ``tap9`` and moves every frame through ssh). Both
  ends are made in their server's root namespace (the underlay socket stays there); a host's end then moves
  into the host's namespace. The MTU of every interface of the network is the underlay's less the tunnel's
  header (:data:`emulator.servers.TUNNEL_OVERHEAD`); shaping is applied after the move (a qdisc does not survive
  one), by the same tc plan as any other link.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .errors import PlatformError
from .servers import ServerSpec


def _cluster():
    """Cluster Edition's module, with its ``mn -c`` cleanup registration switched off."""
    try:
        from mininet.examples import cluster
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise PlatformError(f"Mininet's Cluster Edition (mininet.examples.cluster) is not importable: {exc}") from exc
    cluster.ClusterCleanup.add = classmethod(lambda cls, server, user="": None)  # never `ssh server mn -c`
    return cluster


@dataclass(frozen=True)
class Tunnel:
    """One cable that crosses servers: its key (VNI), kind and both ends' underlay facts."""

    index: int
    kind: str  # "vxlan" | "gretap"
    mtu: int
    host_end: dict  # {"server", "local", "remote", "dev", "temp"}
    switch_end: dict  # {"server", "local", "remote", "dev"}


def precheck(servers: list[ServerSpec], timeout_s: float = 20) -> None:
    """Every remote server answers ssh as its user, without a password, as root: all failures in one error."""
    def one(s: ServerSpec) -> str | None:
        try:
            r = subprocess.run([*s.ssh_argv(), "id -u"], capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return f"{s.name} ({s.user}@{s.address}): no answer within {timeout_s:.0f} s"
        if r.returncode != 0:
            return f"{s.name} ({s.user}@{s.address}): ssh failed: {r.stderr.strip()[-200:] or r.returncode}"
        if r.stdout.strip() != "0":
            return f"{s.name}: {s.user} is not root there (dpemu makes namespaces and qdiscs)"
        return None

    remote = [s for s in servers if not s.local]
    with ThreadPoolExecutor(max_workers=max(1, len(remote))) as pool:
        problems = [p for p in pool.map(one, remote) if p]
    if problems:
        raise PlatformError("server precheck failed (see docs/distributed.md for the ssh setup): "
                            + "; ".join(problems))


def classes(make_tunnel: Callable[[Tunnel, int], None], bridge_cls):
    """The Mininet classes of a run over several servers: (Cluster, Host, Bridge, Link, Placer factory).
    `make_tunnel(tunnel, host_pid)` makes both ends of a tunnel (the caller owns the agents); `bridge_cls` is
    dpemu's local bridge, used for bridges on this machine."""
    cluster = _cluster()
    from mininet.link import Link
    from mininet.net import Mininet
    from mininet.node import Host, Switch

    class Ssh(cluster.RemoteMixin):
        """RemoteMixin with dpemu's ssh (see the module's text)."""

        def __init__(self, name, dp_server: ServerSpec | None = None, **kwargs):
            self.dp_server = dp_server
            super().__init__(name, **kwargs)

        def _popen(self, cmd, sudo=True, tt=True, **params):
            if isinstance(cmd, str):
                cmd = cmd.split()
            if self.isRemote:
                ssh = self.dp_server.ssh_argv()
                if tt:
                    ssh = [*ssh[:-1], "-tt", ssh[-1]]
                cmd = [*ssh, *(["sudo", "-E"] if sudo and self.dp_server.user != "root" else []), *cmd]
                # the local ssh dies with dpemu, so the remote shell gets its hangup (Mininet's own start no signal)
                cmd = ["setpriv", "--pdeathsig", "TERM", "--", *cmd]
            params.update(preexec_fn=self._ignoreSignal)
            return super(cluster.RemoteMixin, self)._popen(cmd, **params)  # Node's, past RemoteMixin's sudo

    class DpHost(Ssh, Host):
        """A host on any server."""

    class DpBridge(Ssh, bridge_cls):
        """A Linux bridge on any server: here by netlink (dpemu's bridge), there through the node's shell."""

        def start(self, controllers) -> None:
            if not self.isRemote:
                return super().start(controllers)
            out = self.cmd(f"ip link add name {self.name} type bridge stp_state 0")
            for intf in self.intfList():
                if intf.name != "lo":
                    out += self.cmd(f"ip link set {intf.name} master {self.name} up")
            out += self.cmd(f"ip link set {self.name} up")
            if out.strip():
                raise PlatformError(f"bridge {self.name} on {self.dp_server.name}: {out.strip()[-300:]}")
            return None

    class DpLink(cluster.RemoteLink):
        """A veth where both ends share a server; a tunnel (made by `make_tunnel`) where they do not."""

        def __init__(self, node1, node2, tunnel: Tunnel | None = None, **kwargs):
            self.dp_tunnel = tunnel
            super().__init__(node1, node2, **kwargs)

        def makeIntfPair(self, intfname1, intfname2, addr1=None, addr2=None,  # noqa: N802 - Mininet's name
                         node1=None, node2=None, deleteIntfs=True):  # noqa: N803
            node1, node2 = node1 or self.node1, node2 or self.node2
            if self.dp_tunnel is None:
                return Link.makeIntfPair(intfname1, intfname2, addr1, addr2, node1, node2, deleteIntfs=deleteIntfs)
            make_tunnel(self.dp_tunnel, node1.pid)
            self.tunnel = None  # nothing for RemoteLink.stop to end: teardown removes the ends
            return None

    class Cluster(cluster.MininetCluster):
        """MininetCluster's placement and node set-up; our precheck (already run), no ~/.ssh/mn, no sudo."""

        def __init__(self, *args, servers: list[str], serverIP: dict, placement, **kwargs):  # noqa: N803
            self.servers, self.serverIP, self.user = servers, serverIP, "root"
            self.connections, self.placement = {}, placement
            Mininet.__init__(self, *args, **kwargs)

    def placer(where: Callable[[str], str]):
        class ScenarioPlacer(cluster.Placer):
            """The scenario's own placement rule (NetSpec.placement), through Cluster Edition's interface."""

            def place(self, node):
                return where(node)

        return ScenarioPlacer

    return Cluster, DpHost, DpBridge, DpLink, placer, Switch

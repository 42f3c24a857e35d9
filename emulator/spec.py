"""The emulated network as plain data: hosts, bridges, shaped links.

A :class:`NetSpec` is what :mod:`emulator.net` builds and what ``dpemu plan``
prints. It is generic: a host is a network namespace, a switch is a Linux
bridge, a link is a veth pair from a host to a switch, shaped with HTB in both
directions. Topologies (``topologies/``) produce NetSpecs; nothing here knows
what a prefill node is.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .names import check_ifname, owned
from .servers import ServerSpec
from .tcplan import (SEG_WIRE_BYTES, TcOp, TrafficClass, queue_limit_bytes, shape_ops, skb_segs_for,
                     skb_wire_bytes, window_skb_segs)


def tunnel_temp(i: int) -> str:
    """The owned name tunnel `i`'s host end has in the root namespace, before it moves into the host's."""
    return owned(f"t{i}")


@dataclass(frozen=True)
class HostSpec:
    name: str  # e.g. "pe1"
    role: str  # free-form tag for people and reports ("pe", "de", "st")

    @property
    def netns(self) -> str:
        """The named namespace (``ip netns``) of this host."""
        return owned(self.name)


@dataclass(frozen=True)
class SwitchSpec:
    name: str  # e.g. "rail0"
    fabric: str  # "storage", "compute", ...
    # Lossless (credit-based, like InfiniBand): no port may drop. TCP is loss-based, so the hosts on this switch
    # get a fixed receive buffer (:meth:`NetSpec.rcvbuf_bytes`): every host sending to one port at once still
    # fits its queue, as credits guarantee on a real lossless fabric.
    lossless: bool = False

    @property
    def bridge(self) -> str:
        return owned(self.name)


class _Cable:
    """Names shared by every host-to-switch cable (needs `host`, `nic`, `ip`)."""

    host: str
    nic: str
    ip: str

    @property
    def host_intf(self) -> str:
        """Interface name inside the host namespace (needs no prefix there)."""
        return check_ifname(f"{self.host}-{self.nic}")

    @property
    def switch_intf(self) -> str:
        """The switch side, in the root namespace: carries the project prefix."""
        return owned(f"{self.host}-{self.nic}")

    @property
    def addr(self) -> str:
        return self.ip.split("/")[0]


@dataclass(frozen=True)
class LinkSpec(_Cable):
    """A host NIC cabled to a switch port; `rate_bps` applies in both directions."""

    host: str
    nic: str  # e.g. "snic", "cnic3"
    switch: str
    link_class: str  # what calibration groups by: "snic", "cnic", "stnic"
    rate_bps: float
    ip: str  # host address with prefix length, "10.10.1.1/16"
    queue_s: float  # the queue of each end, as time at the rate (wall seconds)
    traffic_classes: tuple[TrafficClass, ...] = ()  # DSCP classes at both ends (compute fabric)
    skb_segs: int | None = None  # cap on GSO/TSO skbs at both ends, in full segments (None: the kernel's 64 KiB)
    fan_in: int | None = None  # hosts that send to this one on its switch at once (None: every other host there)
    own_rcvbuf: bool = False  # the host's sockets that receive on this link size their buffers (rcvbuf_bytes)


@dataclass(frozen=True)
class ControlLink(_Cable):
    """An UNSHAPED cable of the management network: control messages only, so
    that the shaped fabrics carry exactly the data-plane bytes."""

    host: str
    nic: str  # "mgmt"
    switch: str
    ip: str


@dataclass(frozen=True)
class NetSpec:
    hosts: tuple[HostSpec, ...]
    switches: tuple[SwitchSpec, ...]
    links: tuple[LinkSpec, ...]  # shaped
    tcp_cc: str = "reno"  # congestion control inside every host namespace (see emulator.net)
    control: tuple[ControlLink, ...] = ()  # unshaped management network
    # Several servers (emulator.servers): the first is where dpemu runs. `placement` puts a host or switch on a
    # server by name (unlisted: the first); a cable whose host and switch sit on different servers is a tunnel.
    servers: tuple[ServerSpec, ...] = ()
    placement: tuple[tuple[str, str], ...] = ()
    tunnel: str = "vxlan"  # or "gretap" where the kernel has it

    def host(self, name: str) -> HostSpec:
        return next(h for h in self.hosts if h.name == name)

    def switch(self, name: str) -> SwitchSpec:
        return next(s for s in self.switches if s.name == name)

    def ends(self, lk: LinkSpec) -> list[tuple[str | None, str]]:
        """(namespace, interface) of both shaped ends of `lk`: the host's interface ("up" egress) and the switch
        port in the root namespace ("down" egress)."""
        return [(self.host(lk.host).netns, lk.host_intf), (None, lk.switch_intf)]

    def server_of(self, node: str) -> str | None:
        """The server a host or switch sits on (None: one machine, no servers)."""
        if not self.servers:
            return None
        return dict(self.placement).get(node, self.servers[0].name)

    def server(self, name: str | None) -> ServerSpec | None:
        return next((s for s in self.servers if s.name == name), None)

    def remote_of(self, netns: str | None, dev: str | None = None) -> ServerSpec | None:
        """The REMOTE server that holds namespace `netns` (a host's), or, for the root namespace (None), the
        switch side `dev` or bridge `dev`; None where that is the machine dpemu runs on."""
        if not self.servers:
            return None
        if netns is not None:
            node = next((h.name for h in self.hosts if h.netns == netns), None)
        else:
            node = next((c.switch for c in self.cables() if c.switch_intf == dev), None) or \
                next((s.name for s in self.switches if s.bridge == dev), None)
        srv = self.server(self.server_of(node)) if node else None
        return None if srv is None or srv.local else srv

    def end_of(self, dev: str) -> tuple[str | None, str]:
        """(namespace, dev) of a cable end by its interface name (names are unique across the run)."""
        host = next((c.host for c in self.cables() if c.host_intf == dev), None)
        return (self.host(host).netns if host else None), dev

    def tunnelled(self) -> list[LinkSpec | ControlLink]:
        """Cables whose host and switch sit on different servers: each is a tunnel over the underlay."""
        return [c for c in self.cables() if self.server_of(c.host) != self.server_of(c.switch)]

    def objects_on(self, server: str | None) -> tuple[list[str], list[str]]:
        """(named namespaces, root-namespace links and bridges) this network creates on `server` (None: all, on
        one machine). A tunnel's host end is made in the root namespace as ``dp-t<i>`` before it moves."""
        def here(node: str) -> bool:
            return server is None or self.server_of(node) == server
        netns = [h.netns for h in self.hosts if here(h.name)]
        links = [s.bridge for s in self.switches if here(s.name)] + [c.switch_intf for c in self.cables()
                                                                      if here(c.switch)]
        links += [tunnel_temp(i) for i, c in enumerate(self.tunnelled()) if server is not None and here(c.host)]
        return netns, links

    def links_of(self, host: str) -> list[LinkSpec]:
        return [lk for lk in self.links if lk.host == host]

    def cables(self) -> list[LinkSpec | ControlLink]:
        return [*self.links, *self.control]

    def root_objects(self) -> list[str]:
        """Every name this network creates in the root namespace."""
        return ([s.bridge for s in self.switches] + [c.switch_intf for c in self.cables()]
                + [h.netns for h in self.hosts])

    def tc_ops(self) -> list[TcOp]:
        """Shaping in both directions: host egress ("up") and switch-port egress ("down")."""
        ops: list[TcOp] = []
        for lk in self.links:
            ops += shape_ops(self.host(lk.host).netns, lk.host_intf, lk.rate_bps, lk.queue_s, lk.traffic_classes,
                             lk.skb_segs)
            ops += shape_ops(None, lk.switch_intf, lk.rate_bps, lk.queue_s, lk.traffic_classes, lk.skb_segs)
        return ops

    def rcvbuf_bytes(self, host: str, switch: str) -> int | None:
        """The TCP receive buffer a socket of `host` on lossless `switch` may have (None: not lossless, or no
        link there): the host's port's queue less two skbs of slack, shared by the hosts that send to it
        (``fan_in``, by default every other host on the switch), each with one connection. A socket never
        advertises more window than its buffer, so all senders at once never overflow the port: the effect of a
        credit-based lossless fabric, on loss-based TCP."""
        lk = next((lk for lk in self.links_of(host) if lk.switch == switch), None)
        if lk is None or not self.switch(switch).lossless:
            return None
        peers = self._senders(lk)
        room = queue_limit_bytes(lk.rate_bps, lk.queue_s, lk.skb_segs) - 2 * skb_wire_bytes(lk.skb_segs)
        return max(2 * SEG_WIRE_BYTES, int(room / peers))

    def _senders(self, lk: LinkSpec) -> int:
        """Hosts that send to `lk`'s host on its switch at once, each with one connection."""
        return lk.fan_in or max(1, sum(1 for o in self.links if o.switch == lk.switch and o.host != lk.host))

    def default_rcvbuf_bytes(self, host: str) -> int | None:
        """The receive buffer of a `host` socket that does not size its own: the smallest budget of the host's
        lossless links whose sockets do not size theirs (``own_rcvbuf``: a compute node's storage reads size
        theirs with :meth:`rcvbuf_bytes`), so that no such socket can overflow any port it receives on."""
        budgets = [b for lk in self.links_of(host)
                   if not lk.own_rcvbuf and (b := self.rcvbuf_bytes(host, lk.switch)) is not None]
        return min(budgets) if budgets else None

    def cap_skbs(self, skb_s: float) -> "NetSpec":
        """Every link's skbs capped to `skb_s` (wall seconds) at the slowest rate of its switch. A skb is sized by
        the host that sends it and crosses its switch whole, so the slowest port it can reach bounds it: a storage
        server's skb must not hold an SNIC port longer than an SNIC's own would. On a lossless switch a skb is
        also small enough that every port's senders each get a window of several (tcplan.WINDOW_MIN_SKBS)."""
        segs: dict[str, int] = {}
        for lk in self.links:
            cap = skb_segs_for(lk.rate_bps, skb_s)
            if self.switch(lk.switch).lossless:
                cap = min(cap, window_skb_segs(lk.rate_bps, lk.queue_s, self._senders(lk)))
            segs[lk.switch] = min(segs.get(lk.switch, cap), cap)
        links = tuple(dataclasses.replace(lk, skb_segs=segs[lk.switch]) for lk in self.links)
        return dataclasses.replace(self, links=links)

    def validate(self) -> None:
        """Names unique and within IFNAMSIZ; every link's ends exist."""
        names = [h.name for h in self.hosts] + [s.name for s in self.switches]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"duplicate node names: {sorted(dup)}")
        hosts = {h.name for h in self.hosts}
        switches = {s.name for s in self.switches}
        seen: set[str] = set()
        for lk in self.cables():
            if lk.host not in hosts or lk.switch not in switches:
                raise ValueError(f"link {lk.host}-{lk.nic} -> {lk.switch}: unknown end")
            for n in (lk.host_intf, lk.switch_intf):
                if n in seen:
                    raise ValueError(f"duplicate interface name {n}")
                seen.add(n)
        self.root_objects()
        if self.servers:
            snames = [s.name for s in self.servers]
            if len(set(snames)) != len(snames) or not self.servers[0].local or any(s.local for s in self.servers[1:]):
                raise ValueError("servers: unique names; the first is this machine (no address), every other has one")
            bad = [f"{n} -> {s}" for n, s in self.placement if n not in names or s not in snames]
            if bad:
                raise ValueError(f"placement names unknown nodes or servers: {', '.join(bad)}")

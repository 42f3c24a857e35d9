"""Traffic-control plans: HTB shaping as printable data, then applied.

A :class:`TcOp` is one ``tc`` operation (a qdisc or a class) on one interface in
one namespace. :func:`shape_ops` turns "this interface sends at most R" into the
HTB tree every shaped interface gets::

    root qdisc htb 1: (default 1:10)
      class 1:1  rate R ceil R          link capacity (parent of all traffic classes)
        class 1:10 rate R ceil R        default class: everything unclassified
          qdisc bfifo 10: limit Q       explicit queue, in bytes

With traffic classes (:class:`TrafficClass`, e.g. collectives and KV on the
compute fabric) each class is a sibling of 1:10 with its own guaranteed share
of R, ``ceil R`` (work-conserving: a class borrows whatever the others leave)
and an HTB ``prio`` (lower is served first when borrowing), its own bfifo, and
a u32 filter on the IP DSCP field::

      class 1:10 rate R x (1 - sum of shares) ceil R     unmarked traffic
      class 1:11 rate R x share ceil R prio p            e.g. collectives (DSCP 46)
        qdisc bfifo 11: limit Q
      filter u32 match ip dsfield (dscp << 2) 0xfc flowid 1:11

Plans are pure values: ``dpemu plan`` prints them with :func:`render` as the
equivalent ``tc`` command lines, tests compare them with golden files, and
:func:`apply` executes them through pyroute2 netlink (never through a shell).
This module knows nothing about prefill or decode.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .units import format_rate, format_size


def _register_bfifo() -> None:
    """pyroute2 ships a `pfifo` plugin but none for `bfifo`; both carry the same
    ``struct tc_fifo_qopt { __u32 limit; }``, so bfifo reuses pfifo's layout
    (without a plugin pyroute2 silently attaches unknown qdiscs at the root)."""
    from pyroute2.netlink.rtnl.tcmsg import plugins, sched_pfifo

    plugins.setdefault("bfifo", sched_pfifo)

MTU_BYTES = 1500
# What HTB charges for one full TCP segment: Ethernet 14 + IP 20 + TCP 32 (timestamps) + MSS 1448. HTB counts
# from the Ethernet header (no preamble or FCS), and a GSO skb of n segments as n of these.
SEG_HEADER_BYTES = 66
SEG_WIRE_BYTES = MTU_BYTES + 14
# The kernel's default: one GSO/TSO skb may carry up to 64 KiB (43 full segments). HTB never splits a skb,
# so a slow port is held for one whole skb: 26 ms at 20 Mbit/s. Every shaped link caps its skbs
# (:func:`skb_segs_for`), and bursts and queues are sized from the capped skb.
GSO_MAX_BYTES = 65536
GSO_MAX_SEGS = GSO_MAX_BYTES // SEG_WIRE_BYTES
HZ_BURST_S = 0.001  # HTB refill granularity we size bursts for (1 ms of wall time: a property of the machine)
QUEUE_MIN_SKBS = 4  # a queue always holds a few skbs, or bfifo drops what TCP's smallest burst sends
# On a lossless fabric every sender's TCP window is a share of the port's queue (NetSpec.rcvbuf_bytes). A window
# of one or two skbs runs stop-and-wait: measured on the 8-GPU cluster at time x8 (skbs of 32 kB, windows of
# ~40 kB), reads ran at a third of the SNICs' rate. So skbs are also capped to leave each sender this many.
WINDOW_MIN_SKBS = 4
ROOT_HANDLE = 0x10000  # 1:
LINK_CLASS = 0x10001  # 1:1
DEFAULT_CLASS = 0x10010  # 1:10
ETH_P_IP = 0x0800
MIN_DEFAULT_SHARE = 0.005  # unmarked traffic (calibration, ARP-era leftovers) keeps a guaranteed sliver


@dataclass(frozen=True)
class TrafficClass:
    """A DSCP-classified HTB class under the link class: `share` of the link guaranteed, any idle rest
    borrowed (ceil = link rate), served before higher `prio` values when borrowing."""

    name: str
    minor: int  # class 1:<minor> (hex), 0x11 .. 0xff; its bfifo is <minor>:
    dscp: int  # 0..63
    share: float  # 0 < share < 1
    prio: int = 0  # 0..7

    def __post_init__(self) -> None:
        if not 0x11 <= self.minor <= 0xFF:
            raise ValueError(f"traffic class {self.name}: minor {self.minor:#x} outside 0x11..0xff")
        if not 0 <= self.dscp <= 63:
            raise ValueError(f"traffic class {self.name}: DSCP {self.dscp} outside 0..63")
        if not 0 < self.share < 1:
            raise ValueError(f"traffic class {self.name}: share {self.share} must be in (0, 1)")
        if not 0 <= self.prio <= 7:
            raise ValueError(f"traffic class {self.name}: prio {self.prio} outside 0..7")

    @property
    def handle(self) -> int:
        return 0x10000 | self.minor


def check_classes(classes: tuple[TrafficClass, ...]) -> None:
    """Distinct minors and DSCPs, and shares that leave unmarked traffic its sliver."""
    for what, values in (("minor", [c.minor for c in classes]), ("DSCP", [c.dscp for c in classes]),
                         ("name", [c.name for c in classes])):
        if len(set(values)) != len(values):
            raise ValueError(f"traffic classes repeat a {what}: {values}")
    if classes and 1 - sum(c.share for c in classes) < MIN_DEFAULT_SHARE - 1e-12:
        raise ValueError(f"traffic class shares add up to {sum(c.share for c in classes):.3f}: "
                         f"at most {1 - MIN_DEFAULT_SHARE} (unmarked traffic keeps {MIN_DEFAULT_SHARE})")


def handle_str(handle: int) -> str:
    major, minor = handle >> 16, handle & 0xFFFF
    return f"{major:x}:{minor:x}" if minor else f"{major:x}:"


@dataclass(frozen=True)
class TcOp:
    """One tc operation. ``netns`` None means the root namespace."""

    netns: str | None
    dev: str
    op: str  # "qdisc" or "class"
    kind: str  # "htb", "bfifo"
    handle: int
    parent: int | None  # None = root
    params: tuple[tuple[str, int], ...] = field(default_factory=tuple)

    def param(self, name: str) -> int:
        return dict(self.params)[name]


def skb_segs_for(rate_bps: float, skb_s: float) -> int:
    """Segments per skb so that one skb holds a port of `rate_bps` for at most `skb_s` (at least one segment,
    at most the kernel's 64 KiB)."""
    return int(min(max(rate_bps / 8 * skb_s // SEG_WIRE_BYTES, 1), GSO_MAX_SEGS))


def window_skb_segs(rate_bps: float, queue_s: float, senders: int) -> int:
    """The most segments per skb for which `senders` windows of WINDOW_MIN_SKBS skbs, plus two skbs of slack,
    fit a queue of `queue_s` at the rate (at least one segment)."""
    return max(1, int(rate_bps / 8 * queue_s / SEG_WIRE_BYTES // (WINDOW_MIN_SKBS * senders + 2)))


def skb_wire_bytes(skb_segs: int | None) -> int:
    """What HTB charges for the largest skb of a link capped at `skb_segs` (None: the kernel's 64 KiB)."""
    return GSO_MAX_SEGS * SEG_WIRE_BYTES if skb_segs is None else skb_segs * SEG_WIRE_BYTES


def gso_limits(skb_segs: int) -> tuple[int, int]:
    """(gso_max_size, gso_max_segs) of an interface whose skbs carry at most `skb_segs` full segments. The segment
    count is the exact cap (TCP sizes its skbs by it, and bounds them by gso_max_size less its ~320 B header
    reserve), so gso_max_size leaves room for that reserve instead of binding first."""
    return min(GSO_MAX_BYTES, skb_segs * SEG_WIRE_BYTES + 512), skb_segs


def htb_burst_bytes(rate_bps: float, skb_segs: int | None = None) -> int:
    """Burst that covers 1 ms at the rate, and never less than two of the link's largest skbs. It is also what an
    idle link lets through at once: 2.4 ms of line rate at 20 Mbit/s with 2-segment skbs (52 ms with 64 KiB)."""
    return int(max(rate_bps / 8 * HZ_BURST_S, 2 * skb_wire_bytes(skb_segs)))


def htb_quantum_bytes(rate_bps: float) -> int:
    """DRR quantum: rate/10 (tc's r2q) clamped to [MTU, 200000] to avoid tc's warnings."""
    return int(min(max(rate_bps / 8 / 10, MTU_BYTES + 100), 200_000))


def queue_limit_bytes(rate_bps: float, queue_s: float, skb_segs: int | None = None) -> int:
    """A queue of `queue_s` seconds at the rate, holding at least QUEUE_MIN_SKBS of the link's largest skbs."""
    return int(max(rate_bps / 8 * queue_s, QUEUE_MIN_SKBS * skb_wire_bytes(skb_segs)))


def shape_ops(netns: str | None, dev: str, rate_bps: float, queue_s: float,
              classes: tuple[TrafficClass, ...] = (), skb_segs: int | None = None) -> list[TcOp]:
    """The HTB tree that limits egress of `dev` to `rate_bps`, with optional DSCP traffic classes; bursts and
    queues sized for skbs of at most `skb_segs` segments (None: the kernel's 64 KiB)."""
    check_classes(classes)
    rate = int(round(rate_bps))
    burst = htb_burst_bytes(rate, skb_segs)
    quantum = htb_quantum_bytes(rate)

    def cls(share: float, prio: int) -> tuple[tuple[str, int], ...]:
        r = max(8, int(round(rate * share)))
        return (("rate_bps", r), ("ceil_bps", rate), ("burst_bytes", burst), ("cburst_bytes", burst),
                ("quantum_bytes", quantum), ("prio", prio))

    limit = (("limit_bytes", queue_limit_bytes(rate, queue_s, skb_segs)),)
    default_share = 1 - sum(c.share for c in classes)
    default_prio = max((c.prio for c in classes), default=0)
    ops = [
        TcOp(netns, dev, "qdisc", "htb", ROOT_HANDLE, None, (("default", DEFAULT_CLASS & 0xFFFF), ("r2q", 10))),
        TcOp(netns, dev, "class", "htb", LINK_CLASS, ROOT_HANDLE, cls(1.0, 0)),
        TcOp(netns, dev, "class", "htb", DEFAULT_CLASS, LINK_CLASS, cls(default_share, default_prio)),
        TcOp(netns, dev, "qdisc", "bfifo", 0x100000, DEFAULT_CLASS, limit),
    ]
    for c in classes:
        ops += [TcOp(netns, dev, "class", "htb", c.handle, LINK_CLASS, cls(c.share, c.prio)),
                TcOp(netns, dev, "qdisc", "bfifo", c.minor << 16, c.handle, limit),
                TcOp(netns, dev, "filter", "u32", c.handle, ROOT_HANDLE, (("dscp", c.dscp), ("prio", 1)))]
    return ops


def render(op: TcOp) -> str:
    """The ``tc`` command line equivalent to `op` (for people; never executed)."""
    p = dict(op.params)
    ns = f"-n {op.netns} " if op.netns else ""
    where = "root" if op.parent is None else f"parent {handle_str(op.parent)}"
    head = f"tc {ns}{op.op} add dev {op.dev} {where}"
    if op.op == "qdisc" and op.kind == "htb":
        return f"{head} handle {handle_str(op.handle)} htb default {p['default']:x} r2q {p['r2q']}"
    if op.op == "qdisc" and op.kind == "bfifo":
        return f"{head} handle {handle_str(op.handle)} bfifo limit {p['limit_bytes']}b"
    if op.op == "class" and op.kind == "htb":
        return (f"{head} classid {handle_str(op.handle)} htb rate {format_rate(p['rate_bps'])}"
                f" ceil {format_rate(p['ceil_bps'])} burst {p['burst_bytes']}b cburst {p['cburst_bytes']}b"
                f" quantum {p['quantum_bytes']} prio {p['prio']}")
    if op.op == "filter" and op.kind == "u32":
        return (f"tc {ns}filter add dev {op.dev} parent {handle_str(op.parent)} protocol ip prio {p['prio']}"
                f" u32 match ip dsfield {p['dscp'] << 2:#04x} 0xfc flowid {handle_str(op.handle)}")
    raise ValueError(f"cannot render {op}")


def describe(op: TcOp) -> str:
    """Short human text, e.g. for error messages."""
    if op.kind == "bfifo":
        return f"{op.dev}: bfifo {format_size(op.param('limit_bytes'))}"
    if op.op == "filter":
        return f"{op.dev}: u32 filter DSCP {op.param('dscp')} -> {handle_str(op.handle)}"
    return f"{op.dev}: {op.kind} {op.op} {handle_str(op.handle)}"


def apply(ipr, ops: list[TcOp], replace: bool = False) -> None:
    """Execute `ops` with a pyroute2 ``IPRoute`` already bound to their namespace. `replace`: each device's root
    qdisc (with its classes and filters) is deleted first, so a new plan replaces the one in place."""
    _register_bfifo()
    if replace:
        for dev in dict.fromkeys(op.dev for op in ops):
            (idx,) = ipr.link_lookup(ifname=dev)
            ipr.tc("del", index=idx, handle=0x10000, parent=0xFFFFFFFF)
    index_of: dict[str, int] = {}
    for op in ops:
        if op.dev not in index_of:
            found = ipr.link_lookup(ifname=op.dev)
            if not found:
                raise LookupError(f"interface {op.dev} not found in namespace {op.netns or 'root'}")
            index_of[op.dev] = found[0]
        idx = index_of[op.dev]
        p = dict(op.params)
        if op.op == "qdisc" and op.kind == "htb":
            ipr.tc("add", "htb", idx, op.handle, default=p["default"], r2q=p["r2q"])
        elif op.op == "qdisc" and op.kind == "bfifo":
            ipr.tc("add", "bfifo", idx, op.handle, parent=op.parent, limit=p["limit_bytes"])
        elif op.op == "class" and op.kind == "htb":
            ipr.tc("add-class", "htb", idx, op.handle, parent=op.parent,
                   rate=p["rate_bps"] // 8, ceil=p["ceil_bps"] // 8,
                   burst=p["burst_bytes"], cburst=p["cburst_bytes"],
                   quantum=p["quantum_bytes"], prio=p["prio"])
        elif op.op == "filter" and op.kind == "u32":
            # the IP header's first word is version/IHL, TOS, total length: DSCP is the TOS byte's top 6 bits
            ipr.tc("add-filter", "u32", idx, parent=op.parent, prio=p["prio"], protocol=ETH_P_IP,
                   target=op.handle, keys=[f"0x{p['dscp'] << 18:08x}/0x00fc0000+0"])
        else:
            raise ValueError(f"cannot apply {op}")

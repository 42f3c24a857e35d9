"""The DualPath cluster: real units in, scaled emulated links out.

A :class:`ClusterSpec` describes the REAL cluster (as in the paper: 8 Hopper
GPUs per node, one 400 Gbit/s compute NIC per GPU, one 400 Gbit/s storage NIC
per node). A :class:`Scale` maps it to what this machine can carry:

    emulated rate = real rate x byte_scale / time_scale

byte_scale is the fraction of real bytes actually moved; time_scale is wall
seconds per real second. Because every rate is multiplied by the same factor,
the ratios that DualPath's physics depends on (SNIC:CNIC, P:D, storage:SNIC)
are preserved exactly; :func:`invariants` states them so a run can record them.

:func:`cluster_net` lays the cluster out (this is the whole address plan):

- storage fabric, bridge ``dp-stor``, subnet 10.10.0.0/16: every compute node's
  SNIC (prefill ``10.10.1.i``, decode ``10.10.2.i``) and every storage server
  (``10.10.3.i``);
- compute fabric, rail-optimized: GPU r of every node is cabled to rail bridge
  ``dp-rail<r>``, one subnet per rail: 10.(32+r).0.0/16 (prefill
  ``10.(32+r).1.i``, decode ``10.(32+r).2.i``). Rails share nothing, and the
  storage and compute fabrics share nothing.
- both shaped fabrics are lossless, as the paper's (InfiniBand/RoCE with credits or PFC): TCP is loss-based,
  so every host's TCP receive buffer is its port's queue shared by the hosts that send to it
  (``NetSpec.rcvbuf_bytes``; storage servers send to an SNIC, compute nodes to a storage NIC, every other node
  to a CNIC), and no port overflows;
- management network, bridge ``dp-mgmt``, subnet 10.9.0.0/16, NOT shaped:
  every host has ``<host>-mgmt`` (prefill ``10.9.1.i``, decode ``10.9.2.i``,
  storage ``10.9.3.i``), plus the control host ``ctl1`` (``10.9.4.1``) that
  runs the scheduler and the workload driver. Control messages use it, so the
  shaped fabrics carry exactly the bytes they carry in the paper.
"""

from __future__ import annotations

from dataclasses import dataclass

from emulator.spec import ControlLink, HostSpec, LinkSpec, NetSpec, SwitchSpec
from emulator.tcplan import TrafficClass

MAX_NODES_PER_ROLE = 254  # one /24-style octet per role
MAX_GPUS_PER_NODE = 32  # rails 10.32 .. 10.63
STORAGE_OCTET = 10
MGMT_OCTET = 9
RAIL_OCTET0 = 32
ROLE_OCTET = {"pe": 1, "de": 2, "st": 3, "ctl": 4}
CONTROL_HOST = "ctl1"
MODELS = ("ds660b", "ds27b", "qwen32b")


@dataclass(frozen=True)
class ClusterSpec:
    """The real cluster, in real units."""

    prefill_nodes: int
    decode_nodes: int
    gpus_per_node: int = 8
    cnic_rate_bps: float = 400e9  # per GPU
    snic_rate_bps: float = 400e9  # per node
    storage_servers: int = 2
    storage_nic_rate_bps: float = 1600e9  # per storage server
    dram_buffer_bytes: float = 64e9  # per compute node
    model: str = "ds660b"


@dataclass(frozen=True)
class Scale:
    byte_scale: float  # fraction of real bytes moved, (0, 1]
    time_scale: float = 1.0  # wall seconds per real second, > 0

    @property
    def rate_factor(self) -> float:
        return self.byte_scale / self.time_scale

    def rate(self, real_bps: float) -> float:
        """Emulated rate of a real rate, in whole bits per second (what tc is given; 400e9 x 8e-5 is
        32000000.000000007 in floating point)."""
        return float(round(real_bps * self.rate_factor))

    def real_rate(self, emulated_bps: float) -> float:
        return emulated_bps / self.rate_factor

    def real_bytes(self, emulated_bytes: float) -> float:
        return emulated_bytes / self.byte_scale

    def real_seconds(self, wall_s: float) -> float:
        return wall_s / self.time_scale


def invariants(c: ClusterSpec) -> dict[str, float]:
    """Ratios the scaling must preserve (identical in real and emulated units)."""
    return {
        "snic_per_node_to_cnic_per_node": c.snic_rate_bps / (c.cnic_rate_bps * c.gpus_per_node),
        "snic_to_cnic_per_gpu": c.snic_rate_bps / c.cnic_rate_bps,
        "p_to_d": c.prefill_nodes / c.decode_nodes,
        "storage_to_snic_total": (c.storage_servers * c.storage_nic_rate_bps)
        / ((c.prefill_nodes + c.decode_nodes) * c.snic_rate_bps),
    }


def real_link_rates(c: ClusterSpec) -> dict[str, float]:
    """The real cluster's rate of each link class, bits per second."""
    return {"snic": c.snic_rate_bps, "cnic": c.cnic_rate_bps, "stnic": c.storage_nic_rate_bps}


def link_rates(c: ClusterSpec, scale: Scale) -> dict[str, float]:
    """Emulated rate of each link class, bits per second."""
    return {cls: scale.rate(bps) for cls, bps in real_link_rates(c).items()}


def node_names(c: ClusterSpec) -> dict[str, list[str]]:
    return {
        "pe": [f"pe{i}" for i in range(1, c.prefill_nodes + 1)],
        "de": [f"de{i}" for i in range(1, c.decode_nodes + 1)],
        "st": [f"st{i}" for i in range(1, c.storage_servers + 1)],
    }


# The paper's traffic isolation on the compute fabric (section 4): collectives on high-priority virtual
# lanes with ~99% of the arbitration weight, KV on a low-priority lane that still never starves. Here:
# DSCP-classified HTB classes on every CNIC and compute-fabric switch port, both work-conserving.
DSCP_COLLECTIVE = 46  # EF
DSCP_KV = 10  # AF11


def compute_classes(collective_share: float = 0.985, kv_share: float = 0.01, dscp_collective: int = DSCP_COLLECTIVE,
                    dscp_kv: int = DSCP_KV) -> tuple[TrafficClass, ...]:
    """Collectives (1:11, prio 0) and KV (1:12, prio 1); unmarked traffic keeps the rest in 1:10."""
    return (TrafficClass("collective", 0x11, dscp_collective, collective_share, prio=0),
            TrafficClass("kv", 0x12, dscp_kv, kv_share, prio=1))


QUEUE_S = 0.010  # the paper's fabrics are lossless; a 10 ms queue (real time) at each port stands in for it
SKB_S = 0.001  # longest real time one skb may hold a port at the slowest rate of its fabric


def cluster_net(c: ClusterSpec, scale: Scale, queue_s: float = QUEUE_S,
                compute_classes: tuple[TrafficClass, ...] = (), skb_s: float = SKB_S, lossless: bool = True) -> NetSpec:
    """Lay out the emulated cluster (see the module docstring for the plan). `compute_classes`: the DSCP
    traffic classes of every compute-fabric link (CNIC and switch port); none = one FIFO class. `queue_s` and
    `skb_s` are REAL times, stretched by the time scale like every other time: a queue of 10 ms means 10 ms of
    real time at every scale."""
    for role, n in (("prefill", c.prefill_nodes), ("decode", c.decode_nodes), ("storage", c.storage_servers)):
        if not 1 <= n <= MAX_NODES_PER_ROLE:
            raise ValueError(f"{role} nodes must be 1..{MAX_NODES_PER_ROLE}, got {n}")
    if not 1 <= c.gpus_per_node <= MAX_GPUS_PER_NODE:
        raise ValueError(f"gpus_per_node must be 1..{MAX_GPUS_PER_NODE}, got {c.gpus_per_node}")
    rates = link_rates(c, scale)
    names = node_names(c)
    queue_s = queue_s * scale.time_scale
    hosts = [HostSpec(n, role) for role in ("pe", "de", "st") for n in names[role]] + [HostSpec(CONTROL_HOST, "ctl")]
    switches = ([SwitchSpec("stor", "storage", lossless=lossless)]
                + [SwitchSpec(f"rail{r}", "compute", lossless=lossless) for r in range(c.gpus_per_node)]
                + [SwitchSpec("mgmt", "management")])
    links: list[LinkSpec] = []
    for role in ("pe", "de", "st"):
        for i, host in enumerate(names[role], start=1):
            if role == "st":
                links.append(LinkSpec(host, "nic", "stor", "stnic", rates["stnic"],  # compute nodes write to it
                                      f"10.{STORAGE_OCTET}.{ROLE_OCTET[role]}.{i}/16", queue_s,
                                      fan_in=c.prefill_nodes + c.decode_nodes))
                continue
            links.append(LinkSpec(host, "snic", "stor", "snic", rates["snic"],  # storage servers read to it
                                  f"10.{STORAGE_OCTET}.{ROLE_OCTET[role]}.{i}/16", queue_s, fan_in=c.storage_servers,
                                  own_rcvbuf=True))  # the node's storage reads size their sockets
            for r in range(c.gpus_per_node):
                links.append(LinkSpec(host, f"cnic{r}", f"rail{r}", "cnic", rates["cnic"],
                                      f"10.{RAIL_OCTET0 + r}.{ROLE_OCTET[role]}.{i}/16", queue_s,
                                      compute_classes))
    control = [ControlLink(h, "mgmt", "mgmt", f"10.{MGMT_OCTET}.{ROLE_OCTET[role]}.{i}/16")
               for role in ("pe", "de", "st") for i, h in enumerate(names[role], start=1)]
    control.append(ControlLink(CONTROL_HOST, "mgmt", "mgmt", f"10.{MGMT_OCTET}.{ROLE_OCTET['ctl']}.1/16"))
    net = NetSpec(tuple(hosts), tuple(switches), tuple(links), control=tuple(control)).cap_skbs(
        skb_s * scale.time_scale)
    net.validate()
    return net

"""From a validated scenario to everything a run would do, as printable values.

:func:`make_plan` is pure (no root, no kernel): the NetSpec, the tc operations,
the calibration tests and the processes they start, and the fidelity checks
that refuse a scenario this machine cannot emulate faithfully. ``dpemu plan``
prints it; ``dpemu run`` executes exactly it.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

from daemons.costmodel import MODELS
from daemons.gpu import CostModelCompute
from emulator import calibrate, fidelity
from emulator.errors import FidelityError
from emulator.procs import netns_argv
from emulator.spec import NetSpec
from emulator.tcplan import TcOp, gso_limits, render, skb_wire_bytes
from emulator.units import format_rate
from topologies.cluster import cluster_net, invariants, link_rates

from emulator.servers import TUNNEL_OVERHEAD

from .placement import spread, underlay_demand
from .schema import Scenario


@dataclass(frozen=True)
class Plan:
    scenario: Scenario
    net: NetSpec
    tc_ops: tuple[TcOp, ...]
    tests: tuple[calibrate.Test, ...]
    rounds: tuple[tuple[calibrate.Test, ...], ...]
    rates_bps: dict[str, float]
    invariants: dict[str, float]
    predicted_bps: float
    problems: tuple[str, ...]

    def check(self) -> None:
        if self.problems:
            raise FidelityError("this scenario cannot be emulated faithfully here:\n  - "
                                + "\n  - ".join(self.problems))


def predicted_serving_bps(net: NetSpec) -> float:
    """Peak traffic of the serving plane: every compute-node SNIC saturated by KV
    reads, and every byte read crossing the compute fabric once more (PE->DE copy
    on the PE path, DE->PE forward on the DE path)."""
    return 2 * sum(lk.rate_bps for lk in net.links if lk.link_class == "snic")


def make_plan(sc: Scenario) -> Plan:
    cluster, scale = sc.cluster_spec(), sc.scale_spec()
    net = cluster_net(cluster, scale, sc.emulation.queue, sc.traffic_classes.classes(), sc.emulation.skb,
                      sc.emulation.lossless)
    net = spread(dataclasses.replace(net, tcp_cc=sc.emulation.tcp_cc), sc.servers)
    rates = link_rates(cluster, scale)
    tests = calibrate.plan_tests(net, sc.calibration.mode)
    rounds = calibrate.schedule(tests, fidelity.KERNEL_BUDGET_BPS)
    predicted = max(predicted_serving_bps(net), max(sum(t.offered_bps for t in r) for r in rounds))
    problems = fidelity.check_rates(rates) + fidelity.check_load(predicted, "the cluster's peak traffic")
    return Plan(sc, net, tuple(net.tc_ops()), tuple(tests), tuple(tuple(r) for r in rounds), rates,
                invariants(cluster), predicted, tuple(problems))


def process_argvs(plan: Plan, python: str = sys.executable) -> list[tuple[str, list[str]]]:
    """Every process a run starts, with its argv: Mininet's shells (one per host,
    in its namespace, and one per bridge, in the root namespace), the iperf3
    ends of every calibration round, then each serving mode's daemons and driver."""
    shell = ["env", "PS1=\\x7f", "bash", "--norc", "--noediting", "-is"]
    out = [(f"mininet shell of {h.name}", ["mnexec", "-cdn", *shell, f"mininet:{h.name}"]) for h in plan.net.hosts]
    out += [(f"mininet shell of {s.bridge}", ["mnexec", "-cd", *shell, f"mininet:{s.bridge}"])
            for s in plan.net.switches]
    duration = plan.scenario.calibration.duration
    for i, rnd in enumerate(plan.rounds, start=1):
        flows = [f for t in rnd for f in t.flows]
        for port, (src, dst) in enumerate(flows, start=calibrate.BASE_PORT):
            server, client = calibrate.flow_argvs(src, dst, port, duration, python)
            out.append((f"round {i} iperf3 server", netns_argv(plan.net.host(dst.host).netns, server)))
            out.append((f"round {i} iperf3 client", netns_argv(plan.net.host(src.host).netns, client)))
    if plan.scenario.serving:  # then, per mode, the serving plane (files under results/<name>/<run-id>/<mode>/)
        from scenarios import serve
        modes = list(plan.scenario.serving.modes)
        if plan.scenario.serving.isolation_compare:
            modes.append("dualpath")  # again, with the compute fabric's isolation flipped
        ctl = plan.net.host(serve.CONTROL_HOST).netns
        for mode in modes:
            mode_dir = Path("<run>") / mode
            out += [(f"{mode}: {what}", netns_argv(netns, argv))
                    for what, netns, argv in serve.daemon_argvs(plan, mode_dir, python)]
            out.append((f"{mode}: workload driver", netns_argv(ctl, serve.driver_argv(plan, mode, mode_dir, python))))
    return out


def servers_text(net: NetSpec) -> list[str]:
    """Where each node and bridge sits, and the tunnels between the machines (docs/distributed.md)."""
    if not net.servers:
        return []
    where = dict(net.placement)
    lines = ["", f"## servers ({len(net.servers)}; tunnels: {net.tunnel}, every interface's MTU = the underlay's "
                 f"less {TUNNEL_OVERHEAD[net.tunnel]} B, measured at build)"]
    demand = underlay_demand(net)
    for srv in net.servers:
        nodes = [h.name for h in net.hosts if where.get(h.name) == srv.name]
        bridges = [sw.bridge for sw in net.switches if where.get(sw.name) == srv.name]
        at = "this machine" if srv.local else f"{srv.user}@{srv.address}, underlay {format_rate(srv.underlay_bps)}" \
            f" (tunnelled links can carry {format_rate(demand[srv.name])} each way)"
        lines.append(f"{srv.name:6s} {at}: nodes {', '.join(nodes) or '-'}; bridges {', '.join(bridges) or '-'}")
    for i, c in enumerate(net.tunnelled()):
        shaped = "unshaped" if not hasattr(c, "rate_bps") else f"shaped {format_rate(c.rate_bps)} at both ends" + (
            ", classes " + ", ".join(f"{tc.name} (DSCP {tc.dscp})" for tc in c.traffic_classes) if c.traffic_classes else "")
        lines.append(f"tunnel {i + 1:3d} {net.tunnel}: {c.host_intf} on {where[c.host]} <-> {c.switch_intf} on "
                     f"{where[c.switch]} ({net.switch(c.switch).bridge}), {shaped}")
    return lines


def plan_text(plan: Plan) -> str:
    """The whole plan as text: what `dpemu plan` prints and a run stores."""
    net, sc = plan.net, plan.scenario
    factor = sc.scale_spec().rate_factor
    lines = [f"# scenario {sc.name}: {len(net.hosts)} hosts, {len(net.switches)} bridges, "
             f"{len(net.links)} shaped links + {len(net.control)} management links, {len(plan.tc_ops)} tc operations",
             f"# scale: bytes x{sc.scale.bytes:g}, time x{sc.scale.time:g} -> every rate x{factor:g}", "",
             "## nodes (namespace)"]
    lines += [f"{h.name:6s} {h.role:3s} netns {h.netns}" for h in net.hosts]
    lines += ["", "## bridges"] + [f"{s.bridge:10s} {s.fabric} fabric" for s in net.switches]
    lines += ["", "## links (host interface <-> switch port, each direction shaped)"]
    lines += [f"{lk.host_intf:12s} {lk.ip:17s} <-> {lk.switch_intf:15s} on {net.switch(lk.switch).bridge:9s} "
              f"{lk.link_class:5s} {format_rate(lk.rate_bps):>9s} (real {format_rate(lk.rate_bps / factor, 4)})"
              for lk in net.links]
    lines += ["", "## management network (unshaped: control messages only)"]
    lines += [f"{c.host_intf:12s} {c.ip:17s} <-> {c.switch_intf:15s} on {net.switch(c.switch).bridge}"
              for c in net.control]
    lines += servers_text(net)
    lines += ["", "## invariants (preserved by scaling)"]
    lines += [f"{k} = {v:.4g}" for k, v in plan.invariants.items()]
    lines += ["", "## skb caps (GSO/TSO, both ends of every link; bursts and queues above are sized from them)"]
    for lk in net.links:
        if lk.skb_segs is None:
            continue
        size, segs = gso_limits(lk.skb_segs)
        hold_ms = skb_wire_bytes(lk.skb_segs) * 8 / lk.rate_bps * 1e3
        for ns, dev in net.ends(lk):
            lines.append(f"ip {f'-n {ns} ' if ns else ''}link set dev {dev} gso_max_size {size} gso_max_segs {segs}"
                         f"  # {skb_wire_bytes(lk.skb_segs)} B on the wire, {hold_ms:.2f} ms at "
                         f"{format_rate(lk.rate_bps)}")
    lines += ["", "## tc operations"] + [render(op) for op in plan.tc_ops]
    lines += ["", "## GPU time (cost model; every engine sleeps it x the time scale)",
              CostModelCompute(MODELS[sc.cluster.model], 1.0, sc.cluster.gpu_model).describe()]
    lines += ["", f"## processes ({len(plan.rounds)} calibration round(s))"]
    lines += [f"{what}: {' '.join(argv)}" for what, argv in process_argvs(plan)]
    if sc.faults:
        lines += ["", f"## faults (real seconds from each mode's workload start; storage replicas: "
                      f"{sc.cluster.storage.replicas}; docs/faults.md)"]
        lines += [f"{f.label()}" + (f" (modes {', '.join(f.modes)})" if f.modes else " (every mode)")
                  for f in sc.faults]
    lines += ["", "## checks", f"peak aggregate traffic predicted: {format_rate(plan.predicted_bps)}"]
    lines += [f"REFUSED: {p}" for p in plan.problems] or ["ok: every link within the faithful range"]
    return "\n".join(lines) + "\n"

"""A scenario's ``servers:`` section: the machines one emulated cluster is spread over, and where each node goes.

```yaml
servers:
  machines:
    - name: s1                      # the first is the machine dpemu runs on: no address
    - name: s2
      address: 192.168.1.12
      user: root
      key: ~/.ssh/dpemu
      underlay: 10Gbit              # what the network between the machines carries, each way
  placement: balanced               # or {de1: s2, de2: s2}: unlisted nodes stay on the first machine
  tunnel: vxlan                     # or gretap, where every kernel has it
```

``balanced`` places whole nodes (a node's NICs all go with it): the control host ``ctl1`` (scheduler and
workload driver, so every timing figure comes from one process on one clock) stays on the first machine; the
compute nodes and storage servers are dealt out in turn, role by role; each bridge sits on the machine that
holds most of its ports' hosts (the first on a tie). A cable whose host and bridge sit on different machines
becomes a shaped tunnel over the underlay, and the traffic that can cross the underlay is checked against its
rate before anything is built.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from emulator.errors import ConfigError
from emulator.servers import ServerSpec
from emulator.spec import NetSpec
from emulator.units import format_rate, parse_rate
from topologies.cluster import CONTROL_HOST


class Machine(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    address: str | None = Field(None, description="ssh address; none for the first machine (this one)")
    user: str = "root"
    key: str | None = Field(None, description="private key for ssh (default: ssh's own)")
    known_hosts: str | None = Field(None, description="known-hosts file (default: ssh's own)")
    python: str | None = Field(None, description="dpemu's interpreter there (default: the same path as here)")
    workdir: str = "/var/tmp/dpemu"
    underlay: float = Field(10e9, description="the underlay's rate to this machine, each way")

    @field_validator("underlay", mode="before")
    @classmethod
    def _rate(cls, v):
        return parse_rate(v) if isinstance(v, str) else v

    @field_validator("name")
    @classmethod
    def _ident(cls, v: str) -> str:
        if not (v[:1].isalpha() and v.isalnum() and v.islower()):
            raise ValueError(f"{v!r}: a lowercase letter, then letters and digits")
        return v


class Servers(BaseModel):
    model_config = ConfigDict(extra="forbid")
    machines: list[Machine]
    placement: Literal["balanced"] | dict[str, str] = "balanced"
    tunnel: Literal["vxlan", "gretap"] = "vxlan"

    @model_validator(mode="after")
    def _shape(self) -> "Servers":
        problems = []
        if len(self.machines) < 2:
            problems.append("name at least two machines (one is this one)")
        if self.machines and self.machines[0].address is not None:
            problems.append("the first machine is this one: give it no address")
        problems += [f"machine {m.name} needs an address" for m in self.machines[1:] if not m.address]
        names = [m.name for m in self.machines]
        problems += [f"machine {n} is named twice" for n in sorted({n for n in names if names.count(n) > 1})]
        if isinstance(self.placement, dict):
            problems += [f"placement {k}: no machine {v!r}" for k, v in self.placement.items() if v not in names]
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def specs(self) -> tuple[ServerSpec, ...]:
        return tuple(ServerSpec(m.name, m.address, m.user, m.key, m.known_hosts, m.python or sys.executable,
                                m.workdir, m.underlay) for m in self.machines)


def spread(net: NetSpec, servers: Servers | None, where: str = "servers") -> NetSpec:
    """`net` placed on the scenario's machines (unchanged without a ``servers:`` section). Raises ConfigError
    naming every problem: unknown nodes, the control host off the first machine, an underlay too slow."""
    if servers is None:
        return net
    specs = servers.specs()
    names = [s.name for s in specs]
    hosts = [h.name for h in net.hosts]
    problems = []
    if isinstance(servers.placement, dict):
        problems += [f"placement: no node {n!r} (nodes: {', '.join(hosts)})"
                     for n in servers.placement if n not in hosts]
        if servers.placement.get(CONTROL_HOST, names[0]) != names[0]:
            problems.append(f"placement: {CONTROL_HOST} (scheduler, workload driver) stays on {names[0]}")
        placed = {h: servers.placement.get(h, names[0]) for h in hosts}
    else:
        placed = _balanced(net, names)
    for s in net.switches:
        ports = [c.host for c in net.cables() if c.switch == s.name]
        votes = [sum(placed[h] == n for h in ports) for n in names]
        placed[s.name] = names[votes.index(max(votes))]
    out = dataclasses.replace(net, servers=specs, placement=tuple(placed.items()), tunnel=servers.tunnel)
    problems += underlay_problems(out)
    if problems:
        raise ConfigError(where, "; ".join(problems))
    return out


def _balanced(net: NetSpec, names: list[str]) -> dict[str, str]:
    placed = {CONTROL_HOST: names[0]}
    i = 0
    for role in dict.fromkeys(h.role for h in net.hosts):
        for h in net.hosts:
            if h.role == role and h.name != CONTROL_HOST:
                placed[h.name] = names[i % len(names)]
                i += 1
    return placed


def underlay_demand(net: NetSpec) -> dict[str, float]:
    """Per remote machine, the most its tunnelled shaped links can carry over its underlay, each way (bit/s)."""
    out: dict[str, float] = {s.name: 0.0 for s in net.servers[1:]}
    for c in net.tunnelled():
        rate = getattr(c, "rate_bps", 0.0)
        for node in (c.host, c.switch):
            srv = net.server_of(node)
            if srv in out:
                out[srv] += rate
    return out


def underlay_problems(net: NetSpec) -> list[str]:
    return [f"the links tunnelled to {name} can carry {format_rate(bps)} each way, more than its underlay "
            f"({format_rate(net.server(name).underlay_bps)}): place fewer nodes there or lower scale.bytes"
            for name, bps in underlay_demand(net).items() if bps > net.server(name).underlay_bps]

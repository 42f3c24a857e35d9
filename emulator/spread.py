"""The remote half of a network spread over several servers: their agents, the underlay, the tunnels.

:class:`emulator.net.Emulation` owns one :class:`Spread` when its :class:`~emulator.spec.NetSpec` names servers.
The Spread starts an agent on every remote server (:class:`emulator.servers.Agent`), checks each runs the same
dpemu as this one, learns the underlay (source address, device, MTU) between this machine and each server,
gives each server's agent its share of the run's objects to own, makes both ends of every tunnel, and at the
end has every agent remove its share. Operations on a remote end (tc, GSO caps, sysctls, counters) are sent to
the agent of the server that holds it, grouped so that each server gets one call per step.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

from . import dequeue, kernel
from .agent import make_tunnel_end
from .cluster_edition import Tunnel, precheck
from .errors import PlatformError
from .monitor import CpuSampler
from .servers import TUNNEL_OVERHEAD, Agent, ServerSpec, source_digest
from .spec import NetSpec, tunnel_temp


class Spread:
    def __init__(self, spec: NetSpec, run_id: str, log_dir: Path | None = None):
        self.spec = spec
        self.run_id = run_id
        self.log_dir = log_dir
        self.agents: dict[str, Agent] = {}
        self.underlay: dict[str, dict] = {}  # server -> {"src", "dev", "mtu"} toward the others
        self.here: dict[str, dict] = {}  # remote server -> this machine's {"src", "dev", "mtu"} toward it
        self.hello: dict[str, dict] = {}
        self.clocks: dict[str, list[dict]] = {}
        self.mtu: int | None = None
        self.tunnels: dict[int, Tunnel] = {}
        self.start_s: float | None = None
        self.dequeue: dict[str, dict[str, list[float]]] = {}  # server -> group -> every busy gap's error
        self.begun: set[str] = set()  # servers whose agent owns its share of the run

    @property
    def remotes(self) -> list[ServerSpec]:
        return [s for s in self.spec.servers if not s.local]

    # -- start ----------------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Precheck, agents, same dpemu everywhere, the underlay, ownership, tunnels planned."""
        t0 = time.monotonic()
        precheck(self.remotes)
        for s in self.remotes:  # started from this thread: a parent-death signal follows the thread that forked
            self.agents[s.name] = Agent(s, self.run_id, self.log_dir / f"agent-{s.name}.log" if self.log_dir else None)
        self.hello = self.each("hello", {s.name: {} for s in self.remotes})
        mine = source_digest()
        differ = [f"{n} ({h['digest']})" for n, h in self.hello.items() if h["digest"] != mine]
        if differ:
            raise PlatformError(f"servers run another dpemu than this one ({mine}): {', '.join(differ)}; check out "
                                "the same commit at the same path on every server (docs/distributed.md)")
        for s in self.remotes:
            words = kernel.run_argv(["ip", "-o", "route", "get", s.address]).stdout.split()
            dev = words[words.index("dev") + 1]
            self.here[s.name] = {"src": words[words.index("src") + 1], "dev": dev,
                                 "mtu": int(Path(f"/sys/class/net/{dev}/mtu").read_text())}
            self.underlay[s.name] = self.agents[s.name].call("underlay", peer=self.here[s.name]["src"])
        kind = self.spec.tunnel
        if kind == "gretap" and not all(h["gretap"] for h in self.hello.values()):
            raise PlatformError("tunnel gretap: a server's kernel has no gretap; use vxlan")
        mtus = [u["mtu"] for u in [*self.underlay.values(), *self.here.values()]]
        self.mtu = min(mtus) - TUNNEL_OVERHEAD[kind]
        for name, agent in self.agents.items():
            netns, links = self.spec.objects_on(name)
            agent.call("begin", netns=netns, links=links)
            self.begun.add(name)
            self.clocks[name] = [agent.clock()]
        for i, c in enumerate(self.spec.tunnelled()):
            h, s = self.spec.server_of(c.host), self.spec.server_of(c.switch)
            self.tunnels[i] = Tunnel(i, kind, self.mtu, {**self._end(h, s), "temp": tunnel_temp(i)}, self._end(s, h))
        self.start_s = time.monotonic() - t0

    def _end(self, server: str, peer: str) -> dict:
        """Underlay facts of `server`'s end of a tunnel to `peer` (one of them is this machine, or both are
        remote and reach each other by their addresses)."""
        first = self.spec.servers[0].name
        if server == first:
            here = self.here[peer]
            return {"server": server, "local": here["src"], "remote": self.spec.server(peer).address,
                    "dev": here["dev"]}
        remote = self.here[server]["src"] if peer == first else self.spec.server(peer).address
        return {"server": server, "local": self.spec.server(server).address, "remote": remote,
                "dev": self.underlay[server]["dev"]}

    def make_tunnel(self, t: Tunnel, host_pid: int) -> None:
        """Both ends of tunnel `t`; the host's end goes into the namespace of `host_pid` (on its server)."""
        c = self.spec.tunnelled()[t.index]
        for end, name, pid in ((t.host_end, c.host_intf, host_pid), (t.switch_end, c.switch_intf, None)):
            args = {"name": name, "kind": t.kind, "key": t.index + 1, "local": end["local"], "remote": end["remote"],
                    "dev": end["dev"], "mtu": t.mtu, "pid": pid, "temp": end.get("temp")}
            if end["server"] == self.spec.servers[0].name:
                make_tunnel_end(**args)
            else:
                self.agents[end["server"]].call("tunnel", **args)

    # -- operations by server ---------------------------------------------------------------------------------------
    def agent_of(self, netns: str | None, dev: str | None = None) -> Agent | None:
        srv = self.spec.remote_of(netns, dev)
        return None if srv is None else self.agents[srv.name]

    def each(self, op: str, per_server: dict[str, dict], timeout_s: float = 60,
             errors: bool = False) -> dict[str, object]:
        """`op` on several servers at once ({server: args}); their results by server. `errors`: a server's
        PlatformError is its result instead of being raised."""
        if not per_server:
            return {}
        with ThreadPoolExecutor(max_workers=len(per_server)) as pool:
            futs = {n: pool.submit(self.agents[n].call, op, timeout_s, **a) for n, a in per_server.items()}
        out = {}
        for n, f in futs.items():
            try:
                out[n] = f.result()
            except PlatformError as exc:
                if not errors:
                    raise
                out[n] = exc
        return out

    def cpu_sampler(self) -> ServersCpu:
        """A sampler of every server's CPU: this machine's and each remote one's (not started)."""
        first = self.spec.servers[0].name
        return ServersCpu({first: CpuSampler(), **{n: RemoteCpuSampler(a, self.clocks[n][0]["mono_offset_s"])
                                                    for n, a in self.agents.items()}})

    def add_dequeue(self, server: str, errors: dict[str, list[float]]) -> None:
        """Keep one server's dequeue-timing errors (per group) for its own figures."""
        mine = self.dequeue.setdefault(server, {})
        for group, errs in errors.items():
            mine.setdefault(group, []).extend(errs)

    def report(self) -> dict:
        """What a run records of its servers: each one's dpemu, underlay, clock offsets (start and end)."""
        dq = {n: {g: dequeue.summarize(dequeue.histogram(e)) for g, e in groups.items() if e}
              for n, groups in self.dequeue.items()}
        return {"mtu": self.mtu, "dequeue": dq, "tunnel": self.spec.tunnel, "tunnels": len(self.tunnels),
                "agents_start_s": self.start_s,
                "servers": {s.name: {"address": s.address, "hello": self.hello.get(s.name),
                                     "underlay": self.underlay.get(s.name), "here": self.here.get(s.name),
                                     "clock": self.clocks.get(s.name, [])} for s in self.remotes},
                "placement": {n: s for n, s in self.spec.placement}}

    # -- end --------------------------------------------------------------------------------------------------------
    def teardown(self) -> list[str]:
        """Every agent removes its server's share of the run, then ends; what is left, named by server. A server
        whose agent never began owns nothing of the run; one whose agent died has cleaned up as it ended (its
        ssh closed), or, if it could not, is named for ``dpemu clean --servers``."""
        left: list[str] = []
        live = {n: a for n, a in self.agents.items() if n in self.begun and a.proc.poll() is None}
        left += [f"server {n}: its agent ended during the run (`dpemu clean --servers` checks it)"
                 for n in self.begun if n not in live]
        for name, agent in live.items():
            try:
                self.clocks.setdefault(name, []).append(agent.clock())
            except PlatformError:
                pass
        per = {name: dict(zip(("netns", "links"), self.spec.objects_on(name), strict=True)) for name in live}
        for name, res in self.each("teardown", per, errors=True).items():
            left += [str(res)] if isinstance(res, PlatformError) else [f"{n} on {name}" for n in res["left"]]
        for agent in self.agents.values():
            agent.close()
        return left


def as_dicts(servers: tuple[ServerSpec, ...]) -> list[dict]:
    return [asdict(s) for s in servers]


class RemoteCpuSampler(CpuSampler):
    """A remote server's busy fraction, read by its agent, stamped on this machine's clock."""

    def __init__(self, agent: Agent, mono_offset_s: float, period_s: float = 0.1):
        super().__init__(period_s)
        self.agent, self.offset = agent, mono_offset_s

    def sample(self, now: float) -> None:
        t, busy, total = self.agent.call("cpu")
        if self._last is not None and total > self._last[1]:
            self.samples.append((t - self.offset, (busy - self._last[0]) / (total - self._last[1])))
        self._last = (busy, total)


class ServersCpu:
    """The CPU of every server of a run, as one sampler: its summary is the busiest server's (the verdict's
    CPU limit holds on every machine); ``by_server`` gives each one's; ``samples`` are this machine's."""

    def __init__(self, samplers: dict[str, CpuSampler]):
        self.samplers = samplers
        self.local = next(iter(samplers.values()))

    @property
    def samples(self) -> list[tuple[float, float]]:
        return self.local.samples

    def start(self) -> None:
        for s in self.samplers.values():
            s.start()

    def stop(self) -> None:
        for s in self.samplers.values():
            s.stop()

    def by_server(self, windows: list[tuple[float, float]] | None = None, span_s: float = 0.5) -> dict[str, dict]:
        return {name: s.summary(windows, span_s) for name, s in self.samplers.items()}

    def summary(self, windows: list[tuple[float, float]] | None = None, span_s: float = 0.5) -> dict:
        each = [v for v in self.by_server(windows, span_s).values() if v["cpu_util_max"] is not None]
        if not each:
            return {"cpu_util_mean": None, "cpu_util_max": None}
        return {"cpu_util_mean": max(v["cpu_util_mean"] for v in each),
                "cpu_util_max": max(v["cpu_util_max"] for v in each)}

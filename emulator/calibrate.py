"""Link calibration: does every shaped link deliver its configured rate?

For each (link, direction) to check, iperf3 flows saturate it inside the
namespaces while :class:`~emulator.monitor.TcSampler` reads the HTB counters of
that direction's shaping class: host egress ("up", host -> fabric) or the
switch port's egress ("down", fabric -> host). Achieved rate = counted wire
bytes over the steady window (the first second of TCP ramp-up and the last
quarter second are left out). Two independent checks come with it:

- payload: iperf3's goodput over the same window (its per-second intervals inside it) against the payload
  the counters imply, counted bytes less one header (:data:`~emulator.tcplan.SEG_HEADER_BYTES`) per counted
  segment. A counter that over-counts, or a link whose headers are not what the rate plan assumes, shows here;
- dequeue timing (:mod:`emulator.dequeue`) on the saturated directions of every test, while the rounds run.

Tests are planned first (pure data, printable by ``dpemu plan``):
- a *pair* test runs flows a->b and b->a between two equal-rate links on the
  same switch and checks all four directions;
- a *fan* test saturates a link whose peers are all slower (a storage server's
  NIC) with flows to and from enough peers to add up to its rate.
Tests that share no link run together in rounds, as long as the round's
offered load stays under the CPU budget.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field

from . import dequeue
from .monitor import ClassKey, CpuSampler, TcSampler
from .spec import LinkSpec, NetSpec
from .tcplan import LINK_CLASS, SEG_HEADER_BYTES

WARMUP_S = 1.0  # at least this long after the flows are released
RAMP_S = 0.5  # and this long after the last target reached half its rate
ACTIVE_FRACTION = 0.5
POLL_S = 0.1
COOLDOWN_S = 0.25
MIN_WINDOW_S = 1.0
BASE_PORT = 5201


@dataclass(frozen=True)
class Target:
    link: LinkSpec
    direction: str  # "up" (host egress) or "down" (switch-port egress)
    # What the test can push through it: the link rate, or less when all its
    # peers together are slower (a storage NIC faster than every SNIC it serves).
    # Traffic through the link can never exceed that, so it is the rate to verify.
    expected_bps: float | None = None

    @property
    def target_bps(self) -> float:
        return self.link.rate_bps if self.expected_bps is None else min(self.expected_bps, self.link.rate_bps)

    @property
    def dev(self) -> str:
        """The interface whose egress this direction is."""
        return self.link.host_intf if self.direction == "up" else self.link.switch_intf

    def key(self, net: NetSpec) -> ClassKey:
        if self.direction == "up":
            return ClassKey(net.host(self.link.host).netns, self.link.host_intf, LINK_CLASS)
        return ClassKey(None, self.link.switch_intf, LINK_CLASS)

    @property
    def label(self) -> str:
        return f"{self.link.host}-{self.link.nic} {self.direction}"


@dataclass(frozen=True)
class Test:
    kind: str  # "pair" or "fan"
    flows: tuple[tuple[LinkSpec, LinkSpec], ...]  # (source link, destination link)
    targets: tuple[Target, ...]

    @property
    def links(self) -> set[LinkSpec]:
        return {lk for flow in self.flows for lk in flow}

    @property
    def offered_bps(self) -> float:
        """Upper bound of the traffic this test pushes through the kernel."""
        return sum(min(a.rate_bps, b.rate_bps) for a, b in self.flows)

    @property
    def saturated(self) -> tuple[Target, ...]:
        """The directions whose queue stays full: a pair's host egresses (each switch port then receives exactly
        its rate and never queues), a fan's link both ways (its peers add up to more than it)."""
        return tuple(t for t in self.targets if self.kind == "fan" or t.direction == "up")


def _pair(a: LinkSpec, b: LinkSpec) -> Test:
    return Test("pair", ((a, b), (b, a)), tuple(Target(lk, d) for lk in (a, b) for d in ("up", "down")))


FAN_HEADROOM = 1.25  # peers add up to this much more than the link when they can


def _fan(link: LinkSpec, peers: list[LinkSpec]) -> Test:
    """Peers until their rates add up to FAN_HEADROOM x the link's: with exactly
    1.0x, each peer's own port is a second bottleneck and TCP leaves the link a
    few percent short (seen: -8.7% with two 100 Mbit/s peers on 200 Mbit/s)."""
    chosen, total = [], 0.0
    for p in sorted(peers, key=lambda lk: -lk.rate_bps):
        chosen.append(p)
        total += p.rate_bps
        if total >= FAN_HEADROOM * link.rate_bps:
            break
    flows = tuple((link, p) for p in chosen) + tuple((p, link) for p in chosen)
    cap = total if total < link.rate_bps else None
    return Test("fan", flows, (Target(link, "up", cap), Target(link, "down", cap)))


def _peers(net: NetSpec, link: LinkSpec) -> list[LinkSpec]:
    return [lk for lk in net.links if lk.switch == link.switch and lk.host != link.host]


def _test_for(net: NetSpec, link: LinkSpec, exclude: set[LinkSpec] = frozenset()) -> Test | None:
    peers = _peers(net, link)
    if not peers:
        return None
    same = [p for p in peers if p.rate_bps == link.rate_bps and p not in exclude] or \
           [p for p in peers if p.rate_bps == link.rate_bps]
    return _pair(link, same[0]) if same else _fan(link, peers)


def plan_tests(net: NetSpec, mode: str) -> list[Test]:
    """`mode` "class": one representative link per link class; "all": every link."""
    if mode == "class":
        seen: dict[str, LinkSpec] = {}
        for lk in net.links:
            seen.setdefault(lk.link_class, lk)
        return [t for t in (_test_for(net, lk) for lk in seen.values()) if t]
    if mode != "all":
        raise ValueError(f"calibration mode must be 'class' or 'all', not {mode!r}")
    tests: list[Test] = []
    covered: set[LinkSpec] = set()
    for lk in net.links:
        if lk in covered:
            continue
        test = _test_for(net, lk, exclude=covered)
        if test is None:
            continue
        tests.append(test)
        covered |= {t.link for t in test.targets}
    return tests


def flow_argvs(src: LinkSpec, dst: LinkSpec, port: int, duration_s: float,
               python: str = sys.executable) -> tuple[list[str], list[str]]:
    """(server argv, client argv) of one iperf3 flow src -> dst (run in dst's, src's namespace)."""
    server = [python, "-m", "traffic.iperf", "server", "--bind", dst.addr, "--port", str(port)]
    client = [python, "-m", "traffic.iperf", "client", "--server", dst.addr, "--port", str(port),
              "--bind", src.addr, "--duration", str(int(duration_s)), "--wait-go"]
    return server, client


def schedule(tests: list[Test], budget_bps: float) -> list[list[Test]]:
    """Group tests into rounds: no shared link, offered load within the budget."""
    rounds: list[list[Test]] = []
    for test in tests:
        for rnd in rounds:
            busy = set().union(*(t.links for t in rnd))
            load = sum(t.offered_bps for t in rnd)
            if not (busy & test.links) and load + test.offered_bps <= budget_bps:
                rnd.append(test)
                break
        else:
            rounds.append([test])
    return rounds


@dataclass
class Measurement:
    target: Target
    configured_bps: float
    achieved_bps: float | None  # HTB class counters (wire bytes)
    goodput_bps: float | None  # iperf3 receiver goodput of the flows through it (whole test)
    cpu_util_max: float | None
    payload_bps: float | None = None  # what the counters imply: wire bytes less one header per segment
    window_goodput_bps: float | None = None  # payload the iperf3 servers received in the same window (1 s intervals)

    @property
    def goodput_error(self) -> float | None:
        """iperf3's payload against the counters' payload, over the same window (0: they agree)."""
        if not self.payload_bps or self.window_goodput_bps is None:
            return None
        return self.window_goodput_bps / self.payload_bps - 1.0

    @property
    def expected_bps(self) -> float:
        return self.target.target_bps

    @property
    def error(self) -> float | None:
        if self.achieved_bps is None:
            return None
        return self.achieved_bps / self.expected_bps - 1.0


@dataclass
class Calibration:
    measurements: list[Measurement] = field(default_factory=list)
    rounds: int = 0
    duration_s: float = 0.0
    cpu_util_max: float | None = None
    cpu_util_mean: float | None = None
    dequeue: dict[str, list[float]] = field(default_factory=dict)  # link class -> error of every busy gap
    dequeue_problem: str | None = None  # why dequeue timing was not measured
    cpu_servers: dict[str, dict] = field(default_factory=dict)  # server -> its CPU figures (several servers)

    def worst_error(self) -> float | None:
        errs = [abs(m.error) for m in self.measurements if m.error is not None]
        return max(errs) if errs else None


def run(emu, tests: list[Test], duration_s: float, budget_bps: float, python: str = sys.executable,
        progress=None, timing: bool = True) -> Calibration:
    """Run all `tests` on the built emulation `emu` (an :class:`emulator.net.Emulation`); `timing`: trace the
    dequeue timing of the saturated directions."""
    if duration_s < WARMUP_S + COOLDOWN_S + MIN_WINDOW_S:
        raise ValueError(f"calibration duration must be >= {WARMUP_S + COOLDOWN_S + MIN_WINDOW_S:.2f}s")
    result = Calibration()
    t_start = time.monotonic()
    cpu = emu.cpu_sampler()  # every server's, where the network spans several
    cpu.start()
    windows = []
    watched = [dequeue.Watched(t.dev, t.link.rate_bps, t.link.link_class) for test in tests for t in test.saturated]
    result.dequeue_problem = dequeue.available() if timing else "turned off (emulation.dequeue_timing: false)"
    monitor = None
    try:
        if result.dequeue_problem is None:
            monitor = emu.dequeue_monitor(watched, on_s=1.0, off_s=1.0)
        for i, rnd in enumerate(schedule(tests, budget_bps), start=1):
            if progress:
                progress(i, rnd)
            measured, window = _run_round(emu, rnd, duration_s, python, cpu)
            result.measurements += measured
            windows.append(window)
            result.rounds = i
    finally:
        cpu.stop()
        if monitor is not None:
            result.dequeue = {k: v for k, v in monitor.stop().items() if v}
            result.dequeue_problem = monitor.error
    result.duration_s = time.monotonic() - t_start
    summary = cpu.summary(windows)
    result.cpu_util_max, result.cpu_util_mean = summary["cpu_util_max"], summary["cpu_util_mean"]
    result.cpu_servers = cpu.by_server(windows) if hasattr(cpu, "by_server") else {}
    return result


def _all_active(sampler: TcSampler, targets: list[Target], net: NetSpec, deadline: float) -> float:
    """Poll the counters until every target carries at least ACTIVE_FRACTION of
    its rate; return when that happened (or `deadline`). With dozens of flows
    released at once, some need a second or more to connect and ramp up: a
    window that starts before them would under-report the link."""
    keys = {t: t.key(net) for t in targets}
    last: dict[ClassKey, tuple[float, int]] = {}
    waiting = set(targets)
    while True:
        now = time.monotonic()
        current = {s.key: (s.t_s, s.bytes) for s in sampler.sample(now)}
        for t in list(waiting):
            prev, cur = last.get(keys[t]), current.get(keys[t])
            if prev and cur and cur[0] > prev[0] and \
                    (cur[1] - prev[1]) * 8 / (cur[0] - prev[0]) >= ACTIVE_FRACTION * t.target_bps:
                waiting.discard(t)
        last.update(current)
        if not waiting or now >= deadline:
            return now
        time.sleep(POLL_S)


def _run_round(emu, rnd: list[Test], duration_s: float, python: str, cpu: CpuSampler):
    net = emu.spec
    flows = [flow for test in rnd for flow in test.flows]
    targets = [t for test in rnd for t in test.targets]
    # Counters are read only while the flows ramp up and at the window's two
    # edges, not periodically: polling hundreds of classes through pyroute2
    # costs real CPU, which would distort the measurement.
    sampler = emu.tc_sampler([t.key(net) for t in targets])
    sampler.setup()
    servers, clients = [], []
    try:
        argvs = [flow_argvs(src, dst, port, duration_s, python)
                 for port, (src, dst) in enumerate(flows, start=BASE_PORT)]
        for (_, dst), (server, _) in zip(flows, argvs, strict=True):
            servers.append(emu.procs.start(f"iperf3 server in {dst.host}", net.host(dst.host).netns, server))
        for srv in servers:
            srv.stdout.readline()  # "listening": the process is up; the client retries until bound
        for (src, dst), (_, client) in zip(flows, argvs, strict=True):
            clients.append(emu.procs.start(f"iperf3 client {src.host}->{dst.host}", net.host(src.host).netns,
                                           client, stdin=subprocess.PIPE))
        for cli in clients:  # barrier: every client loaded, then all start together
            if cli.stdout.readline().strip() != "ready":
                raise RuntimeError(f"iperf3 client did not start: {cli.stderr.read()[-500:]}")
        launched = time.monotonic()
        for cli in clients:
            cli.stdin.write("go\n")
            cli.stdin.flush()
        t1 = launched + int(duration_s) - COOLDOWN_S  # no flow can end before this
        t0 = max(launched + WARMUP_S, _all_active(sampler, targets, net, t1 - MIN_WINDOW_S - RAMP_S) + RAMP_S)
        for t_snap in (t0, t1):
            time.sleep(max(0.0, t_snap - time.monotonic()))  # schedules a counter read, moves no data
            sampler.sample(time.monotonic())
        results = []
        for (src, dst), cli in zip(flows, clients, strict=True):
            out, err = cli.communicate(timeout=duration_s + 30)
            data = json.loads(out.strip().splitlines()[-1]) if out.strip() else {"error": err.strip()}
            if "error" in data:
                raise RuntimeError(f"iperf3 {src.host}->{dst.host} failed: {data['error']}")
            results.append(data["end"]["sum_received"]["bits_per_second"])
        received = []  # each server's own per-second receive intervals: delivered payload, not bytes written
        for srv in servers:
            out, _ = srv.communicate(timeout=30)
            data = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
            received.append(_window_goodput(data, t0 - launched, t1 - launched))
        results = list(zip(results, received, strict=True))
    finally:
        sampler.teardown()
        for p in servers + clients:
            emu.procs.stop(p)
    cpu_max = cpu.summary([(t0, t1)])["cpu_util_max"]
    out = []
    for t in targets:
        gp = [g for (src, dst), g in zip(flows, results, strict=True)
              if (src == t.link if t.direction == "up" else dst == t.link)]
        counted = sampler.counts(t.key(net), t0, t1)
        payload = None if counted is None else (counted[0] - SEG_HEADER_BYTES * counted[1]) * 8 / counted[2]
        window = [w for _, w in gp]
        out.append(Measurement(t, t.link.rate_bps, sampler.rate_bps(t.key(net), t0, t1), sum(g for g, _ in gp),
                               cpu_max, payload, None if None in window else sum(window)))
    return out, (t0, t1)


def _window_goodput(result: dict, a_s: float, b_s: float) -> float | None:
    """The payload rate an iperf3 server received in its 1 s intervals that lie inside [a_s, b_s] (seconds since
    the release; the test starts a few ms after it, which shifts the intervals by as much)."""
    inside = [iv["sum"] for iv in result.get("intervals", []) if iv["sum"]["start"] >= a_s - 0.05
              and iv["sum"]["end"] <= b_s + 0.05]
    seconds = sum(iv["seconds"] for iv in inside)
    return sum(iv["bytes"] for iv in inside) * 8 / seconds if seconds > 0 else None


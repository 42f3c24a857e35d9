"""Lab 3, traffic classes (``labs/3-traffic-classes``): its predictions, how each is graded against one run of
the isolation experiment (``serving.isolation_compare``) and a packet capture on a CNIC, and its picture.

Every expected value comes from the run directory or the capture: the DSCP marks from the run's own
``traffic_classes`` (its resolved ``scenario.yaml``), checked packet by packet in the capture; the KV share of
the compute fabric's bytes from the isolation-on DualPath run's per-class HTB counters (``links.csv``); the
prefill AllToAlls' p99 wait (completion less their own bytes at the CNIC rate) from each run's
``collectives.csv``: reference (oracle, no KV), isolation on, isolation off; the KV throughputs from
``summary.json``'s ``isolation`` (``cnic_kv_gbps``).

The capture is ``--pcap FILE`` or else the ``cnic.pcap`` that ``lab check`` took itself (``capture``: a bounded
tcpdump on pe1's CNIC while DualPath serves, started in pe1's namespace as the runner starts its daemons and
always stopped). scapy reads it: a TCP packet to or from port 7000 (storage) or 7200 (an engine) is KV, port
7300 a collective (``scenarios.serve``), anything else other. The picture: the AllToAlls' completion against
their size, the CDF of their wait, the capture's DSCP histogram. TEACHER.md explains every tolerance. Called by
``scenarios.labs``; ``python -m scenarios.labs_classes PCAP`` prints a capture's counts.
"""

from __future__ import annotations

import contextlib
import csv
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from emulator.errors import ConfigError
from emulator.procs import ProcessGroup
from emulator.units import parse_rate

from . import online, report, serve
from .labs import Key, Lab, Row, load_json, run_trust, within
from .schema import Emulation, TrafficClasses

KV_PORTS = (serve.STORAGE_PORT, serve.ENGINE_PORT)
COLLECTIVE_PORTS = (serve.COLLECTIVE_PORT,)
KINDS = ("kv", "collective", "other")
LABEL = {"kv": "KV", "collective": "collective", "other": "other"}
PCAP = "cnic.pcap"
#: the capture lab check takes: on pe1's CNIC (KV both ways, DE -> PE reads and PE -> DE pushes, and the
#: prefill collectives to pe2), the first CAPTURE_PACKETS packets once DualPath (isolation on) serves, headers
#: only, for at most CAPTURE_S wall seconds
CAPTURE_NODE, CAPTURE_PACKETS, CAPTURE_SNAP, CAPTURE_S = "pe1", 4000, 128, 120.0
#: p99 wait of the prefill AllToAlls, isolation on / the reference's: 0.61-1.25 over the lab's runs (the
#: reference's own tail is host scheduling); +-0.5 takes "unchanged" (1) and rejects 2 or more
TOL_ON = 0.5
#: isolation off: 3.6x-7.7x, too wide for a point value: graded by the side of SLOW_LINE it falls on
SLOW_LINE = 2.0
#: KV throughput, isolation on / off: 0.98-1.04; +-0.15 rejects "KV gets its 1% guarantee" (0.01) and 0.5
TOL_KV_RATE = 0.15
#: the KV share of the CNICs' bytes: 0.627-0.645 measured, the per-turn formula 0.657; +-0.05 rejects the
#: context counted twice (0.76) and the decode AllToAlls forgotten (0.71)
TOL_SHARE = 0.05


# -- the capture ----------------------------------------------------------------------------------------------
@dataclass
class Capture:
    """A capture's packets per (kind, DSCP, carries data): [packets, wire bytes]. A TCP segment carries data
    when its payload is not empty; the others (the handshake, pure acknowledgements) move no KV and no
    collective byte."""
    path: Path
    counts: dict[tuple[str, int, bool], list[int]] = field(default_factory=dict)
    non_ip: int = 0

    def marks(self, kind: str, data: bool = True) -> dict[int, int]:
        """DSCP -> packets of one kind, those with data (or those without)."""
        return {d: c[0] for (k, d, has), c in sorted(self.counts.items()) if k == kind and has == data}

    def total(self, kind: str | None = None, what: int = 0) -> int:
        return sum(c[what] for (k, _, _), c in self.counts.items() if kind in (None, k))

    def table(self) -> list[str]:
        """The counts as a fixed-width table (the lab's capture.txt, and `python -m scenarios.labs_classes`)."""
        n, b = self.total(), self.total(what=1)
        lines = [f"capture {self.path}: {n} IP packets, {b} bytes" + (f" (and {self.non_ip} not IP)" if self.non_ip
                                                                      else ""),
                 f" {'kind':<11} {'ports':<11} {'DSCP':>4} {'tos':>5} {'data':>5} {'packets':>8} {'share':>6} "
                 f"{'bytes':>10} {'share':>6}"]
        ports = {"kv": "7000, 7200", "collective": "7300", "other": "-"}
        for (kind, dscp, data), (p, nb) in sorted(self.counts.items(),
                                                   key=lambda kv: (KINDS.index(kv[0][0]), kv[0][1], not kv[0][2])):
            lines.append(f" {LABEL[kind]:<11} {ports[kind]:<11} {dscp:>4} {f'0x{dscp << 2:02x}':>5} "
                         f"{'yes' if data else 'no':>5} {p:>8} {p / max(n, 1):>6.1%} {nb:>10} {nb / max(b, 1):>6.1%}")
        return lines


def kind_of(sport: int, dport: int) -> str:
    if sport in KV_PORTS or dport in KV_PORTS:
        return "kv"
    if sport in COLLECTIVE_PORTS or dport in COLLECTIVE_PORTS:
        return "collective"
    return "other"


def read_capture(path: Path) -> Capture:
    """Every packet of a pcap file counted by kind, DSCP and data (scapy). Raises ConfigError if it is no
    capture. Lengths come from the headers, so a capture of headers only (tcpdump -s 128) counts alike."""
    from scapy.error import Scapy_Exception
    from scapy.layers.inet import IP, TCP
    from scapy.utils import PcapReader

    cap = Capture(path)
    try:
        with PcapReader(str(path)) as reader:
            for p in reader:
                if IP not in p:
                    cap.non_ip += 1
                    continue
                ip = p[IP]
                tcp = p[TCP] if TCP in p else None
                kind = kind_of(tcp.sport, tcp.dport) if tcp else "other"
                data = tcp is None or ip.len - 4 * ip.ihl - 4 * tcp.dataofs > 0
                c = cap.counts.setdefault((kind, ip.tos >> 2, data), [0, 0])
                c[0] += 1
                c[1] += getattr(p, "wirelen", None) or len(p)  # the packet's length on the wire, not the snap
    except (OSError, EOFError, Scapy_Exception) as exc:
        raise ConfigError(str(path), f"cannot be read as a packet capture: {exc}") from None
    return cap


def _capture_of(run: Path, pred: dict) -> Capture | None:
    path = Path(pred.get("pcap") or run / PCAP)
    return read_capture(path) if pred.get("pcap") or path.is_file() else None


@contextlib.contextmanager
def capture():
    """Held around `lab check`'s run: once this process's run serves DualPath with isolation on, a tcpdump in
    pe1's namespace writes the first CAPTURE_PACKETS packets of its CNIC to <run>/cnic.pcap. It is started as
    the runner starts daemons (``emulator.procs``: its own session, SIGTERM if this thread dies) and stopped
    when the mode ends, after CAPTURE_S, or when the run does, whichever is first."""
    done = threading.Event()
    said: list[str] = []
    watcher = threading.Thread(target=_capture, args=(done, said), daemon=True, name="lab3-capture")
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join(timeout=30)
        from .terminal import console
        for line in said:
            console.print(line, markup=False)


def _capture(done: threading.Event, said: list[str]) -> None:
    from . import live
    procs, proc, log, deadline = ProcessGroup(), None, tempfile.TemporaryFile("w+"), 0.0
    try:
        while not done.wait(0.25):  # this process's run, once built and serving DualPath
            cur = live.current()
            if cur is None or cur.owner_pid != os.getpid():
                continue
            run = Path(cur.run_dir)
            if proc is None and (run / "dualpath" / "scheduler.json").is_file():
                plan = cur.plan()
                cnic = next(lk for lk in plan.net.links_of(CAPTURE_NODE) if lk.link_class == "cnic")
                proc = procs.start("tcpdump", plan.net.host(CAPTURE_NODE).netns, [
                    "tcpdump", "-i", cnic.host_intf, "-Z", "root", "-U", "-s", str(CAPTURE_SNAP),
                    "-c", str(CAPTURE_PACKETS), "-w", str(run / PCAP)], stdout=subprocess.DEVNULL, stderr=log)
                deadline = time.monotonic() + CAPTURE_S
                said.append(f"capture: {CAPTURE_PACKETS} packets of {CAPTURE_NODE}'s {cnic.host_intf} while "
                            f"DualPath serves, into {run / PCAP}")
            if proc is not None and (proc.poll() is not None or time.monotonic() > deadline
                                     or (run / "dualpath" / "links.csv").is_file()):
                break
    finally:
        if proc is not None:
            procs.stop(proc)
            log.seek(0)
            last = [ln for ln in log.read().splitlines() if "captured" in ln]
            said.append(f"capture: tcpdump ended ({last[-1] if last else f'exit code {proc.returncode}'})")
        log.close()


# -- grading --------------------------------------------------------------------------------------------------
def traffic_classes(run: Path) -> TrafficClasses:
    return TrafficClasses(**(yaml.safe_load((run / "scenario.yaml").read_text()).get("traffic_classes") or {}))


def _mark(key: str, pred: int, expected: int, kind: str, cap: Capture | None) -> Row:
    what = f"{LABEL[kind]} packets (port {', '.join(map(str, KV_PORTS if kind == 'kv' else COLLECTIVE_PORTS))})"
    config = f"traffic_classes.{key} = {expected} (tos 0x{expected << 2:02x})"
    if cap is None:
        return Row(key, pred, expected, "scenario", "exact", pred == expected,
                   f"the scenario marks every one of its {what} with {config}; no capture to see it in (--pcap)")
    marks, n = cap.marks(kind), sum(cap.marks(kind).values())
    seen = ", ".join(f"{c} carry DSCP {d}" for d, c in marks.items())
    bare = {d: c for d, c in cap.marks(kind, data=False).items() if d != expected}
    note = (f"; {sum(bare.values())} of its packets without data (handshake, acks) carry "
            f"{', '.join(f'DSCP {d}' for d in bare)}" if bare else "")
    if n == 0:
        return Row(key, pred, expected, "capture", "exact", False,
                   f"the capture holds no {what} with data: take it on a CNIC while DualPath serves")
    if marks.get(expected, 0) < n:
        return Row(key, pred, expected, "capture", "exact, every packet", False,
                   f"not every one of the capture's {n} {what} with data carries {config}: {seen}{note}")
    return Row(key, pred, expected, "capture", "exact, every packet", pred == expected,
               f"all {n} of the capture's {what} with data carry DSCP {expected}, the scenario's {config}{note}")


def _no_comparison(key: str, pred: dict) -> Row:
    return Row(key, pred[key], None, "measured", "-", False,
               "the results have no isolation comparison (serving.isolation_compare): grade a run of the lab's "
               "scenario, not a load, which serves one mode")


def kv_class_bytes(links_csv: Path) -> dict[str, int]:
    """Bytes per traffic class that left the CNICs upwards over a mode (every byte that crosses the compute
    fabric leaves exactly one CNIC upwards): last sample less first, per link and class."""
    first: dict[tuple[str, str], int] = {}
    last: dict[tuple[str, str], int] = {}
    with links_csv.open() as f:
        for r in csv.DictReader(f):
            if (r["link_class"], r["direction"]) == ("cnic", "up"):
                first.setdefault((r["link"], r["tclass"]), int(r["bytes"]))
                last[(r["link"], r["tclass"])] = int(r["bytes"])
    out: dict[str, int] = {}
    for (link, tclass), b in last.items():
        out[tclass] = out.get(tclass, 0) + b - first[(link, tclass)]
    return out


def wire_rate(run: Path) -> float:
    """A CNIC's rate in the run's bytes per real second (the real rate x the byte scale): an engine's own
    AllToAll bytes all leave through its CNIC, so they take bytes / this on the wire at best."""
    sc = yaml.safe_load((run / "scenario.yaml").read_text())
    return parse_rate(sc["cluster"]["cnic_rate"]) / 8 * sc["scale"]["bytes"]


def collectives(run: Path, mode: str, phase: str = "prefill") -> list[tuple[int, float, float]]:
    """(bytes, completion ms, wait ms) of each collective of a phase: the wait is the completion less the
    collective's own wire time, the part isolation decides (real ms)."""
    rate = wire_rate(run)
    with (run / mode / "collectives.csv").open() as f:
        return [(int(r["bytes"]), float(r["completion_s"]) * 1e3,
                 (float(r["completion_s"]) - int(r["bytes"]) / rate) * 1e3)
                for r in csv.DictReader(f) if r["phase"] == phase]


def runs_of(run: Path, tc: TrafficClasses) -> dict[str, str]:
    """The reference, isolation-on and isolation-off DualPath runs' directories (the flipped one is extra)."""
    flipped = f"dualpath-isolation-{'off' if tc.isolation else 'on'}"
    return {"reference": "oracle", "on": "dualpath" if tc.isolation else flipped,
            "off": flipped if tc.isolation else "dualpath"}


def p99_waits(run: Path, tc: TrafficClasses) -> dict[str, float] | None:
    dirs = runs_of(run, tc)
    if not all((run / d / "collectives.csv").is_file() for d in dirs.values()):
        return None
    return {k: online.percentile([w for _, _, w in collectives(run, d)], 99) for k, d in dirs.items()}


def grade(run: Path, pred: dict) -> list[Row]:
    s = load_json(run / "summary.json")
    tc = traffic_classes(run)
    cap = _capture_of(run, pred)
    rows = [_mark("dscp_kv", pred["dscp_kv"], tc.dscp_kv, "kv", cap),
            _mark("dscp_collective", pred["dscp_collective"], tc.dscp_collective, "collective", cap)]
    links = run / runs_of(run, tc)["on"] / "links.csv"
    per = kv_class_bytes(links) if links.is_file() else {}
    if per.get("link") and "kv" in per:
        why = (f"of the {per['link'] / 1e6:.1f} MB (scaled) that left the CNICs in DualPath, {per['kv'] / 1e6:.1f} "
               f"MB in the KV class 1:12 and {per.get('collective', 0) / 1e6:.1f} MB in the collectives' 1:11: a "
               f"turn's context KV crosses once (DE -> PE forward or PE -> DE push, with the new tokens' KV), the "
               f"AllToAlls carry each new and each generated token's hidden state through every MoE layer")
        if cap is not None and cap.total(what=1):
            why += f"; {cap.total('kv', 1) / cap.total(what=1):.0%} in the capture's short window"
        rows.append(within("kv_byte_share", pred["kv_byte_share"], per["kv"] / per["link"], "measured", why,
                           abs_tol=TOL_SHARE))
    else:
        rows.append(Row("kv_byte_share", pred["kv_byte_share"], None, "measured", "-", False,
                        "the run has no isolation-on DualPath run with per-class counters (dualpath/links.csv)"))
    iso, waits = s.get("isolation"), p99_waits(run, tc)
    if not iso or not waits:
        return rows + [_no_comparison(k, pred) for k in ("slowdown_on", "slowdown_off", "kv_rate_on_over_off")]
    done = {k: iso[k]["collective_s"]["prefill"]["p99"] * 1e3 for k in ("reference", "on", "off")}
    ref = f"{waits['reference']:.1f} ms with no KV at all (oracle)"
    on_x, off_x = waits["on"] / waits["reference"], waits["off"] / waits["reference"]
    rows.append(within(
        "slowdown_on", pred["slowdown_on"], on_x, "measured",
        f"isolation on: the collectives' own HTB class (1:11, prio 0, {tc.collective_share:.1%} guaranteed) leaves "
        f"ahead of any queued KV: p99 wait {waits['on']:.1f} ms against {ref} (completion p99 {done['on']:.0f} "
        f"against {done['reference']:.0f} ms, set by the biggest batches' own bytes)", abs_tol=TOL_ON))
    queue = Emulation(**yaml.safe_load((run / "scenario.yaml").read_text()).get("emulation") or {}).queue
    why = (f"isolation off: one FIFO per port, so a collective's messages and acks queue behind the KV ahead of "
           f"them, up to a port's queue ({queue * 1e3:g} ms) at each hop: p99 wait {waits['off']:.1f} ms against "
           f"{ref} (completion p99 {done['off']:.0f} against {done['reference']:.0f} ms)")
    why += f"; this run stayed below {SLOW_LINE:g}x: see TEACHER.md" if off_x < SLOW_LINE else ""
    rows.append(Row("slowdown_off", pred["slowdown_off"], round(off_x, 4), "measured", f"same side of {SLOW_LINE:g}x",
                    (pred["slowdown_off"] >= SLOW_LINE) == (off_x >= SLOW_LINE), why))
    kv_on, kv_off = iso["on"].get("cnic_kv_gbps"), iso["off"].get("cnic_kv_gbps")
    if kv_on and kv_off:
        rows.append(within(
            "kv_rate_on_over_off", pred["kv_rate_on_over_off"], kv_on / kv_off, "measured",
            f"KV's class is guaranteed only {tc.kv_share:.0%} of a CNIC but may borrow up to the link rate (HTB "
            f"ceil), every gap the collectives leave: work-conserving, so it moves what it moves in one FIFO, "
            f"{kv_on:.0f} against {kv_off:.0f} Gbit/s (real)", abs_tol=TOL_KV_RATE))
    else:
        rows.append(Row("kv_rate_on_over_off", pred["kv_rate_on_over_off"], None, "measured", "-", False,
                        "the run has no KV throughput on the compute fabric (cnic_kv_gbps)"))
    return rows


# -- the picture ----------------------------------------------------------------------------------------------
STYLE = {"reference": ("reference: no KV (oracle)", "tab:gray"), "on": ("KV, isolation on", "tab:blue"),
         "off": ("KV, isolation off", "tab:red")}


def picture(run: Path, pred: dict, out: Path) -> str | None:
    """isolation.png: the prefill AllToAlls' completion against their bytes (each one's own wire time a line),
    the CDF of their wait (your predicted p99s dashed), and the capture's packets per DSCP and kind; and
    capture.txt, the capture's counts."""
    tc = traffic_classes(run)
    runs = {k: d for k, d in runs_of(run, tc).items() if (run / d / "collectives.csv").is_file()}
    cap = _capture_of(run, pred)
    if not runs and cap is None:
        return None
    if cap is not None:
        (out / "capture.txt").write_text("\n".join(cap.table()) + "\n")
    plt = report._plt()
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.2))
    rate, ref99 = wire_rate(run), None
    for key, d in runs.items():
        (label, color), rows = STYLE[key], collectives(run, d)
        if not rows:
            continue
        ax1.scatter([b / 1e3 for b, _, _ in rows], [c for _, c, _ in rows], s=6, color=color, alpha=0.6, label=label)
        waits = sorted(max(w, 0.1) for _, _, w in rows)  # a small one passes in HTB's burst: no wait
        p99 = online.percentile([w for _, _, w in rows], 99)
        ref99 = p99 if key == "reference" else ref99
        ax2.step(waits, [(i + 1) / len(waits) for i in range(len(waits))], where="post", color=color,
                 label=f"{label}: p99 {p99:.1f} ms")
    top = max((b for d in runs.values() for b, _, _ in collectives(run, d)), default=1)
    ax1.plot([1, top / 1e3], [1e3 / rate * 1e3, top / rate * 1e3], color="black", linewidth=0.8,
             label="its own bytes at the CNIC rate")
    ax1.set(xscale="log", yscale="log", xlabel="bytes one engine sends (KB, scaled)", ylabel="completion, real ms")
    ax1.set_title("prefill AllToAll: completion against size", fontsize=9, loc="left")
    if ref99 is not None:
        for key, color in (("slowdown_on", "tab:blue"), ("slowdown_off", "tab:red")):
            ax2.axvline(ref99 * pred[key], color=color, linestyle="--", linewidth=1,
                        label=f"your p99, {key.removeprefix('slowdown_')}: {ref99 * pred[key]:.1f} ms")
    ax2.set(xscale="log", xlabel="wait beyond its own wire time, real ms (log; 0.1: none)",
            ylabel="fraction of collectives")
    ax2.axhline(0.99, color="black", linewidth=0.5, linestyle=":")
    ax2.set_title("prefill AllToAll: wait", fontsize=9, loc="left")
    for ax in (ax1, ax2):
        ax.legend(fontsize=7, loc="upper left")
        ax.grid(alpha=0.3)
    if cap is not None and cap.counts:
        dscps = sorted({d for _, d, _ in cap.counts})
        bottom = [0] * len(dscps)
        for kind, color in (("kv", "tab:green"), ("collective", "tab:purple"), ("other", "tab:gray")):
            n = [sum(c[0] for (k, dd, _), c in cap.counts.items() if (k, dd) == (kind, d)) for d in dscps]
            if any(n):
                ax3.bar([str(d) for d in dscps], n, bottom=bottom, color=color, label=f"{LABEL[kind]} ({sum(n)})")
                bottom = [a + b for a, b in zip(bottom, n, strict=True)]
        ax3.set(xlabel="DSCP (IP tos >> 2)", ylabel="packets (log)", yscale="log")
        ax3.legend(fontsize=7)
        ax3.set_title(f"capture: {cap.path.name}, {cap.total()} packets", fontsize=9, loc="left")
    else:
        ax3.text(0.5, 0.5, "no capture\n(--pcap FILE)", ha="center", va="center", transform=ax3.transAxes)
        ax3.set_axis_off()
    fig.tight_layout()
    fig.savefig(out / "isolation.png", dpi=110)
    plt.close(fig)
    return "isolation.png"


def _dscp(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 63:
        raise ValueError(f"{value!r} is not a DSCP value (an integer 0..63: the IP tos byte >> 2)")
    return value


LAB = Lab(
    title="Lab 3: traffic classes",
    keys=(
        Key("dscp_kv", "an integer 0..63: the DSCP every KV packet carries (IP tos >> 2)", parse=_dscp),
        Key("dscp_collective", "an integer 0..63: the DSCP every collective packet carries", parse=_dscp),
        Key("kv_byte_share", "a fraction 0..1: the share of the bytes DualPath puts on the CNICs that is KV"),
        Key("slowdown_on", "x: the prefill AllToAlls' p99 wait with isolation on / with no KV at all"),
        Key("slowdown_off", "x: the prefill AllToAlls' p99 wait with isolation off / with no KV at all"),
        Key("kv_rate_on_over_off", "x: KV throughput on the compute fabric, isolation on / isolation off"),
    ),
    grades="run", grade=grade, picture=picture, trust=run_trust, capture=capture)


if __name__ == "__main__":
    for name in sys.argv[1:]:
        print("\n".join(read_capture(Path(name)).table()))

"""dpemu's agent on one server of a run spread over several (``python -m emulator.agent``, started over ssh).

It reads one JSON request per line on stdin and answers one JSON line on stdout: ``{"id", "op", "args"}`` in,
``{"id", "ok", "result" | "error"}`` out. On its server it does what dpemu does on its own: it holds the
machine's lock and the manifest of what the run creates there (:mod:`emulator.registry`), makes tunnel ends and
moves them into the run's namespaces, applies tc plans and GSO caps (:mod:`emulator.tcplan`), reads HTB class
counters (:mod:`emulator.tcstats`) and the CPU, and removes the run's objects (:mod:`emulator.cleanup`). When
stdin ends (dpemu closed it, died, or the ssh connection broke) it removes whatever of the run is still on its
server and exits: nothing of a run outlives its coordinator.

Every op acts only on names the coordinator passes, all of them in the project's prefix grammar or inside the
run's own namespaces; nothing is matched by pattern but :func:`emulator.cleanup.clean`'s exact prefix.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from . import cleanup, dequeue, kernel
from .monitor import cpu_times
from .names import PREFIX, is_owned
from .registry import Registry
from .servers import source_digest
from .tcplan import TcOp, apply as apply_tc
from .tcstats import ClassCounters


class Ops:
    """The agent's operations; each returns something JSON can carry."""

    def __init__(self, server: str, run_id: str, workdir: str | None = None):
        self.server = server
        self.run_id = run_id
        self.workdir = workdir  # where runs keep their files on this server
        self.registry = Registry()
        self._counters: dict[str | None, ClassCounters] = {}
        self._index: dict[tuple[str | None, str], int] = {}
        self._dequeue: dequeue.DequeueMonitor | None = None
        # this server's own tracefs instance: two servers may share one kernel (the test harness), and cleanup
        # here removes only this one
        dequeue.INSTANCE = f"{PREFIX}dequeue-{server}"

    # -- the run's ownership of this server -------------------------------------
    def hello(self) -> dict:
        return {"server": self.server, "digest": source_digest(), "python": sys.version.split()[0],
                "kernel": os.uname().release, "pid": os.getpid(), "gretap": _can_make("gretap")}

    def begin(self, netns: list[str], links: list[str]) -> dict:
        self.registry.acquire()
        report = cleanup.clean(self.registry)  # what a killed run left here, by its manifest and our names
        self.registry.begin(self.run_id, netns, links)
        return {"cleaned": {"netns": report.netns, "links": report.links, "procs": report.procs}}

    def clean(self) -> dict:
        """Remove what a killed run left on this server (``dpemu clean --servers``)."""
        if self.registry._lock_fd is None:  # noqa: SLF001 - the agent owns its registry
            self.registry.acquire()
        left = self.registry.leftover()
        r = cleanup.clean(self.registry)
        files = self._drop_files(left.run_id) if left else []
        return {"procs": r.procs, "netns": r.netns, "links": r.links, "left": r.left + files}

    def _drop_files(self, run_id: str) -> list[str]:
        """Remove a run's copy of its files here; what could not be removed."""
        if not self.workdir or not run_id or "/" in run_id:
            return []
        path = Path(self.workdir) / run_id
        shutil.rmtree(path, ignore_errors=True)
        return [str(path)] if path.exists() else []

    def teardown(self, netns: list[str], links: list[str]) -> dict:
        """Remove the run's namespaces (and what runs in them), links, and its copy of the run's files."""
        inside = [pid for name in netns for pid in kernel.netns_pids(name)]
        kernel.kill_pids([(pid, kernel.proc_start_time(pid)) for pid in inside], grace_s=0.5)
        for name in netns:
            kernel.delete_netns(name)
        self._close_counters()
        left = kernel.delete_links([n for n in links if is_owned(n)])
        left += [n for n in kernel.list_netns() if n in set(netns)]
        left += self._drop_files(self.run_id)
        if not left and self.registry.manifest is not None:
            self.registry.end()
        return {"left": left}

    # -- building -----------------------------------------------------------------
    def underlay(self, peer: str) -> dict:
        """The device, source address and MTU this server reaches `peer` by."""
        words = kernel.run_argv(["ip", "-o", "route", "get", peer]).stdout.split()
        dev, src = words[words.index("dev") + 1], words[words.index("src") + 1]
        mtu = int(Path(f"/sys/class/net/{dev}/mtu").read_text())
        return {"dev": dev, "src": src, "mtu": mtu}

    def attach(self, netns: str, pid: int) -> None:
        kernel.run_argv(["ip", "netns", "attach", netns, str(pid)])

    def tunnel(self, **end) -> None:
        make_tunnel_end(**end)

    def mtu(self, items: list[list]) -> None:
        for netns, dev, mtu in items:
            kernel.run_argv(["ip", *(["-n", netns] if netns else []), "link", "set", dev, "mtu", str(mtu)])

    def tc(self, ops: list[dict], replace: bool = False) -> None:
        """Apply tc ops, grouped by namespace; `replace`: delete each device's root qdisc first."""
        by_ns: dict[str | None, list[TcOp]] = {}
        for d in ops:
            op = TcOp(d["netns"], d["dev"], d["op"], d["kind"], d["handle"], d["parent"],
                      tuple((k, v) for k, v in d["params"]))
            by_ns.setdefault(op.netns, []).append(op)
        for netns, group in by_ns.items():
            ipr = kernel.netlink(netns)
            try:
                apply_tc(ipr, group, replace)
            finally:
                ipr.close()

    def gso(self, items: list[list]) -> None:
        for netns, dev, size, segs in items:
            ipr = kernel.netlink(netns)
            try:
                (idx,) = ipr.link_lookup(ifname=dev)
                ipr.link("set", index=idx, gso_max_size=size, gso_max_segs=segs)
            finally:
                ipr.close()

    def sysctl(self, netns: str | None, settings: list[str]) -> None:
        prefix = ["ip", "netns", "exec", netns] if netns else []
        kernel.run_argv([*prefix, "sysctl", "-q", "-w", *settings])

    def no_ipv6(self, names: list[str]) -> None:
        for name in names:
            path = Path(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6")
            if is_owned(name) and path.exists():
                path.write_text("1")

    def link_up(self, netns: str | None, dev: str, up: bool) -> None:
        kernel.set_link_state(netns, dev, up)

    # -- measuring ----------------------------------------------------------------
    def clock(self) -> dict:
        return {"mono": time.monotonic(), "wall": time.time()}

    def cpu(self) -> list:
        busy, total = cpu_times()
        return [time.monotonic(), busy, total]

    def counters(self, groups: list[list]) -> list[list]:
        """[[netns, dev, t_read (this server's monotonic clock), {classid: [bytes, packets, drops, backlog]}]]."""
        out = []
        for netns, dev, classids in groups:
            if netns not in self._counters:
                self._counters[netns] = ClassCounters(netns)
            if (netns, dev) not in self._index:
                ipr = kernel.netlink(netns)
                try:
                    (self._index[(netns, dev)],) = ipr.link_lookup(ifname=dev)
                finally:
                    ipr.close()
            classes = self._counters[netns].dump(self._index[(netns, dev)])
            t_read = time.monotonic()
            out.append([netns, dev, t_read, {str(c): list(classes[c]) for c in classids if c in classes}])
        return out

    def link_stats(self, items: list[list]) -> list[list]:
        """[[netns, dev, tx_bytes, tx_packets, rx_bytes, rx_packets]] from the interfaces' own counters."""
        out = []
        for netns, dev in items:
            ipr = kernel.netlink(netns)
            try:
                (link,) = ipr.get_links(ifname=dev)
                s = link.get_attr("IFLA_STATS64")
                out.append([netns, dev, s["tx_bytes"], s["tx_packets"], s["rx_bytes"], s["rx_packets"]])
            finally:
                ipr.close()
        return out

    def dequeue_start(self, watched: list[list], on_s: float, off_s: float) -> str | None:
        """Dequeue timing of this server's `watched` interfaces ([dev, rate_bps, group]), in a tracefs instance
        named for this server (two servers may share a kernel in the test harness); why not, if it cannot."""
        problem = dequeue.available()
        if problem is None:
            self._dequeue = dequeue.DequeueMonitor([dequeue.Watched(*w) for w in watched], on_s=on_s, off_s=off_s)
            self._dequeue.start()
        return problem

    def dequeue_stop(self) -> dict:
        mon, self._dequeue = self._dequeue, None
        if mon is None:
            return {"errors": {}, "error": "not started"}
        errors = mon.stop()
        return {"errors": errors, "error": mon.error}

    def _close_counters(self) -> None:
        for c in self._counters.values():
            c.close()
        self._counters.clear()
        self._index.clear()

    def at_exit(self) -> None:
        """stdin ended: remove what is left of the run here, then give the machine back."""
        self._close_counters()
        if self._dequeue is not None:
            self._dequeue.stop()
        if self.registry.manifest is not None:
            cleanup.clean(self.registry)
            self._drop_files(self.run_id)
        self.registry.release()


def make_tunnel_end(name: str, kind: str, key: int, local: str, remote: str, dev: str, mtu: int,
                    pid: int | None = None, temp: str | None = None) -> None:
    """One end of a tunnel, made in this server's root namespace (its underlay socket stays there). A switch's
    end is the switch port (`name`, an owned name); a host's end is made as `temp` (owned) and moved into the
    namespace of process `pid` (the host's shell), where it takes its name."""
    made = temp if pid else name
    if kind == "vxlan":
        spec = ["type", "vxlan", "id", str(key), "local", local, "remote", remote, "dstport", "4789", "dev", dev]
    else:
        spec = ["type", "gretap", "local", local, "remote", remote, "key", str(key), "ttl", "64"]
    kernel.run_argv(["ip", "link", "add", made, *spec])
    kernel.run_argv(["ip", "link", "set", made, "mtu", str(mtu)])
    if pid:
        kernel.run_argv(["ip", "link", "set", made, "netns", str(pid)])
        kernel.run_argv(["nsenter", "-t", str(pid), "-n", "ip", "link", "set", made, "name", name, "up"])
    else:
        kernel.run_argv(["ip", "link", "set", name, "up"])


def _can_make(kind: str) -> bool:
    """Whether this kernel makes links of `kind` (this VM's has no gretap)."""
    name = f"dp-probe{os.getpid() % 100000}"
    made = subprocess.run(["ip", "link", "add", name, "type", kind, "remote", "192.0.2.1", "local", "192.0.2.2"],
                          capture_output=True).returncode == 0
    if made:
        subprocess.run(["ip", "link", "del", name], capture_output=True)
    return made


def serve(ops: Ops, inp, out) -> None:
    for line in inp:
        if not line.strip():
            continue
        rid = None
        try:
            req = json.loads(line)
            rid = req.get("id")
            if not isinstance(req.get("op"), str) or req["op"].startswith("_") or not hasattr(ops, req["op"]):
                raise ValueError(f"no op {req.get('op')!r}")
            reply = {"id": rid, "ok": True, "result": getattr(ops, req["op"])(**req.get("args", {}))}
            text = json.dumps(reply)
        except Exception as exc:  # noqa: BLE001 - every failure goes back to the coordinator as a message
            text = json.dumps({"id": rid, "ok": False, "error": f"{type(exc).__name__}: {exc}"})
        out.write(text + "\n")
        out.flush()


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


def _exit(signum, _frame) -> None:
    """The first stop signal ends the serve loop; the ones that follow it (the end of an ssh session brings a
    hangup and the parent-death SIGTERM together) must not cut the cleanup short on the way out."""
    _ignore_stops()
    raise SystemExit(128 + signum)


def _ignore_stops() -> None:
    for sig in _STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m emulator.agent", description=__doc__.split("\n\n")[0])
    p.add_argument("--server", required=True)
    p.add_argument("--run", required=True)
    p.add_argument("--workdir", help="where runs keep their files on this server")
    a = p.parse_args(argv)
    ops = Ops(a.server, a.run, a.workdir)
    for sig in _STOP_SIGNALS:  # its ssh ended: clean up on the way out
        signal.signal(sig, _exit)
    try:
        serve(ops, sys.stdin, sys.stdout)
    finally:
        _ignore_stops()  # stdin ended, or a signal came: nothing stops the cleanup now
        ops.at_exit()
    return 0


if __name__ == "__main__":
    sys.exit(main())

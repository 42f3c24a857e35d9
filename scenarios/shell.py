"""The live cluster's prompt, in Mininet's habit (``dpemu up`` in a terminal).

    dpemu> pe1 ping -c 3 de2            a command in a node's namespace; de2 becomes de2's address
    dpemu> pe1 tc -s qdisc show dev pe1-snic
    dpemu> load mode=dualpath agents=32 a workload on the cluster (as `dpemu load`), its table at the end
    dpemu> links | nodes | top | help | exit

A node name among a command's words is replaced by that node's address on the first fabric both nodes share:
the storage fabric for two compute nodes (their SNICs), else a compute rail, else the management network (the
control host ctl1 shares only that). ``de2.cnic0``, ``de2.snic`` and ``de2.mgmt`` name one NIC's address.
Line editing and history come from readline (history in ~/.dpemu_history). Ctrl-C stops the command in the
foreground (a ping, a load) and keeps the cluster up; Ctrl-C at the empty prompt, ``exit`` or Ctrl-D bring the
cluster down. Commands run as argv lists in the node's namespace (``ip netns exec``), never through a shell.
"""

from __future__ import annotations

import cmd
import json
import shlex
import subprocess
import sys
import threading
from pathlib import Path

from emulator.errors import DpemuError
from emulator.spec import NetSpec
from emulator.units import format_rate

from . import terminal, up

HISTORY = Path("~/.dpemu_history").expanduser()


def addresses(net: NetSpec) -> dict[str, dict[str, str]]:
    """Per node, its NICs' addresses: {"pe1": {"snic": ..., "cnic0": ..., "mgmt": ...}}."""
    out: dict[str, dict[str, str]] = {h.name: {} for h in net.hosts}
    for c in net.cables():
        out[c.host][c.nic] = c.addr
    return out


def address_for(net: NetSpec, src: str, word: str) -> str | None:
    """The address that `word` names as seen from node `src` (None: not a node): ``de2`` -> de2's address on
    the first fabric src and de2 share (storage, then a compute rail, then management); ``de2.cnic0`` -> that
    NIC's address."""
    node, _, nic = word.partition(".")
    nics = addresses(net).get(node)
    if nics is None:
        return None
    if nic:
        return nics.get(nic)
    mine = {c.switch for c in net.cables() if c.host == src}
    order = {"snic": 0, "nic": 0, "mgmt": 2}  # storage fabric, then the rails (cnic<r>), then management
    for c in sorted((c for c in net.cables() if c.host == node), key=lambda c: (order.get(c.nic, 1), c.nic)):
        if c.switch in mine:
            return c.addr
    return nics.get("mgmt")


def node_argv(net: NetSpec, node: str, words: list[str]) -> list[str]:
    """``ip netns exec dp-<node> CMD`` with node names among CMD's words replaced by addresses."""
    cmdline = [address_for(net, node, w) or w for w in words]
    return ["ip", "netns", "exec", net.host(node).netns, *cmdline]


class Prompt(cmd.Cmd):
    """The prompt; it runs in a thread of the ``dpemu up`` process, whose main thread owns the cluster."""

    intro = ""
    prompt = "dpemu> "

    def __init__(self, cluster: up.Cluster, live_scenario: str):
        super().__init__()
        self.cluster, self.live_scenario = cluster, live_scenario
        self.net = cluster.plan.net
        self.nodes = [h.name for h in self.net.hosts]
        self.foreground = threading.Event()  # a command of ours runs in the foreground: Ctrl-C is its

    # -- the owner asks: is a Ctrl-C now the foreground command's?
    def hold(self) -> bool:
        return self.foreground.is_set()

    def run(self) -> None:
        try:
            import readline
            readline.set_history_length(1000)
            if HISTORY.exists():
                readline.read_history_file(HISTORY)
        except (ImportError, OSError):
            readline = None
        try:
            self.cmdloop()
        finally:
            if readline is not None:
                try:
                    readline.write_history_file(HISTORY)
                except OSError:
                    pass

    def emptyline(self) -> bool:
        return False

    def default(self, line: str) -> bool:
        try:
            words = shlex.split(line)
        except ValueError as exc:
            terminal.console.print(f"cannot parse: {exc}", markup=False)
            return False
        if words and words[0] in self.nodes:
            if len(words) == 1:
                terminal.console.print(f"usage: {words[0]} COMMAND ... (e.g. {words[0]} ip -br addr)")
                return False
            self._foreground(node_argv(self.net, words[0], words[1:]))
        else:
            terminal.console.print(f"unknown command {words[0]!r}: a node ({', '.join(self.nodes)}) and a "
                                   "command, or one of load, links, nodes, top, help, exit", markup=False)
        return False

    def completenames(self, text, *ignored):
        return [n for n in self.nodes if n.startswith(text)] + super().completenames(text, *ignored)

    def _foreground(self, argv: list[str]) -> int | None:
        self.foreground.set()
        try:
            return subprocess.run(argv, check=False).returncode
        except KeyboardInterrupt:
            return None
        except OSError as exc:
            terminal.console.print(f"cannot run {argv[0]}: {exc}", markup=False)
            return None
        finally:
            self.foreground.clear()

    def do_load(self, arg: str) -> bool:
        """load [mode=M] [agents=N] [turns=T] [seed=S] [KEY=VALUE ...]: serve a workload on the cluster, as
        `dpemu load` does; results in a run directory of its own."""
        try:
            plan = up.load_plan(self.live_scenario, self.cluster.plan, up.load_sets(shlex.split(arg)))
        except (DpemuError, ValueError) as exc:
            terminal.console.print(f"load: {exc}", markup=False)
            return False
        with terminal.progress_bar() as bar:
            task = bar.add_task("starting", total=1)
            job = up.Load(plan, say=terminal.console.print,
                          progress=lambda what, done, total: bar.update(task, description=what, completed=done,
                                                                        total=total))
            self.cluster.jobs.put(job)
            job.done.wait()
        if job.run_dir is None:
            terminal.console.print(f"load: {job.error}", markup=False)
        else:
            summary = json.loads((job.run_dir / "summary.json").read_text())
            terminal.print_run(summary, job.run_dir, calibration=False)
        return False

    def do_links(self, _arg: str) -> bool:
        """links: every shaped link, its class, its configured rate (real, and on this machine) and address."""
        sc = self.cluster.plan.scenario
        real = sc.scale.time / sc.scale.bytes
        terminal.console.print(f"{'link':14s} {'class':6s} {'real':>9s} {'here':>11s}  {'address':15s} bridge",
                               markup=False)
        for lk in self.net.links:
            terminal.console.print(f"{lk.host + '-' + lk.nic:14s} {lk.link_class:6s} "
                                   f"{format_rate(lk.rate_bps * real):>9s} {format_rate(lk.rate_bps, 4):>11s}  "
                                   f"{lk.addr:15s} {self.net.switch(lk.switch).bridge}", markup=False)
        return False

    def do_nodes(self, _arg: str) -> bool:
        """nodes: every node, its namespace and its addresses."""
        for line in node_lines(self.net):
            terminal.console.print(line, markup=False)
        return False

    def do_top(self, _arg: str) -> bool:
        """top: the live view of the cluster's NICs and serving plane (q or Ctrl-C to come back)."""
        self._foreground([sys.executable, "-m", "scenarios.cli", "top"])
        return False

    def do_exit(self, _arg: str) -> bool:
        """exit: bring the cluster down (as Ctrl-D, or Ctrl-C at an empty prompt)."""
        self.cluster.jobs.put(None)
        return True

    do_quit = do_exit

    def do_EOF(self, arg: str) -> bool:  # noqa: N802 - cmd's name for Ctrl-D
        terminal.console.print()
        return self.do_exit(arg)


def node_lines(net: NetSpec) -> list[str]:
    """The nodes, their namespaces and addresses, a line each (the banner of `dpemu up` and `nodes`)."""
    addr = addresses(net)
    out = [f"{'node':5s} {'role':4s} {'namespace':10s} addresses"]
    for h in net.hosts:
        nics = addr[h.name]
        out.append(f"{h.name:5s} {h.role:4s} {h.netns:10s} "
                   + " ".join(f"{nic} {a}" for nic, a in sorted(nics.items(), key=lambda kv: kv[0] == "mgmt")))
    return out

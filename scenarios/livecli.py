"""The live cluster's commands: ``dpemu up``, ``down``, ``load`` and ``exec`` (scenarios/up.py does the work).

    dpemu up SCENARIO [--set KEY=VALUE ...] [--out DIR] [--no-prompt]
    dpemu load [mode=M] [agents=N] [turns=T] [KEY=VALUE ...]
    dpemu exec NODE -- CMD ...
    dpemu down
"""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path

from emulator import cleanup
from emulator.errors import BusyError, ConfigError
from emulator.registry import Registry

from . import live, platform, schema, shell, terminal, up
from .plan import make_plan
from .terminal import EXIT_ERROR, EXIT_OK, console


def cmd_up(args) -> int:
    points = schema.sweep_points(args.scenario, args.set)  # every problem named before anything is built
    if len(points) > 1 or points[0].label:
        console.print(f"{args.scenario} is a sweep: the cluster of its first point ({points[0].label}) comes up; "
                      "loads change serving keys only")
    plan = make_plan(points[0].scenario)
    interactive = sys.stdin.isatty() and not args.no_prompt
    saved_tty = _tty_state()

    def on_up(cluster: up.Cluster):
        console.print(terminal.calibration_table(json.loads((cluster.run_dir / "summary.json").read_text())))
        for line in banner(cluster):
            console.print(line, markup=False)
        if not interactive:
            return None
        prompt = shell.Prompt(cluster, str(cluster.run_dir / "scenario.yaml"))
        threading.Thread(target=prompt.run, daemon=True, name="prompt").start()
        return prompt.hold

    with terminal.progress_bar() as bar:
        task = bar.add_task("calibrating", total=len(plan.rounds))
        progress = [lambda what, done, total: bar.update(task, description=what, completed=done, total=total)]

        def started(cluster: up.Cluster):
            bar.stop()  # the prompt and the banner own the terminal from here
            progress[0] = lambda *_: None
            return on_up(cluster)

        try:
            summary = up.own(plan, Path(args.out), say=console.print,
                             progress=lambda *a: progress[0](*a), on_up=started)
        finally:
            _tty_restore(saved_tty)
    console.print(f"the cluster is down: built in {summary['build_s']:.1f}s, torn down in "
                  f"{summary['teardown_s']:.1f}s; nothing it created is left")
    return EXIT_OK


def banner(cluster: up.Cluster) -> list[str]:
    """What `dpemu up` prints once the cluster is up: its nodes, their addresses, and how to get in."""
    sc = cluster.plan.scenario
    f = json.loads((cluster.run_dir / "summary.json").read_text())["fidelity"]
    err = f["link_rate_error_max"]
    lines = [f"the cluster of {sc.name} is up: {len(cluster.plan.net.hosts)} nodes, {len(cluster.plan.net.links)} "
             f"shaped links (worst link error {'-' if err is None else f'{err:.2%}'}; bytes x{sc.scale.bytes:g}, "
             f"time x{sc.scale.time:g})", *shell.node_lines(cluster.plan.net), "",
             "get in:    sudo dpemu exec pe1 -- bash          (or sudo ip netns exec dp-pe1 bash)",
             "look:      sudo dpemu top                        (NIC rates, queues, drops; the serving plane)",
             "serve:     sudo dpemu load mode=dualpath agents=32",
             f"results:   {cluster.run_dir}",
             "it stays up until Ctrl-C here or `sudo dpemu down`"]
    return lines


def _tty_state():
    try:
        import termios
        return termios.tcgetattr(sys.stdin.fileno()) if sys.stdin.isatty() else None
    except (ImportError, OSError):
        return None


def _tty_restore(state) -> None:
    """The terminal as it was: a prompt thread left in readline must not leave it without echo."""
    if state is not None:
        import termios
        try:
            termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, state)
        except OSError:
            pass


def cmd_load(args) -> int:
    sets = up.load_sets(args.words) + list(args.set)
    cluster = live.require("up")
    up.load_plan(cluster.scenario_file, cluster.plan(), sets)  # every problem named before the cluster is asked
    with terminal.progress_bar() as bar:
        task = bar.add_task("starting", total=1)
        run_dir = up.request_load(cluster.socket, sets, on_say=console.print,
                                  on_progress=lambda what, done, total: bar.update(
                                      task, description=what, completed=done, total=total))
    summary = json.loads((run_dir / "summary.json").read_text())
    terminal.print_run(summary, run_dir, calibration=False)
    return terminal.exit_code(summary)


def cmd_exec(args) -> int:
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        raise ConfigError("exec", "no command: dpemu exec NODE -- CMD ...")
    platform.require_root()
    net = live.require().plan().net
    names = [h.name for h in net.hosts]
    if args.node not in names:
        raise ConfigError("exec", f"no node {args.node!r} in the live cluster; its nodes: {', '.join(names)}")
    argv = ["ip", "netns", "exec", net.host(args.node).netns, *cmd]
    sys.stdout.flush()
    os.execvp(argv[0], argv)  # the command's exit code is exec's  # noqa: RET503


def cmd_down(args) -> int:
    platform.require_root()
    cluster = live.current()
    if cluster is not None:  # a live owner: it tears its own cluster down (and the next run may take the lock)
        if cluster.kind != "up":
            raise ConfigError("down", f"the live cluster is a `dpemu {cluster.kind}` (pid {cluster.owner_pid}); "
                                      "stop it with Ctrl-C where it runs")
        took = up.stop_owner(cluster, timeout_s=args.timeout)
        console.print(f"dpemu up (pid {cluster.owner_pid}) went down in {took:.1f}s")
        return EXIT_OK
    try:  # no live owner: remove what a killed one left
        with Registry() as reg:
            report = cleanup.clean(reg) if reg.leftover() else None
            live.withdraw()
    except BusyError as exc:
        raise ConfigError("down", f"{exc} (a `dpemu run`, or an up that is still starting)") from None
    if report is None:
        console.print("no dpemu cluster is up; nothing to do")
        return EXIT_OK
    console.print(f"removed what a killed cluster left: {len(report.netns)} namespace(s), "
                  f"{len(report.links)} interface(s)/bridge(s), {len(report.procs)} process(es)")
    if report.left:
        terminal.err_console.print(f"could not remove: {', '.join(report.left)}")
        return EXIT_ERROR
    return EXIT_OK


def add_parser(sub) -> None:
    u = sub.add_parser("up", help="build and calibrate a cluster and keep it up, serving plane idle, with a prompt")
    u.add_argument("scenario", help="a shipped scenario name (dpemu list) or a YAML file")
    u.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a scenario field")
    u.add_argument("--out", default="results", help="results root (default: ./results)")
    u.add_argument("--no-prompt", action="store_true", help="no prompt even on a terminal: wait for Ctrl-C or down")
    u.set_defaults(func=cmd_up)
    d = sub.add_parser("down", help="bring the live cluster down (and remove what a killed one left)")
    d.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for its teardown (default 120)")
    d.set_defaults(func=cmd_down)
    lo = sub.add_parser("load", help="serve a workload on the live cluster, e.g. mode=dualpath agents=32",
                        epilog=f"short keys: {', '.join(up.LOAD_KEYS)}; any scenario key as serving.x.y=VALUE")
    lo.add_argument("words", nargs="*", metavar="KEY=VALUE")
    lo.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a scenario key (serving.*)")
    lo.set_defaults(func=cmd_load)
    e = sub.add_parser("exec", help="run a command in a node's namespace: dpemu exec pe1 -- tc -s qdisc")
    e.add_argument("node")
    e.add_argument("command", nargs="...", metavar="-- CMD")
    e.set_defaults(func=cmd_exec)


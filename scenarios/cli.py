"""The ``dpemu`` command line: the only place that prints and picks exit codes.

    dpemu run SCENARIO [--set KEY=VALUE ...] [--out DIR]
    dpemu plan SCENARIO [--set ...]        (no root needed)
    dpemu check                            what this machine lacks
    dpemu clean [--servers [SCENARIO]]     remove leftovers of a killed run (also on its other servers)
    dpemu testbed up|down|status           a second server on this machine (docs/distributed.md)
    dpemu list                             the scenarios that ship
    dpemu bench rates|load|serve          re-measure the limits in emulator/fidelity.py, a turn's cost
    dpemu bench gpu                        the profiled GPU model's checks (Fig. 3; no root needed)

Exit codes: 0 done and trustworthy; 1 error (bad input, missing tool, busy);
2 usage; 3 finished but the fidelity check failed; 4 finished, but turns failed
or a mode did not finish (an injected fault, a daemon that died: summary.json
holds every mode that finished and each fault's effect); 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


from emulator import cleanup
from emulator.errors import DpemuError
from emulator.registry import Registry

from . import bench, labs, live, livecli, platform, report, reproduce, runner, schema, servercli, top
from .plan import make_plan, plan_text
from .terminal import (EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, run_points,
                       progress_bar, console, err_console)

def cmd_run(args) -> int:
    return run_points(schema.sweep_points(args.scenario, args.set), Path(args.out))[1]


def cmd_plan(args) -> int:
    points = schema.sweep_points(args.scenario, args.set)
    if len(points) > 1 or points[0].label:
        what = (f"capacity search from {len(points)} points, up to {points[0].search.probes} runs each"
                if points[0].search else f"sweep of {len(points)} runs")
        sys.stdout.write(f"# {what}, each planned as below with its values set:\n"
                         + "".join(f"#   {p.label}\n" for p in points) + "# the first run:\n")
    plans = [make_plan(p.scenario) for p in points]
    sys.stdout.write(plan_text(plans[0]))
    problems = [f"{p.label}: {msg}" for p, plan in zip(points, plans, strict=True) for msg in plan.problems]
    if problems and len(points) > 1:
        sys.stdout.write("".join(f"# PROBLEM {m}\n" for m in problems))
    return EXIT_ERROR if problems else EXIT_OK


def cmd_reproduce(args) -> int:
    experiments = reproduce.select(args.only)
    planned = reproduce.plan(experiments)  # every point validated before anything is built
    for e, points in planned:
        console.print(f"  {e.scenario:18s} {reproduce.runs_text(points):>30s} ~{e.minutes:g} min  "
                      f"{' '.join('--set ' + s for s in e.sets)}", markup=False)
    for e in experiments:
        if reproduce.missing(e):
            console.print(f"  {e.scenario:18s} not run: {reproduce.missing(e)}", markup=False)
    console.print(f"{len(planned)} experiment(s), about {sum(e.minutes for e, _ in planned):g} minutes")
    if args.list:
        return EXIT_OK
    with progress_bar() as bar:
        task = bar.add_task("starting", total=1)

        def progress(what: str, done: int, total_: int) -> None:
            bar.update(task, description=what, completed=done, total=total_)

        root = reproduce.run(experiments, Path(args.out), say=console.print, progress=progress)
    console.print((root / "report.md").read_text(), markup=False)
    console.print(f"results: {root}")
    return EXIT_OK


def cmd_report(args) -> int:
    path = Path(args.dir)  # a reproduce directory reports every experiment again, then the suite
    out = reproduce.report_again(path) if (path / "suite.json").is_file() else report.report(path)
    console.print(f"report: {out} (plots beside it)")
    return EXIT_OK


def cmd_check(_args) -> int:
    items = platform.check()
    for it in items:
        mark = {True: "[green]ok[/]", False: "[red]MISSING[/]", None: "[yellow]?[/]"}[it.ok]
        console.print(f"{mark:>18s}  {it.name:14s} {it.detail}")
    return EXIT_OK if all(it.ok for it in items) else EXIT_ERROR


def cmd_clean(args) -> int:
    platform.require_root()
    with Registry() as reg:
        if args.servers is not None:  # the other servers first: the local manifest names them
            left = reg.leftover()
            code = servercli.clean_servers(servercli.servers_to_clean(left.servers if left else [], args.servers))
            if code != EXIT_OK:
                return code
        report = cleanup.clean(reg)
        live.withdraw()  # we hold the lock: any live cluster's owner is gone
    if report.empty:
        console.print("nothing to clean")
    else:
        console.print(f"removed {len(report.netns)} namespace(s), {len(report.links)} interface(s)/bridge(s), "
                      f"{len(report.procs)} process(es)")
    if report.left:
        err_console.print(f"could not remove: {', '.join(report.left)}")
        return EXIT_ERROR
    return EXIT_OK


def cmd_list(_args) -> int:
    for path in schema.list_shipped():
        try:
            sc = schema.load(str(path))
            console.print(f"{path.stem:24s} {sc.description.strip().splitlines()[0] if sc.description else ''}")
        except DpemuError as exc:
            console.print(f"{path.stem:24s} [red]invalid: {exc}[/]")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dpemu", description="DualPath network emulator on Linux namespaces.",
                                epilog="Exit codes: 0 ok, 1 error, 2 usage, 3 finished but not trustworthy, "
                                       "4 finished but turns failed (faults), 130 interrupted.")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    r = sub.add_parser("run", help="build the cluster of SCENARIO, run it, write results, tear down")
    r.add_argument("scenario", help="a shipped scenario name (dpemu list) or a YAML file")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a scenario field, e.g. --set cluster.prefill_nodes=3 (repeatable)")
    r.add_argument("--out", default="results", help="results root (default: ./results)")
    r.set_defaults(func=cmd_run)
    pl = sub.add_parser("plan", help="print what a run would build and start (no root needed)")
    pl.add_argument("scenario")
    pl.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    pl.set_defaults(func=cmd_plan)
    rr = sub.add_parser("reproduce", help="run every experiment of the paper (about an hour) and write one report")
    rr.add_argument("--only", nargs="+", metavar="SCENARIO", help="run only these experiments of the suite")
    rr.add_argument("--list", action="store_true", help="print the suite and its duration, run nothing")
    rr.add_argument("--out", default="results", help="results root (default: ./results)")
    rr.set_defaults(func=cmd_reproduce)
    rp = sub.add_parser("report", help="plots and report.md of a run or sweep directory, beside the paper's figures")
    rp.add_argument("dir", help="a run directory (has summary.json) or a sweep directory (has sweep.json)")
    rp.set_defaults(func=cmd_report)
    sub.add_parser("check", help="tell what this machine lacks").set_defaults(func=cmd_check)
    cl = sub.add_parser("clean", help="remove what a killed run left (only dpemu's own objects)")
    cl.add_argument("--servers", nargs="?", const="", metavar="SCENARIO",
                    help="also on the run's other servers (those the killed run recorded, or SCENARIO's)")
    cl.set_defaults(func=cmd_clean)
    sub.add_parser("list", help="list the scenarios that ship").set_defaults(func=cmd_list)
    bench.add_parser(sub)
    labs.add_parser(sub)
    livecli.add_parser(sub)
    top.add_parser(sub)
    servercli.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except runner.Interrupted as exc:
        err_console.print(f"dpemu: {exc}; everything the run built was removed")
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:  # outside a run (a run turns SIGINT into runner.Interrupted)
        err_console.print("dpemu: interrupted")
        return EXIT_INTERRUPTED
    except DpemuError as exc:
        err_console.print(f"dpemu: {exc}", markup=False)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())

"""The ``dpemu`` command line: the only place that prints and picks exit codes.

    dpemu run SCENARIO [--set KEY=VALUE ...] [--out DIR]
    dpemu plan SCENARIO [--set ...]        (no root needed)
    dpemu check                            what this machine lacks
    dpemu clean                            remove leftovers of a killed run
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

from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from emulator import cleanup, fidelity
from emulator.errors import DpemuError
from emulator.registry import Registry
from emulator.units import format_rate

from . import bench, platform, report, reproduce, runner, schema, sweep, tables
from .plan import make_plan, plan_text
from .report import fmt_ms, fmt_num
from .schema import label_of

# Output that is not a terminal (CI logs, files) gets 120 columns, not rich's 80.
console = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 120)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_UNTRUSTED, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130


def _calibration_table(summary: dict) -> Table:
    t = Table(title=f"link calibration: {summary['scenario']} ({summary['calibration']['mode']} mode; "
                    f"achieved = wire bytes in HTB counters)", box=box.SIMPLE_HEAD, pad_edge=False,
              collapse_padding=True, title_justify="left")
    for col, just in (("class", "left"), ("dir", "left"), ("links", "right"), ("real", "right"),
                      ("configured", "right"), ("achieved", "right"), ("worst\nerror", "right"),
                      ("iperf3\ngoodput", "right"), ("", "left")):
        t.add_column(col, justify=just, no_wrap=True)
    for r in summary["calibration"]["classes"]:
        ach = format_rate(r["achieved_bps"], 4) if r["achieved_bps"] is not None else "-"
        err = f"{r['worst_error']:+.2%}" if r["worst_error"] is not None else "-"
        note = "" if r["expected_bps"] == r["configured_bps"] else \
            f" (peers fill {format_rate(r['expected_bps'], 4)})"
        t.add_row(r["link_class"], r["direction"], str(r["links"]), format_rate(r["real_bps"]),
                  format_rate(r["configured_bps"]), ach, err, format_rate(r["iperf3_goodput_bps"], 4),
                  ("[green]ok[/]" if r["within_tolerance"] else "[red]OFF[/]") + note)
    return t


def _serving_table(summary: dict) -> Table:
    """One row per mode, within 80 columns: JCT and latencies in real seconds (TPOT in ms), utilizations 0..1;
    turns are counted by the reads per side (pe/de; oracle reads nothing; split reads both) and in the lines
    printed per mode."""
    t = Table(title="serving (real seconds; utilization: wire bytes / rate, middle 80% of JCT)",
              box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True, title_justify="left")
    for col in ("mode", "JCT\ns", "reads\npe/de", "SNIC\npe", "SNIC\nde", "CNIC\npe", "CNIC\nde",
                "TTFT s\np50/p99", "TPOT ms\np50/p99"):
        t.add_column(col, justify="left" if col == "mode" else "right", no_wrap=True)

    for mode, m in summary["modes"].items():
        paths = m["paths"]
        reads = f"{paths['pe']}/{paths['de']}" if not paths.get("split") else f"split {paths['split']}"
        t.add_row(mode, fmt_num(m["jct_s"], "{:.1f}"), reads,
                  fmt_num(m["snic_util"]["pe"]), fmt_num(m["snic_util"]["de"]), fmt_num(m["cnic_util"]["pe"]),
                  fmt_num(m["cnic_util"]["de"]),
                  f"{fmt_num(m['ttft_s']['p50'], '{:.1f}')}/{fmt_num(m['ttft_s']['p99'], '{:.1f}')}",
                  f"{fmt_ms(m['tpot_s']['p50'])}/{fmt_ms(m['tpot_s']['p99'])}")
    return t


def _rich(grid: tables.Grid) -> Table:
    """A run's table (``scenarios.tables``) for the terminal; SLO verdicts in colour."""
    t = Table(title=grid.title, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True, title_justify="left")
    for i, col in enumerate(grid.columns):
        t.add_column(col, justify="left" if i == 0 else "right", no_wrap=True)
    colour = {"ok": "[green]ok[/]", "missed": "[red]missed[/]"}
    slo = grid.columns.index("SLO") if "SLO" in grid.columns else None
    for row in grid.rows:
        t.add_row(*(colour.get(c, c) if i == slo else c for i, c in enumerate(row)))
    return t


def _verdict_lines(summary: dict) -> list[str]:
    f = summary["fidelity"]
    cpu = f"CPU max {f['cpu_util_max']:.0%}" if f["cpu_util_max"] is not None else "CPU not sampled"
    err = (f"worst link error {f['link_rate_error_max']:.2%}" if f["link_rate_error_max"] is not None
           else "no link measured")
    head = "[bold green]TRUSTWORTHY[/]" if f["ok"] else "[bold red]NOT TRUSTWORTHY[/]"
    gp = f.get("goodput_error_max")
    dq = f.get("dequeue_p99") or {}
    extra = (f", payload {gp:.2%} off" if gp is not None else "") + (
        ", dequeue p99 " + " ".join(f"{k} {v:.2f}" for k, v in dq.items()) if dq else "")
    return [f"fidelity: {head} ({cpu}, {err}{extra}; limits {fidelity.CPU_UTIL_MAX:.0%} CPU, "
            f"{fidelity.RATE_TOLERANCE:.0%} rate, dequeue p99 {fidelity.DEQUEUE_P99_MAX:g})"] + [
        f"  - {r}" for r in f["reasons"]]


def _progress_bar() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=True)


def _print_run(s: dict, run_dir: Path) -> None:
    console.print(_calibration_table(s))
    inv = s["invariants"]
    console.print("invariants (configured -> achieved): " + ", ".join(
        f"{k} {v:.3g} -> {inv['achieved'][k]:.3g}" if inv["achieved"][k] is not None else f"{k} {v:.3g}"
        for k, v in inv["configured"].items()))
    if "modes" in s:
        console.print(_serving_table(s))
        for grid in (tables.online(s), tables.collectives(s), tables.lockstep(s), tables.isolation(s),
                     tables.links(s)):
            if grid is not None:
                console.print(_rich(grid))
        for mode, m in s["modes"].items():
            if m.get("online") and not m["online"]["slo_ok"]:
                console.print(f"  {mode} missed the SLO: {m['online']['why']}")
        sp, lg = s["speedup"], s["ledger"]
        console.print("speedup: " + ", ".join(f"{k} {v:.2f}x" for k, v in sp.items() if v is not None)
                      + "; ledger: " + ", ".join(f"{k.removeprefix('blocks_')} {v}" for k, v in lg.items()))
        for line in failure_paragraphs(s):
            console.print(f"[yellow]{line}[/]", markup=True)
    console.print(f"build {s['build_s']:.2f}s, teardown {s['teardown_s']:.2f}s, calibration "
                  f"{s['calibration']['duration_s']:.1f}s in {s['calibration']['rounds']} round(s)")
    for line in _verdict_lines(s):
        console.print(line)
    console.print(f"results: {run_dir}")


def _sweep_table(index: dict) -> Table:
    """One row per point (seeds folded), mean +- sd over seeds: offline, JCT per mode and the DualPath
    speedup; online, mean TTFT per mode and how many seeds met the SLO."""
    groups = sweep.aggregate(index)
    online_run = any(k.startswith("online.") for g in groups for k in g["stats"])
    key = "online.ttft_s.mean.{}" if online_run else "jct_s.{}"
    modes = [m for m in ("basic", "layerwise", "dualpath", "oracle")
             if any(key.format(m) in g["stats"] for g in groups)]
    what = "mean TTFT in real s, SLO: seeds that met it" if online_run else "JCT in real s"
    t = Table(title=f"sweep: mean +- sd over trustworthy seeds ({what})", box=box.SIMPLE_HEAD,
              pad_edge=False, collapse_padding=True, title_justify="left")
    last = ("SLO",) if online_run else ("dualpath\n/basic",)
    for col in ("point", "seeds", *[f"{'TTFT' if online_run else 'JCT'}\n{m}" for m in modes], *last):
        t.add_column(col, justify="left" if col == "point" else "right", no_wrap=True)

    def cell(g: dict, k: str, fmt: str) -> str:
        st = g["stats"].get(k)
        return "-" if st is None else f"{fmt.format(st['mean'])}+-{fmt.format(st['sd'])}"

    for g in groups:
        label = label_of(g["values"])
        seeds = f"{len(g['seeds'])}" + (f" ({len(g['untrusted'])} untrusted)" if g["untrusted"] else "")
        if online_run:
            slo = " ".join(f"{m} {round(st['mean'] * st['n'])}/{st['n']}" for m in modes
                           if (st := g["stats"].get(f"online.slo_ok.{m}")))
            end = slo or "-"
        else:
            end = cell(g, "speedup.dualpath_vs_basic", "{:.2f}")
        t.add_row(label, seeds, *[cell(g, key.format(m), "{:.1f}") for m in modes], end)
    return t


def cmd_run(args) -> int:
    points = schema.sweep_points(args.scenario, args.set)
    if len(points) > 1 or points[0].label:
        return _run_sweep(points, args)
    plan = make_plan(points[0].scenario)
    with _progress_bar() as bar:
        task = bar.add_task("calibrating", total=len(plan.rounds))

        def progress(what: str, done: int, total: int) -> None:
            bar.update(task, description=what, completed=done, total=total)

        outcome = runner.run(plan, Path(args.out), say=console.print, progress=progress)
    _print_run(outcome.summary, outcome.run_dir)
    return exit_code(outcome.summary)


def exit_code(summary: dict) -> int:
    """4 when turns failed or a mode did not finish, else 3 when the run is not trustworthy, else 0."""
    if summary.get("failed_turns") or summary.get("aborted"):
        return EXIT_FAILED
    return EXIT_OK if summary["fidelity"]["ok"] else EXIT_UNTRUSTED


def failure_paragraphs(s: dict) -> list[str]:
    """What went wrong in a run, a paragraph each: every mode's faults, a mode that did not finish."""
    out = [m["faults"]["message"] for m in s.get("modes", {}).values() if m.get("faults", {}).get("message")]
    for mode, m in s.get("modes", {}).items():
        f = m.get("failed", {})
        if f.get("turns") and not m.get("faults"):
            out.append(f"In mode {mode}, {f['turns']} turns failed ({f['abandoned']} later turns of their agents "
                       f"not run) with no fault injected; unreachable at the end: "
                       f"{', '.join(f['unreachable_daemons']) or 'none'} ({mode}/failed.csv has each error).")
    if a := s.get("aborted"):
        done = [m for m in s.get("modes", {})]
        out.append(f"Mode {a['mode']} did not finish: {a['error'][:600]} The modes that finished "
                   f"({', '.join(done) or 'none'}) are in summary.json; the daemons' stderr is in "
                   f"{a['mode']}/*.stderr.log.")
    return out


def _run_sweep(points: list, args) -> int:
    if points[0].search:
        console.print(f"capacity search from {len(points)} points, up to {points[0].search.probes} runs each: "
                      f"{', '.join(p.label for p in points)}")
    else:
        console.print(f"sweep of {len(points)} runs: {', '.join(p.label for p in points)}")
    with _progress_bar() as bar:
        task = bar.add_task("starting", total=1)

        def progress(what: str, done: int, total: int) -> None:
            bar.update(task, description=what, completed=done, total=total)

        def say(text: str) -> None:  # per point, only what the point's run says about its modes
            if text.startswith(("[bold]point", "  ")):
                console.print(text)

        outcome = sweep.run_sweep(points, Path(args.out), say=say, progress=progress)
    console.print(_sweep_table(outcome.index))
    untrusted = [p["label"] for p in outcome.index["points"] if not p.get("trustworthy")]
    if untrusted:
        console.print(f"[bold red]NOT TRUSTWORTHY[/] (kept out of the statistics): {', '.join(untrusted)}; "
                      "each run's summary.json says why")
    console.print(f"results: {outcome.sweep_dir} (`dpemu report {outcome.sweep_dir}` for plots and report.md)")
    failed = [p["label"] for p in outcome.index["points"] if p.get("failed_turns")]
    if failed:
        console.print(f"[yellow]turns failed[/] in: {', '.join(failed)} (each run's summary.json: its faults' effects)")
        return EXIT_FAILED
    return EXIT_UNTRUSTED if untrusted else EXIT_OK


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
    with _progress_bar() as bar:
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


def cmd_clean(_args) -> int:
    platform.require_root()
    with Registry() as reg:
        report = cleanup.clean(reg)
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
    sub.add_parser("clean", help="remove what a killed run left (only dpemu's own objects)").set_defaults(
        func=cmd_clean)
    sub.add_parser("list", help="list the scenarios that ship").set_defaults(func=cmd_list)
    bench.add_parser(sub)
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

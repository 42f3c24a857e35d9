"""What the terminal shows of a run: the console, the tables of a summary, the verdict, exit codes.

Shared by every command that prints a run (``dpemu run``, ``load``, ``lab check``, the live cluster's prompt);
each reads the figures from ``summary.json``'s dict (computed once, in scenarios/results.py), never from
another command's text.
"""

from __future__ import annotations

import sys
from pathlib import Path

from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from emulator import fidelity
from emulator.units import format_rate

from . import runner, serverstats, sweep, tables
from .plan import make_plan
from .report import fmt_ms, fmt_num
from .schema import label_of

# Output that is not a terminal (CI logs, files) gets 120 columns, not rich's 80.
console = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 120)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_UNTRUSTED, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130


def calibration_table(summary: dict) -> Table:
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


def serving_table(summary: dict) -> Table:
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


def rich_grid(grid: tables.Grid) -> Table:
    """A run's table (``scenarios.tables``) for the terminal; SLO verdicts in colour."""
    t = Table(title=grid.title, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True, title_justify="left")
    for i, col in enumerate(grid.columns):
        t.add_column(col, justify="left" if i == 0 else "right", no_wrap=True)
    colour = {"ok": "[green]ok[/]", "missed": "[red]missed[/]"}
    slo = grid.columns.index("SLO") if "SLO" in grid.columns else None
    for row in grid.rows:
        t.add_row(*(colour.get(c, c) if i == slo else c for i, c in enumerate(row)))
    return t


def verdict_lines(summary: dict) -> list[str]:
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


def progress_bar() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=True)


def print_run(s: dict, run_dir: Path, calibration: bool = True) -> None:
    """A run's summary as the terminal shows it; `calibration=False` for a load on a live cluster, whose
    calibration the cluster printed when it came up."""
    if calibration:
        console.print(calibration_table(s))
        inv = s["invariants"]
        console.print("invariants (configured -> achieved): " + ", ".join(
            f"{k} {v:.3g} -> {inv['achieved'][k]:.3g}" if inv["achieved"][k] is not None else f"{k} {v:.3g}"
            for k, v in inv["configured"].items()))
    if "modes" in s:
        console.print(serving_table(s))
        for grid in (tables.online(s), tables.collectives(s), tables.lockstep(s), tables.isolation(s),
                     tables.links(s)):
            if grid is not None:
                console.print(rich_grid(grid))
        for mode, m in s["modes"].items():
            if m.get("online") and not m["online"]["slo_ok"]:
                console.print(f"  {mode} missed the SLO: {m['online']['why']}")
        sp, lg = s["speedup"], s["ledger"]
        console.print("speedup: " + ", ".join(f"{k} {v:.2f}x" for k, v in sp.items() if v is not None)
                      + "; ledger: " + ", ".join(f"{k.removeprefix('blocks_')} {v}" for k, v in lg.items()))
        for line in failure_paragraphs(s):
            console.print(f"[yellow]{line}[/]", markup=True)
    if calibration:
        teardown = "" if s["teardown_s"] is None else f", teardown {s['teardown_s']:.2f}s"
        console.print(f"build {s['build_s']:.2f}s{teardown}, calibration "
                      f"{s['calibration']['duration_s']:.1f}s in {s['calibration']['rounds']} round(s)")
    for line in serverstats.lines(s["servers"]) if s.get("servers") else []:
        console.print(line, markup=False)
    for line in verdict_lines(s):
        console.print(line)
    console.print(f"results: {run_dir}")


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


def sweep_table(index: dict) -> Table:
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


def run_points(points: list, out_root: Path) -> tuple[Path, int]:
    """Run a scenario's points (one run, a sweep or a capacity search) as ``dpemu run`` does, with its progress
    bar and tables: the run's or the sweep's directory, and the exit code."""
    sweeping = len(points) > 1 or bool(points[0].label)
    if sweeping and points[0].search:
        console.print(f"capacity search from {len(points)} points, up to {points[0].search.probes} runs each: "
                      f"{', '.join(p.label for p in points)}")
    elif sweeping:
        console.print(f"sweep of {len(points)} runs: {', '.join(p.label for p in points)}")
    plan = None if sweeping else make_plan(points[0].scenario)
    with progress_bar() as bar:
        task = bar.add_task("starting" if sweeping else "calibrating", total=1 if sweeping else len(plan.rounds))

        def progress(what: str, done: int, total: int) -> None:
            bar.update(task, description=what, completed=done, total=total)

        def say(text: str) -> None:  # per point, only what the point's run says about its modes
            if text.startswith(("[bold]point", "  ")):
                console.print(text)

        if not sweeping:
            outcome = runner.run(plan, out_root, say=console.print, progress=progress)
        else:
            outcome = sweep.run_sweep(points, out_root, say=say, progress=progress)
    if not sweeping:
        print_run(outcome.summary, outcome.run_dir)
        return outcome.run_dir, exit_code(outcome.summary)
    console.print(sweep_table(outcome.index))
    untrusted = [p["label"] for p in outcome.index["points"] if not p.get("trustworthy")]
    if untrusted:
        console.print(f"[bold red]NOT TRUSTWORTHY[/] (kept out of the statistics): {', '.join(untrusted)}; "
                      "each run's summary.json says why")
    console.print(f"results: {outcome.sweep_dir} (`dpemu report {outcome.sweep_dir}` for plots and report.md)")
    failed = [p["label"] for p in outcome.index["points"] if p.get("failed_turns")]
    if failed:
        console.print(f"[yellow]turns failed[/] in: {', '.join(failed)} (each run's summary.json: its faults' effects)")
        return outcome.sweep_dir, EXIT_FAILED
    return outcome.sweep_dir, EXIT_UNTRUSTED if untrusted else EXIT_OK

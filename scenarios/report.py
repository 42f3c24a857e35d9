"""``dpemu report DIR``: plots (PNG) and a ``report.md`` for one run or a sweep, every figure beside the
paper's and the analytic expectation.

Reads only what runs wrote (``summary.json``, ``scenario.yaml``, ``<mode>/links.csv``,
``<mode>/requests.csv``, ``sweep.json``); writes ``report.md`` and ``*.png`` into DIR.

The analytic expectation of DualPath's offline speedup: a storage-bound cluster
finishes in (bytes to read) / (usable SNIC bandwidth). Basic reads through the
P prefill nodes' SNICs only, DualPath through all P + D, so the speedup is
``(P + D) / P`` - unless compute binds first: no mode beats Oracle (no KV
loading at all), so the expectation is ``min((P + D) / P, JCT(basic) /
JCT(oracle))`` when Oracle ran. A run whose fidelity check failed is flagged on
every line it appears and kept out of the sweep statistics.
"""

from __future__ import annotations

import csv
import json
import statistics
from collections import defaultdict
from pathlib import Path

import yaml

from emulator.errors import ConfigError

from . import fabric, online, tables
from .schema import RATE_KEY, label_of
from .sweep import SEED_KEY, aggregate, capacities, metrics, ratio_bounds, slo_verdicts, verdicts_of
from .tables import fmt_ms, fmt_num

MODES = ("basic", "layerwise", "dualpath", "oracle")
COLORS = {"basic": "tab:red", "layerwise": "tab:orange", "dualpath": "tab:blue", "oracle": "tab:gray"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display in a VM over ssh
    import matplotlib.pyplot as plt

    return plt


def storage_bound_speedup(cluster: dict) -> float:
    """Usable SNICs with dualpath / with basic: (P + D) / P."""
    p, d = cluster["prefill_nodes"], cluster["decode_nodes"]
    return (p + d) / p


def expected_speedup(cluster: dict, jct: dict[str, float]) -> tuple[float, float | None, float]:
    """(storage bound, compute bound (basic / oracle JCT) or None, expectation = the smaller)."""
    storage = storage_bound_speedup(cluster)
    compute = jct["basic"] / jct["oracle"] if jct.get("basic") and jct.get("oracle") else None
    return storage, compute, min(storage, compute) if compute else storage


def report(path: Path) -> Path:
    """Write DIR/report.md (and plots); return the report's path. DIR is a run or a sweep directory (a
    ``dpemu reproduce`` directory is reported by ``reproduce.report_again``, through this module)."""
    if (path / "sweep.json").is_file():
        return _sweep_report(path)
    if (path / "summary.json").is_file():
        return _run_report(path)
    raise ConfigError(str(path), "neither a run directory (summary.json) nor a sweep directory (sweep.json)")


# -- one run ------------------------------------------------------------------------------------------------
def _side_rate_series(links_csv: Path, link_class: str, direction: str, time_scale: float
                      ) -> dict[str, tuple[list, list]]:
    """Per side (pe/de): (t_s, mean wall bit/s of that side's links) from links.csv's cumulative bytes. Its
    times are real seconds, so bytes per real second are divided by `time_scale` to compare with a configured
    (wall) rate."""
    per_link: dict[tuple[str, str], list[tuple[float, int]]] = defaultdict(list)
    with links_csv.open() as f:
        for r in csv.DictReader(f):
            if r["link_class"] == link_class and r["direction"] == direction and r["tclass"] == "link":
                per_link[(r["side"], r["link"])].append((float(r["t_s"]), int(r["bytes"])))
    out: dict[str, tuple[list, list]] = {}
    for side in ("pe", "de"):
        series = [v for (s, _), v in per_link.items() if s == side]
        if not series:
            continue
        n = min(len(s) for s in series)
        ts, bps = [], []
        for i in range(1, n):
            dt = series[0][i][0] - series[0][i - 1][0]
            if dt <= 0:
                continue
            ts.append(series[0][i][0])
            bps.append(sum((s[i][1] - s[i - 1][1]) * 8 / dt for s in series) / len(series) / time_scale)
        out[side] = (ts, bps)
    return out


def _run_plots(run: Path, summary: dict, rate_bps: dict[str, float]) -> list[str]:
    plt = _plt()
    made = []
    modes = [m for m in MODES if (run / m / "links.csv").is_file()]
    if modes:  # SNIC read throughput over time: who reads the KV
        fig, axes = plt.subplots(len(modes), 1, figsize=(8, 2.2 * len(modes)), sharex=True, squeeze=False)
        for ax, mode in zip(axes[:, 0], modes, strict=True):
            for side, (ts, bps) in _side_rate_series(run / mode / "links.csv", "snic", "down",
                                                     summary["scale"]["time"]).items():
                ax.plot(ts, [b / rate_bps["snic"] for b in bps], label=f"{side} SNICs",
                        color="tab:orange" if side == "pe" else "tab:green")
            ax.set_ylim(0, 1.1)
            ax.set_ylabel("SNIC read util")
            ax.set_title(f"{mode}: JCT {summary['modes'][mode]['jct_s']:.1f} s", fontsize=9, loc="left")
            ax.legend(fontsize=7, loc="upper right")
        axes[-1, 0].set_xlabel("real seconds since the workload started")
        fig.tight_layout()
        fig.savefig(run / "snic_util.png", dpi=110)
        plt.close(fig)
        made.append("snic_util.png")
    fig, ax = plt.subplots(figsize=(6, 3.5))  # TTFT distribution per mode
    for mode in modes:
        with (run / mode / "requests.csv").open() as f:
            ttft = sorted(float(r["ttft_s"]) for r in csv.DictReader(f))
        if ttft:
            ax.plot(ttft, [(i + 1) / len(ttft) for i in range(len(ttft))], label=mode, color=COLORS[mode])
    if modes:
        ax.set_xlabel("TTFT (real s)")
        ax.set_ylabel("fraction of turns")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(run / "ttft_cdf.png", dpi=110)
        made.append("ttft_cdf.png")
    plt.close(fig)
    return made


def _run_report(run: Path) -> Path:
    summary = json.loads((run / "summary.json").read_text())
    scenario = yaml.safe_load((run / "scenario.yaml").read_text())
    cl = scenario["cluster"]
    trusted = summary["fidelity"]["ok"]
    lines = [f"# {summary['scenario']} / {summary['run_id']}", "",
             f"{cl['model']} {cl['prefill_nodes']}P{cl['decode_nodes']}D x {cl['gpus_per_node']} GPU(s) per node; "
             f"scale bytes x{summary['scale']['bytes']:g}, time x{summary['scale']['time']:g}; "
             f"seed {summary.get('seed')}.", "",
             ("**Trustworthy** " if trusted else "**NOT TRUSTWORTHY** ")
             + f"(CPU max {fmt_num(summary['fidelity']['cpu_util_max'], '{:.0%}')}, worst link error "
               f"{fmt_num(summary['fidelity']['link_rate_error_max'], '{:.2%}')})"
             + "".join(f"\n- {r}" for r in summary["fidelity"]["reasons"]), ""]
    if "modes" in summary:
        lines += ["| mode | JCT s | SNIC pe | SNIC de | CNIC pe | CNIC de | TTFT p50/p99 s | TPOT p50/p99 ms |",
                  "|---|---|---|---|---|---|---|---|"]
        for mode, m in summary["modes"].items():
            lines.append(f"| {mode} | {m['jct_s']:.1f} | {fmt_num(m['snic_util']['pe'])} "
                         f"| {fmt_num(m['snic_util']['de'])} "
                         f"| {fmt_num(m['cnic_util']['pe'])} | {fmt_num(m['cnic_util']['de'])} "
                         f"| {fmt_num(m['ttft_s']['p50'], '{:.1f}')}/{fmt_num(m['ttft_s']['p99'], '{:.1f}')} "
                         f"| {fmt_ms(m['tpot_s']['p50'])}/{fmt_ms(m['tpot_s']['p99'])} |")
        jct = {k: v["jct_s"] for k, v in summary["modes"].items()}
        measured = summary["speedup"].get("dualpath_vs_basic")
        storage, compute, expect = expected_speedup(cl, jct)
        paper = scenario.get("paper", {}).get("speedup.dualpath_vs_basic")
        lines += ["", "| figure | measured | paper | analytic |", "|---|---|---|---|",
                  f"| DualPath / Basic JCT | {fmt_num(measured)}x | {fmt_num(paper)}{'x' if paper else ''} "
                  f"| {expect:.2f}x (storage-bound (P+D)/P = {storage:.2f}, compute-bound basic/oracle = "
                  f"{fmt_num(compute)}) |", ""]
        for grid in (tables.online(summary), tables.collectives(summary), tables.lockstep(summary),
                     tables.isolation(summary),
                     tables.links(summary)):
            if grid is not None:
                lines += tables.markdown(grid)
        rates = {c["link_class"]: c["configured_bps"] for c in summary["calibration"]["classes"]}
        for png in _run_plots(run, summary, rates):
            lines += [f"![{png}]({png})", ""]
    out = run / "report.md"
    out.write_text("\n".join(lines) + "\n")
    return out


def _head(paper: dict, what: str, samples: list[float], ref, analytic: float | None = None) -> dict:
    """One headline figure of a sweep: ours as mean +- sd over seeds, beside the paper's and the analytic."""
    sd = statistics.stdev(samples) if len(samples) > 1 else 0.0
    return {"figure": paper.get("figure", ""), "what": what,
            "ours": f"{statistics.fmean(samples):.2f} +- {sd:.2f}", "paper": ref,
            "analytic": None if analytic is None else round(analytic, 2), "seeds": len(samples)}


# -- online capacity ----------------------------------------------------------------------------------------


def _latency_vs_rate(groups: list[dict]) -> list[str]:
    """The paper's Fig. 10-11 shape: per mode and arrival rate, the steady state's mean TTFT, TTST and TPOT
    (mean over seeds of each run's mean) and on how many seeds the SLO held."""
    rows = []
    for g in groups:
        for mode in MODES:
            st = g["stats"]
            if f"online.slo_ok.{mode}" not in st:
                continue

            def mean(key: str, st=st, mode=mode) -> float | None:
                return st.get(f"online.{key}.{mode}", {}).get("mean")
            ok, rate = st[f"online.slo_ok.{mode}"], g["values"][RATE_KEY]
            rows.append((MODES.index(mode), rate, f"| {mode} | {rate:g} | {fmt_num(mean('ttft_s.mean'))} "
                         f"| {fmt_num(mean('ttft_s.last_third'))} | {fmt_num(mean('ttst_s.mean'))} "
                         f"| {fmt_ms(mean('tpot_s.mean'))} "
                         f"| {round(ok['mean'] * ok['n'])} of {ok['n']} |"))
    head = ["## Online latency against the arrival rate (steady state; mean over seeds)", ""]
    if not rows:
        return head + ["No trustworthy run: no latency to report (each run's summary.json says why).", ""]
    return (head + ["| mode | agents/s | TTFT s | TTFT last third s | TTST s | TPOT ms | SLO met |",
                    "|---|---|---|---|---|---|---|"]
            + [line for *_, line in sorted(rows)] + [""])


def _capacity_lines(done: list[dict], paper: dict, heads: list[dict]) -> list[str]:
    verdicts = verdicts_of(done)
    caps = capacities(done, verdicts)
    lines = ["## Capacity (highest swept arrival rate meeting the SLO, every lower rate meeting it too)", "",
             f"SLO: mean TTFT <= {online.SLO_TTFT_S:g} s and mean TPOT <= {online.SLO_TPOT_S * 1e3:g} ms in the "
             "steady state (turns submitted between a quarter of the arrival span and the last arrival), and mean "
             "TTFT within it in the steady state's last third of turns too (a queue still growing misses it).", "",
             "| mode | per seed (agents/s) | mean |", "|---|---|---|"]
    for mode, by_seed in caps.items():
        vals = [v for v, bracketed in by_seed.values() if v is not None and bracketed]
        per_seed = ", ".join(f"seed {s}: {'below the lowest rate' if v is None else (f'{v:g}' if b else f'>= {v:g}')}"
                             for s, (v, b) in sorted(by_seed.items()))
        lines.append(f"| {mode} | {per_seed} | {fmt_num(statistics.fmean(vals)) if vals else '-'} |")
    for mode in sorted({m for p in done for m in slo_verdicts(p.get("metrics", {}))} - set(caps)):
        lines.append(f"| {mode} | no trustworthy run: no capacity | - |")
    unbracketed = sorted({m for m, by_seed in caps.items() for v, b in by_seed.values() if v is not None and not b})
    if unbracketed:
        lines += ["", f"**Not bracketed** ({', '.join(unbracketed)}): every swept rate met the SLO, so the capacity "
                      "is only known to be at least the highest one; sweep higher rates. No ratio is formed from it."]
    if "basic" in caps and "dualpath" in caps:
        ratios = [caps["dualpath"][s][0] / caps["basic"][s][0] for s in caps["basic"]
                  if caps["basic"][s][0] and caps["basic"][s][1] and s in caps["dualpath"]
                  and caps["dualpath"][s][0] and caps["dualpath"][s][1]]
        if ratios:
            bounds = [b for seed in sorted(caps["basic"]) if (b := ratio_bounds(verdicts, seed))]
            lines += ["", f"DualPath / Basic capacity: {statistics.fmean(ratios):.2f}x "
                          f"(per seed {', '.join(f'{r:.2f}' for r in ratios)}); the paper: "
                          f"{paper.get('capacity.dualpath_vs_basic', '-')}."]
            if bounds:
                lines += ["", "Between the rates probed, the ratio lies in "
                              + ", ".join(f"{lo:.2f}-{hi:.2f}" for lo, hi in bounds)
                              + " (per seed: DualPath's capacity over the rate Basic missed, to the rate DualPath "
                              "missed over Basic's capacity); finer probes narrow it."]
            heads.append(_head(paper, "online capacity, DualPath / Basic", ratios,
                               paper.get("capacity.dualpath_vs_basic")))
        else:  # still a line in the suite's table: what is known, and that no ratio is formed
            known = "; ".join(f"{mode} " + ", ".join("-" if v is None else (f"{v:g}" if b else f">= {v:g}")
                                                    for v, b in by_seed.values())
                              for mode, by_seed in caps.items() if mode in ("basic", "dualpath"))
            heads.append({"figure": paper.get("figure", ""), "what": "online capacity, DualPath / Basic",
                          "ours": f"not bracketed (agents/s per seed: {known})",
                          "paper": paper.get("capacity.dualpath_vs_basic"), "analytic": None, "seeds": None})
    return lines + [""]


def _online_lines(groups: list[dict], paper: dict, heads: list[dict] | None = None) -> list[str]:
    """Per point the steady state's mean TTFT of each mode (and TPOT), and Basic's over DualPath's."""
    modes = [m for m in MODES if any(f"online.ttft_s.mean.{m}" in g["stats"] for g in groups)]
    if not modes:
        return []
    lines = ["## Online latency (steady state; mean over seeds of each run's mean)", "",
             "| point | " + " | ".join(f"TTFT {m} s" for m in modes) + " | "
             + " | ".join(f"TPOT {m} ms" for m in modes) + " | TTFT Basic / DualPath |",
             "|" + "---|" * (2 * len(modes) + 2)]
    for g in groups:
        st = g["stats"]

        def mean(key: str) -> float | None:
            return st[key]["mean"] if key in st else None
        ttft = {m: mean(f"online.ttft_s.mean.{m}") for m in modes}
        tpot = {m: mean(f"online.tpot_s.mean.{m}") for m in modes}
        ratio = ttft["basic"] / ttft["dualpath"] if ttft.get("basic") and ttft.get("dualpath") else None
        lines.append(f"| {label_of(g['values'])} | " + " | ".join(fmt_num(ttft[m]) for m in modes) + " | "
                     + " | ".join(fmt_ms(tpot[m]) for m in modes) + f" | {fmt_num(ratio)} |")
        if ratio is not None and heads is not None and RATE_KEY not in g["values"]:
            heads.append({"figure": paper.get("figure", ""), "what": f"Basic / DualPath mean TTFT, "
                          f"{label_of(g['values'])}", "ours": f"{ratio:.2f}", "paper": None, "analytic": None,
                          "seeds": len(g["seeds"])})
    return lines + [""]


# -- ablation -------------------------------------------------------------------------------------------------
POLICY_KEY = "serving.policy"
ABLATION = (("basic", "round_robin", "Basic"), ("layerwise", "round_robin", "+ layerwise prefill"),
            ("dualpath", "round_robin", "+ dual-path loading"), ("dualpath", "paper", "+ scheduler"))


def _ablation_lines(groups: list[dict], paper: dict, heads: list[dict] | None = None) -> list[str]:
    """The paper's Fig. 12 (right): JCT of each step against Basic's, both under the round-robin placement."""
    jct = {}
    for g in groups:
        for mode, policy, _ in ABLATION:
            if g["values"].get(POLICY_KEY) == policy and f"jct_s.{mode}" in g["stats"]:
                jct[(mode, policy)] = g["stats"][f"jct_s.{mode}"]["mean"]
    base = jct.get(("basic", "round_robin"))
    if not base:
        return []
    lines = ["## Ablation (JCT change against Basic; seeds' means)", "", "| step | JCT s | change | paper |",
             "|---|---|---|---|"]
    for mode, policy, label in ABLATION:
        if (mode, policy) in jct:
            v = jct[(mode, policy)]
            ref = paper.get(f"ablation.{mode}.{policy}")
            lines.append(f"| {label} | {v:.1f} | {100 * (v / base - 1):+.1f}% | {ref or '-'} |")
            if heads is not None and (mode, policy) != ("basic", "round_robin"):
                heads.append({"figure": paper.get("figure", ""), "what": f"ablation {label}: JCT change vs Basic",
                              "ours": f"{100 * (v / base - 1):+.1f}%", "paper": ref, "analytic": None,
                              "seeds": None})
    return lines + [""]


def _balance_lines(groups: list[dict], paper: dict, heads: list[dict] | None = None) -> list[str]:
    """The paper's Fig. 13: DualPath's SNIC balance (busiest SNIC's reads / mean SNIC's, per window)."""
    lines = ["## SNIC load balance under DualPath (max / mean SNIC read traffic per window of "
             "`serving.balance_window`; 1 = even)", "",
             "| point | max/mean | spread | paper |", "|---|---|---|---|"]
    for g in groups:
        st = g["stats"].get("snic_balance.dualpath")
        if st:
            label = label_of(g["values"])
            ref = paper.get(f"snic_balance.{g['values'].get(POLICY_KEY)}", "-")
            lines.append(f"| {label} | {st['mean']:.2f} +- {st['sd']:.2f} | {st['min']:.2f}-{st['max']:.2f} "
                         f"| {ref} |")
            if heads is not None:
                heads.append({"figure": paper.get("figure", ""), "what": f"SNIC max/mean, {label}",
                              "ours": f"{st['mean']:.2f} +- {st['sd']:.2f}", "paper": None if ref == "-" else ref,
                              "analytic": None, "seeds": st["n"]})
    return lines + [""]


# -- a sweep ------------------------------------------------------------------------------------------------
def _axis(groups: list[dict], varied: list[str]) -> tuple[str, list, bool]:
    """The x axis: the one varied key if numeric, else the point labels."""
    if len(varied) == 1 and all(isinstance(g["values"].get(varied[0]), (int, float)) for g in groups):
        return varied[0].rsplit(".", 1)[-1], [g["values"][varied[0]] for g in groups], True
    labels = [label_of(g["values"]) for g in groups]
    return "point", labels, False


def _errorbar(ax, xs: list, stats: list[dict], **style) -> None:
    """Means with min-max bars over seeds."""
    ax.errorbar(xs, [s["mean"] for s in stats], yerr=[[s["mean"] - s["min"] for s in stats],
                                                     [s["max"] - s["mean"] for s in stats]],
                marker="o", capsize=3, **style)


def _save(plt, fig, ax, path: Path, xlabel: str, ticks: tuple[list, list] | None) -> str:
    ax.set_xlabel(xlabel)
    if ticks is not None:
        ax.set_xticks(*ticks, rotation=20, fontsize=7)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _sweep_plots(sweep_dir: Path, groups: list[dict], varied: list[str], expected: list[float | None],
                 paper: float | None) -> list[str]:
    plt = _plt()
    name, xs, numeric = _axis(groups, varied)
    pos = xs if numeric else list(range(len(xs)))
    ticks = None if numeric else (pos, xs)
    fig, ax = plt.subplots(figsize=(7, 4))
    for mode in MODES:
        pts = [(x, g["stats"][f"jct_s.{mode}"]) for x, g in zip(pos, groups, strict=True)
               if f"jct_s.{mode}" in g["stats"]]
        if pts:
            _errorbar(ax, [p for p, _ in pts], [s for _, s in pts], label=mode, color=COLORS[mode])
    ax.set_ylabel("JCT (real s), mean and min-max over seeds")
    made = [_save(plt, fig, ax, sweep_dir / "jct.png", name, ticks)]
    pts = [(x, g["stats"]["speedup.dualpath_vs_basic"], e) for x, g, e in zip(pos, groups, expected, strict=True)
           if "speedup.dualpath_vs_basic" in g["stats"]]
    if pts:
        fig, ax = plt.subplots(figsize=(7, 4))
        _errorbar(ax, [p for p, _, _ in pts], [s for _, s, _ in pts], label="measured", color=COLORS["dualpath"])
        if any(e is not None for _, _, e in pts):
            ax.plot([p for p, _, e in pts if e is not None], [e for _, _, e in pts if e is not None], "k--",
                    marker="x", label="analytic: min((P+D)/P, basic/oracle)")
        if paper:
            ax.axhline(paper, color="tab:purple", linestyle=":", label=f"paper {paper:g}x")
        ax.set_ylabel("DualPath / Basic JCT")
        ax.set_ylim(bottom=0)
        made.append(_save(plt, fig, ax, sweep_dir / "speedup.png", name, ticks))
    return made


def _refresh(sweep_dir: Path, index: dict) -> None:
    """Each finished point's figures again from its summary.json, so a report made by a newer dpemu has
    every figure it knows of (sweep.json holds those of the dpemu that ran the sweep)."""
    for p in index["points"]:
        summary = sweep_dir / p.get("run_dir", "-") / "summary.json"
        if p.get("status") == "done" and summary.is_file():
            p["metrics"] = metrics(json.loads(summary.read_text()))


def _sweep_report(sweep_dir: Path) -> Path:
    index = json.loads((sweep_dir / "sweep.json").read_text())
    _refresh(sweep_dir, index)
    groups = aggregate(index)
    paper = index.get("paper", {})
    done = [p for p in index["points"] if p.get("status") == "done"]
    lines = [f"# sweep {index['scenario']} / {sweep_dir.name}", "",
             f"{len(done)} of {len(index['points'])} runs finished; varied: {', '.join(index['varied']) or '-'}; "
             f"seeds folded (mean, sd, min-max over the trustworthy ones)."]
    untrusted = [p["label"] for p in done if not p.get("trustworthy")]
    unfinished = [f"{p['label']} ({p.get('status')})" for p in index["points"] if p.get("status") != "done"]
    if untrusted:
        lines.append(f"\n**NOT TRUSTWORTHY, left out of the statistics:** {', '.join(untrusted)}")
    if unfinished:
        lines.append(f"\n**Not finished:** {', '.join(unfinished)}")
    if paper:
        lines.append("\nThe paper: " + "; ".join(f"{k} = {v}" for k, v in paper.items()))
    expected: list[float | None] = []
    heads: list[dict] = []
    modes = [m for m in MODES if any(f"jct_s.{m}" in g["stats"] for g in groups)]
    cols = ["point", "seeds", *[f"JCT {m} s" for m in modes], "DualPath/Basic", "spread", "analytic", "paper"]
    lines += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for g in groups:
        first = next((p for p in done if {k: v for k, v in p["values"].items() if k != SEED_KEY} == g["values"]
                      and p.get("trustworthy")), None)
        st = g["stats"]

        def cell(key: str, spec: str = "{:.1f}") -> str:
            return "-" if key not in st else f"{spec.format(st[key]['mean'])} +- {spec.format(st[key]['sd'])}"

        exp = None
        if first is not None:
            cl = yaml.safe_load((sweep_dir / first["run_dir"] / "scenario.yaml").read_text())["cluster"]
            exp = expected_speedup(cl, {m: st[f"jct_s.{m}"]["mean"] for m in MODES if f"jct_s.{m}" in st})[2]
        expected.append(exp)
        sp = st.get("speedup.dualpath_vs_basic")
        label = label_of(g["values"])
        seeds = f"{len(g['seeds'])}" + (f" (+{len(g['untrusted'])} untrusted)" if g["untrusted"] else "")
        spread = "-" if sp is None else f"{sp['min']:.2f}-{sp['max']:.2f}"
        jcts = "".join(f"| {cell(f'jct_s.{m}')} " for m in modes)
        lines.append(f"| {label} | {seeds} {jcts}| {cell('speedup.dualpath_vs_basic', '{:.2f}')} "
                     f"| {spread} | {fmt_num(exp)} | {paper.get('speedup.dualpath_vs_basic', '-')} |")
        if sp is not None and RATE_KEY not in index["varied"] and POLICY_KEY not in index["varied"]:
            heads.append({**_head(paper, f"DualPath / Basic JCT, {label}", [sp["mean"]],
                                  paper.get("speedup.dualpath_vs_basic"), exp),
                          "ours": f"{sp['mean']:.2f} +- {sp['sd']:.2f}", "seeds": sp["n"]})
    lines.append("")
    for png in _sweep_plots(sweep_dir, groups, index["varied"], expected,
                            paper.get("speedup.dualpath_vs_basic") if isinstance(
                                paper.get("speedup.dualpath_vs_basic"), (int, float)) else None):
        lines += [f"![{png}]({png})", ""]
    if RATE_KEY in index["varied"]:
        lines += _latency_vs_rate(groups) + _capacity_lines(done, paper, heads)
    else:
        lines += _online_lines(groups, paper, heads)
    if any("snic_balance.dualpath" in g["stats"] for g in groups) and POLICY_KEY in index["varied"]:
        # a headline only where the paper has the figure (Fig. 13), not in every sweep of the policy
        lines += _balance_lines(groups, paper, heads if any(k.startswith("snic_balance.") for k in paper) else None)
    if POLICY_KEY in index["varied"] and any("jct_s.layerwise" in g["stats"] for g in groups):
        lines += _ablation_lines(groups, paper, heads)
    if {"cluster.prefill_nodes", "cluster.decode_nodes"} & set(index["varied"]):
        lines += fabric.report_lines(groups)
        heads += fabric.headlines(groups, paper)
        png = fabric.plot(_plt(), groups, sweep_dir / "fabric.png") if len(groups) > 1 else None
        if png:
            lines += [f"![{png}]({png})", ""]
    lines += ["Runs: " + ", ".join(f"[{p['label']}]({p['label']}/)" for p in done), ""]
    out = sweep_dir / "report.md"
    out.write_text("\n".join(lines) + "\n")
    untrusted_all = bool(untrusted)
    for h in heads:
        h["untrusted_runs"] = untrusted_all
    (sweep_dir / "headlines.json").write_text(json.dumps(heads, indent=1) + "\n")
    return out

"""The GPU side's figures of one mode, from its files: where GPU time came from (``gpu-<node>.json``) and the
EP groups' lockstep (``lockstep-<group>.csv``, written by each group's host node; daemons/lockstep.py).

Lockstep figures, per phase's groups together:
- ``attention_max_over_avg``: the paper's Fig. 14, per forward (a group's first layer chunk): the slowest
  engine's predicted attention time over the mean of the engines in that forward, averaged over forwards;
  ``..._full`` counts only forwards in which every engine of the group took part (as early in the paper's
  runs), ``..._group`` averages over the whole group, idle engines as 0;
- ``bubble_share``: of the GPU time engines spent in forwards, the share they waited beyond their own work
  (sum over chunks of (chunk time - each engine's own cost, where positive) / sum of chunk time x engines).
  An engine's own cost assumes a group of like batches; in lockstep the routed experts compute the group's
  tokens, so a chunk can be shorter than its busiest engine's own cost.
"""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path


def merge_gpu(mode_dir: Path, names: list[str]) -> dict:
    """Where the nodes' GPU time came from, how many predictions lay outside the profile's grid, and the EP
    groups' lockstep."""
    parts = [json.loads(p.read_text()) for name in names if (p := mode_dir / f"gpu-{name}.json").exists()]
    outside: dict[str, int] = {}
    for part in parts:
        for key, n in part["outside_grid"].items():
            outside[key] = outside.get(key, 0) + n
    out = {"model": sorted({p["model"] for p in parts}), "outside_grid": dict(sorted(outside.items())),
           "nodes_reporting": len(parts)}
    waits = [p["lockstep"] for p in parts if p.get("lockstep", {}).get("engines")]
    if waits:
        out["lockstep"] = {"engines": sum(w["engines"] for w in waits),
                           "waited_s": round(sum(w["waited_s"] for w in waits), 3),
                           "timeouts": sum(w["timeouts"] for w in waits),
                           **lockstep_figures(sorted(mode_dir.glob("lockstep-*.csv")))}
    return out


def _mean(xs: list[float]) -> float | None:
    return round(statistics.fmean(xs), 4) if xs else None


def lockstep_figures(paths: list[Path]) -> dict:
    """Fig. 14 and the bubble share over the groups' chunk rows (module docstring)."""
    rows = [r for p in paths for r in csv.DictReader(p.open())]
    forwards = [r for r in rows if int(r["chunk"]) == 0 and float(r["attention_sum_s"]) > 0]

    def ratio(r: dict, over: str) -> float:
        return float(r["attention_max_s"]) * int(r[over]) / float(r["attention_sum_s"])
    full = [r for r in forwards if r["members"] == r["group_size"]]
    in_forwards = sum(float(r["chunk_s"]) * int(r["members"]) for r in rows)
    waited = sum(float(r["waited_s"]) for r in rows)
    return {"groups": len(paths), "chunks": len(rows), "forwards": len(forwards),
            "full_forwards": len(full),
            "attention_max_over_avg": _mean([ratio(r, "members") for r in forwards]),
            "attention_max_over_avg_full": _mean([ratio(r, "members") for r in full]),
            "attention_max_over_avg_group": _mean([ratio(r, "group_size") for r in forwards]),
            "engines_per_forward": _mean([int(r["members"]) for r in forwards]),
            "bubble_share": round(waited / in_forwards, 4) if in_forwards > 0 else None}

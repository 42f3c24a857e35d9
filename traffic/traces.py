"""Replay input: the Mooncake conversation trace (JSONL) and its prefix-cache hits.

Owns: parsing and validating the trace format - one JSON object per line with
``timestamp`` (ms from the trace start), ``input_length`` and ``output_length``
(tokens) and ``hash_ids`` (ids of the prompt's 512-token blocks, equal id =
equal content) - into frozen ``TraceRequest`` values, and the ideal
prefix-cache model over them (``prefix_hits``), and their replay as one-turn
agents (``replay``; ``play`` picks replay or the generated workload for a run). Refuses: anything about time
or transport - it neither sleeps nor sends; the serving plane's workload driver
(and the scenario runner) import it, so it is stdlib-only and needs no root,
Mininet or gRPC. It never writes: the shared trace copy stays read-only.

Validation happens before anything is built: a bad line raises ``ValueError``
naming the file, the 1-based line number and the problem
(``trace.jsonl:7: hash_ids[2] is 'x', not an integer``). Blank lines are
skipped (a trailing newline is not an error).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

from traffic.workload import Trajectory, Turn, WorkloadSpec, arrivals, generate

BLOCK_TOKENS = 512
_KEYS = ("timestamp", "input_length", "output_length", "hash_ids")


@dataclass(frozen=True)
class TraceRequest:
    """One request of the trace: arrives at ``arrival_s`` (seconds from the start)."""

    arrival_s: float
    input_tokens: int
    output_tokens: int
    hash_ids: tuple[int, ...]


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_line(text: str, where: str) -> tuple[float, int, int, tuple[int, ...]]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in _KEYS if k not in obj]
    if missing:
        raise ValueError(f"{where}: missing key(s) {', '.join(missing)}")
    ts_ms = obj["timestamp"]
    if isinstance(ts_ms, bool) or not isinstance(ts_ms, (int, float)) or not ts_ms >= 0 or ts_ms == float("inf"):
        raise ValueError(f"{where}: timestamp is {ts_ms!r}, not a finite number of ms >= 0")
    for key in ("input_length", "output_length"):
        value = obj[key]
        if not _is_int(value):
            raise ValueError(f"{where}: {key} is {value!r}, not an integer")
        if value < 0:
            raise ValueError(f"{where}: {key} is {value}, negative")
    ids = obj["hash_ids"]
    if not isinstance(ids, list):
        raise ValueError(f"{where}: hash_ids is {type(ids).__name__}, not a list")
    for i, h in enumerate(ids):
        if not _is_int(h):
            raise ValueError(f"{where}: hash_ids[{i}] is {h!r}, not an integer")
    return ts_ms / 1000.0, obj["input_length"], obj["output_length"], tuple(ids)


def load_mooncake(path: str | Path, limit: int | None = None) -> list[TraceRequest]:
    """Read the first ``limit`` requests (all if None) of a Mooncake JSONL trace.

    Raises ``ValueError`` (file, line, problem) on malformed input, including a
    timestamp earlier than the previous request's, and ``OSError`` if the file
    cannot be read. Every line read is validated before any request is built.
    A file is parsed once per process (a sweep validates every point's scenario,
    then plays it): the result is kept while the file's size and mtime stay.
    """
    if limit is not None and (not _is_int(limit) or limit < 0):
        raise ValueError(f"limit: {limit!r} must be an integer >= 0 (or None for the whole trace)")
    st = Path(path).stat()
    return list(_load(str(path), limit, st.st_size, st.st_mtime_ns))


@functools.lru_cache(maxsize=8)
def _load(path_str: str, limit: int | None, _size: int, _mtime_ns: int) -> tuple[TraceRequest, ...]:
    path = Path(path_str)
    rows, prev_s = [], 0.0
    with path.open(encoding="utf-8") as fh:
        for lineno, text in enumerate(fh, start=1):
            if limit is not None and len(rows) >= limit:
                break
            if not text.strip():
                continue
            where = f"{path}:{lineno}"
            row = _parse_line(text, where)
            if row[0] < prev_s:
                raise ValueError(f"{where}: timestamp {row[0] * 1000:g} ms goes backwards "
                                 f"(previous request at {prev_s * 1000:g} ms)")
            prev_s = row[0]
            rows.append(row)
    return tuple(TraceRequest(*row) for row in rows)


def prefix_hits(requests: list[TraceRequest], block_tokens: int = BLOCK_TOKENS) -> list[int]:
    """Cached-prefix tokens of each request, with an unbounded cache of every
    block seen before (requests taken in the given order, i.e. arrival order).

    A request hits the longest prefix of its ``hash_ids`` whose blocks were
    all seen in earlier requests; hit tokens = blocks x ``block_tokens``,
    capped at its ``input_tokens``. Its own blocks join the cache afterwards.
    """
    if not _is_int(block_tokens) or block_tokens <= 0:
        raise ValueError(f"block_tokens: {block_tokens!r} must be an integer > 0")
    seen: set[int] = set()
    hits = []
    for req in requests:
        blocks = 0
        for h in req.hash_ids:
            if h not in seen:
                break
            blocks += 1
        hits.append(min(blocks * block_tokens, req.input_tokens))
        seen.update(req.hash_ids)
    return hits


def hit_ratio(requests: list[TraceRequest], block_tokens: int = BLOCK_TOKENS) -> float:
    """Hit tokens over input tokens, summed over ``requests`` (0.0 if no input)."""
    total = sum(r.input_tokens for r in requests)
    return sum(prefix_hits(requests, block_tokens)) / total if total else 0.0


def replay(requests: list[TraceRequest], speed: float = 1.0, skip: int = 0,
           block_tokens: int = BLOCK_TOKENS) -> tuple[list[Trajectory], list[float]]:
    """Trace requests from the ``skip``-th on as one-turn agents: agent ``i`` has the request's prefix hit
    (``prefix_hits`` over the whole trace so far, so the skipped requests warm the cache; whole
    ``block_tokens`` blocks) in storage, prefills the rest of its input and decodes its output (at least one
    token); it arrives at (its timestamp - the first replayed one's) / ``speed``."""
    if not speed > 0:
        raise ValueError(f"speed: {speed!r} must be > 0")
    hits = prefix_hits(requests, block_tokens)[skip:]
    requests = requests[skip:]
    trajectories = []
    for i, (req, hit) in enumerate(zip(requests, hits, strict=True)):
        hit = min(hit, max(0, req.input_tokens - 1))  # a turn prefills at least one token
        turn = Turn(agent=i, index=0, context_before_tokens=hit, append_tokens=req.input_tokens - hit,
                    gen_tokens=max(1, req.output_tokens))
        trajectories.append(Trajectory(agent=i, initial_prompt_tokens=req.input_tokens, turns=(turn,)))
    t0 = requests[0].arrival_s if requests else 0.0
    return trajectories, [(r.arrival_s - t0) / speed for r in requests]


def play(spec: WorkloadSpec) -> tuple[list[Trajectory], list[float]]:
    """What a run plays: the trajectories and each one's start time (real seconds), generated from the
    workload model or replayed from ``spec.trace_file``."""
    if spec.trace_file is None:
        return generate(spec), arrivals(spec)
    limit = None if spec.trace_requests is None else spec.trace_skip + spec.trace_requests
    return replay(load_mooncake(spec.trace_file, limit), spec.trace_speed, spec.trace_skip)

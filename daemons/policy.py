"""Scheduling policy of the paper (section 5) and round robin, as pure functions.

The scheduler daemon keeps the load reports of every engine and node and asks
this module where the next request goes; nothing here does I/O, so the rules
are unit-tested exactly as the paper states them:

- PE choice (on each fetch from the global FIFO queue): engines whose
  unfinished tokens exceed ``beta`` are skipped; among the rest, engines whose
  node's storage read queue is at most ``alpha`` are preferred, lowest
  unfinished tokens first; otherwise the lowest unfinished tokens among the
  rest. ``alpha`` = tokens the node's SNIC reads in 3 s; ``beta`` = tokens one
  GPU prefills in 5 s.
- DE choice: first the DE group (node) with the fewest total tokens; inside
  it, Z = 1.05 x (sum of queued lengths + sum of unfinished tokens) / engines;
  engines that stay under Z after taking the request are preferred, fewest
  requests first; else the engine with the fewest tokens; never an engine
  whose HBM cannot hold the request.
- Read path: the side (PE node or DE node) with the shorter read queue; or, with
  split reads, both sides, the shorter queue taking more (``split_blocks``).

``RoundRobin`` cycles through engines regardless of load (the comparison point
of the paper's load-balance figure) and, for the alternating variant, through
the read sides.
"""

from __future__ import annotations

from dataclasses import dataclass

# paper: section 5's PE, DE and read-side choices. round_robin*: engines in a fixed cycle (Fig. 13's baseline; the
# paper does not say how its round robin picks the read side, so three variants): the side with the shorter
# read queue (round_robin), always the prefill side (round_robin_pe_reads), or each side in turn
# (round_robin_alternating).
POLICIES = ("paper", "round_robin", "round_robin_pe_reads", "round_robin_alternating")

# How DualPath reads one request's hit KV: from one side, the one with the shorter read queue (choose, the
# paper's), or from both, split so that both read queues drain at the same time (split: beyond the paper, which
# leaves it as future work).
READ_PATHS = ("choose", "split")

ALPHA_READ_S = 3.0
BETA_COMPUTE_S = 5.0
DE_THRESHOLD = 1.05


@dataclass(frozen=True)
class EngineLoad:
    node: str
    engine: int
    unfinished_requests: int
    unfinished_tokens: int
    hbm_free_tokens: int | None = None  # DE only: how many more context tokens its HBM holds


@dataclass(frozen=True)
class NodeLoad:
    node: str
    read_queue_tokens: int
    placed_tokens: int = 0  # every token ever placed on it to read: breaks a tie between two empty queues


def choose_pe(engines: list[EngineLoad], nodes: dict[str, NodeLoad], alpha_tokens: float,
              beta_tokens: float) -> EngineLoad | None:
    """The PE engine for the next request, or None if every engine is above beta (wait)."""
    eligible = [e for e in engines if e.unfinished_tokens <= beta_tokens]
    if not eligible:
        return None
    preferred = [e for e in eligible if nodes[e.node].read_queue_tokens <= alpha_tokens]
    pool = preferred or eligible
    return min(pool, key=lambda e: (e.unfinished_tokens, e.node, e.engine))


def choose_de(engines: list[EngineLoad], request_tokens: int, queued_tokens: dict[str, int] | None = None
              ) -> EngineLoad | None:
    """The DE engine for a request of `request_tokens` context tokens, or None if no HBM can hold it.

    `queued_tokens` is, per DE node, the length of requests already assigned to it
    but not yet reported in its engines' unfinished tokens.
    """
    queued_tokens = queued_tokens or {}
    fits = [e for e in engines if e.hbm_free_tokens is None or e.hbm_free_tokens >= request_tokens]
    if not fits:
        return None
    groups: dict[str, list[EngineLoad]] = {}
    for e in fits:
        groups.setdefault(e.node, []).append(e)
    all_by_node: dict[str, list[EngineLoad]] = {}
    for e in engines:
        all_by_node.setdefault(e.node, []).append(e)

    def group_tokens(node: str) -> int:
        return queued_tokens.get(node, 0) + sum(e.unfinished_tokens for e in all_by_node[node])

    node = min(groups, key=lambda n: (group_tokens(n), n))
    members = groups[node]
    z = DE_THRESHOLD * group_tokens(node) / len(all_by_node[node])
    under = [e for e in members if e.unfinished_tokens + request_tokens <= z]
    if under:
        return min(under, key=lambda e: (e.unfinished_requests, e.unfinished_tokens, e.engine))
    return min(members, key=lambda e: (e.unfinished_tokens, e.engine))


def choose_read_side(pe_node: NodeLoad, de_node: NodeLoad) -> str:
    """'pe' or 'de': the node with the shorter storage read queue reads. A tie (most often two empty queues,
    when the SNICs keep up) goes to the node that has been given less to read so far, PE if equal: ties going
    to PE always would load the fewer PE nodes' SNICs with every turn that arrives while both sides are idle."""
    if de_node.read_queue_tokens != pe_node.read_queue_tokens:
        return "de" if de_node.read_queue_tokens < pe_node.read_queue_tokens else "pe"
    return "de" if de_node.placed_tokens < pe_node.placed_tokens else "pe"


def split_blocks(hit_blocks: int, block_tokens: int, pe_queue_tokens: int, de_queue_tokens: int) -> int:
    """Hit blocks the PE side reads (the first ones; the DE side reads the rest) so that, with SNICs of equal
    rate, both read queues then drain together: pe + x = de + (hit - x), rounded to whole blocks and clamped."""
    hit = hit_blocks * block_tokens
    x = (hit + de_queue_tokens - pe_queue_tokens) / 2
    return max(0, min(hit_blocks, round(x / block_tokens)))


def alpha_tokens(snic_bps: float, kv_bytes_per_token: float) -> float:
    """Tokens of KV a node's SNIC reads in ALPHA_READ_S (both in the same, real or emulated, units)."""
    return snic_bps / 8 * ALPHA_READ_S / kv_bytes_per_token


def beta_tokens(prefill_s_per_token: float) -> float:
    """Tokens one GPU prefills in BETA_COMPUTE_S."""
    return BETA_COMPUTE_S / prefill_s_per_token


class RoundRobin:
    """Engines in a fixed cycle, regardless of load (the paper's Fig. 13 baseline)."""

    def __init__(self) -> None:
        self._next: dict[str, int] = {}

    def choose(self, kind: str, engines: list[EngineLoad]) -> EngineLoad:
        ordered = sorted(engines, key=lambda e: (e.node, e.engine))
        return ordered[self._step(kind, len(ordered))]

    def alternate(self, kind: str, options: tuple[str, ...]) -> str:
        """The next of `options` in turn (the alternating read side)."""
        return options[self._step(kind, len(options))]

    def _step(self, kind: str, n: int) -> int:
        i = self._next.get(kind, 0) % n
        self._next[kind] = i + 1
        return i

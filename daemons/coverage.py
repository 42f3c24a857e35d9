"""What of a request's KV a node holds: the spans pushed to it (verified) and the ones it read itself.

A receiver verifies every pushed byte against the span header its sender chose (:mod:`daemons.kvbytes`); that
alone cannot see a push that never came, a skipped layer chunk, or a span of another trajectory sent under
this request's id. So each node records, per request, the intact blocks of every span it holds, and before
the KV is used (a prefill engine before each layer chunk, a decode engine before decode) it checks that every
block of every layer the request needs is here. What is not is counted lost in the ledger, and the request
fails: an engine never computes on KV it does not hold.

Spans cover a layer chunk (``layer_first``, ``layers``) or every layer (``layers`` 0). A request's chunks are
the same on every node (its ``layer_chunks``), so a chunk is here when spans whose layers include it cover its
blocks.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field


@dataclass
class Received:
    """The KV spans of one request on this node, and an event set whenever one is added."""

    spans: list[tuple[str, int, int, int, int]] = field(default_factory=list)  # (traj, lf, layers, first, blocks)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def add(self, trajectory: str, layer_first: int, layers: int, first_block: int, blocks: int,
            bad: list[int] | tuple[int, ...] = ()) -> None:
        """Blocks [first_block, first_block + blocks) of these layers are here, less the `bad` (corrupt) ones."""
        bad_set = set(bad)
        run = None
        for b in range(first_block, first_block + blocks + 1):
            if b < first_block + blocks and b not in bad_set:
                run = b if run is None else run
            elif run is not None:
                self.spans.append((trajectory, layer_first, layers, run, b - run))
                run = None
        self.changed.set()

    def missing(self, trajectory: str, chunk: tuple[int, int], first_block: int, blocks: int) -> list[int]:
        """The blocks of [first_block, first_block + blocks) of layer chunk `chunk` = (layer_first, layers)
        that are not here (for `trajectory`: a span of another trajectory covers nothing of this one)."""
        lf, n = chunk
        ranges = sorted((f, f + k) for t, slf, sn, f, k in self.spans
                        if t == trajectory and (sn == 0 or (slf <= lf and slf + sn >= lf + n)))
        out, at, end = [], first_block, first_block + blocks
        for lo, hi in ranges:
            if lo > at:
                out.extend(range(at, min(lo, end)))
            at = max(at, hi)
            if at >= end:
                break
        out.extend(range(at, end))
        return out

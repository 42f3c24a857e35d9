"""Lab 4, the reference solution (for teachers: keep it out of the students' copy). TEACHER.md discusses it.

read_side: the paper's rule (section 5), written out: the node whose storage read queue is shorter reads, so
a turn's KV waits behind the least; every SNIC has the same rate, so tokens queued are time to wait. A tie
(most often two empty queues, while the SNICs keep up) goes to the node given less to read so far: a fixed
tie-break ("pe") would pile every turn that arrives on an idle cluster onto the few prefill SNICs.

choose_pe: the paper's rule, written out: skip engines with more than beta tokens to prefill; among the rest
prefer those whose node's read queue is at most alpha (their reads start soon), and take the one with the
fewest unfinished tokens.
"""

from __future__ import annotations

from daemons.policyapi import EngineLoad, NodeLoad, Policy


class StudentPolicy(Policy):
    def read_side(self, pe: NodeLoad, de: NodeLoad) -> str:
        if pe.read_queue_tokens != de.read_queue_tokens:
            return "pe" if pe.read_queue_tokens < de.read_queue_tokens else "de"
        return "de" if de.placed_tokens < pe.placed_tokens else "pe"

    def choose_pe(self, engines: list[EngineLoad], nodes: dict[str, NodeLoad], alpha_tokens: float,
                  beta_tokens: float) -> EngineLoad | None:
        free = [e for e in engines if e.unfinished_tokens <= beta_tokens]
        if not free:
            return None  # every GPU has 5 s of work: the turn waits until one finishes some
        soon = [e for e in free if nodes[e.node].read_queue_tokens <= alpha_tokens]
        return min(soon or free, key=lambda e: (e.unfinished_tokens, e.node, e.engine))

"""Lab 4, write the scheduler: YOUR policy. `dpemu lab check 4` runs it against round robin and the paper's.

The scheduler calls two methods of this class (the interface, with every argument's unit and meaning, is
daemons/policyapi.py: read its docstrings):

- read_side(pe, de) -> "pe" | "de": REQUIRED. For each turn, which node reads its cached KV from storage
  through its storage NIC (SNIC): the prefill node the turn was placed on ("pe") or its decode node ("de").
- choose_pe(engines, nodes, alpha_tokens, beta_tokens) -> an engine | None: OPTIONAL. Which prefill GPU
  computes the turn at the head of the queue, or None to let it wait. Without it, the paper's rule is used.

Both must be pure and fast: look at the loads you are given, return a choice. You may keep state on self.
A call that raises or returns something else is counted and replaced by the paper's choice, and the check
fails you for it. Do not import the paper's rules from daemons.policy: write your own.

Check it (root; about 6 minutes):   sudo .venv/bin/dpemu lab check 4 --policy labs/4-write-the-scheduler/policy.py
"""

from __future__ import annotations

from daemons.policyapi import EngineLoad, NodeLoad, Policy


class StudentPolicy(Policy):
    """As shipped, this is Basic's rule: every turn reads on the prefill side. The check fails it."""

    def read_side(self, pe: NodeLoad, de: NodeLoad) -> str:
        # TODO: choose the side whose SNIC will have this turn's KV soonest. What do pe.read_queue_tokens and
        # de.read_queue_tokens tell you? What should happen when they are equal (both empty, most often)?
        return "pe"

    # TODO (optional): choose the prefill engine yourself. Delete this method to keep the paper's rule.
    def choose_pe(self, engines: list[EngineLoad], nodes: dict[str, NodeLoad], alpha_tokens: float,
                  beta_tokens: float) -> EngineLoad | None:
        return super().choose_pe(engines, nodes, alpha_tokens, beta_tokens)

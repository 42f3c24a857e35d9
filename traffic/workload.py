"""Seeded synthetic agentic trajectories shaped like the paper's Table 2 sets.

Owns: the workload model (which agent runs which turns, with how many cached,
appended and generated tokens), agent arrival times, and the statistics that
compare a workload with Table 2. Refuses: any I/O, timing or networking - it
returns plain frozen values; the serving plane's workload driver (and the
scenario runner) import it, so it stays stdlib-only and runs without root,
Mininet or gRPC.

The model, per trajectory (one agent). Draws come from ``random.Random``
seeded by (seed, set, agent), so agent ``i`` is the same whatever the count:

- initial prompt (system prompt + tool schemas + task): lognormal, mean ~5.2K
  tokens, sigma 0.5. It is ALREADY in storage when turn 0 starts (the shared
  system prompt is cached by every production system), so every turn - turn 0
  included - loads ``context_before_tokens > 0`` and prefills only its append.
- pace: one lognormal factor per trajectory (sigma ~0.8, z clipped to [-3, 2])
  that scales both its append and gen levels: terse trajectories (short tool
  outputs, short actions) run many turns, verbose ones few. The spread in pace
  is what lets Table 2's turns and per-turn lengths coexist (see below).
- per-turn append (tool output): lognormal around ``append_median x pace``,
  sigma 0.8 (heavy tail); per-turn gen (action): lognormal around
  ``gen_median x pace x lognormal(0.3)``, sigma 0.6. Base draws are clipped to
  8192 / 4096 tokens (agents truncate tool output; max tokens per action), then
  multiplied by ``append_scale`` / ``gen_scale`` (the paper's Fig. 9: the same
  draws, scaled) and clipped to MaxLen/4 and MaxLen/8 so a first turn fits.
- task length: lognormal number of turns (mean 5x Table 2's, sigma 1.0) after
  which the agent is done (~16% of agents); usually it ends earlier, when the
  next turn would not fit the window: ``context_before + append + gen > MaxLen``
  (MaxLen = 32768 / 49152 / 65536) - that turn is not run.
- context grows: ``context_before(t+1) = context_before(t) + append(t) + gen(t)``.
- the pace and task-length quantiles of agent ``i`` follow Kronecker sequences
  (``frac(u0 + i x golden ratio)``, ``frac(v0 + i x (sqrt 2 - 1))``, offsets
  from the seed): a stratified draw, so 500 agents cover both distributions
  evenly and Table 2 holds within ~5% for any seed (seeds 0-19: worst 4.5%),
  not just for the calibrated one. Independent draws would give ~4% sd.

Statistics (``stats``): "context" is ``context_before_tokens`` (the cached,
reused part, as in the paper's 98.7% = 32721 / (32721 + 429)). Table 2 is
matched as per-trajectory means averaged over trajectories: with the growth rule
above and a hard window, a turn-weighted mean of append + gen can never exceed
MaxLen / mean turns (every trajectory adds at most MaxLen tokens), i.e. 546 /
464 / 417 tokens for the three sets, below Table 2's 756 / 646 / 605 - so Table
2 cannot be turn-weighted. The turn-weighted means are reported too (``*_tw``).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from statistics import NormalDist

SETS = ("32K", "48K", "64K")
SAMPLINGS = ("agents", "turns")
POPULATION_PER_AGENT = 4  # "turns" sampling draws agents from at least this many trajectories per agent

# The paper's Table 2 (500 trajectories per set).
TABLE2 = {
    "32K": {"turns": 60, "append_tokens": 608, "gen_tokens": 148, "context_tokens": 17183},
    "48K": {"turns": 106, "append_tokens": 474, "gen_tokens": 172, "context_tokens": 25120},
    "64K": {"turns": 157, "append_tokens": 429, "gen_tokens": 176, "context_tokens": 32721},
}
TRAJECTORIES_PER_SET = 500

APPEND_CLIP_TOKENS = 8192
GEN_CLIP_TOKENS = 4096
_PROMPT_SIGMA = 0.5
_PACE_Z_RANGE = (-3.0, 2.0)
_GEN_LEVEL_SIGMA = 0.3
_APPEND_TURN_SIGMA = 0.8
_GEN_TURN_SIGMA = 0.6
_TASK_TURNS_SIGMA = 1.0
# Kronecker (golden-ratio) sequences: agent i's pace and task quantiles.
_PACE_STEP = (math.sqrt(5) - 1) / 2
_TASK_STEP = math.sqrt(2) - 1
_NORMAL = NormalDist()


@dataclass(frozen=True)
class SetParams:
    """Model parameters of one set (see the module docstring).

    Calibrated (fixed-point iteration on the mean of seeds 0-7 x 500
    trajectories): each Table 2 value is met within 0.5% on average over seeds.
    """

    max_len_tokens: int
    prompt_mean_tokens: float
    append_median_tokens: float
    gen_median_tokens: float
    pace_sigma: float
    task_turns_mean: float


PARAMS = {
    "32K": SetParams(32768, 5190, 445, 108, 0.840, 300),
    "48K": SetParams(49152, 5290, 357, 130, 0.791, 530),
    "64K": SetParams(65536, 5200, 323, 132, 0.809, 785),
}


@dataclass(frozen=True)
class WorkloadSpec:
    """What to generate. ``arrival_rate_per_s=None`` is offline: every agent at t=0.

    ``turns_per_agent=None`` runs whole trajectories; ``k`` starts each agent at
    a random turn of its trajectory (earlier context already in storage) and
    runs ``k`` turns (fewer if the trajectory is shorter).
    """

    set_name: str = "64K"
    seed: int = 0
    agents: int = TRAJECTORIES_PER_SET
    turns_per_agent: int | None = None
    append_scale: float = 1.0
    gen_scale: float = 1.0
    arrival_rate_per_s: float | None = None
    sampling: str = "agents"  # with turns_per_agent: "agents" (agent i = trajectory i) or "turns" (see generate)
    # replay instead of generate (traffic.traces.play): the first trace_requests requests of a Mooncake trace,
    # each a one-turn agent arriving at its timestamp / trace_speed; the fields above but seed are unused then
    trace_file: str | None = None
    trace_requests: int | None = None
    trace_speed: float = 1.0
    trace_skip: int = 0  # requests before the replayed ones: they warm the prefix cache, and are not played

    def __post_init__(self):
        if self.set_name not in SETS:
            raise ValueError(f"set_name: {self.set_name!r} is not one of {', '.join(SETS)}")
        _require_int("seed", self.seed)
        _require_int("agents", self.agents)
        if self.agents <= 0:
            raise ValueError(f"agents: {self.agents} must be > 0")
        if self.turns_per_agent is not None:
            _require_int("turns_per_agent", self.turns_per_agent)
            if self.turns_per_agent <= 0:
                raise ValueError(f"turns_per_agent: {self.turns_per_agent} must be > 0 (or None for whole trajectories)")
        for name in ("append_scale", "gen_scale"):
            _require_positive(name, getattr(self, name))
        if self.arrival_rate_per_s is not None:
            _require_positive("arrival_rate_per_s", self.arrival_rate_per_s, "(or None for offline)")
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"sampling: {self.sampling!r} is not one of {', '.join(SAMPLINGS)}")
        if self.sampling == "turns" and self.turns_per_agent is None:
            raise ValueError("sampling: 'turns' draws k-turn windows; it needs turns_per_agent")
        if self.trace_requests is not None:
            _require_int("trace_requests", self.trace_requests)
            if self.trace_requests <= 0:
                raise ValueError(f"trace_requests: {self.trace_requests} must be > 0 (or None for the whole trace)")
        _require_positive("trace_speed", self.trace_speed)
        _require_int("trace_skip", self.trace_skip)
        if self.trace_skip < 0:
            raise ValueError(f"trace_skip: {self.trace_skip} must be >= 0")

    @property
    def max_len_tokens(self) -> int:
        return PARAMS[self.set_name].max_len_tokens

    @property
    def offline(self) -> bool:
        return self.arrival_rate_per_s is None and self.trace_file is None


def _require_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}: {value!r} must be an integer")


def _require_positive(name: str, value, hint: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}: {value!r} must be a number")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}: {value!r} must be a finite number > 0 {hint}".rstrip())


@dataclass(frozen=True)
class Turn:
    """One agent turn: load ``context_before_tokens`` from storage, prefill
    ``append_tokens``, decode ``gen_tokens``."""

    agent: int
    index: int
    context_before_tokens: int
    append_tokens: int
    gen_tokens: int

    @property
    def prefill_tokens(self) -> int:
        """Prompt length of this turn's request (cached + appended)."""
        return self.context_before_tokens + self.append_tokens

    @property
    def context_after_tokens(self) -> int:
        return self.context_before_tokens + self.append_tokens + self.gen_tokens

    @property
    def kv_reuse(self) -> float:
        """Fraction of the prompt's KV loaded from storage rather than computed."""
        return self.context_before_tokens / self.prefill_tokens


@dataclass(frozen=True)
class Trajectory:
    agent: int
    initial_prompt_tokens: int
    turns: tuple[Turn, ...]

    @property
    def start_turn(self) -> int:
        """Index of the first emulated turn (> 0 for a mid-trajectory start)."""
        return self.turns[0].index

    @property
    def preloaded_tokens(self) -> int:
        """Tokens that must be in storage before this agent's first emulated turn."""
        return self.turns[0].context_before_tokens


def _lognormal(rng: random.Random, mean: float, sigma: float) -> float:
    return rng.lognormvariate(math.log(mean) - sigma * sigma / 2, sigma)


def _z(u: float) -> float:
    return _NORMAL.inv_cdf(min(max(u, 1e-12), 1 - 1e-12))


def _full_trajectory(spec: WorkloadSpec, agent: int, offsets: tuple[float, float]) -> Trajectory:
    p = PARAMS[spec.set_name]
    rng = random.Random(f"dpemu.workload:{spec.seed}:{spec.set_name}:{agent}")
    prompt = max(1, min(round(_lognormal(rng, p.prompt_mean_tokens, _PROMPT_SIGMA)), p.max_len_tokens // 4))
    z_lo, z_hi = _PACE_Z_RANGE
    pace = math.exp(p.pace_sigma * min(max(_z((offsets[0] + agent * _PACE_STEP) % 1.0), z_lo), z_hi))
    append_level = p.append_median_tokens * pace
    gen_level = _lognormal(rng, p.gen_median_tokens, _GEN_LEVEL_SIGMA) * pace
    task_z = _z((offsets[1] + agent * _TASK_STEP) % 1.0)
    task_turns = max(1, round(p.task_turns_mean * math.exp(_TASK_TURNS_SIGMA * task_z - _TASK_TURNS_SIGMA**2 / 2)))
    append_cap, gen_cap = p.max_len_tokens // 4, p.max_len_tokens // 8
    turns, context = [], prompt
    while len(turns) < task_turns:
        base_append = min(_lognormal(rng, append_level, _APPEND_TURN_SIGMA), APPEND_CLIP_TOKENS)
        base_gen = min(_lognormal(rng, gen_level, _GEN_TURN_SIGMA), GEN_CLIP_TOKENS)
        append = min(append_cap, max(1, round(base_append * spec.append_scale)))
        gen = min(gen_cap, max(1, round(base_gen * spec.gen_scale)))
        if context + append + gen > p.max_len_tokens:
            break  # the next turn would not fit the window: the agent stops here
        turns.append(Turn(agent, len(turns), context, append, gen))
        context += append + gen
    return Trajectory(agent, prompt, tuple(turns))


def _offsets(spec: WorkloadSpec) -> tuple[float, float]:
    rng = random.Random(f"dpemu.workload.offsets:{spec.seed}:{spec.set_name}")
    return rng.random(), rng.random()


def _turn_weighted_agents(spec: WorkloadSpec, offsets: tuple[float, float]) -> list[int]:
    """`spec.agents` trajectory indices drawn without replacement with probability proportional to their
    number of turns (Efraimidis-Spirakis keys u^(1/w)), from a population of max(500, 4 x agents)."""
    population = max(TRAJECTORIES_PER_SET, POPULATION_PER_AGENT * spec.agents)
    rng = random.Random(f"dpemu.workload.turns:{spec.seed}:{spec.set_name}")
    keys = []
    for i in range(population):
        turns = len(_full_trajectory(spec, i, offsets).turns)
        u = rng.random()
        keys.append((u ** (1.0 / turns) if turns else -1.0, i))
    return sorted(i for _, i in sorted(keys, reverse=True)[:spec.agents])


def generate(spec: WorkloadSpec) -> list[Trajectory]:
    """``spec.agents`` trajectories. Sampling "agents": agent ``i`` is trajectory ``i``, identical for any
    agent count, so every trajectory weighs the same (Table 2's per-trajectory means). Sampling "turns":
    trajectories are drawn with probability proportional to their length, so the k-turn windows have the
    turn mix of whole trajectories (the paper's offline runs), where long, terse trajectories contribute
    more turns."""
    out, offsets = [], _offsets(spec)
    agents = range(spec.agents) if spec.sampling == "agents" else _turn_weighted_agents(spec, offsets)
    for agent in agents:
        traj = _full_trajectory(spec, agent, offsets)
        k = spec.turns_per_agent
        if k is not None and k < len(traj.turns):
            rng = random.Random(f"dpemu.workload.start:{spec.seed}:{spec.set_name}:{agent}")
            start = rng.randint(0, len(traj.turns) - k)
            traj = Trajectory(agent, traj.initial_prompt_tokens, traj.turns[start:start + k])
        out.append(traj)
    return out


def arrivals(spec: WorkloadSpec) -> list[float]:
    """Start time (s) of each agent: all 0.0 offline, else a seeded Poisson process."""
    if spec.offline:
        return [0.0] * spec.agents
    rng = random.Random(f"dpemu.workload.arrivals:{spec.seed}:{spec.set_name}")
    t_s, out = 0.0, []
    for _ in range(spec.agents):
        t_s += rng.expovariate(spec.arrival_rate_per_s)
        out.append(t_s)
    return out


def stats(trajectories: list[Trajectory]) -> dict[str, float]:
    """Table 2 statistics of ``trajectories``.

    ``turns``: mean turns per trajectory. ``append_tokens``, ``gen_tokens``,
    ``context_tokens`` (context = ``context_before_tokens``): each trajectory's
    per-turn mean, averaged over trajectories (Table 2's convention, see the
    module docstring). ``*_tw``: the same means weighted by turn (over all
    turns). ``kv_reuse``: mean over all turns of ``Turn.kv_reuse``;
    ``kv_reuse_of_means``: context / (context + append), as the paper computes
    its 98.7%. ``max_context_tokens``: largest ``context_after_tokens`` seen.
    """
    trajs = [t for t in trajectories if t.turns]
    if not trajs:
        raise ValueError("stats: no trajectory with at least one turn")
    turns = [t for traj in trajs for t in traj.turns]

    def macro(field: str) -> float:
        return sum(sum(getattr(t, field) for t in tr.turns) / len(tr.turns) for tr in trajs) / len(trajs)

    def micro(field: str) -> float:
        return sum(getattr(t, field) for t in turns) / len(turns)

    out = {"trajectories": len(trajs), "turns": len(turns) / len(trajs)}
    for key, field in (("append", "append_tokens"), ("gen", "gen_tokens"), ("context", "context_before_tokens")):
        out[f"{key}_tokens"] = macro(field)
        out[f"{key}_tokens_tw"] = micro(field)
    out["kv_reuse"] = micro("kv_reuse")
    out["kv_reuse_of_means"] = out["context_tokens"] / (out["context_tokens"] + out["append_tokens"])
    out["max_context_tokens"] = max(t.context_after_tokens for t in turns)
    return out

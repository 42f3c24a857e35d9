"""The scheduler's config of one mode (``<mode>/scheduler.json``), with alpha and beta derived as the paper
defines them (section 5) from this scenario's own cluster and workload:

- alpha: the tokens one SNIC reads in 3 s (``daemons.policy.alpha_tokens``);
- the nodes report their read queues every STATUS_PERIOD_REAL_S of real time (``status_period_s``, wall);
- beta: the tokens one GPU prefills in 5 s, at the prefill rate of this workload's mean turn (its mean cached
  context and mean append, over every turn the mode plays), on the run's GPU model. Until issue 13 beta was fixed
  to the 64K set's mean turn (32,721 cached + 429 new) for every model, set and trace.

``beta_basis`` records the turn and the rate beta came from.
"""

from __future__ import annotations

import statistics

from daemons import costmodel
from daemons.gpu import CostModelCompute
from daemons.policy import alpha_tokens, beta_tokens

STATUS_PERIOD_REAL_S = 0.1  # fresher than one context's read (0.1-1 s); each report costs ~1 ms of CPU a side


def mean_turn(trajectories) -> tuple[int, int]:
    """(cached context, appended tokens) of the mean turn over every turn of the trajectories."""
    turns = [t for tr in trajectories for t in tr.turns]
    if not turns:
        raise ValueError("the workload has no turn to derive beta from")
    return (round(statistics.fmean(t.context_before_tokens for t in turns)),
            max(1, round(statistics.fmean(t.append_tokens for t in turns))))


def scheduler_config(sc, mode: str, model: costmodel.ModelSpec, nodes: list[dict], trajectories) -> dict:
    cached, new = mean_turn(trajectories)
    per_token_s = sum(CostModelCompute(model, 1.0, sc.cluster.gpu_model).prefill_layers_s([(cached, new)])) / new
    return {"mode": mode, "policy": sc.serving.policy, "read_path": sc.serving.read_path,
            "layer_chunks": sc.serving.layer_chunks,
            "alpha_tokens": alpha_tokens(sc.cluster.snic_rate, costmodel.kv_bytes_per_token(model)),
            "beta_tokens": beta_tokens(per_token_s),
            "beta_basis": {"cached_tokens": cached, "new_tokens": new, "prefill_s_per_token": per_token_s},
            "hbm_tokens": costmodel.kv_capacity_tokens(model), "nodes": nodes,
            "status_period_s": STATUS_PERIOD_REAL_S * sc.scale.time}

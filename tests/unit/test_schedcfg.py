"""beta comes from the scenario's own workload (its mean turn), not from one set's mean for every run."""

from types import SimpleNamespace

import pytest

from daemons import costmodel
from daemons.policy import BETA_COMPUTE_S
from scenarios.schedcfg import mean_turn, scheduler_config
from traffic.workload import WorkloadSpec, generate


def _sc(gpu_model: str = "profile"):
    return SimpleNamespace(cluster=SimpleNamespace(gpu_model=gpu_model, snic_rate=400e9),
                           serving=SimpleNamespace(policy="paper", read_path="choose", layer_chunks=2),
                           scale=SimpleNamespace(time=1.0))


def test_beta_is_five_seconds_of_the_workloads_mean_turn():
    model = costmodel.MODELS["ds660b"]
    betas = {}
    for set_name in ("32K", "64K"):
        trajs = generate(WorkloadSpec(set_name=set_name, agents=40, turns_per_agent=3))
        cfg = scheduler_config(_sc(), "dualpath", model, [], trajs)
        basis = cfg["beta_basis"]
        assert (basis["cached_tokens"], basis["new_tokens"]) == mean_turn(trajs)
        assert cfg["beta_tokens"] == pytest.approx(BETA_COMPUTE_S / basis["prefill_s_per_token"])
        betas[set_name] = cfg["beta_tokens"]
    # a shorter context costs less per new token: a GPU prefills more of them in 5 s
    assert betas["32K"] > betas["64K"]


def test_a_workload_without_turns_is_refused():
    with pytest.raises(ValueError, match="no turn"):
        mean_turn([])

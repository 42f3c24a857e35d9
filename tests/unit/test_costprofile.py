"""The profiled cost model against the committed H200 measurements, its conversion to H800, and Fig. 3.

Asked for the GPU the profile was measured on, the model must give back what was measured at every grid
point; asked for the paper's Hopper, memory-bound work must slow by the bandwidth ratio and compute-bound
work must not; and Fig. 3's throughput curve must follow at the batch sizes the fit did not use.
"""

from __future__ import annotations

import math

import pytest

from daemons import costmodel as cm
from daemons import costprofile as cp
from daemons.gpu import CostModelCompute

PROFILED = ("qwen32b", "ds660b", "ds27b")


def _rows(model: str, op: str | None = None):
    _, rows = cp.load(str(cp.PROFILE_PATH))
    return [r for r in rows if r.model == model and (op is None or r.op == op)]


def _row_ep(r) -> int:
    return r.ep_gpus if r.op == "experts" else 1


def _grid_points(pm):
    """Measured rows grouped by the grid point they share in the model's tables: (op, phase, coords)."""
    groups: dict = {}
    for r in _rows(pm.m.name):
        if r.op == "layer" or (r.op == "attention" and pm.m.kv_lora_rank):
            continue  # a whole layer is checked below; DS attention is FlashMLA's published rate
        batch = [(r.cached, r.new)] * r.batch
        coords = tuple(round(c, 6) for c in cp._coords(r.op, batch))
        groups.setdefault((r.op, "any" if r.op in cp._GEMM_OPS else r.phase, coords), []).append(r)
    return groups


@pytest.mark.parametrize("model", PROFILED)
def test_on_the_profiled_gpu_every_grid_point_gives_back_its_measurements(model):
    pm = cp.ProfiledModel(cm.MODELS[model], gpu=cp.H200, forward_s=0.0)
    groups = _grid_points(pm)
    assert len(groups) >= 40
    for (op, _, _), rows in groups.items():
        r = rows[0]
        got = pm.op_s(op, r.phase, [(r.cached, r.new)] * r.batch, _row_ep(r))
        # a point measured once comes back exactly; one measured several times (the same GEMM rows at other
        # contexts) comes back as their harmonic mean: the table averages efficiencies
        want = len(rows) / sum(1 / (x.time_ms * 1e-3) for x in rows)
        assert got == pytest.approx(want, rel=1e-4), (op, r.phase, r.batch, r.cached, r.new)
    assert not pm.outside  # every grid point lies inside the grid


def test_a_whole_qwen_layer_is_its_measured_layer():
    pm = cp.ProfiledModel(cm.QWEN32B, gpu=cp.H200)
    errors = []
    for r in _rows("qwen32b", "layer"):
        batch = [(r.cached, r.new)] * r.batch
        dense, _, _ = pm._layer_kinds(batch, r.phase, 1)
        errors.append(abs(dense / (r.time_ms * 1e-3) - 1))
    # exact up to the linear op's averaging over contexts (the same GEMM measured at each context)
    assert max(errors) < 0.06, max(errors)


def test_between_grid_points_the_time_lies_between_its_neighbours():
    pm = cp.ProfiledModel(cm.DS660B, gpu=cp.H200)
    t = {b: pm.op_s("mla_proj", "prefill", [(30000, 300)] * b) for b in (5, 7, 10)}
    assert t[5] < t[7] < t[10]
    assert not pm.outside


def test_outside_the_grid_the_edge_efficiency_holds_and_is_counted():
    pm = cp.ProfiledModel(cm.QWEN32B, gpu=cp.H200)
    edge = pm.op_s("attention", "decode", [(65536, 1)] * 128)
    far = pm.op_s("attention", "decode", [(131072, 1)] * 128)
    assert pm.outside[("attention", "decode")] == 1
    # past the edge the roofline's shape holds: twice the keys, twice the time (memory-bound decode attention)
    assert far / edge == pytest.approx(2.0, rel=0.02)


def test_conversion_to_h800_slows_memory_bound_work_by_the_bandwidth_ratio_only():
    h200 = cp.ProfiledModel(cm.QWEN32B, gpu=cp.H200)
    h800 = cp.ProfiledModel(cm.QWEN32B, gpu=cm.HOPPER)
    ratio = cp.H200.hbm_bytes_per_s / cm.HOPPER.hbm_bytes_per_s
    decode = [(32768, 1)]                      # batch 1: weights and KV stream, tensor cores idle
    assert h800.op_s("linear", "decode", decode) / h200.op_s("linear", "decode", decode) == pytest.approx(ratio)
    prefill = [(0, 4096)] * 2                  # 8K rows: FP8 tensor-core bound, the same peak on both
    assert h800.op_s("linear", "prefill", prefill) == pytest.approx(h200.op_s("linear", "prefill", prefill))


def test_ds_sparse_attention_runs_at_flashmla_published_rate():
    pm = cp.ProfiledModel(cm.DS660B)
    batch = [(30000, 300)] * 4
    work = cp.op_work(cm.DS660B, "attention", batch, 1)
    assert pm.op_s("attention", "prefill", batch) == pytest.approx(work.flops / 640e12)
    assert work.flops == pytest.approx(4 * 300 * 2048 * (2 * 128 * 576 + 2 * 128 * 512), rel=0.01)


def test_deepep_terms_follow_the_published_table():
    assert cp.deepep_latency_s(cm.DS660B, 16) == pytest.approx(313e-6)
    assert cp.deepep_latency_s(cm.DS660B, 32, tokens=128) == pytest.approx(428e-6)
    assert cp.deepep_latency_s(cm.DS660B, 32, tokens=256) == pytest.approx(2 * 428e-6)  # bandwidth-bound beyond
    assert cp.deepep_latency_s(cm.QWEN32B, 16) == 0.0                                   # no experts, no AllToAll
    # normal kernels across 2 nodes: a token crosses RDMA to the other node with prob. 1 - 2^-8
    per_copy = 7168 + 56 * 4 + 7168 * 2
    assert cp.deepep_normal_s(cm.DS660B, 16, 1000) == pytest.approx(1000 * (1 - 0.5 ** 8) * per_copy / 43e9)


def test_fig3_is_fitted_at_batch_20_and_judged_at_5_and_10():
    pm = cp.ProfiledModel(cm.DS660B)
    rel = cp.fig3_relative(pm)
    assert rel[cp.FIG3_FIT_BATCH] == pytest.approx(cp.FIG3_RELATIVE[cp.FIG3_FIT_BATCH], rel=1e-6)
    for b in (5, 10):   # not used by the fit: the paper's 2.5 and 2.9 within 15%
        assert rel[b] == pytest.approx(cp.FIG3_RELATIVE[b], rel=0.15), rel
    assert 0 < pm.forward_s < 5e-3  # a per-MoE-layer cost of the order of DeepEP latencies, not seconds
    assert rel[1] < rel[5] < rel[10] < rel[20]


def test_the_kernels_alone_do_not_reach_fig3():
    bare = cp.ProfiledModel(cm.DS660B, forward_s=0.0)
    assert cp.fig3_relative(bare)[20] < 2.5  # what the EP-group cost is fitted to supply


def test_dense_qwen_barely_gains_from_batching_as_measured():
    rel = cp.fig3_relative(cp.ProfiledModel(cm.QWEN32B))
    assert max(rel.values()) < 1.4  # the issue's own measurement: 1 / 1.19 / 1.24 / 1.26 / 1.25


def test_layer_times_add_up_and_decode_grows_with_context():
    pm = cp.ProfiledModel(cm.DS660B)
    layers = pm.prefill_layer_times_s([(32721, 429)])
    assert len(layers) == 61 and sum(layers) == pytest.approx(pm.prefill_time_s([(32721, 429)]))
    assert layers[-1] > layers[-2]   # the LM head
    assert layers[0] != layers[10]   # dense layer vs MoE layer
    assert pm.decode_step_time_s([16384] * 32) < pm.decode_step_time_s([65536] * 32)
    with pytest.raises(cm.CostModelError):
        pm.prefill_layer_times_s([(100, 0)])


def test_the_compute_reports_where_its_time_comes_from_and_what_fell_outside():
    prof = CostModelCompute(cm.DS27B, 2.0, "profile")
    roof = CostModelCompute(cm.DS27B, 2.0, "roofline")
    assert "h200.csv" in prof.describe() and "roofline" in roof.describe()
    assert prof.prefill_layers_s([(1000, 100)])[5] == pytest.approx(
        2.0 * cp.ProfiledModel(cm.DS27B).prefill_layer_times_s([(1000, 100)])[5])
    assert roof.outside_grid() == {}
    prof.decode_step_s([1_000_000])
    assert any(n > 0 for n in prof.outside_grid().values())
    with pytest.raises(ValueError):
        CostModelCompute(cm.DS27B, 1.0, "guess")


def test_basic_copy_and_hbm_limit_come_from_the_model():
    c = CostModelCompute(cm.DS660B, 1.0, "profile")
    assert c.h2d_s(32721) == pytest.approx(cm.kv_bytes(cm.DS660B, 32721) / 55e9)
    cap = c.prefill_hbm_tokens()
    assert cap == cm.kv_capacity_tokens(cm.DS660B, ep_gpus=16)
    assert 5 < cap / 32721 < 40   # a handful of 64K-set contexts, not one and not hundreds
    assert math.isfinite(c.prefill_attention_s([(32721, 429)]))


def test_bench_gpu_prints_fig3_beside_the_paper():
    from scenarios import bench

    lines: list[str] = []
    rows = bench.run_gpu(lines.append)
    text = "\n".join(lines)
    assert "Fig. 3" in text and "(fitted)" in text and "h200.csv" in text
    fig = rows[-1]["fig3"]
    assert fig["paper"] == cp.FIG3_RELATIVE and set(fig["ours"]) == set(cp.FIG3_RELATIVE)
    assert {r["model"] for r in rows[:-1]} == set(PROFILED)
    assert all(r["profile_s"] > 0 and r["roofline_s"] > 0 for r in rows[:-1])

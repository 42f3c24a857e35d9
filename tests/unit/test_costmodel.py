"""daemons.costmodel: KV sizes, the paper's Table 1 cache-compute ratios, and sane GPU times (no root, no GPU).

Run with -s to see the printed values; docs/costmodel.md explains every number checked here.
"""

from __future__ import annotations

import ast
import dataclasses
import sys
from pathlib import Path

import pytest

from daemons import costmodel as cm
from daemons.costmodel import DS27B, DS660B, DSV3, GPT_OSS_120B, HOPPER, QWEN3_235B, QWEN32B

APPEND = 429                              # the paper's mean append (64K workload set)
CTX_16K, CTX_MEAN, CTX_64K = 16384, 32721, 65536

# Table 1 (append 429, context 16K..64K). The ratio rises with context for every model (attention FLOPs
# grow with context but stay below the KV bytes' growth), so the low end is 16K and the high end 64K.
# KV format in Table 1: FP8 (1 B per element) for every model except Qwen2.5-32B, which the paper labels
# FP16. Evidence and the one definition used for all rows: docs/costmodel.md.
TABLE1 = [  # (model, KV format the paper assumed, low end at 16K, high end at 64K)
    (QWEN32B, "fp16", 117, 267),
    (GPT_OSS_120B, "fp8", 47, 95),
    (QWEN3_235B, "fp8", 39, 60),
    (DS660B, "fp8", 13, 36),
    (DSV3, "fp8", 4.8, 5.8),
]
TOLERANCE = 0.10
DSV3_64K_REASON = ("paper's MLA attention count is ~12% below MQA-mode FLOPs (576-dim QK + 512-dim PV x 128 heads); "
                   "ours is -11.3% at 64K, see docs/costmodel.md")


def table1_model(model, kv_format):
    return dataclasses.replace(model, kv_format=kv_format)


def _table1_cases():
    cases = []
    for model, fmt, low, high in TABLE1:
        cases.append(pytest.param(model, fmt, CTX_16K, low, id=f"{model.name}-16K"))
        marks = [pytest.mark.xfail(strict=True, reason=DSV3_64K_REASON)] if model is DSV3 else []
        cases.append(pytest.param(model, fmt, CTX_64K, high, id=f"{model.name}-64K", marks=marks))
    return cases


# -- KV sizes -----------------------------------------------------------------------------------------------
def test_kv_bytes_per_token_from_public_configs():
    assert cm.kv_bytes_per_layer_token(DS660B) == 656          # 512 FP8 + 4 x 4 B scales + 64 x 2 B RoPE
    assert cm.kv_bytes_per_token(DS660B) == 61 * 656 == 40_016
    assert cm.kv_bytes_per_token(QWEN32B) == 262_144           # 8 heads x 128 x 64 layers x K,V x 2 B
    assert cm.kv_bytes_per_token(DSV3) == 61 * (512 + 64) * 2 == 70_272
    assert cm.kv_bytes_per_token(QWEN3_235B) == 94 * 2 * 4 * 128 * 2
    assert cm.kv_bytes_per_token(GPT_OSS_120B) == 18 * 2 * 8 * 64 * 2  # full-attention layers only grow
    assert cm.kv_bytes_per_token(DS27B) == 30 * 656


def test_ds660b_mean_context_is_about_1_3_gb():
    size = cm.kv_bytes(DS660B, CTX_MEAN)
    print(f"\nds660b {CTX_MEAN}-token context: {size / 1e9:.3f} GB")
    assert 1.25e9 < size < 1.35e9


def test_sliding_window_layers_are_bounded():
    per_layer = cm.kv_bytes_per_layer_token(GPT_OSS_120B)
    assert cm.kv_bytes(GPT_OSS_120B, 100) == 36 * 100 * per_layer
    assert cm.kv_bytes(GPT_OSS_120B, 10_000) == (18 * 10_000 + 18 * 128) * per_layer


def test_fp8_mla_latent_is_the_v32_layout_and_gqa_fp8_halves():
    assert cm.kv_bytes_per_layer_token(table1_model(DSV3, "fp8")) == 656
    assert cm.kv_bytes_per_token(table1_model(QWEN3_235B, "fp8")) * 2 == cm.kv_bytes_per_token(QWEN3_235B)


@pytest.mark.parametrize("model, total_b, active_b", [
    (DS660B, 671, 37), (DSV3, 671, 37), (QWEN32B, 32.5, 32.5), (QWEN3_235B, 235, 22),
    (GPT_OSS_120B, 117, 5.1), (DS27B, 27, None),
])
def test_parameter_counts_match_the_published_sizes(model, total_b, active_b):
    total, active = cm.param_counts(model)
    print(f"\n{model.name}: {total / 1e9:.1f}B total, {active / 1e9:.2f}B activated")
    assert total == pytest.approx(total_b * 1e9, rel=0.03)
    if active_b is not None:   # ds660b: +0.85B of indexer; gpt-oss: +0.6B, the published 5.1B excludes embeddings
        assert active == pytest.approx(active_b * 1e9, rel=0.12)


# -- Table 1 -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model, kv_format, context, paper", _table1_cases())
def test_cache_compute_ratio_reproduces_table1(model, kv_format, context, paper):
    ours = cm.cache_compute_ratio_gb_per_pflop(table1_model(model, kv_format), context, APPEND)
    print(f"\n{model.name} {kv_format} ctx {context}: ours {ours:.2f} GB/PFLOP, paper {paper}"
          f" ({ours / paper - 1:+.1%})")
    assert ours == pytest.approx(paper, rel=TOLERANCE)


def test_dsv3_64k_stays_within_the_documented_gap():
    ours = cm.cache_compute_ratio_gb_per_pflop(table1_model(DSV3, "fp8"), CTX_64K, APPEND)
    assert ours == pytest.approx(5.8, rel=0.12)


def test_ds660b_ratio_at_the_mean_context_is_about_22():
    ours = cm.cache_compute_ratio_gb_per_pflop(DS660B, CTX_MEAN, APPEND)
    print(f"\nds660b ratio at {CTX_MEAN}: {ours:.2f} GB/PFLOP (paper: about 22)")
    assert ours == pytest.approx(22, rel=TOLERANCE)


def test_ratio_rises_with_context_for_every_model():
    for model in cm.MODELS.values():
        ratios = [cm.cache_compute_ratio_gb_per_pflop(model, c, APPEND) for c in (CTX_16K, CTX_MEAN, CTX_64K)]
        assert ratios == sorted(ratios), model.name


def test_dsa_caps_attention_but_the_indexer_scans_everything():
    """Sparse attention makes 64K cost little more than 16K; dense MLA grows ~linearly with context."""
    sparse = cm.prefill_flops(DS660B, CTX_64K, APPEND) / cm.prefill_flops(DS660B, CTX_16K, APPEND)
    dense = cm.prefill_flops(DSV3, CTX_64K, APPEND) / cm.prefill_flops(DSV3, CTX_16K, APPEND)
    assert 1.2 < sparse < 1.6 < 3 < dense
    indexer_only = cm.prefill_flops(DS660B, 2 * CTX_64K, APPEND) - cm.prefill_flops(DS660B, CTX_64K, APPEND)
    assert indexer_only == pytest.approx(2 * 64 * 128 * 61 * CTX_64K * APPEND, rel=1e-9)


def test_prefill_flops_linear_part_is_two_per_activated_parameter():
    _, active = cm.param_counts(QWEN32B)
    linear = cm.prefill_flops(QWEN32B, 0, 1)   # one token attends only itself
    head = 2 * QWEN32B.vocab * QWEN32B.hidden
    attention = 64 * 4 * 40 * 128
    assert linear == pytest.approx(2 * (active - 2 * QWEN32B.vocab * QWEN32B.hidden) + head + attention, rel=1e-12)


# -- prefill times -------------------------------------------------------------------------------------------
def test_ds660b_prefill_of_the_mean_turn_is_tens_to_hundreds_of_ms():
    t = cm.prefill_time_s(DS660B, [(CTX_MEAN, APPEND)])
    print(f"\nds660b prefill {APPEND} new on {CTX_MEAN} cached, one Hopper: {t * 1e3:.1f} ms")
    assert 0.05 < t < 0.5


@pytest.mark.parametrize("model", [DS660B, DS27B, QWEN32B], ids=lambda m: m.name)
def test_prefill_grows_with_new_tokens_faster_than_with_context(model):
    base = cm.prefill_time_s(model, [(CTX_MEAN, APPEND)])
    more_new = cm.prefill_time_s(model, [(CTX_MEAN, 2 * APPEND)])
    more_ctx = cm.prefill_time_s(model, [(2 * CTX_MEAN, APPEND)])
    print(f"\n{model.name}: base {base * 1e3:.1f} ms, 2x new {more_new * 1e3:.1f} ms, 2x ctx {more_ctx * 1e3:.1f} ms")
    assert base < more_ctx < more_new
    assert more_new > 1.6 * base


def test_prefill_of_a_batch_costs_about_its_requests():
    one = cm.prefill_time_s(DS660B, [(CTX_MEAN, APPEND)])
    four = cm.prefill_time_s(DS660B, [(CTX_MEAN, APPEND)] * 4)
    assert 3 * one < four < 4 * one          # weights are read once per batch


def test_layer_times_sum_to_prefill_time():
    batch = [(CTX_MEAN, APPEND), (1000, 3000), (0, 64)]
    for model in (DS660B, GPT_OSS_120B):
        layers = cm.prefill_layer_times_s(model, batch)
        assert len(layers) == model.layers
        assert sum(layers) == pytest.approx(cm.prefill_time_s(model, batch), rel=1e-12)
        assert layers[5] == cm.prefill_layer_time_s(model, batch, 5)
    cost = cm.prefill_layer_cost(DS660B, batch, 10)
    assert 0 < cost.attention_s < cost.compute_s <= cost.time_s


def test_dense_layers_and_the_lm_head_are_layer_specific():
    batch = [(CTX_MEAN, APPEND)]
    dense, moe, last = (cm.prefill_layer_cost(DS660B, batch, i).gemm_flops for i in (0, 10, 60))
    assert dense != moe < last


def test_empty_batches_cost_nothing():
    assert cm.prefill_time_s(DS660B, []) == 0.0
    assert cm.decode_step_time_s(DS660B, []) == 0.0


# -- decode times --------------------------------------------------------------------------------------------
def test_ds660b_decode_step_batch_32_at_32k_is_tens_of_ms():
    t = cm.decode_step_time_s(DS660B, [32768] * 32)
    print(f"\nds660b decode step, batch 32 at 32K: {t * 1e3:.1f} ms (paper TPOT 36-39 ms incl. communication)")
    assert 0.010 < t < 0.060


@pytest.mark.parametrize("model", [DS660B, DS27B, QWEN32B], ids=lambda m: m.name)
def test_decode_step_grows_with_batch_and_context(model):
    times = [cm.decode_step_time_s(model, [8192] * b) for b in (1, 8, 32, 128)]
    print(f"\n{model.name} decode at 8K, batch 1/8/32/128: " + ", ".join(f"{t * 1e3:.2f}" for t in times) + " ms")
    assert times == sorted(times) and times[0] < times[-1]
    assert cm.decode_step_time_s(model, [65536] * 8) > cm.decode_step_time_s(model, [8192] * 8)


def test_decode_reads_weights_once_per_step_not_per_sequence():
    one, two = (cm.decode_step_time_s(QWEN32B, [1024] * b) for b in (1, 2))
    assert two < 1.1 * one                     # memory-bound on a 33 GB weight read


def test_an_explicit_expert_parallel_width_changes_the_weight_share():
    narrow = cm.decode_step_time_s(DS660B, [8192] * 8, ep_gpus=8)
    wide = cm.decode_step_time_s(DS660B, [8192] * 8, ep_gpus=64)
    assert narrow > wide


def test_hbm_capacity_holds_a_64k_request_on_every_serving_model():
    for model in (DS660B, DS27B, QWEN32B):
        assert cm.kv_capacity_tokens(model, HOPPER) > CTX_64K, model.name


# -- inputs and immutability ---------------------------------------------------------------------------------
@pytest.mark.parametrize("call", [
    lambda: cm.prefill_time_s(DS660B, [(100, 0)]),
    lambda: cm.prefill_time_s(DS660B, [(-1, 10)]),
    lambda: cm.prefill_time_s(DS660B, [(1.5, 10)]),
    lambda: cm.prefill_layer_time_s(DS660B, [(0, 10)], 61),
    lambda: cm.decode_step_time_s(DS660B, [-3]),
    lambda: cm.decode_step_time_s(DS660B, [100], ep_gpus=0),
    lambda: cm.kv_bytes(DS660B, -1),
    lambda: cm.weight_bytes_per_gpu(DS660B, 0),
    lambda: cm.kv_capacity_tokens(QWEN32B, HOPPER, ep_gpus=2),
    lambda: dataclasses.replace(DS660B, kv_format="int4"),
    lambda: dataclasses.replace(QWEN32B, dsa_top_k=2048),
    lambda: dataclasses.replace(DS660B, decode_ep_gpus=512),
])
def test_impossible_inputs_raise(call):
    with pytest.raises(cm.CostModelError):
        call()


def test_specs_are_frozen_and_the_registry_is_read_only():
    with pytest.raises(dataclasses.FrozenInstanceError):
        DS660B.layers = 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        HOPPER.gemm_mfu = 1.0
    with pytest.raises(TypeError):
        cm.MODELS["x"] = DS660B
    assert set(cm.MODELS) == {"ds660b", "ds27b", "qwen32b", "dsv3", "qwen3_235b", "gpt_oss_120b"}


def test_module_imports_only_the_standard_library():
    tree = ast.parse(Path(cm.__file__).read_text())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0}
    assert names <= set(sys.stdlib_module_names) | {"__future__"}

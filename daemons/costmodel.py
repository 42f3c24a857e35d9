"""GPU cost model: what prefill and decode would cost on a Hopper GPU, and what a context's KV cache weighs.

Owns: model specs built from public configs (frozen), the GPU spec with every efficiency constant, FLOP and
HBM-byte counts per layer, roofline times (one engine = one GPU), KV-cache sizes, and the paper's
cache-compute ratio (GB of KV loaded per PFLOP computed, Table 1). Reasoning and validation: docs/costmodel.md.

Refuses: to run or touch a GPU; to time anything that moves over a network or a PCIe/NIC path (storage reads,
DRAM->HBM copies, PE->DE transfers and MoE all-to-all are carried by the emulated network, never slept here);
scheduling, queueing and batching decisions; any I/O, state or global that mutates. Stdlib only.

Called by: the prefill and decode daemons (how long each layer or decode step computes), the scheduler
(beta = tokens one GPU prefills in 5 s, HBM capacity of a decode engine), tests/unit/test_costmodel.py.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
from dataclasses import dataclass

GB_BYTES = 1e9                 # the paper's GB (decimal); PFLOP = 1e15 FLOPs
PFLOP_FLOPS = 1e15
FP8_TILE_ELEMS = 128           # MLA FP8 cache: one FP32 scale per 128 latent elements (FlashMLA V3.2 layout)


class CostModelError(ValueError):
    """An impossible spec or request: negative tokens, empty prefill, unknown layer, bad format."""


@dataclass(frozen=True)
class GpuSpec:
    """One GPU and the efficiency constants of the roofline (all of them live here)."""

    name: str
    bf16_flops_per_s: float          # dense tensor-core peak, BF16/FP16 (no sparsity)
    fp8_flops_per_s: float           # dense tensor-core peak, FP8
    hbm_bytes_per_s: float           # HBM3 peak bandwidth
    hbm_bytes: float                 # HBM capacity
    gemm_mfu: float = 0.5            # fraction of peak large GEMMs reach (DeepGEMM FP8 / cuBLAS); decode
    #                                  GEMMs are skinny but memory-bound, so the roofline takes HBM there
    attention_mfu: float = 0.6       # FlashMLA reports ~660 of 989 TFLOPS on H800; FlashAttention-3 ~60-75%
    indexer_mfu: float = 0.4         # DSA lightning indexer: FP8 logits + ReLU + weighted head sum, less regular
    hbm_efficiency: float = 0.8      # fraction of peak HBM bandwidth streaming kernels achieve
    hbm_usable_fraction: float = 0.9  # rest: activations, workspace, allocator slack
    layer_overhead_s: float = 10e-6  # launch/synchronisation gaps per layer not hidden by CUDA graphs
    h2d_bytes_per_s: float = 55e9    # pinned host->HBM copy over PCIe Gen5 x16 (55.3 GB/s measured on an H200)


# H800 and H100 SXM share tensor-core peaks and HBM (H800 differs in NVLink and FP64 only).
HOPPER = GpuSpec("H800/H100 SXM", bf16_flops_per_s=989e12, fp8_flops_per_s=1979e12,
                 hbm_bytes_per_s=3.35e12, hbm_bytes=80e9)

KV_FORMATS = types.MappingProxyType({"fp16": 2, "bf16": 2, "fp8": 1})  # bytes per cached element


@dataclass(frozen=True)
class ModelSpec:
    """A transformer's shape as the cost model needs it. Sources are cited at each instance below.

    MLA models (kv_lora_rank > 0) cache one latent of kv_lora_rank + qk_rope_head_dim per token and layer
    and attend in MQA ("absorbed") mode as FlashMLA does. GQA models cache K and V of kv_heads x head_dim.
    """

    name: str
    layers: int                   # transformer blocks (MTP modules excluded: not part of prefill here)
    hidden: int                   # d_model
    vocab: int                    # LM-head rows; logits of the last position only (1 per request/sequence)
    q_heads: int                  # query heads
    kv_heads: int                 # GQA key/value heads (MLA: 1, the shared latent)
    head_dim: int                 # GQA: q/k/v head dim; MLA: qk_nope_head_dim
    v_head_dim: int               # per-head value width feeding the output projection
    intermediate: int             # FFN width of the dense layers
    dense_layers: int             # leading layers with a dense FFN (= layers for a dense model)
    kv_format: str                # cached element type: "fp16"/"bf16" 2 B, "fp8" 1 B (MLA fp8: 656-B layout)
    weight_bytes_per_param: float  # as resident in HBM (FP8 1, BF16 2, MXFP4 ~0.53)
    gemm_fp8: bool                # linear layers on FP8 tensor cores (else BF16)
    q_lora_rank: int = 0          # MLA query compression rank (0: full-rank query)
    kv_lora_rank: int = 0         # MLA latent width; 0 = GQA
    qk_rope_head_dim: int = 0     # MLA decoupled RoPE key width (shared by heads, cached)
    experts: int = 0              # routed experts per MoE layer (0 = dense model)
    experts_per_token: int = 0    # routed experts each token activates (top-k)
    shared_experts: int = 0       # always-on experts per MoE layer
    moe_intermediate: int = 0     # FFN width of one expert
    sliding_window: int = 0       # tokens; if set, even-indexed layers are sliding (gpt-oss layer_types)
    dsa_top_k: int = 0            # DeepSeek Sparse Attention: keys each query attends (0 = dense attention)
    indexer_heads: int = 0        # DSA lightning indexer heads
    indexer_head_dim: int = 0     # DSA indexer key/query width (FP8 keys + FP32 scale, kept in HBM only)
    prefill_ep_gpus: int = 1      # GPUs one MoE layer's routed experts are spread over on prefill engines
    decode_ep_gpus: int = 1       # the same on decode engines

    def __post_init__(self) -> None:
        if self.kv_format not in KV_FORMATS:
            raise CostModelError(f"{self.name}: kv_format {self.kv_format!r} is not one of {sorted(KV_FORMATS)}")
        for key in ("layers", "hidden", "vocab", "q_heads", "kv_heads", "head_dim", "v_head_dim",
                    "prefill_ep_gpus", "decode_ep_gpus"):
            if getattr(self, key) < 1:
                raise CostModelError(f"{self.name}: {key} must be >= 1, not {getattr(self, key)}")
        if not 0 <= self.dense_layers <= self.layers or (self.experts == 0 and self.dense_layers != self.layers):
            raise CostModelError(f"{self.name}: dense_layers {self.dense_layers} impossible")
        if self.experts and not 0 < self.experts_per_token <= self.experts:
            raise CostModelError(f"{self.name}: experts_per_token must be in 1..{self.experts}")
        if max(self.prefill_ep_gpus, self.decode_ep_gpus) > max(self.experts, 1):
            raise CostModelError(f"{self.name}: more EP GPUs than routed experts")
        if self.dsa_top_k and not (self.kv_lora_rank and self.indexer_heads and self.indexer_head_dim):
            raise CostModelError(f"{self.name}: DSA needs MLA and an indexer")


DS660B = ModelSpec(  # deepseek-ai/DeepSeek-V3.2-Exp config.json (backbone identical to DeepSeek-V3)
    name="ds660b", layers=61, hidden=7168, vocab=129280,  # num_hidden_layers, hidden_size, vocab_size
    q_heads=128, kv_heads=1, head_dim=128, v_head_dim=128,  # num_attention_heads, qk_nope_head_dim, v_head_dim
    q_lora_rank=1536, kv_lora_rank=512, qk_rope_head_dim=64,
    intermediate=18432, dense_layers=3,                # intermediate_size, first_k_dense_replace
    experts=256, experts_per_token=8, shared_experts=1, moe_intermediate=2048,  # n_routed_experts, ...
    kv_format="fp8",                                   # FP8 latent + 4 FP32 scales + BF16 RoPE = 656 B/layer
    dsa_top_k=2048, indexer_heads=64, indexer_head_dim=128,  # index_topk, index_n_heads, index_head_dim
    weight_bytes_per_param=1.0, gemm_fp8=True,         # released FP8 weights (block scales ignored), DeepGEMM
    prefill_ep_gpus=16, decode_ep_gpus=32)             # ASSUMPTION: EP over the paper's default 2P4D nodes x 8

# validation only: DeepSeek-V3 = the same backbone with dense MLA attention and a BF16 latent (1152 B/layer)
DSV3 = dataclasses.replace(DS660B, name="dsv3", kv_format="bf16", dsa_top_k=0, indexer_heads=0,
                           indexer_head_dim=0)

DS27B = ModelSpec(  # the paper's "DS 27B": shape from paper appendix A.2 (vocab not given there: V3's assumed)
    name="ds27b", layers=30, hidden=2560, vocab=129280,  # A.2: 30 layers, hidden 2560
    q_heads=32, kv_heads=1, head_dim=128, v_head_dim=128,  # A.2: 32 attention heads; V3 head shapes kept
    q_lora_rank=0, kv_lora_rank=512, qk_rope_head_dim=64,  # A.2: no Q-LoRA (full-rank query); V3 MLA latent
    intermediate=12288, dense_layers=1,                # A.2: dense intermediate 12288, 1 initial dense layer
    experts=72, experts_per_token=6, shared_experts=2, moe_intermediate=1536,  # A.2: 72 routed, 6 on, 2 shared
    kv_format="fp8", dsa_top_k=1024, indexer_heads=32, indexer_head_dim=64,  # A.2: indexer 32 x 64, top-k 1024;
    #                                                    FP8 cache as V3.2 -> the same 656 B/layer
    weight_bytes_per_param=1.0, gemm_fp8=True,         # indexer queries from the hidden state (no q latent)
    prefill_ep_gpus=8, decode_ep_gpus=8)               # paper default 1P1D: experts over one node's 8 GPUs

QWEN32B = ModelSpec(  # Qwen/Qwen2.5-32B config.json
    name="qwen32b", layers=64, hidden=5120, vocab=152064,
    q_heads=40, kv_heads=8, head_dim=128, v_head_dim=128,  # num_attention_heads, num_key_value_heads, 5120/40
    intermediate=27648, dense_layers=64, kv_format="fp16",  # FP16 KV as the paper states: 256 KiB/token
    weight_bytes_per_param=1.0, gemm_fp8=True)         # ASSUMPTION FP8 weights: BF16 (65 GB) leaves no room
#                                                        for a 64K context (16 GB) on one 80 GB engine

QWEN3_235B = ModelSpec(  # validation only: Qwen/Qwen3-235B-A22B config.json (all layers MoE, no shared expert)
    name="qwen3_235b", layers=94, hidden=4096, vocab=151936,
    q_heads=64, kv_heads=4, head_dim=128, v_head_dim=128,
    intermediate=0, dense_layers=0, experts=128, experts_per_token=8, moe_intermediate=1536,
    kv_format="bf16", weight_bytes_per_param=2.0, gemm_fp8=False,
    prefill_ep_gpus=16, decode_ep_gpus=16)             # BF16 470 GB: two nodes leave HBM for KV

GPT_OSS_120B = ModelSpec(  # validation only: openai/gpt-oss-120b config.json
    name="gpt_oss_120b", layers=36, hidden=2880, vocab=201088,
    q_heads=64, kv_heads=8, head_dim=64, v_head_dim=64,
    intermediate=0, dense_layers=0, experts=128, experts_per_token=4, moe_intermediate=2880,
    sliding_window=128,                                # layer_types alternate sliding (128) / full, sliding first
    kv_format="bf16", weight_bytes_per_param=0.54, gemm_fp8=False)  # MXFP4 experts (4.25 bit), BF16 rest

MODELS = types.MappingProxyType({m.name: m for m in (DS660B, DS27B, QWEN32B, DSV3, QWEN3_235B, GPT_OSS_120B)})


# -- shapes ------------------------------------------------------------------------------------------------
def attention_params(m: ModelSpec) -> int:
    if not m.kv_lora_rank:
        return m.hidden * (2 * m.q_heads * m.head_dim + 2 * m.kv_heads * m.head_dim)
    q_dim = m.q_heads * (m.head_dim + m.qk_rope_head_dim)
    q = m.hidden * m.q_lora_rank + m.q_lora_rank * q_dim if m.q_lora_rank else m.hidden * q_dim
    kv = m.hidden * (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank * m.q_heads * (m.head_dim + m.v_head_dim)
    return q + kv + m.q_heads * m.v_head_dim * m.hidden + indexer_params(m)


def indexer_params(m: ModelSpec) -> int:
    """DSA lightning indexer weights of one layer (part of attention_params; 0 without DSA): wq_b from the
    query latent (the hidden state without Q-LoRA), wk and the per-head weights from the hidden state."""
    if not m.dsa_top_k:
        return 0
    return (m.q_lora_rank or m.hidden) * m.indexer_heads * m.indexer_head_dim \
        + m.hidden * (m.indexer_head_dim + m.indexer_heads)


@functools.lru_cache(maxsize=1024)
def layer_params(m: ModelSpec, layer: int) -> tuple[int, int, int]:
    """(always-active params, params of one routed expert, routed experts) of one layer."""
    if layer < m.dense_layers:
        return attention_params(m) + 3 * m.hidden * m.intermediate, 0, 0
    expert = 3 * m.hidden * m.moe_intermediate      # gate, up, down (SwiGLU)
    return attention_params(m) + m.shared_experts * expert + m.hidden * m.experts, expert, m.experts


def param_counts(m: ModelSpec) -> tuple[int, int]:
    """(total, activated per token) parameters, embedding and LM head included, MTP excluded."""
    total = active = 2 * m.vocab * m.hidden
    for layer in range(m.layers):
        fixed, expert, n = layer_params(m, layer)
        total += fixed + n * expert
        active += fixed + m.experts_per_token * expert * (n > 0)
    return total, active


def _sliding(m: ModelSpec, layer: int) -> bool:
    return bool(m.sliding_window) and layer % 2 == 0


def kv_bytes_per_layer_token(m: ModelSpec) -> int:
    """Bytes one token adds to one layer's cache, in the model's storage format."""
    elem = KV_FORMATS[m.kv_format]
    if not m.kv_lora_rank:
        return 2 * m.kv_heads * m.head_dim * elem
    if elem == 1:  # FlashMLA FP8 cache (DeepSeek-V3.2): FP8 latent + FP32 scale per tile + BF16 RoPE part
        return m.kv_lora_rank + 4 * math.ceil(m.kv_lora_rank / FP8_TILE_ELEMS) + 2 * m.qk_rope_head_dim
    return (m.kv_lora_rank + m.qk_rope_head_dim) * elem


def kv_bytes_per_token(m: ModelSpec) -> int:
    """Bytes each additional token adds to a long context (sliding-window layers stop growing)."""
    return kv_bytes_per_layer_token(m) * sum(not _sliding(m, layer) for layer in range(m.layers))


def kv_bytes(m: ModelSpec, tokens: int) -> int:
    """Stored KV bytes of a `tokens`-long context; sliding-window layers keep only the last window."""
    _check_tokens(tokens, "tokens")
    per_layer = kv_bytes_per_layer_token(m)
    return sum(per_layer * (min(tokens, m.sliding_window) if _sliding(m, layer) else tokens)
               for layer in range(m.layers))


def indexer_key_bytes_per_layer_token(m: ModelSpec) -> int:
    return m.indexer_head_dim + 4 if m.dsa_top_k else 0   # FP8 key + one FP32 scale


def indexer_key_bytes_per_token(m: ModelSpec) -> int:
    """HBM bytes of the DSA indexer keys per token: excluded from kv_bytes, as the paper's 656 B/layer
    excludes them; counted in HBM traffic and HBM capacity."""
    return indexer_key_bytes_per_layer_token(m) * m.layers


def weight_bytes_per_gpu(m: ModelSpec, ep_gpus: int) -> float:
    """Resident weight bytes of one engine: replicated (attention, dense, shared) + 1/ep of routed experts."""
    _check_ep(m, ep_gpus)
    params = 2 * m.vocab * m.hidden
    for layer in range(m.layers):
        fixed, expert, n = layer_params(m, layer)
        params += fixed + n * expert / ep_gpus
    return params * m.weight_bytes_per_param


def kv_capacity_tokens(m: ModelSpec, gpu: GpuSpec = HOPPER, ep_gpus: int | None = None) -> int:
    """Context tokens one decode engine's HBM holds beside its weights (indexer keys included)."""
    ep = m.decode_ep_gpus if ep_gpus is None else ep_gpus
    free = gpu.hbm_bytes * gpu.hbm_usable_fraction - weight_bytes_per_gpu(m, ep)
    return max(0, int(free // (kv_bytes_per_token(m) + indexer_key_bytes_per_token(m))))


# -- work of one layer -------------------------------------------------------------------------------------
def _check_ep(m: ModelSpec, ep_gpus: int) -> None:
    if isinstance(ep_gpus, bool) or not isinstance(ep_gpus, int) or not 1 <= ep_gpus <= max(m.experts, 1):
        raise CostModelError(f"{m.name}: ep_gpus {ep_gpus!r} outside 1..{max(m.experts, 1)}")


def _check_tokens(value: int, what: str, least: int = 0) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise CostModelError(f"{what} must be an int >= {least}, not {value!r}")


def _keys_attended(cached: int, new: int, cap: int | None) -> int:
    """Sum over the new (causal) queries of the keys each attends: query i sees cached + i keys, at most cap."""
    if cap is None or cached + new <= cap:
        return new * cached + new * (new + 1) // 2
    if cached >= cap:
        return new * cap
    m = cap - cached
    return m * cached + m * (m + 1) // 2 + (new - m) * cap


@dataclass(frozen=True)
class LayerCost:
    """FLOPs and HBM bytes of one layer for one batch, and their roofline time on one GPU."""

    gemm_flops: float
    attention_flops: float
    indexer_flops: float
    hbm_bytes: float
    compute_s: float
    memory_s: float
    attention_s: float            # the attention share of compute_s (the scheduler's per-layer quota)
    overhead_s: float

    @property
    def time_s(self) -> float:
        return self.overhead_s + max(self.compute_s, self.memory_s)


def batch_sums(m: ModelSpec, requests: list[tuple[int, int]], cap: int | None) -> tuple[int, int, int, int]:
    """What a layer's attention work depends on, summed over the batch's (cached, new) requests: keys the
    queries attend, latent keys streamed from HBM (the union they attend, plus the new KV), keys the DSA
    indexer scores, and context tokens. The same for every layer with the same key cap, so computed once
    per batch and cap, not once per layer."""
    keys = streamed = scored = context = 0
    for cached, new in requests:
        _check_tokens(cached, "cached tokens")
        _check_tokens(new, "new tokens", least=1)
        keys += _keys_attended(cached, new, cap)
        # keys streamed from HBM: the union of what the queries attend (bounded by the context), plus new KV
        streamed += (cached + new if cap is None else min(cached + new, new * cap if m.dsa_top_k else cap + new)) + new
        if m.dsa_top_k:  # the indexer scores every earlier key for every query
            scored += _keys_attended(cached, new, None)
        context += cached + new
    return keys, streamed, scored, context


def _layer_cap(m: ModelSpec, layer: int) -> int | None:
    window = m.sliding_window if _sliding(m, layer) else None
    return m.dsa_top_k or window


def _layer_cost(m: ModelSpec, layer: int, requests: list[tuple[int, int]], ep_gpus: int,
                gpu: GpuSpec, sums: tuple[int, int, int, int] | None = None) -> LayerCost:
    """Work of `layer` for requests of (cached, new) tokens; decode is (context, 1) per sequence.
    `sums`: the batch's batch_sums for this layer's cap, if the caller has them."""
    _check_tokens(layer, "layer")
    if layer >= m.layers:
        raise CostModelError(f"{m.name} has layers 0..{m.layers - 1}, not {layer}")
    _check_ep(m, ep_gpus)
    keys, streamed, scored, context = sums or batch_sums(m, requests, _layer_cap(m, layer))
    tokens = sum(new for _, new in requests)
    fixed, expert, n = layer_params(m, layer)
    gemm = 2.0 * tokens * (fixed + m.experts_per_token * expert * (n > 0))
    weights = float(fixed)
    if n:  # local experts touched by at least one of the EP group's tokens (each GPU with a like batch)
        hit = 1.0 - (1.0 - m.experts_per_token / n) ** (tokens * ep_gpus)
        weights += n / ep_gpus * hit * expert
    if layer == m.layers - 1:  # LM head: logits of each request's last position
        gemm += 2.0 * len(requests) * m.vocab * m.hidden
        weights += m.vocab * m.hidden
    if m.kv_lora_rank:  # MQA mode: QK over latent + RoPE, PV over the latent
        pair = 2 * m.q_heads * (m.kv_lora_rank + m.qk_rope_head_dim) + 2 * m.q_heads * m.kv_lora_rank
    else:
        pair = 2 * m.q_heads * m.head_dim + 2 * m.q_heads * m.v_head_dim
    attention = float(pair * keys)
    kv_read = float(kv_bytes_per_layer_token(m) * streamed)
    indexer = 0.0
    if m.dsa_top_k:
        indexer = float(2 * m.indexer_heads * m.indexer_head_dim * scored)
        kv_read += indexer_key_bytes_per_layer_token(m) * context
    gemm_peak = gpu.fp8_flops_per_s if m.gemm_fp8 else gpu.bf16_flops_per_s
    attention_s = attention / (gpu.bf16_flops_per_s * gpu.attention_mfu)
    compute_s = (gemm / (gemm_peak * gpu.gemm_mfu) + attention_s
                 + indexer / (gpu.fp8_flops_per_s * gpu.indexer_mfu))
    hbm = weights * m.weight_bytes_per_param + kv_read
    return LayerCost(gemm, attention, indexer, hbm, compute_s,
                     hbm / (gpu.hbm_bytes_per_s * gpu.hbm_efficiency), attention_s, gpu.layer_overhead_s)


def _layer_costs(m: ModelSpec, requests: list[tuple[int, int]], ep_gpus: int, gpu: GpuSpec) -> list[LayerCost]:
    """Every layer's cost for one batch, the per-request sums computed once per key cap."""
    sums: dict[int | None, tuple[int, int, int, int]] = {}
    out = []
    for layer in range(m.layers):
        cap = _layer_cap(m, layer)
        if cap not in sums:
            sums[cap] = batch_sums(m, requests, cap)
        out.append(_layer_cost(m, layer, requests, ep_gpus, gpu, sums[cap]))
    return out


# -- public costs ------------------------------------------------------------------------------------------
def prefill_flops(m: ModelSpec, cached_tokens: int, new_tokens: int) -> float:
    """FLOPs to prefill new_tokens on top of cached_tokens already in the KV cache (one request): linear
    layers 2 x activated params per new token, causal attention over cached + new (DSA: top-k keys per
    query, plus the indexer over all earlier keys), LM head for the last position."""
    batch = [(cached_tokens, new_tokens)]
    return sum(c.gemm_flops + c.attention_flops + c.indexer_flops
               for c in _layer_costs(m, batch, m.prefill_ep_gpus, HOPPER))


def cache_compute_ratio_gb_per_pflop(m: ModelSpec, context: int, append: int) -> float:
    """The paper's cache-compute ratio: GB of stored KV of `context` tokens (the prefix already in storage,
    loaded every turn) per PFLOP of prefilling `append` new tokens after it."""
    return (kv_bytes(m, context) / GB_BYTES) / (prefill_flops(m, context, append) / PFLOP_FLOPS)


def prefill_layer_cost(m: ModelSpec, batch: list[tuple[int, int]], layer: int, gpu: GpuSpec = HOPPER,
                       ep_gpus: int | None = None) -> LayerCost:
    """Cost of one layer of prefilling a batch of (cached, new) requests on one engine (one GPU)."""
    return _layer_cost(m, layer, list(batch), m.prefill_ep_gpus if ep_gpus is None else ep_gpus, gpu)


def prefill_layer_time_s(m: ModelSpec, batch: list[tuple[int, int]], layer: int, gpu: GpuSpec = HOPPER,
                         ep_gpus: int | None = None) -> float:
    """Seconds one engine computes `layer` of the batch (layerwise prefill sleeps this per layer)."""
    return prefill_layer_cost(m, batch, layer, gpu, ep_gpus).time_s


def prefill_layer_times_s(m: ModelSpec, batch: list[tuple[int, int]], gpu: GpuSpec = HOPPER,
                          ep_gpus: int | None = None) -> tuple[float, ...]:
    """Per-layer prefill seconds, layer 0 first; their sum is prefill_time_s."""
    if not batch:
        return (0.0,) * m.layers
    ep = m.prefill_ep_gpus if ep_gpus is None else ep_gpus
    return tuple(c.time_s for c in _layer_costs(m, list(batch), ep, gpu))


def prefill_time_s(m: ModelSpec, batch: list[tuple[int, int]], gpu: GpuSpec = HOPPER,
                   ep_gpus: int | None = None) -> float:
    """Seconds one engine (one GPU) needs to prefill a batch of (cached, new) requests: per layer
    max(compute, HBM traffic) plus a fixed overhead. KV loading and all-to-all time are not included."""
    return sum(prefill_layer_times_s(m, batch, gpu, ep_gpus))


def decode_step_time_s(m: ModelSpec, contexts: list[int], gpu: GpuSpec = HOPPER,
                       ep_gpus: int | None = None) -> float:
    """Seconds of one decode step (one new token per sequence) for sequences of the given context lengths:
    weight share + KV reads (DSA: top-k latents and all indexer keys) against the batch's FLOPs, per layer."""
    if not contexts:
        return 0.0
    batch = [(context, 1) for context in contexts]
    ep = m.decode_ep_gpus if ep_gpus is None else ep_gpus
    return sum(c.time_s for c in _layer_costs(m, batch, ep, gpu))

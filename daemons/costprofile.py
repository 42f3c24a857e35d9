"""The profiled GPU cost model: layer times from ops measured on a real GPU, converted to the paper's Hopper.

Owns: reading a layer profile (``daemons/profiles/h200.csv``, written by ``daemons.gpuprofile``), each op's
efficiency at every grid point against the pure roofline of the GPU it was measured on, interpolation of
those efficiencies inside the grid (clamped at its edge outside, and counted), the conversion to another
GPU (the same efficiency of that GPU's roofline: tensor-core terms keep their time where the peaks are the
same, memory-bound terms scale by the HBM bandwidth ratio), and the terms one GPU cannot measure:
expert-parallel dispatch/combine from DeepEP's published figures, and the per-forward cost of an EP group
fitted to the paper's Fig. 3. Reasoning, fit and errors: docs/costmodel.md.

Refuses: torch or any GPU (stdlib only, like :mod:`daemons.costmodel`); network or PCIe transfers (KV loads
and the real AllToAll bytes of ``serving.collectives`` move on the emulated fabric); scheduling decisions.

Called by: :mod:`daemons.gpu` (an engine's prefill and decode times), ``dpemu bench gpu``, tests.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import NamedTuple
from pathlib import Path

from daemons import costmodel as cm
from daemons.gpuprofile_csv import ProfileRow, read_profile

PROFILE_PATH = Path(__file__).with_name("profiles") / "h200.csv"
# The GPU the committed profile was measured on: an H200 has the H800/H100 tensor-core peaks, 4.8 TB/s, 141 GB.
H200 = dataclasses.replace(cm.HOPPER, name="H200 SXM", hbm_bytes_per_s=4.8e12, hbm_bytes=141e9)

# FlashMLA README (2025-09-29, H800): DSA sparse attention "up to 640 TFlops during prefilling and 410 TFlops
# during decoding". The profile times DS sparse attention as gather + bmm (~150-170 TFLOP/s), not FlashMLA,
# so for that op the published kernel's rate replaces the measured one (its rows stay in the profile).
FLASHMLA_FLOPS = {"prefill": 640e12, "decode": 410e12}
STREAM_EFFICIENCY = 0.89       # HBM fraction streaming kernels reach: device copy 4.26 of 4.8 TB/s in the profile

# DeepEP README (H800, one CX7 400 Gb/s NIC per GPU): low-latency kernels at 128 tokens per rank, hidden 7168,
# top-8, FP8 dispatch and BF16 combine: (dispatch, combine) microseconds by EP width; normal kernels' bottleneck
# bandwidth at 4096 tokens (NVLink within 8 GPUs, RDMA beyond), GB/s.
DEEPEP_LL_US = {8: (77, 114), 16: (118, 195), 32: (155, 273), 64: (173, 314), 128: (192, 369), 256: (194, 360)}
DEEPEP_NORMAL_GBPS = {8: 153.0, 16: 43.0, 32: 58.0, 64: 51.0}
DEEPEP_REF = (128, 7168, 8)    # tokens per rank, hidden, top-k of the latency table
GPUS_PER_NODE = 8              # the paper's nodes: EP beyond 8 GPUs crosses nodes over RDMA

# Paper Fig. 3 right (DS 660B, one prefill engine, requests of 30K cached + 300 new), read off the figure:
# relative token throughput by batch size. The per-forward EP-group cost is fitted at FIG3_FIT_BATCH only;
# the other batch sizes judge the fit.
FIG3_SHAPE = (30000, 300)
FIG3_RELATIVE = {1: 1.0, 5: 2.5, 10: 2.9, 20: 3.0}
FIG3_FIT_BATCH = 20

_GEMM_OPS = ("linear", "mla_proj", "dense_ffn", "experts")   # efficiency by GEMM rows only
_MHA = "attention"


# -- the pure roofline of one op (no efficiency constants: the profile supplies them) ----------------------
@dataclass(frozen=True)
class Work:
    """FLOPs of one op on one engine, the peak they run at, and the HBM bytes they stream."""

    flops: float
    peak: str           # "fp8" or "bf16"
    hbm_bytes: float

    def roofline_s(self, gpu: cm.GpuSpec) -> float:
        peak = gpu.fp8_flops_per_s if self.peak == "fp8" else gpu.bf16_flops_per_s
        return max(self.flops / peak, self.hbm_bytes / gpu.hbm_bytes_per_s)


def _expert_params(m: cm.ModelSpec) -> int:
    return 3 * m.hidden * m.moe_intermediate


def _gemm(params: float, tokens: int, weight_bytes: float, m: cm.ModelSpec) -> Work:
    return Work(2.0 * tokens * params, "fp8" if m.gemm_fp8 else "bf16", weight_bytes)


def op_work(m: cm.ModelSpec, op: str, batch: list[tuple[int, int]], ep_gpus: int) -> Work:
    """The roofline work of `op` for one engine's batch of (cached, new) requests (decode: (context, 1))."""
    tokens = sum(n for _, n in batch)
    wb = m.weight_bytes_per_param
    if op == "linear":    # GQA layer: q/k/v/o projections + the dense FFN
        params = cm.attention_params(m) + 3 * m.hidden * m.intermediate
        return _gemm(params, tokens, params * wb, m)
    if op == "mla_proj":  # MLA projections with the absorbed W_UK / W_UV, no indexer
        params = cm.attention_params(m) - cm.indexer_params(m)
        return _gemm(params, tokens, params * wb, m)
    if op == "dense_ffn":
        params = 3 * m.hidden * m.intermediate
        return _gemm(params, tokens, params * wb, m)
    if op == "experts":   # symmetric EP group: this GPU computes as many token-expert pairs as its tokens make
        local = m.experts / ep_gpus
        hit = 1.0 - (1.0 - m.experts_per_token / m.experts) ** (tokens * ep_gpus)
        per_token = (m.experts_per_token + m.shared_experts) * _expert_params(m) + m.hidden * m.experts
        weights = (local * hit + m.shared_experts) * _expert_params(m) * wb + m.hidden * m.experts * 2
        return _gemm(per_token, tokens, weights, m)
    cap = m.dsa_top_k or None     # the profiled models have no sliding-window layers
    if op == _MHA:
        keys, streamed, _, _ = cm.batch_sums(m, batch, cap)
        if m.kv_lora_rank:
            pair = 2 * m.q_heads * (m.kv_lora_rank + m.qk_rope_head_dim) + 2 * m.q_heads * m.kv_lora_rank
        else:
            pair = 2 * m.q_heads * m.head_dim + 2 * m.q_heads * m.v_head_dim
        return Work(float(pair * keys), "bf16", float(cm.kv_bytes_per_layer_token(m) * streamed))
    if op == "indexer":
        _, _, scored, context = cm.batch_sums(m, batch, cap)
        flops = 2.0 * m.indexer_heads * m.indexer_head_dim * scored + 2.0 * tokens * cm.indexer_params(m)
        hbm = cm.indexer_key_bytes_per_layer_token(m) * context + cm.indexer_params(m) * wb
        return Work(flops, "fp8", float(hbm))
    raise cm.CostModelError(f"{m.name}: no op {op!r}")


def _coords(op: str, batch: list[tuple[int, int]]) -> tuple[float, ...]:
    """Where in the grid a batch sits for `op`: log GEMM rows, and for attention-like ops log keys per query."""
    tokens = sum(n for _, n in batch)
    if op in _GEMM_OPS:
        return (math.log(tokens),)
    context = sum(c + n for c, n in batch) / len(batch)
    return (math.log(tokens), math.log(context))


# -- efficiency tables ------------------------------------------------------------------------------------
def _interp(xs: list[float], ys: list[float], x: float, tol: float = 1e-5) -> tuple[float, bool]:
    """Piecewise-linear y(x) through sorted xs; clamped (and not inside, beyond `tol`) past the ends."""
    if x <= xs[0] or x >= xs[-1]:
        inside = xs[0] - tol <= x <= xs[-1] + tol
        return (ys[0] if x <= xs[0] else ys[-1]), inside
    i = bisect.bisect_right(xs, x)
    f = (x - xs[i - 1]) / (xs[i] - xs[i - 1])
    return ys[i - 1] + f * (ys[i] - ys[i - 1]), True


class Table:
    """One op's efficiency (roofline time / measured time) over its grid points.

    1-D ops interpolate in log rows. 2-D ops group their points into lines of equal keys per query, interpolate
    along each line in log rows, then across lines in log keys per query. Outside the grid the edge value holds:
    the roofline of the GPU asked for, at the efficiency measured at the nearest edge."""

    def __init__(self, points: list[tuple[tuple[float, ...], float]]):
        if not points:
            raise ValueError("an efficiency table needs points")
        lines: dict[float, dict[float, list[float]]] = collections.defaultdict(lambda: collections.defaultdict(list))
        exact_v: dict[float, list[float]] = collections.defaultdict(list)
        for coords, eta in points:
            v = round(coords[1], 2) if len(coords) > 1 else 0.0
            lines[v][round(coords[0], 6)].append(eta)
            exact_v[v].append(coords[1] if len(coords) > 1 else 0.0)
        keys = sorted(lines)
        self.vs = [sum(exact_v[k]) / len(exact_v[k]) for k in keys]   # each line at its points' own context
        self.lines = [(sorted(lines[k]), [sum(lines[k][u]) / len(lines[k][u]) for u in sorted(lines[k])])
                      for k in keys]
        us = [u for xs, _ in self.lines for u in xs]
        self.u_range = (min(us), max(us))

    def eta(self, coords: tuple[float, ...]) -> tuple[float, bool]:
        u = coords[0]
        inside = self.u_range[0] - 1e-5 <= u <= self.u_range[1] + 1e-5
        along = [_interp(xs, ys, u)[0] for xs, ys in self.lines]
        if len(self.vs) == 1:
            return along[0], inside
        value, in_v = _interp(self.vs, along, coords[1], tol=0.01)  # lines are keyed to 0.01 in log context
        return value, inside and in_v


@dataclass(frozen=True)
class Source:
    """Where a profile came from, as its header says."""

    path: str
    gpu: str
    date: str
    torch: str


@functools.lru_cache(maxsize=8)
def load(path: str = str(PROFILE_PATH)) -> tuple[Source, tuple[ProfileRow, ...]]:
    provenance, rows = read_profile(path)
    src = Source(path, provenance.get("gpu", "?"), provenance.get("date", "?"), provenance.get("torch", "?"))
    return src, tuple(r for r in rows if r.phase != "calib")


def _row_batch(r: ProfileRow) -> list[tuple[int, int]]:
    return [(r.cached, r.new)] * r.batch


def _tables(m: cm.ModelSpec, rows: tuple[ProfileRow, ...], gpu: cm.GpuSpec) -> dict[tuple[str, str], Table]:
    """(op, phase) -> efficiency table of this model's rows; GEMM ops share one table over both phases."""
    points: dict[tuple[str, str], list] = collections.defaultdict(list)
    whole: dict[tuple[str, int, int, int], dict[str, float]] = collections.defaultdict(dict)
    for r in rows:
        if r.model != m.name:
            continue
        batch = _row_batch(r)
        if r.op in ("layer", "linear", _MHA):
            whole[(r.phase, r.batch, r.cached, r.new)][r.op] = r.time_ms
        if r.op == "layer":
            continue
        if r.op == _MHA and m.kv_lora_rank:
            continue          # DS sparse attention: FlashMLA's published rate, not the gather + bmm timed
        ep = r.ep_gpus if r.op == "experts" else 1
        eta = op_work(m, r.op, batch, ep).roofline_s(gpu) / (r.time_ms * 1e-3)
        points[(r.op, "any" if r.op in _GEMM_OPS else r.phase)].append((_coords(r.op, batch), eta))
    tables = {k: Table(v) for k, v in points.items()}
    # GQA: a whole layer over its linear + attention ops (KV append, norms, residuals), where and as measured
    ratios = collections.defaultdict(list)
    for (phase, b, cached, new), ops in whole.items():
        if {"layer", "linear", _MHA} <= set(ops):
            batch = [(cached, new)] * b
            ratios[phase].append((_coords(_MHA, batch), ops["layer"] / (ops["linear"] + ops[_MHA])))
    for phase, pts in ratios.items():
        tables[("layer_ratio", phase)] = Table(pts)
    return tables


# -- expert-parallel terms one GPU cannot measure ---------------------------------------------------------
def _by_width(table: dict[int, object], ep: int):
    widths = sorted(table)
    return table[min(widths, key=lambda w: (abs(math.log(w / ep)), w))]


def deepep_latency_s(m: cm.ModelSpec, ep_gpus: int, tokens: int = 0) -> float:
    """Dispatch + combine of one MoE layer with DeepEP's low-latency kernels (published, H800): the table's
    latency at its EP width, scaled up by bytes beyond its 128 tokens x 7168 hidden x top-8 per rank. With
    tokens 0: the latency alone (the floor of any AllToAll at that width)."""
    if not m.experts or ep_gpus < 2:
        return 0.0
    dispatch, combine = _by_width(DEEPEP_LL_US, ep_gpus)
    ref_tokens, ref_hidden, ref_k = DEEPEP_REF
    scale = max(1.0, tokens * m.hidden * m.experts_per_token / (ref_tokens * ref_hidden * ref_k))
    return (dispatch + combine) * 1e-6 * scale


def deepep_normal_s(m: cm.ModelSpec, ep_gpus: int, tokens: int) -> float:
    """Bandwidth time of one MoE layer's dispatch (FP8 + scales) + combine (BF16) with DeepEP's normal kernels
    (published bottleneck bandwidth): across nodes a token crosses RDMA once per remote node its experts are on."""
    if not m.experts or ep_gpus < 2:
        return 0.0
    per_copy = m.hidden * 1 + (m.hidden // 128) * 4 + m.hidden * 2
    nodes = max(1, ep_gpus // GPUS_PER_NODE)
    if nodes > 1:
        copies = (nodes - 1) * (1 - (1 - 1 / nodes) ** m.experts_per_token)
    else:
        copies = (ep_gpus - 1) * (1 - (1 - 1 / ep_gpus) ** m.experts_per_token)
    return tokens * copies * per_copy / (_by_width(DEEPEP_NORMAL_GBPS, ep_gpus) * 1e9)


# -- the model ---------------------------------------------------------------------------------------------
class LayerParts(NamedTuple):
    """One engine's own share of a layer (seconds; `tokens` its batch's new tokens): see layer_parts."""
    dense: float   # a dense layer (all of it is the engine's own)
    common: float  # a MoE layer less its experts and AllToAll: projections, attention, indexer
    normal: float  # the AllToAll's bandwidth time at its tokens (DeepEP normal kernels; prefill)
    head: float    # the LM head
    tokens: int


class ProfiledModel:
    """One model's layer times on `gpu` from the profile: each op at its measured efficiency of `gpu`'s roofline.

    ``outside`` counts the predictions whose batch lies outside the profiled grid (op, phase): there the
    efficiency at the grid's nearest edge is used (the roofline's shape, anchored to the last measurement)."""

    def __init__(self, m: cm.ModelSpec, gpu: cm.GpuSpec = cm.HOPPER, path: str | Path = PROFILE_PATH,
                 forward_s: float | None = None):
        self.source, rows = load(str(path))
        if not any(r.model == m.name for r in rows):
            raise cm.CostModelError(f"{m.name}: no rows in the profile {path}")
        self.m, self.gpu = m, gpu
        self.tables = _tables(m, rows, H200)
        self.bw_ratio = H200.hbm_bytes_per_s / gpu.hbm_bytes_per_s
        self.gemm_op = "mla_proj" if m.kv_lora_rank else "linear"
        self.outside: collections.Counter = collections.Counter()
        # per MoE layer and forward: the EP group's cost beyond kernels and DeepEP (fitted to Fig. 3 on ds660b)
        self.forward_s = (0.0 if m.experts == 0 else fitted_forward_s(gpu, str(path))) \
            if forward_s is None else forward_s

    # -- ops --
    def _eta(self, op: str, phase: str, batch: list[tuple[int, int]]) -> float:
        key = (op, "any" if op in _GEMM_OPS else phase)
        eta, inside = self.tables[key].eta(_coords(op, batch))
        if not inside:
            self.outside[key] += 1
        return eta

    def op_s(self, op: str, phase: str, batch: list[tuple[int, int]], ep_gpus: int = 1) -> float:
        """Seconds of one op of one layer for the batch on this model's GPU."""
        work = op_work(self.m, op, batch, ep_gpus)
        if op == _MHA and self.m.kv_lora_rank:  # FlashMLA's published rate (see FLASHMLA_FLOPS)
            return max(work.flops / FLASHMLA_FLOPS[phase],
                       work.hbm_bytes / (self.gpu.hbm_bytes_per_s * STREAM_EFFICIENCY))
        return work.roofline_s(self.gpu) / self._eta(op, phase, batch)

    def _layer_ratio(self, phase: str, batch: list[tuple[int, int]]) -> float:
        table = self.tables.get(("layer_ratio", phase))
        return 1.0 if table is None else table.eta(_coords(_MHA, batch))[0]

    def _lm_head_s(self, batch: list[tuple[int, int]]) -> float:
        m = self.m
        work = _gemm(m.vocab * m.hidden, len(batch), m.vocab * m.hidden * m.weight_bytes_per_param, m)
        return work.roofline_s(self.gpu) / self._eta(self.gemm_op, "any", [(0, len(batch))])

    # -- layers --
    def layer_parts(self, batch: list[tuple[int, int]], phase: str, ep: int) -> LayerParts:
        """One engine's own share of each layer kind for the batch: what does not depend on the rest of its EP
        group (everything but the routed experts, which compute the whole group's tokens)."""
        m = self.m
        tokens = sum(n for _, n in batch)
        if not m.kv_lora_rank:  # GQA, dense (qwen32b)
            dense = (self.op_s("linear", phase, batch) + self.op_s(_MHA, phase, batch)) \
                * self._layer_ratio(phase, batch)
            return LayerParts(dense, dense, 0.0, self._lm_head_s(batch), tokens)
        common = self.op_s("mla_proj", phase, batch) + self.op_s(_MHA, phase, batch)
        if m.dsa_top_k:
            common += self.op_s("indexer", phase, batch)
        normal = deepep_normal_s(m, ep, tokens) if m.experts and phase == "prefill" else 0.0
        return LayerParts(common + self.op_s("dense_ffn", phase, batch), common, normal, self._lm_head_s(batch),
                          tokens)

    def moe_layer_s(self, common: float, normal: float, tokens: float, phase: str, ep: int) -> float:
        """A MoE layer: the engine's own part (`common`), the routed and shared experts at `tokens` tokens per
        GPU of the group, and the AllToAll."""
        m = self.m
        if not m.experts:
            return common
        compute = common + self.op_s("experts", phase, [(0, max(1, round(tokens)))], ep)
        if phase == "prefill":  # two micro-batches hide the AllToAll's bandwidth behind compute
            return max(compute, normal) + deepep_latency_s(m, ep) + self.forward_s
        return max(compute, deepep_latency_s(m, ep, round(tokens)))  # low-latency kernels, overlapped

    def group_layer_s(self, parts: list[LayerParts], group_size: int, phase: str = "prefill",
                      ep: int | None = None) -> tuple[float, float, float]:
        """(dense layer, MoE layer, LM head) seconds of a forward of the engines of one EP group in lockstep:
        each layer waits for its slowest engine's own part, and the routed experts of every GPU compute the
        group's tokens spread over its `group_size` GPUs (idle ones included), not each engine's own."""
        ep = (self.m.prefill_ep_gpus if phase == "prefill" else self.m.decode_ep_gpus) if ep is None else ep
        if not self.m.kv_lora_rank:
            return max(p.dense for p in parts), max(p.common for p in parts), max(p.head for p in parts)
        tokens = sum(p.tokens for p in parts) / max(group_size, len(parts))
        moe = self.moe_layer_s(max(p.common for p in parts), max(p.normal for p in parts), tokens, phase, ep)
        return max(p.dense for p in parts), moe, max(p.head for p in parts)

    def _layer_kinds(self, batch: list[tuple[int, int]], phase: str, ep: int) -> tuple[float, float, float]:
        """(dense layer, MoE layer, LM head) seconds for the batch (an EP group of like batches)."""
        parts = self.layer_parts(batch, phase, ep)
        if not self.m.kv_lora_rank:
            return parts.dense, parts.common, parts.head
        return parts.dense, self.moe_layer_s(parts.common, parts.normal, parts.tokens, phase, ep), parts.head

    def _layers(self, batch: list[tuple[int, int]], phase: str, ep: int) -> tuple[float, ...]:
        dense, moe, head = self._layer_kinds(batch, phase, ep)
        times = [dense if layer < self.m.dense_layers else moe for layer in range(self.m.layers)]
        times[-1] += head
        return tuple(times)

    def prefill_layer_times_s(self, batch: list[tuple[int, int]], ep_gpus: int | None = None) -> tuple[float, ...]:
        """Per-layer seconds of one engine prefilling a batch of (cached, new) requests."""
        if not batch:
            return (0.0,) * self.m.layers
        for cached, new in batch:
            cm._check_tokens(cached, "cached tokens")
            cm._check_tokens(new, "new tokens", least=1)
        return self._layers(list(batch), "prefill", self.m.prefill_ep_gpus if ep_gpus is None else ep_gpus)

    def prefill_time_s(self, batch: list[tuple[int, int]], ep_gpus: int | None = None) -> float:
        return sum(self.prefill_layer_times_s(batch, ep_gpus))

    def decode_step_time_s(self, contexts: list[int], ep_gpus: int | None = None) -> float:
        """Seconds of one decode step (one token per sequence) for sequences of the given contexts."""
        if not contexts:
            return 0.0
        for c in contexts:
            cm._check_tokens(c, "context")
        ep = self.m.decode_ep_gpus if ep_gpus is None else ep_gpus
        return sum(self._layers([(c, 1) for c in contexts], "decode", ep))

    def describe(self) -> str:
        """One line for plans and logs: where the times come from."""
        src = self.source
        return (f"{self.m.name}: profile {Path(src.path).name} ({src.gpu}, {src.date[:10]}, torch {src.torch}) "
                f"converted to {self.gpu.name}; EP-group cost {self.forward_s * 1e3:.2f} ms per MoE layer "
                f"(Fig. 3 fit)")


def fig3_relative(model: "ProfiledModel", batches=tuple(FIG3_RELATIVE)) -> dict[int, float]:
    """Relative token throughput of one prefill engine by batch size at Fig. 3's shape (batch 1 = 1.0)."""
    one = model.prefill_time_s([FIG3_SHAPE])
    return {b: b * one / model.prefill_time_s([FIG3_SHAPE] * b) for b in batches}


@functools.lru_cache(maxsize=8)
def fitted_forward_s(gpu: cm.GpuSpec = cm.HOPPER, path: str = str(PROFILE_PATH)) -> float:
    """The per-MoE-layer EP-group cost that makes ds660b's Fig. 3 throughput at FIG3_FIT_BATCH what the paper
    reads: r = B (T1 + n F) / (TB + n F), solved for F (0 if the kernels alone already reach r)."""
    bare = ProfiledModel(cm.DS660B, gpu, path, forward_s=0.0)
    b, r = FIG3_FIT_BATCH, FIG3_RELATIVE[FIG3_FIT_BATCH]
    t1, tb = bare.prefill_time_s([FIG3_SHAPE]), bare.prefill_time_s([FIG3_SHAPE] * b)
    n = cm.DS660B.layers - cm.DS660B.dense_layers
    return max(0.0, (r * tb - b * t1) / (b - r) / n)


def profiled_models() -> tuple[str, ...]:
    """Names of the models the committed profile covers."""
    _, rows = load(str(PROFILE_PATH))
    return tuple(sorted({r.model for r in rows}))


# -- the checks `dpemu bench gpu` prints -------------------------------------------------------------------
CHECK_POINTS = (("prefill 1 x (32721 + 429)", "prefill", [(32721, 429)]),
                ("prefill 20 x (30000 + 300)", "prefill", [(30000, 300)] * 20),
                ("decode 32 at 32K", "decode", [32768] * 32),
                ("decode 64 at 17K", "decode", [17183] * 64))


def checks(gpu: cm.GpuSpec = cm.HOPPER) -> dict:
    """Fig. 3 (paper, fitted, kernels only) and each profiled model's times at a few points against the analytic
    roofline, on `gpu`: what `dpemu bench gpu` prints and writes."""
    ds = ProfiledModel(cm.DS660B, gpu)
    out = {"source": ds.describe(), "forward_s": ds.forward_s,
           "fig3": {"paper": dict(FIG3_RELATIVE), "fit_batch": FIG3_FIT_BATCH, "ours": fig3_relative(ds),
                    "kernels_only": fig3_relative(ProfiledModel(cm.DS660B, gpu, forward_s=0.0))},
           "points": {}}
    for name in profiled_models():
        m, pm = cm.MODELS[name], ProfiledModel(cm.MODELS[name], gpu)
        rows = {}
        for label, phase, arg in CHECK_POINTS:
            if phase == "prefill":
                rows[label] = (pm.prefill_time_s(arg), cm.prefill_time_s(m, arg, gpu))
            else:
                rows[label] = (pm.decode_step_time_s(arg), cm.decode_step_time_s(m, arg, gpu))
        out["points"][name] = rows
    return out

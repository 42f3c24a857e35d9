"""Op builders of the GPU layer profiler (daemons/gpuprofile.py): one layer's ops of qwen32b (dense GQA) and of
ds660b / ds27b (MLA with DSA sparse attention, MoE), on random weights and inputs, at one grid point.

Each builder allocates its tensors once and returns an `Op`: closures that run the op's kernels (no host sync
inside, so decode ops can be captured in a CUDA graph), the rows processed, and ``impl`` texts saying how.
Where an op has several ways to run (SDPA backends, an expert loop or one grouped GEMM, the DSA indexer
unfused or as one fused Triton kernel checked against an FP32 reference), each is a variant and the harness
keeps the fastest. Activations are BF16; linear layers are FP8 e4m3 ``torch._scaled_mm`` GEMMs with per-tensor
float32 scales where the device has FP8 (Hopper), else BF16 matmuls (CPU smoke tests); every FP8 GEMM is
guarded: rows padded to 16 (the real count is reported), K and N multiples of 16, A row-major, B
column-major (``w.t()`` of a row-major [N, K] weight).

Approximated (named in ``impl``): RoPE, the indexer's Hadamard rotation and QKV biases are left out
(elementwise, small); the DSA attention gathers its top-k latents from a BF16 cache (the real one is FP8,
656 B/token) and runs gather + bmm + softmax + bmm where FlashMLA runs one fused kernel; routed experts see
tokens already in expert order (DeepEP dispatch/combine and every collective are network work, never timed
here). Imports torch at module level: only daemons.gpuprofile's run() imports this module.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from daemons.gpuprofile import GATHER_CHUNK_BYTES, LOGITS_CHUNK_BYTES, QWEN_OPS, Shape, ceil16, first_line

try:  # the fused DSA-indexer variant needs Triton (CPU-only torch has none: that variant is then left out)
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None

BF16 = torch.bfloat16


def _jit(*runtime_ints: str):
    """triton.jit, the named int arguments not specialized (fewer compiles); None without a working Triton."""
    def wrap(fn):
        try:
            return triton.jit(fn, do_not_specialize=list(runtime_ints)) if triton else None
        except Exception:  # noqa: BLE001 - a Triton that cannot build the kernel only drops the fused variant
            return None
    return wrap


@_jit("tokens", "keys_pad", "cached")
def _idx_logits_prefill(q_ptr, k_ptr, w_ptr, out_ptr, tokens, keys_pad, cached,
                        HEADS: tl.constexpr, DIM: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr):
    """out[b*tokens + t, j] = sum_h w[., h] relu(q[., h] . k[b, j]) for j <= cached + t, else -inf."""
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    j = tl.program_id(1) * BN + tl.arange(0, BN)
    b = tl.program_id(2)
    d = tl.arange(0, DIM)
    row = b * tokens + t
    k = tl.load(k_ptr + (b * keys_pad + j[None, :]) * DIM + d[:, None], mask=j[None, :] < keys_pad)
    acc = tl.zeros((BT, BN), dtype=tl.float32)
    for h in range(HEADS):
        q = tl.load(q_ptr + (row[:, None] * HEADS + h) * DIM + d[None, :], mask=t[:, None] < tokens)
        w = tl.load(w_ptr + row * HEADS + h, mask=t < tokens, other=0.0).to(tl.float32)
        acc += tl.maximum(tl.dot(q, k), 0.0) * w[:, None]
    acc = tl.where(j[None, :] <= cached + t[:, None], acc, float("-inf"))
    tl.store(out_ptr + row[:, None] * keys_pad + j[None, :], acc.to(tl.bfloat16),
             mask=(t[:, None] < tokens) & (j[None, :] < keys_pad))


@_jit("ctx", "keys_pad")
def _idx_logits_decode(q_ptr, k_ptr, w_ptr, out_ptr, ctx, keys_pad,
                       HEADS: tl.constexpr, DIM: tl.constexpr, BN: tl.constexpr):
    """out[b, j] = sum_h w[b, h] relu(q[b, h] . k[b, j]) for j < ctx, else -inf (heads are the GEMM rows)."""
    j = tl.program_id(0) * BN + tl.arange(0, BN)
    b = tl.program_id(1)
    h = tl.arange(0, HEADS)
    d = tl.arange(0, DIM)
    q = tl.load(q_ptr + (b * HEADS + h[:, None]) * DIM + d[None, :])
    k = tl.load(k_ptr + (b * keys_pad + j[None, :]) * DIM + d[:, None], mask=j[None, :] < keys_pad)
    w = tl.load(w_ptr + b * HEADS + h).to(tl.float32)
    score = tl.sum(tl.maximum(tl.dot(q, k), 0.0) * w[:, None], axis=0)
    tl.store(out_ptr + b * keys_pad + j, tl.where(j < ctx, score, float("-inf")).to(tl.bfloat16), mask=j < keys_pad)


@dataclass
class Op:
    """What the harness times: variants [(impl, fn)] (all timed, the fastest kept), rows, EP width."""

    variants: list[tuple[str, Callable[[], object]]]
    rows: int
    ep_gpus: int = 1
    notes: list[str] = field(default_factory=list)


class Kit:
    """One device's tensor factory and GEMMs: probes FP8 ``_scaled_mm`` once, falls back to BF16."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.fp8 = self.fast_accum = False
        self.note = "bf16 matmul (no CUDA FP8)"
        self.one = torch.ones(1, dtype=torch.float32, device=device)
        if self.cuda and hasattr(torch, "float8_e4m3fn") and hasattr(torch, "_scaled_mm"):
            self._probe_fp8()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def _probe_fp8(self) -> None:
        a = torch.randn(32, 64, device=self.device).to(torch.float8_e4m3fn)
        w = torch.randn(48, 64, device=self.device).to(torch.float8_e4m3fn)
        want = a.float() @ w.float().t()
        for fast in (True, False):
            try:
                got = torch._scaled_mm(a, w.t(), scale_a=self.one, scale_b=self.one, out_dtype=BF16,
                                       use_fast_accum=fast)
                if tuple(got.shape) != (32, 48) or not torch.allclose(got.float(), want, rtol=0.05, atol=0.5):
                    raise RuntimeError("wrong result")
            except (RuntimeError, TypeError) as err:
                self.note = f"bf16 matmul (FP8 _scaled_mm failed: {first_line(err)})"
                continue
            self.fp8, self.fast_accum = True, fast
            self.note = f"fp8 e4m3 torch._scaled_mm, per-tensor scales, use_fast_accum={fast}"
            return

    def rand(self, *shape: int, dtype=BF16) -> torch.Tensor:
        return torch.randn(shape, device=self.device, dtype=dtype)

    def fp8_cast(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.float8_e4m3fn) if self.fp8 else x

    def mm8(self, a8: torch.Tensor, b_colmajor: torch.Tensor) -> torch.Tensor:
        """a8 [M, K] row-major x b [K, N] column-major -> BF16 [M, N] (FP8 if the kit has it)."""
        if self.fp8:
            return torch._scaled_mm(a8, b_colmajor, scale_a=self.one, scale_b=self.one, out_dtype=BF16,
                                    use_fast_accum=self.fast_accum)
        return torch.mm(a8, b_colmajor)


class Linear:
    """y = x W^T with a random [N, K] weight: FP8 when the kit has it and K, N are multiples of 16."""

    def __init__(self, kit: Kit, n: int, k: int):
        self.kit = kit
        w = kit.rand(n, k).mul_(k ** -0.5)
        self.fp8 = kit.fp8 and n % 16 == 0 and k % 16 == 0
        self.w = w.to(torch.float8_e4m3fn) if self.fp8 else w
        self.wt = self.w.t()                       # [K, N] column-major, as _scaled_mm wants B

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        return self.kit.mm8(x.to(torch.float8_e4m3fn), self.wt) if self.fp8 else x @ self.wt


def gemm_impl(kit: Kit) -> str:
    return ("fp8-scaled_mm" + ("-fastacc" if kit.fast_accum else "")) if kit.fp8 else "bf16-mm"


def _rms(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), eps=1e-6)


def _swiglu(h: torch.Tensor) -> torch.Tensor:
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


class Mlp:
    """SwiGLU FFN: one fused gate/up GEMM [2 x inter, hidden], SiLU*mul, down [hidden, inter]."""

    def __init__(self, kit: Kit, hidden: int, inter: int):
        self.gate_up, self.down = Linear(kit, 2 * inter, hidden), Linear(kit, hidden, inter)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(_swiglu(self.gate_up(x)))


def first_working(kit: Kit, makers: list[tuple[str, Callable[[], Callable[[], object]]]]) -> tuple[str, Callable]:
    """The first variant that builds and runs once: (impl naming the ones that failed before it, fn)."""
    failed = []
    for name, make in makers:
        try:
            fn = make()
            fn()
            kit.sync()
            return "+".join([name] + [f"not:{f}" for f in failed]), fn
        except (RuntimeError, TypeError, ValueError, NotImplementedError) as err:
            failed.append(f"{name}({type(err).__name__})")
    raise RuntimeError("no variant ran: " + ", ".join(failed))


def _sdpa(backends, q, k, v, **kwargs):
    from torch.nn.attention import sdpa_kernel
    with sdpa_kernel(backends) if backends else contextlib.nullcontext():
        return F.scaled_dot_product_attention(q, k, v, **kwargs)


# -- qwen32b (dense GQA) -------------------------------------------------------------------------------------
def _qwen_attention(kit: Kit, s: Shape, batch: int, cached: int, new: int):
    """([(impl, fn)], k_cache, v_cache): new tokens see every cached token plus a causal triangle (lower-right
    causal); decode is one [B, H, 1, ctx] call. Prefill variants, the harness keeps the fastest: one batched call
    over the B requests (they have equal lengths here, so it is what a varlen kernel does in one launch) through
    the first of flash / cudnn|efficient / default SDPA that runs; the same with cuDNN and an explicit mask
    (is_causal when nothing is cached); and a loop of one flash call per request."""
    from torch.nn.attention import SDPBackend
    from torch.nn.attention.bias import causal_lower_right
    ctx, d, rep = cached + new, s.head_dim, s.q_heads // s.kv_heads
    q = kit.rand(batch, s.q_heads, new, d)
    k, v = kit.rand(batch, s.kv_heads, ctx, d), kit.rand(batch, s.kv_heads, ctx, d)
    flash, cudnn = [SDPBackend.FLASH_ATTENTION], [SDPBackend.CUDNN_ATTENTION]
    fallback = [SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]

    def call(backends, kk, vv, mask_of, loop=False, **kw):
        if new == 1:
            return lambda: _sdpa(backends, q, kk, vv, **kw)
        mask = mask_of()
        if mask is None:
            kw["is_causal"] = True
        if not loop:
            return lambda: _sdpa(backends, q, kk, vv, attn_mask=mask, **kw)
        return lambda: [_sdpa(backends, q[b:b + 1], kk[b:b + 1], vv[b:b + 1], attn_mask=mask, **kw)
                        for b in range(batch)]

    def bool_mask():  # query i (of the new) sees keys 0 .. cached + i; nothing cached: plain causal
        if not cached:
            return None
        return torch.arange(ctx, device=kit.device)[None, :] <= cached + torch.arange(new, device=kit.device)[:, None]

    def lower_right():
        return causal_lower_right(new, ctx)

    def repeated(backends, mask_of):
        return lambda: call(backends, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), mask_of)

    suffix = f"-batched{batch}" if new > 1 and batch > 1 else ""
    impl, fn = first_working(kit, [
        ("sdpa-flash-lowerright-gqa", lambda: call(flash, k, v, lower_right, enable_gqa=True)),
        ("sdpa-cudnn|efficient-lowerright-repkv", repeated(fallback, lower_right)),
        ("sdpa-default-boolmask-gqa", lambda: call(None, k, v, bool_mask, enable_gqa=True)),
    ])
    variants = [(impl + suffix, fn)]
    extra = []
    if kit.cuda and new > 1:
        extra.append([("sdpa-cudnn-mask-gqa" + suffix, lambda: call(cudnn, k, v, bool_mask, enable_gqa=True)),
                      ("sdpa-cudnn-mask-repkv" + suffix, repeated(cudnn, bool_mask))])
    if new > 1 and batch > 1:
        extra.append([(f"sdpa-flash-lowerright-gqa-loop{batch}",
                       lambda: call(flash, k, v, lower_right, loop=True, enable_gqa=True))])
    for makers in extra:
        try:
            variants.append(first_working(kit, makers))
        except RuntimeError:
            pass
    return variants, k, v


class _QwenLinear:
    def __init__(self, kit: Kit, s: Shape, tokens: int):
        self.x, self.attn_out = kit.rand(ceil16(tokens), s.hidden), kit.rand(ceil16(tokens), s.q_heads * s.head_dim)
        self.qkv = Linear(kit, (s.q_heads + 2 * s.kv_heads) * s.head_dim, s.hidden)
        self.o = Linear(kit, s.hidden, s.q_heads * s.head_dim)
        self.mlp = Mlp(kit, s.hidden, s.intermediate)

    def __call__(self, attention=None):
        self.qkv(_rms(self.x))
        if attention is not None:
            attention()
        y = self.x + self.o(self.attn_out)
        return y + self.mlp(_rms(y))


def build_qwen(kit: Kit, s: Shape, op: str, batch: int, cached: int, new: int) -> Op:
    tokens = batch * new
    if op == "linear":
        lin = _QwenLinear(kit, s, tokens)
        return Op([(gemm_impl(kit) + "+rmsnorm+swiglu", lambda: lin())], tokens)
    attentions, k, v = _qwen_attention(kit, s, batch, cached, new)
    if op == "attention":
        return Op(attentions, tokens)
    lin = _QwenLinear(kit, s, tokens)
    k_new, v_new = kit.rand(batch, s.kv_heads, new, s.head_dim), kit.rand(batch, s.kv_heads, new, s.head_dim)

    def layer_with(attention):
        def layer():
            k[:, :, cached:cached + new].copy_(k_new)      # KV append, then attention over cached + new
            v[:, :, cached:cached + new].copy_(v_new)
            return lin(attention)
        return layer

    return Op([(f"{gemm_impl(kit)}+{impl}+kv-append", layer_with(fn)) for impl, fn in attentions], tokens)


# -- ds660b / ds27b (MLA + DSA + MoE) -----------------------------------------------------------------------
def _mla_proj(kit: Kit, s: Shape, tokens: int) -> Op:
    m, h, latent = ceil16(tokens), s.q_heads, s.kv_lora_rank
    x = kit.rand(m, s.hidden)
    q_dim = h * (s.head_dim + s.rope_dim)
    q_a = Linear(kit, s.q_lora_rank, s.hidden) if s.q_lora_rank else None
    q_b = Linear(kit, q_dim, s.q_lora_rank or s.hidden)
    kv_a = Linear(kit, latent + s.rope_dim, s.hidden)
    w_uk = kit.rand(h, s.head_dim, latent).mul_(s.head_dim ** -0.5)
    w_uv = kit.rand(h, latent, s.v_head_dim).mul_(latent ** -0.5)
    attn_out = kit.rand(h, m, latent)                   # stand-in for the attention's latent output, head-major
    o = Linear(kit, s.hidden, h * s.v_head_dim)

    def fn():
        hx = _rms(x)
        q = q_b(_rms(q_a(hx)) if q_a else hx).view(m, h, -1)
        kv = kv_a(hx)
        _rms(kv[:, :latent])
        torch.bmm(q[:, :, :s.head_dim].transpose(0, 1), w_uk)           # absorbed W_UK -> [h, m, latent]
        out = torch.bmm(attn_out, w_uv)                                  # absorbed W_UV -> [h, m, v_head_dim]
        return x + o(out.transpose(0, 1).reshape(m, h * s.v_head_dim))

    impl = gemm_impl(kit) + ("+q_lora" if q_a else "+q_full_rank") + "+bf16-bmm-absorb"
    return Op([(impl, fn)], tokens)


def _indexer(kit: Kit, s: Shape, batch: int, cached: int, new: int) -> Op:
    """DSA lightning indexer: index q from the q latent (ds660b) or the hidden state (ds27b, no Q-LoRA),
    index k and per-head weights from the hidden state; FP8 logits over ALL cached + new keys of each request,
    ReLU, head-weighted sum, causal mask, top-k."""
    tokens, heads, dim, ctx = batch * new, s.index_heads, s.index_dim, cached + new
    kpad, m, topk = ceil16(ctx), ceil16(tokens), min(s.top_k, ctx)
    src, x = kit.rand(m, s.q_lora_rank or s.hidden), kit.rand(m, s.hidden)
    wq, wk = Linear(kit, heads * dim, s.q_lora_rank or s.hidden), Linear(kit, dim, s.hidden)
    w_heads = kit.rand(heads, s.hidden).mul_(s.hidden ** -0.5)          # weights_proj stays BF16 (V3.2)
    keys = kit.fp8_cast(kit.rand(batch, kpad, dim))                     # index-key cache, FP8 on GPU
    key_pos = torch.arange(kpad, device=kit.device)
    chunk = max(1, min(new, LOGITS_CHUNK_BYTES // (heads * kpad * 2)))

    def project():
        q8 = kit.fp8_cast(wq(src)).view(m * heads, dim)
        k_new = F.layer_norm(wk(x), (dim,))
        keys[:, cached:ctx].copy_(kit.fp8_cast(k_new[:tokens].view(batch, new, dim)))
        return q8, F.linear(x, w_heads).mul_(heads ** -0.5)            # [m * heads, dim], [m, heads]

    def per_request():
        q8, w = project()
        for b in range(batch):
            for t0 in range(0, new, chunk):
                c, row = min(chunk, new - t0), b * new + t0
                logits = kit.mm8(q8[row * heads:(row + c) * heads], keys[b].t()).relu_()
                score = torch.bmm(w[row:row + c, None], logits.view(c, heads, kpad)).view(c, kpad)
                q_pos = cached + t0 + torch.arange(c, device=kit.device)
                score.masked_fill_(key_pos[None, :] > q_pos[:, None], float("-inf"))
                torch.topk(score, topk, dim=-1)

    impl = (gemm_impl(kit) if kit.fp8 else "bf16-mm") + "-logits-per-request+relu+bmm+topk"
    variants = [(impl + (f"-chunk{chunk}" if chunk < new else ""), per_request)]
    if new == 1 and kit.fp8:                            # decode: one batched BF16 bmm over all sequences too
        keys16, pad = kit.rand(batch, kpad, dim), key_pos >= ctx

        def batched():
            q8, w = project()
            q16 = q8.to(BF16).view(m, heads, dim)[:batch]
            logits = torch.bmm(q16, keys16.transpose(1, 2)).relu_()
            score = torch.bmm(w[:batch, None], logits).view(batch, kpad).masked_fill_(pad, float("-inf"))
            torch.topk(score, topk, dim=-1)

        variants.append(("bf16-bmm-batched+relu+bmm+topk", batched))
    notes = []
    if None not in (_idx_logits_prefill, _idx_logits_decode) and kit.fp8 and not (heads & heads - 1 or dim & dim - 1):
        scores = torch.empty(m, kpad, dtype=BF16, device=kit.device)

        def fused():
            q8, w = project()
            if new == 1:
                _idx_logits_decode[(triton.cdiv(kpad, 128), batch)](q8, keys, w, scores, ctx, kpad, HEADS=heads,
                                                                    DIM=dim, BN=128)
            else:
                _idx_logits_prefill[(triton.cdiv(new, 64), triton.cdiv(kpad, 128), batch)](
                    q8, keys, w, scores, new, kpad, cached, HEADS=heads, DIM=dim, BT=64, BN=128)
            return torch.topk(scores[:tokens], topk, dim=-1)

        try:
            error = _check_fused(fused, project, scores, keys, batch, new, cached, heads, kpad)
            if error < 0.03:
                variants.append(("triton-fused-fp8-logits+relu+weighted-sum+mask+topk", fused))
            else:
                notes.append(f"triton-fused rejected: relative error {error:.3g}")
        except Exception as err:  # noqa: BLE001 - a Triton build or launch failure leaves the unfused variants
            notes.append(f"triton-fused failed: {first_line(err)}")
    return Op(variants, tokens, notes=notes)


def _check_fused(fused, project, scores, keys, batch: int, new: int, cached: int, heads: int, kpad: int) -> float:
    """Largest error of the fused indexer's scores against an FP32 reference, over a few queries of the first
    and last request, relative to the largest score (inf if the -inf masks differ)."""
    fused()
    q8, w = project()
    worst = 0.0
    for b in sorted({0, batch - 1}):
        c, row = min(new, 16), b * new
        ref = (q8[row * heads:(row + c) * heads].float() @ keys[b].float().t()).relu_().view(c, heads, kpad)
        ref = torch.bmm(w[row:row + c].float().unsqueeze(1), ref).view(c, kpad)
        seen = torch.arange(kpad, device=ref.device)[None, :] <= cached + torch.arange(c, device=ref.device)[:, None]
        got = scores[row:row + c].float()
        if not torch.equal(torch.isfinite(got), seen):
            return float("inf")
        worst = max(worst, ((got - ref)[seen].abs().max() / ref[seen].abs().max().clamp_min(1e-6)).item())
    return worst


def _sparse_attention(kit: Kit, s: Shape, batch: int, cached: int, new: int) -> Op:
    """Absorbed-MQA attention over each query's top-k latents (width kv_lora_rank + rope), gathered from the
    request's latent cache: scores = q[heads, 576] . latents^T, softmax, out = P . latents[:, :512]."""
    tokens, ctx, width, latent = batch * new, cached + new, s.kv_lora_rank + s.rope_dim, s.kv_lora_rank
    topk = min(s.top_k, ctx)
    cache = kit.rand(batch * ctx, width)
    owner = torch.arange(tokens, device=kit.device) // new * ctx
    idx = torch.randint(0, ctx, (tokens, topk), device=kit.device) + owner[:, None]
    q = kit.rand(tokens, s.q_heads, width)
    chunk = max(1, min(tokens, GATHER_CHUNK_BYTES // (topk * width * 2)))
    scale = (s.head_dim + s.rope_dim) ** -0.5

    def fn():
        for t0 in range(0, tokens, chunk):
            c = min(chunk, tokens - t0)
            kv = cache.index_select(0, idx[t0:t0 + c].reshape(-1)).view(c, topk, width)
            p = torch.softmax(torch.bmm(q[t0:t0 + c], kv.transpose(1, 2)).mul_(scale), dim=-1)
            torch.bmm(p, kv[:, :, :latent])

    impl = f"bf16-latent-gather+bmm+softmax+bmm-top{topk}" + (f"-chunk{chunk}" if chunk < tokens else "")
    return Op([(impl, fn)], tokens)


def _experts(kit: Kit, s: Shape, tokens: int, ep_gpus: int) -> Op:
    """This GPU's routed experts at the EP width (symmetric EP group: it receives as many token-expert pairs as
    it sends, spread evenly over its local experts), the shared experts on its own tokens, and the router."""
    local = max(1, s.experts // ep_gpus)
    pairs = tokens * s.experts_per_token
    per_expert = -(-pairs // local)
    rp, m, inter, hidden = ceil16(per_expert), ceil16(tokens), s.moe_intermediate, s.hidden
    x, xr = kit.rand(m, hidden), kit.rand(local * rp, hidden)
    router = kit.rand(s.experts, hidden).mul_(hidden ** -0.5)
    shared = Mlp(kit, hidden, s.shared_experts * inter)
    w1 = kit.rand(local, 2 * inter, hidden).mul_(hidden ** -0.5)
    w2 = kit.rand(local, hidden, inter).mul_(inter ** -0.5)
    fp8 = kit.fp8 and inter % 16 == 0 and hidden % 16 == 0
    w1, w2 = (w1.to(torch.float8_e4m3fn), w2.to(torch.float8_e4m3fn)) if fp8 else (w1, w2)

    def common():
        torch.topk(torch.sigmoid(F.linear(x, router)), s.experts_per_token, dim=-1)
        return shared(_rms(x))

    def loop():
        common()
        for e in range(local):
            rows = xr[e * rp:(e + 1) * rp]
            if fp8:
                h = kit.mm8(rows.to(torch.float8_e4m3fn), w1[e].t())
                kit.mm8(_swiglu(h).to(torch.float8_e4m3fn), w2[e].t())
            else:
                torch.mm(_swiglu(torch.mm(rows, w1[e].t())), w2[e].t())

    label = f"-{local}x{per_expert}rows(pad{rp})"
    variants = [(("fp8-scaled_mm" if fp8 else "bf16-mm") + "-expert-loop" + label, loop)]
    grouped = getattr(torch, "_scaled_grouped_mm", None) if fp8 else getattr(torch, "_grouped_mm", None)
    if kit.cuda and grouped is not None:
        offs = (torch.arange(1, local + 1, device=kit.device) * rp).to(torch.int32)
        sa1 = torch.ones(local * rp, dtype=torch.float32, device=kit.device)
        sb1 = torch.ones(local, 2 * inter, dtype=torch.float32, device=kit.device)
        sb2 = torch.ones(local, hidden, dtype=torch.float32, device=kit.device)

        def grouped_fn():
            common()
            if fp8:
                h = grouped(xr.to(torch.float8_e4m3fn), w1.transpose(1, 2), sa1, sb1, offs=offs, out_dtype=BF16)
                grouped(_swiglu(h).to(torch.float8_e4m3fn), w2.transpose(1, 2), sa1, sb2, offs=offs, out_dtype=BF16)
            else:
                grouped(_swiglu(grouped(xr, w1.transpose(1, 2), offs=offs)), w2.transpose(1, 2), offs=offs)

        try:
            grouped_fn()
            kit.sync()
            variants.append((("fp8-scaled_grouped_mm-rowwise" if fp8 else "bf16-grouped_mm") + label, grouped_fn))
        except (RuntimeError, TypeError, ValueError, NotImplementedError) as err:
            return Op(variants, pairs, ep_gpus, [f"grouped mm failed: {first_line(err)}"])
    return Op(variants, pairs, ep_gpus)


def _dense_ffn(kit: Kit, s: Shape, tokens: int) -> Op:
    x, mlp = kit.rand(ceil16(tokens), s.hidden), Mlp(kit, s.hidden, s.intermediate)
    return Op([(gemm_impl(kit) + "+rmsnorm+swiglu", lambda: x + mlp(_rms(x)))], tokens)


def build(kit: Kit, s: Shape, op: str, phase: str, batch: int, cached: int, new: int) -> Op:
    """The op `op` of model shape `s` at one grid point (decode: new == 1, cached = context)."""
    tokens, ep = batch * new, s.prefill_ep_gpus if phase == "prefill" else s.decode_ep_gpus
    builders = {"mla_proj": lambda: _mla_proj(kit, s, tokens), "indexer": lambda: _indexer(kit, s, batch, cached, new),
                "attention": lambda: _sparse_attention(kit, s, batch, cached, new),
                "experts": lambda: _experts(kit, s, tokens, ep), "dense_ffn": lambda: _dense_ffn(kit, s, tokens)}
    if not s.mla:
        builders = {name: (lambda name=name: build_qwen(kit, s, name, batch, cached, new)) for name in QWEN_OPS}
    if op not in builders:
        raise ValueError(f"{s.name} has no op {op!r}")
    return builders[op]()

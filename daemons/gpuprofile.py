"""GPU layer profiler: times one transformer layer's ops of qwen32b, ds660b and ds27b on ONE real GPU, over
the paper's prefill and decode grid, and writes a `dpemu gpu profile v1` CSV (daemons/gpuprofile_csv.py)
that the cost model can be fitted to.

What it measures, per model and grid point (prefill: B requests of `cached` cached + `new` new tokens;
decode: B sequences of context `cached`, one new token each):
- qwen32b (dense GQA, DP only): ``linear`` (QKV, O, fused gate/up, down in FP8, RMSNorms, SiLU*mul),
  ``attention`` (SDPA with GQA; new tokens see the cached tokens plus a causal triangle) and ``layer`` (both).
- ds660b / ds27b (MLA + DSA + MoE, EP + DP attention): ``mla_proj`` (the MLA projections, absorbed W_UK and
  W_UV), ``indexer`` (the DSA lightning indexer: FP8 logits over every earlier key, ReLU, head-weighted sum,
  top-k), ``attention`` (absorbed MQA over each query's top-k latents), ``experts`` (the routed experts local
  to one GPU at the ModelSpec's EP width, shared experts, router) and ``dense_ffn`` (the leading dense layers).
- calib (model ``gpu``): BF16 and FP8 8192^3 GEMMs, a 1 GiB device-to-device and a 1 GiB pinned
  host-to-device copy.
How: random weights and inputs (BF16 activations, FP8 e4m3 weights through ``torch._scaled_mm``); warm-up 3,
then median, p10 and p90 of 20 timed repetitions with CUDA events, an L2 flush before each; decode ops are
replayed from a CUDA graph (as real decode engines run them). Where an op can run several ways (SDPA
backends, batched or per request; experts looped or grouped; the indexer unfused or as a fused Triton kernel
checked against an FP32 reference) every way is timed and the row keeps the fastest, the others' medians in
``impl`` (``alt=name:ms``). Op builders: daemons/gpuprofile_ops.py. Shapes, grid and memory guard: here.

Refuses: network collectives (AllToAll, DeepEP dispatch/combine: one GPU cannot measure them; the cost model
adds them from the emulated fabric); use in CI or in ``make run`` (nothing imports this module there; torch is
imported only inside functions, so ``import daemons.gpuprofile`` works without torch). One failing op at one
point is recorded under ``# skipped:`` and the run goes on; ``--budget-s`` caps the run's wall time.

    PYTHONUNBUFFERED=1 python3 -m daemons.gpuprofile --out $OUT/h200.csv [--grid full|smoke] [--models ...]
    python -m daemons.gpuprofile --device cpu --tiny --grid smoke --out /tmp/prof_tiny.csv   # smoke test
"""

from __future__ import annotations

import argparse
import datetime
import gc
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

from daemons.costmodel import MODELS
from daemons.gpuprofile_csv import SKIPPED, ProfileRow, write_profile

PROFILED_MODELS = ("qwen32b", "ds660b", "ds27b")
PREFILL_POINTS = ((0, 4096), (16384, 429), (32721, 429), (30000, 300), (32721, 4096), (65536, 429))
SHORT_BATCHES = (1, 2, 5, 10, 20)       # appends of at most 429 new tokens (the paper's agentic turns)
LONG_BATCHES = (1, 2)                   # 4096 new tokens
DECODE_BATCHES = (1, 8, 32, 64, 128)
DECODE_CONTEXTS = (4096, 16384, 32768, 65536)
SMOKE_POINTS = (("prefill", 5, 32721, 429), ("prefill", 2, 32721, 4096), ("decode", 128, 65536, 1))
TINY_TOKEN_DIVISOR = 64                 # --tiny: cached and new tokens / 64, batch at most 4
TINY_MAX_BATCH = 4
MEASUREMENT_CAP_S = 4.0                 # fewer timed reps (at least 5) where 20 would take longer

GIB = 1 << 30
GATHER_CHUNK_BYTES = 8 * GIB      # DSA attention: gathered latents per chunk of query tokens
LOGITS_CHUNK_BYTES = 4 * GIB      # DSA indexer: BF16 logits [tokens x heads, keys] per chunk
QWEN_OPS = ("linear", "attention", "layer")
MLA_OPS = ("mla_proj", "indexer", "attention", "experts", "dense_ffn")


@dataclass(frozen=True)
class Shape:
    """The widths one layer's ops need, taken from a costmodel ModelSpec (tiny: shrunk for CPU smoke tests)."""

    name: str
    mla: bool
    hidden: int
    q_heads: int
    kv_heads: int
    head_dim: int           # GQA head dim; MLA qk_nope_head_dim
    v_head_dim: int
    intermediate: int       # dense FFN width
    q_lora_rank: int        # 0: full-rank query (ds27b, paper appendix A.2)
    kv_lora_rank: int
    rope_dim: int
    experts: int
    experts_per_token: int
    shared_experts: int
    moe_intermediate: int
    top_k: int              # DSA keys per query
    index_heads: int
    index_dim: int
    prefill_ep_gpus: int
    decode_ep_gpus: int


def ceil16(n: int) -> int:
    return -(-n // 16) * 16


def shape_of(spec, tiny: bool = False) -> Shape:
    """The op widths of a ModelSpec; tiny divides widths by 16, heads by 8, head dims by 4, top-k by 16."""
    def width(n: int) -> int:
        return max(16, ceil16(n // 16)) if tiny and n else n

    def heads(n: int) -> int:
        return max(1, n // 8) if tiny and n else n

    def hdim(n: int) -> int:
        return max(8, n // 4) if tiny and n else n

    return Shape(spec.name, bool(spec.kv_lora_rank), width(spec.hidden), heads(spec.q_heads), heads(spec.kv_heads),
                 hdim(spec.head_dim), hdim(spec.v_head_dim), width(spec.intermediate), width(spec.q_lora_rank),
                 hdim(spec.kv_lora_rank), hdim(spec.qk_rope_head_dim), spec.experts, spec.experts_per_token,
                 spec.shared_experts, width(spec.moe_intermediate),
                 max(16, spec.dsa_top_k // 16) if tiny and spec.dsa_top_k else spec.dsa_top_k,
                 heads(spec.indexer_heads), hdim(spec.indexer_head_dim), spec.prefill_ep_gpus, spec.decode_ep_gpus)


def ops_for(shape: Shape) -> tuple[str, ...]:
    return MLA_OPS if shape.mla else QWEN_OPS


def estimate_bytes(s: Shape, op: str, phase: str, batch: int, cached: int, new: int) -> int:
    """A rough upper bound of the device memory one op takes at one point (weights + main tensors)."""
    tokens, ctx = batch * new, cached + new
    if not s.mla:
        kv = 2 * batch * ctx * s.kv_heads * s.head_dim * 2 + 4 * tokens * s.q_heads * s.head_dim * 2
        lin = tokens * (s.intermediate * 10 + s.hidden * 12) + 4 * s.hidden * s.intermediate
        return {"linear": lin, "attention": kv}.get(op, kv + lin)
    if op == "indexer":
        return batch * ceil16(ctx) * s.index_dim * 3 + 2 * LOGITS_CHUNK_BYTES + tokens * s.index_heads * s.index_dim * 4
    if op == "attention":
        topk, width = min(s.top_k, ctx), s.kv_lora_rank + s.rope_dim
        chunk = min(tokens, max(1, GATHER_CHUNK_BYTES // (topk * width * 2)))
        return (batch * ctx * width * 2 + tokens * topk * 8 + tokens * s.q_heads * width * 4
                + chunk * (topk * width * 2 + s.q_heads * topk * 4))
    if op == "experts":
        local = max(1, s.experts // (s.prefill_ep_gpus if phase == "prefill" else s.decode_ep_gpus))
        rows = local * ceil16(-(-tokens * s.experts_per_token // local)) + tokens
        return rows * (s.hidden * 4 + s.moe_intermediate * 10) + local * 3 * s.hidden * s.moe_intermediate * 3
    width = max(s.intermediate, s.q_heads * (s.head_dim + s.rope_dim + s.kv_lora_rank))
    return tokens * width * 12 + 8 * s.hidden * width


@dataclass(frozen=True)
class Point:
    """One grid point: `batch` requests of `cached` + `new` tokens (decode: new = 1, cached = context)."""

    phase: str
    batch: int
    cached: int
    new: int

    def label(self) -> str:
        return f"{self.phase} B={self.batch} cached={self.cached} new={self.new}"


def grid(name: str, tiny: bool = False) -> list[Point]:
    """The grid's points in run order (full: 24 prefill + 20 decode; smoke: 3); tiny: tokens shrunk."""
    if name == "smoke":
        points = [Point(*p) for p in SMOKE_POINTS]
    elif name == "full":
        points = [Point("prefill", b, c, n) for c, n in PREFILL_POINTS
                  for b in (SHORT_BATCHES if n <= 429 else LONG_BATCHES)]
        points += [Point("decode", b, c, 1) for b in DECODE_BATCHES for c in DECODE_CONTEXTS]
    else:
        raise ValueError(f"grid {name!r} is not full or smoke")
    if tiny:
        points = [Point(p.phase, min(p.batch, TINY_MAX_BATCH), p.cached // TINY_TOKEN_DIVISOR,
                        1 if p.phase == "decode" else max(1, p.new // TINY_TOKEN_DIVISOR)) for p in points]
    return list(dict.fromkeys(points))


def first_line(err: BaseException) -> str:
    """'ExceptionName: first line of its message' (at most 200 characters of it)."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200] if text else ''}"


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def measure(torch, kit, fn, *, warmup: int, reps: int, graph: bool, flush) -> tuple[list[float], int, str]:
    """(per-rep ms, 1 if replayed from a CUDA graph, note): warm-up, then timed reps (CUDA events on the GPU,
    perf_counter on the CPU), `flush` zeroed before each rep to evict the L2."""
    run, note, cuda_graph = fn, "", None
    if graph:
        try:
            side = torch.cuda.Stream(kit.device)
            side.wait_stream(torch.cuda.current_stream(kit.device))
            with torch.cuda.stream(side):
                for _ in range(max(1, warmup)):
                    fn()
            torch.cuda.current_stream(kit.device).wait_stream(side)
            cuda_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(cuda_graph):
                fn()
            run = cuda_graph.replay
        except RuntimeError as err:
            cuda_graph, run, note = None, fn, f"graph-capture-failed({type(err).__name__})"
            kit.sync()
    for _ in range(1 if cuda_graph is not None else warmup):
        run()
    kit.sync()
    t0 = time.perf_counter()
    run()
    kit.sync()
    once = max(time.perf_counter() - t0, 1e-9)
    n = min(reps, max(5, int(MEASUREMENT_CAP_S / once)))
    times = []
    if kit.cuda:
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for start, end in events:
            if flush is not None:
                flush.zero_()
            start.record()
            run()
            end.record()
        kit.sync()
        times = [start.elapsed_time(end) for start, end in events]
    else:
        for _ in range(n):
            t0 = time.perf_counter()
            run()
            times.append((time.perf_counter() - t0) * 1e3)
    return times, int(cuda_graph is not None), note


def _row(model, op, point, ep, rows, times, graph, impl) -> ProfileRow:
    return ProfileRow(model, op, point.phase, point.batch, point.cached, point.new, ep, rows,
                      statistics.median(times), _percentile(times, 0.1), _percentile(times, 0.9), len(times),
                      graph, impl)


def calibrate(torch, kit, settings: dict, tiny: bool) -> tuple[list[ProfileRow], list[str]]:
    """Microbenchmarks, once per run: BF16 and FP8 GEMM TFLOP/s, D2D and pinned H2D copy GB/s."""
    n, size = (256, 16 << 20) if tiny else (8192, GIB)
    rows, skipped = [], []
    point = Point("calib", 0, 0, 0)
    a, b = kit.rand(n, n), kit.rand(n, n)
    benches = [("gemm_bf16", n, "bf16 torch.mm", lambda: torch.mm(a, b), 2.0 * n ** 3)]
    if kit.fp8:
        a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn)
        benches.append(("gemm_fp8", n, kit.note, lambda: kit.mm8(a8, b8.t()), 2.0 * n ** 3))
    else:
        skipped.append(f"gpu/gemm_fp8 calib: {kit.note}")
    src = torch.empty(size, dtype=torch.uint8, device=kit.device)
    dst = torch.empty_like(src)
    benches.append(("copy_d2d", size, f"{size >> 20} MiB dst.copy_(src)", lambda: dst.copy_(src), None))
    if kit.cuda:
        host = torch.empty(size, dtype=torch.uint8, pin_memory=True)
        benches.append(("copy_h2d", size, "pinned host->device", lambda: dst.copy_(host, non_blocking=True), None))
    for op, count, how, fn, flops in benches:
        try:
            times, _, _ = measure(torch, kit, fn, graph=False, flush=None, **settings)
        except RuntimeError as err:
            skipped.append(f"gpu/{op} calib: {first_line(err)}")
            continue
        sec = statistics.median(times) / 1e3
        rate = f"tflops={flops / sec / 1e12:.1f}" if flops else f"gbps={size / sec / 1e9:.1f}"
        if op == "copy_d2d":
            rate += f";rw_gbps={2 * size / sec / 1e9:.1f}"
        rows.append(_row("gpu", op, point, 0, count, times, 0, f"{rate};{how}"))
        print(f"calib {op}: {statistics.median(times):.3f} ms ({rate})")
    return rows, skipped


def _driver(torch) -> str:
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=20, check=True).stdout.strip().splitlines()
            if out:
                return out[0]
        except (OSError, subprocess.SubprocessError):
            pass
    return f"unknown (torch.version.cuda {torch.version.cuda})"


def _provenance(torch, kit, args, models: list[str], points: list[Point]) -> dict:
    if kit.cuda:
        props = torch.cuda.get_device_properties(kit.device)
        gpu, sms, hbm = torch.cuda.get_device_name(kit.device), props.multi_processor_count, props.total_memory
    else:
        gpu, sms, hbm = "cpu (smoke test only)", 0, 0
    phases = {ph: sum(p.phase == ph for p in points) for ph in ("prefill", "decode")}
    return {
        "gpu": gpu, "sm_count": sms, "hbm_gib": f"{hbm / GIB:.1f}",
        "driver": _driver(torch) if kit.cuda else "none (cpu)", "torch": torch.__version__,
        "cuda": torch.version.cuda, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python3 -m daemons.gpuprofile " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "grid": f"{args.grid}{' tiny' if args.tiny else ''}: {phases['prefill']} prefill + {phases['decode']} decode "
                f"points per model; " + " ".join(p.label().replace(" ", ":") for p in points),
        "models": ",".join(models), "device": str(kit.device), "gemm": kit.note,
        "timing": (f"{'cuda events' if kit.cuda else 'perf_counter'}, warm-up {args.warmup}, median of {args.reps} "
                   f"reps (fewer, >= 5, past {MEASUREMENT_CAP_S:.0f} s), "
                   f"L2 flush {args.l2_flush_mib if kit.cuda else 0} MiB before each rep, "
                   f"decode in CUDA graphs: {int(args.graphs and kit.cuda)}"),
        **{f"spec.{m}": _describe(m, args.tiny) for m in models},
        "budget_s": args.budget_s, "status": "running", "elapsed_s": 0, SKIPPED: [],
    }


def _describe(model: str, tiny: bool) -> str:
    shape = shape_of(MODELS[model], tiny)
    return " ".join(f"{k}={v}" for k, v in vars(shape).items() if k not in ("name", "mla") and v)


def _free(torch, kit) -> None:
    gc.collect()
    if kit.cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(kit.device)


def _healthy(kit) -> bool:
    try:
        kit.sync()
        return True
    except RuntimeError:
        return False


def profile_point(torch, ops, kit, shape, op: str, point: Point, args, flush) -> ProfileRow:
    """Build one op at one point, time each of its variants, keep the fastest."""
    built = ops.build(kit, shape, op, point.phase, point.batch, point.cached, point.new)
    settings = {"warmup": args.warmup, "reps": args.reps, "flush": flush,
                "graph": args.graphs and kit.cuda and point.phase == "decode"}
    timed = []
    for impl, fn in built.variants:
        times, graph, note = measure(torch, kit, fn, **settings)
        timed.append((statistics.median(times), impl + (f";{note}" if note else ""), times, graph))
    timed.sort(key=lambda t: t[0])
    _, impl, times, graph = timed[0]
    extra = [f"alt={alt}:{ms:.4g}ms" for ms, alt, _, _ in timed[1:]] + built.notes
    if kit.cuda:
        extra.append(f"mem={torch.cuda.max_memory_allocated(kit.device) / GIB:.1f}GiB")
    return _row(shape.name, op, point, built.ep_gpus, built.rows, times, graph, ";".join([impl] + extra))


def run(args) -> int:
    import torch
    from daemons import gpuprofile_ops as ops
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpuprofile: no CUDA device (use --device cpu --tiny for a smoke test)", file=sys.stderr)
        return 2
    if args.device == "cpu":
        torch.set_num_threads(1)
    device = torch.device(args.device)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in PROFILED_MODELS]
    if unknown:
        print(f"gpuprofile: unknown models {unknown}; profiled: {', '.join(PROFILED_MODELS)}", file=sys.stderr)
        return 2
    points = grid(args.grid, args.tiny)
    start = time.monotonic()
    rows: list[ProfileRow] = []
    with torch.inference_mode():
        kit = ops.Kit(device)
        provenance = _provenance(torch, kit, args, models, points)
        skipped = provenance[SKIPPED]

        def save(status: str) -> None:
            provenance["status"], provenance["elapsed_s"] = status, f"{time.monotonic() - start:.1f}"
            write_profile(args.out, provenance, rows)

        print(f"gpuprofile: {provenance['gpu']}, {kit.note}; {len(points)} points x {len(models)} models, "
              f"budget {args.budget_s:.0f} s -> {args.out}")
        if args.calib:
            calib_rows, calib_skipped = calibrate(torch, kit, {"warmup": args.warmup, "reps": args.reps},
                                                  args.tiny)
            rows += calib_rows
            skipped += calib_skipped
            save("running")
        flush = torch.empty(args.l2_flush_mib << 20, dtype=torch.uint8, device=device) \
            if kit.cuda and args.l2_flush_mib > 0 else None
        status = "complete"
        for model in models:
            shape = shape_of(MODELS[model], args.tiny)
            model_start, left_out = time.monotonic(), []
            print(f"== {model}: {len(points)} points x {len(ops_for(shape))} ops ({', '.join(ops_for(shape))})")
            for i, point in enumerate(points):
                if status == "stopped" or time.monotonic() - start > args.budget_s:
                    status = "stopped" if status == "stopped" else "budget"
                    left_out.append(point.label().replace(" ", ":"))
                    continue
                results = []
                for op in ops_for(shape):
                    need = estimate_bytes(shape, op, point.phase, point.batch, point.cached, point.new)
                    if need > args.mem_limit_gb * 1e9:
                        print(f"   {model}/{op} {point.label()}: not run, needs ~{need / 1e9:.0f} GB "
                              f"> {args.mem_limit_gb:.0f} GB")
                        continue
                    try:
                        row = profile_point(torch, ops, kit, shape, op, point, args, flush)
                        rows.append(row)
                        results.append(f"{op} {row.time_ms:.3f}")
                    except Exception as err:  # noqa: BLE001 - one op at one point must never end the run
                        skipped.append(f"{model}/{op} {point.label()}: {first_line(err)}")
                        results.append(f"{op} FAILED")
                        del err
                        if not _healthy(kit):
                            skipped.append(f"CUDA context lost after {model}/{op} {point.label()}: run stopped")
                            status = "stopped"
                            break
                    finally:
                        _free(torch, kit)
                done, now = i + 1, time.monotonic()
                eta = (now - model_start) / done * (len(points) - done)
                print(f"[{model} {done}/{len(points)}] {point.label()}: {', '.join(results)} ms | "
                      f"elapsed {now - start:.0f} s, {model} ETA {eta:.0f} s", flush=True)
                save("running")
            if left_out:
                why = "run stopped" if status == "stopped" else f"budget {args.budget_s:.0f} s spent"
                skipped.append(f"{model}: {len(left_out)} points not run ({why}): {' '.join(left_out)}")
        save(status)
    print(f"gpuprofile: {status}, {len(rows)} rows, {len(skipped)} skipped entries, "
          f"{time.monotonic() - start:.0f} s -> {args.out}")
    return 0 if status == "complete" else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python3 -m daemons.gpuprofile", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="CSV to write (rewritten after every grid point)")
    p.add_argument("--grid", choices=("full", "smoke"), default="full")
    p.add_argument("--models", default=",".join(PROFILED_MODELS), help="comma-separated, run in this order")
    p.add_argument("--budget-s", type=float, default=400.0, help="wall-time cap; later points are skipped")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--tiny", action="store_true", help="shrink every width and token count (CPU smoke tests)")
    p.add_argument("--no-graphs", dest="graphs", action="store_false", help="time decode ops eagerly")
    p.add_argument("--no-calib", dest="calib", action="store_false", help="skip the GEMM/copy microbenchmarks")
    p.add_argument("--warmup", type=int, default=None, help="warm-up runs (default 3; --tiny 1)")
    p.add_argument("--reps", type=int, default=None, help="timed runs (default 20; --tiny 2)")
    p.add_argument("--mem-limit-gb", type=float, default=100.0, help="points needing more are not run")
    p.add_argument("--l2-flush-mib", type=int, default=256, help="buffer zeroed before each rep (0: none)")
    args = p.parse_args(argv)
    if args.warmup is None:
        args.warmup = 1 if args.tiny else 3
    if args.reps is None:
        args.reps = 2 if args.tiny else 20
    if args.reps < 1 or args.warmup < 0:
        p.error("--reps must be >= 1 and --warmup >= 0")
    if args.device == "cpu" and not args.tiny:
        p.error("--device cpu runs only with --tiny (a smoke test; full shapes need a GPU)")
    return args


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

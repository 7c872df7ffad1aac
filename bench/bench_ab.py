"""A/B of several builds of janus_rt._C on one CPU kernel from DRAM: the builds are loaded into one process and run in
turn, hundreds of times, each repetition beside a 64 MiB stream_sum; the results are binned by that stream rate.

Why: on a shared host the read bandwidth moves between ~35 and ~85 GB/s within minutes (bench/RESULTS.md,
2026-12-03), far more than the 2-10 % a kernel change is worth, so separate runs, even alternated, cannot tell such
changes apart. Interleaving in one process gives every build the same moments, and the bins show whether a change
helps when memory is slow, fast, or both.

    python setup.py build_ext --inplace                    # build A in the repo, then copy the tree, change, build B:
    python bench/bench_ab.py --builds .,/tmp/b --op packed_gemv -M 8          # the small shape's weights, fp32
    python bench/bench_ab.py --builds .,/tmp/b --op packed_gemv --shape 1b -M 32 --dtype bf16
    python bench/bench_ab.py --builds .,/tmp/b --op packed_gemv --shape 1b -M 2 --dtype bf16 --int8 w8a8
    python bench/bench_ab.py --builds .,/tmp/b --op attention --context 308  # the small shape's 8 rows of K/V
    python bench/bench_ab.py --builds .,/tmp/b --op attention --shape 1b --dtype int8 --rows 32 --context 312
    python bench/bench_ab.py --builds .,/tmp/b --op engine --reps 12  # whole generations; GB/s = roofline bytes
                                                                      # per decode step / measured ms per step
    python bench/bench_ab.py --builds .,/tmp/b --op engine --shape 1b -n 16 --tokens 192 --dtype bf16 --int8 w8a8 \
        --kv-cache-dtype int8 --reps 4                                # W8A8 projections, the int8 KV cache
    python bench/bench_ab.py --builds .,/tmp/b --op layers --shape 1b --dtype bf16 --reps 40  # the decoder layers
                                             # of one decode step (decode_layer x L); GB/s = weight + K/V bytes

A build is a folder holding janus_rt/_C*.so (its name in the table: the folder's). Inputs are made once with this
checkout's cpu_ops (PackedWeight's layout), so the builds must agree on that layout, unless --pack-per-build
(packed_gemv, layers): then each build packs its own copy of the same weights, so builds whose layouts differ (K tile
sizes, say) can be compared; the weights are held once per build (and per block size, below).

    python bench/bench_ab.py --builds .,/tmp/b --op packed_gemv --shape 1b -M 32 --dtype bf16 --pack-per-build

--block-sizes (attention, layers, engine) runs each build at each KV block size, a column per pair; one build at
two block sizes compares the sizes (the engine's GB/s count each size's own roofline bytes: a bigger block shares
fewer prompt tokens, so the header gives the bytes per call of each size):

    python bench/bench_ab.py --builds . --op engine --shape 1b -n 4 --tokens 96 --dtype bf16 --block-sizes 16,32
"""
import argparse
import contextlib
import functools
import glob
import importlib.util
import os
import statistics
import time

import janus_rt  # noqa: F401 - before torch: janus_rt sets libgomp's wait policy as the CLI runs (openmp.py)
import torch

from janus_rt import cpu_ops, cpu_step, ops
from janus_rt.engine.benchmark import SHAPES

DTYPES = {"fp32": (torch.float32, 0), "bf16": (torch.bfloat16, 1)}


def load_builds(folders: list[str]) -> dict:
    """{name: the _C module of that build}, each loaded under its own module name."""
    mods = {}
    for i, folder in enumerate(folders):
        found = glob.glob(os.path.join(folder, "janus_rt", "_C*.so"))
        if not found:
            raise SystemExit(f"--builds: no janus_rt/_C*.so under {folder!r} (build it: python setup.py build_ext "
                             "--inplace)")
        spec = importlib.util.spec_from_file_location(f"jr_ab_{i}._C", found[0])
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        name = os.path.basename(os.path.abspath(folder)) or folder
        mods[name if name not in mods else f"{name}#{i}"] = mod
    return mods


@contextlib.contextmanager
def use_build(mod):
    """cpu_ops packs and calls through build `mod` inside the block (None: this checkout's build)."""
    real = cpu_ops._C, cpu_ops._ext
    if mod is not None:
        cpu_ops._C, cpu_ops._ext = mod, lambda: mod
    try:
        yield
    finally:
        cpu_ops._C, cpu_ops._ext = real


def per_build(packers, make) -> dict:
    """{id(build): make() run under that build} for each build in `packers` ([None]: one copy by this checkout's
    build, for all); get(held, mod) picks a build's."""
    out = {}
    for mod in packers:
        with use_build(mod):
            out[id(mod)] = make()
    return out


def get(held: dict, mod):
    return held[id(mod)] if id(mod) in held else held[id(None)]


def paged(rows: torch.Tensor, block_size: int) -> torch.Tensor:
    """Cached rows [R, context, ...] -> a paged cache [nb * R, block_size, ...] (nb = ceil(context / block_size))
    where row b's block i is block i * R + b (handed out in turn, as the engine's rows grow in step), in 2 MiB pages
    as the engine's KV pool (cpu_ops.empty_huge). The same rows at any block size."""
    R, context, rest = rows.shape[0], rows.shape[1], rows.shape[2:]
    nb = -(-context // block_size)
    padded = rows.new_zeros(R, nb * block_size, *rest)
    padded[:, :context] = rows
    out = cpu_ops.empty_huge((nb * R, block_size, *rest), rows.dtype)
    return out.copy_(padded.view(R, nb, block_size, *rest).transpose(0, 1).reshape(nb * R, block_size, *rest))


def packed_gemv_case(shape: str, M: int, dtype: str, min_bytes: float, int8: str | None = None, packers=(None,)):
    """The shape's four decoder weights per layer (+ the gen head), as many layers as make >= min_bytes (at most the
    shape's own: main() says where that is less); int8 "weights" / "w8a8": held as Int8Weight / W8A8Weight (x bf16);
    packed by each build in `packers` (per_build). Returns (bytes read per call, fn(module) running the GEMVs
    once)."""
    C, L, _, inter, _, _ = SHAPES[shape]
    dt, code = DTYPES[dtype]
    hold = {None: cpu_ops.PackedWeight, "weights": cpu_ops.Int8Weight, "w8a8": cpu_ops.W8A8Weight}[int8]
    code = hold.code if int8 else code
    if dtype == "bf16" and not cpu_ops.packed_available(torch.bfloat16):
        raise SystemExit("--dtype bf16: this CPU has no AVX512_BF16 (no packed bf16 GEMV)")
    layer = [(3 * C, C), (C, C), (2 * inter, C), (C, inter)]
    per_layer = sum(n * k for n, k in layer) * (1 if int8 else dt.itemsize)
    layers = max(1, min(L, -int(-min_bytes // per_layer)))

    def make():  # the same values for every build
        g = torch.Generator().manual_seed(0)
        return [hold(torch.randn(n, k, generator=g).to(dt)) for n, k in layer * layers + [(16384, C)]]

    held = per_build(packers, make)
    g = torch.Generator().manual_seed(1)
    xs = {k: torch.randn(M, k, generator=g).to(dt) for _, k in layer}
    ys = {n: torch.empty(M, n) for n, _ in layer + [(16384, C)]}
    nbytes = sum(w.data.numel() * w.data.element_size() for w in next(iter(held.values())))

    def run(mod):
        for w in get(held, mod):
            mod.linear_packed(xs[w.K].data_ptr(), w.data.data_ptr(), 0, ys[w.N].data_ptr(), M, w.N, w.K, code)
        return ys[16384]  # the last call's output

    kind = f"{dtype}" + (f" x, {int8} weights" if int8 else "")
    return nbytes, run, f"packed GEMV, {shape} shape, {layers} layer(s) + gen head, M = {M}, {kind}"


def attention_case(shape: str, rows: int, context: int, dtype: str, min_bytes: float, block_size: int = 16):
    """Paged decode attention over `rows` rows of `context` tokens (paged(): blocks of `block_size`, the same values
    at any size), as many layers' caches as make >= min_bytes. dtype int8: bf16 q against the int8 KV cache (int8
    values and an fp32 scale a token and head; bytes counted as held)."""
    C, _, H, _, _, _ = SHAPES[shape]
    int8 = dtype == "int8"
    dt, code = DTYPES["bf16" if int8 else dtype]
    D = C // H
    nb = -(-context // block_size)
    row_bytes = C + 4 * H if int8 else C * dt.itemsize  # a cached token's K (or V) of one layer
    per_layer = 2 * rows * context * row_bytes
    layers = max(1, -int(-min_bytes // per_layer))
    g = torch.Generator().manual_seed(0)
    tables = torch.tensor([[i * rows + b for i in range(nb)] for b in range(rows)], dtype=torch.int32)
    lens = torch.full((rows,), context, dtype=torch.int32)

    def cache():  # (values, scales or None)
        if int8:
            return (paged(torch.randint(-127, 128, (rows, context, H, D), generator=g, dtype=torch.int8), block_size),
                    paged(torch.rand(rows, context, H, generator=g) / 64, block_size))
        return paged(torch.randn(rows, context, H, D, generator=g).to(dt), block_size), None

    caches = [(cache(), cache()) for _ in range(layers)]
    q = torch.randn(rows, H, D, generator=g).to(dt)
    o = torch.empty_like(q)
    nbytes = layers * 2 * rows * context * row_bytes
    kv_code = cpu_ops._KV_INT8_CODE if int8 else code

    def run(mod):
        for (k, ks), (v, vs) in caches:
            mod.paged_decode_attention(q.data_ptr(), code, k.data_ptr(), v.data_ptr(), kv_code, tables.data_ptr(),
                                       lens.data_ptr(), o.data_ptr(), rows, H, H, D, nb * rows, block_size, nb,
                                       D ** -0.5, ks.data_ptr() if int8 else 0, vs.data_ptr() if int8 else 0)
        return o

    return nbytes, run, (f"paged attention, {shape} shape, {layers} layer(s) x {rows} rows x {context} tokens, "
                         f"{dtype}")


def layers_case(shape: str, rows: int, context: int, dtype: str, block_size: int = 16, packers=(None,)):
    """The decoder layers of one decode step at the shape (cpu_step.DecodeStack's decode_layer calls, packed where
    it can be, by each build in `packers`: per_build), `rows` rows of `context` cached tokens each (paged(): the same
    values at any block size), random weights and K/V. h starts from the same values on every call; the output is h
    after the last layer."""
    C, L, H, inter, _, _ = SHAPES[shape]
    dt, code = DTYPES[dtype]
    D = C // H
    nb = -(-context // block_size)
    g = torch.Generator().manual_seed(0)
    rnd = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g) * scale).to(dt)
    layers = [(rnd(C, scale=0.1) + 1, rnd(3 * C, C, scale=C**-0.5), rnd(C, C, scale=C**-0.5), rnd(C, scale=0.1) + 1,
               rnd(2 * inter, C, scale=C**-0.5), rnd(C, inter, scale=inter**-0.5)) for _ in range(L)]
    caches = [(paged(rnd(rows, context, H, D), block_size), paged(rnd(rows, context, H, D), block_size))
              for _ in range(L)]
    # per build: packed by each, whatever memory the copies before it left (else the A/B would not be of layouts)
    packed = True if packers[0] is not None else None
    stacks = per_build(packers, lambda: cpu_step.DecodeStack(layers, caches, 1e-6, packed=packed))
    stack = next(iter(stacks.values()))
    del layers
    tables = torch.tensor([[i * rows + b for i in range(nb)] for b in range(rows)], dtype=torch.int32)
    lens = torch.full((rows,), context, dtype=torch.int32)
    pos = context - 1
    slots = tables[:, pos // block_size].long() * block_size + pos % block_size
    cos, sin = (t.float().expand(rows, D).contiguous() for t in ops.rope_tables(torch.tensor([pos]), D, 10000.0, dt))
    h0 = rnd(rows, C)
    h = h0.clone()
    weight_bytes = sum(t.numel() for t in stack._held[0][:6]) * dt.itemsize * L
    nbytes = weight_bytes + L * 2 * rows * context * C * dt.itemsize

    def run(mod):
        h.copy_(h0)
        with use_build(mod):
            get(stacks, mod)(h, slots, tables, lens, cos, sin)
        return h

    return nbytes, run, (f"decoder layers, {shape} shape, {L} layers x {rows} rows x {context} tokens, {dtype}, "
                         f"{'packed' if stack.packed else 'unpacked'} GEMV")


@functools.lru_cache(maxsize=1)
def engine_model(shape: str, dtype: str, int8: str | None):
    """engine_case's model (one for all its block sizes)."""
    from janus_rt.engine.benchmark import bench_model

    model = bench_model(shape, DTYPES[dtype][0], "cpu")
    if int8:
        model.pack_for_cpu_(int8=int8 if int8 == "w8a8" else True)
    return model


def engine_case(shape: str, n: int, tokens: int, dtype: str, int8: str | None = None, kv_cache_dtype: str = "auto",
                block_size: int = 16):
    """The whole image generation of `janus-rt bench` (n images, `tokens` each) on random weights at the shape
    (int8: its projections packed as `janus-rt bench --int8 weights|w8a8`; kv_cache_dtype as its --kv-cache-dtype),
    in KV blocks of block_size: run(mod) builds and runs the engine with cpu_ops on that build (use_build: the
    engine's packed copies of an unpacked model are that build's too; an int8 model is packed once, by this
    checkout's) and returns the tokens. The rate reported is the roofline's bytes per decode step over the measured ms
    per step."""
    from janus_rt.engine.benchmark import image_engine
    from janus_rt.engine.roofline import decode_step_bytes_flops

    model = engine_model(shape, dtype, int8)
    prompt = [model.cfg.tokens.bos_id] + list(range(100, 118)) + [model.cfg.tokens.boi_id]
    step_bytes, _ = decode_step_bytes_flops(model, 2 * n, len(prompt) + tokens // 2,
                                            shared=(2, len(prompt) // block_size * block_size),
                                            kv_dtype=torch.int8 if kv_cache_dtype == "int8" else None)
    last = {}

    def run(mod):
        with use_build(mod):  # the engine's own packed copies (an unpacked model's) by that build too
            eng = image_engine(model, prompt, n, tokens, kv_cache_dtype=kv_cache_dtype, block_size=block_size)
            done = eng.run()
        last["ms"], last["kv_cache_dtype"] = eng.stats.ms_per_step, str(eng.cache.dtype)
        return torch.tensor([t for r in done.values() for row in r.tokens for t in row], dtype=torch.float32)

    what = (f"engine, {shape} shape, n = {n}, {tokens} tokens, {dtype}" + (f", int8 {int8}" if int8 else "")
            + (", int8 KV cache" if kv_cache_dtype == "int8" else ""))
    return step_bytes, run, what, last


def main(args) -> dict:
    if not cpu_ops.available():
        raise SystemExit("janus_rt._C is not built here: python setup.py build_ext --inplace")
    mods = load_builds(args.builds.split(","))
    min_bytes = args.min_mb * 1e6
    if args.dtype == "int8" and args.op != "attention":
        raise SystemExit("--dtype int8: the int8 KV cache, for --op attention only "
                         "(--op engine: --kv-cache-dtype int8)")
    if args.kv_cache_dtype != "auto" and args.op != "engine":
        raise SystemExit("--kv-cache-dtype: for --op engine only (--op attention: --dtype int8)")
    if args.int8 and (args.op not in ("engine", "packed_gemv") or args.dtype != "bf16"):
        raise SystemExit("--int8: for --op engine or packed_gemv, with --dtype bf16 only")
    if args.int8 and not (cpu_ops.w8a8_available() if args.int8 == "w8a8" else cpu_ops.int8_available()):
        raise SystemExit(f"--int8 {args.int8}: this CPU or build has no such GEMV")
    pack_per_build = getattr(args, "pack_per_build", False)
    if pack_per_build and args.op not in ("packed_gemv", "layers"):
        raise SystemExit("--pack-per-build: for --op packed_gemv or layers only")
    packers = list(mods.values()) if pack_per_build else [None]
    try:
        sizes = [int(b) for b in str(getattr(args, "block_sizes", "16")).split(",")]
    except ValueError:
        raise SystemExit(f"--block-sizes: comma-separated integers, got {args.block_sizes!r}") from None
    if sizes != [16] and args.op == "packed_gemv":
        raise SystemExit("--block-sizes: for --op attention, layers or engine")
    if any(b < 1 for b in sizes) or len(set(sizes)) < len(sizes):
        raise SystemExit(f"--block-sizes: distinct sizes >= 1, got {sizes}")
    columns = {}  # column name -> (build, run, bytes per call, engine's step dict or None)
    for bs in sizes:
        step = None  # engine: {"ms": the last run's ms per decode step, "kv_cache_dtype": its cache's}
        if args.op == "packed_gemv":
            nbytes, run, what = packed_gemv_case(args.shape, args.M, args.dtype, min_bytes, args.int8, packers)
        elif args.op == "layers":
            nbytes, run, what = layers_case(args.shape, args.rows or 2 * SHAPES[args.shape][5], args.context,
                                            args.dtype, block_size=bs, packers=packers)
        elif args.op == "engine":
            nbytes, run, what, step = engine_case(args.shape, args.n or SHAPES[args.shape][5], args.tokens,
                                                  args.dtype, args.int8, args.kv_cache_dtype, block_size=bs)
        else:
            rows = args.rows or 2 * SHAPES[args.shape][5]
            nbytes, run, what = attention_case(args.shape, rows, args.context, args.dtype, min_bytes, block_size=bs)
        for name, mod in mods.items():
            columns[name if len(sizes) == 1 else f"{name} bs {bs}"] = (mod, run, nbytes, step)
    per_call = " / ".join(dict.fromkeys(f"{c[2] / 1e6:.0f}" for c in columns.values()))  # MB, by block size
    if args.op != "packed_gemv":
        what += f", KV block size {' / '.join(map(str, sizes))}"
    if args.op in ("packed_gemv", "layers") and nbytes < min_bytes:  # the shape holds no more than this
        print(f"# note: {nbytes / 1e6:.0f} MB per call, under --min-mb {args.min_mb:.0f}: the shape's weights (and K/V)"
              " are all there is; a last-level cache that large may hold them between calls", flush=True)
    if pack_per_build:
        what += ", packed by each build"
    names = list(columns)
    outputs = {name: columns[name][1](columns[name][0]).float().clone() for name in names}  # also the warm-up
    stream = torch.ones((512 << 20) // 4).split((64 << 20) // 4)
    rates = {name: [] for name in names}
    st = []
    for rep in range(args.reps):
        for i in range(3 if args.op == "engine" else 1):  # engine: the first reads after a run are slow (~2-20 GB/s)
            t = time.perf_counter()
            cpu_ops.stream_sum(stream[(3 * rep + i) % len(stream)])
        st.append((64 << 20) / (time.perf_counter() - t) / 1e9)
        for name in (names if rep % 2 == 0 else names[::-1]):
            col_mod, col_run, col_bytes, col_step = columns[name]
            t = time.perf_counter()
            col_run(col_mod)
            dt = time.perf_counter() - t if col_step is None else col_step["ms"] / 1e3  # engine: per decode step
            rates[name].append(col_bytes / dt / 1e9)
    order = sorted(range(len(st)), key=st.__getitem__)
    q = max(1, len(order) // 4)
    bins = {"slowest quarter": order[:q], "middle half": order[q:-q] or order, "fastest quarter": order[-q:]}
    print(f"# bench_ab: {what}; {per_call} MB per call, {args.reps} repetitions, "
          f"{torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d %H:%M')}")
    print("| memory state | stream GB/s | " + " | ".join(f"{n} GB/s" for n in names) + " |")
    print("|---|---|" + "---|" * len(names))
    out = {"what": what,
           "max_abs_diff": {n: (outputs[n] - outputs[names[0]]).abs().max().item() for n in names[1:]}}
    if step is not None:
        out["kv_cache_dtype"] = step["kv_cache_dtype"]  # the engine's, as run
    for label, idx in bins.items():
        med = {n: statistics.median(rates[n][i] for i in idx) for n in names}
        out[label] = {"stream": statistics.median(st[i] for i in idx), **med}
        print(f"| {label} | {out[label]['stream']:.1f} | " + " | ".join(f"{med[n]:.1f}" for n in names) + " |")
    for n, d in out["max_abs_diff"].items():
        print(f"output of {n} vs {names[0]}: " + ("identical" if d == 0 else f"max abs difference {d:.3g}"))
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--builds", required=True, help="comma-separated folders, each with a built janus_rt/_C*.so")
    ap.add_argument("--op", choices=["packed_gemv", "attention", "layers", "engine"], default="packed_gemv")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small")
    ap.add_argument("--dtype", choices=sorted(DTYPES) + ["int8"], default="fp32",
                    help="int8: --op attention only (bf16 q, the int8 KV cache)")
    ap.add_argument("-M", type=int, default=8, help="packed_gemv: rows of x")
    ap.add_argument("--rows", type=int, default=None, help="attention, layers: rows (default: the shape's 2n)")
    ap.add_argument("--context", type=int, default=308, help="attention, layers: cached tokens per row")
    ap.add_argument("-n", type=int, default=None, help="engine: images (default: the shape's)")
    ap.add_argument("--tokens", type=int, default=576, help="engine: image tokens per image")
    ap.add_argument("--int8", choices=["weights", "w8a8"], default=None,
                    help="engine, packed_gemv: the projections as int8 weights or W8A8 (as janus-rt bench --int8; "
                    "packed once by this checkout's build unless --pack-per-build; engine: builds "
                    "from before 2026-12-07 cannot run its int8 heads)")
    ap.add_argument("--pack-per-build", action="store_true",
                    help="packed_gemv, layers: each build packs its own copy of the weights (builds whose packed "
                    "layouts differ); default: one copy packed by this checkout's build")
    ap.add_argument("--kv-cache-dtype", choices=["auto", "int8"], default="auto",
                    help="engine: the KV cache's type (as janus-rt bench --kv-cache-dtype)")
    ap.add_argument("--block-sizes", default="16",
                    help="attention, layers, engine: comma-separated KV block sizes, each build run at each")
    ap.add_argument("--reps", type=int, default=400)
    # 1 GB: an Intel Xeon host reported 480 MiB of L3, where 80-170 MB per call ran from cache (bench/RESULTS.md,
    # 2026-12-04: the 1B GEMV at 32 rows 23.5 GB/s vs 18-20 from 2 GB)
    ap.add_argument("--min-mb", type=float, default=1024.0, help="bytes per call, well past the L3")
    main(ap.parse_args())

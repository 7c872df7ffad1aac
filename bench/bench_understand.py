"""Understanding benchmark: one image + a question answered greedily by janus_rt's engine and by transformers'
generate (text mode) on the same weights, alternating runs. Reports the time to the first token (SigLIP + aligner +
the prompt through the LLM + the first token; also as GFLOP/s of the prefill's FLOPs), the decode in ms per later
token, and the decode step's fraction of its roofline (LLM + LM head weights + K/V bytes over the fastest measured
read bandwidth: one row is memory-bound).

    python bench/bench_understand.py                              # Janus-Pro-1B shapes (SigLIP-L @384 + 1B LLM),
                                                                  # random weights, bf16
    python bench/bench_understand.py --model /path/to/Janus-Pro-1B --new-tokens 64
    python bench/bench_understand.py --preset tiny --dtype fp32   # seconds (what tests/test_cli.py runs)

Per-token times come from each implementation's own step: janus_rt's engine timers, and for transformers a streamer
that stamps the time each new token arrives. Both answer greedily from the
same ids and pixels; in bf16 two nearly equal logits can round apart, after which the answers differ
(`first_difference`); random weights make such near-ties common.
"""
import argparse
import json
import statistics
import time

import janus_rt  # noqa: F401 - before torch: janus_rt sets libgomp's wait policy as the CLI runs (openmp.py)
import torch

from janus_rt import Janus
from janus_rt.engine.benchmark import transformers_baseline
from janus_rt.engine.roofline import (CpuWait, device_name, measure_bandwidth_gbs, measure_matmul_gflops,
                                      record_cpu_waits, sync)


def question_ids(model, question_len: int = 20, system_len: int = 40) -> list[int]:
    """BOS, a system-prompt-long run of text ids, one image (BOI, a placeholder per patch, EOI), a question-long
    run: the official understanding prompt's length and layout without needing a tokenizer."""
    t = model.cfg.tokens
    hi = min(t.bos_id, 1000)  # plain text ids (the special ids sit at the top of the vocabulary)
    text = lambda n, start: [(start + i) % hi for i in range(n)]
    return ([t.bos_id] + text(system_len, 100) + [t.boi_id] + [t.image_id] * model.cfg.vision.num_patches
            + [t.eoi_id] + text(question_len, 500))


def prefill_flops(model, prompt_len: int) -> float:
    """FLOPs of the understanding prefill: SigLIP over its patches, the aligner, the LLM over the prompt (causal
    attention counted in full), the LM head on the last position."""
    v, c = model.cfg.vision, model.cfg.llm
    P = v.num_patches
    vis = sum(p.numel() for n, p in model.vision.named_parameters() if p.dim() == 2)  # the matmul weights
    vis += sum(p.numel() for p in model.aligner.parameters() if p.dim() == 2)
    vis_flops = 2 * vis * P + v.num_layers * 4 * P * P * v.width
    from janus_rt.models.packed_linear import packed_weight_numel

    # (projections held in place, packed or int8, are no parameters: packed_weight_numel counts them)
    llm = sum(p.numel() for n, p in model.llm.named_parameters() if p.dim() == 2 and "embed_tokens" not in n)
    llm += packed_weight_numel(model.llm)
    llm_flops = 2 * llm * prompt_len + c.num_layers * 4 * prompt_len * prompt_len * c.num_heads * c.head_dim
    return vis_flops + llm_flops + 2 * model.lm_head.weight.numel()


def decode_bytes_flops(model, context: int, kv_dtype: torch.dtype | None = None) -> tuple[float, float]:
    """One text row's decode step: the LLM's weights (not the embedding) and the LM head read once, plus the row's
    K/V over `context` cached tokens; FLOPs alike. Projections and an LM head held in place (packed, or int8: a byte
    a weight) count as what they hold; the K/V as the cache holds it (kv_dtype, default the model's; int8: + a scale
    a head)."""
    from janus_rt.engine.kv_cache import KVCache
    from janus_rt.models.packed_linear import packed_weight_nbytes, packed_weight_numel

    c, isz = model.cfg.llm, model.dtype.itemsize
    mods = (model.llm, model.lm_head)  # (a held LM head has no parameters: packed_weight_* count it)
    w = (sum(p.numel() for n, p in model.llm.named_parameters() if "embed_tokens" not in n)
         + sum(p.numel() for p in model.lm_head.parameters()))
    held, held_bytes = sum(packed_weight_numel(m) for m in mods), sum(packed_weight_nbytes(m) for m in mods)
    kv = context * c.num_layers * 2 * c.num_kv_heads * c.head_dim
    kv_bytes = context * KVCache.block_bytes(c.num_layers, 1, c.num_kv_heads, c.head_dim, kv_dtype or model.dtype)
    return w * isz + kv_bytes + held_bytes, 2 * (w + held) + 2 * kv


def run_janus_rt(model, engine, ids, pixels, new_tokens: int) -> tuple[float, float, float, list[int]]:
    """-> (seconds to the first token, seconds per later token, seconds in all, the answer), from the engine's own
    step timers and a wall clock around the whole answer."""
    st = engine.stats
    before = (st.decode_s, st.decode_steps)
    sync(model.device)
    t = time.perf_counter()
    out = model.generate_text(ids, pixels, max_new_tokens=new_tokens, engine=engine)
    sync(model.device)
    total = time.perf_counter() - t
    decode_s, steps = st.decode_s - before[0], st.decode_steps - before[1]
    return total - decode_s, decode_s / steps if steps else float("nan"), total, out


class _Stamps:
    """A generate() streamer that only records when each new token arrives (its first put() is the prompt).
    (Janus' generate passes no logits processor on in text mode; a streamer it does.)"""

    def __init__(self):
        self.times, self.calls = [], 0

    def put(self, value):
        if self.calls:
            self.times.append(time.perf_counter())
        self.calls += 1

    def end(self):
        pass


def run_transformers(ref, model, ids, pixels, new_tokens: int) -> tuple[float, float, float, list[int]]:
    """-> (seconds to the first token, seconds per later token, seconds in all, the answer), from per-token time
    stamps and a wall clock around generate()."""
    t = model.cfg.tokens
    x = torch.tensor([ids], device=ref.device)
    stamps = _Stamps()
    sync(ref.device)
    t0 = time.perf_counter()
    with torch.no_grad():
        y = ref.generate(x, attention_mask=torch.ones_like(x), pixel_values=pixels, generation_mode="text",
                         do_sample=False, max_length=len(ids) + new_tokens, eos_token_id=t.eos_id,
                         pad_token_id=t.pad_id, streamer=stamps)
    sync(ref.device)
    total = time.perf_counter() - t0
    ts = stamps.times
    out = y[0, len(ids):].tolist()
    out = out[: out.index(t.eos_id) + 1] if t.eos_id in out else out
    per = (ts[-1] - ts[0]) / (len(ts) - 1) if len(ts) > 1 else float("nan")
    return ts[0] - t0, per, total, out


def main(args) -> dict:
    from janus_rt.cli import load_model, resolve_dtype

    device = args.device
    dtype = resolve_dtype(args.dtype or ("fp32" if args.preset == "tiny" and not args.int8 else "bf16"))
    for ok, why in ((args.new_tokens >= 1, f"--new-tokens must be >= 1, got {args.new_tokens}"),
                    (args.repeats >= 1, f"--repeats must be >= 1, got {args.repeats}"),
                    # (torch's fp16 matmul on a CPU: the probe alone ran for minutes at the tiny preset)
                    (dtype != torch.float16 or str(device).startswith("cuda"),
                     "--dtype fp16 needs a GPU; on the CPU use fp32 or bf16")):
        if not ok:
            raise SystemExit(f"bench_understand: {why}")
    if args.int8:  # --int8's checks before anything is built (janus-rt's own)
        from janus_rt.cli import _check_args, _int8_checks

        args.cmd = "bench_understand --int8"
        _check_args(args, *_int8_checks(argparse.Namespace(int8=args.int8, dtype=str(dtype).split(".")[-1]),
                                        str(device).startswith("cuda")))
    if args.model:
        model, _, what = load_model(args.model, device, dtype)
    else:
        print(f"# building random weights at the {args.preset} preset ...", flush=True)
        model, what = Janus.from_preset(args.preset, seed=0, device=device, dtype=dtype), f"random weights, {args.preset}"
    ids = question_ids(model)
    S = model.cfg.vision.image_size
    pixels = (torch.rand(1, 3, S, S, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(device, dtype)
    bw, peak = measure_bandwidth_gbs(device), measure_matmul_gflops(device, dtype)
    dev_name = device_name(device)
    print(f"# {dev_name}: read bandwidth {bw:.1f} GB/s, matmul peak {peak:.0f} GFLOP/s; model: {what}, {dtype}; "
          f"prompt {len(ids)} tokens ({model.cfg.vision.num_patches} image), up to {args.new_tokens} new tokens",
          flush=True)
    ref = None if args.no_transformers else transformers_baseline(model, device)
    if args.int8:  # after the baseline took its copy of the bf16 weights
        from janus_rt.engine.cpu_decode import pack_in_place

        print(f"# {pack_in_place(model, int8=args.int8)}", flush=True)
    # one engine for all of our runs, as a server holds one (making it packs the decoder weights: seconds at 1B)
    from janus_rt.engine import Engine

    engine = Engine.for_requests(model, [(len(ids) + args.new_tokens, 0)],
                                 kv_cache_dtype=getattr(args, "kv_cache_dtype", "auto"))
    impls = {"janus_rt": lambda n: run_janus_rt(model, engine, ids, pixels, n)}
    if ref is not None:
        impls["transformers"] = lambda n: run_transformers(ref, model, ids, pixels, n)
    for fn in impls.values():  # warm-up: first calls pay for allocation and thread start-up
        fn(2)
    runs = {name: [] for name in impls}  # (time to first token, seconds per later token, seconds in all)
    answers, run_bw = {}, []
    waits = {name: [] for name in impls}  # run delay per second of each timed run (roofline.CpuWait)
    for _ in range(args.repeats):  # alternate so drift hits both alike
        for name, fn in impls.items():
            if name == "janus_rt":
                run_bw.append(measure_bandwidth_gbs(device))
            with CpuWait() as w:
                ttft, per, total, answers[name] = fn(args.new_tokens)
            runs[name].append((ttft, per, total))
            waits[name].append(w.per_s)
    row = {"date": time.strftime("%Y-%m-%d"), "device": dev_name, "model": what, "dtype": str(dtype).split(".")[-1],
           "prompt_tokens": len(ids), "new_tokens": len(answers["janus_rt"])}
    if args.int8:
        from janus_rt.engine.benchmark import weights_label

        row["weights"] = weights_label(args.int8)
    if engine.cache.quantized:
        row["kv_cache"] = "int8 (+ fp32 scale a head)"
    pf_flops = prefill_flops(model, len(ids))
    for name in impls:
        ttft = statistics.median(r[0] for r in runs[name])
        ms_tok = 1e3 * statistics.median(r[1] for r in runs[name])
        n = len(answers[name])
        total = statistics.median(r[2] for r in runs[name])  # measured, each run's whole answer
        row.update({f"{name}_first_token_s": round(ttft, 3), f"{name}_prefill_gflops": round(pf_flops / ttft / 1e9, 1),
                    f"{name}_decode_ms_token": round(ms_tok, 2), f"{name}_total_s": round(total, 3),
                    f"{name}_tok_s": round(n / total, 2)})
    # the decode step's roofline against the fastest bandwidth probe of the benchmark (a slow moment's probe would
    # flatter the fraction)
    best_bw = max(bw, *run_bw)
    nbytes, flops = decode_bytes_flops(model, len(ids) + row["new_tokens"] // 2, engine.cache.dtype)
    roof_ms = 1e3 * max(nbytes / (best_bw * 1e9), flops / (peak * 1e9))
    row.update({"decode_roofline_ms": round(roof_ms, 2),
                "decode_roofline_fraction": round(roof_ms / row["janus_rt_decode_ms_token"], 3),
                "bandwidth_gbs": [round(b, 1) for b in run_bw], "best_bandwidth_gbs": round(best_bw, 1),
                "matmul_gflops": round(peak, 1)})
    if str(device) == "cpu":
        from janus_rt import openmp

        row["openmp_wait"] = openmp.wait_policy()
    record_cpu_waits(row, waits)  # (> BUSY_WAIT_PER_S: other processes shared the cores during the timed runs)
    if "transformers" in impls:
        a, b = answers["janus_rt"], answers["transformers"]
        row["same_tokens"] = a == b
        if a != b:  # greedy answers part where two near-equal logits round differently (bf16: likely, in time)
            row["first_difference"] = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        if len(a) == len(b):  # whole answers compared only where they are as long (else the per-token rates below)
            row["speedup"] = round(row["transformers_total_s"] / row["janus_rt_total_s"], 2)
        row["first_token_speedup"] = round(row["transformers_first_token_s"] / row["janus_rt_first_token_s"], 2)
        row["decode_speedup"] = round(row["transformers_decode_ms_token"] / row["janus_rt_decode_ms_token"], 2)
    for k, v in row.items():
        print(f"{k:>26}: {v}")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(row) + "\n")
    return row


def build_parser():
    from janus_rt.cli import INT8_MODES

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint folder (default: random weights at --preset)")
    ap.add_argument("--preset", default="janus-pro-1b", choices=["tiny", "janus-pro-1b", "janus-pro-7b"])
    ap.add_argument("--dtype", default=None, choices=("fp32", "float32", "bf16", "bfloat16", "fp16", "float16"),
                    help="default: bf16 (fp32 for the tiny preset)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--new-tokens", type=int, default=32, help="answer length (greedy; fewer if EOS comes first)")
    ap.add_argument("--repeats", type=int, default=2, help="alternating runs of each implementation")
    ap.add_argument("--no-transformers", action="store_true", help="skip the transformers baseline")
    ap.add_argument("--int8", nargs="?", const="weights", default=None, choices=INT8_MODES,
                    help="janus_rt's LLM projections and LM head as int8 (CPU, bf16; transformers keeps bf16 "
                         "weights, so the answers may differ): --int8 weight-only, --int8 w8a8 with int8 activations "
                         "too")
    ap.add_argument("--kv-cache-dtype", default="auto", choices=("auto", "int8"),
                    help="janus_rt's KV cache (int8: rows + an fp32 scale a head; CPU)")
    ap.add_argument("--json", default=None, help="append the result row to this JSON-lines file")
    return ap


if __name__ == "__main__":
    main(build_parser().parse_args())

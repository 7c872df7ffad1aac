"""The decode step on the CPU as csrc calls on held buffers (the Python side of csrc/decode_layer.cpp and
csrc/image_steps.cpp; the single ops are cpu_ops'):

- DecodeStack: the LLM's decoder layers for a decode step, one csrc call per layer (norms, QKV, RoPE, KV store,
  paged attention, output projection, SwiGLU MLP), the weights, caches and packed copies checked once and held;
- ImageStep: the whole decode step of a batch of image rows (token embedding, gen aligner, the DecodeStack, gen
  head, CFG + sampling), k steps per call, with no torch op per step;
- decode_phase_timing: the wall time of each phase inside those layer calls (`janus-rt bench --profile`).

engine/cpu_decode.py builds them for the engine. The extension is reached through cpu_ops._ext() at call time
(bench/bench_ab.py swaps it to time other builds).
"""
from __future__ import annotations

import contextlib
import math
from array import array as _array

import torch

from janus_rt import cpu_ops
from janus_rt.cpu_ops import (_DTYPE_CODE, _FP, _W8A8_CODE, Int8Weight, PackedWeight, _check, _check_tensor, packable,
                              packed_copy_fits)


class DecodeStack:
    """The LLM's decoder layers for a decode step on the CPU (csrc/decode_layer.cpp): one csrc call per layer.

    Built once from each layer's weights (in_norm [C], qkv [3C, C], o_proj [C, C], post_norm [C], gate_up [2I, C],
    down [C, I]) and its paged caches k_cache, v_cache [num_blocks, block_size, H, D] with H * D = C, all one dtype
    (fp32 or bf16), MHA; they are checked here once and held (the stack reads them by address on every call).
    An int8 KV cache comes as (k_cache, v_cache, k_scale, v_scale) per layer: int8 caches, fp32 scales
    [num_blocks, block_size, H] (engine/kv_quant.py; `self.kv_int8`).
    Calling it checks only the step's tensors, then runs every layer:
        stack(h, slot_mapping, block_tables, context_lens, cos, sin, out=None)
    h: [R, C] residual stream, updated in place (h <- h + attn(norm(h)); h <- h + mlp(norm(h)) per layer, the
    math of DecoderLayer.forward + ops.kv_store + ops.paged_decode_attention); slot_mapping: int64 [R] (where row
    r's new k, v go; < 0 = write nothing); block_tables: int32 [R, max_blocks]; context_lens: int32 [R] (including
    the new token); cos, sin: fp32 [R, D] rotary tables of each row's position.
    final_norm ([C], the model's last RMSNorm; eps final_eps, default eps): then out ([R, C], h's dtype) receives
    RMSNorm(h) after the last layer, computed inside its call (ops.rms_norm_torch's rounding points).
    packed: hold qkv, o_proj, gate_up and down as PackedWeight copies and run the packed GEMV (fp32; bf16 on an
    AVX512_BF16 build). None (default) = when possible and the copies take at most half of the memory available
    now (they are as large as those weights; the originals stay with the model); True = required (ValueError if
    impossible); False = never. `self.packed` says what was chosen. The four matrices may also come as PackedWeight
    (a model packed in place, Janus.pack_for_cpu_): held as they are, no copy, packed GEMV; or all as Int8Weight (a
    bf16 model quantized in place, Janus.pack_for_cpu_(int8=True)): the int8 GEMV (`self.int8`); or all as W8A8Weight
    (int8="w8a8"): the W8A8 GEMV (`self.int8` and `self.w8a8`).
    """

    def __init__(self, layers, caches, eps: float, final_norm=None, final_eps: float | None = None,
                 packed: bool | None = None):
        _check(len(layers) == len(caches) and len(layers) >= 1, "need one (k_cache, v_cache) pair per layer")
        self.kv_int8 = len(caches[0]) == 4
        _check(all(len(c) == (4 if self.kv_int8 else 2) for c in caches),
               "caches: (k_cache, v_cache) per layer, or (k_cache, v_cache, k_scale, v_scale) for all (int8)")
        in_norm = layers[0][0]
        _check_tensor(in_norm, "in_norm", _FP, 1)
        self.dtype, self.C = in_norm.dtype, in_norm.shape[0]
        C, dt = self.C, self.dtype
        self.inter = layers[0][5].shape[-1]
        k0 = caches[0][0]
        kv_dt = torch.int8 if self.kv_int8 else dt
        _check_tensor(k0, "k_cache", (kv_dt,), 4)
        self.num_blocks, self.block_size, self.H, self.D = k0.shape
        _check(self.H * self.D == C and self.D % 2 == 0,
               f"cache heads {self.H} x head_dim {self.D} must be C = {C} with an even head_dim")
        shapes = ((C,), (3 * C, C), (C, C), (C,), (2 * self.inter, C), (C, self.inter))
        names = ("in_norm", "qkv", "o_proj", "post_norm", "gate_up", "down")
        self._held, self._ptrs = [], []
        for i, (ws, (kc, vc, *scales)) in enumerate(zip(layers, caches)):
            _check(len(ws) == 6, f"layer {i}: expected 6 weights {names}")
            for name, t, shape in zip(names, ws, shapes):
                if isinstance(t, PackedWeight):  # already packed (Janus.pack_for_cpu_): held as it is
                    _check(len(shape) == 2 and t.dtype == dt, f"layer {i} {name}: a {t.dtype} PackedWeight where a "
                                                              f"{dt} {'matrix' if len(shape) == 2 else 'vector'} goes")
                else:
                    _check_tensor(t, f"layer {i} {name}", (dt,), len(shape))
                _check(tuple(t.shape) == shape, f"layer {i} {name} has shape {tuple(t.shape)}; expected {shape}")
            for name, t in (("k_cache", kc), ("v_cache", vc)):
                _check_tensor(t, f"layer {i} {name}", (kv_dt,), 4)
                _check(t.shape == k0.shape, f"layer {i} {name} {tuple(t.shape)} != {tuple(k0.shape)}")
            for name, t in zip(("k_scale", "v_scale"), scales):
                _check_tensor(t, f"layer {i} {name}", (torch.float32,), 3)
                _check(t.shape == k0.shape[:3], f"layer {i} {name} {tuple(t.shape)} != {tuple(k0.shape[:3])}")
        prepacked = [isinstance(t, PackedWeight) for ws in layers for t in ws]
        if any(prepacked):
            _check(sum(prepacked) == 4 * len(layers), "pass every layer's four matrices packed, or none of them")
            _check(packed is not False, "packed=False, but the weights are PackedWeight (packed in place: "
                                        "Janus.pack_for_cpu_); they can only run the packed GEMV")
            self.packed = True
        else:
            self.packed = self._choose_packed(packed, layers, shapes)
        int8 = [type(t) for ws in layers for t in ws if isinstance(t, Int8Weight)]
        self.int8 = bool(int8)
        _check(not self.int8 or (len(int8) == 4 * len(layers) and len(set(int8)) == 1),
               "pass every layer's four matrices as Int8Weight (or all as W8A8Weight), or none")
        # decode_layer's weight layout: 0 [N, K], 1 packed, 2 int8 (csrc/int8_gemv.h), 4 W8A8 (csrc/w8a8_gemv.h)
        self.weights_code = int8[0].code if self.int8 else int(self.packed)
        self.w8a8 = self.weights_code == _W8A8_CODE
        for ws, (kc, vc, *scales) in zip(layers, caches):
            if self.packed:  # the four matrices (qkv, o_proj, gate_up, down) as packed copies (made here, or given)
                ws = tuple(t.data if isinstance(t, PackedWeight) else PackedWeight(t).data if t.dim() == 2 else t
                           for t in ws)
            self._held.append((*ws, kc, vc, *scales))
            self._ptrs.append(tuple(t.data_ptr() for t in (*ws, kc, vc, *scales)))  # (+ k_scale, v_scale: int8)
        # [L, 8] for csrc image_steps ([L, 10] with an int8 cache's scales; an older build, bench_ab's A side, reads 8)
        self._layer_table = _array("q", [x for p in self._ptrs for x in p])
        self.eps = float(eps)
        self.final_norm = final_norm
        self.final_eps = self.eps if final_eps is None else float(final_eps)
        if final_norm is not None:
            _check_tensor(final_norm, "final_norm", (dt,), 1)
            _check(final_norm.shape[0] == C, f"final_norm has {final_norm.shape[0]} entries; expected C = {C}")

    def _choose_packed(self, packed, layers, shapes) -> bool:
        possible = packable(self.dtype, self.C, self.inter)
        if packed is False or (packed is None and not possible):
            return False
        _check(possible, "packed=True with bf16 weights needs an AVX512_BF16 build and even hidden/intermediate sizes")
        if packed is None:
            per_layer = sum(PackedWeight.nbytes(*s, self.dtype) for s in shapes if len(s) == 2)
            return packed_copy_fits(len(layers) * per_layer)
        return True

    def __call__(self, h, slot_mapping, block_tables, context_lens, cos, sin, out=None) -> None:
        _check_tensor(h, "h", (self.dtype,), 2)
        R = h.shape[0]
        _check((out is None) == (self.final_norm is None), "out is given exactly when the stack has a final_norm")
        if out is not None:
            _check_tensor(out, "out", (self.dtype,), 2)
            _check(tuple(out.shape) == tuple(h.shape), f"out {tuple(out.shape)} must have h's shape {tuple(h.shape)}")
        _check(h.shape[1] == self.C, f"h has {h.shape[1]} columns; the stack's hidden size is {self.C}")
        _check_tensor(slot_mapping, "slot_mapping", (torch.int64,), 1)
        _check_tensor(block_tables, "block_tables", (torch.int32,), 2)
        _check_tensor(context_lens, "context_lens", (torch.int32,), 1)
        _check_tensor(cos, "cos", (torch.float32,), 2)
        _check_tensor(sin, "sin", (torch.float32,), 2)
        _check(slot_mapping.shape[0] == R and block_tables.shape[0] == R and context_lens.shape[0] == R,
               f"slot_mapping, block_tables and context_lens need R = {R} rows")
        _check(cos.shape == (R, self.D) and sin.shape == (R, self.D), f"cos and sin must be [{R}, {self.D}]")
        _check(block_tables.shape[1] >= 1, "block_tables needs at least one column")
        if R == 0:
            return
        self._run(h.data_ptr(), 0 if out is None else out.data_ptr(), slot_mapping.data_ptr(),
                  block_tables.data_ptr(), context_lens.data_ptr(), cos.data_ptr(), sin.data_ptr(), R,
                  block_tables.shape[1])

    def _run(self, h, out, slots, tables, lens, cos, sin, R: int, max_blocks: int) -> None:
        """The layers on checked addresses (__call__'s, or ImageStep's buffers); out = 0: no final norm."""
        ext, code = cpu_ops._ext(), _DTYPE_CODE[self.dtype]
        step = (slots, tables, lens, cos, sin, R, self.C, self.H, self.inter, self.num_blocks, self.block_size,
                max_blocks, self.eps, 1.0 / math.sqrt(self.D))
        last = len(self._ptrs) - 1
        for i, p in enumerate(self._ptrs):  # the C++ side re-checks the block tables against num_blocks every layer
            fin = (self.final_norm.data_ptr(), out) if i == last and out else (0, 0)
            ext.decode_layer(h, code, *p[:8], *step, *fin, self.final_eps, self.weights_code, *p[8:])  # (scales)


class ImageStep:
    """The decode step of a batch of image rows on the CPU as csrc calls on held buffers, with no torch op per step:
    each image's last token -> gen_embed row -> gen aligner (Linear -> GELU -> Linear) -> repeated to its cond and
    uncond rows -> the decoder layers and final norm (DecodeStack) -> gen head -> CFG + sampling (cfg_sample).
    Why: after a step's weight stream every torch op and Python wrapper starts from cold caches; at the small
    benchmark shape (~7 ms steps on 2 cores) the ~25 of them around these kernels took ~1 ms (RESULTS.md).

    Built once: ImageStep(stack, gen_embed, aligner, gen_head, cos, sin): stack a DecodeStack with a final_norm;
    gen_embed [V_img, E] and the adaptors' (w1, b1, w2, b2) (PackedWeight when the stack is packed, else tensors;
    biases tensors) in the stack's dtype (both adaptors' weights held alike: PackedWeight, Int8Weight or
    W8A8Weight, whatever the stack's projections are); cos, sin fp32 [P, D], row p = the rotary table of position p as
    DecodeStack takes them.
    Called per step, lists of Python ints and tensors held by the caller:
        tokens = step(image_tokens, embed_rows, positions, slots, block_tables, cond_rows, uncond_rows, params, seeds)
    image_tokens [n]: each image's last token; embed_rows int64 [R]: the image whose embedding row r takes;
    positions, slots [R]; block_tables: R lists of block ids; cond_rows, uncond_rows int64 [n]: image i's two rows;
    params: the [n] tensors cfg_weight, temperature, top_p (fp32), top_k (int64), greedy (bool) as cfg_sample takes
    them; seeds [n] ints -> list of n sampled tokens. Same numerics as the op-by-op path (the torch path's rounding
    points: embeddings and logits rounded to the model dtype).
    step.steps(...) runs k steps in one call (k lists of slots and seeds), feeding each step's tokens to the next:
    the engine's multi-step decode, where the ~0.3 ms of host Python per step (engine bookkeeping, this wrapper,
    both from cold caches after the step's weight stream) is paid once per k steps.
    """

    # csrc/image_steps.cpp's plan entries, in its order
    PLAN = ("dtype", "packed", "rows", "images", "hidden", "heads", "inter", "head_dim", "num_blocks", "block_size",
            "gen_embed", "gen_embed_rows", "gen_embed_dim", "align_w1", "align_b1", "align_w2", "align_b2",
            "align_hidden", "head_w1", "head_b1", "head_w2", "head_b2", "head_hidden", "vocab", "cos", "sin",
            "rope_positions", "final_norm", "buf_x", "buf_emb", "buf_h", "buf_out", "buf_cos", "buf_sin",
            "buf_logits", "embed_rows", "cond_rows", "uncond_rows", "cfg_weight", "temperature", "top_k", "top_p",
            "greedy", "adaptors")
    loop_in_python = False  # tests: run steps() as its per-op Python loop (what it does under torch.profiler)

    def __init__(self, stack: DecodeStack, gen_embed: torch.Tensor, aligner, gen_head, cos: torch.Tensor,
                 sin: torch.Tensor):
        _check(isinstance(stack, DecodeStack) and stack.final_norm is not None,
               "stack must be a DecodeStack with a final_norm")
        dt, self.stack = stack.dtype, stack
        _check_tensor(gen_embed, "gen_embed", (dt,), 2)
        for name, t in (("cos", cos), ("sin", sin)):
            _check_tensor(t, name, (torch.float32,), 2)
            _check(t.shape == cos.shape and t.shape[1] == stack.D, f"{name} must be [P, {stack.D}] like cos")
        self.gen_embed, self.cos, self.sin = gen_embed, cos, sin
        self.adaptors, kinds = [], []
        for name, (w1, b1, w2, b2), k_in, n_out in (("aligner", aligner, gen_embed.shape[1], stack.C),
                                                   ("gen_head", gen_head, stack.C, None)):
            _check(isinstance(w1, PackedWeight) == isinstance(w2, PackedWeight) == stack.packed,
                   f"{name}: weights must be PackedWeight exactly when the stack is packed")
            _check(not stack.packed or type(w1) is type(w2),
                   f"{name}: w1 is a {type(w1).__name__}, w2 a {type(w2).__name__} (held alike or not at all)")
            kinds.append(w1.code if isinstance(w1, Int8Weight) else int(stack.packed))
            (H, K), (N, H2) = ((w1.N, w1.K), (w2.N, w2.K)) if stack.packed else (w1.shape, w2.shape)
            for t in (w1, w2) if not stack.packed else ():
                _check_tensor(t, name + " weight", (dt,), 2)
            _check(not stack.packed or (w1.dtype == w2.dtype == dt), f"{name}: packed weights must be {dt}")
            for b, n in ((b1, H), (b2, N)):
                _check_tensor(b, name + " bias", (dt,), 1)
                _check(b.shape[0] == n, f"{name}: a bias of {b.shape[0]} entries for {n} outputs")
            _check(K == k_in and H2 == H and (n_out is None or N == n_out), f"{name}: shapes do not chain")
            w1p, w2p = (w1.data, w2.data) if stack.packed else (w1, w2)
            self.adaptors.append(((w1p, b1, w2p, b2), (K, H, N)))
        self.vocab = self.adaptors[1][1][2]
        _check(kinds[0] == kinds[1], "the aligner and the gen head must be held alike (packed, int8 or W8A8)")
        self.adaptor_kind = kinds[0]  # csrc mlp_gelu's packed: 0, 1, 2 int8 weights, 4 W8A8
        _check(self.adaptor_kind in (0, 1) or cpu_ops._ext().image_steps_plan_len() == len(self.PLAN),
               "this build of janus_rt._C predates int8 adaptors in its image step (it would read them as packed "
               "bf16): rebuild it")  # (bench_ab's older builds)
        self._bufs: dict = {}
        self._prep: tuple = (None, None, ())  # the last batch: (key, _prepared's tuple, the tensors keyed by id)
        self._code = _DTYPE_CODE[dt]
        self._cos_ptr, self._sin_ptr = cos.data_ptr(), sin.data_ptr()

    def _buffers(self, R: int, n: int) -> dict:
        if (R, n) not in self._bufs:
            dt, C, D, E = self.stack.dtype, self.stack.C, self.stack.D, self.gen_embed.shape[1]
            e = lambda *shape, dtype=dt: torch.empty(*shape, dtype=dtype)
            self._bufs = {(R, n): dict(x=e(n, E), emb=e(n, C, dtype=torch.float32), h=e(R, C), out=e(R, C),
                                       cos=e(R, D, dtype=torch.float32), sin=e(R, D, dtype=torch.float32),
                                       logits=e(R, self.vocab, dtype=torch.float32))}
        return self._bufs[(R, n)]

    def _prepared(self, R: int, n: int, embed_rows, cond_rows, uncond_rows, params) -> tuple:
        """The checks and data pointers of one batch's held tensors, redone only when the batch changes (the engine
        holds these per batch): after a step's weight stream every Python operation runs from cold caches, and
        these ~40 tensor attribute reads were a good part of the ~0.2 ms between two steps' csrc calls."""
        held = (embed_rows, cond_rows, uncond_rows, *(params[k] for k in _SAMPLE_PARAMS))
        key = (R, n, *map(id, held))
        if self._prep[0] == key:
            return self._prep[1]
        _check(R >= 1 and n >= 1 and embed_rows.shape[0] == R and cond_rows.shape[0] == n == uncond_rows.shape[0],
               "inconsistent row counts")
        for t in (embed_rows, cond_rows, uncond_rows, params["top_k"]):
            _check(t.dtype == torch.int64 and t.is_contiguous(), "row indices and top_k must be contiguous int64")
        for k, dt in (("cfg_weight", torch.float32), ("temperature", torch.float32), ("top_p", torch.float32),
                      ("top_k", torch.int64), ("greedy", torch.bool)):
            t = params[k]
            _check(t.dtype == dt and t.shape == (n,) and t.is_contiguous(), f"params[{k!r}] must be {dt} [{n}]")
        b = {k: v.data_ptr() for k, v in self._buffers(R, n).items()}
        p = lambda t: t.data_ptr()
        (w1, b1, w2, b2), (K, H, N) = self.adaptors[0]
        embed = (p(self.gen_embed), p(w1), p(b1), p(w2), p(b2), K, H, N, self.gen_embed.shape[0])
        (w1, b1, w2, b2), (K, H, N) = self.adaptors[1]
        head = (p(w1), p(b1), p(w2), p(b2), K, H, N)
        sample = tuple(p(params[k]) for k in _SAMPLE_PARAMS)
        rows = (p(embed_rows), p(cond_rows), p(uncond_rows))
        st = self.stack
        plan = dict(dtype=self._code, packed=st.weights_code, rows=R, images=n, hidden=st.C, heads=st.H,
                    inter=st.inter, head_dim=st.D, num_blocks=st.num_blocks, block_size=st.block_size,
                    gen_embed=embed[0], gen_embed_rows=embed[8], gen_embed_dim=embed[5], align_w1=embed[1],
                    align_b1=embed[2], align_w2=embed[3], align_b2=embed[4], align_hidden=embed[6], head_w1=head[0],
                    head_b1=head[1], head_w2=head[2], head_b2=head[3], head_hidden=head[5], vocab=head[6],
                    cos=self._cos_ptr, sin=self._sin_ptr, rope_positions=self.cos.shape[0],
                    final_norm=st.final_norm.data_ptr(), buf_x=b["x"], buf_emb=b["emb"], buf_h=b["h"],
                    buf_out=b["out"], buf_cos=b["cos"], buf_sin=b["sin"], buf_logits=b["logits"],
                    embed_rows=rows[0], cond_rows=rows[1], uncond_rows=rows[2], adaptors=self.adaptor_kind,
                    **dict(zip(_SAMPLE_PARAMS, sample)))
        plan = _array("q", [int(plan[name]) for name in self.PLAN])  # csrc/image_steps.cpp's order
        # the entry holds the tensors whose ids make the key: none is freed (and its id reused) while cached
        self._prep = (key, (b, embed, head, sample, rows, plan), held)
        return self._prep[1]

    def __call__(self, image_tokens, embed_rows, positions, slots, block_tables, cond_rows, uncond_rows, params,
                 seeds) -> list[int]:
        """One decode step -> the n sampled tokens."""
        return self.steps(image_tokens, embed_rows, positions, [slots], block_tables, cond_rows, uncond_rows, params,
                          [seeds])[0]

    def steps(self, image_tokens, embed_rows, positions, slots, block_tables, cond_rows, uncond_rows, params,
              seeds) -> list[list[int]]:
        """k decode steps in a row, each step's sampled tokens the next step's inputs, without returning to the
        engine in between: slots and seeds are k lists ([R] and [n]); positions are the first step's (step j is at
        positions + j); block_tables must already hold every step's slots. -> k lists of n tokens, the tokens k
        separate calls would give (each step runs the same csrc calls on the same values)."""
        R, n, k = len(positions), len(image_tokens), len(slots)
        _check(k >= 1 and len(seeds) == k, "need k >= 1 steps: k lists of slots and of seeds")
        _check(len(block_tables) == R and all(len(s) == R for s in slots) and all(len(s) == n for s in seeds),
               "inconsistent row counts")
        b, (emb_w, w1, b1, w2, b2, K, H, N, V_img), head, sample, (er, cr, ur), plan = self._prepared(
            R, n, embed_rows, cond_rows, uncond_rows, params)
        ext, code, F32 = cpu_ops._ext(), self._code, _DTYPE_CODE[torch.float32]
        width = max(len(t) for t in block_tables)
        _check(width >= 1, "block_tables need at least one block")
        # every step's inputs in one array each (step j's at offset j * R or j * n); step j > 0 reads its image tokens
        # from the previous step's sampled ones in `out`
        tok = _array("q", image_tokens)
        pos = _array("q", [p + j for j in range(k) for p in positions])
        lens = _array("i", [p + 1 + j for j in range(k) for p in positions])
        sl = _array("q", [x for step in slots for x in step])
        bt = _array("i", [x for t in block_tables for x in (t if len(t) == width else t + [0] * (width - len(t)))])
        sd = _array("q", [x & 0xFFFFFFFF for step in seeds for x in step])
        out = _array("q", bytes(8 * n * k))
        a = lambda arr: arr.buffer_info()[0]
        tok_p, pos_p, lens_p, sl_p, bt_p, sd_p, out_p = a(tok), a(pos), a(lens), a(sl), a(bt), a(sd), a(out)
        P, D = self.cos.shape[0], self.stack.D
        w1h, b1h, w2h, b2h, Kh, Hh, Nh = head
        cfg_w, temp, top_k, top_p, greedy = sample
        st = self.stack
        if not (self.loop_in_python or torch.autograd._profiler_enabled()):  # the k steps in one csrc call
            ext.image_steps(plan.buffer_info()[0], st._layer_table.buffer_info()[0], len(st._ptrs), k, tok_p, pos_p,
                            lens_p, sl_p, bt_p, width, sd_p, out_p, st.eps, st.final_eps, 1.0 / math.sqrt(st.D),
                            *((len(st._ptrs[0]),) if st.kv_int8 else ()))  # the table's width: 10 with scales
            res = out.tolist()
            return [res[j * n:(j + 1) * n] for j in range(k)]
        # the same calls one by one: under torch.profiler (`janus-rt bench --profile`), each in its named range
        scope = _profiler_scope()
        for j in range(k):
            t_p = tok_p if j == 0 else out_p + 8 * n * (j - 1)
            with scope("janus_rt::cpu_gen_embeds"):
                ext.gather_rows(emb_w, code, t_p, b["x"], code, n, K, V_img)
                ext.mlp_gelu(b["x"], w1, b1, w2, b2, b["emb"], code, n, K, H, N, self.adaptor_kind, True)
                ext.gather_rows(b["emb"], F32, er, b["h"], code, R, N, n)
            with scope("janus_rt::cpu_decode_layers"):
                ext.gather_rows(self._cos_ptr, F32, pos_p + 8 * R * j, b["cos"], F32, R, D, P)
                ext.gather_rows(self._sin_ptr, F32, pos_p + 8 * R * j, b["sin"], F32, R, D, P)
                self.stack._run(b["h"], b["out"], sl_p + 8 * R * j, bt_p, lens_p + 4 * R * j, b["cos"], b["sin"], R,
                                width)
            with scope("janus_rt::cpu_mlp_gelu"):
                ext.mlp_gelu(b["out"], w1h, b1h, w2h, b2h, b["logits"], code, R, Kh, Hh, Nh, self.adaptor_kind, True)
            with scope("janus_rt::cpu_cfg_sample"):
                lg = b["logits"]
                ext.cfg_sample(lg, lg, cfg_w, temp, top_k, top_p, sd_p + 8 * n * j, greedy, out_p + 8 * n * j, n,
                               Nh, Nh, Nh, cr, ur, R)
        res = out.tolist()
        return [res[j * n:(j + 1) * n] for j in range(k)]


_SAMPLE_PARAMS = ("cfg_weight", "temperature", "top_k", "top_p", "greedy")  # cfg_sample's order


def _profiler_scope():
    """name -> a torch.profiler range while the profiler records, else a no-op context (one check per step)."""
    if torch.autograd._profiler_enabled():
        return torch.profiler.record_function
    return lambda name: contextlib.nullcontext()


@contextlib.contextmanager
def decode_phase_timing():
    """Time the phases of every csrc decoder-layer call (DecodeStack, ImageStep) made inside the block:

        with cpu_step.decode_phase_timing() as t:
            engine.step()
        t["calls"], t["seconds"]  # layer calls timed; {phase: seconds summed over them}, phases in run order

    Each phase is its wall time on the critical path (taken by the team's thread 0 after the phase's barrier):
    layer_setup (the call's start to the first phase: buffers, attention plan, the OpenMP team's start),
    input_norm, qkv_proj, rope_kv_store, attention, pack_o, o_proj, residual_post_norm, gate_up_proj, silu_mul,
    down_proj, residual. Process-wide: calls from other threads inside the block are counted too."""
    ext = cpu_ops._ext()
    names = [ext.decode_phase_name(i) for i in range(ext.decode_phase_count())]
    buf = torch.zeros(len(names), dtype=torch.float64)
    ext.decode_phase_read(buf.data_ptr(), True)  # drop anything timed before
    result = {"calls": 0, "seconds": {}}
    ext.decode_phase_timing(True)
    try:
        yield result
    finally:
        ext.decode_phase_timing(False)
        result["calls"] = ext.decode_phase_read(buf.data_ptr(), True)
        result["seconds"] = dict(zip(names, buf.tolist()))


def decode_layer(h, in_norm, qkv, o_proj, post_norm, gate_up, down, k_cache, v_cache, slot_mapping, block_tables,
                 context_lens, cos, sin, eps: float, packed: bool | None = False) -> None:
    """One decoder layer (a DecodeStack of one, see there): h [R, C] updated in place."""
    DecodeStack([(in_norm, qkv, o_proj, post_norm, gate_up, down)], [(k_cache, v_cache)], eps, packed=packed)(
        h, slot_mapping, block_tables, context_lens, cos, sin)

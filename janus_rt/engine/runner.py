"""Model runner: turns scheduled rows into model inputs over the paged KV cache and runs the forward.

`PrefillKV` and `DecodeKV` are the `kv` objects the LLM's attention layers call (`kv.attend(layer, q, k, v)`, and
`kv.attend_rope(layer, q, k, v, positions, theta)` for decode, which rotates q and k itself): both write the new
K/V rows into the paged cache by slot; prefill attends within each packed sequence, decode attends one query per
row over its block table.
"""
from __future__ import annotations

import warnings

import torch

from janus_rt import ops
from janus_rt.engine import cpu_decode
from janus_rt.engine.kv_cache import KVCache


class PrefillKV:
    def __init__(self, cache: KVCache, slot_mapping, cu_seqlens, max_seqlen: int):
        self.cache, self.slot_mapping = cache, slot_mapping  # [total]
        self.cu_seqlens, self.max_seqlen = cu_seqlens, max_seqlen  # int32 [n + 1]

    def attend(self, layer: int, q, k, v):
        # q, k, v: [1, total, H, D] (all packed sequences start at position 0)
        if self.cache.quantized:  # int8: quantized rows and scales (the attention below uses k, v as they are)
            self.cache.store(layer, self.slot_mapping, k[0], v[0])
        else:
            ops.kv_store(k[0], v[0], self.cache.k_cache(layer), self.cache.v_cache(layer), self.slot_mapping)
        return ops.attention_varlen(q[0], k[0], v[0], self.cu_seqlens, self.max_seqlen, causal=True)[None]


class DecodeKV:
    def __init__(self, cache: KVCache, slot_mapping, block_tables, context_lens):
        self.cache, self.slot_mapping = cache, slot_mapping  # [R]
        self.block_tables, self.context_lens = block_tables, context_lens  # int32 [R, max_blocks], [R]

    def attend_rope(self, layer: int, q, k, v, positions, theta: float):
        # q, k, v: [R, 1, H, D], q and k not yet rotated (positions [R, 1]): RoPE and the KV store as one op (one
        # launch on the triton backend), then paged attention
        kc, vc = self.cache.k_cache(layer), self.cache.v_cache(layer)
        if self.cache.quantized:  # int8 cache: RoPE, the quantized store, attention over int8 rows and scales
            q, k = ops.rope(q[:, 0], k[:, 0], positions[:, 0], theta)
            self.cache.store(layer, self.slot_mapping, k, v[:, 0].contiguous())
            return ops.paged_decode_attention(q, kc, vc, self.block_tables, self.context_lens,
                                              self.cache.k_scale(layer), self.cache.v_scale(layer))[:, None]
        q = ops.rope_kv_store(q[:, 0], k[:, 0], v[:, 0], positions[:, 0], theta, kc, vc, self.slot_mapping)
        return ops.paged_decode_attention(q, kc, vc, self.block_tables, self.context_lens)[:, None]


class ModelRunner:
    def __init__(self, model, cache: KVCache, backend: str, cuda_graphs: bool = False, max_model_len: int = 4096):
        cfg = model.cfg.llm
        if cfg.num_kv_heads != cfg.num_heads:
            raise ValueError("the paged engine supports multi-head attention (Janus-Pro); this model uses GQA")
        self.model, self.cache, self.backend = model, cache, backend
        self.device = cache.device
        self.graphs: dict[int, tuple] = {}
        self.max_blocks = -(-max_model_len // cache.block_size)
        # cpu backend: one csrc call per layer (engine/cpu_decode.py) where supported (measured faster at every
        # shape and row count tried, RESULTS.md); set fused_cpu_decode = False to force the layer-by-layer ops path
        supported = backend == "cpu" and cpu_decode.supported(model, cache)
        self.cpu_decoder = cpu_decode.CpuDecoder(model, cache, max_model_len) if supported else None
        self.fused_cpu_decode = supported
        self.image_graphs: dict[int, tuple] = {}
        if cuda_graphs and self.device.type == "cuda" and backend != "triton":
            # the torch backend's reference ops read tensors on the host (nonzero, int(context_lens[b])), which a
            # capture forbids
            warnings.warn(f"cuda_graphs needs the triton backend, not {backend!r}: decoding without graphs")
        elif cuda_graphs and self.device.type == "cuda":
            with torch.cuda.device(self.device):  # capture on the model's GPU, not the current one
                self.capture_cudagraphs()
                try:
                    self.capture_image_step_graphs()
                except Exception as e:  # noqa: BLE001 - an optional speed-up: the one-step graphs above still serve
                    torch.cuda.synchronize()  # a sticky device error (no fallback can run after it) raises here
                    warnings.warn(f"multi-step image graphs not captured ({e}); image rows decode one step per replay")
                    self.image_graphs = {}

    def _i32(self, x):
        return torch.tensor(x, dtype=torch.int32, device=self.device)

    def _i64(self, x):
        return torch.tensor(x, dtype=torch.int64, device=self.device)

    @torch.inference_mode()
    def prefill(self, embeds: list[torch.Tensor], slots: list[list[int]]) -> torch.Tensor:
        """embeds: one [T_i, C] per sequence; slots: their cache slots -> last hidden state per sequence [n, C]."""
        lens = [e.shape[0] for e in embeds]
        x = torch.cat(embeds)[None]  # [1, total, C]
        positions = torch.cat([torch.arange(n, device=self.device) for n in lens])[None]
        cu = torch.tensor([0] + lens, device=self.device).cumsum(0).to(torch.int32)
        kv = PrefillKV(self.cache, self._i64([s for row in slots for s in row]), cu, max(lens))
        with ops.use_backend(self.backend):
            h = self.model.llm(x, positions, kv)[0]  # [total, C]
        return h[cu[1:].long() - 1]

    @torch.inference_mode()
    def decode(self, embeds, positions: list[int], slots: list[int], tables: list[list[int]]) -> torch.Tensor:
        """One token per row. embeds: [R, C] -> last hidden state [R, C]."""
        r = embeds.shape[0]
        if self.graphs and r <= max(self.graphs) and max(len(t) for t in tables) <= self.max_blocks:
            return self._replay(embeds, positions, slots, tables)
        width = max(len(t) for t in tables)
        bt = self._i32([t + [0] * (width - len(t)) for t in tables])
        if self.uses_cpu_decoder():
            return self.cpu_decoder(embeds, self._i64(positions), self._i64(slots), bt,
                                    self._i32([p + 1 for p in positions]))
        kv = DecodeKV(self.cache, self._i64(slots), bt, self._i32([p + 1 for p in positions]))
        with ops.use_backend(self.backend), ops.batch_invariant():  # a row's result whatever rows are beside it
            return self.model.llm(embeds[:, None], self._i64(positions)[:, None], kv)[:, 0]

    def gen_head(self, h):
        """The gen head of the decode step's image rows: the CPU decoder's (packed weights) when it runs, else the
        model's (in batch-invariant row pieces)."""
        if self.uses_cpu_decoder():
            return self.cpu_decoder.gen_head(h)
        with ops.batch_invariant():
            return self.model.gen_head(h)

    def gen_embeds(self, tokens):
        """LLM inputs of image tokens int64 [n] -> [n, C]: the CPU decoder's (packed aligner) when it runs, else the
        model's (in batch-invariant row pieces)."""
        if self.uses_cpu_decoder():
            return self.cpu_decoder.gen_embeds(tokens)
        with ops.batch_invariant():
            return self.model.gen_embeds(tokens)

    def uses_cpu_decoder(self) -> bool:
        """Whether decode steps take the csrc decoder (else the layer-by-layer path)."""
        return self.fused_cpu_decode and self.cpu_decoder is not None

    # ---- CUDA graphs: the decode step captured once per batch-size bucket ------------------------------------
    BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

    def capture_cudagraphs(self, capture=None):
        """Record the decode step once per bucket of rows on fixed input buffers; decode() then replays the
        smallest bucket that holds a step's rows, the spare rows padded (slot -1: they write no K/V).
        capture(fn) -> (replay, out): records fn's work once and returns a function that re-runs it on the
        same buffers, and fn's output buffer. The default is a CUDA graph; tests pass an eager stand-in to check
        the buffer and padding bookkeeping on the CPU."""
        capture = capture or _cuda_graph_capture
        c = self.model.cfg.llm.hidden_size
        dev = self.device
        for r in self.BUCKETS:
            static = dict(
                embeds=torch.zeros(r, c, dtype=self.model.dtype, device=dev),
                positions=torch.zeros(r, dtype=torch.int64, device=dev),
                slots=torch.full((r,), -1, dtype=torch.int64, device=dev),  # -1: padding rows write nothing
                tables=torch.zeros(r, self.max_blocks, dtype=torch.int32, device=dev),
                lens=torch.ones(r, dtype=torch.int32, device=dev),
            )
            kv = DecodeKV(self.cache, static["slots"], static["tables"], static["lens"])

            def run(static=static, kv=kv):
                with torch.inference_mode(), ops.use_backend(self.backend):
                    return self.model.llm(static["embeds"][:, None], static["positions"][:, None], kv)[:, 0]

            replay, out = capture(run)
            self.graphs[r] = (replay, static, out)

    # ---- multi-step image graphs: IMAGE_STEPS whole decode steps per replay, tokens fed back on the device ------
    IMAGE_STEPS = 8

    def capture_image_step_graphs(self, capture=None, steps: int | None = None):
        """Record, per even bucket of rows (2 rows per image: cond, uncond), `steps` whole decode steps of a batch of
        image rows: embed each image's last token, the LLM step over the paged cache, the gen head, CFG mix +
        sampling, the sampled tokens fed to the next step on the device. The host then syncs once per `steps`
        tokens instead of once per token, and nothing of a step runs outside a graph. capture as in
        capture_cudagraphs. Inputs go into static buffers at replay (image_steps); padding rows write no K/V."""
        capture = capture or _cuda_graph_capture
        k = steps or self.IMAGE_STEPS
        dev, i64 = self.device, torch.int64
        for r in self.BUCKETS:
            if r < 2 or r % 2:
                continue
            m = r // 2  # images
            st = dict(
                tok=torch.zeros(m, dtype=i64, device=dev),  # each image's last token
                embed=torch.zeros(r, dtype=i64, device=dev),  # row -> its image
                cond=torch.arange(m, dtype=i64, device=dev), uncond=torch.arange(m, 2 * m, dtype=i64, device=dev),
                positions=torch.zeros(k, r, dtype=i64, device=dev),
                slots=torch.full((k, r), -1, dtype=i64, device=dev),  # -1: padding rows write nothing
                lens=torch.ones(k, r, dtype=torch.int32, device=dev),
                tables=torch.zeros(r, self.max_blocks, dtype=torch.int32, device=dev),
                seeds=torch.zeros(k, m, dtype=i64, device=dev),
                cfg_weight=torch.ones(m, device=dev), temperature=torch.ones(m, device=dev),
                top_k=torch.zeros(m, dtype=i64, device=dev), top_p=torch.ones(m, device=dev),
                greedy=torch.ones(m, dtype=torch.bool, device=dev),
                out=torch.zeros(k, m, dtype=i64, device=dev),  # [step, image] sampled tokens
            )

            def run(st=st, k=k):
                model = self.model
                with torch.inference_mode(), ops.use_backend(self.backend):
                    for j in range(k):
                        x = model.gen_embeds(st["tok"]).index_select(0, st["embed"])  # [r, C]
                        kv = DecodeKV(self.cache, st["slots"][j], st["tables"], st["lens"][j])
                        h = model.llm(x[:, None], st["positions"][j][:, None], kv)[:, 0]
                        logits = model.gen_head(h).float()  # [r, V]
                        tok = ops.cfg_sample(logits.index_select(0, st["cond"]), logits.index_select(0, st["uncond"]),
                                             st["cfg_weight"], st["temperature"], st["top_k"], st["top_p"],
                                             st["seeds"][j], st["greedy"])  # [m]
                        st["out"][j].copy_(tok)
                        st["tok"].copy_(tok)
                return st["out"]

            replay, _ = capture(run)
            self.image_graphs[r] = (replay, st, k)

    def image_steps_possible(self, rows: int, last_position: int) -> int:
        """The steps per replay of the multi-step image graph that holds `rows` rows up to `last_position`, 0 if none
        does."""
        bucket = next((b for b in sorted(self.image_graphs) if b >= rows), None)
        if bucket is None or last_position // self.cache.block_size >= self.max_blocks:
            return 0
        return self.image_graphs[bucket][2]

    @torch.inference_mode()
    def image_steps(self, image_tok, embed_rows, positions, slots, tables, cond_rows, uncond_rows, params, seeds):
        """k decode steps of a batch of image rows in one graph replay (k = image_steps_possible's).
        image_tok: each image's last token (m); embed_rows, cond_rows, uncond_rows: device int64 [R], [m], [m] (the
        engine's _image_rows); positions, slots: k lists of R (step j's); tables: R block tables holding all k
        steps; params: per-image device tensors cfg_weight, temperature, top_k, top_p, greedy [m]; seeds: k lists
        of m. -> k lists of m tokens."""
        r, m = len(slots[0]), len(image_tok)
        bucket = next(b for b in sorted(self.image_graphs) if b >= r)
        replay, st, k = self.image_graphs[bucket]
        if len(slots) != k:
            raise ValueError(f"image_steps: this graph runs {k} steps, got inputs for {len(slots)}")
        pad = bucket - r
        pos = torch.tensor([p + [0] * pad for p in positions], dtype=torch.int64)  # [k, bucket]
        ints = torch.stack([pos, torch.tensor([s + [-1] * pad for s in slots], dtype=torch.int64)])
        lens = (pos + 1).to(torch.int32)
        lens[:, r:] = 1  # padding rows: context 1 (any valid block), no K/V written
        tab = torch.zeros(bucket, self.max_blocks, dtype=torch.int32)
        for i, t in enumerate(tables):
            tab[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
        seed = torch.zeros(k, bucket // 2, dtype=torch.int64)
        seed[:, :m] = torch.tensor(seeds, dtype=torch.int64)
        st["tok"][:m].copy_(torch.tensor(image_tok, dtype=torch.int64))
        st["embed"].zero_()[:r].copy_(embed_rows)
        st["cond"][:m].copy_(cond_rows)
        st["uncond"][:m].copy_(uncond_rows)
        st["cond"][m:] = 0  # padding images: sampled from row 0, and dropped
        st["uncond"][m:] = 0
        for name in ("cfg_weight", "temperature", "top_k", "top_p", "greedy"):
            st[name][:m].copy_(params[name])
        st["positions"].copy_(ints[0])
        st["slots"].copy_(ints[1])
        st["lens"].copy_(lens)
        st["tables"].copy_(tab)
        st["seeds"].copy_(seed)
        replay()
        return st["out"][:, :m].tolist()

    def _replay(self, embeds, positions, slots, tables):
        r = embeds.shape[0]
        bucket = next(b for b in sorted(self.graphs) if b >= r)
        replay, st, out = self.graphs[bucket]
        # The integer inputs are assembled on the host and copied over in four transfers, not one per row.
        pos_slot = torch.tensor([positions + [0] * (bucket - r), slots + [-1] * (bucket - r)], dtype=torch.int64)
        lens = torch.ones(bucket, dtype=torch.int32)  # padding rows: context 1 (any valid block), no K/V written
        lens[:r] = torch.tensor(positions, dtype=torch.int32) + 1
        tab = torch.zeros(bucket, self.max_blocks, dtype=torch.int32)
        for i, t in enumerate(tables):
            tab[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
        st["embeds"][:r].copy_(embeds)
        st["positions"].copy_(pos_slot[0])
        st["slots"].copy_(pos_slot[1])
        st["lens"].copy_(lens)
        st["tables"].copy_(tab)
        replay()
        return out[:r].clone()


def _cuda_graph_capture(fn):
    # warm-up on a side stream, as torch's CUDA-graph notes ask: Triton compiles and cuBLAS sets up its handles and
    # workspaces outside the capture (which runs on a stream of its own)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    return g.replay, out

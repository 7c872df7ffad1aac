"""The CPU decode step: one csrc call per decoder layer (csrc/decode_layer.cpp through cpu_step.DecodeStack).

On the cpu backend the layer-by-layer path runs ~15 small torch ops and five csrc calls per layer, each its own
interpreter round trip and OpenMP fork/join; on a 2-core CPU that overhead was as large as the weight reads of
the small model's step. `decode_layer` does norm, QKV, RoPE, KV store, paged attention, output projection and
the SwiGLU MLP for all rows in one parallel region, with the torch path's rounding points, so the two paths give
the same hidden states up to summation order (tests/test_cpu_decode.py). For a batch of image rows the whole step
(embedding, layers, gen head, CFG + sampling) runs as csrc calls on held buffers, no torch op per step
(`CpuDecoder.image_step`, cpu_step.ImageStep): bit-identical to the op-by-op step, ~1 ms less host time per step at
the small benchmark shape.
"""
from __future__ import annotations

import torch

from janus_rt import cpu_ops, cpu_step, ops
from janus_rt.errors import env_switch
from janus_rt.models.packed_linear import lm_head_packable


def supported(model, cache) -> bool:
    """fp32 or bf16 MHA model on the CPU, cache in the model's dtype (or int8), extension built; and the csrc GEMVs
    are the faster projections here (cpu_ops.torch_matmul_preferred), or the model's weights are packed for them."""
    from janus_rt.models.packed_linear import is_onednn_packed, is_packed

    c = model.cfg.llm
    return (cpu_ops.available() and model.device.type == "cpu" and model.dtype in (torch.float32, torch.bfloat16)
            and (cache.dtype == model.dtype or cache.quantized) and c.num_kv_heads == c.num_heads
            and not is_onednn_packed(model)
            and (is_packed(model) or not cpu_ops.torch_matmul_preferred(model.dtype, c.hidden_size)))


def packed_setting() -> bool | None:
    """JANUS_RT_PACKED: "1" = pack the decoder weights for the packed GEMV (error where impossible), "0" =
    never, unset or "auto" = when possible and memory allows (cpu_step.DecodeStack)."""
    v = env_switch("JANUS_RT_PACKED")
    return {"0": False, "1": True}.get(v)


def pack_in_place(model, always: bool = False, int8: bool | str = False) -> str | None:
    """For callers that own `model` (the CLI): hold its LLM projections only in the packed GEMV's layout
    (Janus.pack_for_cpu_) instead of letting the engine copy them, when the engine would run the packed GEMV
    (CPU, this build and dtype have it, JANUS_RT_PACKED not 0) and either `always` or the copy would not fit
    (cpu_ops.packed_copy_fits, DecodeStack's rule). int8 (True or "weights"; "w8a8"): quantize them to int8 in place,
    always (UsageError saying why where it cannot). Returns a line saying what it did, or None."""
    from janus_rt.models.packed_linear import (PROJECTIONS, can_pack, can_quantize, int8_heads, int8_kind, int8_mode,
                                               is_onednn_packed, is_packed, onednn_available, onednn_pack_llm_,
                                               packed_nbytes, packed_weight_nbytes)

    mode = int8_mode(int8)
    if mode:
        from janus_rt.errors import UsageError

        flag = "--int8" if mode == "weights" else "--int8 w8a8"
        why = can_quantize(model, mode) or can_pack(model)
        if not why and packed_setting() is False:
            why = "JANUS_RT_PACKED=0 turns off the packed GEMVs, which int8 weights run on"
        if not why and (is_onednn_packed(model) or (is_packed(model) and int8_kind(model) != mode)):
            why = "the projections are already held in another layout (in place); load the model again"
        if why:
            raise UsageError(f"{flag}: {why}")
        if int8_kind(model) == mode:
            return None
        heads = int8_heads(model, mode)  # held the same way
        before = (sum(getattr(getattr(l, part), name).weight.numel() for l in model.llm.layers
                      for part, name in PROJECTIONS)
                  + sum(getattr(parent, name).weight.numel() for _, parent, name in heads)) * model.dtype.itemsize
        names = {"lm_head": "LM head", "gen_head": "gen head", "gen_aligner": "gen aligner"}
        parts = ["the LLM's projections"] + list(dict.fromkeys(names[w.split(".")[0]] for w, *_ in heads))
        what = " and ".join(filter(None, [", ".join(parts[:-1]), parts[-1]]))
        try:
            model.pack_for_cpu_(int8=mode)
        except ValueError as e:  # what the checks above cannot see: a weight that is not finite
            raise UsageError(f"{flag}: {e}") from None
        after = packed_weight_nbytes(model)  # (all it holds is int8 now: the projections and those heads)
        size = lambda b: f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"
        if mode == "w8a8":
            route = "AMX-INT8 tiles from 4 rows" if cpu_ops.amx_w8a8_available() else "AVX512-VNNI"
            return (f"quantized {what} in place to int8 with per-row scales ({size(before)} -> "
                    f"{size(after)}), and each GEMV rounds its activations to int8 per row and group of "
                    f"{cpu_ops.W8A8_GROUP} (W8A8, {route}): both roundings change the results; the model is now "
                    "for CPU inference only")
        slower = ("" if cpu_ops.amx_available() else "; the int8 GEMV runs without AMX here (none on this CPU, or "
                  "turned off): it widens to bf16 in vector registers, measured slower than bf16 weights on a Zen 5 "
                  "host (bench/RESULTS.md), so int8 saves memory here, not time (--int8 w8a8 is faster there)")
        return (f"quantized {what} in place to weight-only int8 with per-row scales ({size(before)} -> "
                f"{size(after)}; activations stay bf16; the model is now for CPU inference only{slower})")

    if model.device.type != "cpu" or packed_setting() is False or is_packed(model) or is_onednn_packed(model):
        return None
    if packed_setting() is None and cpu_ops.torch_matmul_preferred(model.dtype, model.cfg.llm.hidden_size):
        # torch's matmul is the faster path here: its weights in oneDNN's layout, where the caller owns the model
        if not always or not onednn_available(model):
            return None
        onednn_pack_llm_(model)
        return ("prepacked the LLM's projections in place for torch's oneDNN matmul (this CPU has AMX-BF16; the "
                "model is now for CPU inference only)")
    if can_pack(model):
        return None
    need = packed_nbytes(model)
    fits = cpu_ops.packed_copy_fits(need)
    if fits and not always:
        return None
    model.pack_for_cpu_()
    size = f"{need / 2**30:.1f} GiB" if need >= 2**30 else f"{need / 2**20:.1f} MiB"
    why = f"saves a {size} copy" if fits else f"a {size} copy would not fit in half the free memory"
    return (f"packed the LLM's projections in place for the CPU's packed GEMV ({why}; the model is now for CPU "
            "inference only)")


class CpuDecoder:
    """The LLM forward for one new token per row over the engine's paged cache, on the CPU."""

    def __init__(self, model, cache, max_positions: int = 4096):
        llm = model.llm
        self.model, self.cfg = model, model.cfg.llm
        # fp32 rotary tables of positions [0, max_positions), computed once: ops.rope_tables is elementwise, so a
        # row of these equals what it gives for that position alone (~8 small torch ops a step saved)
        self.cos, self.sin = self._rope(torch.arange(max_positions))
        weights = [(l.input_norm.weight, l.attn.qkv_proj.weight, l.attn.o_proj.weight, l.post_attn_norm.weight,
                    l.mlp.gate_up_proj.weight, l.mlp.down_proj.weight) for l in llm.layers]
        caches = [(cache.k_cache(i), cache.v_cache(i)) + ((cache.k_scale(i), cache.v_scale(i)) if cache.quantized
                                                           else ()) for i in range(len(llm.layers))]
        with torch.inference_mode():
            raw = lambda w: w.detach() if isinstance(w, torch.Tensor) else w  # (PackedWeight: pack_for_cpu_)
            self.stack = cpu_step.DecodeStack([tuple(raw(w) for w in ws) for ws in weights], caches,
                                              llm.layers[0].input_norm.eps, llm.norm.weight.detach(), llm.norm.eps,
                                              packed=packed_setting())

        # the gen head (Linear -> GELU -> Linear, ~3 % of the 1B step's weights) and the gen aligner (the image
        # token's embedding -> LLM input) packed alongside the decoder layers (or held int8 as they are)
        self.gen_head_packed = self._pack_adaptor(model.gen_head)
        self.gen_aligner_packed = self._pack_adaptor(model.gen_aligner)
        # the whole decode step of image rows in csrc calls (cpu_step.ImageStep), where the adaptors run alongside
        self.image_step_runner = None
        packed = self.gen_head_packed is not None and self.gen_aligner_packed is not None
        if packed == self.stack.packed:  # (not where a packed stack could not pack an adaptor: bf16, odd sizes)
            raw = lambda m: (m.fc1.weight.detach(), m.fc1.bias.detach(), m.fc2.weight.detach(), m.fc2.bias.detach())
            self.image_step_runner = cpu_step.ImageStep(
                self.stack, model.gen_embed.weight.detach(),
                self.gen_aligner_packed if packed else raw(model.gen_aligner),
                self.gen_head_packed if packed else raw(model.gen_head), self.cos, self.sin)

        # the LM head (text rows' logits: 102400 x 2048 at 1B, ~15 % of an understanding decode step's bytes) as a
        # packed copy too, where it fits (a model packed in place holds it packed already): the packed GEMV reads
        # it at 32.7 GB/s against the unpacked GEMV's 25.7 on the AMX Xeon (one row, bf16, 2026-12-05)
        self.lm_head_packed = None
        w = model.lm_head.weight
        if (self.stack.packed and isinstance(w, torch.Tensor) and lm_head_packable(model)
                and cpu_ops.packed_copy_fits(cpu_ops.PackedWeight.nbytes(w.shape[0], w.shape[1], model.dtype))):
            with torch.inference_mode():
                self.lm_head_packed = cpu_ops.PackedWeight(w.detach())

    @torch.inference_mode()
    def lm_head(self, h):
        """model.lm_head's logits for h [R, C] (h's dtype), through the packed copy where there is one (the packed
        GEMV at any row count), else in pieces of at most ops.CPU_GEMV_MAX_ROWS rows, each through the csrc GEMV: a
        row's values then do not depend on how many rows the step has (above that count ops.linear takes torch's
        matmul, whose last bits differ)."""
        if self.lm_head_packed is not None:
            return ops.linear(h, self.lm_head_packed)
        return ops.in_row_pieces(lambda part: ops.linear(part, self.model.lm_head.weight), h, pad=False)

    def _pack_adaptor(self, m):
        """(fc1 packed, fc1 bias, fc2 packed, fc2 bias) of a Linear -> GELU -> Linear adaptor, or None when the
        stack runs unpacked (or bf16 with an odd in-size: bf16 packs k pairs). Held in place already (a model
        quantized in place: int8 or W8A8, packed_linear.int8_heads): those weights, no copy."""
        if isinstance(m.fc1.weight, cpu_ops.PackedWeight) and isinstance(m.fc2.weight, cpu_ops.PackedWeight):
            return (m.fc1.weight, m.fc1.bias.detach(), m.fc2.weight, m.fc2.bias.detach()) if self.stack.packed else None
        even = m.fc1.in_features % 2 == m.fc2.in_features % 2 == 0
        if not (self.stack.packed and (self.model.dtype == torch.float32 or even)):
            return None
        with torch.inference_mode():
            return (cpu_ops.PackedWeight(m.fc1.weight.detach()), m.fc1.bias.detach(),
                    cpu_ops.PackedWeight(m.fc2.weight.detach()), m.fc2.bias.detach())

    def _adaptor(self, module, packed, x):
        if x.dtype != self.model.dtype:
            return module(x)
        # (packed, or module's ops.mlp_gelu; an image's logits, and with 33 images or more its next K/V, changed
        # with the batch beside it before the pieces)
        run = module if packed is None else lambda part: cpu_ops.mlp_gelu(part.contiguous(), *packed)
        with ops._scope("janus_rt::cpu_mlp_gelu"):
            return ops.in_row_pieces(run, x, pad=False).to(x.dtype)  # (as lm_head's)

    @torch.inference_mode()
    def gen_head(self, h):
        """model.gen_head(h) [R, codebook] (h's dtype), through the packed GEMV when the stack packed its weights."""
        return self._adaptor(self.model.gen_head, self.gen_head_packed, h)

    def image_steps_possible(self, rows: int, last_position: int) -> bool:
        """Whether image_step(s) run a batch of `rows` rows whose last step is at `last_position`: an ImageStep was
        built, the GEMV path takes that many rows, and the rotary tables reach that position."""
        return (self.image_step_runner is not None and rows <= ops.CPU_GEMV_MAX_ROWS
                and last_position < self.cos.shape[0])

    def image_step(self, image_tokens, embed_rows, positions, slots, block_tables, cond_rows, uncond_rows, params,
                   seeds):
        """One decode step of image rows through cpu_step.ImageStep (its docstring has the arguments) -> the n new
        tokens, or None where it does not apply (image_steps_possible): the caller then runs the step op by op."""
        if not self.image_steps_possible(len(positions), max(positions)):
            return None
        return self.image_step_runner(image_tokens, embed_rows, positions, slots, block_tables, cond_rows,
                                      uncond_rows, params, seeds)

    def image_steps(self, image_tokens, embed_rows, positions, slots, block_tables, cond_rows, uncond_rows, params,
                    seeds):
        """k = len(slots) decode steps of image rows in one call (cpu_step.ImageStep.steps) -> k lists of n tokens.
        The caller checks image_steps_possible for the last step first."""
        return self.image_step_runner.steps(image_tokens, embed_rows, positions, slots, block_tables, cond_rows,
                                            uncond_rows, params, seeds)

    @torch.inference_mode()
    def gen_embeds(self, tokens):
        """model.gen_embeds(tokens) for image tokens int64 [n] -> [n, C], the aligner through the packed GEMV when
        the stack packed its weights."""
        return self._adaptor(self.model.gen_aligner, self.gen_aligner_packed, self.model.gen_embed(tokens))

    def _rope(self, positions):
        """fp32 [len, D] cos, sin of these positions, rounded to the model dtype first (as the torch path)."""
        c = self.cfg
        return tuple(t.float().contiguous() for t in ops.rope_tables(positions, c.head_dim, c.rope_theta,
                                                                    self.model.dtype))

    @torch.inference_mode()
    def __call__(self, embeds, positions, slot_mapping, block_tables, context_lens):
        """embeds [R, C]; positions, slot_mapping int64 [R]; block_tables int32 [R, max_blocks]; context_lens
        int32 [R] -> final-normed hidden states [R, C]."""
        h = embeds.to(self.model.dtype).contiguous().clone()  # the residual stream, updated in place layer by layer
        if int(positions.max()) < self.cos.shape[0]:
            cos, sin = self.cos.index_select(0, positions), self.sin.index_select(0, positions)
        else:
            cos, sin = self._rope(positions)
        out = torch.empty_like(h)
        with ops._scope("janus_rt::cpu_decode_layers"):
            self.stack(h, slot_mapping, block_tables, context_lens, cos, sin, out)  # out = the final norm of h
        return out

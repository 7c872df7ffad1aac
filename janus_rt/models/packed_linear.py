"""Inference on the CPU with the decoder's projections held once, in the packed GEMV's layout.

The CPU decode step reads the LLM's four projections per layer (qkv, o, gate_up, down: ~85 % of the 1B LLM's weight
bytes) through csrc/packed_gemv.h, whose strip layout is a copy of each weight. By default the engine makes that copy
beside the model's own [N, K] tensors when it fits in half of the free memory (cpu_step.DecodeStack), which doubles
those weights in memory (+2.4 GB at Janus-Pro-1B in bf16, +11.5 GB at 7B: more than a 24 GB machine has left after
the model, so 7B fell back to the slower unpacked GEMV). `pack_llm_` replaces the originals instead: each projection
becomes a `PackedLinear` holding only the packed copy, and every path that multiplies by it (prefill, the layer-by-
layer decode, the csrc decode step) runs the packed GEMV. In place and one way: the model is then for inference on
the CPU only (no gradients, no state_dict of those weights, no move to another device).

`pack_llm_(model, int8=True)` holds those four projections as weight-only int8 instead (`Int8Linear`: symmetric
per-output-row scales, cpu_ops.quantize_int8; bf16 activations as before): half the bytes each decode step streams and
half the memory, at the price of the quantization error (no longer the checkpoint's exact weights).
`pack_llm_(model, int8="w8a8")` holds the same int8 weights for the W8A8 GEMV (`W8A8Linear`, cpu_ops.W8A8Weight):
each call also rounds x to int8 per row and group of 512 columns and multiplies int8 by int8 (AVX512-VNNI), faster
where the decode step is bound by multiplies (many rows, no AMX), at x's rounding on top of the weights'.
Either int8 mode holds the LM head (untied) and the generation adaptors (gen head, gen aligner: Linear -> GELU ->
Linear, biases kept; weight-only int8: those whose in-features are even) the same way (int8_heads): at 1B the LM
head is 420 MB of bf16 an understanding decode step reads for one row, and the gen head 75 MB of every image step.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from janus_rt import cpu_ops, ops

PROJECTIONS = (("attn", "qkv_proj"), ("attn", "o_proj"), ("mlp", "gate_up_proj"), ("mlp", "down_proj"))


class _HeldLinear(nn.Module):
    """An nn.Linear whose weight is held only as `hold(weight)` (a plain attribute, not a parameter), which
    ops.linear multiplies by: forward(x [..., in]) -> [..., out]; its bias (if any) kept as it was, a parameter."""

    hold = None  # the weight's holder class
    layout = ""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bias = linear.bias
        with torch.no_grad():
            self.weight = type(self).hold(linear.weight.detach())

    def forward(self, x):
        return ops.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{self.weight.dtype}, {self.layout}")


class PackedLinear(_HeldLinear):
    """An nn.Linear whose weight is only a cpu_ops.PackedWeight: x's dtype out (fp32 accumulation, bias added in
    fp32, rounded once, as the torch path's matmul)."""

    hold, layout = cpu_ops.PackedWeight, "packed"


class Int8Linear(PackedLinear):
    """An nn.Linear whose weight is only a cpu_ops.Int8Weight (per-row int8, bf16 x): x's dtype out."""

    hold, layout = cpu_ops.Int8Weight, "int8 packed"


class W8A8Linear(Int8Linear):
    """An Int8Linear whose weight is a cpu_ops.W8A8Weight (the same int8 weights; x quantized to int8 per row and
    group of 512 in each call): x's dtype out."""

    hold, layout = cpu_ops.W8A8Weight, "W8A8 packed"


INT8_MODES = ("weights", "w8a8")  # pack_llm_'s int8: weight-only int8, or int8 weights and activations


def int8_mode(int8) -> str | None:
    """pack_llm_'s int8 argument as None (not int8), "weights" (True too) or "w8a8"; ValueError otherwise."""
    if not int8:  # None, False (any false value, as before the modes)
        return None
    if not isinstance(int8, str):  # True (any true value but a string)
        return "weights"
    if int8 not in INT8_MODES:
        raise ValueError(f"int8 must be False, True, or one of {INT8_MODES}; got {int8!r}")
    return int8


def can_pack(model) -> str | None:
    """Why `model`'s LLM cannot be packed in place (None: it can)."""
    if model.device.type != "cpu":
        return f"the model is on {model.device}; packing is for the CPU's GEMV"
    if not cpu_ops.available():
        return "the C++ extension janus_rt._C is not built"
    if not cpu_ops.packed_available(model.dtype):
        return (f"no packed GEMV for {model.dtype} in this build (bf16 needs a CPU with AVX512_BF16; fp32 and bf16 "
                "are the packed dtypes)")
    c = model.cfg.llm
    if not cpu_ops.packable(model.dtype, c.hidden_size, c.intermediate_size, c.num_heads * c.head_dim):
        return "bf16 packing needs even in-features (k pairs)"
    return None


def _projections_are(model, cls) -> bool:
    return any(isinstance(getattr(getattr(l, part), name), cls) for l in model.llm.layers for part, name in PROJECTIONS)


def _replace_projections(model, cls):
    """Each decoder layer's still plain nn.Linear projections -> cls(linear), layer by layer (so at most one layer's
    four matrices exist twice at a time); returns the model."""
    for l in model.llm.layers:
        for part, name in PROJECTIONS:
            parent = getattr(l, part)
            if isinstance(getattr(parent, name), nn.Linear):
                setattr(parent, name, cls(getattr(parent, name)))
    return model


def is_packed(model) -> bool:
    """Whether the LLM's projections are PackedLinear (pack_llm_ ran; Int8Linear included)."""
    return _projections_are(model, PackedLinear)


def is_int8(model) -> bool:
    """Whether the LLM's projections are Int8Linear (pack_llm_(model, int8=True or "w8a8") ran)."""
    return _projections_are(model, Int8Linear)


def int8_kind(model) -> str | None:
    """How the LLM's projections are held int8: "weights" (Int8Linear), "w8a8" (W8A8Linear), or None."""
    return "w8a8" if _projections_are(model, W8A8Linear) else "weights" if is_int8(model) else None


def can_quantize(model, mode: str = "weights") -> str | None:
    """Why `model`'s LLM projections cannot be held as int8 for `mode` ("weights", "w8a8"; None: they can)."""
    if model.device.type != "cpu":
        return f"the model is on {model.device}; the int8 GEMV is the CPU's"
    if not cpu_ops.available():
        return "the C++ extension janus_rt._C is not built"
    if mode == "w8a8" and not cpu_ops.w8a8_available():
        return "this build has no W8A8 GEMV (it needs a CPU with AVX512_VNNI and AVX512_BF16)"
    if not cpu_ops.int8_available():
        return "this build has no int8 GEMV (it needs a CPU with AVX512_BF16)"
    if model.dtype != torch.bfloat16:
        return f"the int8 GEMV takes bf16 activations; the model is {model.dtype} (load it with --dtype bf16)"
    c = model.cfg.llm
    if mode == "weights" and ((c.hidden_size % 2) or (c.intermediate_size % 2) or (c.num_heads * c.head_dim) % 2):
        return "int8 weights need even in-features (k pairs)"
    return None


class OneDNNWeight:
    """A bf16 [N, K] weight held only in oneDNN's blocked layout for torch's CPU matmul
    (torch.ops.mkldnn._reorder_linear_weight): F.linear on a plain weight reorders it on every call, which on an AMX
    host cost 1.22x at 32 rows (bench/RESULTS.md, 2026-12-04). ops.linear(x, w) calls it (`held_for_linear`: any
    weight object that says so is called as w(x, bias)): the same values as F.linear."""

    held_for_linear = True

    def __init__(self, weight: torch.Tensor, batch_hint: int = 32):
        self.out_features, self.in_features = weight.shape
        self.dtype = weight.dtype
        self.data = torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint)

    def __call__(self, x, bias=None):
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, self.in_features), self.data, bias, "none", [], "")
        return y.reshape(*x.shape[:-1], self.out_features)

    def numel(self) -> int:
        return self.in_features * self.out_features


class OneDNNLinear(_HeldLinear):
    """A bias-free nn.Linear whose weight is a OneDNNWeight."""

    hold, layout = OneDNNWeight, "oneDNN blocked"


def onednn_available(model) -> bool:
    """Whether this torch build can hold `model`'s projections for oneDNN (bf16, CPU, the reorder op present)."""
    return (model.device.type == "cpu" and model.dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


@torch.no_grad()
def onednn_pack_llm_(model):
    """Replace each decoder layer's four projections by a OneDNNLinear, layer by layer (in place, one way, as
    pack_llm_); returns the model."""
    if not onednn_available(model):
        raise ValueError("cannot prepack for oneDNN: needs a bf16 model on the CPU and torch with mkldnn")
    return _replace_projections(model, OneDNNLinear)


def is_onednn_packed(model) -> bool:
    """Whether the LLM's projections are OneDNNLinear (onednn_pack_llm_ ran)."""
    return _projections_are(model, OneDNNLinear)


def packed_nbytes(model) -> int:
    """Bytes of the packed copies of the LLM's projections and (untied) LM head not yet packed: what copies beside
    the originals would take."""
    mods = [getattr(getattr(l, part), name) for l in model.llm.layers for part, name in PROJECTIONS]
    if lm_head_packable(model):
        mods.append(model.lm_head)
    return sum(cpu_ops.PackedWeight.nbytes(m.out_features, m.in_features, model.dtype) for m in mods
               if not isinstance(m, PackedLinear))


@torch.no_grad()
def pack_llm_(model, int8: bool | str = False):
    """Replace each decoder layer's qkv, o, gate_up and down projections of `model` (a Janus on the CPU) by a
    PackedLinear (int8 True or "weights": an Int8Linear; "w8a8": a W8A8Linear), layer by layer, so at most one
    layer's four matrices exist twice at a time, and the LM head too where it is its own weight (not tied to the
    embedding); with int8, the LM head and the generation adaptors held the same int8 way (int8_heads); returns the
    model. Raises ValueError (saying why) where it cannot; a no-op for what is already packed the same way."""
    mode = int8_mode(int8)
    why = can_pack(model) or (can_quantize(model, mode) if mode else None)
    if why:
        raise ValueError(f"cannot {'quantize' if mode else 'pack'} the model for the CPU: {why}")
    if (is_packed(model) and int8_kind(model) != mode) or is_onednn_packed(model):
        kind = int8_kind(model)
        held = ("for oneDNN" if is_onednn_packed(model) else "W8A8" if kind == "w8a8" else "int8" if kind
                else "packed bf16")
        raise ValueError(f"the LLM's projections are already held {held} (in place); load the model again")
    heads = int8_heads(model, mode) if mode else []
    if mode:  # every weight checked first: a bad one must not leave the model half quantized
        named = [(f"llm.layers.{i}.{part}.{name}", getattr(getattr(l, part), name))
                 for i, l in enumerate(model.llm.layers) for part, name in PROJECTIONS]
        for where, m in named + [(where, getattr(parent, name)) for where, parent, name in heads]:
            if isinstance(m, nn.Linear) and not bool(torch.isfinite(m.weight).all()):
                raise ValueError(f"cannot quantize the model: {where}.weight has inf or nan entries (int8 needs "
                                 "finite weights)")
    cls = {None: PackedLinear, "weights": Int8Linear, "w8a8": W8A8Linear}[mode]
    _replace_projections(model, cls)
    for _, parent, name in heads:  # int8: the LM head and the generation adaptors as the projections
        if isinstance(getattr(parent, name), nn.Linear):
            setattr(parent, name, cls(getattr(parent, name)))
    if lm_head_packable(model) and isinstance(model.lm_head, nn.Linear):
        model.lm_head = PackedLinear(model.lm_head)
    return model


GEN_ADAPTORS = ("gen_head", "gen_aligner")  # Linear -> GELU -> Linear, run on every image decode step


def int8_heads(model, mode: str) -> list[tuple[str, nn.Module, str]]:
    """(where, parent, attribute) of the linears an int8 mode holds beside the projections: the LM head where it
    can be held packed (lm_head_packable), and each generation adaptor's fc1 and fc2 where the mode takes both
    their in-features (weight-only int8: even ones; else that adaptor stays as it is)."""
    out = [("lm_head", model, "lm_head")] if lm_head_packable(model) else []
    for a in GEN_ADAPTORS:
        m = getattr(model, a)
        if mode == "w8a8" or (m.fc1.in_features % 2 == 0 and m.fc2.in_features % 2 == 0):
            out += [(f"{a}.fc1", m, "fc1"), (f"{a}.fc2", m, "fc2")]
    return out


def lm_head_packable(model) -> bool:
    """Whether the LM head can be held packed: its own bias-free weight (untied) whose in-features the packed GEMV
    takes (bf16: k pairs)."""
    head = model.lm_head
    return (not model.cfg.llm.tie_word_embeddings and getattr(head, "bias", None) is None
            and (model.dtype == torch.float32 or head.in_features % 2 == 0))


def packed_weight_numel(module) -> int:
    """Elements of the PackedLinear and OneDNNLinear weights under `module` (not in its parameters())."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, (PackedLinear, OneDNNLinear)))


def packed_weight_nbytes(module) -> int:
    """Bytes a decode step reads of those weights: their elements at the model dtype's size, Int8Linear's at one
    byte (its scales, 4 bytes a row, included; W8A8Linear's alike)."""
    return sum(m.weight.N * m.weight.K + 4 * m.weight.N if isinstance(m, Int8Linear) else
               m.weight.numel() * m.weight.dtype.itemsize
               for m in module.modules() if isinstance(m, (PackedLinear, OneDNNLinear)))


def require_unpacked(model, what: str) -> None:
    """Raise where `what` needs the [N, K] weights a packed model no longer has."""
    if is_packed(model) or is_onednn_packed(model):
        raise ValueError(f"{what} needs the model's own weights, but its LLM projections were packed for the CPU "
                         "(Janus.pack_for_cpu_); load the model again")

"""The packed training forward: a PackedBatch in, per-kind cross-entropy sums out.

Every document of a packed row gets its own embeddings (text tokens -> embed_tokens, generation-image codes ->
gen_embed -> gen_aligner, understanding placeholders -> SigLIP -> aligner), runs through the LLM with causal
attention that stops at document boundaries (`PackedAttention`), and is scored by the head its labels belong
to: text and answer targets through lm_head, image-code targets through gen_head. Both heads use a fused
linear cross-entropy, so the [tokens, vocab] logits never exist.

The forward returns *sums* per kind (t2i, und, text); the loop divides them by the token counts of the whole
optimizer step (every micro-batch on every rank), so grad accumulation and data parallelism give the same
gradient as one big batch.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from janus_rt import ops
from janus_rt.models.llm import _expand_kv
from janus_rt.train.data import IGNORE, KINDS
from janus_rt.train.packing import PackedBatch


# ---- op dispatch (the ops.py pattern, for the one training-only op) -------------------------------------------
def linear_cross_entropy(hidden, weight, targets, bias=None, reduction: str = "sum"):
    """cross_entropy(hidden @ weight.T + bias, targets) without the logits on the triton backend.

    hidden [N, H], weight [V, H], bias [V] | None, targets int64 [N] (IGNORE rows count for nothing).
    Under autocast all float inputs are cast to the autocast dtype first (the fused kernel wants one dtype).
    """
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        hidden, weight = hidden.to(dt), weight.to(dt)
        bias = None if bias is None else bias.to(dt)
    if ops.get_backend() == "triton":
        from janus_rt.kernels import linear_cross_entropy as fused

        return fused(hidden, weight, targets, bias=bias, ignore_index=IGNORE, reduction=reduction)
    logits = F.linear(hidden, weight, bias).float()  # [N, V]
    return F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction=reduction)


class PackedAttention:
    """The `kv` object the LLM's attention layers call: causal attention within each packed document.

    cu_seqlens: int32 [num_segments + 1] over the flattened B*L tokens (a row's padding tail is a segment too).
    """

    def __init__(self, cu_seqlens: torch.Tensor, max_seqlen: int):
        self.cu_seqlens, self.max_seqlen = cu_seqlens, max_seqlen

    def attend(self, layer_idx: int, q, k, v):
        # q: [B, L, H, D]; k, v: [B, L, Hkv, D] -> [B, L, H, D]
        b, t, h, d = q.shape
        k, v = _expand_kv(k, v, h)
        o = ops.attention_varlen(q.reshape(b * t, h, d), k.reshape(b * t, h, d), v.reshape(b * t, h, d),
                                 self.cu_seqlens, self.max_seqlen, causal=True)
        return o.view(b, t, h, d)


# ---- inputs -----------------------------------------------------------------------------------------------------
@dataclass
class MicroBatch:
    """A PackedBatch turned into index tensors, built on the CPU so the forward needs no host sync."""

    text_ids: torch.Tensor        # [B, L] int64: token ids, pad where the input is an image code
    positions: torch.Tensor       # [B, L] int64
    cu_seqlens: torch.Tensor      # int32 [S + 1]
    gen_rows: torch.Tensor        # [n_gen] int64: flat B*L indices of image-code inputs
    gen_ids: torch.Tensor         # [n_gen] int64: their codebook ids
    und_rows: torch.Tensor        # [n_img * N] int64: flat indices of understanding placeholders
    pixel_values: torch.Tensor | None  # [n_img, 3, S, S]
    loss_rows: list[torch.Tensor]      # per kind in KINDS: flat indices with a target (>= 1 row, see prepare)
    loss_labels: list[torch.Tensor]    # per kind: the targets (IGNORE for a placeholder row)
    max_seqlen: int
    counts: list[int]             # per kind: real target tokens
    num_tokens: int               # non-padding tokens

    def to(self, device) -> "MicroBatch":
        def move(v):
            if isinstance(v, list):
                return [move(t) for t in v]
            return v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v

        return MicroBatch(**{f.name: move(getattr(self, f.name)) for f in fields(self)})


def segment_kinds(batch: PackedBatch) -> torch.Tensor:
    """[num_segments] int64: index into KINDS of each segment's document, -1 for padding tails."""
    L = batch.input_ids.shape[1]
    seg_row = batch.cu_seqlens[:-1].long() // L  # segments never cross rows
    kinds = []
    for r, docs in enumerate(batch.docs):
        n = int((seg_row == r).sum())
        kinds += [KINDS.index(kind) for kind, _, _ in docs] + [-1] * (n - len(docs))
    return torch.tensor(kinds, dtype=torch.long)


def prepare(batch: PackedBatch, image_id: int, pad_id: int) -> MicroBatch:
    """PackedBatch -> MicroBatch. A kind without targets gets one IGNORE row, so both heads are always in the
    graph (a zero loss with a grad path: no rank skips a backward, no parameter depends on the data mix)."""
    ids, is_gen = batch.input_ids, batch.is_gen_image  # [B, L]
    tok_kind = segment_kinds(batch)[batch.segment_ids].flatten()  # [B*L]
    rows, labels, counts = [], [], []
    for k, kind in enumerate(KINDS):
        lab = (batch.image_labels if kind == "t2i" else batch.text_labels).flatten()  # [B*L]
        sel = ((lab != IGNORE) & (tok_kind == k)).nonzero().flatten()
        counts.append(sel.numel())
        if sel.numel() == 0:
            sel = torch.zeros(1, dtype=torch.long)  # row 0 with target IGNORE: loss 0, grads 0
        rows.append(sel)
        labels.append(lab[sel] if counts[-1] else torch.full((1,), IGNORE, dtype=torch.long))
    flat_gen = is_gen.flatten()
    return MicroBatch(
        text_ids=ids.masked_fill(is_gen, pad_id), positions=batch.positions, cu_seqlens=batch.cu_seqlens,
        gen_rows=flat_gen.nonzero().flatten(), gen_ids=ids.flatten()[flat_gen],
        und_rows=((ids == image_id) & ~is_gen).flatten().nonzero().flatten(), pixel_values=batch.pixel_values,
        loss_rows=rows, loss_labels=labels, max_seqlen=batch.max_seqlen, counts=counts,
        num_tokens=int((tok_kind >= 0).sum()))


# ---- forward ----------------------------------------------------------------------------------------------------
class PackedLM(nn.Module):
    """Janus behind one forward (what DDP and FSDP wrap): MicroBatch -> fp32 [len(KINDS)] CE sums per kind."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def embed(self, mb: MicroBatch) -> torch.Tensor:
        """[B, L, C] input embeddings with image codes and understanding features spliced in."""
        m = self.model
        b, L = mb.text_ids.shape
        x = m.llm.embed_tokens(mb.text_ids).flatten(0, 1)  # [B*L, C]
        dev = x.device.type
        if ops.get_backend() == "triton" and torch.is_autocast_enabled(dev):
            # the Triton norms take one dtype for x and the residual: the residual stream is bf16 here
            # (the torch backend keeps it fp32, as autocast does)
            x = x.to(torch.get_autocast_dtype(dev))
        if mb.gen_rows.numel():
            x = x.index_put((mb.gen_rows,), m.gen_embeds(mb.gen_ids).to(x.dtype))
        if mb.pixel_values is not None:
            feats = m.image_embeds(mb.pixel_values).flatten(0, 1)  # [n_img * N, C]
            if feats.shape[0] != mb.und_rows.numel():
                raise ValueError(f"{mb.und_rows.numel()} image placeholders but {mb.pixel_values.shape[0]} "
                                 f"image(s) give {feats.shape[0]} features")
            x = x.index_put((mb.und_rows,), feats.to(x.dtype))
        return x.view(b, L, -1)

    def hidden(self, mb: MicroBatch) -> torch.Tensor:
        """[B*L, C] final-normed hidden states of the packed rows."""
        x = self.embed(mb)
        return self.model.llm(x, mb.positions, PackedAttention(mb.cu_seqlens, mb.max_seqlen)).flatten(0, 1)

    def forward(self, mb: MicroBatch) -> torch.Tensor:
        m = self.model
        h = self.hidden(mb)  # [B*L, C]
        # Inputs this micro-batch lacks leave their adaptors out of the graph. Adding 0 * their weights gives
        # every trainable parameter a (zero) gradient on every rank, every step: DDP needs no unused-parameter
        # search, FSDP2 reduces the same tensors on all ranks, and AdamW's updates do not depend on the mix.
        idle = ([m.gen_embed, m.gen_aligner] if mb.gen_rows.numel() == 0 else []) + \
               ([m.vision, m.aligner] if mb.pixel_values is None else [])
        zero = sum((p.sum() * 0 for mod in idle for p in mod.parameters() if p.requires_grad), h.new_zeros(()))
        sums = []
        for kind, rows, labels in zip(KINDS, mb.loss_rows, mb.loss_labels):
            hk = h[rows]  # [n, C]
            if kind == "t2i":  # gen_head = fc1 -> GELU -> fc2; fc2 is fused into the loss
                z = F.gelu(F.linear(hk, m.gen_head.fc1.weight, m.gen_head.fc1.bias))
                sums.append(linear_cross_entropy(z, m.gen_head.fc2.weight, labels, m.gen_head.fc2.bias))
            else:
                sums.append(linear_cross_entropy(hk, m.lm_head.weight, labels))
        sums[0] = sums[0] + zero
        return torch.stack([s.float() for s in sums])  # [3]

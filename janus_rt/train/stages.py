"""Janus-Pro's three training stages as freeze presets.

    stage 1  adaptors and image head: aligner, gen_aligner, gen_embed, gen_head   (LLM, SigLIP, VQ frozen)
    stage 2  stage 1 + the LLM (embed_tokens, layers, norm) and lm_head            (SigLIP, VQ frozen)
    stage 3  supervised fine-tuning: everything but the VQ                          (VQ frozen)

The VQ tokenizer is never trained: its codes are the targets. Each stage also names a default data mix
(und : text : t2i). Stage 1 leaves text-only data out, since no stage-1 parameter can learn from it; stages 2
and 3 use Janus-Pro's stage-III mix 5 : 1 : 4 (the paper gives no separate stage-II ratio).
"""
from __future__ import annotations

import torch.nn as nn

# top-level Janus submodules trained in each stage
TRAINABLE = {
    1: ("aligner", "gen_aligner", "gen_embed", "gen_head"),
    2: ("aligner", "gen_aligner", "gen_embed", "gen_head", "llm", "lm_head"),
    3: ("aligner", "gen_aligner", "gen_embed", "gen_head", "llm", "lm_head", "vision"),
}
RATIOS = {
    1: {"und": 1, "text": 0, "t2i": 1},
    2: {"und": 5, "text": 1, "t2i": 4},
    3: {"und": 5, "text": 1, "t2i": 4},
}
ALWAYS_FROZEN = ("vq",)


def apply_stage(model: nn.Module, stage: int) -> list[str]:
    """Set requires_grad on every parameter of a Janus model for `stage`; returns the trainable names.

    Every top-level submodule must be listed as trainable or frozen somewhere, so a new one is never trained
    (or frozen) by accident. A tied lm_head shares embed_tokens' tensor; llm and lm_head are always trained
    together, so tying never conflicts.
    """
    if stage not in TRAINABLE:
        raise ValueError(f"stage must be one of {sorted(TRAINABLE)}, got {stage!r}")
    known = set(TRAINABLE[3]) | set(ALWAYS_FROZEN)
    children = {name for name, _ in model.named_children()}
    if children - known:
        raise ValueError(f"stage presets do not cover submodules {sorted(children - known)}")
    train = set(TRAINABLE[stage])
    for name, child in model.named_children():
        for p in child.parameters():
            p.requires_grad_(name in train)
    return [n for n, p in model.named_parameters() if p.requires_grad]

"""Linear -> GELU -> Linear adaptors: the understanding aligner, the gen_aligner, and the gen_head."""
from __future__ import annotations

import torch.nn as nn

from janus_rt import ops
from janus_rt.config import AdaptorConfig


class MlpGelu(nn.Module):
    def __init__(self, cfg: AdaptorConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.in_dim, cfg.hidden_dim)
        self.fc2 = nn.Linear(cfg.hidden_dim, cfg.out_dim)

    def forward(self, x):
        # x: [..., in_dim] -> [..., out_dim]
        return ops.mlp_gelu(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)

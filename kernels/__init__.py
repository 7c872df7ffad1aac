"""Triton kernels for Janus-Pro's hot ops (installed as janus_rt.kernels).

Each op lives in its own module with `<op>` (launcher), `_<op>_kernel` (@triton.jit) and `<op>_ref`
(the plain PyTorch reference that tests and benchmarks import).
"""
from .attention import flash_attention, flash_attention_ref, flash_attention_varlen, flash_attention_varlen_ref
from .paged_attention import paged_decode_attention, paged_decode_attention_ref
from .kv_store import kv_store, kv_store_ref
from .vq import vq_lookup, vq_lookup_ref, vq_nearest, vq_nearest_ref
from .sampling import cfg_sample, cfg_sample_ref, gumbel_ref
from .linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_ref
from .rms_norm import rms_norm, rms_norm_ref
from .rope import rope, rope_ref
from .rope_kv_store import rope_kv_store, rope_kv_store_ref
from .swiglu import swiglu, swiglu_ref
from .mlp import mlp_gelu, mlp_gelu_ref

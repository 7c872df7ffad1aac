"""The whole Janus-Pro model: understanding tower + aligner, LLM with two heads, generation adaptors, VQ.

Public contract (other suites call it exactly so):
    m = Janus.from_pretrained(path, device="cpu", dtype=torch.float32)   # transformers / official / janus_rt layout
    m = Janus.from_preset("tiny", seed=0, device="cpu", dtype=torch.float32)
    m.text_logits(input_ids[B,T], pixel_values=None | [B_img,3,S,S]) -> [B,T,vocab]
    m.image_logits(prompt_ids[B,T], image_tokens[B,N]) -> [B,N,codebook]
    m.decode_image_tokens(tokens[B,N]) -> [B,3,H,W]
    m.encode_images(pixels[B,3,H,W]) -> [B,N]
"""
from __future__ import annotations

import torch
import torch.nn as nn

from janus_rt.config import JanusConfig, preset
from janus_rt.models.adaptors import MlpGelu
from janus_rt.models.llm import LLM, RMSNorm
from janus_rt.models.siglip import SigLIP
from janus_rt.models.vq import VQModel


class Janus(nn.Module):
    def __init__(self, cfg: JanusConfig):
        super().__init__()
        self.cfg = cfg
        self.guidance_scale: float | None = None  # the CFG weight its checkpoint recommends (generation_config.json)
        self.vision = SigLIP(cfg.vision)
        self.aligner = MlpGelu(cfg.aligner)
        self.llm = LLM(cfg.llm)
        self.lm_head = nn.Linear(cfg.llm.hidden_size, cfg.llm.vocab_size, bias=False)
        self.tie_weights_()
        self.vq = VQModel(cfg.vq)
        self.gen_embed = nn.Embedding(cfg.vq.codebook_size, cfg.gen_embed_dim)
        self.gen_aligner = MlpGelu(cfg.gen_aligner)
        self.gen_head = MlpGelu(cfg.gen_head)

    # ---- construction ---------------------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, seed: int = 0, device="cpu", dtype=torch.float32) -> "Janus":
        """Random weights at a preset's shapes (`tiny`, `janus-pro-1b`, `janus-pro-7b`). Like from_config and
        from_pretrained, in eval mode with every parameter frozen (no autograd graph behind inference calls):
        training sets requires_grad on what it trains (train.stages.apply_stage, or requires_grad_(True))."""
        return cls.from_config(preset(name), seed=seed, device=device, dtype=dtype)

    @classmethod
    def from_config(cls, cfg: JanusConfig, seed: int = 0, device="cpu", dtype=torch.float32) -> "Janus":
        with torch.device("meta"):
            m = cls(cfg)
        # one allocation in the final dtype (a 7B model in bf16 would not fit a 24 GB machine as fp32 first); each
        # tensor's random values are made in fp32 and rounded once, the same values as materialising in fp32
        m = m.to(dtype=dtype).to_empty(device=device).tie_weights_()
        m.init_random_(seed)
        return m.eval().requires_grad_(False)

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype=torch.float32, progress: bool | None = None) -> "Janus":
        """Load a checkpoint folder in any supported layout (auto-detected); see janus_rt.loading (progress: its
        loading bar; None: for weights of 1 GiB or more)."""
        from janus_rt.loading import load_janus

        return load_janus(path, device=device, dtype=dtype, progress=progress)

    def tie_weights_(self) -> "Janus":
        """Share lm_head with the token embedding when the config ties them (re-run after to_empty/_apply)."""
        if self.cfg.llm.tie_word_embeddings:
            self.lm_head.weight = self.llm.embed_tokens.weight
        return self

    @torch.no_grad()
    def init_random_(self, seed: int = 0) -> "Janus":
        """Seeded random weights with every tensor perturbed (norm gains and biases too), so no path is trivial."""
        g = torch.Generator(device="cpu").manual_seed(seed)
        norms = (nn.LayerNorm, nn.GroupNorm, RMSNorm)
        params = [(mod, pname, p) for mod in self.modules() for pname, p in mod.named_parameters(recurse=False)]
        # the values are made in fp32 on the CPU, in place: straight into an fp32 CPU parameter, else into one scratch
        # buffer reused for every tensor (a fresh temporary per tensor faulted in 2-3x the model's bytes: the 1B
        # preset took 25 s in fp32, mostly in the kernel)
        in_place = [p.dtype == torch.float32 and p.device.type == "cpu" and p.is_contiguous() for _, _, p in params]
        scratch = torch.empty(max([p.numel() for (_, _, p), own in zip(params, in_place) if not own], default=0),
                              dtype=torch.float32)  # (not torch's default dtype, which a caller may have changed)
        for (mod, pname, p), own in zip(params, in_place):
            val = p.data if own else scratch[:p.numel()].view(p.shape)
            torch.randn(p.shape, generator=g, out=val)
            if isinstance(mod, norms) and pname == "weight":
                val.mul_(0.1).add_(1.0)  # LayerNorm / RMSNorm / GroupNorm gains
            elif pname == "bias" or p.dim() == 1:
                val.mul_(0.02)
            elif pname in ("codebook",) or mod is self.gen_embed:
                pass
            else:
                val.div_(p[0].numel() ** 0.5)  # fan-in scaling keeps activations O(1)
            if not own:
                p.copy_(val)  # rounded once to p's dtype
        return self

    # ---- embeddings / heads ---------------------------------------------------------------------------------
    def image_embeds(self, pixel_values):
        """pixel_values [B_img, 3, S, S] -> understanding embeddings [B_img, N, C]."""
        return self.aligner(self.vision(pixel_values))

    def gen_embeds(self, image_tokens):
        """image tokens int64 [...] -> LLM input embeddings [..., C] (gen_embed -> gen_aligner)."""
        return self.gen_aligner(self.gen_embed(image_tokens))

    def text_embeds(self, input_ids, pixel_values=None):
        """Token embeddings with understanding-image embeddings spliced in where input_ids == image_id."""
        embeds = self.llm.embed_tokens(input_ids)
        if pixel_values is None:
            return embeds
        mask = input_ids == self.cfg.tokens.image_id
        feats = self.image_embeds(pixel_values.to(embeds.dtype)).reshape(-1, embeds.shape[-1])
        if int(mask.sum()) != feats.shape[0]:
            raise ValueError(f"input_ids hold {int(mask.sum())} image placeholders but the {pixel_values.shape[0]} "
                             f"image(s) give {feats.shape[0]} embeddings")
        return embeds.masked_scatter(mask[..., None], feats.to(embeds.dtype))

    # ---- public API -----------------------------------------------------------------------------------------
    def text_logits(self, input_ids, pixel_values=None):
        """input_ids [B, T] (+ pixel_values [B_img, 3, S, S]) -> LM logits [B, T, vocab]."""
        return self.lm_head(self.llm(self.text_embeds(input_ids, pixel_values)))

    def image_logits(self, prompt_ids, image_tokens):
        """Teacher-forced gen-head logits: prompt_ids [B, T], image_tokens [B, N] -> [B, N, codebook];
        [:, i] predicts image_tokens[:, i] from the prompt and tokens < i."""
        t, n = prompt_ids.shape[1], image_tokens.shape[1]
        embeds = torch.cat([self.llm.embed_tokens(prompt_ids), self.gen_embeds(image_tokens[:, :-1])], dim=1)
        h = self.llm(embeds)
        return self.gen_head(h[:, t - 1 : t - 1 + n])

    def decode_image_tokens(self, tokens):
        """tokens int64 [B, N] -> pixels float [B, 3, H, W], roughly in [-1, 1]."""
        return self.vq.decode(tokens)

    def encode_images(self, pixels):
        """pixels [B, 3, H, W] in [-1, 1] -> tokens int64 [B, N] (official L2-normalised nearest code)."""
        return self.vq.encode(pixels)

    # ---- generation (the engine does the work; see janus_rt.engine) -----------------------------------------
    def generate_image_tokens(self, prompt_ids, n: int = 1, cfg_weight: float = 5.0, temperature: float = 1.0,
                              top_k=None, top_p=None, seed=None, greedy: bool = False, engine=None,
                              progress: bool = False):
        """prompt_ids [T] (BOS ... <begin_of_image>) -> image tokens int64 [n, num_image_tokens], with
        classifier-free guidance (unconditional row: every token but the first and last -> pad).
        engine: an Engine to run in (else a new one sized for this call; on the CPU making one packs the decoder
        weights, seconds at 1B: hold one engine for many calls)."""
        from janus_rt.engine import Engine, SamplingParams
        from janus_rt.errors import check_count

        n = check_count("n", n)  # (before an engine is sized from it)
        params = SamplingParams(cfg_weight=cfg_weight, temperature=temperature, top_k=top_k or 0,
                                top_p=1.0 if top_p is None else top_p, greedy=greedy, seed=seed)
        eng = engine or Engine.for_requests(self, [(len(torch.as_tensor(prompt_ids).flatten()), n)])
        req = eng.add_image_request(prompt_ids, n=n, params=params)
        eng.run(progress=progress)
        return torch.tensor(req.tokens, dtype=torch.long)

    def generate_text(self, prompt_ids, pixel_values=None, max_new_tokens: int = 256, greedy: bool = True,
                      temperature: float = 1.0, top_p=None, seed=None, engine=None) -> list[int]:
        """Answer tokens (up to and including EOS) for prompt_ids [T] with images spliced at placeholders.
        engine: as generate_image_tokens' (hold one for many questions)."""
        from janus_rt.engine import Engine, SamplingParams
        from janus_rt.errors import check_count

        max_new_tokens = check_count("max_new_tokens", max_new_tokens)  # (before an engine is sized from it)
        params = SamplingParams(temperature=temperature, top_p=1.0 if top_p is None else top_p, greedy=greedy,
                                seed=seed)
        t = len(torch.as_tensor(prompt_ids).flatten())
        eng = engine or Engine.for_requests(self, [(t + max_new_tokens, 0)])
        req = eng.add_text_request(prompt_ids, pixel_values, max_new_tokens=max_new_tokens, params=params)
        eng.run()
        return req.tokens[0]

    @property
    def device(self):
        return self.llm.embed_tokens.weight.device  # (a tensor even where pack_for_cpu_ packed the LM head)

    @property
    def dtype(self):
        return self.llm.embed_tokens.weight.dtype

    def num_parameters(self) -> int:
        """Weights and biases, shared ones once (packed projections included: pack_for_cpu_)."""
        from janus_rt.models.packed_linear import packed_weight_numel

        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values()) + packed_weight_numel(self)

    # ---- CPU inference ----------------------------------------------------------------------------------------
    def pack_for_cpu_(self, int8: bool | str = False) -> "Janus":
        """Hold the LLM's qkv, o, gate_up and down projections (and an untied LM head) only in the CPU packed
        GEMV's layout, in place of the originals (janus_rt.models.packed_linear): the CPU engine then runs its fast
        decode step without a second copy of those weights (-2.4 GB at Janus-Pro-1B bf16; what lets 7B run it on a
        24 GB machine), and a new engine no longer repacks them. Inference on the CPU only from then on (no
        training, saving, or move to a GPU). Raises ValueError where this build or dtype has no packed GEMV.
        int8: hold the four projections (and the LM head, gen head and gen aligner) as weight-only int8 with per-row
        scales instead (bf16 models; half the bytes a decode step streams, and the quantization's error);
        int8="w8a8": those int8 weights with x quantized to int8 per row and group of 512 in each GEMV (AVX512-VNNI;
        x's rounding on top). Returns self."""
        from janus_rt.models.packed_linear import pack_llm_

        return pack_llm_(self, int8=int8)

    @property
    def is_packed(self) -> bool:
        from janus_rt.models.packed_linear import is_packed

        return is_packed(self)

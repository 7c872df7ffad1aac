"""Janus-Pro configuration: small validated dataclasses, presets, and parsers for both checkpoint layouts.

Every dimension of a real checkpoint is read from its config.json (`JanusConfig.from_hf_dict` for the
transformers layout, `JanusConfig.from_official_dict` for DeepSeek's own); the presets only describe the published
shapes and the random-weight `tiny` models used by tests and the offline demo.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


class ConfigError(ValueError):
    """A config.json that janus_rt cannot interpret (unknown layout, missing or inconsistent fields)."""


@dataclass
class LLMConfig:
    """The DeepSeek-LLM (Llama-architecture) language model."""

    vocab_size: int = 102400
    hidden_size: int = 2048
    num_layers: int = 24
    num_heads: int = 16
    num_kv_heads: int = 16
    intermediate_size: int = 5632
    head_dim: int = 0  # 0 = hidden_size // num_heads
    rope_theta: float = 10000.0
    rms_eps: float = 1e-6
    max_position: int = 16384
    tie_word_embeddings: bool = False

    def __post_init__(self):
        if self.head_dim == 0:
            self.head_dim = self.hidden_size // max(self.num_heads, 1)
        _positive(self, "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                  "intermediate_size", "head_dim")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim {self.head_dim} must be even for rotary embeddings")


@dataclass
class SigLIPConfig:
    """SigLIP-L/16@384 understanding tower: no CLS token, output = final LayerNorm after the last block."""

    image_size: int = 384
    patch_size: int = 16
    width: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    mlp_dim: int = 4096
    ln_eps: float = 1e-6
    num_channels: int = 3

    def __post_init__(self):
        _positive(self, "image_size", "patch_size", "width", "num_layers", "num_heads", "mlp_dim")
        if self.width % self.num_heads:
            raise ConfigError(f"SigLIP width {self.width} is not divisible by num_heads {self.num_heads}")
        if self.image_size % self.patch_size:
            raise ConfigError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class VQConfig:
    """LlamaGen-style VQ-16 tokenizer: encoder / L2-normalised codebook / decoder.

    `num_res_blocks` is the encoder's per level; the decoder has one more per level (3 for VQ-16).
    """

    codebook_size: int = 16384
    codebook_dim: int = 8
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    z_channels: int = 256
    num_res_blocks: int = 2
    in_channels: int = 3
    out_channels: int = 3
    image_size: int = 384

    def __post_init__(self):
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        _positive(self, "codebook_size", "codebook_dim", "ch", "z_channels", "num_res_blocks", "image_size")
        for c in [self.ch * m for m in self.ch_mult]:
            if c % 32:
                raise ConfigError(f"VQ channel count {c} is not a multiple of 32 (GroupNorm(32))")
        if self.image_size % self.downsample:
            raise ConfigError(f"VQ image_size {self.image_size} is not a multiple of {self.downsample}")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def grid(self) -> int:
        return self.image_size // self.downsample

    @property
    def num_tokens(self) -> int:
        return self.grid**2


@dataclass
class AdaptorConfig:
    """Linear(in -> hidden) -> GELU -> Linear(hidden -> out): aligner, gen_aligner and gen_head."""

    in_dim: int
    hidden_dim: int
    out_dim: int

    def __post_init__(self):
        _positive(self, "in_dim", "hidden_dim", "out_dim")


@dataclass
class TokenConfig:
    """Special token ids (published Janus-Pro defaults; read per checkpoint where given)."""

    bos_id: int = 100000
    eos_id: int = 100001
    pad_id: int = 100015
    boi_id: int = 100016  # <begin_of_image>
    eoi_id: int = 100593  # <end_of_image>
    image_id: int = 100581  # <image_placeholder>


@dataclass
class JanusConfig:
    llm: LLMConfig = field(default_factory=LLMConfig)
    vision: SigLIPConfig = field(default_factory=SigLIPConfig)
    vq: VQConfig = field(default_factory=VQConfig)
    aligner: AdaptorConfig | None = None
    gen_aligner: AdaptorConfig | None = None
    gen_head: AdaptorConfig | None = None
    tokens: TokenConfig = field(default_factory=TokenConfig)
    gen_embed_dim: int = 8

    def __post_init__(self):
        d = self.llm.hidden_size
        if self.aligner is None:
            self.aligner = AdaptorConfig(self.vision.width, d, d)
        if self.gen_aligner is None:
            self.gen_aligner = AdaptorConfig(self.gen_embed_dim, d, d)
        if self.gen_head is None:
            self.gen_head = AdaptorConfig(d, d, self.vq.codebook_size)
        checks = [
            (self.aligner.in_dim == self.vision.width, "aligner input != SigLIP width"),
            (self.aligner.out_dim == d, "aligner output != LLM hidden size"),
            (self.gen_aligner.in_dim == self.gen_embed_dim, "gen_aligner input != gen_embed dim"),
            (self.gen_aligner.out_dim == d, "gen_aligner output != LLM hidden size"),
            (self.gen_head.in_dim == d, "gen_head input != LLM hidden size"),
            (self.gen_head.out_dim == self.vq.codebook_size, "gen_head output != VQ codebook size"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)

    @property
    def num_image_tokens(self) -> int:
        """Image tokens per generated image (576 = 24x24 for Janus-Pro)."""
        return self.vq.num_tokens

    def to_dict(self) -> dict:
        return {"janus_rt_config": dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "JanusConfig":
        """janus_rt's own config.json (written by `janus-rt convert`)."""
        d = d["janus_rt_config"]
        adaptor = lambda x: AdaptorConfig(**x) if x is not None else None
        return cls(llm=LLMConfig(**d["llm"]), vision=SigLIPConfig(**d["vision"]), vq=VQConfig(**d["vq"]),
                   aligner=adaptor(d.get("aligner")), gen_aligner=adaptor(d.get("gen_aligner")),
                   gen_head=adaptor(d.get("gen_head")), tokens=TokenConfig(**d.get("tokens", {})),
                   gen_embed_dim=d.get("gen_embed_dim", 8))

    # ---- transformers layout (deepseek-community/Janus-Pro-*) -------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict, generation_config: dict | None = None) -> "JanusConfig":
        try:
            t, v, q = d["text_config"], d.get("vision_config", {}), d.get("vq_config", {})
            llm = LLMConfig(
                vocab_size=t["vocab_size"], hidden_size=t["hidden_size"], num_layers=t["num_hidden_layers"],
                num_heads=t["num_attention_heads"],
                num_kv_heads=t.get("num_key_value_heads") or t["num_attention_heads"],
                intermediate_size=t["intermediate_size"], head_dim=t.get("head_dim") or 0,
                rope_theta=_rope_theta(t), rms_eps=t.get("rms_norm_eps", 1e-6),
                max_position=t.get("max_position_embeddings", 16384),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", t.get("tie_word_embeddings", False))),
            )
            width = v.get("hidden_size", 1024)
            vision = SigLIPConfig(
                image_size=_int(v.get("image_size", 384)), patch_size=_int(v.get("patch_size", 16)), width=width,
                num_layers=v.get("num_hidden_layers", 24), num_heads=v.get("num_attention_heads", 16),
                mlp_dim=int(width * v.get("mlp_ratio", 4.0)), ln_eps=v.get("layer_norm_eps", 1e-6),
                num_channels=v.get("num_channels", 3),
            )
            if v.get("use_qk_norm", False):
                raise ConfigError("vision_config.use_qk_norm=true is not a Janus-Pro configuration")
            if v.get("depth", 2) != 2 or q.get("num_hidden_layers", 2) != 2:
                raise ConfigError("only 2-layer (Linear-GELU-Linear) adaptors are supported")
            grid = vision.image_size // vision.patch_size  # transformers: vq num_patches = vision grid
            ch_mult = tuple(q.get("channel_multiplier", (1, 1, 2, 2, 4)))
            vq = VQConfig(
                codebook_size=q.get("num_embeddings", 16384), codebook_dim=q.get("embed_dim", 8),
                ch=q.get("base_channels", 128), ch_mult=ch_mult, z_channels=q.get("latent_channels", 256),
                num_res_blocks=q.get("num_res_blocks", 2), in_channels=q.get("in_channels", 3),
                out_channels=q.get("out_channels", 3), image_size=grid * 2 ** (len(ch_mult) - 1),
            )
            n_tok = v.get("num_image_tokens", vq.num_tokens)
            if n_tok != vq.num_tokens:
                raise ConfigError(f"vision_config.num_image_tokens={n_tok} but the VQ grid gives {vq.num_tokens}")
            d_llm = llm.hidden_size
            tokens = _tokens_from(d, generation_config)
            return cls(
                llm=llm, vision=vision, vq=vq,
                aligner=AdaptorConfig(width, v.get("projection_dim", d_llm), v.get("projection_dim", d_llm)),
                gen_aligner=AdaptorConfig(vq.codebook_dim, q.get("projection_dim", d_llm), q.get("projection_dim", d_llm)),
                gen_head=AdaptorConfig(q.get("image_token_embed_dim", d_llm), q.get("projection_dim", d_llm),
                                       vq.codebook_size),
                tokens=tokens, gen_embed_dim=vq.codebook_dim,
            )
        except KeyError as e:
            raise ConfigError(f"transformers-layout config.json lacks field {e}") from None

    # ---- official DeepSeek layout (deepseek-ai/Janus-Pro-*) ---------------------------------------------
    @classmethod
    def from_official_dict(cls, d: dict) -> "JanusConfig":
        try:
            t = d["language_config"]
            vparams = d["vision_config"].get("params", {})
            model_name = vparams.get("model_name", "siglip_large_patch16_384")
            if model_name not in _SIGLIP_ARCHS:
                raise ConfigError(f"unsupported vision tower {model_name!r} (known: {sorted(_SIGLIP_ARCHS)})")
            if vparams.get("select_layer", -1) != -1:
                raise ConfigError(f"vision select_layer={vparams['select_layer']} unsupported (only -1)")
            if d["gen_vision_config"].get("cls", "VQ-16") != "VQ-16":
                raise ConfigError(f"unsupported gen_vision_config.cls {d['gen_vision_config']['cls']!r}")
            gv = d["gen_vision_config"].get("params", {})
            al = d["aligner_config"].get("params", {})
            ga = d["gen_aligner_config"].get("params", {})
            gh = d["gen_head_config"].get("params", {})
            for name, p in (("aligner_config", al), ("gen_aligner_config", ga)):
                if p.get("depth", 2) != 2 or p.get("projector_type", "mlp_gelu") != "mlp_gelu":
                    raise ConfigError(f"{name}: only depth-2 mlp_gelu projectors are supported")
            llm = LLMConfig(
                vocab_size=t.get("vocab_size", 102400), hidden_size=t.get("hidden_size", 2048),
                num_layers=t.get("num_hidden_layers", 24), num_heads=t.get("num_attention_heads", 16),
                num_kv_heads=t.get("num_key_value_heads") or t.get("num_attention_heads", 16),
                intermediate_size=t.get("intermediate_size", 5632), head_dim=t.get("head_dim") or 0,
                rope_theta=_rope_theta(t), rms_eps=t.get("rms_norm_eps", 1e-6),
                max_position=t.get("max_position_embeddings", 16384),
                tie_word_embeddings=bool(t.get("tie_word_embeddings", False)),
            )
            # The official config names the tower; its dimensions come from the architecture table, which a
            # config may override with the same field names (width, layers, heads, mlp_ratio, patch_size).
            arch = {**_SIGLIP_ARCHS[model_name], **{k: vparams[k] for k in _SIGLIP_ARCHS[model_name] if k in vparams}}
            vision = SigLIPConfig(image_size=_int(vparams.get("image_size", 384)), patch_size=arch["patch_size"],
                                  width=arch["width"], num_layers=arch["layers"], num_heads=arch["heads"],
                                  mlp_dim=int(arch["width"] * arch["mlp_ratio"]))
            # VQ-16 likewise: LlamaGen ModelArgs names may override the fixed VQ-16 architecture.
            vq = VQConfig(codebook_size=gv.get("codebook_size", gv.get("image_token_size", 16384)),
                          codebook_dim=gv.get("codebook_embed_dim", gv.get("n_embed", 8)),
                          ch=gv.get("ch", 128), ch_mult=tuple(gv.get("encoder_ch_mult", (1, 1, 2, 2, 4))),
                          z_channels=gv.get("z_channels", 256), num_res_blocks=gv.get("num_res_blocks", 2),
                          image_size=vision.image_size)
            d_llm = llm.hidden_size
            return cls(
                llm=llm, vision=vision, vq=vq,
                aligner=AdaptorConfig(al.get("input_dim", 1024), al.get("n_embed", d_llm), al.get("n_embed", d_llm)),
                gen_aligner=AdaptorConfig(ga.get("input_dim", 8), ga.get("n_embed", d_llm), ga.get("n_embed", d_llm)),
                gen_head=AdaptorConfig(gh.get("n_embed", d_llm), gh.get("image_token_embed", d_llm),
                                       gh.get("image_token_size", 16384)),
                tokens=TokenConfig(), gen_embed_dim=vq.codebook_dim,
            )
        except KeyError as e:
            raise ConfigError(f"official-layout config.json lacks field {e}") from None

    @classmethod
    def from_checkpoint_dict(cls, d: dict, generation_config: dict | None = None) -> "JanusConfig":
        """Detect the layout of a config.json and parse it. A field of the wrong kind (a sub-config that is null or
        a list, an unknown or missing janus_rt field) is a ConfigError naming what was wrong, not a bare
        TypeError / AttributeError / KeyError."""
        try:
            if "janus_rt_config" in d:
                return cls.from_dict(d)
            if "text_config" in d:
                return cls.from_hf_dict(d, generation_config)
            if "language_config" in d:
                return cls.from_official_dict(d)
        except ConfigError:
            raise
        except KeyError as e:
            raise ConfigError(f"config.json lacks field {e}") from None
        except (TypeError, AttributeError, ValueError) as e:
            raise ConfigError(f"malformed config.json: a field has the wrong type ({type(e).__name__}: {e})") from None
        raise ConfigError("unknown config.json: neither text_config (transformers), language_config (official) "
                          "nor janus_rt_config (janus_rt) present")


_SIGLIP_ARCHS = {
    "siglip_large_patch16_384": dict(patch_size=16, width=1024, layers=24, heads=16, mlp_ratio=4.0),
}


def _positive(obj, *names):
    for n in names:
        v = getattr(obj, n)
        if not isinstance(v, int) or v <= 0:
            raise ConfigError(f"{type(obj).__name__}.{n} must be a positive int, got {v!r}")


def _int(x):
    return int(x[0]) if isinstance(x, (list, tuple)) else int(x)


def _rope_theta(t: dict) -> float:
    rp = t.get("rope_parameters") or {}
    if rp.get("rope_type", "default") not in ("default", None):
        raise ConfigError(f"rope type {rp['rope_type']!r} is not supported (Janus-Pro uses plain RoPE)")
    rs = t.get("rope_scaling") or {}
    if rs.get("rope_type", rs.get("type")) not in (None, "default"):  # ("type" before transformers 4.45)
        raise ConfigError("rope_scaling is not supported (Janus-Pro uses plain RoPE)")
    return float(rp.get("rope_theta", t.get("rope_theta", 10000.0)))


def _tokens_from(d: dict, gen: dict | None) -> TokenConfig:
    tok = TokenConfig()
    t = d.get("text_config", {})
    tok.bos_id = t.get("bos_token_id") if isinstance(t.get("bos_token_id"), int) else tok.bos_id
    tok.eos_id = t.get("eos_token_id") if isinstance(t.get("eos_token_id"), int) else tok.eos_id
    tok.image_id = d.get("image_token_id", tok.image_id)
    if gen:
        tok.pad_id = gen.get("pad_token_id", tok.pad_id)
        kw = gen.get("generation_kwargs") or {}
        tok.boi_id = kw.get("boi_token_id", tok.boi_id)
        tok.eoi_id = kw.get("eoi_token_id", tok.eoi_id)  # written by janus_rt's verify.to_transformers
        tok.bos_id = gen.get("bos_token_id", tok.bos_id)
    return tok


# ---- presets ----------------------------------------------------------------------------------------------
def _preset_1b() -> JanusConfig:
    return JanusConfig(llm=LLMConfig(hidden_size=2048, num_layers=24, num_heads=16, num_kv_heads=16,
                                     intermediate_size=5632))


def _preset_7b() -> JanusConfig:
    return JanusConfig(llm=LLMConfig(hidden_size=4096, num_layers=30, num_heads=32, num_kv_heads=32,
                                     intermediate_size=11008))


def tiny_config(
    vocab_size: int = 1024, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 4,
    intermediate_size: int = 128, vision_width: int = 64, vision_layers: int = 2, vision_heads: int = 2,
    image_size: int = 32, patch_size: int = 4, vq_ch: int = 32, vq_ch_mult=(1, 1, 2), codebook_size: int = 256,
    codebook_dim: int = 8, z_channels: int = 32, aligner_dim: int | None = None,
) -> JanusConfig:
    """A small random-weight Janus for tests and the offline demo (special ids at the top of the vocab)."""
    grid = image_size // patch_size
    vq = VQConfig(codebook_size=codebook_size, codebook_dim=codebook_dim, ch=vq_ch, ch_mult=tuple(vq_ch_mult),
                  z_channels=z_channels, num_res_blocks=1, image_size=grid * 2 ** (len(vq_ch_mult) - 1))
    v = vocab_size
    tokens = TokenConfig(bos_id=v - 8, eos_id=v - 7, pad_id=v - 6, boi_id=v - 5, eoi_id=v - 4, image_id=v - 3)
    d = aligner_dim or hidden_size
    return JanusConfig(
        llm=LLMConfig(vocab_size=v, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                      num_kv_heads=num_kv_heads, intermediate_size=intermediate_size, max_position=4096),
        vision=SigLIPConfig(image_size=image_size, patch_size=patch_size, width=vision_width,
                            num_layers=vision_layers, num_heads=vision_heads, mlp_dim=4 * vision_width),
        vq=vq, aligner=AdaptorConfig(vision_width, hidden_size, hidden_size),
        gen_aligner=AdaptorConfig(codebook_dim, hidden_size, hidden_size),
        gen_head=AdaptorConfig(hidden_size, d, codebook_size), tokens=tokens, gen_embed_dim=codebook_dim,
    )


PRESETS = {"janus-pro-1b": _preset_1b, "janus-pro-7b": _preset_7b, "tiny": tiny_config}


def preset(name: str) -> JanusConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]()

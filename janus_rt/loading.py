"""Checkpoint loading for the three layouts janus_rt reads, and `convert` to janus_rt's own.

- transformers (deepseek-community/Janus-Pro-*): config.json with text_config/vision_config/vq_config,
  model.safetensors or shards + model.safetensors.index.json, generation_config.json.
- official DeepSeek (deepseek-ai/Janus-Pro-*): config.json with language_config/..., pytorch_model.bin or
  pytorch_model-0000x-of-0000y.bin + index (or safetensors); fused SigLIP qkv; pos_embed (1, 576, 1024).
- janus_rt: config.json with janus_rt_config; model.safetensors holding this package's parameter names.

Each source tensor is renamed to a janus_rt parameter (a slice of one where janus_rt fuses q/k/v or gate/up)
and copied straight into a model allocated once on the target device, so peak memory stays near one copy:
safetensors are memory-mapped and .bin files are opened with torch.load(mmap=True, weights_only=True).
Every failure raises a CheckpointError naming the file and tensor; nothing half-loaded is returned.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch

from janus_rt.config import ConfigError, JanusConfig
from janus_rt.errors import UsageError, folder_problem


class CheckpointError(Exception):
    """Base class of checkpoint problems; the message names the file and tensor."""


class MissingKeysError(CheckpointError):
    pass


class UnexpectedKeysError(CheckpointError):
    pass


class ShapeMismatchError(CheckpointError):
    pass


class CorruptCheckpointError(CheckpointError):
    pass


# ---- name maps: source key -> (janus_rt key, part) -------------------------------------------------------------
# `part` names a slice of a fused janus_rt parameter ("q"/"k"/"v" of qkv, "gate"/"up" of gate_up) or is None.
_LLM_RULES = [
    (r"layers\.(\d+)\.self_attn\.(q|k|v)_proj\.weight", r"llm.layers.\1.attn.qkv_proj.weight", 2),
    (r"layers\.(\d+)\.self_attn\.o_proj\.weight", r"llm.layers.\1.attn.o_proj.weight", None),
    (r"layers\.(\d+)\.mlp\.(gate|up)_proj\.weight", r"llm.layers.\1.mlp.gate_up_proj.weight", 2),
    (r"layers\.(\d+)\.mlp\.down_proj\.weight", r"llm.layers.\1.mlp.down_proj.weight", None),
    (r"layers\.(\d+)\.input_layernorm\.weight", r"llm.layers.\1.input_norm.weight", None),
    (r"layers\.(\d+)\.post_attention_layernorm\.weight", r"llm.layers.\1.post_attn_norm.weight", None),
    (r"embed_tokens\.weight", "llm.embed_tokens.weight", None),
    (r"norm\.weight", "llm.norm.weight", None),
]
_VQ_RULES_HF = [  # transformers' VQ names -> the official names janus_rt keeps
    (r"(encoder|decoder)\.(?:down|up)\.(\d+)\.block\.(\d+)\.(.+)", r"vq.\1.conv_blocks.\2.res.\3.\4", None),
    (r"(encoder|decoder)\.(?:down|up)\.(\d+)\.attn\.(\d+)\.(.+)", r"vq.\1.conv_blocks.\2.attn.\3.\4", None),
    (r"(encoder|decoder)\.(?:down|up)\.(\d+)\.(downsample|upsample)\.(.+)", r"vq.\1.conv_blocks.\2.\3.\4", None),
    (r"(encoder|decoder)\.mid\.block_1\.(.+)", r"vq.\1.mid.0.\2", None),
    (r"(encoder|decoder)\.mid\.attn_1\.(.+)", r"vq.\1.mid.1.\2", None),
    (r"(encoder|decoder)\.mid\.block_2\.(.+)", r"vq.\1.mid.2.\2", None),
    (r"quantize\.embedding\.weight", "vq.codebook", None),
    (r"(.+)", r"vq.\1", None),
]
HF_RULES = (
    [(r"model\.language_model\." + p, r, g) for p, r, g in _LLM_RULES]
    + [
        (r"lm_head\.weight", "lm_head.weight", None),
        (r"model\.vision_model\.embeddings\.patch_embedding\.(weight|bias)", r"vision.patch_embed.\1", None),
        (r"model\.vision_model\.embeddings\.position_embedding\.weight", "vision.pos_embed", None),
        (r"model\.vision_model\.encoder\.layers\.(\d+)\.self_attn\.(q|k|v)_proj\.(weight|bias)",
         r"vision.blocks.\1.attn.qkv.\3", 2),
        (r"model\.vision_model\.encoder\.layers\.(\d+)\.self_attn\.projection_layer\.(weight|bias)",
         r"vision.blocks.\1.attn.proj.\2", None),
        (r"model\.vision_model\.encoder\.layers\.(\d+)\.layer_norm(1|2)\.(weight|bias)", r"vision.blocks.\1.norm\2.\3",
         None),
        (r"model\.vision_model\.encoder\.layers\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", r"vision.blocks.\1.mlp.\2.\3",
         None),
        (r"model\.vision_model\.post_layernorm\.(weight|bias)", r"vision.norm.\1", None),
        (r"model\.(aligner|generation_aligner)\.fc1\.(weight|bias)", None, None),  # resolved in _hf_adaptor
        (r"model\.(aligner|generation_aligner)\.hidden_layers\.0\.(weight|bias)", None, None),
        (r"model\.generation_head\.proj_out\.(weight|bias)", r"gen_head.fc1.\1", None),
        (r"model\.generation_head\.vision_head\.(weight|bias)", r"gen_head.fc2.\1", None),
        (r"model\.generation_embeddings\.weight", "gen_embed.weight", None),
    ]
    + [(r"model\.vqmodel\." + p, r, g) for p, r, g in _VQ_RULES_HF]
)
OFFICIAL_RULES = (
    [(r"language_model\.model\." + p, r, g) for p, r, g in _LLM_RULES]
    + [
        (r"language_model\.lm_head\.weight", "lm_head.weight", None),
        (r"vision_model\.vision_tower\.attn_pool\..+", "", None),  # present, never run
        (r"vision_model\.vision_tower\.patch_embed\.proj\.(weight|bias)", r"vision.patch_embed.\1", None),
        (r"vision_model\.vision_tower\.pos_embed", "vision.pos_embed", None),
        (r"vision_model\.vision_tower\.(blocks\..+|norm\..+)", r"vision.\1", None),
        (r"(aligner|gen_aligner)\.layers\.0\.(weight|bias)", r"\1.fc1.\2", None),
        (r"(aligner|gen_aligner)\.layers\.2\.(weight|bias)", r"\1.fc2.\2", None),
        (r"gen_head\.output_mlp_projector\.(weight|bias)", r"gen_head.fc1.\1", None),
        (r"gen_head\.vision_head\.(weight|bias)", r"gen_head.fc2.\1", None),
        (r"gen_embed\.weight", "gen_embed.weight", None),
        (r"gen_vision_model\.quantize\.codebook_used", "", None),  # usage statistics, not weights
        (r"gen_vision_model\.quantize\.embedding\.weight", "vq.codebook", None),
        (r"gen_vision_model\.(.+)", r"vq.\1", None),
    ]
)
_COMPILED = {}


def rename(key: str, layout: str):
    """Source tensor name -> (janus_rt name, part) ; ("", None) for known-and-ignored ; None when unknown."""
    if layout == "janus_rt":
        return key, None
    rules = _COMPILED.setdefault(layout, [(re.compile(p), r, g) for p, r, g in
                                          (HF_RULES if layout == "transformers" else OFFICIAL_RULES)])
    for pat, repl, group in rules:
        m = pat.fullmatch(key)
        if m is None:
            continue
        if repl is None:  # transformers adaptors: aligner.fc1 / hidden_layers.0 -> fc1 / fc2
            mod = "aligner" if m.group(1) == "aligner" else "gen_aligner"
            return f"{mod}.{'fc1' if '.fc1.' in key else 'fc2'}.{m.group(2)}", None
        return m.expand(repl) if repl else "", (m.group(group) if group else None)
    return None


def _part_slice(name: str, part: str, cfg: JanusConfig):
    """Row range of `part` inside a fused janus_rt parameter."""
    if name.startswith("llm.") and ".qkv_proj." in name:
        q, kv = cfg.llm.num_heads * cfg.llm.head_dim, cfg.llm.num_kv_heads * cfg.llm.head_dim
        return {"q": (0, q), "k": (q, kv), "v": (q + kv, kv)}[part]
    if ".gate_up_proj." in name:
        f = cfg.llm.intermediate_size
        return {"gate": (0, f), "up": (f, f)}[part]
    w = cfg.vision.width  # SigLIP qkv
    return {"q": (0, w), "k": (w, w), "v": (2 * w, w)}[part]


# ---- files ---------------------------------------------------------------------------------------------------
def detect_layout(cfg_dict: dict) -> str:
    if "janus_rt_config" in cfg_dict:
        return "janus_rt"
    if "text_config" in cfg_dict:
        return "transformers"
    if "language_config" in cfg_dict:
        return "official"
    raise ConfigError("unknown config.json layout (no text_config, language_config or janus_rt_config)")


def weight_files(path: Path) -> list[Path]:
    """The checkpoint's weight files: a sharded index if present, else the single file; safetensors first."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / index).exists():
            try:
                wm = json.loads((path / index).read_text())["weight_map"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
                raise CorruptCheckpointError(f"{path / index}: unreadable shard index ({e})") from None
            if not isinstance(wm, dict) or not all(isinstance(f, str) for f in wm.values()):
                raise CorruptCheckpointError(f"{path / index}: weight_map is not a {{tensor: file name}} object")
            files = [path / f for f in sorted(set(wm.values()))]
            for f in files:
                if not f.exists():
                    raise CheckpointError(f"{f}: shard listed in {index} is missing")
            return files
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (path / single).exists():
            return [path / single]
    raise CheckpointError(f"{path}: no weights (model.safetensors, pytorch_model.bin or a sharded index)")


def iter_tensors(f: Path):
    """Yield (name, tensor) from one weight file without reading the others (mmap where possible)."""
    if f.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(f), framework="pt", device="cpu") as sf:
                for k in sf.keys():
                    yield k, sf.get_tensor(k)
        except (SafetensorError, OSError) as e:
            raise CorruptCheckpointError(f"{f}: corrupt or truncated safetensors file ({e})") from None
        return
    try:
        try:
            sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # legacy (non-zip) pickles cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            sd = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises several types for a damaged pickle/zip
        raise CorruptCheckpointError(f"{f}: corrupt or truncated checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(sd, dict):
        raise CorruptCheckpointError(f"{f}: expected a dict of tensors, got {type(sd).__name__}")
    yield from sd.items()


_STORED = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32,
           "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def stored_dtype(path) -> torch.dtype | None:
    """The floating dtype a checkpoint folder's weights are stored in, or None where it cannot tell cheaply.

    safetensors: the dtype holding most of the first weight file's floating elements (its header only, no tensor
    read). .bin weights: config.json's `torch_dtype` / `dtype`, top level or in a sub-config (text_config,
    language_config, ...). None, not an error, for a folder it cannot read: load_janus says what is wrong with it.
    """
    path = Path(path)
    try:
        first = weight_files(path)[0]
    except (CheckpointError, OSError):
        return None
    if first.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        counts: dict[torch.dtype, int] = {}
        try:
            with safe_open(str(first), framework="pt", device="cpu") as sf:
                for k in sf.keys():
                    sl = sf.get_slice(k)
                    dt = _STORED.get(sl.get_dtype())
                    if dt is not None:
                        counts[dt] = counts.get(dt, 0) + math.prod(sl.get_shape())
        except (SafetensorError, OSError):
            return None
        return max(counts, key=counts.get) if counts else None
    d = _json_object_or_none(path / "config.json")
    if d is None:
        return None
    for c in [d] + [v for v in d.values() if isinstance(v, dict)]:
        for key in ("torch_dtype", "dtype"):
            if isinstance(c.get(key), str) and c[key] in _STORED:
                return _STORED[c[key]]
    return None


def default_guidance(path) -> float | None:
    """The classifier-free guidance weight a checkpoint folder recommends: generation_config.json's
    `guidance_scale` (transformers' field; its converted Janus-Pro checkpoints carry 5), or None where the folder has
    none (or it is not a finite number)."""
    d = _json_object_or_none(Path(path) / "generation_config.json")
    w = d.get("guidance_scale") if d is not None else None
    if not isinstance(w, (int, float)) or isinstance(w, bool):
        return None
    try:
        w = float(w)
    except OverflowError:  # an integer too large for a float
        return None
    return w if math.isfinite(w) else None


def _read_json_object(f: Path) -> dict:
    try:
        d = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{f}: expected a JSON object, got {type(d).__name__}")
    return d


def _json_object_or_none(f: Path) -> dict | None:
    """_read_json_object, or None where the file is missing, unreadable or not a JSON object (the callers that only
    look for an optional hint)."""
    try:
        return _read_json_object(f)
    except (OSError, ConfigError):
        return None


def read_config(path: Path) -> tuple[JanusConfig, str]:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint folder")
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(f"{path}: no config.json")
    d = _read_json_object(cfg_file)
    gen = None
    if (path / "generation_config.json").exists():
        gen = _read_json_object(path / "generation_config.json")
    try:
        cfg = JanusConfig.from_checkpoint_dict(d, gen)
    except ConfigError as e:
        raise ConfigError(f"{cfg_file}: {e}") from None
    if (path / "tokenizer.json").exists():  # the tokenizer is the authority on special ids
        from tokenizers import Tokenizer

        from janus_rt.tokenizer import special_ids

        try:
            cfg.tokens = special_ids(Tokenizer.from_file(str(path / "tokenizer.json")), cfg.tokens)
        except Exception as e:  # noqa: BLE001 - tokenizers raises its own exception type
            raise CheckpointError(f"{path / 'tokenizer.json'}: unreadable tokenizer ({e})") from None
    return cfg, detect_layout(d)


# ---- loading -------------------------------------------------------------------------------------------------
PROGRESS_MIN_BYTES = 2**30  # load_janus shows a progress bar for weight files at least this large in all


def load_janus(path, device="cpu", dtype=torch.float32, progress: bool | None = None):
    """Build a Janus from a checkpoint folder (any layout), allocating the model once on `device`.
    progress: a bar over the weight files' bytes on stderr (None: where they hold >= PROGRESS_MIN_BYTES)."""
    from janus_rt.models.janus import Janus

    path = Path(path)
    cfg, layout = read_config(path)  # CheckpointError / ConfigError for a folder that is not a checkpoint
    with torch.device("meta"):
        model = Janus(cfg)
    model = model.to(dtype=dtype).to_empty(device=device).tie_weights_()  # one allocation, in the final dtype
    params = dict(model.named_parameters(remove_duplicate=False))
    filled: dict[str, int] = {k: 0 for k in params}
    unexpected = []
    files = weight_files(path)
    total = sum(f.stat().st_size for f in files)
    bar = None
    if progress or (progress is None and total >= PROGRESS_MIN_BYTES):
        from tqdm import tqdm

        bar = tqdm(total=total, desc="loading weights", unit="B", unit_scale=True, unit_divisor=1024)
    untied = False

    def untie():
        """The config ties lm_head to the embedding, but the checkpoint stores a head of its own (transformers 5
        writes tie_word_embeddings: true at the top of a config that lacked it, and keeps the stored head where it
        differs from the embedding): the stored head is the model's (tied again below where the two are equal)."""
        nonlocal untied
        model.lm_head.weight = torch.nn.Parameter(torch.empty_like(model.llm.embed_tokens.weight),
                                                  requires_grad=False)
        cfg.llm.tie_word_embeddings = False
        params["lm_head.weight"] = model.lm_head.weight
        filled["lm_head.weight"] = 0
        untied = True

    try:
        _fill(cfg, layout, files, params, filled, unexpected, bar, untie)
    finally:
        if bar is not None:
            bar.close()
    if unexpected:
        raise UnexpectedKeysError(f"{path}: unexpected tensors {unexpected[:10]}"
                                  f"{' ...' if len(unexpected) > 10 else ''} ({len(unexpected)} in all)")
    if cfg.llm.tie_word_embeddings:
        filled["lm_head.weight"] = filled["llm.embed_tokens.weight"]
    missing = [k for k, p in params.items() if filled[k] != p.numel()]
    if missing:
        raise MissingKeysError(f"{path}: no (or incomplete) data for {missing[:10]}"
                               f"{' ...' if len(missing) > 10 else ''} ({len(missing)} in all)")
    if untied and torch.equal(model.lm_head.weight, model.llm.embed_tokens.weight):
        cfg.llm.tie_word_embeddings = True  # the stored head is the embedding: tied, as the config says
        model.tie_weights_()
    model.guidance_scale = default_guidance(path)  # (generate_images' default; written again by save_janus)
    return model.eval().requires_grad_(False)  # inference; training unfreezes what it trains (apply_stage)


def _fill(cfg, layout, files, params, filled, unexpected, bar, untie=None) -> None:
    """load_janus' copy loop: each file's tensors renamed and copied into `params`, counted in `filled`; keys with
    no place go to `unexpected`. The bar advances by each tensor's bytes as it is copied, and by the rest of the
    file's size (header, tensors skipped) when the file is done. A tensor (or fused part) stored twice is an error:
    counted twice, it could stand in for a missing one of the same size. untie: called for a stored lm_head where
    the config ties it (None: the stored head is skipped)."""
    seen: dict[tuple[str, str | None], str] = {}
    for f in files:
        read, size = 0, f.stat().st_size if bar is not None else 0
        for key, src in iter_tensors(f):
            r = rename(key, layout)
            if r is None:
                unexpected.append(f"{f.name}:{key}")
                continue
            name, part = r
            if name == "":
                continue
            if name == "lm_head.weight" and cfg.llm.tie_word_embeddings:
                if untie is None:
                    continue
                untie()
            if name not in params:
                unexpected.append(f"{f.name}:{key}")
                continue
            if (name, part) in seen:
                raise CorruptCheckpointError(f"{f}: tensor {key} is stored twice (also as {seen[name, part]}): "
                                             "the checkpoint's files overlap")
            seen[name, part] = f"{f.name}:{key}"
            dst = params[name].data
            if part is not None:
                start, length = _part_slice(name, part, cfg)
                dst = dst.narrow(0, start, length)
            if name == "vision.pos_embed" and src.dim() == 3 and src.shape[0] == 1:
                src = src[0]  # official (1, N, C)
            if tuple(src.shape) != tuple(dst.shape):
                raise ShapeMismatchError(f"{f}: tensor {key} has shape {tuple(src.shape)}, "
                                         f"but {name}{f'[{part}]' if part else ''} expects {tuple(dst.shape)}")
            with torch.no_grad():
                dst.copy_(src)
            filled[name] += dst.numel()
            if bar is not None:
                step = min(src.numel() * src.element_size(), size - read)
                bar.update(step)
                read += step
        if bar is not None:
            bar.update(size - read)


def readable_as_umask(path) -> None:
    """safetensors writes its files 0600; give one the mode any other file the user writes gets (0666 & ~umask).
    The umask is read from /proc (setting it to read it would change it for every thread meanwhile); elsewhere
    0o022."""
    umask = 0o022
    try:
        with open("/proc/self/status") as f:
            umask = next((int(line.split()[1], 8) for line in f if line.startswith("Umask:")), umask)
    except OSError:
        pass
    os.chmod(path, 0o666 & ~umask)


def save_janus(model, out_dir) -> Path:
    """Write janus_rt's own layout: config.json (janus_rt_config) + model.safetensors (+ generation_config.json with
    the model's guidance_scale, where it has one)."""
    from safetensors.torch import save_file

    from janus_rt.models.packed_linear import require_unpacked

    require_unpacked(model, "saving")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.cfg.llm.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    tmp = out / "model.safetensors.tmp"
    save_file(sd, str(tmp), metadata={"format": "pt", "producer": "janus_rt"})
    readable_as_umask(tmp)
    os.replace(tmp, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(model.cfg.to_dict(), indent=2))
    write_guidance(model, out)
    return out


def write_guidance(model, folder: Path) -> None:
    """generation_config.json with the model's recommended CFG weight, where it has one (a model loaded from a
    checkpoint that carried it): so a saved or fine-tuned copy keeps generating as its source did."""
    if getattr(model, "guidance_scale", None) is not None:
        (folder / "generation_config.json").write_text(json.dumps({"guidance_scale": model.guidance_scale}) + "\n")


def holds_checkpoint(folder: Path) -> bool:
    """Whether a folder already holds a checkpoint (config.json or safetensors weights): a command that writes a new
    checkpoint folder refuses it rather than mixing files of two models."""
    return folder.is_dir() and ((folder / "config.json").exists() or any(folder.glob("*.safetensors")))


def check_convert_dst(src: Path, dst: Path) -> None:
    """UsageError for a DST that convert must not write, before anything loads: SRC itself (the weights would be
    rewritten in the new dtype before the tokenizer copy failed, a lossy overwrite of the source), a file, or a
    folder that already holds a checkpoint (model weights or config.json: convert writes a new folder), or one that
    cannot be created or written."""
    if dst.exists() and not dst.is_dir():
        raise UsageError(f"DST {str(dst)!r} is a file, not a folder")
    if dst.is_dir() and src.exists() and dst.resolve() == src.resolve():
        raise UsageError(f"DST {str(dst)!r} is SRC: convert writes a new folder and leaves SRC as it is")
    if holds_checkpoint(dst):
        raise UsageError(f"DST {str(dst)!r} already holds a checkpoint: give a new folder, or one without a checkpoint")
    if problem := folder_problem(str(dst), "DST"):  # (not writable: found only after minutes of loading at 7B)
        raise UsageError(problem)


def convert(src, dst, dtype=None) -> Path:
    """`janus-rt convert SRC DST`: any supported layout -> janus_rt's safetensors layout (+ tokenizer files)."""
    import shutil

    src, dst = Path(src), Path(dst)
    check_convert_dst(src, dst)
    model = load_janus(src, dtype=dtype or torch.bfloat16)
    save_janus(model, dst)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                 "preprocessor_config.json", "processor_config.json"):
        if (src / name).exists():
            shutil.copy(src / name, dst / name)
    return dst

"""The Janus-Pro tokenizer (tokenizer.json through the `tokenizers` library) and its special ids.

Special ids are read from the checkpoint's tokenizer when one is there (the published Janus-Pro ids are only
defaults). The `tiny` preset gets a byte-level tokenizer built here, with the special tokens at the tiny
config's ids, so the offline demo and tests run the same code path as a real checkpoint.
"""
from __future__ import annotations

from pathlib import Path

from janus_rt.config import TokenConfig

# Characters from which encode() lets other Python threads run while it tokenizes (a server's other connections:
# tokenizers' encode holds the GIL, ~1 s a MB of text here; encode_batch does not, but marks the process as having
# used parallelism, so tokenizers warns if it forks later; short texts keep encode).
LONG_TEXT = 16384

SPECIAL_TOKENS = {
    "bos_id": "<｜begin▁of▁sentence｜>",
    "eos_id": "<｜end▁of▁sentence｜>",
    "pad_id": "<｜▁pad▁｜>",
    "boi_id": "<begin_of_image>",
    "eoi_id": "<end_of_image>",
    "image_id": "<image_placeholder>",
}


class JanusTokenizer:
    """`encode(text) -> list[int]` (no BOS added) / `decode(ids)`, with the special ids as attributes."""

    def __init__(self, tok, tokens: TokenConfig):
        self.tok = tok
        self.bos_id, self.eos_id, self.pad_id = tokens.bos_id, tokens.eos_id, tokens.pad_id
        self.boi_id, self.eoi_id, self.image_id = tokens.boi_id, tokens.eoi_id, tokens.image_id

    @classmethod
    def from_file(cls, path, defaults: TokenConfig | None = None) -> "JanusTokenizer":
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(path))
        return cls(tok, special_ids(tok, defaults))

    @classmethod
    def from_pretrained(cls, model_dir, defaults: TokenConfig | None = None) -> "JanusTokenizer":
        f = Path(model_dir) / "tokenizer.json"
        if not f.exists():
            raise FileNotFoundError(f"{f}: no tokenizer.json in the checkpoint folder")
        return cls.from_file(f, defaults)

    @classmethod
    def byte_level(cls, vocab_size: int, tokens: TokenConfig) -> "JanusTokenizer":
        return cls(build_byte_tokenizer(vocab_size, tokens), tokens)

    def encode(self, text: str) -> list[int]:
        if len(text) > LONG_TEXT:  # (the same ids: encode_batch releases the GIL, encode holds it throughout)
            return self.tok.encode_batch([text], add_special_tokens=False)[0].ids
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def stream(self, skip_special_tokens: bool = True) -> "TextStream":
        """An incremental decoder for an answer whose ids arrive one at a time (see TextStream)."""
        return TextStream(self, skip_special_tokens)

    def save(self, path) -> None:
        self.tok.save(str(path))

    @property
    def tokens(self) -> TokenConfig:
        return TokenConfig(self.bos_id, self.eos_id, self.pad_id, self.boi_id, self.eoi_id, self.image_id)


class TextStream:
    """push(id) -> the text that id completes ('' while a character split over several tokens is still incomplete:
    tokenizers' DecodeStream); finish() -> the rest, so that everything returned equals decode(all the ids)."""

    def __init__(self, tok: JanusTokenizer, skip_special_tokens: bool = True):
        from tokenizers.decoders import DecodeStream

        self.tok, self.skip = tok, skip_special_tokens
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self.ids: list[int] = []
        self.text = ""  # returned so far

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        chunk = self._stream.step(self.tok.tok, int(token_id)) or ""
        self.text += chunk
        return chunk

    def finish(self) -> str:
        """What decode() gives past the text returned so far (a character left incomplete at the end, as decode
        renders it); '' where decode's text does not extend it (not seen: DecodeStream returns decode's prefixes)."""
        full = self.tok.decode(self.ids, skip_special_tokens=self.skip)
        rest = full[len(self.text):] if full.startswith(self.text) else ""
        self.text += rest
        return rest


def special_ids(tok, defaults: TokenConfig | None = None) -> TokenConfig:
    """Look the special tokens up in a `tokenizers.Tokenizer`; keep `defaults` for any it lacks."""
    out = TokenConfig(**vars(defaults)) if defaults is not None else TokenConfig()
    for field, text in SPECIAL_TOKENS.items():
        i = tok.token_to_id(text)
        if i is not None:
            setattr(out, field, i)
    return out


def build_byte_tokenizer(vocab_size: int, tokens: TokenConfig):
    """A byte-level BPE with no merges (one token per UTF-8 byte) and the special tokens at `tokens`' ids."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins for bytes
    specials = {text: getattr(tokens, field) for field, text in SPECIAL_TOKENS.items()}
    if len(alphabet) + len(specials) > vocab_size:
        raise ValueError(f"vocab_size {vocab_size} too small for a byte-level tokenizer")
    taken = set(specials.values())
    free = (i for i in range(vocab_size) if i not in taken)
    vocab = {ch: next(free) for ch in sorted(alphabet)}
    vocab.update(specials)
    if max(vocab.values()) >= vocab_size:
        raise ValueError("special token ids must be < vocab_size")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tok

"""Requests and the rows (sequences) they own; sampling parameters; per-step seeds."""
from __future__ import annotations

import itertools
import math
import operator
import random
import time
from dataclasses import dataclass, field

import torch

_MASK32 = 0xFFFFFFFF
MIN_TEMPERATURE = 1e-6  # a sampling temperature below this is refused (greedy is the limit)
FP32_MAX = 3.4028234663852886e38
SEED_LIMIT = 2**64  # seeds are 64-bit: each one its own images (they used to wrap at 2^32: 2^32 gave seed 0's)


def mix32(*xs: int) -> int:
    """A 32-bit hash of integers (per image and per step seeds derive from the request seed with it)."""
    h = 0x9E3779B9
    for x in xs:
        h = (h ^ (int(x) & _MASK32)) & _MASK32
        h = ((h ^ (h >> 16)) * 0x21F0AAAD) & _MASK32
        h = ((h ^ (h >> 15)) * 0x735A2D97) & _MASK32
        h ^= h >> 15
    return h


@dataclass
class SamplingParams:
    cfg_weight: float = 5.0
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    greedy: bool = False
    seed: int | None = None

    def __post_init__(self):
        # checked here, not in a step: a value the sampling kernels cannot take would fail every row of that step
        for name in ("cfg_weight", "temperature", "top_p"):  # finite in fp32, as the kernels take them
            if not (math.isfinite(getattr(self, name)) and abs(getattr(self, name)) <= FP32_MAX):
                raise ValueError(f"{name} must be a finite number (in fp32), got {getattr(self, name)}")
        if self.temperature < MIN_TEMPERATURE and not self.greedy:  # (smaller ones round to 0 in fp32)
            raise ValueError(f"temperature must be >= {MIN_TEMPERATURE:g} (or use greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.top_k < 2**31:
            raise ValueError(f"top_k must be in [0, 2^31) (0 = off), got {self.top_k}")
        if self.seed is None:
            self.seed = random.getrandbits(32)
        else:  # an int (numpy's and torch's integers too) in [0, 2^64)
            try:
                seed = None if isinstance(self.seed, bool) else operator.index(self.seed)
            except TypeError:
                seed = None
            if seed is None or not 0 <= seed < SEED_LIMIT:
                raise ValueError(f"seed must be an int in [0, 2^64), got {self.seed!r}")
            self.seed = seed


_ids = itertools.count()


@dataclass(eq=False)  # a request is itself: two with the same fields are two requests (and pixel_values a tensor)
class Request:
    """A text-to-image request (n images from one prompt, CFG: a conditional and an unconditional row each)
    or an understanding request (one text row, optional images spliced into the prompt)."""

    prompt_ids: list[int]
    params: SamplingParams
    kind: str = "image"  # "image" | "text"
    n: int = 1
    max_new_tokens: int = 576  # image: tokens per image; text: answer length limit
    uncond_ids: list[int] | None = None
    pixel_values: torch.Tensor | None = None
    eos_id: int | None = None
    req_id: int = field(default_factory=lambda: next(_ids))
    # state
    tokens: list[list[int]] = field(default_factory=list)  # per image (or the one text row): sampled ids
    finished: bool = False
    aborted: bool = False  # Engine.abort: dropped before finishing, its tokens so far kept
    preempted: bool = False  # waiting after a preemption: its rows' K/V comes back from `swapped`, blocks unshared
    # preempted: row id -> its K/V [L, 2, T, H, D] in host memory (KVCache.read_slots; an int8 cache: D + 4 wide)
    swapped: dict | None = None
    logits: list = field(default_factory=list)  # per step (cond [n, V], uncond [n, V]) when the engine records
    # time.perf_counter() when it was made (added), when its first token(s) and its last were sampled
    arrival_time: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    finish_time: float | None = None

    def __post_init__(self):
        if self.kind not in ("image", "text"):
            raise ValueError(f"unknown request kind {self.kind!r}")
        if len(self.prompt_ids) < 2 and self.kind == "image":
            raise ValueError("an image prompt needs at least BOS and <begin_of_image>")
        if self.n < 1 or (self.kind == "text" and self.n != 1):
            raise ValueError(f"n must be >= 1 (1 for text), got {self.n}")
        self.tokens = [[] for _ in range(self.n)]

    @property
    def num_rows(self) -> int:
        return 2 * self.n if self.kind == "image" else 1

    def row_ids(self) -> list[tuple]:
        """Row (sequence) ids in batch order: for images cond rows then uncond rows."""
        if self.kind == "text":
            return [(self.req_id, "t", 0)]
        return [(self.req_id, "c", i) for i in range(self.n)] + [(self.req_id, "u", i) for i in range(self.n)]

    def seeds(self, step: int) -> list[int]:
        """Per-image 32-bit seeds of one step: independent of the batch the request runs in. A seed of 2^32 or more
        hashes its high word too (below 2^32 the words are the seed alone, as before 64-bit seeds)."""
        s = self.params.seed
        words = (s,) if s <= _MASK32 else (s & _MASK32, s >> 32)
        return [mix32(*words, i, step) for i in range(self.n)]

    @property
    def step(self) -> int:
        return len(self.tokens[0])

    def append(self, new: list[int]) -> None:
        for t, x in zip(self.tokens, new):
            t.append(int(x))
        if self.first_token_time is None:
            self.first_token_time = time.perf_counter()
        if self.step >= self.max_new_tokens or (self.kind == "text" and self.eos_id is not None
                                                and self.tokens[0][-1] == self.eos_id):
            self.finished = True
            self.finish_time = time.perf_counter()

    @property
    def time_to_first_token(self) -> float | None:
        """Seconds from arrival to its first token(s): the wait for admission plus the prefill."""
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def latency(self) -> float | None:
        """Seconds from arrival to its last token (None until it finishes)."""
        return None if self.finish_time is None else self.finish_time - self.arrival_time

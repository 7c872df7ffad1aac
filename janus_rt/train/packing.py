"""Mix the three sample kinds by ratio and pack them into fixed-length rows with document boundaries.

Kinds are drawn by sample count with ratio und : text : t2i (default 5 : 1 : 4, Janus stage III); each kind
walks its records in a fresh seeded permutation per epoch. Drawn samples wait in a small look-ahead buffer;
a row starts with the oldest buffered sample (so none starves) and is then filled first-fit from the buffer
until nothing left fits; the rest of the row is padding.

Samples longer than seq_len are truncated by default (`overflow="truncate"`, one warning the first time):
the cut keeps only whole understanding images, moving back to the BOI of an image it would split, so every
kept placeholder block has its pixel_values; a truncated sample left without any loss token is dropped (one
warning). `overflow="skip"` drops every over-long sample instead (one warning too).

Exact resume: every sample is a pure function of (record index, draw number), so the state is just the
kind-choice RNG, a (epoch, cursor) per kind, the draw counter and the buffer's (index, draw) pairs — a small
JSON-able dict. Loading it continues with exactly the batches an uninterrupted run would produce.
"""
from __future__ import annotations

import queue
import threading
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from .data import IGNORE, KINDS, DataWarning, ManifestDataset, Sample

DEFAULT_RATIOS = {"und": 5, "text": 1, "t2i": 4}
_MAX_FAILED_DRAWS = 1000


@dataclass
class PackedBatch:
    input_ids: torch.Tensor      # [B, L] int64 (pad_id in padding)
    is_gen_image: torch.Tensor   # [B, L] bool: input is an image-codebook id (gen_embed path)
    text_labels: torch.Tensor    # [B, L] int64, IGNORE = no loss (padding included)
    image_labels: torch.Tensor   # [B, L] int64, IGNORE = no loss
    positions: torch.Tensor      # [B, L] int64, restarting at 0 for every document and for the padding tail
    cu_seqlens: torch.Tensor     # [num_segments + 1] int32 over the flattened B*L tokens; each row's padding
                                 # tail is its own segment, so cu_seqlens[-1] == B*L
    max_seqlen: int
    segment_ids: torch.Tensor    # [B, L] int64, segment index into cu_seqlens
    pixel_values: torch.Tensor | None  # [n_img, 3, S, S], understanding images in order of appearance
    docs: list[list[tuple[str, int, int]]]  # per row: (kind, record index, draw) of each packed document

    def attention_mask(self) -> torch.Tensor:
        """[B, L, L] bool, True where query t may attend key s: same segment and s <= t."""
        same = self.segment_ids[:, :, None] == self.segment_ids[:, None, :]
        return same & torch.ones(same.shape[-2:], dtype=torch.bool).tril()


class PackedSampler:
    """Endless stream of PackedBatch [batch_size, seq_len] from a ManifestDataset (or anything with
    `indices` {kind: [record index]}, `sample(index, draw) -> Sample | None`, `tok`, `num_image_tokens`)."""

    def __init__(self, dataset: ManifestDataset, batch_size: int, seq_len: int,
                 ratios: dict[str, float] = DEFAULT_RATIOS, *, seed: int = 0, lookahead: int = 8,
                 overflow: str = "truncate", shuffle: bool = True):
        if batch_size < 1 or seq_len < 2 or lookahead < 1:
            raise ValueError(f"need batch_size >= 1, seq_len >= 2, lookahead >= 1; got {batch_size}, "
                             f"{seq_len}, {lookahead}")
        if overflow not in ("truncate", "skip"):
            raise ValueError(f"overflow must be 'truncate' or 'skip', got {overflow!r}")
        if set(ratios) - set(KINDS) or any(r < 0 for r in ratios.values()):
            raise ValueError(f"ratios must map kinds {KINDS} to non-negative numbers, got {ratios}")
        self.ds, self.batch_size, self.seq_len = dataset, batch_size, seq_len
        self.seed, self.lookahead, self.overflow, self.shuffle = seed, lookahead, overflow, shuffle
        empty = [k for k in KINDS if ratios.get(k, 0) > 0 and not dataset.indices[k]]
        if empty:
            warnings.warn(f"no records of kind {empty}: mixing only the others", DataWarning, stacklevel=2)
        self.kinds = [k for k in KINDS if ratios.get(k, 0) > 0 and dataset.indices[k]]
        if not self.kinds:
            raise ValueError(f"nothing to sample: ratios {ratios}, records per kind "
                             f"{ {k: len(v) for k, v in dataset.indices.items()} }")
        p = np.array([ratios[k] for k in self.kinds], dtype=np.float64)
        self._cum = np.cumsum(p / p.sum())
        self._warned: set[str] = set()
        self._samples: dict[int, Sample] = {}  # draw -> built sample, for the buffered draws
        self._perm: dict[str, tuple[int, np.ndarray]] = {}  # kind -> (epoch, order) cache
        self.load_state_dict(None)

    # ---- state ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"version": 1, "seed": self.seed, "rng": self._rng.bit_generator.state,
                "epoch": dict(self._epoch), "cursor": dict(self._cursor), "draws": self._draws,
                "buffer": [list(b) for b in self._buffer],
                "num_records": {k: len(self.ds.indices[k]) for k in self.kinds}}

    def load_state_dict(self, state: dict | None) -> None:
        """Restore a state_dict() (None: the initial state)."""
        self._samples.clear()
        if state is None:
            self._rng = np.random.default_rng([self.seed, 0x6D6978])
            self._epoch = {k: 0 for k in self.kinds}
            self._cursor = {k: 0 for k in self.kinds}
            self._draws, self._buffer = 0, []
            return
        have = {k: len(self.ds.indices[k]) for k in self.kinds}
        if state.get("version") != 1 or state["seed"] != self.seed or state["num_records"] != have:
            raise ValueError(f"sampler state does not match this sampler/dataset: seed {state.get('seed')} vs "
                             f"{self.seed}, records {state.get('num_records')} vs {have}")
        self._rng = np.random.default_rng()
        self._rng.bit_generator.state = state["rng"]
        self._epoch, self._cursor = dict(state["epoch"]), dict(state["cursor"])
        self._draws = int(state["draws"])
        # the buffered samples, rebuilt from (index, draw) (deterministic); one this sampler cannot use (a resume with
        # a smaller seq_len: truncated to no loss token, or skipped) is dropped, as _fill drops such a draw
        self._buffer = []
        for entry in ((int(i), int(d)) for i, d in state["buffer"]):
            s = self._build(*entry)
            if s is not None and len(s) > 0:
                self._samples[entry[1]] = s
                self._buffer.append(entry)

    # ---- drawing ----------------------------------------------------------------------------------------
    def _order(self, kind: str) -> np.ndarray:
        epoch = self._epoch[kind]
        cached = self._perm.get(kind)
        if cached is None or cached[0] != epoch:
            idx = np.asarray(self.ds.indices[kind])
            if self.shuffle:
                idx = idx[np.random.default_rng([self.seed, KINDS.index(kind), epoch]).permutation(len(idx))]
            self._perm[kind] = cached = (epoch, idx)
        return cached[1]

    def _draw(self) -> tuple[int, int]:
        kind = self.kinds[min(int(np.searchsorted(self._cum, self._rng.random(), side="right")),
                              len(self.kinds) - 1)]
        index = int(self._order(kind)[self._cursor[kind]])
        self._cursor[kind] += 1
        if self._cursor[kind] == len(self.ds.indices[kind]):
            self._epoch[kind] += 1
            self._cursor[kind] = 0
        self._draws += 1
        return index, self._draws - 1

    def _build(self, index: int, draw: int) -> Sample | None:
        s = self.ds.sample(index, draw)
        if s is None or len(s) <= self.seq_len:
            return s
        if self.overflow == "skip":
            self._warn_once("skip", f"skipping samples longer than seq_len={self.seq_len} (first: {s.kind} "
                                    f"record {index}, {len(s)} tokens; not reported again)")
            return None
        out = truncate(s, self.seq_len, self.ds.tok.image_id, self.ds.num_image_tokens)
        if not ((out.text_labels != IGNORE).any() or (out.image_labels != IGNORE).any()):
            self._warn_once("empty", f"dropping samples with no loss token left after truncation to seq_len="
                                     f"{self.seq_len} (first: {s.kind} record {index}; not reported again)")
            return None
        self._warn_once("truncate", f"truncating samples longer than seq_len={self.seq_len} (first: {s.kind} "
                                    f"record {index}, {len(s)} -> {len(out)} tokens; not reported again)")
        return out

    def _warn_once(self, what: str, msg: str) -> None:
        if what not in self._warned:
            self._warned.add(what)
            warnings.warn(msg, DataWarning, stacklevel=4)

    def _fill(self) -> None:
        failures = 0
        while len(self._buffer) < self.lookahead:
            entry = self._draw()
            s = self._build(*entry)
            if s is None or len(s) == 0:
                failures += 1
                if failures > _MAX_FAILED_DRAWS:
                    raise RuntimeError(f"{_MAX_FAILED_DRAWS} draws in a row gave no usable sample")
                continue
            self._samples[entry[1]] = s
            self._buffer.append(entry)

    # ---- packing ----------------------------------------------------------------------------------------
    def next_batch(self) -> PackedBatch:
        rows = []
        for _ in range(self.batch_size):
            row, used = [], 0
            while True:
                self._fill()
                room = self.seq_len - used
                fit = next((j for j, (_, draw) in enumerate(self._buffer) if len(self._samples[draw]) <= room), None)
                if fit is None:
                    break
                entry = self._buffer.pop(fit)
                s = self._samples.pop(entry[1])
                row.append((entry, s))
                used += len(s)
            rows.append(row)
        return collate(rows, self.seq_len, self.ds.tok.pad_id)

    def __iter__(self):
        while True:
            yield self.next_batch()


def truncate(s: Sample, seq_len: int, image_id: int, num_image_tokens: int) -> Sample:
    """First seq_len tokens of s, cut further back to the BOI of an understanding image it would split."""
    keep = seq_len
    placeholder = (s.input_ids == image_id) & ~s.is_gen_image  # [T]
    n_full = int(placeholder[:keep].sum()) // num_image_tokens
    if int(placeholder[:keep].sum()) % num_image_tokens:
        keep = int(placeholder.nonzero()[n_full * num_image_tokens]) - 1  # the split image's BOI
    pv = s.pixel_values[:n_full] if s.pixel_values is not None and n_full else None
    return Sample(s.input_ids[:keep], s.is_gen_image[:keep], s.text_labels[:keep], s.image_labels[:keep],
                  pv, s.kind, s.index)


def collate(rows: list[list[tuple[tuple[int, int], Sample]]], seq_len: int, pad_id: int) -> PackedBatch:
    """Rows of ((index, draw), Sample) -> PackedBatch [len(rows), seq_len], padding at the end of each row."""
    b, L = len(rows), seq_len
    input_ids = torch.full((b, L), pad_id, dtype=torch.long)
    is_gen = torch.zeros(b, L, dtype=torch.bool)
    text_labels = torch.full((b, L), IGNORE, dtype=torch.long)
    image_labels = torch.full((b, L), IGNORE, dtype=torch.long)
    positions = torch.zeros(b, L, dtype=torch.long)
    segment_ids = torch.zeros(b, L, dtype=torch.long)
    seg_lens, pixels, docs = [], [], []
    for r, row in enumerate(rows):
        t = 0
        for _, s in row:
            n = len(s)
            input_ids[r, t:t + n] = s.input_ids
            is_gen[r, t:t + n] = s.is_gen_image
            text_labels[r, t:t + n] = s.text_labels
            image_labels[r, t:t + n] = s.image_labels
            positions[r, t:t + n] = torch.arange(n)
            segment_ids[r, t:t + n] = len(seg_lens)
            seg_lens.append(n)
            if s.pixel_values is not None:
                pixels.append(s.pixel_values)
            t += n
        if t < L:  # padding tail: its own segment so varlen attention covers every token
            positions[r, t:] = torch.arange(L - t)
            segment_ids[r, t:] = len(seg_lens)
            seg_lens.append(L - t)
        docs.append([(s.kind, i, d) for (i, d), s in row])
    cu = torch.zeros(len(seg_lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(seg_lens), 0)
    return PackedBatch(input_ids, is_gen, text_labels, image_labels, positions, cu, max(seg_lens), segment_ids,
                       torch.cat(pixels) if pixels else None, docs)


def prefetch(sampler: PackedSampler, depth: int = 2):
    """Yield (batch, state) with batches built `depth` ahead in a background thread (image decoding and
    preprocessing overlap the training step). `state` is the sampler state right after that batch: save it
    with the checkpoint of the step that consumed the batch to resume exactly there. Close the generator
    (or let it be collected) to stop the thread; do not call the sampler directly meanwhile."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work():
        try:
            while not stop.is_set():
                item = (sampler.next_batch(), sampler.state_dict())
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        pass
        except BaseException as e:  # handed to the consumer
            q.put(e)

    thread = threading.Thread(target=work, name="janus-data", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)

"""The generation engine: continuous batching of text-to-image and understanding requests over a paged KV
cache, with prompt sharing (the n images of a prompt hold its conditional and unconditional KV once)."""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch

from janus_rt import ops
from janus_rt.engine.block_manager import BlockManager
from janus_rt.engine.kv_cache import KVCache
from janus_rt.engine.request import Request, SamplingParams
from janus_rt.engine.runner import ModelRunner
from janus_rt.engine.scheduler import Scheduler
from janus_rt.engine.threads import TeamGovernor
from janus_rt.errors import UsageError, check_count, env_switch
from janus_rt.processing import unconditional_ids

MAX_NUM_ROWS = 256  # Engine's default max_num_rows: rows one step runs (an image takes 2 with CFG)


def default_backend(device: torch.device) -> str:
    if device.type == "cuda":
        return "triton"
    from janus_rt import cpu_ops

    return "cpu" if cpu_ops.available() else "torch"


@dataclass
class EngineStats:
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0
    decode_rows: int = 0  # rows summed over decode steps

    @property
    def ms_per_step(self) -> float:
        return 1e3 * self.decode_s / max(self.decode_steps, 1)


def kv_cache_dtype_of(name: str | torch.dtype | None, model_dtype: torch.dtype, device) -> torch.dtype:
    """The KV cache dtype an engine allocates: None or "auto" = the model's; "int8" (or torch.int8) = int8 rows with
    fp32 scales, on the CPU only (csrc kernels; the torch backend's reference elsewhere in tests)."""
    if name is None or name == "auto" or name == model_dtype:
        return model_dtype
    if name in ("int8", torch.int8):
        if torch.device(device).type != "cpu":
            raise UsageError(f"the int8 KV cache runs on the CPU only (csrc kernels); the model is on {device}")
        return torch.int8
    raise UsageError(f"kv_cache_dtype must be 'auto' or 'int8', got {name!r}")


class Engine:
    def __init__(self, model, kv_cache_gb: float | None = None, memory_fraction: float | None = None,
                 block_size: int = 16, backend: str | None = None, max_num_rows: int = MAX_NUM_ROWS,
                 cuda_graphs: bool = False, max_num_blocks: int | None = None, max_steps_per_call: int = 8,
                 kv_cache_dtype: str | torch.dtype | None = None):
        cfg = model.cfg.llm
        if max_steps_per_call < 1:
            raise ValueError(f"max_steps_per_call must be >= 1, got {max_steps_per_call}")
        # multi-step decode of image rows: up to this many decode steps per engine step while no request waits;
        # see _decode_images_cpu (the CPU) and _decode_images_graph (CUDA graphs: exactly the graph's steps)
        self.max_steps_per_call = max_steps_per_call
        device = model.device
        self.model = model
        self.backend = backend or default_backend(device)
        if kv_cache_gb is None and memory_fraction is None:
            memory_fraction = 0.3
        if kv_cache_gb is None and max_num_blocks is None:  # a fraction of memory, but no more than max_num_rows
            # rows at the model's longest context can use (a small model's cache took 30 % of RAM, 7.5 GB for 1 M
            # parameters)
            max_num_blocks = max_num_rows * -(-cfg.max_position // block_size)
        # the KV cache's element type: the model's (default, "auto") or "int8" (CPU: rows + scales, kv_quant.py)
        kv_dtype = kv_cache_dtype_of(kv_cache_dtype, model.dtype, device)
        self.cache = KVCache.from_budget(
            cfg.num_layers, block_size, cfg.num_kv_heads, cfg.head_dim, kv_dtype, device,
            budget_bytes=None if kv_cache_gb is None else int(kv_cache_gb * 2**30),
            memory_fraction=memory_fraction if kv_cache_gb is None else None, max_num_blocks=max_num_blocks)
        self.bm = BlockManager(self.cache.num_blocks, block_size)
        self.scheduler = Scheduler(self.bm, max_num_rows, block_bytes=self.cache.bytes_per_block)
        self.runner = ModelRunner(model, self.cache, self.backend, cuda_graphs=cuda_graphs)
        self.stats = EngineStats()
        self.finished: dict[int, Request] = {}
        self.aborted: dict[int, Request] = {}  # abort()'s
        self.step_requests: list[Request] = []  # the requests the latest step() prefilled or decoded
        self.record_logits = False  # tests/debugging: keep each step's (cond, uncond) logits on the request
        self._image_batch = (None, None)  # (the decoding image requests, their per-row tensors): see _image_rows
        # CPU: one thread instead of the team while other processes take the cores (threads.py); made by the first
        # decode step, in the thread that steps (its OpenMP team is the one to size); False: not adapted
        self.governor: TeamGovernor | None | bool = None if device.type == "cpu" else False

    @classmethod
    def for_requests(cls, model, shapes: list[tuple[int, int]], block_size: int = 16, **kw) -> "Engine":
        """An engine whose cache holds exactly these requests at once, unshared (worst case):
        shapes = [(prompt_len, n)] for image requests, n = 0 for a text request of that total length."""
        bn = lambda t: -(-t // block_size)
        n_img = model.cfg.num_image_tokens
        blocks = sum(2 * n * bn(t + n_img) if n else bn(t) for t, n in shapes)
        return cls(model, block_size=block_size, max_num_blocks=blocks, **kw)

    # ---- requests ------------------------------------------------------------------------------------------
    def add_image_request(self, prompt_ids, n: int = 1, params: SamplingParams | None = None,
                          num_tokens: int | None = None) -> Request:
        """prompt_ids [T] (BOS ... <begin_of_image>); num_tokens: tokens per image (default: a whole image)."""
        n = check_count("n", n)
        if num_tokens is not None:
            num_tokens = check_count("num_tokens", num_tokens)
        if n > self.scheduler.max_num_rows // 2:  # (checked before anything is built per image)
            raise UsageError(f"n = {n} images need {2 * n} rows (CFG: 2 an image) but the engine runs at most "
                             f"{self.scheduler.max_num_rows} (max_num_rows)")
        ids = self._prompt(prompt_ids)
        tok = self.model.cfg.tokens
        req = Request(ids, params or SamplingParams(), kind="image", n=n,
                      max_new_tokens=num_tokens or self.model.cfg.num_image_tokens,
                      uncond_ids=unconditional_ids(ids, tok.pad_id).tolist())
        self.scheduler.add(req)
        return req

    def add_text_request(self, prompt_ids, pixel_values=None, max_new_tokens: int = 256,
                         params: SamplingParams | None = None) -> Request:
        ids = self._prompt(prompt_ids)
        max_new_tokens = check_count("max_new_tokens", max_new_tokens)
        holes = ids.count(self.model.cfg.tokens.image_id)  # checked here, not in the prefill (a step shared by others)
        size = self.model.cfg.vision.image_size
        if pixel_values is not None and (not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4
                                         or tuple(pixel_values.shape[1:]) != (3, size, size)):
            got = (list(pixel_values.shape) if isinstance(pixel_values, torch.Tensor)
                   else type(pixel_values).__name__)
            raise UsageError(f"pixel_values must be a tensor [images, 3, {size}, {size}] (processing."
                             f"preprocess_image, stacked), got {got}")
        images = 0 if pixel_values is None else len(pixel_values)
        if holes != images * self.model.cfg.vision.num_patches:
            raise UsageError(f"the prompt holds {holes} image placeholders but {images} image(s) fill "
                             f"{images * self.model.cfg.vision.num_patches} (a question quoting the placeholder "
                             f"token?)")
        req = Request(ids, params or SamplingParams(greedy=True), kind="text", max_new_tokens=max_new_tokens,
                      pixel_values=pixel_values, eos_id=self.model.cfg.tokens.eos_id)
        self.scheduler.add(req)
        return req

    def _prompt(self, prompt_ids) -> list[int]:
        """prompt_ids as a list of ints, at least one, each a token of the model's vocabulary (an id past it, or no
        token at all, failed inside a shared step and broke the engine for every request in it)."""
        ids = [int(i) for i in torch.as_tensor(prompt_ids).flatten().tolist()]
        if not ids:  # (an empty prompt failed the prefill step it was in, and every request prefilled beside it)
            raise UsageError("the prompt is empty: it needs at least one token (BOS)")
        vocab = self.model.cfg.llm.vocab_size
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise UsageError(f"prompt id {bad[0]} is outside the model's vocabulary [0, {vocab})")
        return ids

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def abort(self, req: Request | int) -> Request | None:
        """Drop a request before it finishes (its client gone, a deadline passed), between steps (not from another
        thread while step() runs): a waiting request leaves the queue, with any K/V a preemption copied out; a running
        one gives its blocks back at once, so the next step admits what they make room for. The other requests'
        tokens are unchanged. Its tokens so far stay on it and `aborted` is set; it is kept in `self.aborted`, not
        in `finished`. -> the request, or None where none with that id is waiting or running (finished, already
        aborted, unknown)."""
        req_id = req if isinstance(req, int) else req.req_id
        got = self.scheduler.remove(req_id)
        if got is not None:
            got.aborted = True
            self.aborted[req_id] = got
        return got

    # ---- one engine step -----------------------------------------------------------------------------------
    def step(self) -> list[Request]:
        """Prefill newly admitted requests if any, else decode one token for every running row (on the CPU image
        path up to max_steps_per_call tokens each: multi-step decode, see _decode_images_cpu; stats.decode_steps
        counts them; likewise the CUDA-graph image path). Returns the requests that finished in this step."""
        self.step_requests = []
        admitted = self.scheduler.admit()
        # what this step works on: the admitted requests' prefill, else every running request's decode (a caller
        # whose step raised fails these, not requests the step never touched)
        self.step_requests = list(admitted or self.scheduler.running)
        if admitted:
            t0 = time.perf_counter()
            self._prefill(admitted)
            self.stats.prefill_s += time.perf_counter() - t0
        else:
            if not self.scheduler.running:
                raise RuntimeError("no request fits the KV cache (add_image_request / add_text_request check this; "
                                   "please report)")
            t0 = time.perf_counter()  # a preemption's K/V copy counts as decode time
            self.scheduler.make_room_for_decode(on_preempt=self._swap_out)
            if not self.scheduler.running:  # cannot happen for requests that passed add()'s size check
                raise RuntimeError("KV cache exhausted by a single request")
            governor = self._governor()
            with governor.step() if governor else contextlib.nullcontext():
                steps = self._decode()
            self.stats.decode_s += time.perf_counter() - t0
            self.stats.decode_steps += steps
        done = [r for r in self.scheduler.running if r.finished]
        for r in done:
            self.scheduler.finish(r)
            self.finished[r.req_id] = r
        if self.governor and not self.scheduler.running:  # (the next request starts on the team)
            self.governor.restore()
        return done

    def _governor(self) -> TeamGovernor | bool:
        """The CPU decode's TeamGovernor, made on first use in the stepping thread; False where it does not apply
        (not the CPU, JANUS_RT_ADAPTIVE_THREADS=0). A thread on one thread (its step() call reads the count each time)
        is left alone."""
        if self.governor is None:
            self.governor = TeamGovernor() if env_switch("JANUS_RT_ADAPTIVE_THREADS") == "1" else False
        return self.governor

    def _embed_text(self, ids, pixel_values=None):
        ids_t = torch.tensor(ids, device=self.model.device)[None]
        return self.model.text_embeds(ids_t, pixel_values)[0]

    def _swap_out(self, req: Request) -> None:
        """A request about to be preempted: each row's K/V (every layer) copied to host memory in one gather, so that
        its return restores exactly what it had (a recompute through the prefill rounds differently in bf16, and its
        sampled tokens could then differ from an uninterrupted run's). Costs host memory while it waits: each row's
        whole K/V, the prompt its n images shared in the pool included (up to 2n prompt copies more than the pool
        held for it)."""
        rows = req.row_ids()
        slots = [self.bm.slots(rid) for rid in rows]
        with torch.inference_mode():
            kv = self.cache.read_slots([s for row in slots for s in row])  # [L, 2, sum T, H, D (int8: D + 4)]
        req.swapped = dict(zip(rows, kv.split([len(row) for row in slots], dim=2)))

    def _swap_in(self, req: Request) -> None:
        """Each row of a preempted request gets blocks of its own again (no prompt sharing) and its K/V back."""
        if req.swapped is None:
            raise RuntimeError(f"request {req.req_id} was preempted without its K/V copied out (on_preempt)")
        with torch.inference_mode():
            for rid, kv in req.swapped.items():
                self.bm.allocate(rid, kv.shape[2])
                self.cache.write_slots(self.bm.slots(rid), kv)
        req.swapped = None

    @torch.inference_mode()
    def _prefill(self, reqs: list[Request]) -> None:
        seqs = []  # (seq_id, embeds [T, C])
        fresh = []  # requests whose first token is sampled from this prefill
        with ops.use_backend(self.backend):
            for req in reqs:
                if req.preempted:  # back from preemption: its rows' K/V restored, nothing to compute
                    self._swap_in(req)
                elif req.kind == "text":
                    seqs.append(((req.req_id, "t", 0), self._embed_text(req.prompt_ids, req.pixel_values)))
                else:
                    seqs.append(((req.req_id, "pc"), self._embed_text(req.prompt_ids)))
                    seqs.append(((req.req_id, "pu"), self._embed_text(req.uncond_ids)))
                if not req.preempted:
                    fresh.append(req)
        for sid, e in seqs:
            self.bm.allocate(sid, e.shape[0])
        # each request's prompts in a forward of their own, and its heads on its own rows: what a request computes
        # must not depend on what was admitted beside it (one packed forward of every admitted prompt crossed the cpu
        # backend's GEMV/matmul switch at CPU_GEMV_MAX_ROWS tokens, so a prompt's K/V and first logits differed in the
        # last bits from its prefill alone; an int8 KV cache then rounded some rows to another step, and tokens
        # changed)
        last, groups = {}, {}
        for sid, e in seqs:
            groups.setdefault(sid[0], []).append((sid, e))
        for group in groups.values():
            h = self.runner.prefill([e for _, e in group], [self.bm.slots(sid) for sid, _ in group])
            last.update({sid: h[i] for i, (sid, _) in enumerate(group)})
        for req in reqs:
            req.preempted = False
        image_reqs = [r for r in fresh if r.kind == "image"]
        if image_reqs:
            with ops.use_backend(self.backend):
                head = lambda part: torch.cat([self.model.gen_head(last[(r.req_id, part)][None]) for r in image_reqs])
                cond, uncond = head("pc").float(), head("pu").float()
            idx = torch.tensor([i for i, r in enumerate(image_reqs) for _ in range(r.n)], device=cond.device)
            self._sample_images(image_reqs, cond[idx], uncond[idx])
            for r in image_reqs:  # the n images share the two prompts' blocks
                for i in range(r.n):
                    self.bm.fork((r.req_id, "pc"), (r.req_id, "c", i))
                    self.bm.fork((r.req_id, "pu"), (r.req_id, "u", i))
                self.bm.free((r.req_id, "pc"))
                self.bm.free((r.req_id, "pu"))
                # each row's image tokens in one run of the pool (BlockManager.reserve)
                self.bm.reserve_all([((r.req_id, "c", i), len(r.prompt_ids) + r.max_new_tokens) for i in range(r.n)]
                                    + [((r.req_id, "u", i), len(r.uncond_ids) + r.max_new_tokens) for i in range(r.n)])
        text_reqs = [r for r in fresh if r.kind == "text"]
        if text_reqs:
            with ops.use_backend(self.backend):
                logits = torch.cat([self._lm_head(last[(r.req_id, "t", 0)][None]) for r in text_reqs]).float()
            self._sample_text(text_reqs, logits)

    @torch.inference_mode()
    def _decode(self) -> int:
        """Decode a token for every running row (or several, _decode_images_cpu) -> the number of steps taken."""
        running = self.scheduler.running
        rows = self.scheduler.rows()
        slots = self._append_step(rows)
        # inputs in row order: image requests feed each image's last token to its cond and uncond rows (embedded
        # once per image and repeated, as the official loop does)
        image_tok, text_tok, is_image = [], [], []
        for req in running:
            if req.kind == "image":
                image_tok += [t[-1] for t in req.tokens]
                is_image += [True] * req.num_rows
            else:
                text_tok.append(req.tokens[0][-1])
                is_image.append(False)
        image_reqs = [r for r in running if r.kind == "image"]
        text_reqs = [r for r in running if r.kind == "text"]
        positions = [self.bm.num_tokens(r) - 1 for r in rows]
        self.stats.decode_rows += len(rows)
        if (image_reqs and not text_reqs and not self.record_logits and self.runner.uses_cpu_decoder()
                and self.runner.cpu_decoder.image_steps_possible(len(rows), max(positions))):
            return self._decode_images_cpu(image_reqs, rows, image_tok, positions, slots)
        if image_reqs and not text_reqs and not self.record_logits and self.runner.image_graphs:
            k = self.runner.image_steps_possible(len(rows), max(positions) + self.max_steps_per_call)
            if k and self._graph_steps_fit(image_reqs, rows, k):
                return self._decode_images_graph(image_reqs, rows, image_tok, positions, slots, k)
        tables = [self.bm.block_table(r) for r in rows]
        with ops.use_backend(self.backend):
            parts = []
            if image_tok:
                e = self.runner.gen_embeds(torch.tensor(image_tok, device=self.model.device))  # [sum(n), C]
                parts.append(e.index_select(0, self._image_rows(image_reqs, e.device)["embed"]))
            if text_tok:
                parts.append(self.model.llm.embed_tokens(torch.tensor(text_tok, device=self.model.device)))
        embeds = parts[0] if len(parts) == 1 else self._interleave(parts, is_image)
        h = self.runner.decode(embeds, positions, slots, tables)
        with ops.use_backend(self.backend):
            if image_reqs:
                h_img = h if not text_reqs else h[torch.tensor(is_image, device=h.device)]
                logits = self.runner.gen_head(h_img).float()  # [2 * sum(n), V]: per request cond rows, uncond rows
                rows = self._image_rows(image_reqs, logits.device)
                if len(image_reqs) == 1:  # one request: the two halves, no copy
                    n = image_reqs[0].n
                    cond, uncond = logits[:n], logits[n:]
                else:
                    cond, uncond = logits.index_select(0, rows["cond"]), logits.index_select(0, rows["uncond"])
                self._sample_images(image_reqs, cond, uncond)
            if text_reqs:
                mask = ~torch.tensor(is_image, device=h.device)
                self._sample_text(text_reqs, self._lm_head(h[mask]).float())
        return 1

    def _decode_images_cpu(self, image_reqs, rows, image_tok, positions, slots) -> int:
        """The decode step of a batch of image rows as csrc calls only (cpu_step.ImageStep), k steps in one call:
        k = 1 while a request waits (so admission is never delayed), else up to max_steps_per_call, no more than any
        running request has left (none finishes inside the call: the batch, and so every token, is what k single
        steps would give) and as many as the KV pool can append without preempting. Each extra step's slots are
        appended here, before the call; the first step's by the caller. -> k."""
        dec = self.runner.cpu_decoder
        k = 1
        if not self.scheduler.waiting:
            k = min([self.max_steps_per_call] + [r.max_new_tokens - r.step for r in image_reqs])
        all_slots = [slots]
        while (len(all_slots) < k and dec.image_steps_possible(len(rows), max(positions) + len(all_slots))
               and self.bm.can_append_all(rows)):
            all_slots.append(self._append_step(rows))
        k = len(all_slots)
        tables = [self.bm.block_table(r) for r in rows]
        a = self._image_rows(image_reqs, self.model.device)
        seeds = [[s for r in image_reqs for s in r.seeds(r.step + j)] for j in range(k)]
        for tokens in dec.image_steps(image_tok, a["embed"], positions, all_slots, tables, a["cond"], a["uncond"],
                                      a, seeds):
            self._append_images(image_reqs, tokens)
        self.stats.decode_rows += (k - 1) * len(rows)  # (the caller counted the first step's)
        return k

    def _append_step(self, rows) -> list[int]:
        """Reserve one more token's slot in every row -> the slots; a row's first write to a shared, partly filled
        block copies that block first."""
        slots, copies = self.bm.append_slots(rows)
        if copies:
            self.cache.copy_blocks(copies)
        return slots

    def _graph_steps_fit(self, image_reqs, rows, k) -> bool:
        """Whether the multi-step image graph's k steps can run now: no request waits (admission is never delayed),
        every request has k tokens left (none finishes inside the replay), and the KV pool surely holds k - 1 more
        tokens for every row (at most ceil((k - 1) / block_size) + 1 new blocks each, a copied shared block
        counted), so appending them cannot fail halfway."""
        if self.scheduler.waiting or k > self.max_steps_per_call:
            return False
        if any(r.max_new_tokens - r.step < k for r in image_reqs):
            return False
        per_row = -(-(k - 1) // self.bm.block_size) + 1
        return self.bm.num_free_blocks >= per_row * len(rows)

    def _decode_images_graph(self, image_reqs, rows, image_tok, positions, slots, k) -> int:
        """k decode steps of a batch of image rows in one replay of the runner's multi-step image graph (a GPU's
        counterpart of _decode_images_cpu; the conditions are _graph_steps_fit's). The first step's slots were
        appended by the caller, the other k - 1 steps' here. -> k."""
        all_slots = [slots]
        for _ in range(k - 1):
            all_slots.append(self._append_step(rows))
        tables = [self.bm.block_table(r) for r in rows]
        a = self._image_rows(image_reqs, self.model.device)
        seeds = [[s for r in image_reqs for s in r.seeds(r.step + j)] for j in range(k)]
        step_positions = [[p + j for p in positions] for j in range(k)]
        for tokens in self.runner.image_steps(image_tok, a["embed"], step_positions, all_slots, tables, a["cond"],
                                              a["uncond"], a, seeds):
            self._append_images(image_reqs, tokens)
        self.stats.decode_rows += (k - 1) * len(rows)  # (the caller counted the first step's)
        return k

    @staticmethod
    def _interleave(parts, is_image):
        image, text = parts
        out = torch.empty(len(is_image), image.shape[-1], dtype=image.dtype, device=image.device)
        mask = torch.tensor(is_image, device=image.device)
        out[mask] = image
        out[~mask] = text
        return out

    def _image_rows(self, reqs, device) -> dict:
        """Per-row tensors of a batch of image requests (CFG row indices, each row's image embedding, sampling
        parameters), rebuilt only when
        the batch's requests change: building them every step was a good part of a step's host time."""
        key = tuple((r.req_id, r.n) for r in reqs)
        if self._image_batch[0] != key:
            cond, uncond, embed, off = [], [], [], 0
            for r in reqs:
                cond += range(off, off + r.n)
                uncond += range(off + r.n, off + 2 * r.n)
                embed += list(range(off // 2, off // 2 + r.n)) * 2  # each image's embedding to its two rows
                off += 2 * r.n
            per = [r.params for r in reqs for _ in range(r.n)]
            t = lambda values: torch.tensor(values, device=device)  # on the logits' device: no per-step copies
            self._image_batch = (key, dict(
                cond=t(cond), uncond=t(uncond), embed=t(embed), cfg_weight=t([float(p.cfg_weight) for p in per]),
                temperature=t([float(p.temperature) for p in per]), top_k=t([int(p.top_k) for p in per]),
                top_p=t([float(p.top_p) for p in per]), greedy=t([bool(p.greedy) for p in per])))
        return self._image_batch[1]

    def _sample_images(self, reqs, cond, uncond) -> None:
        """cond, uncond: fp32 [sum(n), V] in request order -> each request appends one token per image."""
        if self.record_logits:
            off = 0
            for r in reqs:
                r.logits.append((cond[off : off + r.n].cpu(), uncond[off : off + r.n].cpu()))
                off += r.n
        a = self._image_rows(reqs, cond.device)
        seeds = torch.tensor([s for r in reqs for s in r.seeds(r.step)], dtype=torch.int64)
        tokens = ops.cfg_sample(cond, uncond, a["cfg_weight"], a["temperature"], a["top_k"], a["top_p"],
                                seeds.to(cond.device), a["greedy"]).tolist()
        self._append_images(reqs, tokens)

    @staticmethod
    def _append_images(reqs, tokens) -> None:
        """tokens: one per image, in request order -> each request appends its n."""
        off = 0
        for r in reqs:
            r.append(tokens[off : off + r.n])
            off += r.n

    def _sample_text(self, reqs, logits) -> None:
        seeds = torch.tensor([r.seeds(r.step)[0] for r in reqs], dtype=torch.int64)
        per = lambda f, dt=None: torch.tensor([f(r.params) for r in reqs], dtype=dt)
        tokens = ops.cfg_sample(logits.contiguous(), None, 1.0, per(lambda p: float(max(p.temperature, 1e-6))),
                                per(lambda p: int(p.top_k)), per(lambda p: float(p.top_p)), seeds.to(logits.device),
                                per(lambda p: bool(p.greedy))).tolist()
        for r, t in zip(reqs, tokens):
            r.append([t])

    # ---- drivers -------------------------------------------------------------------------------------------
    def run(self, progress: bool = False, desc: str = "generating", on_finish=None,
            finish_note: str | None = None) -> dict[int, Request]:
        """Step until every request has finished; returns {req_id: request}. on_finish(request), if given, is
        called for each request as soon as it finishes (its tokens complete, its blocks freed); with a progress bar,
        finish_note is shown beside it while on_finish runs (e.g. a VQ decode: ~1 s an image on a 2-core CPU, when
        the bar would otherwise sit still)."""
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=self._remaining(), desc=desc, unit="tok")
        done = {}
        try:
            while self.has_work():
                before = self._progress()
                ended = self.step()
                if bar is not None:  # the total follows what is left: requests added, aborted, ended at EOS
                    bar.total = bar.n + self._progress() - before + self._remaining()
                    bar.update(self._progress() - before)
                for r in ended:
                    done[r.req_id] = r
                    if on_finish is not None:
                        if bar is not None and finish_note:
                            bar.set_postfix_str(f"{finish_note} (request {r.req_id})")
                        on_finish(r)  # which may add requests, or abort some
                        if bar is not None:
                            bar.total = bar.n + self._remaining()
                            bar.set_postfix_str("", refresh=False)
        finally:  # also on Ctrl-C: the bar's last line before whatever is said next
            if bar is not None:
                bar.close()
        return done

    def _lm_head(self, h):
        """Text rows' logits [R, vocab] (h's dtype): the CPU decoder's packed copy of the LM head where it holds one."""
        dec = self.runner.cpu_decoder
        if dec is not None:
            return dec.lm_head(h)
        with ops.batch_invariant():  # (the rows of a decode step's text requests)
            return ops.linear(h, self.model.lm_head.weight)

    @staticmethod
    def _tokens_per_step(r: Request) -> int:
        return r.n if r.kind == "image" else 1  # an image request samples one token per image a step

    def _progress(self) -> int:
        """Tokens sampled so far, summed over requests (as the reported tokens/s counts them; a preempted request
        keeps its tokens while it waits)."""
        s = self.scheduler
        return sum(r.step * self._tokens_per_step(r)
                   for r in (*s.waiting, *s.running, *self.finished.values(), *self.aborted.values()))

    def _remaining(self) -> int:
        """Tokens the waiting and running requests have still to sample (at most: a text answer may end early)."""
        s = self.scheduler
        return sum((r.max_new_tokens - r.step) * self._tokens_per_step(r) for r in (*s.waiting, *s.running))

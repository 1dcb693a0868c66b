"""The engine: requests come and go at any time, and every step batches all of them wherever they
are.

One :meth:`Engine.step` runs, each as one batched forward over every request that needs it:

1. prefill: the next chunk of each admitted prompt's tokens but the last (the reference's first
   prefill pass), at most ``prefill_chunk`` tokens per step over all requests, so a long prompt does
   not stall the others;
2. the fixed-shape steps of :mod:`.steps`: the denoiser over every mask-diffusion request's current
   block, whatever its block and step (t per sequence), with the mask-sampling decision; the AR
   step (feed the pending token, draw the next) and the mock-AR step of every such request (the
   first pending token is the last prompt token: the reference's second prefill pass); one token
   into the context for diffusion requests whose prefill just finished;
3. one read of every step's small outputs to the host (tokens, commit counts), then the context
   pass (n = block_size) that commits every diffusion block finished in this step.

Finished requests leave at once and free their slot; waiting ones are admitted into free slots.
Each request keeps its own sampling parameters, Philox seed and counter offset, so its output is
what it would be alone. The cache memory is a :class:`SlotPool` planned up front; the steps run
through a :class:`StepRunner` (bucketed batch sizes and CUDA graphs on the GPU with ``graphs``).
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from ..generate import MODES, SamplingParams, check_input_ids
from ..model.tower import TwoTowerLM
from .pool import PoolPlan, SlotPool, plan_pool
from .steps import StepKey, StepRunner

log = logging.getLogger("twotower_rt.engine")

DEFAULT_PREFILL_CHUNK = 2048


@dataclass
class RequestOutput:
    """What a request has produced so far. ``new_tokens``: the tokens added by the last step that
    reported this request; ``generated``: all of them; ``finish_reason`` "eos", "length" or
    "aborted" once ``finished``."""

    request_id: str
    prompt: list[int]
    generated: list[int]
    new_tokens: list[int]
    finished: bool
    finish_reason: str | None
    nfe: int
    commits_per_step: list[list[int]] | None


@dataclass
class _Request:
    id: str
    prompt: list[int]
    mode: str
    params: SamplingParams
    seed: int
    slot: int | None = None
    prefilled: int = 0  # tokens of prompt[:-1] in the cache
    started: bool = False  # the last prompt token is in the cache
    offset: int = 0  # Philox counter: draws this request took part in
    output: list[int] = field(default_factory=list)
    reported: int = 0  # len(output) at the last report
    nfe: int = 0
    commits: list[list[int]] = field(default_factory=list)
    finish_reason: str | None = None
    pending: int | None = None  # ar, mock_ar: the token to feed next (then draw the next one)
    block: torch.Tensor | None = None  # mask_diffusion: the current block (S,)
    block_step: int = 0

    @property
    def sampled(self) -> bool:
        return self.params.temperature > 0

    def snapshot(self) -> RequestOutput:
        new = self.output[self.reported :]
        self.reported = len(self.output)
        return RequestOutput(
            self.id, self.prompt, list(self.output), new, self.finish_reason is not None,
            self.finish_reason, self.nfe,
            [list(c) for c in self.commits] if self.mode == "mask_diffusion" else None,
        )  # fmt: skip


class Engine:
    """Continuous batching over one model. ``add_request`` at any time; ``step`` advances every
    request by one forward of each kind; ``run`` / ``stream`` / ``generate`` drive the steps.

    model: a :class:`twotower_rt.TwoTowerModel` (text prompts need its tokenizer) or a
    :class:`TwoTowerLM`. Memory: ``max_slots`` sequences of ``context`` tokens each, or as many as
    ``memory_budget`` bytes (on a GPU: what is free up to ``gpu_memory_utilization``) hold; see
    :func:`plan_pool`. ``self.plan`` says what fit (also logged at start). ``graphs``: replay the
    fixed-shape steps as CUDA graphs per batch bucket (GPU only; needs every op free of host
    synchronisation: the MoE layers' grouped path); ``pad_batches``: bucket batch sizes without
    graphs (what graphs do, eagerly)."""

    def __init__(
        self,
        model,
        *,
        max_slots: int | None = None,
        context: int | None = None,
        memory_budget: int | None = None,
        gpu_memory_utilization: float = 0.9,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        graphs: bool = False,
        pad_batches: bool = False,
    ):
        self.lm: TwoTowerLM = model.lm if hasattr(model, "lm") else model
        self.tokenizer = getattr(model, "tokenizer", None)
        chunk = prefill_chunk
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"prefill_chunk must be an integer >= 1, got {prefill_chunk!r}")
        self.prefill_chunk = prefill_chunk
        self.plan: PoolPlan = plan_pool(
            self.lm.cfg, self.lm.dtype, self.lm.device, max_slots=max_slots, context=context,
            memory_budget=memory_budget, gpu_memory_utilization=gpu_memory_utilization,
        )  # fmt: skip
        self.pool = SlotPool(self.lm.cfg, self.plan, self.lm.dtype, self.lm.device)
        self.runner = StepRunner(self.lm, self.pool, graphs=graphs, pad=pad_batches)
        log.info(self.plan.describe())
        self._waiting: deque[_Request] = deque()
        self._running: list[_Request] = []
        self._requests: dict[str, _Request] = {}
        self._finished_now: list[_Request] = []  # finished since the last step's report
        self._blocks_to_commit: list[_Request] = []
        self._ids = itertools.count()

    # --- requests ----------------------------------------------------------------------------
    def add_request(
        self, prompt, mode: str = "mask_diffusion", *, request_id: str | None = None, **params
    ) -> str:
        """Queue one request: ``prompt`` token ids (or text, with a tokenizer), a mode and the
        parameters of :class:`SamplingParams` (seed: one int, or None for a fresh one). Returns
        its id. Refused at once (ValueError) if it is malformed or could never fit a slot."""
        vocab = self.lm.cfg.vocab_size
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("text prompts need a model with a tokenizer; pass token ids")
            prompt = self.tokenizer.encode(prompt).ids
        (ids,) = check_input_ids([prompt], vocab)
        p = SamplingParams(**params)
        if isinstance(p.seed, (list, tuple)):
            raise ValueError("seed must be one integer (or None) per request")
        p.validate(mode, vocab, 1)
        need = len(ids) + p.max_new_tokens
        if need > self.plan.context:
            raise ValueError(
                f"prompt ({len(ids)} tokens) + max_new_tokens ({p.max_new_tokens}) = {need} "
                f"exceeds the engine's context of {self.plan.context} tokens per sequence"
            )
        rid = str(next(self._ids)) if request_id is None else str(request_id)
        if rid in self._requests:
            raise ValueError(f"request id {rid!r} is already in use")
        seed = p.row_seeds(1)[0] if p.temperature > 0 else 0  # greedy draws no seed
        req = _Request(rid, ids, mode, p, seed)
        self._requests[rid] = req
        if p.max_new_tokens == 0:
            req.finish_reason = "length"
        else:
            self._waiting.append(req)
        return rid

    def abort(self, request_id: str) -> None:
        """Stop a request now (its slot is freed); its output so far stays readable."""
        req = self._requests[request_id]
        if req.finish_reason is None:
            if req in self._waiting:
                self._waiting.remove(req)
            self._finish(req, "aborted")

    def output(self, request_id: str) -> RequestOutput:
        return self._requests[request_id].snapshot()

    def pop(self, request_id: str) -> RequestOutput:
        """The request's output, forgetting the request (a finished one)."""
        out = self._requests[request_id].snapshot()
        if out.finished:
            del self._requests[request_id]
        return out

    def has_unfinished(self) -> bool:
        return bool(self._waiting or self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    # --- driving -----------------------------------------------------------------------------
    def run(self) -> None:
        """Step until every request has finished."""
        while self.has_unfinished():
            self.step()

    def stream(self, request_id: str) -> Iterator[list[int]]:
        """Yield the request's new tokens as steps produce them (the engine steps every request
        while this one runs). Independent of what :meth:`step` reports."""
        req = self._requests[request_id]
        seen = 0
        while True:
            if len(req.output) > seen:
                yield list(req.output[seen:])
                seen = len(req.output)
            if req.finish_reason is not None:
                return
            self.step()

    def generate(self, prompts, mode: str = "mask_diffusion", **params) -> list[RequestOutput]:
        """Every prompt as a request with the same parameters (seed: an int, None, or one per
        prompt), run to completion; outputs in prompt order."""
        seeds = params.pop("seed", None)
        prompts = list(prompts)
        if isinstance(seeds, (list, tuple)):
            if len(seeds) != len(prompts):
                raise ValueError(f"seed has {len(seeds)} entries for {len(prompts)} prompts")
        else:
            seeds = [seeds] * len(prompts)
        ids = [self.add_request(p, mode, seed=s, **params) for p, s in zip(prompts, seeds)]
        self.run()
        return [self.pop(i) for i in ids]

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """One step of every request; returns the outputs of those that produced tokens or
        finished."""
        self._admit()
        self._prefill()
        reads: list[tuple[torch.Tensor, Callable[[list[int]], None]]] = []
        self._denoise(reads)
        self._token_steps(reads)
        self._feed_last_prompt_tokens()
        blocks = self._read(reads)
        self._commit_blocks(blocks)
        reports = [r for r in self._running if r.reported < len(r.output)] + self._finished_now
        self._finished_now = []
        return [r.snapshot() for r in reports]

    # --- the phases --------------------------------------------------------------------------
    def _admit(self) -> None:
        while self._waiting and self.pool.free:
            req = self._waiting.popleft()
            req.slot = self.pool.acquire()
            self._running.append(req)

    def _tensor(self, values, dtype=torch.long) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=self.lm.device)

    def _batch(self, reqs) -> dict[str, torch.Tensor]:
        inputs = {"slots": self._tensor([r.slot for r in reqs])}
        if reqs[0].sampled:
            inputs["seed"] = self._tensor([r.seed for r in reqs])
            inputs["offset"] = self._tensor([r.offset for r in reqs])
        return inputs

    def _prefill(self) -> None:
        budget, chunk = self.prefill_chunk, []
        for req in self._running:
            todo = len(req.prompt) - 1 - req.prefilled
            if todo > 0 and budget > 0:
                take = min(todo, budget)
                chunk.append((req, take))
                budget -= take
        if not chunk:
            return
        width = max(take for _, take in chunk)
        rows = [r.prompt[r.prefilled : r.prefilled + t] for r, t in chunk]
        ids = self._tensor([row + [0] * (width - len(row)) for row in rows])
        n_valid = self._tensor([t for _, t in chunk])
        batch = self.pool.cache.select(self._tensor([r.slot for r, _ in chunk]))
        self.lm.context_forward(ids, batch, n_valid=n_valid)
        self.pool.cache.store(batch)
        for req, take in chunk:
            req.prefilled += take

    def _ready(self, req: _Request) -> bool:
        """The prompt but its last token is in the cache."""
        return req.slot is not None and req.prefilled == len(req.prompt) - 1

    def _denoise(self, reads) -> None:
        groups = {}
        for req in self._running:
            if req.mode == "mask_diffusion" and req.block is not None:
                p = req.params
                key = (p.block_size, p.mask_token_id, p.steps_per_block, p.confidence_threshold,
                       p.temperature)  # fmt: skip
                groups.setdefault(key, []).append(req)
        for params, reqs in groups.items():
            inputs = self._batch(reqs)
            inputs["block"] = torch.stack([r.block for r in reqs])
            inputs["step"] = self._tensor([r.block_step for r in reqs])
            out = self.runner.run(StepKey("denoise", params), inputs)
            blocks = out["block"].clone()  # a graph's outputs are overwritten by its next replay
            for i, req in enumerate(reqs):
                req.block, req.block_step = blocks[i], req.block_step + 1
                req.nfe += 1
                req.offset += int(req.sampled)

            def done(values, reqs=reqs, steps=params[2]):
                n = len(reqs)
                for req, committed, left in zip(reqs, values[:n], values[n:]):
                    req.commits[-1].append(committed)
                    if left == 0 or req.block_step == steps:
                        self._block_done(req)

            reads.append((torch.cat([out["committed"], out["left"]]), done))

    def _token_steps(self, reads) -> None:
        """The AR and mock-AR steps: feed each request's pending token, draw its next."""
        groups = {}
        for req in self._running:
            if req.mode in ("ar", "mock_ar") and not req.started and self._ready(req):
                req.pending = req.prompt[-1]  # the reference's second prefill pass
            if req.pending is not None:
                p = req.params
                kind = "ar" if req.mode == "ar" else "mock"
                groups.setdefault(StepKey(kind, (p.temperature, p.top_k, p.top_p)), []).append(req)
        for key, reqs in groups.items():
            inputs = self._batch(reqs)
            inputs["tokens"] = self._tensor([r.pending for r in reqs])
            out = self.runner.run(key, inputs)
            for req in reqs:
                req.pending = None
                req.started = True
                req.offset += int(req.sampled)
                req.nfe += int(req.mode == "mock_ar")

            def drawn(values, reqs=reqs):
                for req, tok in zip(reqs, values):
                    req.output.append(tok)
                    if tok in req.params.eos_ids:
                        self._finish(req, "eos")
                    elif len(req.output) == req.params.max_new_tokens:
                        self._finish(req, "length")
                    else:
                        req.pending = tok

            reads.append((out["next"], drawn))

    def _feed_last_prompt_tokens(self) -> None:
        reqs = [r for r in self._running
                if r.mode == "mask_diffusion" and not r.started and self._ready(r)]  # fmt: skip
        if not reqs:
            return
        inputs = {"slots": self._tensor([r.slot for r in reqs]),
                  "tokens": self._tensor([r.prompt[-1] for r in reqs])}  # fmt: skip
        self.runner.run(StepKey("feed"), inputs)
        for req in reqs:
            req.started = True
            self._new_block(req)

    def _read(self, reads) -> list[_Request]:
        """Every step's small outputs to the host in one copy, then their bookkeeping. Returns
        the requests whose block finished and that go on (their block to commit)."""
        self._blocks_to_commit = []
        if reads:
            values = torch.cat([t.to(torch.long) for t, _ in reads]).tolist()
            start = 0
            for tensor, callback in reads:
                callback(values[start : start + tensor.numel()])
                start += tensor.numel()
        return self._blocks_to_commit

    def _block_done(self, req: _Request) -> None:
        ids = req.block.tolist()
        req.output.extend(ids)
        n_blocks = req.params.max_new_tokens // req.params.block_size
        if any(t in req.params.eos_ids for t in ids):
            self._finish(req, "eos")
        elif len(req.commits) == n_blocks:
            self._finish(req, "length")
        else:
            self._blocks_to_commit.append(req)

    def _commit_blocks(self, reqs) -> None:
        """The context pass over every finished block of a request that goes on (eager: its
        attention is causal inside the block)."""
        groups = {}
        for req in reqs:
            groups.setdefault(req.params.block_size, []).append(req)
        for group in groups.values():
            ids = torch.stack([r.block for r in group])
            batch = self.pool.cache.select(self._tensor([r.slot for r in group]))
            self.lm.context_forward(ids, batch)
            self.pool.cache.store(batch)
            for req in group:
                self._new_block(req)

    def _new_block(self, req: _Request) -> None:
        p = req.params
        req.block = torch.full((p.block_size,), p.mask_token_id, dtype=torch.long,
                               device=self.lm.device)  # fmt: skip
        req.block_step = 0
        req.commits.append([])

    def _finish(self, req: _Request, reason: str) -> None:
        req.finish_reason = reason
        req.pending = req.block = None
        if req in self._running:
            self._running.remove(req)
        if req.slot is not None:
            self.pool.release(req.slot)
            req.slot = None
        self._finished_now.append(req)


__all__ = ["Engine", "RequestOutput", "MODES"]

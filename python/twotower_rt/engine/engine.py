"""The engine: requests come and go at any time, and every step batches all of them wherever they
are.

One :meth:`Engine.step`:

1. admits waiting requests into free slots, and runs one prefill pass over the next chunks of the
   admitted prompts' tokens but the last (the reference's first prefill pass), at most
   ``prefill_chunk`` tokens per step over all requests, so a long prompt does not stall the others;
2. launches the fixed-shape steps of :mod:`.steps`, each one batched forward: the denoiser over
   every mask-diffusion block whatever its block and step (t per sequence) with the commit
   decision; the AR and mock-AR steps (feed the pending token, draw the next: the first pending
   token is the last prompt token, the reference's second prefill pass); the last prompt token of
   diffusion requests whose prefill just finished. Their inputs (pending tokens, blocks, Philox
   counters) live on the device, so nothing waits for the host;
3. only then reads back the previous step's small outputs (tokens, commit counts, blocks), which
   the GPU finished while this step's work was queued behind it: emits tokens, finishes requests
   (EOS, length), and commits the finished diffusion blocks to the context (one pass, n =
   block_size, per block size). On the CPU, where a step is done when its launch returns, it
   reads this step's outputs at once instead.

So on a GPU the host learns of an EOS or a finished block one step late: that request's row of
the step in between is wasted (its result is dropped; a block's counter only advances where it
had masks), and nothing is read back inside a block's steps. Each request keeps its own
parameters, seed and counter, so its output is what it would be alone. The cache memory is a
:class:`SlotPool` planned up front; the steps run through a :class:`StepRunner` (bucketed batch
sizes, and CUDA graphs on the GPU with ``graphs``).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from ..model.tower import TwoTowerLM
from ..params import MODES, VERIFIED_SPARE_BLOCKS, SamplingParams, check_input_ids
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
    error: str | None = None  # finish_reason "error": what failed while stepping this request
    accepted_per_round: list[int] | None = None  # verified: drafts accepted per round


@dataclass
class _Request:
    id: str
    prompt: list[int]
    mode: str
    params: SamplingParams
    seed: int
    slot: int | None = None
    prefilled: int = 0  # tokens of prompt[:-1] in the cache
    started: bool = False  # the last prompt token went to the context
    length: int = 0  # tokens in its context (host-side: bounds the commit's attention)
    launched: int = 0  # ar, mock_ar: draws launched
    block_step: int | None = None  # mask_diffusion: steps launched on the current block
    output: list[int] = field(default_factory=list)
    reported: int = 0  # len(output) at the last report
    nfe: int = 0
    commits: list[list[int]] = field(default_factory=list)
    rounds: list[int] = field(default_factory=list)  # verified: drafts accepted per round read
    finish_reason: str | None = None
    error: str | None = None

    def snapshot(self) -> RequestOutput:
        new = self.output[self.reported :]
        self.reported = len(self.output)
        return RequestOutput(
            self.id, self.prompt, list(self.output), new, self.finish_reason is not None,
            self.finish_reason, self.nfe,
            [list(c) for c in self.commits] if self.mode == "mask_diffusion" else None,
            self.error,
            list(self.rounds) if self.mode == "verified" else None,
        )  # fmt: skip


@dataclass
class _InFlight:
    """A launched step's outputs on their way to the host: per group (kind, requests, sizes of
    its outputs), all of them in one host tensor filled by an asynchronous copy."""

    groups: list[tuple[str, list[_Request], list[int]]]
    values: torch.Tensor | None
    event: torch.cuda.Event | None


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
        self.model = model if hasattr(model, "lm") else None  # the TwoTowerModel, if given one
        self.tokenizer = getattr(model, "tokenizer", None)
        chunk = prefill_chunk
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"prefill_chunk must be an integer >= 1, got {prefill_chunk!r}")
        self.prefill_chunk = prefill_chunk
        self.plan: PoolPlan = plan_pool(
            self.lm.cfg, self.lm.dtype, self.lm.device, max_slots=max_slots, context=context,
            memory_budget=memory_budget, gpu_memory_utilization=gpu_memory_utilization,
        )  # fmt: skip
        self.pool = SlotPool(
            self.lm.cfg,
            self.plan,
            self.lm.dtype,
            self.lm.device,
            context_device=self.lm.context_device,
            mirror=self.lm.placed,
        )
        self.runner = StepRunner(self.lm, self.pool, graphs=graphs, pad=pad_batches)
        log.info(self.plan.describe())
        self._waiting: deque[_Request] = deque()
        self._running: list[_Request] = []
        self._requests: dict[str, _Request] = {}
        self._finished_now: list[_Request] = []  # finished since the last step's report
        self._inflight: _InFlight | None = None
        # On a GPU a step's outputs are read back one step late, while the next step runs; on
        # the CPU a step is done when its launch returns, so it is read at once (a late read
        # would cost a whole wasted denoiser forward per diffusion block).
        self._read_late = self.lm.device.type == "cuda"
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
        if mode == "verified":
            need += VERIFIED_SPARE_BLOCKS * p.block_size
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
        return bool(self._waiting or self._running or self._inflight)

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
        finished (what the previous step computed: see the module docstring)."""
        self._admit()
        self._prefill()
        launched = self._launch()
        if self._read_late:
            previous, self._inflight = self._inflight, launched
        else:
            previous = launched
        if previous is not None:
            self._process(previous)
        reports = [r for r in self._running if r.reported < len(r.output)] + self._finished_now
        self._finished_now = []
        return [r.snapshot() for r in reports]

    # --- the phases --------------------------------------------------------------------------
    def _tensor(self, values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.lm.device)

    def _admit(self) -> None:
        while self._waiting and self.pool.free:
            req = self._waiting.popleft()
            self._running.append(req)
            with self._isolated([req]):
                req.slot = self.pool.acquire(req.seed)

    @contextlib.contextmanager
    def _isolated(self, reqs: list[_Request]):
        """Work on behalf of ``reqs`` alone: an exception fails those requests (finish_reason
        "error", slots freed) and no other; the step goes on."""
        try:
            yield
        except Exception as exc:  # noqa: BLE001 -- any fault of this work is these requests'
            log.exception("engine: failing %d request(s)", len(reqs))
            for req in reqs:
                if req.finish_reason is None:
                    req.error = f"{type(exc).__name__}: {exc}"
                    self._finish(req, "error")

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
        full = all(take == width for _, take in chunk)
        n_valid = None if full else self._tensor([t for _, t in chunk])
        slots = self._tensor([r.slot for r, _ in chunk])
        with self._isolated([r for r, _ in chunk]):
            batch = self.pool.cache.select(slots, max_length=max(r.length for r, _ in chunk))
            self.lm.context_forward(ids, batch, n_valid=n_valid, hidden=False)
            self.pool.cache.store(batch, appended=width)
            for req, take in chunk:
                req.prefilled += take
                req.length += take

    def _launch(self) -> _InFlight | None:
        """Every fixed-shape step this step runs; their small outputs start on their way to the
        host."""
        groups: dict[StepKey, list[_Request]] = {}
        feed: list[_Request] = []
        for req in self._running:
            p = req.params
            ready = req.slot is not None and req.prefilled == len(req.prompt) - 1
            if not req.started:
                if not ready:
                    continue
                self.pool.tokens[req.slot] = req.prompt[-1]  # the first token to feed
                req.started = True
                if req.mode == "mask_diffusion":
                    req.length += 1
                    feed.append(req)
                    continue
                if req.mode == "verified":
                    self._new_round(req, req.prompt[-1])
            if req.mode == "mask_diffusion":
                if req.block_step is None or req.block_step >= p.steps_per_block:
                    continue  # no block yet, or its last step is launched: wait for its read
                key = StepKey("denoise", (p.block_size, p.mask_token_id, p.steps_per_block,
                                          p.confidence_threshold, p.temperature))  # fmt: skip
            elif req.mode == "verified":
                key = self._round_key(req)
                if key is None:
                    continue  # rounds enough for max_new_tokens launched: wait for their reads
            else:
                if req.launched >= p.max_new_tokens:
                    continue  # every draw is launched: wait for the last one's read
                kind = "ar" if req.mode == "ar" else "mock"
                key = StepKey(kind, (p.temperature, p.top_k, p.top_p))
            groups.setdefault(key, []).append(req)

        done: list[tuple[str, list[_Request], list[int]]] = []
        outputs: list[torch.Tensor] = []
        for key, reqs in groups.items():
            inputs = {"slots": self._tensor([r.slot for r in reqs])}
            if key.kind in ("denoise", "draft"):
                inputs["step"] = self._tensor([r.block_step for r in reqs])
                for req in reqs:
                    req.block_step += 1
            elif key.kind == "verify":
                for req in reqs:
                    req.block_step = 0  # the step writes the next round's block
                    req.launched += 1
                    req.length += req.params.block_size  # a bound until the read rolls it back
            else:
                for req in reqs:
                    req.launched += 1
                    req.length += 1  # the pending token it feeds
            with self._isolated(reqs):
                out = self.runner.run(key, inputs)
                if key.kind == "draft":
                    continue
                names = _OUTPUTS.get(key.kind, ("next",))
                tensors = [out[n].reshape(-1) for n in names]
                outputs += tensors
                done.append((key.kind, reqs, [t.numel() for t in tensors]))
        if feed:
            with self._isolated(feed):
                self.runner.run(StepKey("feed"), {"slots": self._tensor([r.slot for r in feed])})
                for req in feed:
                    self._new_block(req)
        if not outputs:
            return None
        values = torch.cat([t.to(torch.long) for t in outputs])
        event = None
        if values.is_cuda:  # pinned (cached by torch's host allocator), so the copy is async
            host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            values = host.copy_(values, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        return _InFlight(done, values, event)

    def _process(self, flight: _InFlight) -> None:
        """A launched step's outputs, now on the host: tokens, commits, finished blocks."""
        if flight.event is not None:
            flight.event.synchronize()
        values = flight.values.tolist()
        start, to_commit = 0, []
        for kind, reqs, sizes in flight.groups:
            parts = []
            for size in sizes:
                parts.append(values[start : start + size])
                start += size
            if kind == "denoise":
                self._process_blocks(reqs, *parts, to_commit)
            elif kind == "verify":
                self._process_rounds(reqs, *parts)
            else:
                self._process_draws(reqs, parts[0])
        self._commit_blocks(to_commit)

    def _process_draws(self, reqs, tokens) -> None:
        for req, tok in zip(reqs, tokens):
            if req.finish_reason is not None:
                continue  # launched before its EOS was known: dropped
            req.output.append(tok)
            req.nfe += int(req.mode == "mock_ar")
            if tok in req.params.eos_ids:
                self._finish(req, "eos")
            elif len(req.output) == req.params.max_new_tokens:
                self._finish(req, "length")

    def _process_blocks(self, reqs, blocks, masked, committed, to_commit) -> None:
        size = len(blocks) // len(reqs)
        for i, req in enumerate(reqs):
            if req.finish_reason is not None or masked[i] == 0:
                continue  # finished, or a step on a block already complete: dropped
            p = req.params
            req.nfe += 1
            req.commits[-1].append(committed[i])
            if committed[i] < masked[i]:
                continue
            ids = blocks[i * size : (i + 1) * size]
            req.output.extend(ids)
            req.block_step = None
            if any(t in p.eos_ids for t in ids):
                self._finish(req, "eos")
            elif len(req.commits) == p.max_new_tokens // p.block_size:
                self._finish(req, "length")
            else:
                to_commit.append(req)

    def _process_rounds(self, reqs, tokens, counts) -> None:
        """Verified rounds read back: each row's emitted tokens (accepted drafts + the next
        pending token), cut at EOS and max_new_tokens."""
        size = len(tokens) // len(reqs)
        for i, req in enumerate(reqs):
            if req.finish_reason is not None:
                continue  # launched before its end was known: dropped
            p, n = req.params, counts[i]
            req.rounds.append(n - 1)
            req.nfe += p.draft_steps
            req.length -= size - n  # the rollback kept the pending token and n - 1 drafts
            for tok in tokens[i * size : i * size + n]:
                req.output.append(tok)
                if tok in p.eos_ids:
                    self._finish(req, "eos")
                    break
                if len(req.output) == p.max_new_tokens:
                    self._finish(req, "length")
                    break

    def _round_key(self, req: _Request) -> StepKey | None:
        """A verified request's next step: a draft step, or the round's verify step; None while
        the rounds launched and not yet read could already finish it (each emits >= 1 token)."""
        p = req.params
        if len(req.output) + req.launched - len(req.rounds) >= p.max_new_tokens:
            return None
        common = (p.block_size, p.mask_token_id, p.draft_steps, p.confidence_threshold,
                  p.temperature)  # fmt: skip
        if req.block_step < p.draft_steps - 1:
            return StepKey("draft", common)
        return StepKey("verify", (*common, p.top_k, p.top_p))

    def _new_round(self, req: _Request, pending: int) -> None:
        """A verified request's first block: its pending token, then masks."""
        p = req.params
        block = self.pool.blocks(p.block_size)[req.slot]
        block.fill_(p.mask_token_id)
        block[0] = pending
        req.block_step = 0

    def _commit_blocks(self, reqs) -> None:
        """The context pass over every finished block of a request that goes on (eager: its
        attention is causal inside the block), then a fresh block."""
        groups = {}
        for req in reqs:
            groups.setdefault(req.params.block_size, []).append(req)
        for size, group in groups.items():
            with self._isolated(group):
                slots = self._tensor([r.slot for r in group])
                ids = self.pool.blocks(size).index_select(0, slots)
                batch = self.pool.cache.select(slots, max_length=max(r.length for r in group))
                self.lm.context_forward(ids, batch, hidden=False)
                self.pool.cache.store(batch, appended=size)
                for req in group:
                    req.length += size
                    self._new_block(req)

    def _new_block(self, req: _Request) -> None:
        p = req.params
        self.pool.blocks(p.block_size)[req.slot].fill_(p.mask_token_id)
        req.block_step = 0
        req.commits.append([])

    def _finish(self, req: _Request, reason: str) -> None:
        req.finish_reason = reason
        if req in self._running:
            self._running.remove(req)
        if req.slot is not None:
            self.pool.release(req.slot)
            req.slot = None
        self._finished_now.append(req)


# What each step kind hands back to the host, in order (ar and mock: "next").
_OUTPUTS = {"denoise": ("block", "masked", "committed"), "verify": ("tokens", "count")}

__all__ = ["Engine", "RequestOutput", "MODES"]

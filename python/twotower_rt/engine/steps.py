"""The engine's fixed-shape step functions and the runner that plays them eagerly or as CUDA graphs.

Every step the engine repeats is one function of a batch of slots (and, for ``denoise``, each
row's step within its block), with fixed shapes. Everything else a step reads or writes lives in
the :class:`SlotPool` on the device, so steps run back to back with nothing read by the host:

- ``ar``:      feed each slot's pending token to the context tower, draw the next token from the
               context head (temperature, top-k, top-p fixed per function) into the pending token;
- ``mock``:    the same for mock-AR: keep the Mamba state before the token, feed it, and draw the
               next token from the denoiser reading that token against the context before it;
- ``denoise``: one denoiser forward over each slot's block (t per row) and the mask-sampling
               decision (block size, mask id, steps, threshold, temperature fixed per function),
               written back into the block;
- ``feed``:    each slot's pending token into the context tower (a diffusion request's last
               prompt token);
- ``draft``:   ``denoise`` for a verified round's draft (its outputs are not read back);
- ``verify``:  a verified round's last draft forward, the context pass over the drafted block,
               acceptance and rollback (:mod:`.verify`).

Draws advance each slot's Philox counter on the device (a denoise step only where the block still
had masks), exactly as a request alone advances it. :class:`StepRunner` runs a step at a batch size
rounded up to a bucket: rows past the real ones point at the pool's spare slot (a row no request
owns, its length reset by every appending step, so it never runs past its capacity). With
``graphs`` (CUDA only) each (function, bucket) is captured into a CUDA graph the first time it
runs and replayed after. The variable-shape work (the chunked prefill, committing finished blocks)
stays eager.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..model.tower import TwoTowerLM
from ..ops.mask_sampling import mask_sampling
from ..ops.sample_tokens import sample_tokens
from .pool import SlotPool
from .verify import make_verify_step

# Step functions (and their CUDA graphs) kept at once: one per distinct parameter set, so a stream
# of requests with ever new temperatures must not grow them without bound (least recently used go).
MAX_STEP_FUNCTIONS = 64
BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)


def bucket(n: int) -> int:
    """The smallest bucket holding n rows (n itself past the largest)."""
    for b in BUCKETS:
        if b >= n:
            return b
    return n


@dataclass(frozen=True)
class StepKey:
    """Which step function, with the parameters baked into it."""

    kind: str  # "ar", "mock", "denoise", "feed", "draft", "verify"
    params: tuple = ()


def make_step(lm: TwoTowerLM, pool: SlotPool, key: StepKey) -> Callable[..., dict]:
    """The step function for ``key``: keyword tensors of one batch in, a dict of tensors out."""
    cache, spare = pool.cache, pool.spare
    draw, decide = sample_tokens, mask_sampling
    if lm.tp is not None and not lm.gather_logits:  # vocabulary-parallel logits: the slices
        from ..parallel.sampling import tp_mask_sampling, tp_sample_tokens

        draw = functools.partial(tp_sample_tokens, tp=lm.tp, vocab_start=lm.vocab_start)
        decide = functools.partial(tp_mask_sampling, tp=lm.tp, vocab_start=lm.vocab_start)

    def rng(slots, sampled):
        if not sampled:
            return None, None
        return pool.seeds.index_select(0, slots), pool.offsets.index_select(0, slots)

    if key.kind in ("ar", "mock", "feed"):
        temperature, top_k, top_p = key.params if key.kind != "feed" else (0.0, None, None)
        sampled = temperature > 0

        def step(slots):
            cache.lengths[spare] = 0  # padded rows append here: keep them inside its capacity
            tokens = pool.tokens.index_select(0, slots)
            if key.kind == "mock":
                pool.save_before(slots)
            batch = cache.select(slots)
            hidden = lm.context_forward(tokens[:, None], batch)
            cache.store(batch, appended=1)
            if key.kind == "feed":
                return {}
            if key.kind == "ar":
                logits = lm.context_logits(hidden[:, -1])
            else:
                logits = lm.denoiser_logits(
                    tokens[:, None], batch, prefix_len=batch.lengths - 1,
                    mamba_states=pool.before_states(slots), t=None,
                )[:, -1]  # fmt: skip
            seed, offset = rng(slots, sampled)
            drawn = draw(logits, temperature, top_k, top_p, seed, offset)
            pool.tokens.index_copy_(0, slots, drawn)
            if sampled:
                pool.offsets.index_add_(0, slots, torch.ones_like(slots))
            return {"next": drawn}

        return step

    if key.kind == "verify":
        return make_verify_step(lm, pool, key, draw, decide)

    if key.kind in ("denoise", "draft"):  # draft: a verified round's denoise step (no outputs read)
        size, mask_id, steps, threshold, temperature = key.params
        blocks = pool.blocks(size)

        def step(slots, step):
            block = blocks.index_select(0, slots)
            masked = block == mask_id
            n_masked = masked.sum(dim=-1)
            batch = cache.select(slots)
            logits = lm.denoiser_logits(
                block, batch, prefix_len=batch.lengths, mamba_states=batch.mamba,
                t=n_masked.to(torch.float32) / size, needed=masked,
            )  # fmt: skip
            seed, offset = rng(slots, temperature > 0)
            out = decide(
                logits, block, mask_token_id=mask_id, step=step, steps_per_block=steps,
                confidence_threshold=threshold, temperature=temperature, seed=seed, offset=offset,
            )  # fmt: skip
            blocks.index_copy_(0, slots, out.block)
            if temperature > 0:  # only rows that still had masks drew noise
                pool.offsets.index_add_(0, slots, (n_masked > 0).to(torch.long))
            return {
                "block": out.block,
                "masked": n_masked,
                "committed": (out.block != block).sum(dim=-1),
            }

        return step

    raise ValueError(f"unknown step kind {key.kind!r}")


# Padding of each input for the rows past the real ones (slots: the spare slot).
def _pad_value(name: str, pool: SlotPool) -> int:
    return pool.spare if name == "slots" else 0


class StepRunner:
    """Runs step functions at bucketed batch sizes, eagerly or (``graphs``) as CUDA graphs.

    ``pad``: round batches up to a bucket even when eager (what graphs need; tests use it on the
    CPU to check that padding changes no real row)."""

    def __init__(self, lm: TwoTowerLM, pool: SlotPool, *, graphs: bool = False, pad: bool = False):
        if graphs and lm.device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        self.lm, self.pool = lm, pool
        self.graphs = graphs
        self.pad = pad or graphs
        self._fns: OrderedDict[StepKey, Callable[..., dict]] = OrderedDict()
        self._graphs: dict[tuple[StepKey, int], _Captured] = {}
        self._mempool = None

    def run(self, key: StepKey, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Outputs for the len(slots) real rows of ``inputs`` (tensors whose first dim is the
        batch)."""
        fn = self._fns.get(key)
        if fn is None:
            fn = self._fns[key] = make_step(self.lm, self.pool, key)
            if len(self._fns) > MAX_STEP_FUNCTIONS:
                old, _ = self._fns.popitem(last=False)
                for graph_key in [k for k in self._graphs if k[0] == old]:
                    del self._graphs[graph_key]
        else:
            self._fns.move_to_end(key)
        n = inputs["slots"].shape[0]
        if not self.pad:
            return fn(**inputs)
        size = bucket(n)
        if not self.graphs:
            return {k: v[:n] for k, v in fn(**self._padded(inputs, size)).items()}
        captured = self._graphs.get((key, size))
        if captured is None:
            captured = self._capture(fn, self._padded(inputs, size))
            self._graphs[(key, size)] = captured
        for name, value in inputs.items():
            static = captured.inputs[name]
            static[:n].copy_(value)
            static[n:].fill_(_pad_value(name, self.pool))
        captured.graph.replay()
        return {k: v[:n] for k, v in captured.outputs.items()}

    def _padded(self, inputs, size):
        padded = {}
        for name, value in inputs.items():
            extra = size - value.shape[0]
            if extra:
                fill = value.new_full((extra, *value.shape[1:]), _pad_value(name, self.pool))
                value = torch.cat([value, fill])
            padded[name] = value
        return padded

    def _capture(self, fn, inputs) -> _Captured:
        static = {k: v.clone() for k, v in inputs.items()}
        # Warm up (allocator, workspaces) off the capturing stream, every row on the spare slot:
        # the warm-up runs for real and must not step any request.
        warm = {k: v.clone() for k, v in static.items()}
        warm["slots"].fill_(self.pool.spare)
        stream = torch.cuda.Stream(self.lm.device)
        stream.wait_stream(torch.cuda.current_stream(self.lm.device))
        with torch.cuda.stream(stream):
            fn(**warm)
        torch.cuda.current_stream(self.lm.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if self._mempool is None:
            self._mempool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self._mempool):
            outputs = fn(**static)
        return _Captured(graph, static, outputs)


@dataclass
class _Captured:
    graph: object
    inputs: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor]
